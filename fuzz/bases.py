"""The small valid DICOM files the corpus mutations start from.

- synthetic 32-64 px images from ``utils.io.dicom_writer.write_dicom`` in every transfer syntax it
  encodes (explicit, implicit and deflated VR little endian, RLE, JPEG 2000 lossless and
  lossy), MONOCHROME1/2, rescale, window, sigmoid, VOI LUT, Modality LUT, palette, RGB and
  multi-frame, and one without preamble;
- pydicom's own small JPEG-LS and JPEG baseline files (no encoder for them is installed), and
  its 12-bit JPEG Extended file whose scan header says Se = 0 (decoded by the GDCM fallback);
- real CR files from pydicom-data (RG1 chest, RG3 extremity) cropped to 128 x 128 (native)
  and 256 x 256 (JPEG 2000) with their real headers, when pydicom-data is installed.

UIDs and dates are fixed, so the same seed gives the same bytes.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fuzz import raw

# Transfer syntax UIDs (strings, so this module imports without pydicom at the top).
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
RLE = "1.2.840.10008.1.2.5"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"
HTJ2K = "1.2.840.10008.1.2.4.203"
ENCAPSULATED = frozenset({RLE, J2K_LOSSLESS, J2K, JPEG_BASELINE, JPEG_EXTENDED, JPEG_LS, JPEG_LS_NEAR})
J2K_SYNTAXES = frozenset({J2K_LOSSLESS, J2K})

_FIXED_TIME = {"StudyDate": "20240101", "StudyTime": "120000", "ContentDate": "20240101", "ContentTime": "120000"}
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root, as write_dicom's own UIDs


@dataclass(frozen=True)
class Base:
    """A small valid file the mutations start from."""

    name: str
    data: bytes
    syntax: str
    note: str

    @property
    def encapsulated(self) -> bool:
        return self.syntax in ENCAPSULATED

    @property
    def explicit(self) -> bool:
        """Explicit VR little endian dataset with preamble: ``fuzz.raw`` can edit its elements."""
        return self.syntax not in (IMPLICIT, DEFLATED, BIG_ENDIAN) and self.data[128:132] == b"DICM"


def build_bases(seed: int = 0) -> dict[str, Base]:
    """The valid files every mutation starts from, by name (deterministic for a seed)."""
    with tempfile.TemporaryDirectory(prefix="fuzz-bases-") as tmp:
        bases = _synthetic_bases(Path(tmp), seed)
    bases.update(_pydicom_bases())
    bases.update(_real_bases(seed))
    return bases


def _uid(*parts: object) -> str:
    import hashlib

    digest = int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest(), 16)
    return _UID_ROOT + str(digest)[:30]


def _phantom(rows: int, cols: int, high: int, rng, frames: int = 0):
    """A gradient with a bright ellipse and noise, 0..high: contrast for every pipeline."""
    import numpy as np

    y, x = np.mgrid[0:rows, 0:cols]
    image = 0.25 + 0.5 * x / max(1, cols - 1)
    image[((y - rows / 2) / (rows / 3)) ** 2 + ((x - cols / 2) / (cols / 4)) ** 2 < 1] += 0.3
    shape = (frames, rows, cols) if frames else (rows, cols)
    image = np.broadcast_to(image, shape) + rng.normal(0, 0.03, shape)
    return np.clip(image * high, 0, high).round()


def _synthetic_bases(tmp: Path, seed: int) -> dict[str, Base]:
    import numpy as np
    from pydicom import dcmread

    from utils.io.dicom_writer import write_dicom

    rng = np.random.default_rng(seed)
    u12 = _phantom(64, 64, 4095, rng).astype(np.uint16)
    u8 = _phantom(64, 64, 255, rng).astype(np.uint8)
    s16 = (_phantom(32, 32, 3000, rng, frames=3) - 1000).astype(np.int16)
    mf16 = _phantom(32, 32, 4095, rng, frames=2).astype(np.uint16)
    rgb = np.stack([_phantom(48, 48, 255, rng) for _ in range(3)], axis=-1).astype(np.uint8)
    lut = (np.arange(4096) // 4).astype(np.uint16)  # 12-bit input -> 10-bit output
    lut8 = (np.sqrt(np.arange(256) / 255) * 1023).astype(np.uint16)

    recipes: list[tuple[str, object, str, dict]] = [
        ("ele_mono2_window", u12, EXPLICIT, {"bits_stored": 12, "window": (2048, 3000)}),
        ("ile_mono1_rescale", u12, IMPLICIT, {"photometric": "MONOCHROME1", "bits_stored": 12, "rescale": (1, -1024)}),
        ("deflate_voi_lut", u12, DEFLATED, {"bits_stored": 12, "voi_lut": lut}),
        ("ele_8bit_voi_lut", u8, EXPLICIT, {"voi_lut": lut8}),
        (
            "ele_signed_sigmoid",
            s16[0],
            EXPLICIT,
            {"rescale": (2, 0), "window": (1000, 4000), "extra": {"VOILUTFunction": "SIGMOID"}},
        ),
        ("ele_multiframe", s16, EXPLICIT, {"rescale": (1, -1024), "window": (0, 4000)}),
        ("rle_mono2", u12, RLE, {"bits_stored": 12}),
        ("rle_mono1_8bit", u8, RLE, {"photometric": "MONOCHROME1"}),
        ("rle_multiframe", mf16, RLE, {"bits_stored": 12}),
        ("rle_rgb", rgb[:32, :32], RLE, {"photometric": "RGB"}),
        (
            "j2k_lossless_mono1",
            u12,
            J2K_LOSSLESS,
            {"photometric": "MONOCHROME1", "bits_stored": 12, "window": (2000, 4000)},
        ),
        ("j2k_lossy_mono2", u12, J2K, {"bits_stored": 12, "rescale": (1, -1024), "window": (1000, 4000)}),
        ("j2k_multiframe", mf16, J2K_LOSSLESS, {"bits_stored": 12}),
        ("j2k_rgb", rgb[:32, :32], J2K_LOSSLESS, {"photometric": "RGB"}),
        ("ele_rgb", rgb, EXPLICIT, {"photometric": "RGB"}),
    ]
    bases = {}
    for name, pixels, syntax, options in recipes:
        path = tmp / f"{name}.dcm"
        extra = {**_FIXED_TIME, **options.pop("extra", {})}
        write_dicom(
            path,
            pixels,
            transfer_syntax=syntax,
            study_uid=_uid(seed, "study"),
            series_uid=_uid(seed, "series"),
            sop_uid=_uid(seed, name),
            extra=extra,
            **options,
        )
        shape = "x".join(str(side) for side in pixels.shape)
        bases[name] = Base(name, path.read_bytes(), syntax, f"synthetic {shape} {syntax_name(syntax)}")

    # Palette colour: an 8-bit image shown through 16-bit red/green/blue tables.
    ds = dcmread(io.BytesIO(bases["ele_8bit_voi_lut"].data))
    del ds.VOILUTSequence
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = np.arange(256, dtype=np.uint16)
    for colour, table in zip(("Red", "Green", "Blue"), (ramp * 257, (255 - ramp) * 257, ramp * 128)):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", table.astype("<u2").tobytes())
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, "ele_palette")
    bases["ele_palette"] = Base("ele_palette", _save(ds), EXPLICIT, "synthetic 64x64 8-bit PALETTE COLOR")

    # Modality LUT Sequence instead of rescale: stored 12-bit -> "HU" through a table.
    ds = dcmread(io.BytesIO(bases["ele_mono2_window"].data))
    item = _dataset(LUTDescriptor=[4096, 0, 16], ModalityLUTType="HU")
    item.add_new("LUTData", "OW", (np.arange(4096) * 2).astype("<u2").tobytes())
    ds.ModalityLUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 4096, 6000
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, "ele_modality_lut")
    bases["ele_modality_lut"] = Base("ele_modality_lut", _save(ds), EXPLICIT, "synthetic 64x64 Modality LUT Sequence")

    # A bare dataset: no preamble, no file meta (the reader accepts those).
    ds = dcmread(io.BytesIO(bases["ele_mono2_window"].data))
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True, enforce_file_format=False)
    data = buffer.getvalue()
    if data[128:132] == b"DICM":  # pydicom kept the preamble: strip preamble and meta
        data = data[raw.dataset_start(data) :]
    bases["bare_dataset"] = Base("bare_dataset", data, EXPLICIT, "synthetic 64x64, no preamble or file meta")
    return bases


def syntax_name(uid: str) -> str:
    import warnings

    from pydicom.uid import UID

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not a uid" is deliberate
        return UID(uid).name


def _dataset(**keywords):
    from pydicom.dataset import Dataset

    ds = Dataset()
    for keyword, value in keywords.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _pydicom_bases() -> dict[str, Base]:
    """pydicom's own small test files for syntaxes nothing here can encode."""
    from pydicom.data import get_testdata_file

    files = {
        "jpegls_lossless": ("MR_small_jpeg_ls_lossless.dcm", JPEG_LS),
        "jpegls_near_8bit": ("JPEGLSNearLossless_08.dcm", JPEG_LS_NEAR),
        "jpeg_baseline_ybr": ("SC_rgb_jpeg_dcmtk.dcm", JPEG_BASELINE),
        # 12-bit, scan header Se = 0 (older encoders): libjpeg refuses it, the GDCM fallback decodes it
        "jpeg_extended_se0": ("JPEG-lossy.dcm", JPEG_EXTENDED),
    }
    bases = {}
    for name, (filename, syntax) in files.items():
        path = get_testdata_file(filename)  # shipped inside pydicom, no download
        if path is not None:
            bases[name] = Base(name, Path(path).read_bytes(), syntax, f"pydicom test file {filename}")
    return bases


