"""utils.train.finetune without training: the parent, the flags, the settings and the data of a fine-tune.
(tests/test_scripts.py runs one end to end.)"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest

from utils import config, constants
from utils.artifacts.model_file import ModelMetadata
from utils.preprocessing import PreprocessSpec
from utils.train import finetune as F

CLASSES = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")
SPEC = PreprocessSpec(class_names=CLASSES, image_size=64, channels=1)


def prepared(folder: Path, rows: list[tuple[str, str, str]], spec: PreprocessSpec = SPEC) -> str:
    """A prepared dataset's listing (no images: nothing here decodes them): rows of (label, split, uid)."""
    folder.mkdir(parents=True)
    pd.DataFrame([{"path": f"images/{label}/{i}.png", "label": label, "split": split, "group": f"g{i}",
                   "SOPInstanceUID": uid} for i, (label, split, uid) in enumerate(rows)]).to_csv(
        folder / "labels.csv", index=False)
    spec.save(folder)
    return str(folder)


def parent(sources: tuple[str, ...] = (), settings: dict | None = None, spec: PreprocessSpec = SPEC) -> F.Parent:
    return F.Parent(Path("runs/p"), Path("runs/p/best.keras"), ModelMetadata(spec, "p/epoch-3", "mobilenet_v1"),
                    settings or {}, sources)


def args(*given: str, **values) -> Namespace:
    return Namespace(**{"given_flags": set(given), "image_size": None, "channels": None, "backbone": "mobilenet_v1",
                        "weights": "none", **values})


def test_rehearsal_sample_is_stratified_seeded_and_bounded():
    frame = pd.DataFrame({"label": ["a"] * 90 + ["b"] * 10})
    picked = F.rehearsal_sample(frame, 10, seed=1)
    assert picked["label"].value_counts().to_dict() == {"a": 9, "b": 1}
    assert picked.index.equals(F.rehearsal_sample(frame, 10, seed=1).index)  # seeded
    assert len(F.rehearsal_sample(frame, 500, seed=1)) == 100 and F.rehearsal_sample(frame, 0, seed=1).empty
    rare = pd.DataFrame({"label": ["a"] * 98 + ["b", "c"]})
    assert set(F.rehearsal_sample(rare, 3, seed=0)["label"]) == {"a", "b", "c"}  # every class while count allows


def test_settings_are_the_parents_with_a_short_low_lr_schedule_and_the_command_line_on_top():
    settings = {config.dest_name(name): getattr(constants, name) for name in (
        "EPOCHS", "MAX_LR", "BATCH_SIZE", "FREEZE_EPOCHS", "AUGMENT_ROTATION_DEG", "CLASS_WEIGHTS", "BACKBONE",
        "WEIGHTS", "FOLDS", "RECIPE", "BN_RECALIBRATION_STEPS", "SEED")}
    run = parent(settings={"epochs": 60, "max_lr": 0.01, "batch_size": 16, "augment_rotation_deg": 5.0,
                           "class_weights": True, "bn_recalibration_steps": 9, "recipe": "small-data", "folds": 5,
                           "data": "data/x"})
    merged = F.finetune_settings(args(), settings, run)
    assert merged["epochs"] == constants.FINETUNE_EPOCHS and merged["max_lr"] == constants.FINETUNE_MAX_LR
    assert merged["batch_size"] == 16 and merged["augment_rotation_deg"] == 5.0 and merged["class_weights"]
    assert merged["weights"] == "runs/p/best.keras" and merged["folds"] == 0 and merged["backbone"] == "mobilenet_v1"
    assert merged["bn_recalibration_steps"] == 0 and merged["freeze_epochs"] == 0
    given = F.finetune_settings(args("--epochs", "--batch-size", "--no-class-weights"),
                                {**settings, "epochs": 3, "batch_size": 4, "class_weights": False}, run)
    assert given["epochs"] == 3 and given["batch_size"] == 4 and not given["class_weights"]  # the command line wins


def test_flags_asking_for_another_model_are_refused():
    run = parent()
    F.check_flags(args("--image-size", image_size=64), run)  # the model's own value is fine
    with pytest.raises(F.FinetuneError, match=r"--image-size 256 \(the model has 64\).*--channels 3 \(the model has 1\)"):
        F.check_flags(Namespace(given_flags={"--image-size", "--channels"}, image_size=256, channels=3,
                                backbone="mobilenet_v1", weights="none"), run)
    with pytest.raises(F.FinetuneError, match="--backbone resnet18"):
        F.check_flags(Namespace(given_flags={"--backbone"}, image_size=None, channels=None, backbone="resnet18",
                                weights="none"), run)
    with pytest.raises(F.FinetuneError, match="--weights"):
        F.check_flags(args("--weights"), run)


def test_data_for_other_classes_or_pixels_is_refused(tmp_path):
    run = parent()
    assert F.check_data(prepared(tmp_path / "ok", [("spine", "train", "1")]), run) == SPEC
    other_classes = prepared(tmp_path / "classes", [("spine", "train", "1")], SPEC.replace(class_names=("spine", "x")))
    with pytest.raises(F.FinetuneError, match="keeps the model's classes.*prepare.py .*--model runs/p"):
        F.check_data(other_classes, run)
    other_size = prepared(tmp_path / "size", [("spine", "train", "1")], SPEC.replace(image_size=128))
    with pytest.raises(F.FinetuneError, match="'image_size': 128.*--model runs/p"):
        F.check_data(other_size, run)
    with pytest.raises(F.FinetuneError, match="not a prepared dataset"):
        F.check_data(tmp_path / "nothing", run)


