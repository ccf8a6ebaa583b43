"""The GDCM fallback (utils.io.dicom.fallback): what pydicom's other plugins refuse, GDCM decodes
as dcmtk does; without python-gdcm, or when GDCM fails too, a clear decode_failed."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGExtended12Bit, JPEGLSLossless

from utils.constants import MAX_IMAGE_PIXELS
from utils.io.dicom import DicomReadError, fallback, read_dicom
from utils.io.dicom.colour import check_photometric
from utils.io.dicom.decode import decode_first_frame
from utils.io.dicom.parse import transfer_syntax
from utils.io.dicom.pixel_module import read_pixel_module
from utils.io.dicom_writer import write_dicom

needs_gdcm = pytest.mark.skipif(not fallback.available(), reason="python-gdcm not installed")
needs_dcmtk = pytest.mark.skipif(shutil.which("dcmdjpeg") is None or shutil.which("dcmcjpeg") is None,
                                 reason="dcmtk not installed")


def se0_file() -> str:
    """pydicom's JPEG-lossy.dcm (bundled with pydicom): 1024 x 256, 12 bits, scan header Se = 0."""
    return get_testdata_file("JPEG-lossy.dcm")


def stored_values(source):
    """Frame 0 as the decode step gives it (stored values, before any LUT), and its decoder."""
    path = source if isinstance(source, str) else None
    ds = pydicom.dcmread(source)
    module = read_pixel_module(ds, check_photometric(ds, path), path, MAX_IMAGE_PIXELS)
    decoded = decode_first_frame(ds, module, transfer_syntax(ds), path, MAX_IMAGE_PIXELS)
    return decoded.pixels, decoded.decoder


def dcmtk_stored(path, tmp_path) -> np.ndarray:
    """dcmtk's decoding: dcmdjpeg to an uncompressed file, read back."""
    out = tmp_path / "dcmtk.dcm"
    subprocess.run(["dcmdjpeg", str(path), str(out)], check=True, capture_output=True, timeout=60)
    return pydicom.dcmread(out).pixel_array


def with_scan_end_zero(data: bytes) -> bytes:
    """A JPEG DICOM file with its first scan header's Se set to 0, as older encoders wrote it."""
    ds = pydicom.dcmread(io.BytesIO(data))
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    sos = frame.index(b"\xff\xda")
    (length,) = struct.unpack_from(">H", frame, sos + 2)
    frame[sos + 2 + length - 2] = 0  # Ss, Se, Ah/Al end the segment
    ds.PixelData = encapsulate([bytes(frame)])
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


@pytest.fixture
def without_gdcm(monkeypatch):
    """The reader as if python-gdcm were not installed: importing gdcm fails."""
    monkeypatch.setitem(sys.modules, "gdcm", None)
    fallback._gdcm.cache_clear()
    yield
    fallback._gdcm.cache_clear()


def test_the_primary_plugins_refuse_scan_end_zero():
    decoder = get_decoder(JPEGExtended12Bit)
    with pytest.raises(RuntimeError, match="scan stop must be 63"):
        decoder.as_array(pydicom.dcmread(se0_file()), index=0, decoding_plugin="pylibjpeg")


@needs_gdcm
def test_scan_end_zero_decodes_through_the_fallback():
    image = read_dicom(se0_file())
    assert image.decoder == "gdcm"
    assert image.pixels.shape == (1024, 256) and np.isfinite(image.pixels).all()
    # JPGExtended.dcm is the same image with Se = 63, which pylibjpeg decodes: 1 stored value apart
    # at most (IDCT rounding; measured: 1.4% of pixels differ by 1).
    pixels, decoder = stored_values(se0_file())
    reference, primary = stored_values(get_testdata_file("JPGExtended.dcm"))
    assert (decoder, primary) == ("gdcm", "pylibjpeg")
    assert pixels.dtype == reference.dtype == np.uint16
    assert np.abs(pixels.astype(int) - reference).max() <= 1


@needs_gdcm
@needs_dcmtk
def test_fallback_matches_dcmtk(tmp_path):
    pixels, _ = stored_values(se0_file())
    reference = dcmtk_stored(se0_file(), tmp_path)
    assert np.abs(pixels.astype(int) - reference).max() <= 1  # measured: identical
    uncompressed = read_dicom(tmp_path / "dcmtk.dcm").pixels
    assert np.abs(read_dicom(se0_file()).pixels - uncompressed).max() <= 1 / 255


