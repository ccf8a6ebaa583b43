"""The reduced-resolution JPEG 2000 path through libopenjp2 itself (utils/io/dicom/openjp2.py).

Against the path it replaces (Pillow's OpenJPEG plugin) the samples must be identical, for every
kind of grayscale file the reduced path takes: 8/12/16 bits, signed, MONOCHROME1, odd sizes, the
first frame of a multi-frame object, lossless and lossy; and with OpenJPEG's threads as without.
HTJ2K, which Pillow cannot reduce, is checked against the reversible wavelet's low-pass of
pydicom's own full decode.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless

from utils.io import dicom
from utils.io.dicom import j2k, openjp2
from utils.io.isolation import PoolSettings

from .test_decode_fast import decode_frame_0, target, wavelet_low_pass, xray

pytestmark = pytest.mark.skipif(not openjp2.available(), reason="no libopenjp2 2.5 or later (Pillow's or the system's)")

HTJ2K_DATA = Path(__file__).resolve().parents[3] / "data" / "htj2k"


def read_both(path, size: int):
    """read_dicom at ``size`` through openjp2 and through Pillow (openjp2 hidden)."""
    fast = dicom.read_dicom(path, target_shape=target(size))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openjp2, "available", lambda: False)
        before = dicom.read_dicom(path, target_shape=target(size))
    return fast, before


CASES = {  # name: (stored pixels, write_dicom keywords)
    "12-bit": (xray((413, 367), seed=1), {"bits_stored": 12}),
    "12-bit MONOCHROME1, window": (xray((400, 300), seed=2), {"bits_stored": 12, "photometric": "MONOCHROME1",
                                                               "window": (2048.0, 3000.0)}),
    "16-bit": ((xray((333, 401), seed=3).astype(np.uint32) * 16).clip(0, 65535).astype(np.uint16),
               {"bits_stored": 16}),
    "signed 16-bit, rescale": ((xray((301, 299), seed=4).astype(np.int32) * 8 - 16000).astype(np.int16),
                               {"bits_stored": 16, "rescale": (1.0, -1024.0)}),
    "8-bit": ((xray((257, 263), seed=5) >> 4).astype(np.uint8), {"bits_stored": 8}),
    "multi-frame, frame 0": (np.stack([xray((300, 320), seed=6), xray((300, 320), seed=7)]), {"bits_stored": 12}),
}


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEG2000], ids=["lossless", "lossy"])
@pytest.mark.parametrize("name", list(CASES))
def test_same_pixels_as_the_pillow_path(write, name, syntax):
    pixels, kwargs = CASES[name]
    path = write(pixels, transfer_syntax=syntax, **kwargs)
    for size, level in [(128, 1), (64, 2)]:
        fast, before = read_both(path, size)
        assert fast.reduced_by == before.reduced_by == level, name
        assert fast.pixels.dtype == np.float32
        np.testing.assert_array_equal(fast.pixels, before.pixels)
        assert fast.window_source == before.window_source


def test_multi_frame_reduces_frame_0(write):
    frames = np.stack([xray((300, 320), seed=8), np.zeros((300, 320), np.uint16)])
    path = write(frames, bits_stored=12, transfer_syntax=JPEG2000Lossless)
    frame, _, level = decode_frame_0(path, lambda r, c: (150, 160))
    assert level == 1
    np.testing.assert_array_equal(frame, wavelet_low_pass(frames[0], 1, 12, False))


@pytest.fixture(scope="module")
def chest_codestream(tmp_path_factory) -> bytes:
    """Frame 0 of a 1100 x 1300 12-bit JPEG 2000 lossless file."""
    from utils.io.dicom_writer import write_dicom

    path = write_dicom(tmp_path_factory.mktemp("chest") / "chest.dcm", xray((1100, 1300), seed=0), bits_stored=12,
                       transfer_syntax=JPEG2000Lossless)
    return get_frame(pydicom.dcmread(path).PixelData, 0, number_of_frames=1)


def test_threads_give_the_same_samples(chest_codestream):
    codestream = chest_codestream
    one, precision, signed = openjp2.decode(codestream, 1, threads=1)
    assert (precision, signed) == (12, False) and one.shape == (550, 650)
    np.testing.assert_array_equal(openjp2.decode(codestream, 1, threads=4)[0], one)


def test_the_thread_setting_reaches_the_decoder(write, monkeypatch):
    path = write(xray((300, 280), seed=9), bits_stored=12, transfer_syntax=JPEG2000Lossless)
    seen = []
    real = openjp2.decode
    monkeypatch.setattr(openjp2, "decode",
                        lambda data, level, threads, *dtype: seen.append(threads) or real(data, level, threads, *dtype))
    try:
        dicom.set_j2k_threads(3)
        dicom.read_dicom(path, target_shape=target(64))
    finally:
        dicom.set_j2k_threads(1)
    assert seen == [3] and j2k.decode_threads() == 1


def test_thread_count_does_not_oversubscribe(monkeypatch):
    from utils.io import isolation

    monkeypatch.setattr(isolation, "default_workers", lambda mode: {"processes": 4, "threads": 8}[mode])
    assert PoolSettings().thread_count == 1  # one process per core: nothing left for OpenJPEG threads
    assert PoolSettings(workers=2).thread_count == 2
    assert PoolSettings(workers=1).thread_count == 4
    assert PoolSettings(mode="threads", workers=1).thread_count == 1
    assert PoolSettings(workers=4, threads=3).thread_count == 3


def test_errors_are_openjpeg_errors(chest_codestream):
    codestream = chest_codestream
    with pytest.raises(openjp2.OpenJpegError, match="decode"):
        openjp2.decode(codestream[: len(codestream) // 2], 1)  # strict mode: cut short is an error
    with pytest.raises(openjp2.OpenJpegError, match="header"):
        openjp2.decode(b"\xff\x4f\xff\x51" + bytes(60), 1)


# --- HTJ2K ---------------------------------------------------------------------------------------


def htj2k_file(tmp_path, name: str, syntax=HTJ2KLossless) -> tuple[Path, np.ndarray, int]:
    """A DICOM around one of tests/data/htj2k's codestreams; its full decode by pydicom; bits."""
    codestream = (HTJ2K_DATA / f"{name}.j2c").read_bytes()
    bits = int(name.split("-")[1].removesuffix("bit"))
    rows, cols = (int(n) for n in name.split("-")[2].split("x"))
    ds = pydicom.dcmread(dicom_template(tmp_path, rows, cols, bits))
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path).pixel_array, bits


