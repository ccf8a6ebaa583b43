"""Tests for utils.io.dicom.read_dicom / read_dicom_header / is_dicom on real and synthetic files."""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import warnings

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import (
    JPEG2000,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from utils.io.dicom import (
    HEADER_FIELDS,
    DicomImage,
    DicomReadError,
    EmptyImageError,
    NoPixelDataError,
    NotDicomError,
    TruncatedPixelDataError,
    UnsupportedPhotometricError,
    UnsupportedTransferSyntaxError,
    is_dicom,
    read_dicom,
    read_dicom_header,
)
from utils.io.dicom import fallback

LUMA = np.array([0.299, 0.587, 0.114])


def pydicom_file(name: str) -> str:
    """A pydicom test file (bundled with pydicom, or from pydicom-data); skip if absent."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not available (pip install pydicom-data)")
    return path


def percentile_unit(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    lo, hi = np.percentile(values, [low, high])
    return np.clip((values - lo) / (hi - lo), 0, 1)


# --- Real CR images from pydicom-data -------------------------------------------------------


@pytest.fixture(scope="module")
def real_images() -> dict[str, DicomImage]:
    """RG1 (CR chest, MONOCHROME1) and RG3 (CR leg), uncompressed / J2K lossless / lossy."""
    names = [f"{g}_{c}.dcm" for g in ("RG1", "RG3") for c in ("UNCR", "J2KR", "J2KI")]
    return {name: read_dicom(pydicom_file(name)) for name in names}


@pytest.mark.parametrize("group", ["RG1", "RG3"])
def test_jpeg2000_lossless_decodes_identical_to_uncompressed(real_images, group):
    plain, j2k = real_images[f"{group}_UNCR.dcm"], real_images[f"{group}_J2KR.dcm"]
    assert plain.pixels.dtype == np.float32 and plain.pixels.ndim == 2
    assert np.array_equal(plain.pixels, j2k.pixels)
    assert plain.window_source == j2k.window_source == "window"
    assert j2k.metadata["TransferSyntaxUID"] == JPEG2000Lossless
    assert plain.metadata["TransferSyntaxUID"] == ExplicitVRLittleEndian


@pytest.mark.parametrize("group", ["RG1", "RG3"])
def test_jpeg2000_lossy_decodes_close_to_uncompressed(real_images, group):
    # Measured on the [0, 1] images (pylibjpeg-openjpeg 2.6):
    #   RG1: mean |diff| 0.0017, 99th percentile 0.0056, max 0.013
    #   RG3: mean |diff| 0.0007, 99th percentile 0.0039, max 0.0088
    diff = np.abs(real_images[f"{group}_UNCR.dcm"].pixels - real_images[f"{group}_J2KI.dcm"].pixels)
    assert diff.max() > 0  # really lossy, so this is a real decode of different data
    assert diff.mean() < 0.003
    assert np.percentile(diff, 99) < 0.01
    assert real_images[f"{group}_J2KI.dcm"].metadata["TransferSyntaxUID"] == JPEG2000


def _region(image: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> np.ndarray:
    r, c = image.shape
    return image[int(rows[0] * r) : int(rows[1] * r), int(cols[0] * c) : int(cols[1] * c)]


def test_monochrome1_chest_shows_bone_bright(real_images):
    """RG1 is MONOCHROME1: low stored values are bright. The spine/mediastinum strip must
    come out brighter than both lung fields (0.87 vs 0.58 and 0.56 as measured)."""
    image = real_images["RG1_UNCR.dcm"]
    assert image.metadata["PhotometricInterpretation"] == "MONOCHROME1"
    spine = (0.2, 0.6), (0.46, 0.54)
    lungs = [((0.17, 0.4), (0.17, 0.35)), ((0.17, 0.4), (0.63, 0.82))]
    for lung in lungs:
        assert _region(image.pixels, *spine).mean() > _region(image.pixels, *lung).mean() + 0.2

    # The stored values are the other way round, so the inversion really happened here.
    stored = pydicom.dcmread(pydicom_file("RG1_UNCR.dcm")).pixel_array
    assert _region(stored, *spine).mean() < _region(stored, *lungs[0]).mean()


def test_monochrome1_extremity_air_dark_bone_bright(real_images):
    pixels = real_images["RG3_UNCR.dcm"].pixels  # 1760 x 1760 lower leg, AP
    air = pixels[400:1200, 510:590].mean()  # direct exposure beside the leg (0.09)
    soft_tissue = pixels[200:800, 690:760].mean()  # 0.40
    tibia = pixels[200:800, 810:890].mean()  # 0.76
    assert air < 0.15 < soft_tissue < tibia - 0.2


def test_real_file_metadata_and_header_agree(real_images):
    metadata = real_images["RG1_UNCR.dcm"].metadata
    assert tuple(metadata) == HEADER_FIELDS
    assert metadata["Modality"] == "CR"
    assert metadata["BodyPartExamined"] == "CHEST"
    assert (metadata["Rows"], metadata["Columns"]) == ("1955", "1841")
    assert metadata["NumberOfFrames"] == ""  # absent tag
    assert metadata["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    assert read_dicom_header(pydicom_file("RG1_UNCR.dcm")) == metadata


# --- Other codecs from pydicom's own test files ---------------------------------------------


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
             "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
)
def test_lossless_variants_of_mr_small_match(name):
    reference = read_dicom(pydicom_file("MR_small.dcm"))
    image = read_dicom(pydicom_file(name))
    assert np.array_equal(image.pixels, reference.pixels)
    assert image.window_source == "window"


def test_jpeg_extended_12_bit_decodes():
    image = read_dicom(pydicom_file("JPGExtended.dcm"))
    assert image.pixels.shape == (1024, 256)
    assert image.metadata["TransferSyntaxUID"] == "1.2.840.10008.1.2.4.51"




# --- Colour --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["SC_ybr_full_uncompressed.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
)
def test_ybr_becomes_the_same_gray_as_rgb(name):
    rgb = read_dicom(pydicom_file("SC_rgb_rle.dcm"))
    ybr = read_dicom(pydicom_file(name))
    assert ybr.pixels.shape == rgb.pixels.shape == (100, 100)
    assert np.abs(ybr.pixels - rgb.pixels).max() < 0.01  # YCbCr <-> RGB rounding only
    assert ybr.window_source == "percentile"


def test_rgb_becomes_luminance(write):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    image = read_dicom(write(rgb, photometric="RGB"))
    assert image.pixels.shape == (40, 50)
    assert image.window_source == "percentile"
    assert np.allclose(image.pixels, percentile_unit(rgb @ LUMA), atol=1e-6)


def test_palette_color_applies_palette_then_luminance():
    path = pydicom_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    expected = percentile_unit(apply_color_lut(ds.pixel_array, ds) @ LUMA)
    image = read_dicom(path)
    assert image.metadata["PhotometricInterpretation"] == "PALETTE COLOR"
    assert np.allclose(image.pixels, expected, atol=1e-6)


def test_unknown_photometric_is_rejected(write, ramp12, tmp_path):
    ds = pydicom.dcmread(write(ramp12, bits_stored=12))
    ds.PhotometricInterpretation = "HSV"
    ds.save_as(tmp_path / "hsv.dcm")
    with pytest.raises(UnsupportedPhotometricError) as caught:
        read_dicom(tmp_path / "hsv.dcm")
    assert caught.value.reason == "unsupported_photometric"
    assert "HSV" in str(caught.value)


# --- Non-images and broken files -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sop_class"),
    [
        ("test-SR.dcm", "Comprehensive SR Storage"),
        ("reportsi.dcm", "Basic Text SR Storage"),
        ("rtplan.dcm", "RT Plan Storage"),
        ("waveform_ecg.dcm", "12-lead ECG Waveform Storage"),
        ("ExplVR_LitEndNoMeta.dcm", "RT Ion Plan Storage"),  # no preamble, no file meta
    ],
)
def test_objects_without_pixels_name_their_sop_class(name, sop_class):
    path = pydicom_file(name)
    with pytest.raises(NoPixelDataError) as caught:
        read_dicom(path)
    assert caught.value.reason == "no_pixel_data"
    assert caught.value.path == path
    assert sop_class in str(caught.value) and path in str(caught.value)


def test_encapsulated_pdf_has_no_pixel_data(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = EncapsulatedPDFStorage, generate_uid()
    ds.Modality, ds.MIMETypeOfEncapsulatedDocument = "DOC", "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(NoPixelDataError, match="Encapsulated PDF Storage"):
        read_dicom(tmp_path / "report.dcm")
    assert read_dicom_header(tmp_path / "report.dcm")["SOPClassUID"] == EncapsulatedPDFStorage


def test_float_pixel_data_is_not_handled(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.30", generate_uid()  # Parametric Map
    ds.Rows = ds.Columns = 2
    ds.FloatPixelData = np.zeros(4, "<f4").tobytes()
    ds.save_as(tmp_path / "map.dcm", enforce_file_format=True)
    with pytest.raises(NoPixelDataError, match="Float"):
        read_dicom(tmp_path / "map.dcm")


def test_pydicom_truncated_mr_file():
    with pytest.raises(TruncatedPixelDataError) as caught:
        read_dicom(pydicom_file("MR_truncated.dcm"))
    assert caught.value.reason == "truncated_pixel_data"
    assert "8130" in str(caught.value) and "8192" in str(caught.value)


def test_pixel_data_element_cut_short(write, ramp12, tmp_path):
    ds = pydicom.dcmread(write(ramp12, bits_stored=12))
    ds.PixelData = ds.PixelData[:-128]
    ds.save_as(tmp_path / "short.dcm")
    with pytest.raises(TruncatedPixelDataError):
        read_dicom(tmp_path / "short.dcm")


def test_file_cut_inside_native_pixel_data(write, ramp12, tmp_path):
    data = write(ramp12, bits_stored=12).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-1000])
    with pytest.raises(TruncatedPixelDataError):
        read_dicom(tmp_path / "cut.dcm")


@pytest.mark.parametrize("warnings_are_errors", [False, True])
def test_file_cut_inside_encapsulated_pixel_data(write, tmp_path, warnings_are_errors):
    # pydicom drops the whole dataset (with a UserWarning) when the file ends before the
    # encapsulated pixel data's sequence delimiter; with -W error the warning is raised.
    noise = np.random.default_rng(4).integers(0, 4096, size=(64, 64)).astype(np.uint16)
    data = write(noise, bits_stored=12, transfer_syntax=JPEG2000Lossless).read_bytes()
    assert len(data) > 4000  # noise barely compresses: the cut below is inside the codestream
    (tmp_path / "cut.dcm").write_bytes(data[:-500])
    with warnings.catch_warnings():
        warnings.simplefilter("error" if warnings_are_errors else "ignore")
        with pytest.raises(TruncatedPixelDataError, match="truncated"):
            read_dicom(tmp_path / "cut.dcm")


def test_real_truncated_jpeg2000_file():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TruncatedPixelDataError):
            read_dicom(pydicom_file("emri_small_jpeg_2k_lossless_too_short.dcm"))


def _png_bytes() -> bytes:
    ok, encoded = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    assert ok
    return encoded.tobytes()


@pytest.mark.parametrize(
    "content",
    [_png_bytes(), b"patient_id,label\n1,chest\n", b"", b"\x08\x00" + bytes(range(256)) * 4],
    ids=["png", "text", "empty", "dicom-like-start-then-garbage"],
)
def test_not_dicom(tmp_path, content):
    path = tmp_path / "file.dcm"
    path.write_bytes(content)
    with pytest.raises(NotDicomError) as caught:
        read_dicom(path)
    assert caught.value.reason == "not_dicom" and str(path) in str(caught.value)
    with pytest.raises(NotDicomError):
        read_dicom_header(path)
    assert not is_dicom(path)


def test_pydicom_shifted_no_meta_file_is_not_dicom():
    # no_meta.dcm starts one byte off, so a forced parse yields a single bogus element.
    with pytest.raises(NotDicomError):
        read_dicom(pydicom_file("no_meta.dcm"))


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_dicom(tmp_path / "absent.dcm")
    assert not is_dicom(tmp_path / "absent.dcm")


def test_is_dicom(write, ramp12):
    assert is_dicom(write(ramp12, bits_stored=12))
    assert is_dicom(pydicom_file("ExplVR_LitEndNoMeta.dcm"))  # preamble-less dataset


def test_preamble_less_image_is_read():
    path = pydicom_file("OT-PAL-8-face.dcm")  # ACR-NEMA style: implicit VR, no preamble or meta
    assert is_dicom(path)
    image = read_dicom(path)
    assert image.pixels.shape == (480, 640)
    assert image.metadata["TransferSyntaxUID"] == "1.2.840.10008.1.2"  # inferred: implicit VR LE


def test_unknown_transfer_syntax(write, ramp12, tmp_path):
    ds = pydicom.dcmread(write(ramp12, bits_stored=12))
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"  # private, made up
    ds.save_as(tmp_path / "private.dcm", implicit_vr=False, little_endian=True)
    with pytest.raises(UnsupportedTransferSyntaxError) as caught:
        read_dicom(tmp_path / "private.dcm")
    assert caught.value.reason == "unsupported_transfer_syntax"
    assert "1.2.826.0.1.3680043.9.9999.1" in str(caught.value)


def test_missing_decoder_plugin_says_what_to_install(write, ramp12, monkeypatch):
    path = write(ramp12, bits_stored=12, transfer_syntax=JPEG2000Lossless)
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})  # as if not installed
    monkeypatch.setattr(fallback, "available", lambda: False)  # nor python-gdcm
    with pytest.raises(UnsupportedTransferSyntaxError) as caught:
        read_dicom(path)
    message = str(caught.value)
    assert "JPEG 2000 Image Compression (Lossless Only)" in message
    assert JPEG2000Lossless in message and "pip install" in message and "pylibjpeg-openjpeg" in message


def test_errors_pickle_with_reason_and_path():
    error = TruncatedPixelDataError("pixel data is short", "/data/x.dcm")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, copy.path, str(copy)) == ("truncated_pixel_data", "/data/x.dcm", str(error))
    assert isinstance(copy, ValueError)


# --- Synthetic files: the grayscale pipeline -------------------------------------------------


def test_monochrome1_is_the_inverse_of_monochrome2(write, ramp12):
    for window in (None, (2048, 1024)):
        mono1 = read_dicom(write(ramp12, bits_stored=12, photometric="MONOCHROME1", window=window))
        mono2 = read_dicom(write(ramp12, bits_stored=12, photometric="MONOCHROME2", window=window))
        assert np.allclose(mono1.pixels, 1 - mono2.pixels, atol=1e-6)
        assert mono1.pixels[0, 0] == 1.0  # lowest stored value is white in MONOCHROME1


@pytest.mark.parametrize(
    ("dtype", "bits", "scale"), [(np.uint8, 8, 1), (np.uint16, 12, 16), (np.uint16, 16, 256), (np.int16, 16, 64)]
)
def test_bit_depths_give_the_same_image(write, dtype, bits, scale):
    base = np.arange(256, dtype=np.int64).reshape(16, 16)
    stored = (base * scale - (2**15 if dtype == np.int16 else 0) // 2).astype(dtype)
    image = read_dicom(write(stored, bits_stored=bits))
    assert image.window_source == "percentile"
    assert np.allclose(image.pixels, percentile_unit(base.astype(float)), atol=1e-6)


def test_signed_pixels_with_rescale_window_in_hounsfield_units(write):
    # Stored -2000..2095 (signed); HU = 2 * stored - 1000. Window 40/400 on HU values.
    stored = (np.arange(4096) - 2000).astype(np.int16).reshape(64, 64)
    image = read_dicom(
        write(stored, rescale=(2.0, -1000.0), window=(40.0, 400.0), extra={"VOILUTFunction": "LINEAR_EXACT"})
    )
    hu = 2.0 * stored - 1000.0
    assert image.window_source == "window"
    assert np.allclose(image.pixels, np.clip((hu - (40 - 200)) / 400, 0, 1), atol=1e-6)
    assert image.pixels[stored == 420].item() == pytest.approx(0.0, abs=1e-6)  # HU -160
    assert image.pixels[stored == 520].item() == pytest.approx(0.5, abs=1e-6)  # HU 40
    assert image.pixels[stored == 620].item() == pytest.approx(1.0, abs=1e-6)  # HU 240


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        ("LINEAR_EXACT", lambda v, c, w: np.clip((v - (c - w / 2)) / w, 0, 1)),
        # LINEAR (PS3.3 C.11.2.1.2.1): c - w/2 -> 0, c + w/2 - 1 -> 1
        ("LINEAR", lambda v, c, w: np.clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1)),
        ("SIGMOID", lambda v, c, w: 1 / (1 + np.exp(-4 * (v - c) / w))),
        (None, lambda v, c, w: np.clip((v - (c - 0.5)) / (w - 1) + 0.5, 0, 1)),  # default LINEAR
    ],
)
def test_window_maps_exactly_on_a_ramp(write, ramp12, function, expected):
    center, width = 1500.0, 1000.0
    extra = {"VOILUTFunction": function} if function else None
    image = read_dicom(write(ramp12, bits_stored=12, window=(center, width), extra=extra))
    assert image.window_source == "window"
    assert np.allclose(image.pixels, expected(ramp12.astype(float), center, width), atol=1e-6)
    if function == "LINEAR_EXACT":
        assert image.pixels.flat[1000] == 0.0 and image.pixels.flat[2000] == 1.0
        assert image.pixels.flat[1500] == pytest.approx(0.5)


def test_first_window_of_several_is_used(write, ramp12):
    extra = {"WindowCenter": [1500.0, 100.0], "WindowWidth": [1000.0, 50.0], "VOILUTFunction": "LINEAR_EXACT"}
    image = read_dicom(write(ramp12, bits_stored=12, extra=extra))
    assert np.allclose(image.pixels, np.clip((ramp12 - 1000.0) / 1000.0, 0, 1), atol=1e-6)


@pytest.mark.parametrize(("width", "function"), [(0.0, None), (-10.0, None), (0.5, "LINEAR"), (0.0, "SIGMOID")])
def test_unusable_window_width_falls_back_to_percentiles(write, ramp12, width, function):
    extra = {"WindowWidth": width, "VOILUTFunction": function}
    image = read_dicom(write(ramp12, bits_stored=12, window=(2048, 1), extra=extra))
    assert image.window_source == "percentile"
    assert np.allclose(image.pixels, percentile_unit(ramp12.astype(float)), atol=1e-6)


def test_voi_lut_takes_precedence_over_window(write, ramp12):
    lut = (4095 - np.arange(4096)).astype(np.uint16)  # 12-bit inverting table
    image = read_dicom(write(ramp12, bits_stored=12, window=(100, 10), voi_lut=lut))
    assert image.window_source == "voi_lut"
    assert np.allclose(image.pixels, lut[ramp12] / 4095, atol=1e-6)


def test_voi_lut_output_range_comes_from_its_bit_depth(write, ramp12):
    lut = np.rint(np.linspace(0, 1023, 4096)).astype(np.uint16)  # 10 bits of output
    stored_10 = read_dicom(write(ramp12, bits_stored=12, voi_lut=lut))
    assert pydicom.dcmread(write(ramp12, bits_stored=12, voi_lut=lut)).VOILUTSequence[0].LUTDescriptor[2] == 10
    assert np.allclose(stored_10.pixels, lut[ramp12] / 1023, atol=1e-6)
    declared_16 = read_dicom(write(ramp12, bits_stored=12, voi_lut=lut, voi_lut_bits=16))
    assert np.allclose(declared_16.pixels, lut[ramp12] / 65535, atol=1e-6)


def test_voi_lut_after_rescale_indexes_modality_values(write):
    stored = np.arange(-100, 156, dtype=np.int16).reshape(16, 16)
    lut = np.arange(256, dtype=np.uint8)[::-1].copy()  # input 0..255 after rescale
    image = read_dicom(write(stored, rescale=(1.0, 100.0), voi_lut=lut))
    assert np.allclose(image.pixels, lut[stored + 100] / 255, atol=1e-6)


def test_percentile_fallback(write):
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 4096, size=(100, 120), dtype=np.uint16)
    image = read_dicom(write(stored, bits_stored=12))
    assert image.window_source == "percentile"
    assert np.allclose(image.pixels, percentile_unit(stored.astype(float)), atol=1e-6)
    full_range = read_dicom(write(stored, bits_stored=12), percentiles=(0, 100))
    assert np.allclose(full_range.pixels, (stored - stored.min()) / (stored.max() - stored.min()), atol=1e-6)


def test_percentiles_use_a_subsample_on_large_images(write):
    rng = np.random.default_rng(2)
    stored = rng.normal(2000, 300, size=(2000, 2500)).clip(0, 4095).astype(np.uint16)
    path = write(stored, bits_stored=12)
    sampled = read_dicom(path, max_percentile_samples=10_000)
    exact = read_dicom(path, max_percentile_samples=stored.size)
    assert sampled.window_source == exact.window_source == "percentile"
    assert np.abs(sampled.pixels - exact.pixels).max() < 0.02


def test_percentile_range_collapsing_uses_min_max(write):
    stored = np.zeros((100, 100), np.uint16)
    stored[0, :5] = 4000  # 0.05 % of pixels: outside the 99.5th percentile
    image = read_dicom(write(stored, bits_stored=12))
    assert image.pixels.max() == 1.0 and image.pixels.min() == 0.0


def test_bad_percentiles_are_rejected(write, ramp12):
    with pytest.raises(ValueError, match="percentiles"):
        read_dicom(write(ramp12, bits_stored=12), percentiles=(99.0, 1.0))


def test_multiframe_returns_first_frame_only(write, ramp12):
    frames = np.stack([ramp12, ramp12[::-1], np.full_like(ramp12, 7)])
    single = read_dicom(write(ramp12, bits_stored=12, window=(2048, 4096)))
    for syntax in (ExplicitVRLittleEndian, RLELossless):
        image = read_dicom(write(frames, bits_stored=12, window=(2048, 4096), transfer_syntax=syntax))
        assert image.metadata["NumberOfFrames"] == "3"
        assert np.array_equal(image.pixels, single.pixels)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize(
    ("dtype", "bits", "photometric"),
    [(np.uint8, 8, "MONOCHROME2"), (np.uint16, 12, "MONOCHROME1"), (np.uint16, 16, "MONOCHROME2"),
     (np.int16, 16, "MONOCHROME2")],
)
def test_lossless_synthetic_round_trips(write, syntax, dtype, bits, photometric):
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    low, high = (0, 2**bits) if info.min == 0 else (-(2 ** (bits - 1)), 2 ** (bits - 1))
    stored = rng.integers(low, high, size=(48, 40)).astype(dtype)
    plain = read_dicom(write(stored, bits_stored=bits, photometric=photometric))
    encoded = read_dicom(write(stored, bits_stored=bits, photometric=photometric, transfer_syntax=syntax))
    assert np.array_equal(plain.pixels, encoded.pixels)
    assert encoded.metadata["TransferSyntaxUID"] == syntax


def test_constant_image_is_empty(write):
    with pytest.raises(EmptyImageError) as caught:
        read_dicom(write(np.full((32, 32), 300, np.uint16), bits_stored=12))
    assert caught.value.reason == "empty_image"


def test_image_saturated_by_its_window_is_empty(write, ramp12):
    with pytest.raises(EmptyImageError):
        read_dicom(write(ramp12, bits_stored=12, window=(10_000, 100)))


def test_zero_rows_is_empty(write, ramp12, tmp_path):
    ds = pydicom.dcmread(write(ramp12, bits_stored=12))
    ds.Rows = 0
    ds.save_as(tmp_path / "zero.dcm")
    with pytest.raises(EmptyImageError):
        read_dicom(tmp_path / "zero.dcm")


# --- Header ---------------------------------------------------------------------------------


def test_header_without_decoding_pixels(write, ramp12, tmp_path):
    path = write(ramp12, bits_stored=12, body_part="CHEST", patient_age="045Y", extra={"ViewPosition": "PA"})
    expected = read_dicom(path).metadata
    # Pixel data cut short: the header is still readable because pixels are never touched.
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:10]
    ds.save_as(tmp_path / "short.dcm")
    header = read_dicom_header(tmp_path / "short.dcm")
    assert header == expected
    assert tuple(header) == HEADER_FIELDS
    assert header["BodyPartExamined"] == "CHEST" and header["PatientAge"] == "045Y"
    assert header["ViewPosition"] == "PA" and header["Rows"] == "64" and header["NumberOfFrames"] == ""
    assert header["PatientID"] == "SYNTHETIC" and header["Modality"] == "DX"


def test_file_object_source(write, ramp12):
    data = write(ramp12, bits_stored=12).read_bytes()
    image = read_dicom(io.BytesIO(data))
    assert image.pixels.shape == (64, 64)
    assert read_dicom_header(io.BytesIO(data))["Rows"] == "64"
    with pytest.raises(NotDicomError) as caught:
        read_dicom(io.BytesIO(b"not dicom at all"))
    assert caught.value.path is None and "<DICOM stream>" in str(caught.value)


# --- Independent reference: dcmtk's renderer ------------------------------------------------


def _dcmtk_render(path, voi_flag: str, tmp_path) -> np.ndarray:
    out = tmp_path / "dcmtk.png"
    subprocess.run(["dcmj2pnm", voi_flag, "1", "+on", str(path), str(out)], check=True, capture_output=True,
                   timeout=120)
    return cv2.imread(str(out), cv2.IMREAD_UNCHANGED).astype(float)


@pytest.mark.skipif(shutil.which("dcmj2pnm") is None, reason="dcmtk not installed")
@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG3_UNCR.dcm"])
def test_matches_dcmtk_rendering_of_real_files(real_images, name, tmp_path):
    # dcmtk applies the first window and MONOCHROME1 the same way; 8-bit output rounds.
    reference = _dcmtk_render(pydicom_file(name), "+Wi", tmp_path)
    assert np.abs(real_images[name].pixels * 255 - reference).max() <= 1.0


@pytest.mark.skipif(shutil.which("dcmj2pnm") is None, reason="dcmtk not installed")
@pytest.mark.parametrize(
    ("kwargs", "voi_flag"),
    [
        ({"rescale": (2.0, -1000.0), "window": (40.0, 400.0), "photometric": "MONOCHROME1"}, "+Wi"),
        ({"window": (1500.0, 1000.0), "extra": {"VOILUTFunction": "SIGMOID"}}, "+Wi"),
        ({"voi_lut": np.rint(1023 * (np.arange(4096) / 4095) ** 0.7).astype(np.uint16)}, "+Wl"),
    ],
    ids=["signed-rescale-window-mono1", "sigmoid", "voi-lut-10-bit"],
)
def test_matches_dcmtk_rendering_of_synthetic_files(write, kwargs, voi_flag, tmp_path):
    values = np.random.default_rng(5).integers(0, 4096, size=(64, 64))
    if "rescale" in kwargs:
        path = write((values - 2000).astype(np.int16), **kwargs)  # signed, 16 bits stored
    else:
        path = write(values.astype(np.uint16), bits_stored=12, **kwargs)
    reference = _dcmtk_render(path, voi_flag, tmp_path)
    assert np.abs(read_dicom(path).pixels * 255 - reference).max() <= 1.0