def _real_bases(seed: int) -> dict[str, Base]:
    """RG1 (chest) and RG3 (extremity) CR files cropped, headers kept; {} without pydicom-data."""
    try:
        from pydicom import dcmread
        from pydicom.data import get_testdata_file
    except ImportError:
        return {}
    recipes = [
        # name, source file, crop side, syntax
        ("rg1_ele_crop", "RG1_UNCI.dcm", 128, EXPLICIT),
        ("rg3_ile_crop", "RG3_UNCR.dcm", 128, IMPLICIT),
        ("rg1_j2k_crop", "RG1_J2KR.dcm", 256, J2K_LOSSLESS),
        ("rg3_j2k_lossy_crop", "RG3_J2KI.dcm", 256, J2K),
    ]
    bases = {}
    for name, filename, side, syntax in recipes:
        path = _pydicom_data_file(get_testdata_file, filename)
        if path is None:
            continue
        ds = dcmread(path)
        pixels = ds.pixel_array
        top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
        crop = pixels[top : top + side, left : left + side].copy()
        bases[name] = Base(
            name, _reencode(ds, crop, syntax, _uid(seed, name)), syntax, f"{filename} centre {side}x{side}, real header"
        )
    return bases


def _pydicom_data_file(get_testdata_file, filename: str) -> str | None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when it cannot reach its download mirror
        try:
            return get_testdata_file(filename)
        except Exception:  # noqa: BLE001 - no pydicom-data and no network: fewer bases
            return None


def _reencode(ds, pixels, syntax: str, sop_uid: str) -> bytes:
    from pydicom.uid import UID

    ds.Rows, ds.Columns = pixels.shape
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = EXPLICIT
    ds.PixelData = pixels.astype(f"<u{ds.BitsAllocated // 8}").tobytes()
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod", "DerivationDescription"):
        if keyword in ds:
            delattr(ds, keyword)
    if syntax in ENCAPSULATED:
        options = {"j2k_cr": [10.0]} if syntax == J2K else {}
        ds.compress(UID(syntax), generate_instance_uid=False, **options)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True, implicit_vr=syntax == IMPLICIT, little_endian=True)
    return buffer.getvalue()
