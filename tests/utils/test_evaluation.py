"""test.py's inference: the prepared cache and raw files through the engine, bad files left out
with the engine's reason codes."""

from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from utils import engine, evaluation
from utils.isolation import PoolSettings
from utils.preprocessing import PreprocessSpec

from .test_engine import SPEC, brightness, dicoms, hostile_decode


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
