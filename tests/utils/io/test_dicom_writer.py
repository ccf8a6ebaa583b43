"""Tests for utils.io.dicom_writer.write_dicom."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.pixels import get_encoder
from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from utils.io.dicom_writer import write_dicom


def test_file_has_preamble_and_consistent_file_meta(write, ramp12):
    path = write(ramp12, bits_stored=12)
    assert path.read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID == DigitalXRayImageStorageForPresentation
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.ImplementationClassUID and meta.FileMetaInformationGroupLength > 0
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName", "StudyDate",
                    "Modality", "InstanceNumber", "SeriesNumber", "PresentationLUTShape"):
        assert keyword in ds, keyword
    assert ds.SeriesDescription == "SYNTHETIC" and "SYNTHETIC" in ds.ImageComments


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
               JPEG2000Lossless]
)
@pytest.mark.parametrize(
    ("dtype", "bits"), [(np.uint8, 8), (np.uint16, 12), (np.uint16, 16), (np.int16, 16), (np.int16, 12)]
)
def test_pixels_round_trip(write, syntax, dtype, bits):
    rng = np.random.default_rng(0)
    low, high = (0, 2**bits) if np.iinfo(dtype).min == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1))
    pixels = rng.integers(low, high, size=(40, 33)).astype(dtype)
    ds = pydicom.dcmread(write(pixels, bits_stored=bits, transfer_syntax=syntax))
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert (ds.BitsStored, ds.PixelRepresentation) == (bits, int(np.iinfo(dtype).min < 0))
    assert np.array_equal(ds.pixel_array, pixels)
    assert ds.LossyImageCompression == "00"


@pytest.mark.parametrize(("dtype", "bits"), [(np.uint8, 8), (np.uint16, 16), (np.int16, 16)])
def test_default_bits_stored(write, dtype, bits):
    ds = pydicom.dcmread(write(np.zeros((4, 4), dtype)))
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (bits, bits, bits - 1)


def test_values_must_fit_bits_stored(write):
    with pytest.raises(ValueError, match="bits_stored"):
        write(np.full((4, 4), 5000, np.uint16), bits_stored=12)


def test_float_pixels_are_rejected(write):
    with pytest.raises(TypeError, match="uint8"):
        write(np.zeros((4, 4), np.float32))


def test_multiframe(write, ramp12):
    frames = np.stack([ramp12, ramp12[::-1], ramp12 // 2])
    for syntax in (ExplicitVRLittleEndian, RLELossless):
        ds = pydicom.dcmread(write(frames, bits_stored=12, transfer_syntax=syntax))
        assert ds.NumberOfFrames == 3
        assert np.array_equal(ds.pixel_array, frames)


def test_rgb_is_secondary_capture(write):
    rgb = np.random.default_rng(1).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    ds = pydicom.dcmread(write(rgb, photometric="RGB"))
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert (ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation) == (3, 0, "RGB")
    assert np.array_equal(ds.pixel_array, rgb)


def test_bad_arguments_are_rejected(write):
    with pytest.raises(ValueError, match="photometric"):
        write(np.zeros((4, 4), np.uint8), photometric="YBR_FULL")
    with pytest.raises(ValueError, match="NotAKeyword"):
        write(np.zeros((4, 4), np.uint8), extra={"NotAKeyword": 1})


def test_rgb_rejects_grayscale_pipeline(write):
    with pytest.raises(ValueError, match="MONOCHROME"):
        write(np.zeros((4, 4, 3), np.uint8), photometric="RGB", window=(128, 256))


@pytest.mark.parametrize(
    ("modality", "sop_class"),
    [("DX", DigitalXRayImageStorageForPresentation), ("CR", ComputedRadiographyImageStorage),
     ("OT", SecondaryCaptureImageStorage)],
)
def test_sop_class_follows_modality(write, modality, sop_class):
    ds = pydicom.dcmread(write(np.zeros((4, 4), np.uint8), modality=modality))
    assert ds.Modality == modality and ds.SOPClassUID == sop_class


def test_grayscale_pipeline_tags(write, ramp12):
    ds = pydicom.dcmread(
        write(ramp12.astype(np.int16) - 2048, rescale=(2.0, -1000.0), window=(40.0, 400.0),
              photometric="MONOCHROME1")
    )
    assert (ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType) == (2.0, -1000.0, "US")
    assert (ds.WindowCenter, ds.WindowWidth) == (40.0, 400.0)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.PresentationLUTShape == "INVERSE"
    assert ds.PixelRepresentation == 1


@pytest.mark.parametrize(
    ("lut", "bits", "expected_bits"),
    [(np.arange(256, dtype=np.uint8), None, 8), (np.arange(4096, dtype=np.uint16) // 4, None, 10),
     (np.arange(4096, dtype=np.uint16), None, 12), (np.arange(4096, dtype=np.uint16), 16, 16)],
)
def test_voi_lut_sequence(write, ramp12, lut, bits, expected_bits):
    ds = pydicom.dcmread(write(ramp12, bits_stored=12, voi_lut=lut, voi_lut_bits=bits))
    item = ds.VOILUTSequence[0]
    assert list(item.LUTDescriptor) == [len(lut), 0, expected_bits]
    assert np.array_equal(np.frombuffer(item.LUTData, "<u2"), lut)


def test_voi_lut_values_must_fit_the_given_bits(write, ramp12):
    with pytest.raises(ValueError, match="8 bits"):
        write(ramp12, bits_stored=12, voi_lut=np.arange(4096, dtype=np.uint16), voi_lut_bits=8)


def test_identity_arguments_and_extra(write):
    ds = pydicom.dcmread(
        write(np.zeros((4, 4), np.uint8), body_part="CHEST", patient_id="P1", patient_age="004Y",
              study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5",
              extra={"ViewPosition": "AP", "SeriesDescription": None,
                     "SOPClassUID": SecondaryCaptureImageStorage})
    )
    assert (ds.BodyPartExamined, ds.PatientID, ds.PatientAge) == ("CHEST", "P1", "004Y")
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) == ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert ds.ViewPosition == "AP" and "SeriesDescription" not in ds
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"


def test_generated_uids_are_unique(write):
    first, second = (pydicom.dcmread(write(np.zeros((4, 4), np.uint8))) for _ in range(2))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert first[keyword].value != second[keyword].value
        assert first[keyword].value.is_valid


def test_jpeg2000_lossy_is_marked_and_close(write):
    smooth = (np.add.outer(np.arange(64), np.arange(64)) * 16).astype(np.uint16)
    ds = pydicom.dcmread(write(smooth, bits_stored=12, transfer_syntax=JPEG2000))
    assert ds.file_meta.TransferSyntaxUID == JPEG2000
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_15444_1")
    assert np.abs(ds.pixel_array.astype(int) - smooth).mean() < 20  # of a 0..2016 range


def test_jpeg2000_too_small_is_a_clear_error(write):
    with pytest.raises(ValueError, match="at least 32 x 32"):
        write(np.zeros((16, 64), np.uint8), transfer_syntax=JPEG2000Lossless)


def test_syntax_without_encoder_is_a_clear_error(write):
    with pytest.raises(ValueError, match="cannot encode JPEG Baseline"):
        write(np.zeros((8, 8), np.uint8), transfer_syntax=JPEGBaseline8Bit)


def test_jpeg_ls(write, ramp12):
    if get_encoder(JPEGLSLossless).is_available:
        ds = pydicom.dcmread(write(ramp12, bits_stored=12, transfer_syntax=JPEGLSLossless))
        assert np.array_equal(ds.pixel_array, ramp12)
    else:
        with pytest.raises(RuntimeError, match="pip install pyjpegls"):
            write(ramp12, bits_stored=12, transfer_syntax=JPEGLSLossless)


def test_creates_parent_folders(tmp_path):
    path = write_dicom(tmp_path / "a" / "b" / "x.dcm", np.zeros((4, 4), np.uint8))
    assert path.is_file() and path == tmp_path / "a" / "b" / "x.dcm"


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk not installed")
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_dcmtk_reads_the_file_cleanly(write, ramp12, syntax):
    path = write(ramp12, bits_stored=12, transfer_syntax=syntax)
    result = subprocess.run(["dcmdump", "-E", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "W:" not in result.stderr and "E:" not in result.stderr, result.stderr