@needs_gdcm
@needs_dcmtk
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_fallback_keeps_bits_and_sign(tmp_path, signed):
    # A 12-bit image in 16 bits, JPEG Extended by dcmcjpeg, then Se = 0; signed: the same
    # codestream with Pixel Representation 1 (its samples are 12-bit two's complement).
    y, x = np.mgrid[0:48, 0:64]
    write_dicom(tmp_path / "plain.dcm", (x * 60 + y * 5).astype(np.uint16), bits_stored=12)
    subprocess.run(["dcmcjpeg", "+ee", str(tmp_path / "plain.dcm"), str(tmp_path / "jpeg.dcm")], check=True,
                   capture_output=True, timeout=60)
    ds = pydicom.dcmread(tmp_path / "jpeg.dcm")
    ds.PixelRepresentation = int(signed)
    ds.save_as(tmp_path / "jpeg.dcm")
    (tmp_path / "se0.dcm").write_bytes(with_scan_end_zero((tmp_path / "jpeg.dcm").read_bytes()))

    pixels, decoder = stored_values(str(tmp_path / "se0.dcm"))
    reference = dcmtk_stored(tmp_path / "jpeg.dcm", tmp_path)
    assert decoder == "gdcm"
    assert pixels.dtype == (np.int16 if signed else np.uint16) == reference.dtype
    assert np.array_equal(pixels, reference)


@needs_gdcm
@pytest.mark.parametrize(("name", "syntax"), [("MR_small_jp2klossless.dcm", JPEG2000Lossless),
                                              ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless)])
def test_fallback_alone_decodes_what_the_primary_does(monkeypatch, name, syntax):
    # With no primary plugin installed, GDCM (through pydicom's own GDCM plugin) decodes it.
    expected = read_dicom(get_testdata_file("MR_small.dcm"))
    monkeypatch.setattr(get_decoder(syntax), "_available", {})
    image = read_dicom(get_testdata_file(name))
    assert image.decoder == "gdcm"
    assert np.array_equal(image.pixels, expected.pixels)


@needs_gdcm
@pytest.mark.parametrize("name", ["JPGExtended.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
def test_gdcm_is_never_the_primary_decoder(name):
    # pydicom lists GDCM first for these; installing python-gdcm must not change their pixels.
    assert read_dicom(get_testdata_file(name)).decoder == "pylibjpeg"


def _se0_with_scan(cut) -> io.BytesIO:
    ds = pydicom.dcmread(se0_file())
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    scan = frame.index(b"\xff\xda") + 2 + struct.unpack_from(">H", frame, frame.index(b"\xff\xda") + 2)[0]
    ds.PixelData = encapsulate([cut(frame, scan)])
    out = io.BytesIO()
    ds.save_as(out)
    out.seek(0)
    return out


@needs_gdcm
def test_neither_decoder_gives_a_clear_decode_failed():
    source = _se0_with_scan(lambda frame, scan: frame[:scan])  # the scan's data cut off
    with pytest.raises(DicomReadError) as caught:
        read_dicom(source)
    assert caught.value.reason == "decode_failed"
    message = caught.value.message
    assert "scan stop must be 63" in message and "the fallback decoder failed too" in message


@needs_gdcm
def test_fallback_is_not_given_a_container_gdcm_aborts_on():
    # Bits Allocated 32 for a 12-bit codestream: GDCM would abort the process (found by fuzzing).
    ds = pydicom.dcmread(se0_file())
    ds.BitsAllocated = 32
    source = io.BytesIO()
    ds.save_as(source)
    source.seek(0)
    with pytest.raises(DicomReadError) as caught:
        read_dicom(source)
    assert caught.value.reason == "decode_failed"
    assert "was not tried" in caught.value.message and "Bits Allocated 32" in caught.value.message


def test_without_gdcm_the_reason_says_it_is_not_installed(without_gdcm):
    assert not fallback.available() and fallback.version() == ""
    with pytest.raises(DicomReadError) as caught:
        read_dicom(se0_file())
    assert caught.value.reason == "decode_failed"
    message = caught.value.message
    assert "scan stop must be 63" in message
    assert "fallback decoder (gdcm) is not installed" in message and "pip install python-gdcm" in message


def test_without_gdcm_other_files_decode_as_before(without_gdcm):
    assert read_dicom(get_testdata_file("JPGExtended.dcm")).decoder == "pylibjpeg"
