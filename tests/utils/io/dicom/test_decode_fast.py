"""The fast DICOM decode paths: the stored-value table and reduced-resolution JPEG 2000.

The table is an optimisation only: its output must equal, bit for bit, running the same steps on
every pixel. Reduced-resolution JPEG 2000 is an approximation: its samples are checked exactly
against the reversible 5/3 wavelet (JPEG 2000 Annex F), and the 8-bit model inputs it yields
against the full-resolution path within stated tolerances.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.sequence import Sequence
from pydicom.uid import JPEG2000, JPEG2000Lossless

from utils.constants import MAX_IMAGE_PIXELS
from utils.data.demo import draw
from utils.io import dicom
from utils.io.dicom import grayscale, openjp2
from utils.io.dicom.colour import check_photometric
from utils.io.dicom.decode import decode_first_frame
from utils.io.dicom.parse import transfer_syntax
from utils.io.dicom.pixel_module import read_pixel_module
from utils.io.dicom_writer import write_dicom
from utils.preprocessing import PreprocessSpec, display_to_cache, preprocess_file, resized_shape


def xray(shape: tuple[int, int], seed: int, label: str = "adult_chest", smooth: bool = True) -> np.ndarray:
    """A 12-bit X-ray-like image at ``shape``: the demo's anatomy plus white detector noise.

    The demo drawing (about 270 x 300) carries its own pixel noise; scaled up 4x that becomes
    a texture right at the scale of 2 skipped levels. ``smooth`` blurs it away first.
    """
    rng = np.random.default_rng(seed)
    anatomy = draw(label, rng)
    if smooth:
        anatomy = cv2.GaussianBlur(anatomy, (0, 0), 2)
    base = cv2.resize(anatomy, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    noisy = 0.05 + 0.9 * base + rng.normal(0, 0.01, shape)
    return np.clip(np.rint(noisy * 4095), 0, 4095).astype(np.uint16)


def target(size: int, aspect: str = "stretch"):
    """The target_shape preprocess_file passes for a spec of this size and aspect."""
    return functools.partial(resized_shape, size=size, aspect=aspect)


@functools.lru_cache(maxsize=8)
def full_resolution(path) -> np.ndarray:
    return dicom.read_dicom(path).pixels


def full_and_reduced(path, size: int, aspect: str = "stretch") -> tuple[np.ndarray, np.ndarray, int]:
    """8-bit model inputs from a full-resolution and from a reduced decode, and the level."""
    spec = PreprocessSpec(image_size=size, aspect=aspect)
    reduced = dicom.read_dicom(path, target_shape=target(size, aspect))
    full = display_to_cache(full_resolution(str(path)), spec)
    return full.astype(int), display_to_cache(reduced.pixels, spec).astype(int), reduced.reduced_by


def decode_frame_0(path, target_shape):
    """(frame, photometric, level) from the decode step alone, before steps 4-8."""
    ds = pydicom.dcmread(path)
    module = read_pixel_module(ds, check_photometric(ds, str(path)), str(path), MAX_IMAGE_PIXELS)
    return decode_first_frame(ds, module, transfer_syntax(ds), str(path), MAX_IMAGE_PIXELS, target_shape)[:3]


def gray_level_diffs(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    diff = np.abs(a - b)
    return float(diff.mean()), float(np.percentile(diff, 99)), int(diff.max())


# --- Reduced-resolution JPEG 2000: the samples ----------------------------------------------


def lowpass_53(x: np.ndarray, axis: int) -> np.ndarray:
    """Low-pass half of the reversible 5/3 lifting (T.800 F.3.8.2), symmetric extension."""
    x = np.moveaxis(np.asarray(x, np.int64), axis, 0)
    even, odd = x[0::2], x[1::2]
    right = np.concatenate([even[1:], even[-1:]])[: len(odd)]  # x[2i + 2], mirrored at the end
    d = odd - np.floor_divide(even[: len(odd)] + right, 2)
    if len(even) > len(odd):  # odd length: d[-1] = d[0] on the left, d[m] = d[m - 1] on the right
        d_left, d_right = np.concatenate([d[:1], d]), np.concatenate([d, d[-1:]])
    else:
        d_left, d_right = np.concatenate([d[:1], d[:-1]]), d
    return np.moveaxis(even + np.floor_divide(d_left + d_right + 2, 4), 0, axis)


def wavelet_low_pass(stored: np.ndarray, level: int, precision: int, signed: bool) -> np.ndarray:
    """The LL band after ``level`` decompositions (columns, then rows), clamped as OpenJPEG does."""
    for _ in range(level):
        stored = lowpass_53(lowpass_53(stored, 0), 1)
    low, high = (-(2 ** (precision - 1)), 2 ** (precision - 1) - 1) if signed else (0, 2**precision - 1)
    return np.clip(stored, low, high)


@pytest.mark.parametrize(
    ("dtype", "bits", "shape"),
    [(np.uint16, 12, (157, 133)), (np.uint16, 16, (130, 171)), (np.int16, 16, (157, 133)),
     (np.uint8, 8, (141, 150))],
    ids=["12-bit", "16-bit", "signed-16-bit", "8-bit"],
)
@pytest.mark.parametrize("level", [1, 2])
def test_reduced_samples_are_the_wavelet_low_pass(write, dtype, bits, shape, level):
    # Odd sizes: Pillow rounds a reduced size to nearest, OpenJPEG up; 157 / 4 shows the difference.
    rng = np.random.default_rng(level)
    info = np.iinfo(dtype)
    smooth = cv2.GaussianBlur(rng.random(shape), (0, 0), 3)
    stored = (info.min + smooth / smooth.max() * (min(info.max, 2**bits - 1) - info.min)).astype(dtype)
    path = write(stored, bits_stored=bits, transfer_syntax=JPEG2000Lossless)
    reduced = [math.ceil(n / 2**level) for n in shape]
    frame, _, used = decode_frame_0(path, lambda r, c: reduced)
    assert used == level and frame.dtype == dtype and list(frame.shape) == reduced
    expected = wavelet_low_pass(stored, level, bits, info.min < 0)
    np.testing.assert_array_equal(frame, expected)


# --- Reduced-resolution JPEG 2000: when it is used -------------------------------------------


@pytest.fixture(scope="module")
def xray_files(tmp_path_factory) -> dict[str, object]:
    """Chest- and abdomen-like 12-bit images (even and odd sizes) with a header window, J2K
    lossless and lossy; and the chest without window (percentile VOI)."""
    folder = tmp_path_factory.mktemp("xrays")
    files = {}
    for seed, (name, shape, label) in enumerate([("chest", (1100, 1300), "adult_chest"),
                                                 ("abdomen", (1237, 1041), "abdominal")]):
        pixels = xray(shape, seed, label)
        for syntax, kind in [(JPEG2000Lossless, "lossless"), (JPEG2000, "lossy")]:
            files[f"{name}-{kind}"] = write_dicom(folder / f"{name}-{kind}.dcm", pixels, bits_stored=12,
                                                  window=(2048.0, 4096.0), transfer_syntax=syntax)
        if name == "chest":
            files["chest-percentile"] = write_dicom(folder / "chest-percentile.dcm", pixels, bits_stored=12,
                                                    transfer_syntax=JPEG2000Lossless)
    return files


@pytest.mark.parametrize(
    ("size", "aspect", "level", "shape"),
    [(256, "stretch", 2, (275, 325)), (256, "letterbox", 2, (275, 325)), (512, "stretch", 1, (550, 650)),
     (64, "stretch", dicom.MAX_J2K_REDUCTION, (275, 325)), (600, "stretch", 0, (1100, 1300)),
     (2000, "stretch", 0, (1100, 1300))],
)
def test_reduction_level_follows_the_target(xray_files, size, aspect, level, shape):
    image = dicom.read_dicom(xray_files["chest-lossless"], target_shape=target(size, aspect))
    assert image.reduced_by == level and image.pixels.shape == shape
    assert image.metadata["Rows"] == "1100"  # the header still describes the stored image


def test_no_target_or_not_jpeg2000_means_full_resolution(write, xray_files):
    assert dicom.read_dicom(xray_files["chest-lossy"]).reduced_by == 0
    plain = write(xray((600, 500), seed=3), bits_stored=12)
    assert dicom.read_dicom(plain, target_shape=target(64)).reduced_by == 0


def test_preprocess_file_uses_the_reduced_decode(xray_files):
    path = xray_files["abdomen-lossless"]
    spec = PreprocessSpec(image_size=256)
    reduced = dicom.read_dicom(path, target_shape=target(256))
    assert reduced.reduced_by == 2
    np.testing.assert_array_equal(preprocess_file(path, spec)[0], display_to_cache(reduced.pixels, spec))


# --- Reduced-resolution JPEG 2000: how close it is ------------------------------------------

# Measured on these four files (mean / 99th percentile / max |diff| in gray levels):
#   256 px, 2 levels (1 for the abdomen letterboxed): 0.11-0.52 / 1-2 / 1-4
#   512 px, 1 level: 0.40-0.46 / 2 / 3-4
# Before the reduced image was moved onto the area-average grid: 2-3 mean, up to 27 max.
@pytest.mark.parametrize(("size", "aspect"), [(256, "stretch"), (256, "letterbox"), (512, "stretch")])
@pytest.mark.parametrize("name", ["chest-lossless", "chest-lossy", "abdomen-lossless", "abdomen-lossy"])
def test_reduced_model_input_matches_full_resolution(xray_files, name, size, aspect):
    full, reduced, level = full_and_reduced(xray_files[name], size, aspect)
    assert level > 0
    mean, p99, worst = gray_level_diffs(full, reduced)
    assert mean <= 0.75 and p99 <= 3 and worst <= 6, (mean, p99, worst)


def test_percentiles_of_a_reduced_image_see_less_noise(xray_files):
    # The percentile range comes from the reduced image, where averaging has shrunk the noise
    # of the flat background the 0.5th percentile falls in (1 % of the range here): the dark
    # end moves by about 2 noise sigmas. Measured 3.5 / 6 / 8 at 256 px (0.5 on real CR below).
    full, reduced, level = full_and_reduced(xray_files["chest-percentile"], 256)
    assert level == 2
    mean, p99, worst = gray_level_diffs(full, reduced)
    assert mean <= 4.5 and p99 <= 8 and worst <= 12, (mean, p99, worst)


def real_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not available (pip install pydicom-data)")
    return path


# Measured (mean / 99th percentile / max |diff| in gray levels) on pydicom-data CR images:
#   with their window, 256 px (2 levels): RG1_J2KR 0.21/1/6, RG3_J2KR 0.23/2/20,
#     RG1_J2KI 0.35/2/9, RG3_J2KI 0.25/3/28; 512 px (1 level): 0.11-0.18 / 1 / 6-17
#   window removed (percentiles), 256 px: RG3_J2KR 0.18/2/21, RG1_J2KI 0.56/3/11
# The largest differences sit on burned-in markers and collimator edges.
@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "RG3_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KI.dcm"])
def test_reduced_model_input_matches_full_resolution_on_real_files(name):
    path = real_file(name)
    assert dicom.read_dicom(path, target_shape=target(256)).window_source == "window"
    for size, expected_level in [(256, 2), (512, 1)]:
        full, reduced, level = full_and_reduced(path, size)
        assert level == expected_level
        mean, p99, worst = gray_level_diffs(full, reduced)
        assert mean <= 0.5 and p99 <= 4 and worst <= 40, (size, mean, p99, worst)


@pytest.mark.parametrize("name", ["RG3_J2KR.dcm", "RG1_J2KI.dcm"])
def test_real_files_with_percentile_windowing(name, tmp_path):
    ds = pydicom.dcmread(real_file(name))
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / name)
    full, reduced, level = full_and_reduced(tmp_path / name, 256)
    assert level == 2 and dicom.read_dicom(tmp_path / name).window_source == "percentile"
    mean, p99, worst = gray_level_diffs(full, reduced)
    assert mean <= 0.75 and p99 <= 4 and worst <= 40, (mean, p99, worst)


# --- Reduced-resolution JPEG 2000: one direction one level further (j2k_packets) -------------


@pytest.fixture
def thin_calls(monkeypatch) -> list[tuple[int, frozenset, int]]:
    """(resolution, sub-bands kept, bit-planes left out) of each j2k_packets.thin call."""
    from utils.io.dicom import j2k_packets

    calls, real = [], j2k_packets.thin

    def spy(codestream, resolution, keep, drop_planes=0):
        calls.append((resolution, keep, drop_planes))
        return real(codestream, resolution, keep, drop_planes)

    monkeypatch.setattr(j2k_packets, "thin", spy)
    return calls


@pytest.fixture(scope="module")
def tall_and_wide(tmp_path_factory) -> dict[str, object]:
    """12-bit X-rays 1100 x 900 and 900 x 1100: at 256 px one side can lose two levels, the other one.
    With the full-range window, and without (percentiles)."""
    folder = tmp_path_factory.mktemp("thin")
    files = {}
    for seed, (name, shape) in enumerate([("tall", (1100, 900)), ("wide", (900, 1100))]):
        pixels = xray(shape, seed + 10, "adult_chest" if name == "tall" else "abdominal")
        files[name] = write_dicom(folder / f"{name}.dcm", pixels, bits_stored=12, window=(2048.0, 4096.0),
                                  transfer_syntax=JPEG2000Lossless)
        files[f"{name}-percentile"] = write_dicom(folder / f"{name}-p.dcm", pixels, bits_stored=12,
                                                  transfer_syntax=JPEG2000Lossless)
        files[f"{name}-lossy"] = write_dicom(folder / f"{name}-lossy.dcm", pixels, bits_stored=12,
                                             window=(2048.0, 4096.0), transfer_syntax=JPEG2000)
    return files


needs_openjp2 = pytest.mark.skipif(not openjp2.available(), reason="no libopenjp2 2.5 or later")

# Measured (mean / 99th percentile / max |diff| in gray levels) against the full-resolution
# decode: tall 0.29 / 1 / 2 and wide 0.29 / 1 / 2 (HL or LH kept, 4 planes left out: 4096 / 255
# stored values per gray level); lossy, where no planes are left out: 0.25-0.28 / 1 / 2.
@needs_openjp2
@pytest.mark.parametrize(("name", "kept"), [("tall", {1}), ("wide", {2}), ("tall-lossy", {1}), ("wide-lossy", {2})])
def test_one_direction_thinned_matches_full_resolution(tall_and_wide, thin_calls, name, kept):
    full, reduced, level = full_and_reduced(tall_and_wide[name], 256)
    assert level == 1 and len(thin_calls) == 1
    _, keep, planes = thin_calls[0]
    assert keep == frozenset(kept) and planes == 4  # 4096 / 255 = 16.06 stored values per gray level
    mean, p99, worst = gray_level_diffs(full, reduced)
    assert mean <= 0.75 and p99 <= 3 and worst <= 6, (mean, p99, worst)


@needs_openjp2
def test_one_direction_thinned_with_percentiles(tall_and_wide, thin_calls):
    # The planes left out come from the percentile range of the coarsest level (8-16 stored
    # values per gray level here: 3 planes). The range itself then narrows as with any reduced
    # decode (above), more so without LH and HH's noise: measured 2.76 / 5 / 7 (tall), 1.14 / 4 / 6
    # (wide), against 1.6 / 3 / 5 for the same kind of image reduced without thinning.
    full, reduced, level = full_and_reduced(tall_and_wide["tall-percentile"], 256)
    assert level == 1 and thin_calls[0][2] == 3
    mean, p99, worst = gray_level_diffs(full, reduced)
    assert mean <= 4.5 and p99 <= 8 and worst <= 12, (mean, p99, worst)


@needs_openjp2
def test_thinning_without_skipping_a_level(tall_and_wide, thin_calls):
    # 1100 x 900 to 512: no level can go (450 < 512), but the rows can lose one (550).
    # Measured 0.36 / 1 / 3.
    path = tall_and_wide["tall"]
    image = dicom.read_dicom(path, target_shape=target(512))
    assert image.reduced_by == 0 and image.pixels.shape == (1100, 900)
    assert thin_calls and thin_calls[0][1] == frozenset({1})
    spec = PreprocessSpec(image_size=512)
    mean, p99, worst = gray_level_diffs(display_to_cache(full_resolution(str(path)), spec).astype(int),
                                        display_to_cache(image.pixels, spec).astype(int))
    assert mean <= 0.75 and p99 <= 3 and worst <= 6, (mean, p99, worst)


@needs_openjp2
def test_a_codestream_the_rewrite_leaves_alone_is_reduced_as_before(tall_and_wide, monkeypatch):
    from utils.io.dicom import j2k, j2k_packets

    thinned = dicom.read_dicom(tall_and_wide["tall"], target_shape=target(256)).pixels

    def unsupported(*args, **kwargs):
        raise j2k_packets.Unsupported("a POC marker, say")

    monkeypatch.setattr(j2k_packets, "thin", unsupported)
    plain = dicom.read_dicom(tall_and_wide["tall"], target_shape=target(256))
    monkeypatch.setattr(j2k, "thinning", lambda *args: None)
    np.testing.assert_array_equal(plain.pixels, dicom.read_dicom(tall_and_wide["tall"], target_shape=target(256)).pixels)
    assert plain.reduced_by == 1 and not np.array_equal(plain.pixels, thinned)


def test_thinning_needs_one_side_to_spare():
    from utils.io.dicom.j2k import thinning

    assert thinning(1100, 900, 1, 2, target(256)) == frozenset({1})  # rows 275 >= 256, columns 225 < 256
    assert thinning(900, 1100, 1, 2, target(256)) == frozenset({2})
    assert thinning(1100, 1100, 1, 2, target(256)) is None  # both could: the caller reduces instead
    assert thinning(1000, 1000, 1, 2, target(256)) is None  # neither can
    assert thinning(3000, 2000, 2, 2, target(256)) is None  # no level left to thin


@pytest.mark.parametrize(("width", "planes"), [(4096.0, 4), (1024.0, 2), (30000.0, 6), (300.0, 0), (1e9, 8)])
def test_planes_follow_the_display_step(width, planes):
    from utils.io.dicom.j2k import dropped_planes

    assert dropped_planes(width / 255) == planes
    assert dropped_planes(None) == 0


def test_gray_level_step_from_the_header():
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth, ds.RescaleSlope, ds.RescaleIntercept = 1000, 4000, 2, -1024
    coarse = pytest.fail  # a header window needs no pixels
    assert grayscale.stored_values_per_gray_level(ds, coarse, (0.5, 99.5), 1000) == pytest.approx(4000 / 255 / 2)
    del ds.WindowCenter, ds.WindowWidth
    ramp = np.arange(0, 5100, dtype=np.int64).reshape(51, 100)
    step = grayscale.stored_values_per_gray_level(ds, lambda: ramp, (0.0, 100.0), 10_000)
    assert step == pytest.approx(5099 / 255)  # rescaled range 10198 / 255 gray levels / slope 2
    ds.ModalityLUTSequence = _modality_lut(4096, 16)
    assert grayscale.stored_values_per_gray_level(ds, lambda: ramp, (0.0, 100.0), 10_000) is None


@needs_openjp2
@pytest.mark.parametrize(("name", "crop", "size", "kept"),
                         [("RG3_J2KR.dcm", (1760, 1500), 400, {1}), ("RG3_J2KR.dcm", (1500, 1760), 400, {2}),
                          ("RG1_J2KR.dcm", None, 470, {1}), ("RG1_J2KR.dcm", None, 940, {1})])
def test_thinned_real_files_match_full_resolution(tmp_path, thin_calls, name, crop, size, kept):
    # Measured: RG3 cropped 0.15 / 1 / 12-15 (2 planes: window 1024 on 10 bits); RG1 0.23 / 1 / 10
    # at 470 px (6 planes: window 30000) and 0.18 / 1 / 14 at 940 px (no level skipped).
    ds = pydicom.dcmread(real_file(name))
    pixels = ds.pixel_array if crop is None else np.ascontiguousarray(ds.pixel_array[: crop[0], : crop[1]])
    path = write_dicom(tmp_path / name, pixels, bits_stored=ds.BitsStored, transfer_syntax=JPEG2000Lossless,
                       window=(float(ds.WindowCenter), float(ds.WindowWidth)))
    full, reduced, level = full_and_reduced(path, size)
    assert level == (1 if size < 900 else 0) and thin_calls and thin_calls[0][1] == frozenset(kept)
    mean, p99, worst = gray_level_diffs(full, reduced)
    assert mean <= 0.5 and p99 <= 4 and worst <= 40, (size, mean, p99, worst)


# --- Reduced-resolution JPEG 2000: falling back ---------------------------------------------


def assert_same_as_full_resolution(path, size: int = 64) -> None:
    image = dicom.read_dicom(path, target_shape=target(size))
    assert image.reduced_by == 0
    np.testing.assert_array_equal(image.pixels, dicom.read_dicom(path).pixels)


def test_colour_falls_back(write):
    rgb = np.random.default_rng(6).integers(0, 256, size=(300, 280, 3), dtype=np.uint8)
    assert_same_as_full_resolution(write(rgb, photometric="RGB", transfer_syntax=JPEG2000Lossless))


def test_header_disagreeing_with_codestream_falls_back(write, tmp_path):
    ds = pydicom.dcmread(write(xray((300, 280), seed=4), bits_stored=12, transfer_syntax=JPEG2000Lossless))
    ds.BitsStored, ds.HighBit = 16, 15  # the codestream says 12 bits
    ds.save_as(tmp_path / "bits.dcm")
    assert_same_as_full_resolution(tmp_path / "bits.dcm")


@pytest.mark.parametrize("backend", ["openjp2", "pillow"])
def test_decoder_failure_falls_back(write, monkeypatch, backend):
    from PIL import Image

    path = write(xray((300, 280), seed=5), bits_stored=12, transfer_syntax=JPEG2000Lossless)
    assert dicom.read_dicom(path, target_shape=target(64)).reduced_by == 2

    def broken(*args, **kwargs):
        raise OSError("broken data stream")

    if backend == "openjp2":
        if not openjp2.available():
            pytest.skip("no libopenjp2 2.5 or later to call directly")
        monkeypatch.setattr(openjp2, "decode", broken)
    else:
        monkeypatch.setattr(openjp2, "available", lambda: False)
        monkeypatch.setattr(Image, "open", broken)
    assert_same_as_full_resolution(path)


def test_cut_off_codestream_is_left_to_the_full_decoder(write, tmp_path):
    ds = pydicom.dcmread(write(xray((300, 280), seed=6), bits_stored=12, transfer_syntax=JPEG2000Lossless))
    codestream = get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = encapsulate([codestream[: len(codestream) * 3 // 4]])
    ds.save_as(tmp_path / "cut.dcm")
    try:
        expected = dicom.read_dicom(tmp_path / "cut.dcm")
    except dicom.DicomReadError as exc:  # whatever the full decoder says, the fast path says too
        with pytest.raises(type(exc)):
            dicom.read_dicom(tmp_path / "cut.dcm", target_shape=target(64))
    else:
        assert_same_as_full_resolution(tmp_path / "cut.dcm")
        assert expected.reduced_by == 0


# --- The stored-value table -----------------------------------------------------------------


def _modality_lut(entries: int, bits: int) -> Sequence:
    item = Dataset()
    item.LUTDescriptor = [entries, 0, bits]
    item.ModalityLUTType = "US"
    data = np.rint(np.sqrt(np.arange(entries) / (entries - 1)) * (2**bits - 1)).astype(int).tolist()
    item.add_new("LUTData", "US", data)
    return Sequence([item])


def _pipeline_cases() -> list[dict]:
    """Random windows, rescales and VOI LUTs on 8/12/16-bit, signed and unsigned images."""
    rng = np.random.default_rng(7)
    cases = []
    for i in range(18):
        dtype, bits = [(np.uint8, 8), (np.uint16, 12), (np.uint16, 16), (np.int16, 16), (np.int16, 12)][i % 5]
        kwargs = {"bits_stored": bits, "photometric": ("MONOCHROME1", "MONOCHROME2")[i % 2]}
        signed = np.iinfo(dtype).min < 0
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
        kind = ["LINEAR", "LINEAR_EXACT", "SIGMOID", "voi_lut", "percentile", "modality_lut"][i % 6]
        if i % 3:
            kwargs["rescale"] = (float(rng.choice([1.0, 0.37, 2.0, -1.0])), float(rng.uniform(-1500, 1500)))
        slope, intercept = kwargs.get("rescale", (1.0, 0.0))
        values = sorted([low * slope + intercept, (high - 1) * slope + intercept])
        if kind in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            center = rng.uniform(*values)
            kwargs["window"] = (round(center, 2), round(rng.uniform(1, values[1] - values[0]), 2))
            kwargs["extra"] = {"VOILUTFunction": kind}
        elif kind == "voi_lut":
            kwargs.pop("rescale", None)
            kwargs["bits_stored"] = bits if not signed else 16
            kwargs["voi_lut"] = np.rint(np.linspace(0, 1023, 2**bits) ** 1.2 / 1023**0.2).astype(np.uint16)
        elif kind == "modality_lut":
            kwargs.pop("rescale", None)
            dtype, bits, kwargs["bits_stored"] = np.uint16, 12, 12
            kwargs["extra"] = {"ModalityLUTSequence": _modality_lut(4096, 16)}
            if i % 2:  # a window on the LUT's output
                kwargs["window"] = (30000.0, 20000.0)
        cases.append({"dtype": dtype, "kind": kind, **kwargs})
    return cases


@pytest.mark.parametrize("case", _pipeline_cases(), ids=lambda c: f"{np.dtype(c['dtype']).name}-{c['kind']}")
def test_table_equals_per_pixel_steps(write, monkeypatch, case):
    case = dict(case)
    dtype = case.pop("dtype")
    case.pop("kind")
    info = np.iinfo(dtype)
    bits = case["bits_stored"]
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if info.min < 0 else (0, 2**bits)
    stored = np.random.default_rng(8).integers(low, high, size=(512, 520)).astype(dtype)
    path = write(stored, **case)

    lookups = []
    real_lookup = grayscale._lookup
    monkeypatch.setattr(grayscale, "_lookup", lambda *a: lookups.append(1) or real_lookup(*a))
    try:
        tabled = dicom.read_dicom(path)
    except dicom.EmptyImageError:  # a window outside the values: the same either way
        monkeypatch.setattr(grayscale, "_MIN_PIXELS_PER_TABLE_ENTRY", 10**9)
        with pytest.raises(dicom.EmptyImageError):
            dicom.read_dicom(path)
        return
    assert lookups, "the table was not used"
    monkeypatch.setattr(grayscale, "_MIN_PIXELS_PER_TABLE_ENTRY", 10**9)  # per pixel, as before
    per_pixel = dicom.read_dicom(path)
    assert tabled.window_source == per_pixel.window_source
    assert tabled.pixels.dtype == per_pixel.pixels.dtype == np.float32
    np.testing.assert_array_equal(tabled.pixels, per_pixel.pixels)