def dicom_template(tmp_path, rows: int, cols: int, bits: int) -> Path:
    from utils.io.dicom_writer import write_dicom

    return write_dicom(tmp_path / "template.dcm", np.zeros((rows, cols), np.uint16), bits_stored=bits)


@pytest.mark.parametrize("syntax", [HTJ2KLossless, HTJ2KLosslessRPCL])
@pytest.mark.parametrize("name", ["smooth-12bit-157x133", "smooth-16bit-130x171"])
@pytest.mark.parametrize("level", [1, 2])
def test_htj2k_reduced_samples_are_the_wavelet_low_pass(tmp_path, name, syntax, level):
    path, full, bits = htj2k_file(tmp_path, name, syntax)
    reduced = [math.ceil(n / 2**level) for n in full.shape]
    frame, _, used = decode_frame_0(path, lambda r, c: reduced)
    assert used == level and frame.dtype == np.uint16
    np.testing.assert_array_equal(frame, wavelet_low_pass(full, level, bits, False))


def test_htj2k_without_openjp2_decodes_at_full_resolution(tmp_path, monkeypatch):
    path, _, _ = htj2k_file(tmp_path, "smooth-12bit-157x133")
    assert dicom.read_dicom(path, target_shape=target(64)).reduced_by == 1
    monkeypatch.setattr(openjp2, "available", lambda: False)
    image = dicom.read_dicom(path, target_shape=target(64))
    assert image.reduced_by == 0
    np.testing.assert_array_equal(image.pixels, dicom.read_dicom(path).pixels)


@pytest.mark.parametrize(("value", "usable"), [("none", False), ("/nonexistent/libopenjp2.so.7", False), ("", True)])
def test_the_library_can_be_chosen_or_refused(monkeypatch, value, usable):
    monkeypatch.setenv("OPENJP2_LIBRARY", value)
    openjp2._library.cache_clear()
    try:
        assert openjp2.available() is usable and bool(openjp2.version()) is usable
    finally:
        monkeypatch.undo()
        openjp2._library.cache_clear()
