"""test.py's inference: the prepared cache and raw files through the engine, bad files left out
with the engine's reason codes."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from tests.utils.infer.test_engine import SPEC, brightness, dicoms, hostile_decode
from utils.evaluate import evaluation
from utils.infer import engine
from utils.io.isolation import PoolSettings
from utils.preprocessing import PreprocessSpec


@pytest.fixture
def predictor():
    return SimpleNamespace(spec=SPEC, predict=brightness)


def test_cached_pngs_and_their_errors(tmp_path, predictor):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.full((32, 32), 200, np.uint8))
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((16, 16), np.uint8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG no")
    files = [str(good), str(small), str(broken), str(tmp_path / "gone.png")]
    probs, kept, errors = evaluation.predict(predictor, files, cached=True, batch_size=2, progress=False)
    assert kept.tolist() == [0] and probs.shape == (1, 2) and probs[0, 1] == pytest.approx(200 / 255)
    assert [(path, error.split(":")[0]) for path, error in errors] == [
        (str(small), "wrong_image_size"), (str(broken), "unreadable_image"), (str(tmp_path / "gone.png"),
                                                                               "file_not_found")]


@pytest.mark.parametrize("cached", [False, True])
def test_iter_batches_keeps_indices_in_order(tmp_path, cached):
    files = dicoms(tmp_path, count=3)
    if cached:
        files = [str(tmp_path / f"{i}.png") for i in range(3)]
        for i, png in enumerate(files):
            cv2.imwrite(png, np.full((32, 32), 10 * i, np.uint8))
    files.insert(1, str(tmp_path / "missing.dcm"))
    batches = list(evaluation.iter_batches(files, SPEC.replace(channels=3), cached=cached, batch_size=2))
    assert [kept for _, kept, _ in batches] == [[0], [2, 3]]
    assert batches[0][2][0][0] == 1 and batches[0][2][0][1].startswith("file_not_found: ")
    assert batches[1][0].shape == (2, 32, 32, 3) and batches[1][0].dtype == np.float32


def test_raw_files_that_hang_or_crash_are_left_out(tmp_path, predictor, monkeypatch):
    monkeypatch.setattr(engine, "decode_file", hostile_decode)  # the engine's default decode, in the workers
    good = dicoms(tmp_path / "good", count=2)
    for name in ("hang.dcm", "die.dcm"):
        (tmp_path / name).write_bytes(open(good[0], "rb").read())
    files = [good[0], str(tmp_path / "hang.dcm"), str(tmp_path / "die.dcm"), good[1]]
    probs, kept, errors = evaluation.predict(predictor, files, cached=False, batch_size=4, progress=False,
                                             pool=PoolSettings(workers=2, timeout_s=1.5))
    assert kept.tolist() == [0, 3] and probs.shape == (2, 2)
    assert [e.split(":")[0] for _, e in errors] == ["decode_timeout", "decoder_crashed"]


def test_spec_mismatch_is_reported_per_file(tmp_path):
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), np.zeros((64, 64), np.uint8))
    decoded = evaluation.decode_cached(str(png), PreprocessSpec(image_size=32))
    assert decoded.image is None and decoded.reason == "wrong_image_size" and "64" in decoded.message


# --- Coverage: every listed file is evaluated or skipped with its reason ----------------------


def test_split_reason():
    assert evaluation.split_reason("unreadable_image: /a/b.png: unreadable PNG") == (
        "unreadable_image", "/a/b.png: unreadable PNG")
    assert evaluation.split_reason("not_an_image") == ("not_an_image", "")


def test_coverage_of_raw_folders_counts_listing_rejects_and_decode_errors(tmp_path, predictor):
    dark = tmp_path / "data" / "dark"
    dicoms(dark, count=3)
    (dark / "notes.txt").write_text("not an image")  # rejected by the listing: not_an_image
    (dark / "x.dcm").write_text("not DICOM")  # listed, then fails to decode: not_dicom
    subset = evaluation.eval_set(tmp_path / "data", "test", SPEC)
    assert [(p, r.split(":")[0]) for p, r in subset.skipped] == [(str(dark / "notes.txt"), "not_an_image")]
    _, kept, errors = evaluation.predict(predictor, subset.files, cached=False, progress=False,
                                         pool=PoolSettings(mode="threads"))
    cov = evaluation.Coverage.of(subset, len(kept), errors, 0.5)
    assert (cov.listed, cov.evaluated, len(cov.skipped)) == (5, 3, 2)
    assert cov.by_reason == {"not_an_image": 1, "not_dicom": 1}
    assert cov.skipped[0] == (str(dark / "notes.txt"), "not_an_image", "unrecognised file type")
    assert cov.skipped[1][:2] == (str(dark / "x.dcm"), "not_dicom") and cov.skipped[1][2]
    assert cov.skipped_share == pytest.approx(0.4) and not cov.too_many_skipped
    assert cov.to_dict() == {"listed": 5, "evaluated": 3, "skipped": 2, "skipped_share": 0.4,
                             "skipped_by_reason": {"not_an_image": 1, "not_dicom": 1}, "max_skipped_share": 0.5}
    assert dataclasses.replace(cov, max_skipped_share=0.39).too_many_skipped


def test_coverage_of_a_prepared_dataset_with_missing_and_broken_pngs(tmp_path, predictor):
    data = tmp_path / "prepared"
    (data / "images").mkdir(parents=True)
    rows = []
    for i in range(6):
        cv2.imwrite(str(data / "images" / f"{i}.png"), np.full((32, 32), 40 * i, np.uint8))
        rows.append(f"images/{i}.png,{('dark', 'bright')[i % 2]},test,p{i}")
    (data / "images" / "4.png").write_bytes(b"\x89PNG no")
    (data / "images" / "5.png").unlink()
    rows.append("images/6.png,dark,train,p6")  # another split: not listed for test
    (data / "labels.csv").write_text("path,label,split,group\n" + "\n".join(rows) + "\n")
    SPEC.save(data)
    subset = evaluation.eval_set(data, "test", SPEC)
    assert subset.cached and len(subset.files) == 6 and subset.skipped == []
    _, kept, errors = evaluation.predict(predictor, subset.files, cached=True, batch_size=4, progress=False)
    cov = evaluation.Coverage.of(subset, len(kept), errors, 0.01)
    assert (cov.listed, cov.evaluated) == (6, 4)
    assert cov.by_reason == {"file_not_found": 1, "unreadable_image": 1}
    assert cov.too_many_skipped and cov.skipped_share == pytest.approx(1 / 3)
    assert dataclasses.replace(cov, max_skipped_share=1 / 3).too_many_skipped is False
    # none readable fails whatever the threshold; counts that do not add up are a bug
    assert evaluation.Coverage.of(subset, 0, [(f, "file_not_found: x") for f in subset.files], 1.0).too_many_skipped
    with pytest.raises(RuntimeError, match="add up"):
        evaluation.Coverage.of(subset, len(kept), errors[:1], 0.5)


def test_a_csv_source_counts_only_the_rejects_of_the_evaluated_split(tmp_path):
    """A file the CSV puts in train and that is missing is not skipped from the test split."""
    dicoms(tmp_path / "img", count=2)
    names = sorted(p.name for p in (tmp_path / "img").iterdir())
    (tmp_path / "list.csv").write_text(
        "path,label,split\n"
        f"img/{names[0]},dark,test\nimg/{names[1]},dark,train\n"
        "img/gone_train.dcm,dark,train\nimg/gone_test.dcm,dark,test\nimg/gone_nosplit.dcm,dark,\n")
    subset = evaluation.eval_set(tmp_path / "list.csv", "test", SPEC)
    assert subset.files == [str(tmp_path / "img" / names[0])]
    assert sorted(p for p, _ in subset.skipped) == ["img/gone_nosplit.dcm", "img/gone_test.dcm"]


def test_raw_files_that_are_not_projection_radiography_are_left_out_with_their_reason(tmp_path, predictor):
    from utils.io.dicom_writer import write_dicom

    image = np.tile(np.arange(40, dtype=np.uint8) * 5, (40, 1))
    files = [str(write_dicom(tmp_path / f"{m}.dcm", image, modality=m))
             for m in ("DX", "CT", "CR")]
    probs, kept, errors = evaluation.predict(predictor, files, cached=False, progress=False,
                                             pool=PoolSettings(mode="threads"))
    assert kept.tolist() == [0, 2] and [(p, e.split(":")[0]) for p, e in errors] == [
        (files[1], "not_projection_radiography")]
    _, kept, errors = evaluation.predict(predictor, files, cached=False, progress=False,
                                         pool=PoolSettings(mode="threads"), projection_only=False)
    assert kept.tolist() == [0, 1, 2] and not errors