def test_validation_is_the_parents_plus_the_new_val_and_rehearsal_mixes_its_training_images_in(tmp_path):
    old = prepared(tmp_path / "old", [(c, s, f"o{c}{s}{i}") for c in CLASSES for s in ("train", "val", "test")
                                      for i in range(4)])
    new = prepared(tmp_path / "new", [("spine", "train", "n1"), ("abdominal", "train", "n2"),
                                      ("others", "val", "n3")])
    train, val, ood, used = F.gather(new, parent((old,)), SPEC, seed=0, rehearsal=2.0)
    assert used == {"new_train": 2, "new_val": 1, "new_held_out": 0, "rehearsal_images": 4,
                    "parent_train_available": 20, "parent_val": 20, "val": 21, "ood_fit": 22, "missing_sources": []}
    assert len(train) == 6 and set(train["source"]) == {old, new} and len(val) == 21
    # the out-of-distribution detector learns all of the parent's training images and the new ones
    assert len(ood) == 22 and set(ood["split"]) == {"train"} and set(ood.loc[ood["source"] == new, "path"]) == \
        set(train.loc[train["source"] == new, "path"])
    # a validation image that is also a training image (same SOP Instance UID) judges nothing
    leak = prepared(tmp_path / "leak", [("spine", "train", f"o{'spine'}val0")])
    _, val, _, _ = F.gather(leak, parent((old,)), SPEC, seed=0)
    assert len(val) == 19


def test_new_data_without_val_gives_a_share_of_its_patients_to_validation_once_there_are_enough(tmp_path, caplog):
    old = prepared(tmp_path / "old", [(c, s, f"o{c}{s}") for c in CLASSES for s in ("train", "val")])
    # 30 images of 15 patients (two each: prepared() names groups by row, so make the pairs share one)
    rows = [("spine" if i < 20 else "others", "train", f"n{i}") for i in range(30)]
    new = prepared(tmp_path / "new", rows)
    frame = pd.read_csv(Path(new) / "labels.csv")
    frame["group"] = [f"p{i // 2}" for i in range(30)]
    frame.to_csv(Path(new) / "labels.csv", index=False)
    train, val, ood, used = F.gather(new, parent((old,)), SPEC, seed=3, holdout=0.2, holdout_min=15)
    held = val[val["source"] == new]
    assert used["new_held_out"] == len(held) == used["new_val"] and 4 <= len(held) <= 8
    assert set(held["group"]).isdisjoint(train["group"])  # whole patients
    assert set(held["label"]) == {"spine", "others"}  # stratified
    assert used["new_train"] == 30 - len(held) and len(ood) == used["new_train"] + 5
    again = F.gather(new, parent((old,)), SPEC, seed=3, holdout=0.2, holdout_min=15)[1]
    assert again["path"].tolist() == val["path"].tolist()  # seeded
    # fewer patients than the minimum, or a share of 0: every correction trains
    for kwargs in ({"holdout": 0.2, "holdout_min": 16}, {"holdout": 0.0, "holdout_min": 2}):
        caplog.clear()
        _, val, _, used = F.gather(new, parent((old,)), SPEC, seed=3, **kwargs)
        assert used["new_held_out"] == 0 and used["new_train"] == 30 and len(val) == 5
        # too few patients to validate on is said (switched off on purpose is not)
        assert ("judged without any image of the new site" in caplog.text) == (kwargs["holdout"] > 0)


def test_without_the_parents_data_a_set_without_val_is_refused_and_one_with_val_trains_alone(tmp_path, caplog):
    only_train = prepared(tmp_path / "a", [("spine", "train", "1"), ("others", "train", "2")])
    with pytest.raises(F.FinetuneError, match="no validation images.*gone-dataset"):
        F.gather(only_train, parent((str(tmp_path / "gone-dataset"),)), SPEC, seed=0)
    with_val = prepared(tmp_path / "b", [("spine", "train", "1"), ("others", "val", "2")])
    train, val, _, used = F.gather(with_val, parent((str(tmp_path / "gone-dataset"),)), SPEC, seed=0)
    assert len(train) == 1 and len(val) == 1 and used["missing_sources"] == [str(tmp_path / "gone-dataset")]
    assert "no rehearsal" in caplog.text
    with pytest.raises(F.FinetuneError, match="no training images"):
        F.gather(prepared(tmp_path / "c", [("spine", "val", "1")]), parent(), SPEC, seed=0)


def test_the_parent_of_a_finetune_passes_its_lineage_on(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"data": "data/a"},
                                                 "finetune": {"sources": ["data/a", "data/corrections"]}}))
    (run / "best.keras").write_bytes(b"")  # read_metadata is replaced: only the path matters
    monkeypatch.setattr(F, "read_metadata", lambda path: ModelMetadata(SPEC, "run/epoch-2", "mobilenet_v1",
                                                                       format="keras"))
    read = F.read_parent(run)
    assert read.sources == ("data/a", "data/corrections") and read.model_path == run / "best.keras"
    (run / "config.json").write_text(json.dumps({"config": {"data": "data/a"}}))
    assert F.read_parent(run).sources == ("data/a",)
