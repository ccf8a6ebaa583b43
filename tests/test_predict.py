"""predict.py: inputs, CSV rows, threshold, unreadable files, BodyPartExamined check, --sort-into."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

import predict
from utils.infer import batch_predict
from utils.infer.batch_predict import collect_inputs, place
from utils.infer.decisions import tag_disagrees

from .routing.conftest import CLASSES, ROWS_BY_CLASS, THRESHOLD, brightness_model, expected_labels, make_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return brightness_model(tmp_path_factory.mktemp("model") / "brightness.keras")


@pytest.fixture
def scans(tmp_path, model):
    """A folder tree of DICOMs (every class, uncertain, SR, broken), a PNG, a corrupt PNG and a README."""
    folder = tmp_path / "scans"
    files = make_samples(folder / "dicom")
    png = np.zeros((64, 64), np.uint8)
    png[: ROWS_BY_CLASS["spine"]] = 255
    (folder / "raster").mkdir()
    cv2.imwrite(str(folder / "raster" / "spine.png"), png)
    (folder / "raster" / "corrupt.png").write_bytes(b"\x89PNG not really")
    (folder / "README.txt").write_text("not an image\n")
    (folder / ".hidden.dcm").write_bytes(b"")
    return folder, expected_labels(model, files)


def digests(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(args: list[str]) -> int:
    return predict.main([*map(str, args), "--quiet"])


def test_collect_inputs_folders_lists_and_files(tmp_path, scans):
    folder, _ = scans
    files, skipped = collect_inputs([folder])
    assert len(files) == 15 and [Path(s).name for s in skipped] == ["README.txt"]
    assert not any(".hidden" in f for f in files)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# chosen\nscans/dicom/spine_0.dcm\n\n{folder / 'raster' / 'spine.png'}\nmissing.dcm\n")
    again, _ = collect_inputs([listing, folder / "dicom" / "spine_0.dcm"])
    assert again == [str(tmp_path / "scans/dicom/spine_0.dcm"), str(folder / "raster/spine.png"), "missing.dcm"]
    with pytest.raises(FileNotFoundError):
        collect_inputs([tmp_path / "nowhere"])


def test_csv_rows_labels_errors_and_tags(tmp_path, scans, model):
    folder, expected = scans
    listing = tmp_path / "more.lst"
    listing.write_text(f"{tmp_path / 'gone.dcm'}\n")
    out = tmp_path / "out" / "predictions.csv"
    before = digests(folder)
    assert run(["--model", model, folder, listing, "--output", out, "--threshold", THRESHOLD, "--batch-size", 4]) == 0
    assert digests(folder) == before
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(frame.columns) == (["path", "SOPInstanceUID", "StudyInstanceUID", "label", "confidence", "top_label"]
                                   + [f"prob_{c}" for c in CLASSES]
                                   + ["ood_score", "BodyPartExamined", "tag_disagrees", "error", "sorted_to"])
    assert len(frame) == 16  # 13 DICOMs, 2 PNGs, 1 listed missing file; not the README
    rows = frame.set_index("SOPInstanceUID", drop=False)
    for uid, sample in expected.items():
        assert rows.loc[uid, "label"] == sample.label
        assert rows.loc[uid, "StudyInstanceUID"]  # UIDs also for unreadable objects (SR)
    readable = frame[~frame["label"].isin(["unreadable"])]
    probs = readable[[f"prob_{c}" for c in CLASSES]].astype(float).to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert np.allclose(readable["confidence"].astype(float), probs.max(axis=1), atol=1e-6)
    by_name = frame.assign(name=frame["path"].map(lambda p: Path(p).name)).set_index("name")
    assert by_name.loc["spine.png", "label"] == "spine"
    assert by_name.loc["boundary_0.dcm", "label"] == "uncertain"
    assert by_name.loc["boundary_0.dcm", "top_label"] in ("abdominal", "adult_chest")
    errors = {name: by_name.loc[name, "error"].split(":")[0] for name in
              ("corrupt.png", "report_sr.dcm", "short_pixels.dcm", "gone.dcm")}
    assert errors == {"corrupt.png": "unreadable_image", "report_sr.dcm": "not_projection_radiography",  # Modality SR
                      "short_pixels.dcm": "truncated_pixel_data", "gone.dcm": "file_not_found"}
    assert (frame.loc[frame["error"] != "", "label"] == "unreadable").all()
    # BodyPartExamined: ABDOMEN / CHEST / LSPINE as written by make_samples; "others" images are tagged CHEST
    assert by_name.loc["abdominal_0.dcm", "tag_disagrees"] == "false"
    assert by_name.loc["adult_chest_0.dcm", "tag_disagrees"] == "false"
    assert by_name.loc["spine_1.dcm", "tag_disagrees"] == "false"
    assert by_name.loc["others_0.dcm", "tag_disagrees"] == "true"
    assert by_name.loc["boundary_0.dcm", "tag_disagrees"] == ""  # no tag


@pytest.mark.parametrize("threshold, uncertain", [(0.0, 0), (1.0, 11)])
def test_threshold_decides_uncertain(tmp_path, scans, model, threshold, uncertain):
    folder, _ = scans
    out = tmp_path / "p.csv"
    assert run(["--model", model, folder / "dicom", "--output", out, "--threshold", threshold]) == 0
    assert (pd.read_csv(out)["label"] == "uncertain").sum() == uncertain


@pytest.mark.parametrize("mode", ["copy", "hardlink", "symlink"])
def test_sort_into_never_overwrites_or_touches_sources(tmp_path, scans, model, mode):
    folder, expected = scans
    sorted_dir = tmp_path / "sorted"
    clash = sorted_dir / "spine" / "spine_0.dcm"
    clash.parent.mkdir(parents=True)
    clash.write_bytes(b"someone else's file")
    before = digests(folder)
    args = ["--model", model, folder / "dicom", "--output", tmp_path / "p.csv", "--threshold", THRESHOLD,
            "--sort-into", sorted_dir, "--sort-mode", mode]
    assert run(args) == 0
    assert clash.read_bytes() == b"someone else's file"
    placed = sorted(p.relative_to(sorted_dir).as_posix() for p in sorted_dir.rglob("*.dcm"))
    assert "spine/spine_0_1.dcm" in placed
    for sample in expected.values():
        name = sample.path.name if sample.path.name != "spine_0.dcm" else "spine_0_1.dcm"
        target = sorted_dir / sample.label / name
        assert target.read_bytes() == sample.path.read_bytes()
        assert target.is_symlink() == (mode == "symlink")
        if mode == "hardlink":
            assert os.path.samefile(target, sample.path)
    assert run(args) == 0  # a second run finds the same files there and adds nothing
    assert sorted(p.relative_to(sorted_dir).as_posix() for p in sorted_dir.rglob("*.dcm")) == placed
    assert digests(folder) == before
    frame = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False)
    assert (frame["sorted_to"] != "").all()


def test_every_dicom_named_file_gets_exactly_one_row(tmp_path, model, monkeypatch):
    """A folder of malformed files: a codec panic, text and empty files named .dcm, a truncated file,
    a file whose decoder hangs and one whose decoder dies; the run finishes with one row each."""
    from fuzz.hostile import write_panicking_rle
    from utils.infer import engine

    from .utils.infer.test_engine import hostile_decode

    folder = tmp_path / "hostile"
    good = make_samples(folder, per_class=1, uncertain=0, extra_bad=False)
    write_panicking_rle(folder / "panic.dcm")
    (folder / "x.dcm").write_text("a text file named like a DICOM\n")
    (folder / "empty.DCM").write_bytes(b"")
    (folder / "scan.dicom").write_bytes(b"\0" * 64)
    data = good[0].read_bytes()
    (folder / "truncated.dcm").write_bytes(data[:-3000])
    (folder / "hang.dcm").write_bytes(data)
    (folder / "die.dcm").write_bytes(data)
    (folder / "notes.md").write_text("not named like an image: skipped\n")
    monkeypatch.setattr(engine, "decode_file", hostile_decode)  # hang* sleeps, die* kills its worker
    out = tmp_path / "p.csv"
    assert run(["--model", model, folder, "--output", out, "--decode-timeout-s", 2, "--decode-workers", 2]) == 0
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    named = sorted(p.name for p in folder.iterdir() if p.name != "notes.md")
    assert sorted(Path(p).name for p in frame["path"]) == named and len(frame) == len(good) + 7
    reasons = {Path(p).name: e.split(":")[0] for p, e in zip(frame["path"], frame["error"]) if e}
    assert reasons == {"panic.dcm": "codec_panic", "x.dcm": "not_dicom", "empty.DCM": "not_dicom", "scan.dicom": "not_dicom",
                       "truncated.dcm": "truncated_pixel_data", "hang.dcm": "decode_timeout",
                       "die.dcm": "decoder_crashed"}
    assert (frame.loc[frame["error"] != "", "label"] == "unreadable").all()
    assert set(frame.loc[frame["error"] == "", "label"]) <= {*CLASSES, "uncertain"}


def test_place_is_exclusive(tmp_path):
    source = tmp_path / "a.dcm"
    source.write_bytes(b"1")
    target, new = place(source, tmp_path / "out")
    assert new and target.read_bytes() == b"1"
    assert place(source, tmp_path / "out") == (target, False)
    with pytest.raises(ValueError):
        place(source, tmp_path / "out", "move")


@pytest.mark.parametrize("label, tag, disagrees", [
    ("adult_chest", "CHEST", False), ("pediatric_chest", "chest", False), ("spine", "C-SPINE", False),
    ("spine", "CHEST", True), ("abdominal", "ABDOMEN", False), ("others", "KNEE", False), ("others", "CHEST", True),
    ("adult_chest", "KNEE", True), ("spine", "", None), ("uncertain", "CHEST", None),
])
def test_tag_disagreement(label, tag, disagrees):
    assert tag_disagrees(label, tag, CLASSES) is disagrees


def test_tag_disagreement_for_other_label_sets():
    assert tag_disagrees("knee", "KNEE", ("knee", "hand")) is False
    assert tag_disagrees("hand", "KNEE", ("knee", "hand")) is True


def test_a_real_backbone_end_to_end(tmp_path, scans):
    """Plumbing with an (untrained) MobileNet-V1 saved by this project: every file gets a row."""
    from models import build_model
    from utils.artifacts.model_file import save_model
    from utils.preprocessing import PreprocessSpec

    folder, _ = scans
    spec = PreprocessSpec(class_names=CLASSES, image_size=64, channels=3)
    path = save_model(build_model("mobilenet_v1", 5, (64, 64, 3), None), tmp_path / "m.keras", spec,
                      model_id="untrained", backbone="mobilenet_v1")
    out = tmp_path / "p.csv"
    assert run(["--model", path, folder, "--output", out, "--threshold", 0]) == 0
    frame = pd.read_csv(out)
    assert len(frame) == 15 and set(frame["label"]) <= {*CLASSES, "unreadable"}
    assert (frame["label"] == "unreadable").sum() == 3


def test_cli_help_and_refusals(tmp_path, capsys):
    out = subprocess.run([sys.executable, "predict.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0
    for flag in ("--model", "--output", "--threshold", "--sort-into", "--sort-mode", "--batch-size", "--decode-pool",
                 "--decode-workers", "--decode-timeout-s", "--decode-memory-limit-mb"):
        assert flag in out.stdout
    with pytest.raises(SystemExit):
        predict.parse_args(["--model", "m", "x", "--threshold", "2"])
    with pytest.raises(SystemExit):
        predict.parse_args(["--model", "m", "x", "--sort-mod", "copy"])
    assert "did you mean --sort-mode" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.parse_args(["--model", "m", "x", "--decode-timeout-s", "0"])
    assert "--decode-timeout-s must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.parse_args(["--model", "m", "x", "--decode-pool", "auto"])
    assert predict.main(["--model", "m", str(tmp_path / "nothing-here")]) == 2
    (tmp_path / "one.png").write_bytes(b"")
    assert predict.main(["--model", str(tmp_path / "no-model.keras"), str(tmp_path / "one.png")]) == 2
    assert "cannot load model" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict.main(["--model", "m", str(empty)]) == 2


def test_summary_counts(tmp_path, scans, model, capsys, caplog):
    folder, _ = scans
    with caplog.at_level(logging.INFO, logger="predict"):
        assert run(["--model", model, folder, "--output", tmp_path / "p.csv", "--threshold", THRESHOLD]) == 0
    assert "no out-of-distribution score" in caplog.text  # start-up says whether the OOD score is on
    text = capsys.readouterr().out
    assert "15 files in" in text  # the SR: its Modality is not projection radiography, whatever its pixels
    assert "unreadable: not_projection_radiography 1, truncated_pixel_data 1, unreadable_image 1" in text
    assert batch_predict.Summary().lines()[0].startswith("0 files")


def calibrated_copy(model: Path, folder: Path, **calibration) -> Path:
    """``model`` with a calibration entry in its metadata (as calibrate.py stores it)."""
    import shutil

    from utils.artifacts.model_file import read_metadata, write_metadata

    folder.mkdir(parents=True, exist_ok=True)
    copy = Path(shutil.copy(model, folder / model.name))
    write_metadata(copy, read_metadata(copy).replace(calibration=calibration))
    return copy


def test_threshold_auto_uses_the_threshold_stored_with_the_model(tmp_path, scans, model):
    folder, _ = scans
    stored = {"target_accuracy": 0.995, "value": 1.0, "coverage": 0.0, "accuracy": None, "reachable": True}
    calibrated = calibrated_copy(model, tmp_path / "m", temperature=1.0, threshold=stored)
    labels = {}
    for name, args in {"auto": ["--model", calibrated, "--threshold", "auto"],
                       "same number": ["--model", calibrated, "--threshold", 1.0],
                       "default": ["--model", calibrated]}.items():
        out = tmp_path / f"{name}.csv"
        assert run([*args, folder / "dicom", "--output", out]) == 0
        labels[name] = pd.read_csv(out)["label"].tolist()
    assert labels["auto"] == labels["same number"] and labels["auto"].count("uncertain") == 11
    assert labels["default"].count("uncertain") < 11  # the default 0.5 was not used


def test_threshold_auto_is_refused_for_a_model_without_a_recommendation(tmp_path, scans, model, capsys):
    folder, _ = scans
    assert run(["--model", model, folder / "dicom", "--output", tmp_path / "p.csv", "--threshold", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--threshold auto" in err and f"python calibrate.py {model}" in err
    assert not (tmp_path / "p.csv").exists()
    # a temperature alone (no threshold recommendation) is not enough either
    only_t = calibrated_copy(model, tmp_path / "t", temperature=2.0)
    assert run(["--model", only_t, folder / "dicom", "--output", tmp_path / "p.csv", "--threshold", "auto"]) == 2


def test_threshold_flag_takes_a_number_or_auto(capsys):
    assert predict.parse_args(["--model", "m", "x", "--threshold", "auto"]).threshold == "auto"
    assert predict.parse_args(["--model", "m", "x", "--threshold", "AUTO"]).threshold == "auto"
    assert predict.parse_args(["--model", "m", "x", "--threshold", "0.75"]).threshold == 0.75
    assert predict.parse_args(["--model", "m", "x"]).threshold == 0.5
    for bad, message in (("high", "expected a number or 'auto'"), ("1.5", "--threshold must be between 0 and 1"),
                         ("nan", "--threshold must be a finite number between 0 and 1")):
        with pytest.raises(SystemExit):
            predict.parse_args(["--model", "m", "x", "--threshold", bad])
        assert message in capsys.readouterr().err
    out = subprocess.run([sys.executable, "predict.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert "--threshold auto" in out.stdout and "calibrate.py" in out.stdout


def test_header_guard_keeps_what_is_not_projection_radiography_from_the_model(tmp_path, model):
    """CT / MR / US / no-Modality-SC headers: a row with reason not_projection_radiography, never a body part;
    CR, DX, RG, a DX SOP class without Modality and PNGs go to the model; --no-projection-only turns it off."""
    from utils.io.dicom_writer import write_dicom

    from .routing.conftest import bright_rows_image

    image = bright_rows_image(ROWS_BY_CLASS["spine"])
    folder = tmp_path / "mixed"
    kept = {m: write_dicom(folder / f"{m}.dcm", image, modality=m, bits_stored=12) for m in ("CR", "DX", "RG")}
    refused = {m: write_dicom(folder / f"{m}.dcm", image, modality=m, bits_stored=12) for m in ("CT", "MR", "US", "OT")}
    no_modality = write_dicom(folder / "no_modality_dx_class.dcm", image, modality="DX", bits_stored=12)
    ds = pydicom.dcmread(no_modality)
    del ds.Modality
    ds.save_as(no_modality)
    sc = write_dicom(folder / "no_modality_sc.dcm", image, modality="OT", bits_stored=12)
    ds = pydicom.dcmread(sc)
    del ds.Modality
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.save_as(sc)
    out = tmp_path / "guarded.csv"
    assert run(["--model", model, folder, "--output", out, "--threshold", THRESHOLD]) == 0
    rows = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("path")
    for path in [*refused.values(), sc]:
        row = rows.loc[str(path)]
        assert row["label"] == "unreadable" and row["confidence"] == "" and row["top_label"] == ""
        assert row["error"].startswith("not_projection_radiography: Modality "), row["error"]
    assert "SOP class 1.2.840.10008.5.1.4.1.1.7" in rows.loc[str(sc), "error"]
    for path in [*kept.values(), no_modality]:
        assert rows.loc[str(path), "label"] == "spine" and rows.loc[str(path), "error"] == ""
    out_all = tmp_path / "unguarded.csv"
    assert run(["--model", model, folder, "--output", out_all, "--threshold", THRESHOLD, "--no-projection-only"]) == 0
    assert set(pd.read_csv(out_all, dtype=str, keep_default_na=False)["label"]) == {"spine"}
