import json
import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from utils.data import prepare
from utils.io.dicom_writer import write_dicom
from utils.preprocessing import PreprocessSpec

CLASSES = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")
SHARED = Path(__file__).resolve().parents[4] / "shared" / "radiographs"
_process_item = prepare.process_item


def hostile_process_item(item, output_dir, spec):
    """process_item, except that sources named hang* hang and die* kill their worker process."""
    name = Path(item.source).name
    if name.startswith("hang"):
        time.sleep(120)
    elif name.startswith("die"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return _process_item(item, output_dir, spec)


def gradient(seed: int, shape=(40, 30)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 200 + 20).astype(np.uint8)


@pytest.fixture
def class_folders(tmp_path):
    """Five class folders of PNGs, two images per group, a manifest, one broken file."""
    root = tmp_path / "src"
    rows = []
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True)
        for i in range(12):
            name = f"{label}/img{i}.png"
            cv2.imwrite(str(root / name), gradient(c * 100 + i))
            rows.append({"file": name, "label": label, "group": f"{label}-{i // 2}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "others" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def spec(size=32, **kw):
    return PreprocessSpec(class_names=CLASSES, image_size=size, **kw)


def run(source, out, **kw):
    kw.setdefault("ratios", (0.5, 0.25, 0.25))
    return prepare.prepare_dataset(source, out, kw.pop("spec", spec()), seed=kw.pop("seed", 42), workers=1,
                                   progress=False, **kw)


def test_class_folders_with_manifest(class_folders, tmp_path):
    result = run(class_folders, tmp_path / "out")
    labels = pd.read_csv(tmp_path / "out" / "labels.csv", keep_default_na=False)
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv")
    assert len(labels) == 60 and list(labels.columns) == list(prepare.LABEL_COLUMNS)
    assert rejects["reason"].tolist() == ["unreadable_image"]
    assert rejects["source_file"].iloc[0].endswith("broken.png")
    # groups from the manifest, never split across train/val/test
    assert labels["group"].str.startswith("group:").all()
    assert labels.groupby("group")["split"].nunique().max() == 1
    # every class in every split, close to the ratios
    counts = pd.crosstab(labels["label"], labels["split"])
    assert (counts["train"] == 6).all() and (counts["val"] == 2).all() | (counts["val"] == 4).all()
    image = cv2.imread(str(tmp_path / "out" / labels["path"].iloc[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (32, 32) and image.dtype == np.uint8
    assert (labels["original_rows"] == 40).all() and (labels["original_columns"] == 30).all()
    assert "rejects by reason" in result.summary() and "unreadable_image" in result.summary()
    assert (tmp_path / "out" / "preprocess.json").is_file()


def test_split_is_reproducible_and_seeded(class_folders, tmp_path):
    a = run(class_folders, tmp_path / "a").labels
    b = run(class_folders, tmp_path / "b").labels
    c = run(class_folders, tmp_path / "c", seed=7).labels
    key = ["source_file", "split"]
    assert a[key].sort_values("source_file").values.tolist() == b[key].sort_values("source_file").values.tolist()
    assert a[key].sort_values("source_file").values.tolist() != c[key].sort_values("source_file").values.tolist()


def test_rerun_skips_finished_images_and_keeps_labels(class_folders, tmp_path):
    first = run(class_folders, tmp_path / "out")
    written = {p: (tmp_path / "out" / p).stat().st_mtime_ns for p in first.labels["path"]}
    second = run(class_folders, tmp_path / "out")
    assert second.skipped == 60
    assert {p: (tmp_path / "out" / p).stat().st_mtime_ns for p in second.labels["path"]} == written
    pd.testing.assert_frame_equal(first.labels, second.labels)


def test_other_settings_need_overwrite(class_folders, tmp_path):
    run(class_folders, tmp_path / "out")
    with pytest.raises(prepare.SourceError, match="--overwrite"):
        run(class_folders, tmp_path / "out", spec=spec(48))
    result = run(class_folders, tmp_path / "out", spec=spec(48), overwrite=True)
    assert result.skipped == 0
    image = cv2.imread(str(tmp_path / "out" / result.labels["path"].iloc[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (48, 48)


def _cached(out, result, source_name):
    row = result.labels[result.labels["source_file"].str.endswith(source_name)].iloc[0]
    return row["path"], cv2.imread(str(out / row["path"]), cv2.IMREAD_UNCHANGED)


def test_a_source_edited_in_place_is_prepared_again(class_folders, tmp_path):
    out = tmp_path / "out"
    first = run(class_folders, out)
    old_path, old_pixels = _cached(out, first, "abdominal/img0.png")
    # the same file, new content (a site re-exported it): same path, other size or mtime
    source = class_folders / "abdominal" / "img0.png"
    cv2.imwrite(str(source), 255 - gradient(999))
    os.utime(source, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = run(class_folders, out)
    new_path, new_pixels = _cached(out, second, "abdominal/img0.png")
    assert second.skipped == 59 and second.removed == 1
    assert new_path != old_path and not (out / old_path).exists()  # the stale PNG is gone
    np.testing.assert_array_equal(new_pixels, prepare.preprocess_file(str(source), spec())[0])
    assert not np.array_equal(new_pixels, old_pixels)
    # every PNG in the folder is one labels.csv names, and no other
    on_disk = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")}
    assert on_disk == set(second.labels["path"])


def test_a_reader_or_decoder_change_invalidates_the_cache(class_folders, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run(class_folders, out)
    assert json.loads((out / "pixels.json").read_text()) == prepare.pixel_provenance()
    changed = {**prepare.pixel_provenance(), "reader": "999"}
    monkeypatch.setattr(prepare, "pixel_provenance", lambda: changed)
    second = run(class_folders, out)
    assert second.skipped == 0 and second.removed == 60
    assert set(first.labels["path"]).isdisjoint(second.labels["path"])
    assert json.loads((out / "pixels.json").read_text()) == changed


def test_overwrite_redoes_every_image_even_with_the_same_settings(class_folders, tmp_path):
    out = tmp_path / "out"
    first = run(class_folders, out)
    damaged = out / first.labels["path"].iloc[0]
    good = cv2.imread(str(damaged), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(damaged), np.zeros_like(good))
    assert run(class_folders, out).skipped == 60  # without --overwrite the cache is trusted
    again = run(class_folders, out, overwrite=True)
    assert again.skipped == 0 and again.removed == 60
    np.testing.assert_array_equal(cv2.imread(str(damaged), cv2.IMREAD_UNCHANGED), good)


def test_prepare_script_records_the_settings_it_used(tmp_path, monkeypatch):
    """prepare.py --demo prepares at DEMO_IMAGE_SIZE: prepare_config.json must say so, not 512."""
    import prepare as prepare_script
    from utils import constants

    monkeypatch.setattr(constants, "DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setattr(prepare_script, "DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setattr(constants, "DEMO_IMAGES_PER_CLASS", 3)
    assert prepare_script.main(["--demo", "--quiet", "--decode-pool", "threads"]) == 0
    saved = json.loads((tmp_path / "demo" / "prepared" / "prepare_config.json").read_text())
    assert saved["config"]["image_size"] == constants.DEMO_IMAGE_SIZE != constants.IMAGE_SIZE
    assert saved["spec"] == json.loads((tmp_path / "demo" / "prepared" / "preprocess.json").read_text())
    assert tuple(saved["config"]["class_names"]) == tuple(saved["spec"]["class_names"])


def test_csv_source_with_preset_splits(tmp_path):
    rows = []
    for c, label in enumerate(CLASSES[:2]):
        for i in range(10):
            path = tmp_path / f"{label}_{i}.png"
            cv2.imwrite(str(path), gradient(c * 10 + i))
            rows.append({"path": path.name, "label": c, "split": "test" if i < 2 else ""})
    rows.append({"path": "missing.png", "label": 0, "split": ""})
    rows.append({"path": f"{CLASSES[0]}_0.png", "label": "elbow", "split": ""})
    pd.DataFrame(rows).to_csv(tmp_path / "list.csv", index=False)
    result = run(tmp_path / "list.csv", tmp_path / "out", spec=PreprocessSpec(class_names=CLASSES[:2], image_size=32))
    labels = result.labels
    assert len(labels) == 20
    preset = labels[labels["source_file"].str.contains(r"_[01]\.png$")]
    assert (preset["split"] == "test").all()
    assert (labels["split"] == "test").sum() == 4  # only the preset images: the rest go to train/val
    assert sorted(result.rejects["reason"]) == ["file_not_found", "unknown_label"]


def test_dicom_sources_group_by_patient_and_record_header(tmp_path):
    root = tmp_path / "src"
    for c, label in enumerate(CLASSES):
        for i in range(6):
            write_dicom(root / label / f"{i}.dcm", gradient(c * 10 + i).astype(np.uint16) * 16, bits_stored=12,
                        photometric="MONOCHROME1" if i % 2 else "MONOCHROME2", patient_id=f"P{c}-{i // 3}",
                        body_part="CHEST")
    (root / "spine" / "notes.txt").write_text("not an image")
    result = run(root, tmp_path / "out")
    labels = result.labels
    assert len(labels) == 30
    assert labels["group"].str.startswith("patient:P").all()
    assert labels.groupby("group")["split"].nunique().max() == 1
    assert set(labels["PhotometricInterpretation"]) == {"MONOCHROME1", "MONOCHROME2"}
    assert (labels["BodyPartExamined"] == "CHEST").all() and labels["SOPInstanceUID"].str.len().min() > 10
    assert result.rejects["reason"].tolist() == ["not_an_image"]


def test_vindr_layout_keeps_official_test_split(tmp_path):
    root = tmp_path / "vindr"
    for split, count in (("train", 20), ("test", 5)):
        ids = []
        for i in range(count):
            image_id = f"{split}{i:03d}"
            write_dicom(root / split / f"{image_id}.dicom", gradient(i + (100 if split == "test" else 0)),
                        patient_id=f"{split}-{i}")
            ids.append({"image_id": image_id, "Target": str(i % 5)})
        ids.append({"image_id": f"{split}-multi", "Target": "1 3"})
        pd.DataFrame(ids).to_csv(root / f"{split}.csv", index=False)
    result = run(root, tmp_path / "out", ratios=(0.7, 0.15, 0.15))
    labels = result.labels
    assert result.layout.startswith("VinDr")
    assert (labels[labels["source_file"].str.contains("/test/")]["split"] == "test").all()
    train_part = labels[labels["source_file"].str.contains("/train/")]
    assert set(train_part["split"]) == {"train", "val"}
    assert sorted(result.rejects["reason"]) == ["multiple_labels", "multiple_labels"]
    assert set(labels["label"]) == set(CLASSES)


def test_unsupported_layout_is_explained(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(prepare.SourceError, match="one folder per class"):
        prepare.list_source(tmp_path, CLASSES)


@pytest.mark.parametrize("patient, study, group, expected", [
    ("P1", "1.2", "g", "patient:P1"), ("ANONYMOUS", "1.2", "g", "study:1.2"), ("", "", "g", "group:g"),
    ("", "", "", "file:x.png"),
])
def test_group_key_priority(patient, study, group, expected):
    assert prepare.group_key(patient, study, group, "x.png") == expected


def test_assign_splits_balances_classes_and_respects_groups():
    rng = np.random.default_rng(0)
    labels = [f"c{k}" for k in rng.integers(0, 4, 2000)]
    groups = [f"g{k}" for k in rng.integers(0, 700, 2000)]
    splits = prepare.assign_splits(labels, groups, [""] * 2000, (0.7, 0.15, 0.15), seed=1)
    frame = pd.DataFrame({"label": labels, "group": groups, "split": splits})
    assert frame.groupby("group")["split"].nunique().max() == 1
    share = pd.crosstab(frame["label"], frame["split"], normalize="index")
    assert np.allclose(share["train"], 0.7, atol=0.03) and np.allclose(share["test"], 0.15, atol=0.03)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/radiographs not present")
def test_shared_radiographs_listing():
    listing = prepare.list_source(SHARED, CLASSES)
    assert len(listing.items) == 1029 and not listing.rejects
    assert sum(1 for it in listing.items if it.source.endswith(".dcm")) == 2
    assert all(it.group for it in listing.items)


def test_hostile_sources_become_rejects_with_their_reason(tmp_path, monkeypatch):
    """A hang, a crash, a codec panic, a text file named .dcm: one reject each; prepare.py goes on."""
    import prepare as prepare_script
    from fuzz.hostile import write_panicking_rle

    root = tmp_path / "src"
    for c, label in enumerate(CLASSES[:2]):
        for i in range(3):
            write_dicom(root / label / f"{i}.dcm", gradient(c * 10 + i).astype(np.uint16) * 16, bits_stored=12,
                        patient_id=f"P{c}{i}")
    good = (root / "spine" / "0.dcm")
    good.parent.mkdir()
    write_dicom(good, gradient(7).astype(np.uint16), bits_stored=12)
    for name in ("hang.dcm", "die.dcm"):
        (root / "spine" / name).write_bytes(good.read_bytes())
    write_panicking_rle(root / "spine" / "panic.dcm")
    (root / "spine" / "text.dcm").write_text("not DICOM")
    monkeypatch.setattr(prepare, "process_item", hostile_process_item)
    out = tmp_path / "out"
    assert prepare_script.main(["--input", str(root), "--output", str(out), "--class-names", *CLASSES,
                                "--image-size", "32", "--workers", "2", "--decode-timeout-s", "1.5", "--quiet"]) == 0
    rejects = pd.read_csv(out / "rejects.csv").set_index("source_file")["reason"]
    reasons = {Path(path).name: reason for path, reason in rejects.items()}
    assert reasons == {"panic.dcm": "codec_panic", "hang.dcm": "decode_timeout", "die.dcm": "decoder_crashed", "text.dcm": "not_dicom"}
    assert len(pd.read_csv(out / "labels.csv")) == 7


def test_a_dataset_without_validation_images_says_to_fine_tune():
    """Issue 24: a corrections set of a few patients goes all to train; the summary says what to do with it."""
    from utils.data.prepare import split_advice

    few = pd.DataFrame({"label": ["spine", "abdominal"], "split": ["train", "train"], "group": ["P1", "P1"]})
    advice = split_advice(few)
    assert "no validation images (2 image(s), 2 in train; 1 patient group(s)" in advice
    assert "training.py --finetune RUN_DIR --data THIS_FOLDER" in advice
    assert split_advice(few.assign(split=["train", "val"])) == "" and split_advice(few.iloc[:0]) == ""
