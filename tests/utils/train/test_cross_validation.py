"""training.py --folds K end to end: one run per fold, pooled out-of-fold predictions, test.py on them."""

import json

import pandas as pd
import pytest

import test as test_script
import training
from utils.data import demo
from utils.data.dataset import split_frame
from utils.data.split import Fold
from utils.train.cross_validation import fold_spread


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    demo.prepare_demo(progress=False, image_size=32, root=root, images_per_class=6)
    return root / "prepared"


def test_fold_runs_see_no_patient_of_their_test_fold(tiny_demo):
    labels = pd.read_csv(tiny_demo / "labels.csv", dtype=str)
    tested = []
    for index in range(3):
        fold = Fold(index, 3, seed=7)
        parts = {s: split_frame(tiny_demo, s, demo.DEMO_CLASSES, fold) for s in ("train", "val", "test")}
        assert sum(len(p) for p in parts.values()) == len(labels)  # every split of the dataset is pooled
        assert not set(parts["train"]["group"]) & set(parts["test"]["group"])
        assert not set(parts["val"]["group"]) & (set(parts["test"]["group"]) | set(parts["train"]["group"]))
        tested += parts["test"]["path"].tolist()
    assert sorted(tested) == sorted(labels["path"])


def test_cross_validation_pools_out_of_fold_predictions(tiny_demo, tmp_path, capsys):
    cv = tmp_path / "cv"
    assert training.main(["--data", str(tiny_demo), "--output", str(cv), "--folds", "2", "--epochs", "1",
                          "--backbone", "mobilenet_v1", "--batch-size", "8", "--max-steps-per-epoch", "1",
                          "--quiet", "--seed", "3"]) == 0
    info = json.loads((cv / "cv.json").read_text())
    assert [f["fold"] for f in info["folds"]] == [1, 2]
    assert all(f["train_seconds"] > 0 for f in info["folds"])  # what each fold cost
    for index in (1, 2):
        saved = json.loads((cv / f"fold-{index}" / "config.json").read_text())["config"]
        assert saved["fold"] == index - 1 and saved["folds"] == 2
    oof = pd.read_csv(cv / "oof_predictions.csv")
    labels = pd.read_csv(tiny_demo / "labels.csv")
    assert len(oof) == len(labels) and oof["file"].is_unique  # every image predicted exactly once
    assert sorted(oof["fold"].value_counts().index) == [1, 2]
    for fold, part in oof.groupby("fold"):  # by the model that never saw its patients
        trained = split_frame(tiny_demo, "train", demo.DEMO_CLASSES, Fold(fold - 1, 2, 3))
        assert not set(part["group"].astype(str)) & set(trained["group"])
    assert "python test.py" in capsys.readouterr().out

    # continuing a finished cross-validation trains nothing and pools again
    assert training.main(["--resume", str(cv), "--quiet"]) == 0
    assert len(pd.read_csv(cv / "oof_predictions.csv")) == len(labels)

    assert test_script.main([str(cv), "--bootstrap-resamples", "100", "--quiet", "--shift", "invert",
                             "--shift", "jpeg:2"]) == 0
    results = json.loads((cv / "eval-cv" / "results.json").read_text())
    # --shift on a cross-validation: each fold's model on its own fold under every shift, pooled
    shifted = json.loads((cv / "eval-cv" / "shifts.json").read_text())
    assert [(r["shift"], r["severity"]) for r in shifted["rows"]] == [("clean", 0), ("invert", 1), ("jpeg", 2)]
    assert shifted["n_images"] == len(labels) and shifted["split"] == "out-of-fold"
    assert shifted["rows"][0]["macro_f1"]["value"] == pytest.approx(results["metrics"]["macro_f1"]["value"], abs=1e-6)
    assert len(shifted["fold_thresholds"]) == 2 and "each fold's own auto threshold" in \
        (cv / "eval-cv" / "shifts.md").read_text()
    clean_routed = (oof[[c for c in oof if c.startswith("prob_")]].max(axis=1) >= oof["threshold"]).mean()
    assert shifted["rows"][0]["routed_share"] <= clean_routed + 1e-9  # the same rule, minus what OOD flags
    # bench/tta.py: the fold models again, with test-time views, paired against the plain ones
    from bench import tta

    assert tta.main([str(cv), "--views", "identity", "identity,flip", "--resamples", "50"]) == 0
    rows = json.loads((cv / "tta" / "tta.json").read_text())["results"]
    assert [r["views"] for r in rows] == ["identity", "identity+flip"] and rows[0]["images"] == len(labels)
    plain = pd.read_csv(cv / "tta" / "identity.csv").set_index("file")
    assert (plain.loc[oof["file"], "predicted_label"].to_numpy() == oof["predicted_label"].to_numpy()).all()
    assert rows[1]["paired_difference"] is not None and rows[0]["paired_difference"] is None
    assert results["split"] == "out-of-fold" and results["n_images"] == len(labels)
    assert results["bootstrap"]["unit"] == "group"
    assert results["extra"]["cross_validation"]["folds"] == 2
    assert "## Cross-validation" in (cv / "eval-cv" / "results.md").read_text()
    # the error gallery: out-of-fold errors, each with the Grad-CAM of the fold model that predicted it
    errors = oof[~oof["correct"]]
    if len(errors):
        from PIL import Image

        shown = pd.read_csv(cv / "eval-cv" / "error_gallery.csv")
        assert 0 < len(shown) <= min(len(errors), 24) and set(shown["file"]) <= set(errors["file"])
        title = Image.open(cv / "eval-cv" / "error_gallery.png").text.get("Title", "")
        assert f"{len(errors)} errors ({len(oof)} images)" in title and "no saliency" not in title
        assert [oof["file"][i] for i in shown["index"]] == shown["file"].tolist()  # index: the row of oof
    # bench/recipes.py compares cross-validations by these results, one row each
    from bench import recipes as recipes_table

    capsys.readouterr()
    assert recipes_table.main([str(cv), "--output", str(tmp_path / "recipes.md")]) == 0
    line = next(x for x in (tmp_path / "recipes.md").read_text().splitlines() if x.startswith("| cv |"))
    assert "(baseline)" in line and f"{results['metrics']['macro_f1']['value']:.3f} (" in line
    assert line.rstrip(" |").split("| ")[-1].strip().isdigit()  # recorded train minutes, no file-time star
    # each fold model served with its own calibration, judged on the images it never saw
    assert len(results["confidence"]["temperature"]) == 2 and results["confidence"]["stored_threshold"] == "per fold"
    oof = pd.read_csv(cv / "oof_predictions.csv")
    assert {"temperature", "threshold"} <= set(oof.columns)
    assert results["confidence"]["at_stored_threshold"]["to_review"] == int(
        (oof[[c for c in oof if c.startswith("prob_")]].max(axis=1) < oof["threshold"]).sum())


def test_fold_spread():
    folds = [{"macro_f1": 0.8}, {"macro_f1": 0.9}, {"macro_f1": None}]
    spread = fold_spread(folds)
    assert spread["mean"] == pytest.approx(0.85) and spread["min"] == 0.8 and spread["max"] == 0.9
    assert spread["sd"] == pytest.approx(0.0707, abs=1e-3)
    assert fold_spread([{"macro_f1": None}])["mean"] is None


def test_one_fold_is_refused(capsys):
    with pytest.raises(SystemExit):
        training.parse_args(["--folds", "1"])
    assert "--folds 1 leaves nothing to train on" in capsys.readouterr().err
