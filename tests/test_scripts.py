"""The entry scripts end to end on a small synthetic set: prepare -> train -> resume -> test."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import test as test_script
import training
from utils.artifacts.model_file import read_model_info
from utils.data import demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, flags", [
    ("prepare.py", ["--input", "--image-size", "--aspect", "--split-ratios", "--demo", "--decode-pool",
                    "--decode-timeout-s", "--decode-memory-limit-mb"]),
    ("training.py", ["--backbone", "--epochs", "--weights", "--resume", "--demo", "resnet18", "--bn-momentum",
                     "--finetune", "FINETUNE_EPOCHS"]),
    ("test.py", ["--data", "--split", "--bootstrap-resamples", "--bootstrap-unit", "--demo", "--decode-pool",
                 "--decode-workers", "--decode-timeout-s", "--decode-memory-limit-mb", "--max-skipped-share"]),
])
def test_help_explains_the_flags(script, flags):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr
    for flag in flags:
        assert flag in out.stdout
    assert "(default:" in out.stdout  # defaults are shown, as the usage examples above them are kept


def test_mistyped_backbone_is_rejected(capsys):
    with pytest.raises(SystemExit):
        training.parse_args(["--backbone", "mobilenet_v3"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    result = demo.prepare_demo(progress=False, image_size=64, root=root, images_per_class=8)
    assert set(result.rejects["reason"]) == {"no_pixel_data", "truncated_pixel_data"}
    return root / "prepared"


def test_train_resume_and_evaluate(small_demo, tmp_path):
    run = tmp_path / "run"
    common = ["--data", str(small_demo), "--output", str(run), "--backbone", "mobilenet_v1", "--batch-size", "8",
              "--quiet", "--seed", "1"]
    assert training.main(common + ["--epochs", "1"]) == 0
    for name in ("config.json", "log.csv", "best.keras", "last.keras", "best.json", "training_curves.png"):
        assert (run / name).is_file(), name
    assert (run / "tensorboard").is_dir()
    info = read_model_info(run)
    assert info.spec.image_size == 64 and info.spec.class_names == demo.DEMO_CLASSES and info.backbone == "mobilenet_v1"
    first_seconds = json.loads((run / "config.json").read_text())["train_seconds"]
    assert first_seconds > 0  # what the run cost, in the run
    # a second run into the same directory without --resume is refused
    assert training.main(common + ["--epochs", "1"]) == 2
    # --resume continues where it stopped, with the saved settings and optimizer state; --epochs trains longer
    assert training.main(["--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == [0, 1]
    payload = json.loads((run / "config.json").read_text())
    assert payload["config"]["epochs"] == 2 and payload["config"]["phases"] == [[0, 1, False], [1, 2, False]]
    assert payload["resumes"][0]["after_epoch"] == 1 and payload["resumes"][0]["epochs"] == 2
    assert payload["train_seconds"] > first_seconds  # summed over the resume
    assert read_model_info(run / "last.keras").extra["epoch"] == 2
    assert (log["learning_rate"] < 1e-6).all()  # the added epoch has a one-cycle of its own
    assert {"loss", "accuracy", "macro_f1", "val_macro_f1", "val_accuracy", "learning_rate"} <= set(log.columns)

    out = tmp_path / "eval"
    assert test_script.main([str(run), "--data", str(small_demo), "--output", str(out), "--timing-runs", "3",
                             "--bootstrap-resamples", "200", "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_images"] == len(pd.read_csv(small_demo / "labels.csv").query("split == 'test'"))
    assert results["coverage"]["listed"] == results["n_images"] and results["coverage"]["skipped"] == 0
    assert not (out / "skipped.csv").exists()
    assert results["bootstrap"]["unit"] == "group"  # two images per synthetic patient
    assert results["timing"]["batch1_ms_median"] > 0
    for name in ("predictions.csv", "results.md", "confusion_matrix.png", "roc_curves.png"):
        assert (out / name).is_file()
    # how far the confidence can be trusted: calibration fitted after training, judged on the test split
    assert results["confidence"]["temperature"] > 0 and results["confidence"]["ece"] >= 0
    assert results["confidence"]["at_stored_threshold"]["coverage"] is not None
    assert "## Confidence and review" in (out / "results.md").read_text()
    assert (out / "reliability_diagram.png").is_file() and (out / "risk_coverage.png").is_file()
    # the most confident errors, with Grad-CAM, when there are any
    wrong = ~pd.read_csv(out / "predictions.csv")["correct"]
    assert (out / "error_gallery.png").is_file() == bool(wrong.any())
    if wrong.any():
        assert len(pd.read_csv(out / "error_gallery.csv")) == min(int(wrong.sum()), 24)

    # the raw DICOM folder goes through the model's own preprocessing; broken files are left out,
    # and counted: 2 of 42 is more than the default --max-skipped-share allows
    raw = tmp_path / "raw"
    assert test_script.main([str(run / "best.keras"), "--data", str(small_demo.parent / "dicom"), "--output",
                             str(raw), "--timing-runs", "0", "--bootstrap-resamples", "100",
                             "--max-skipped-share", "0.05", "--quiet"]) == 0
    raw_results = json.loads((raw / "results.json").read_text())
    assert raw_results["n_images"] == 40
    reasons = sorted(x["reason"].split(":")[0] for x in raw_results["extra"]["left_out"])
    assert reasons == ["not_projection_radiography", "truncated_pixel_data"]  # the SR: the header guard's reason
    assert raw_results["coverage"] == {"listed": 42, "evaluated": 40, "skipped": 2, "skipped_share": 2 / 42,
                                       "skipped_by_reason": {"not_projection_radiography": 1,
                                                             "truncated_pixel_data": 1},
                                       "max_skipped_share": 0.05}
    assert sorted(pd.read_csv(raw / "skipped.csv")["reason"]) == reasons

    # several models -> one comparison table
    both = tmp_path / "both"
    assert test_script.main([str(run / "best.keras"), str(run / "last.keras"), "--data", str(small_demo),
                             "--output", str(both), "--timing-runs", "0", "--bootstrap-resamples", "100",
                             "--quiet"]) == 0
    table = (both / "comparison.md").read_text()
    assert "| best |" in table and "| last |" in table
    assert "| Evaluated | Skipped |" in table


def test_pretrained_weights_file_with_frozen_warmup(small_demo, tmp_path):
    """--weights PATH + --freeze-epochs: the head trains alone first, then everything."""
    from models import build_model

    weights = tmp_path / "start.weights.h5"
    build_model("mobilenet_v2", len(demo.DEMO_CLASSES), (64, 64, 1), None).save_weights(weights)
    run = tmp_path / "run"
    assert training.main(["--data", str(small_demo), "--output", str(run), "--backbone", "mobilenet_v2",
                          "--weights", str(weights), "--freeze-epochs", "1", "--epochs", "2", "--batch-size", "8",
                          "--max-steps-per-epoch", "2", "--quiet"]) == 0
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].tolist() == [0, 1]
    # each phase has its own one-cycle: the learning rate falls to its floor at the end of both
    assert (log["learning_rate"] < 1e-6).all()


def test_finetune_on_two_corrections_keeps_the_parents_validation_set(small_demo, tmp_path, capsys):
    """Issue 24 item 3, the operator's loop: two corrections (one patient group: both land in train) prepared
    with prepare.py --model, then training.py --finetune RUN --data: no "split 'val' is empty", the new run has
    the parent's spec and classes, its lineage, a refitted calibration; other classes and another image size
    are refused with a clear message."""
    import prepare

    parent = tmp_path / "parent"
    assert training.main(["--data", str(small_demo), "--output", str(parent), "--backbone", "mobilenet_v1",
                          "--batch-size", "8", "--epochs", "1", "--max-steps-per-epoch", "1", "--quiet"]) == 0
    # the router console's corrections dataset: files/ + labels.csv in prepare.py's CSV format
    labels = pd.read_csv(small_demo / "labels.csv").query("split == 'train'").groupby("label").head(1).head(2)
    corrections = tmp_path / "corrections"
    (corrections / "files").mkdir(parents=True)
    rows = []
    for i, row in enumerate(labels.itertuples()):
        target = corrections / "files" / f"{i}.dcm"
        target.write_bytes(Path(row.source_file).read_bytes())
        rows.append({"path": f"files/{i}.dcm", "label": row.label, "group": "P1", "sop_instance_uid": f"1.2.{i}",
                     "previous_label": "others", "who": "alice", "time": "2026-12-01T00:00:00+00:00"})
    pd.DataFrame(rows).to_csv(corrections / "labels.csv", index=False)
    data = tmp_path / "data-corrections"
    capsys.readouterr()
    assert prepare.main(["--input", str(corrections / "labels.csv"), "--output", str(data), "--model", str(parent),
                         "--image-size", "128", "--quiet"]) == 2  # another size than the model's
    assert "--image-size 128 (the model has 64)" in capsys.readouterr().err
    assert prepare.main(["--input", str(corrections / "labels.csv"), "--output", str(data), "--model", str(parent),
                         "--quiet"]) == 0
    assert "use: python training.py --finetune RUN_DIR" in capsys.readouterr().out  # all in train: what to do
    assert set(pd.read_csv(data / "labels.csv")["split"]) == {"train"}

    # refused before anything is trained: another image size asked for, a dataset for other classes
    assert training.main(["--finetune", str(parent), "--data", str(data), "--output", str(tmp_path / "x"),
                          "--image-size", "128", "--quiet"]) == 2
    assert "--image-size 128 (the model has 64)" in capsys.readouterr().err
    other = tmp_path / "other-classes"
    shutil.copytree(data, other)
    spec = json.loads((other / "preprocess.json").read_text())
    (other / "preprocess.json").write_text(json.dumps({**spec, "class_names": ["chest", "abdominal", "spine"]}))
    assert training.main(["--finetune", str(parent), "--data", str(other), "--output", str(tmp_path / "y"),
                          "--quiet"]) == 2
    assert "a fine-tune keeps the model's classes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

    run = tmp_path / "finetuned"
    assert training.main(["--finetune", str(parent), "--data", str(data), "--output", str(run), "--epochs", "1",
                          "--max-steps-per-epoch", "1", "--quiet"]) == 0
    payload = json.loads((run / "config.json").read_text())
    parent_payload = json.loads((parent / "config.json").read_text())
    assert payload["spec"] == parent_payload["spec"]
    lineage = payload["finetune"]
    assert lineage["parent"] == str(parent) and lineage["data"] == str(data)
    assert lineage["sources"] == [str(small_demo), str(data)]
    n_val = int((pd.read_csv(small_demo / "labels.csv")["split"] == "val").sum())
    assert lineage["new_train"] == 2 and lineage["val"] == lineage["parent_val"] == n_val
    assert lineage["rehearsal_per_new_image"] == 4.0 and 0 < lineage["rehearsal_images"] <= 8  # FINETUNE_REHEARSAL per new image
    settings = payload["config"]
    assert settings["data"] == str(small_demo)  # test.py / export.py find the original test split
    assert settings["epochs"] == 1 and settings["max_lr"] == 1e-4 and settings["weights"].endswith("best.keras")
    info = read_model_info(run)
    assert info.spec.to_dict() == parent_payload["spec"] and info.backbone == "mobilenet_v1"
    assert info.extra["finetuned_from"]["run"] == str(parent)
    assert info.calibration["n_images"] == n_val and info.recommended_threshold is not None  # refitted
    # a fine-tune is not resumed (run it again)
    assert training.main(["--resume", str(run), "--quiet"]) == 2
    assert "is not resumed" in capsys.readouterr().err


def test_test_py_leaves_out_hostile_raw_files_with_their_reason(tmp_path, monkeypatch):
    """Raw files through the isolated engine: a hang, a crash, a codec panic and a text file named .dcm
    are left out with their reasons; the evaluation goes on with the rest."""
    from fuzz.hostile import write_panicking_rle
    from utils.infer import engine
    from utils.io.dicom_writer import write_dicom

    from .routing.conftest import ROWS_BY_CLASS, bright_rows_image, brightness_model
    from .utils.infer.test_engine import hostile_decode

    model = brightness_model(tmp_path / "brightness.keras")
    data = tmp_path / "data"
    for label, rows in ROWS_BY_CLASS.items():
        for i in range(2):
            write_dicom(data / label / f"{i}.dcm", bright_rows_image(rows), bits_stored=12, patient_id=f"{label}{i}")
    spine = data / "spine"
    for name in ("hang.dcm", "die.dcm"):
        (spine / name).write_bytes((spine / "0.dcm").read_bytes())
    write_panicking_rle(spine / "panic.dcm")
    (spine / "x.dcm").write_text("not DICOM")
    monkeypatch.setattr(engine, "decode_file", hostile_decode)  # hang* sleeps, die* kills its worker
    out = tmp_path / "eval"
    assert test_script.main([str(model), "--data", str(data), "--output", str(out), "--timing-runs", "0",
                             "--bootstrap-resamples", "50", "--decode-timeout-s", "2", "--max-skipped-share", "0.3",
                             "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_images"] == 10
    assert results["coverage"]["listed"] == 14 and results["coverage"]["skipped"] == 4
    reasons = {Path(x["file"]).name: x["reason"].split(":")[0] for x in results["extra"]["left_out"]}
    assert reasons == {"panic.dcm": "codec_panic", "hang.dcm": "decode_timeout", "die.dcm": "decoder_crashed", "x.dcm": "not_dicom"}
    assert json.loads((out / "test_config.json").read_text())["config"]["decode_pool"] == "processes"


def test_an_entry_script_starts_quietly_and_still_shows_errors(tmp_path):
    """Issue 23: TensorFlow's start-up lines (absl's banner, oneDNN, cuda drivers, cuInit) and OpenJPEG's
    per-tile INFO lines are gone from a real run of predict.py (one interpreter, one TensorFlow start,
    the user's TF_CPP_MIN_LOG_LEVEL unset), while its errors still show: a classification of a JPEG 2000
    file, then --threshold auto on a model without calibration (an error after TensorFlow is loaded),
    then a JPEG 2000 file written under the logging the script set up (the demo's encoder logs per tile)."""
    from pydicom.uid import JPEG2000Lossless

    from utils.io.dicom_writer import write_dicom

    from .routing.conftest import bright_rows_image, brightness_model

    model = brightness_model(tmp_path / "brightness.keras")
    inputs = tmp_path / "in"
    write_dicom(inputs / "j2k.dcm", bright_rows_image(40), bits_stored=12, transfer_syntax=JPEG2000Lossless)
    script = textwrap.dedent("""
        import runpy, sys
        model, inputs, out = sys.argv[1:]
        codes = []
        for argv in (["--model", model, "--output", out, "--quiet", inputs],
                     ["--model", model, "--threshold", "auto", "--output", out + ".2", "--quiet", inputs]):
            sys.argv = ["predict.py", *argv]
            try:
                runpy.run_path("predict.py", run_name="__main__")
            except SystemExit as exit:
                codes.append(exit.code)
        import numpy as np
        from pydicom.uid import JPEG2000Lossless
        from utils.io.dicom_writer import write_dicom
        write_dicom(out + ".dcm", np.full((64, 64), 100, np.uint16), bits_stored=12, transfer_syntax=JPEG2000Lossless)
        print(codes, "tensorflow" in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = tmp_path / "predictions.csv"
    result = subprocess.run([sys.executable, "-c", script, str(model), str(inputs), str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, check=False, env=env)
    assert result.stdout.strip().splitlines()[-1] == "[0, 2] True", result.stdout[-2000:] + result.stderr[-3000:]
    rows = pd.read_csv(out)
    assert len(rows) == 1 and rows["error"].isna().all() and rows["label"].notna().all()  # the J2K file was read
    for noise in ("absl::InitializeLog", "oneDNN", "cuda drivers", "cuInit", "cpu_feature_guard", "tile number",
                  "Tile "):
        assert noise not in result.stderr, result.stderr[-3000:]
    assert "error: --threshold auto" in result.stderr, result.stderr[-3000:]  # a real error still shows
