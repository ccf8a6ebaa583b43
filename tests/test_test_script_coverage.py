"""test.py never quietly covers part of the data: every output says what was listed, evaluated and
skipped (by reason); above --max-skipped-share of unreadable files it writes only skipped.csv and
exits with status 2. Both kinds of data: raw files (listing rejects and decode errors) and a
prepared dataset (missing or corrupt PNGs). The model is the routing tests' brightness model, so
nothing is trained."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import test as test_script
from utils.artifacts.model_file import read_model_info
from utils.io.dicom_writer import write_dicom

from .routing.conftest import ROWS_BY_CLASS, bright_rows_image, brightness_model, write_short_pixels

FAST = ["--timing-runs", "0", "--bootstrap-resamples", "20", "--decode-pool", "threads", "--quiet"]
RESULT_FILES = ("results.json", "results.md", "predictions.csv", "confusion_matrix.png", "roc_curves.png")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return brightness_model(tmp_path_factory.mktemp("model") / "brightness.keras")


@pytest.fixture
def raw(tmp_path) -> Path:
    """10 good DICOMs in folders per class, plus 3 listed files that cannot be evaluated."""
    data = tmp_path / "raw"
    for label, rows in ROWS_BY_CLASS.items():
        for i in range(2):
            write_dicom(data / label / f"{i}.dcm", bright_rows_image(rows), bits_stored=12, patient_id=f"{label}{i}")
    write_short_pixels(data / "spine" / "short.dcm")  # decode error: truncated_pixel_data
    (data / "spine" / "x.dcm").write_text("not DICOM")  # decode error: not_dicom
    (data / "others" / "notes.txt").write_text("not an image")  # listing reject: not_an_image
    return data


def skipped_rows(folder: Path) -> dict[str, str]:
    with open(folder / "skipped.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(row["message"] for row in rows)
    return {Path(row["file"]).name: row["reason"] for row in rows}


RAW_SKIPPED = {"short.dcm": "truncated_pixel_data", "x.dcm": "not_dicom", "notes.txt": "not_an_image"}


def test_raw_files_above_the_threshold_fail_with_skipped_csv_only(model, raw, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("{}")  # an earlier run's headline must not survive a refused one
    assert test_script.main([str(model), "--data", str(raw), "--output", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "3 of 13 listed images" in err and "23.1%" in err
    assert "not_an_image 1" in err and "not_dicom 1" in err and "truncated_pixel_data 1" in err
    assert "--max-skipped-share 0.01 allows" in err and "--max-skipped-share 0.231" in err
    assert str(out / "skipped.csv") in err
    assert skipped_rows(out) == RAW_SKIPPED
    for name in RESULT_FILES:
        assert not (out / name).exists(), name


def test_raw_files_within_a_raised_threshold_report_their_coverage(model, raw, tmp_path, capsys):
    out = tmp_path / "eval"
    assert test_script.main([str(model), "--data", str(raw), "--output", str(out), "--max-skipped-share", "0.25",
                             *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_images"] == 10
    assert results["coverage"] == {
        "listed": 13, "evaluated": 10, "skipped": 3, "skipped_share": pytest.approx(3 / 13),
        "skipped_by_reason": {"not_an_image": 1, "not_dicom": 1, "truncated_pixel_data": 1},
        "max_skipped_share": 0.25}
    assert {Path(x["file"]).name: x["reason"].split(":")[0] for x in results["extra"]["left_out"]} == RAW_SKIPPED
    assert skipped_rows(out) == RAW_SKIPPED
    assert ("Evaluated 10 of 13 listed images; 3 skipped (not_an_image 1, not_dicom 1, truncated_pixel_data 1): "
            "see skipped.csv.") in (out / "results.md").read_text()
    printed = capsys.readouterr().out
    assert "on 10 of 13 listed images, 3 skipped" in printed and "| Evaluated | Skipped |" in printed
    assert "| 10 of 13 | 3 (23.1%: not_an_image 1, not_dicom 1, truncated_pixel_data 1) |" in printed

    # once the broken files are gone, nothing is skipped and the old skipped.csv goes too
    for name in ("spine/short.dcm", "spine/x.dcm", "others/notes.txt"):
        (raw / name).unlink()
    # --shift: the same images re-rendered as other sites would send them (raw files: decoded once, shifted
    # in memory); the brightness model cannot survive an inverted or low-contrast image
    assert test_script.main([str(model), "--data", str(raw), "--output", str(out), *FAST,
                             "--shift", "invert", "--shift", "bits:3,text:1"]) == 0
    assert json.loads((out / "results.json").read_text())["coverage"]["skipped"] == 0
    assert not (out / "skipped.csv").exists()
    assert "All 10 listed images evaluated; none skipped." in (out / "results.md").read_text()
    summary = json.loads((out / "shifts.json").read_text())
    assert [(r["shift"], r["severity"]) for r in summary["rows"]] == [("clean", 0), ("invert", 1), ("bits", 3),
                                                                      ("text", 1)]
    assert summary["n_images"] == 10 and summary["rows"][0]["macro_f1"]["value"] == 1.0
    assert {"invert", "bits"} <= set(summary["breaking"])
    assert summary["threshold"] is None and summary["rows"][1]["routed_share"] is None  # no calibration
    for name in ("shifts.csv", "shifts.md", "shifts.png", "shift_examples.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "under site shifts (10 images)" in printed and "| invert | 1 | inverted |" in printed


def test_comparison_of_several_models_shows_evaluated_and_skipped(model, raw, tmp_path):
    other = tmp_path / "other.keras"
    other.write_bytes(model.read_bytes())
    out = tmp_path / "both"
    assert test_script.main([str(model), str(other), "--data", str(raw), "--output", str(out),
                             "--max-skipped-share", "0.3", *FAST]) == 0
    table = (out / "comparison.md").read_text()
    assert "| ms/image | Evaluated | Skipped |" in table and table.count("| 10 of 13 | 3 (23.1%") == 2
    with open(out / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["listed"], r["evaluated"], r["skipped"]) for r in rows] == [("13", "10", "3")] * 2
    for name in ("brightness", "other"):
        assert skipped_rows(out / name) == RAW_SKIPPED


def prepared(root: Path, model: Path, *, good: int, missing: int, corrupt: int) -> Path:
    """A prepared dataset at the model's spec whose test split lists ``good + missing + corrupt`` PNGs."""
    images = root / "images"
    images.mkdir(parents=True)
    classes = list(ROWS_BY_CLASS)
    lines = ["path,label,split,group"]
    for i in range(good + missing + corrupt):
        label = classes[i % len(classes)]
        png = images / f"{i}.png"
        if i < good:
            cv2.imwrite(str(png), np.full((32, 32), int(255 * ROWS_BY_CLASS[label] / 64), np.uint8))
        elif i < good + missing:
            pass  # listed in labels.csv, not on disk
        else:
            png.write_bytes(b"\x89PNG truncated")
        lines.append(f"images/{i}.png,{label},test,p{i}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    read_model_info(model).spec.save(root)
    return root


def test_prepared_dataset_with_missing_and_corrupt_pngs(model, tmp_path, capsys):
    data = prepared(tmp_path / "prepared", model, good=6, missing=1, corrupt=1)
    out = tmp_path / "eval"
    assert test_script.main([str(model), "--data", str(data), "--output", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "2 of 8 listed images" in err and "file_not_found 1" in err and "unreadable_image 1" in err
    assert skipped_rows(out) == {"6.png": "file_not_found", "7.png": "unreadable_image"}
    assert not (out / "results.json").exists() and not (out / "results.md").exists()

    # exactly at the threshold is allowed (the limit is "more than")
    assert test_script.main([str(model), "--data", str(data), "--output", str(out), "--max-skipped-share", "0.25",
                             *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["n_images"] == 6 and results["coverage"] == {
        "listed": 8, "evaluated": 6, "skipped": 2, "skipped_share": 0.25,
        "skipped_by_reason": {"file_not_found": 1, "unreadable_image": 1}, "max_skipped_share": 0.25}
    assert skipped_rows(out) == {"6.png": "file_not_found", "7.png": "unreadable_image"}


def test_nothing_readable_fails_whatever_the_threshold(model, tmp_path, capsys):
    data = prepared(tmp_path / "prepared", model, good=0, missing=2, corrupt=1)
    out = tmp_path / "eval"
    assert test_script.main([str(model), "--data", str(data), "--output", str(out), "--max-skipped-share", "1",
                             *FAST]) == 2
    err = capsys.readouterr().err
    assert "none of the 3 listed images" in err and "file_not_found 2, unreadable_image 1" in err
    assert len(skipped_rows(out)) == 3 and not (out / "results.json").exists()


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_max_skipped_share_must_be_a_share(value, capsys):
    with pytest.raises(SystemExit) as stop:
        test_script.parse_args(["model.keras", "--max-skipped-share", value])
    assert stop.value.code == 2
    assert "--max-skipped-share must be in [0, 1]" in capsys.readouterr().err
    assert test_script.parse_args(["model.keras"]).max_skipped_share == 0.01
