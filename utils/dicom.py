"""Read a DICOM X-ray into a float image as a viewer would display it.

``read_dicom`` is the one entry point for pixels; ``read_dicom_header`` reads the few header
fields the project uses without decoding pixels; ``is_dicom`` is a cheap file-type check.

Two things keep ``read_dicom`` fast on large X-rays. The grayscale steps (modality LUT/rescale,
VOI, clip, MONOCHROME1 inversion) depend on the stored value alone, so for 8- and 16-bit images
they run once over every possible stored value and the image is mapped through that table: the
same numbers, bit for bit, as running them on every pixel. And a caller that will shrink the
image can pass ``target_shape``: a JPEG 2000 image is then decoded at a lower resolution level
that still covers the target (OpenJPEG, through Pillow, skips the finest wavelet levels), which
is close to, not identical with, decoding everything and shrinking afterwards.

Everything that cannot be read raises a subclass of ``DicomReadError`` (a ``ValueError``)
whose ``reason`` is a short code, so callers can count and report failures by kind. The
subclasses cover the expected cases; the base class itself is raised with
``reason="decode_failed"`` when a codec rejects the data or the Image Pixel module is
unusable (e.g. no Rows), and ``reason="invalid_modality_lut"`` when the Modality LUT
cannot be applied. A missing file is not a DICOM problem: ``FileNotFoundError`` and other
``OSError``s propagate unchanged.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    as_pixel_options,
    get_decoder,
)
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    HTJ2K,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from utils.constants import WINDOW_PERCENTILES

logger = logging.getLogger(__name__)

Source = str | os.PathLike | BinaryIO
# (rows, cols) of an image -> (rows, cols) the caller will resize it to.
TargetShape = Callable[[int, int], tuple[int, int]]

HEADER_FIELDS: tuple[str, ...] = (
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "Modality",
    "BodyPartExamined",
    "PatientAge",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "TransferSyntaxUID",
    "ViewPosition",
)

# ITU-R BT.601 luma weights, the same as OpenCV's and Pillow's RGB -> gray.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")

# What to install for each encapsulated syntax pydicom can decode with a plugin.
_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
_INSTALL_HINTS: dict[str, str] = {
    JPEGBaseline8Bit: _LIBJPEG,
    JPEGExtended12Bit: _LIBJPEG,
    JPEGLossless: _LIBJPEG,
    JPEGLosslessSV1: _LIBJPEG,
    JPEGLSLossless: "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)",
    JPEGLSNearLossless: "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)",
    JPEG2000Lossless: _OPENJPEG,
    JPEG2000: _OPENJPEG,
    HTJ2KLossless: "pip install pylibjpeg pylibjpeg-openjpeg",
    HTJ2KLosslessRPCL: "pip install pylibjpeg pylibjpeg-openjpeg",
    HTJ2K: "pip install pylibjpeg pylibjpeg-openjpeg",
    RLELossless: "pip install pylibjpeg pylibjpeg-rle (or python-gdcm)",
}
_NO_DECODER_HINT = (
    "pydicom has no decoder for it; convert the file to an uncompressed transfer syntax "
    "first (e.g. dcmtk's dcmconv/dcmdjpeg or gdcmconv --raw)"
)

# The start of encapsulated Pixel Data in explicit VR little endian: tag (7FE0,0010),
# VR OB or OW, two reserved bytes, undefined length.
_ENCAPSULATED_PIXEL_DATA_HEADS = (
    b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff",
    b"\xe0\x7f\x10\x00OW\x00\x00\xff\xff\xff\xff",
)
# A dataset without preamble starts with a group 0002 or 0008 tag, little or big endian.
_BARE_DATASET_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
# At least one of these must be present for a forced (preamble-less) parse to count.
_DATASET_EVIDENCE = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "Rows",
    "PixelData",
)


# --- Errors ---------------------------------------------------------------------------------


class DicomReadError(ValueError):
    """A file that cannot be turned into an image; ``reason`` says why, ``path`` where."""

    reason: str = "unreadable"

    def __init__(self, message: str, path: str | None = None, reason: str | None = None) -> None:
        # Every argument goes to args, so the error pickles across worker processes.
        super().__init__(message, path, reason)
        self.message = message
        self.path = path
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        where = self.path if self.path is not None else "<DICOM stream>"
        return f"{where}: {self.message}"


class NotDicomError(DicomReadError):
    reason = "not_dicom"


class NoPixelDataError(DicomReadError):
    reason = "no_pixel_data"


class TruncatedPixelDataError(DicomReadError):
    reason = "truncated_pixel_data"


class UnsupportedTransferSyntaxError(DicomReadError):
    reason = "unsupported_transfer_syntax"


class UnsupportedPhotometricError(DicomReadError):
    reason = "unsupported_photometric"


class EmptyImageError(DicomReadError):
    reason = "empty_image"


# --- Public API -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomImage:
    """A decoded image: ``pixels`` in [0, 1] as displayed (bone bright), how it was windowed."""

    pixels: np.ndarray  # float32, (rows, cols), 0 = black, 1 = white as displayed
    window_source: str  # "voi_lut" | "window" | "percentile"
    metadata: dict[str, str]  # HEADER_FIELDS, "" where the tag is missing
    # JPEG 2000 resolution levels skipped when decoding (see read_dicom's target_shape); each
    # halves rows and columns, rounding up, so pixels is smaller than Rows x Columns when > 0.
    reduced_by: int = 0


def read_dicom(
    source: Source,
    *,
    percentiles: tuple[float, float] = WINDOW_PERCENTILES,
    max_percentile_samples: int = 1_000_000,
    target_shape: TargetShape | None = None,
) -> DicomImage:
    """Decode the first frame of a DICOM image into display-ready gray values in [0, 1].

    Steps, in order:

    1. Parse with ``pydicom.dcmread``. Files without the 128-byte preamble and ``DICM``
       marker are accepted only if they start like a DICOM dataset and the parse finds
       real DICOM elements; anything else (PNG, text, empty file) -> ``NotDicomError``.
    2. No *Pixel Data* (SR, RT plan, encapsulated PDF, or *Float Pixel Data* which this
       reader does not handle) -> ``NoPixelDataError`` naming the SOP Class.
    3. Decode only the first frame (pydicom's decoder with ``index=0``). A transfer syntax
       without an installed decoder -> ``UnsupportedTransferSyntaxError`` saying what to
       install; pixel data shorter than Rows x Columns x frames needs (or encapsulated
       pixel data cut off by the end of the file) -> ``TruncatedPixelDataError``.
       With ``target_shape``, a grayscale JPEG 2000 image may instead be decoded at a
       reduced resolution (see ``target_shape`` below).
    4. Photometric interpretation: MONOCHROME1/2 go on; RGB and YBR_* (which pydicom
       converts to RGB) and PALETTE COLOR (after its palette) become BT.601 luminance;
       anything else -> ``UnsupportedPhotometricError``.
    5. Modality LUT or Rescale Slope/Intercept (``apply_modality_lut``), monochrome only.
    6. VOI, first of: the VOI LUT Sequence (``apply_voi``; "voi_lut"), scaled by the LUT's
       output bit depth; Window Center/Width, first value, honouring VOI LUT Function
       LINEAR/LINEAR_EXACT/SIGMOID (``apply_windowing``; "window"), scaled by the output
       range pydicom maps the window onto, so ``center - width/2`` -> 0 and
       ``center + width/2`` -> 1 (LINEAR follows the standard's half-pixel offsets, so
       ``center + width/2 - 1`` already reaches 1); else the ``percentiles`` range of the
       modality values, taken on a strided grid of at most ``max_percentile_samples``
       pixels ("percentile"). Colour images have no VOI and use the percentile range.
       An unusable window (width < 1 for LINEAR, <= 0 otherwise) falls back to
       percentiles. The result is clipped to [0, 1].
    7. MONOCHROME1 is inverted after the VOI step: ``1 - pixels``.
    8. Zero rows/columns, or an image with a single value after all this
       -> ``EmptyImageError``.

    Args:
        source: path or binary file object (read from its current position).
        percentiles: (low, high) percentiles that map to 0 and 1 when the file has
            neither VOI LUT nor window.
        max_percentile_samples: most pixels the percentiles are computed on.
        target_shape: ``target_shape(rows, cols) -> (rows, cols)`` the caller will resize
            the image to. When given, a MONOCHROME JPEG 2000 image is decoded at the
            lowest resolution level k (each level halves rows and columns, rounding up;
            at most ``MAX_J2K_REDUCTION`` and the codestream's decomposition levels) whose
            image is still at least that target and maps to the same target; ``reduced_by``
            says k. Steps 5-8 then run on the smaller image, which is finally shifted by
            (2**k - 1) / 2**(k + 1) of its pixels so that each pixel sits where an area
            average of its 2**k x 2**k block would. Anything unusual about the codestream,
            or any failure, falls back to the full-resolution decode.

    Returns:
        ``DicomImage`` with float32 ``pixels`` of shape (rows, cols), or the reduced shape.
    """
    low_pct, high_pct = _check_percentiles(percentiles)
    path = _describe(source)
    ds = _parse(source, path, stop_before_pixels=False)
    _require_pixel_data(ds, source, path)
    photometric = _check_photometric(ds, path)
    frame, decoded_photometric, reduced_by = _decode_first_frame(ds, path, target_shape)

    if photometric in _MONOCHROME:
        pixels, window_source = _monochrome_to_display(
            frame, ds, (low_pct, high_pct), max_percentile_samples, path
        )
        if reduced_by:
            pixels = _recentre(pixels, reduced_by, (int(ds.Rows), int(ds.Columns)))
    else:
        gray = _colour_to_gray(frame, ds, photometric, decoded_photometric)
        low, high = _percentile_range(gray, (low_pct, high_pct), max_percentile_samples)
        pixels = _unit_to_display(_percentile_to_unit(gray, low, high), invert=False)
        window_source = "percentile"

    if pixels.min() == pixels.max():  # zero rows/columns were rejected before decoding
        raise EmptyImageError(
            f"the image has no contrast: every pixel displays as {float(pixels.flat[0]):.3g} "
            f"after the {window_source} step",
            path,
        )
    return DicomImage(
        pixels=pixels, window_source=window_source, metadata=_header_dict(ds), reduced_by=reduced_by
    )


def read_dicom_header(source: Source) -> dict[str, str]:
    """Return ``HEADER_FIELDS`` as strings ("" when missing) without reading pixel data.

    Raises ``NotDicomError`` when ``source`` is not DICOM (same rules as ``read_dicom``).
    """
    path = _describe(source)
    ds = _parse(source, path, stop_before_pixels=True)
    return _header_dict(ds)


def is_dicom(path: str | os.PathLike) -> bool:
    """Cheap check: ``DICM`` at byte 128, or a preamble-less file that parses as DICOM."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if head[:2] not in _BARE_DATASET_STARTS:
        return False
    try:
        read_dicom_header(path)
    except (DicomReadError, OSError):
        return False
    return True


# Transfer syntaxes whose decoder (OpenJPEG) holds the GIL, so threads decode them one at a time.
GIL_BOUND_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K})


def file_transfer_syntax(path: str | os.PathLike) -> str:
    """The Transfer Syntax UID in a file's meta information; "" for non-DICOM or unreadable files."""
    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", ""))
    except Exception:  # noqa: BLE001 - PNGs, broken files: their decoding reports them
        return ""


# --- Step 1: parse --------------------------------------------------------------------------


def _describe(source: Source) -> str | None:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else None


def _check_percentiles(percentiles: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(p) for p in percentiles)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    return low, high


def _parse(source: Source, path: str | None, *, stop_before_pixels: bool) -> Dataset:
    """dcmread, then a forced read for preamble-less files that really look like DICOM."""
    start = source.tell() if hasattr(source, "read") else None
    try:
        return dcmread(source, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # no preamble / 'DICM' marker; maybe a bare dataset, checked below
    except OSError:
        raise
    except Exception as exc:  # a corrupt file can fail anywhere inside pydicom's parser
        raise _parse_error(exc, source, path) from exc

    head = _read_head(source, start, 8)
    if head[:2] not in _BARE_DATASET_STARTS:
        raise NotDicomError(
            "not a DICOM file: no 'DICM' marker at byte 128 and it does not start "
            "with a DICOM data element",
            path,
        )
    _rewind(source, start)
    try:
        ds = dcmread(source, force=True, stop_before_pixels=stop_before_pixels)
    except OSError:
        raise
    except Exception as exc:
        raise _parse_error(exc, source, path) from exc
    if not any(keyword in ds for keyword in _DATASET_EVIDENCE):
        raise NotDicomError(
            "not a DICOM file: no 'DICM' marker and no recognisable DICOM elements", path
        )
    logger.debug("%s: read without DICOM preamble/file meta", path)
    return ds


def _parse_error(exc: Exception, source: Source, path: str | None) -> DicomReadError:
    # With warnings turned into errors, pydicom's "End of file reached before delimiter"
    # warning for cut-off encapsulated pixel data arrives here as an exception.
    if _has_encapsulated_pixel_data(source):
        return _truncated_encapsulated_error(path)
    return NotDicomError(f"not a readable DICOM file ({exc})", path)


def _has_encapsulated_pixel_data(source: Source) -> bool:
    data = _read_all(source)
    return any(head in data for head in _ENCAPSULATED_PIXEL_DATA_HEADS)


def _truncated_encapsulated_error(path: str | None) -> TruncatedPixelDataError:
    return TruncatedPixelDataError(
        "the encapsulated (compressed) pixel data ends before its sequence delimiter: "
        "the file is truncated",
        path,
    )


def _rewind(source: Source, start: int | None) -> None:
    if start is not None:
        source.seek(start)


def _read_head(source: Source, start: int | None, size: int) -> bytes:
    if start is None:
        with open(source, "rb") as f:
            return f.read(size)
    source.seek(start)
    return source.read(size)


def _read_all(source: Source) -> bytes:
    if hasattr(source, "read"):
        source.seek(0)
        return source.read()
    with open(source, "rb") as f:
        return f.read()


# --- Step 2: is there pixel data at all -----------------------------------------------------


def _require_pixel_data(ds: Dataset, source: Source, path: str | None) -> None:
    if "PixelData" in ds:
        return
    sop = _sop_class(ds)
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise NoPixelDataError(
            f"{sop} holds Float/Double Float Pixel Data (parametric map), "
            "which this reader does not handle",
            path,
        )
    # When the file ends inside encapsulated pixel data, pydicom warns and drops the element
    # (often the whole dataset): the start of the element in the raw bytes gives it away.
    if _has_encapsulated_pixel_data(source):
        raise _truncated_encapsulated_error(path)
    if len(ds) == 0:
        raise NoPixelDataError(
            f"the {sop} file holds no data elements after its file meta information "
            "(the file may be truncated)",
            path,
        )
    raise NoPixelDataError(f"no pixel data: the file is a {sop} object", path)


def _sop_class(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or _file_meta(ds).get("MediaStorageSOPClassUID")
    if not uid:
        return "DICOM object without SOP Class UID"
    uid = UID(str(uid))
    return f"{uid.name} ({uid})" if uid.name != str(uid) else f"SOP Class {uid}"


# --- Step 3: decode the first frame ---------------------------------------------------------


def _file_meta(ds: Dataset) -> Dataset:
    return getattr(ds, "file_meta", None) or FileMetaDataset()


def _transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax, inferred from how it was parsed when there's no meta."""
    uid = _file_meta(ds).get("TransferSyntaxUID")
    if uid:
        return UID(str(uid))
    implicit, little = ds.original_encoding
    if implicit is not False:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian


def _decode_first_frame(
    ds: Dataset, path: str | None, target_shape: TargetShape | None = None
) -> tuple[np.ndarray, str, int]:
    """Stored values of frame 0, the photometric interpretation they came out in, and the
    JPEG 2000 resolution levels skipped (0: full resolution)."""
    tsyntax = _transfer_syntax(ds)
    if not getattr(ds, "file_meta", None):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax  # pydicom's decoders need it
    decoder = _decoder_for(tsyntax, path)

    rows, columns = ds.get("Rows"), ds.get("Columns")
    if rows is None or columns is None:
        raise DicomReadError("the image has no Rows/Columns", path, reason="decode_failed")
    if int(rows) == 0 or int(columns) == 0:
        raise EmptyImageError(f"the image has {rows} rows and {columns} columns", path)
    if not tsyntax.is_compressed:
        _check_native_length(ds, path)
    if target_shape is not None and tsyntax in _J2K_SYNTAXES:
        reduced = _decode_j2k_reduced(ds, target_shape, path)
        if reduced is not None:
            return reduced[0], str(ds.PhotometricInterpretation), reduced[1]

    try:
        frame, meta = decoder.as_array(ds, index=0, validate=True, **as_pixel_options(ds))
    except MemoryError:
        raise
    except Exception as exc:  # codecs raise RuntimeError/ValueError/AttributeError...
        raise _decode_error(exc, tsyntax, path) from exc
    return frame, str(meta.get("photometric_interpretation", ds.PhotometricInterpretation)), 0


def _decoder_for(tsyntax: UID, path: str | None):
    hint = _INSTALL_HINTS.get(tsyntax, _NO_DECODER_HINT)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"cannot decode {_syntax_label(tsyntax)}: {_NO_DECODER_HINT}",
            path,
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise UnsupportedTransferSyntaxError(
            f"cannot decode {_syntax_label(tsyntax)}: no decoder "
            f"plugin is available ({missing}); {hint}",
            path,
        )
    return decoder


def _syntax_label(tsyntax: UID) -> str:
    if tsyntax.name != str(tsyntax):
        return f"transfer syntax {tsyntax.name} ({tsyntax})"
    return f"unknown or private transfer syntax {tsyntax}"


def _check_native_length(ds: Dataset, path: str | None) -> None:
    try:
        expected = get_expected_length(ds, "bytes")
    except (AttributeError, ValueError, TypeError) as exc:
        raise DicomReadError(
            f"the Image Pixel module is incomplete ({exc})", path, reason="decode_failed"
        ) from exc
    actual = len(ds.PixelData)
    if actual < expected:
        frames = ds.get("NumberOfFrames") or 1
        raise TruncatedPixelDataError(
            f"the pixel data has {actual} bytes but {ds.Rows} x {ds.Columns} x "
            f"{ds.get('SamplesPerPixel', 1)} samples x {ds.BitsAllocated} bits x "
            f"{frames} frame(s) needs {expected}",
            path,
        )


def _decode_error(exc: Exception, tsyntax: UID, path: str | None) -> DicomReadError:
    text = str(exc)
    if "missing dependencies" in text:
        hint = _INSTALL_HINTS.get(tsyntax, _NO_DECODER_HINT)
        return UnsupportedTransferSyntaxError(
            f"cannot decode {_syntax_label(tsyntax)}: {text}; {hint}", path
        )
    if "less than expected" in text:
        return TruncatedPixelDataError(f"the pixel data is shorter than expected: {text}", path)
    return DicomReadError(
        f"could not decode the {tsyntax.name} pixel data: {text}", path, reason="decode_failed"
    )


# --- Step 3, JPEG 2000 at reduced resolution -----------------------------------------------

_J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000)
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"  # start of codestream, then the SIZ marker
_J2K_COD, _J2K_COC, _J2K_SOT = b"\xff\x52", b"\xff\x53", b"\xff\x90"
_J2K_EOC = b"\xff\xd9"
# Most levels skipped. A reduced level holds the codec's wavelet low-pass, not an area average:
# on 8-bit model inputs with a fixed window, mean |diff| against a full-resolution decode
# measured <= 0.6 gray levels at 1 level and <= 0.95 at 2, but up to 1.9 at 3 and 3.9 at 4.
MAX_J2K_REDUCTION = 2


@dataclass(frozen=True)
class _J2kHeader:
    """What the reduced decode needs from a codestream's main header (SIZ and COD)."""

    rows: int
    cols: int
    precision: int
    signed: bool
    levels: int  # wavelet decomposition levels: how many times the image can be halved


def _decode_j2k_reduced(
    ds: Dataset, target_shape: TargetShape, path: str | None
) -> tuple[np.ndarray, int] | None:
    """Frame 0 at the lowest resolution level that still covers the target, and that level.

    None means "decode at full resolution with pydicom": when no level can be skipped, when
    the image or codestream is anything but plain grayscale whose header agrees with the
    DICOM attributes (pydicom has rules for the disagreements), and when anything fails.
    """
    try:
        codestream = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames") or 1))
        header = _j2k_header(codestream)
        if header is None or not _j2k_matches_dataset(header, ds, codestream):
            return None
        levels = min(header.levels, MAX_J2K_REDUCTION)
        level = _reduction_level(header.rows, header.cols, levels, target_shape)
        if level == 0:
            return None
        return _pillow_j2k_decode(codestream, level, header, ds), level
    except Exception as exc:  # noqa: BLE001 - any failure here only costs the speed-up
        logger.debug("%s: reduced-resolution JPEG 2000 decoding failed (%r); "
                     "decoding at full resolution", path, exc)
        return None


def _j2k_header(codestream: bytes) -> _J2kHeader | None:
    """Parse SIZ and COD; None for several components, image offsets, subsampling or a COC."""
    if codestream[:4] != _J2K_SOC_SIZ:
        return None
    lsiz, _, cols, rows, x_offset, y_offset = struct.unpack_from(">HHIIII", codestream, 4)
    (components,) = struct.unpack_from(">H", codestream, 40)
    ssiz, x_step, y_step = codestream[42:45]
    if components != 1 or x_offset or y_offset or (x_step, y_step) != (1, 1):
        return None
    position = 4 + lsiz
    while codestream[position : position + 2] not in (_J2K_SOT, b""):
        marker = codestream[position : position + 2]
        (length,) = struct.unpack_from(">H", codestream, position + 2)
        if marker == _J2K_COC:  # component-specific coding: leave it to the full decoder
            return None
        if marker == _J2K_COD:  # Lcod, Scod, SGcod (4 bytes), then SPcod's level count
            levels = codestream[position + 9]
            return _J2kHeader(rows, cols, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels)
        position += 2 + length
    return None


def _j2k_matches_dataset(header: _J2kHeader, ds: Dataset, codestream: bytes) -> bool:
    """Grayscale, 8/16 bits allocated, and size, precision and sign as the DICOM header says.

    The codestream must also end with its EOC marker (give or take a few padding bytes), so
    that a cut-off one, which a reduced decode might not notice, goes to the full decoder.
    """
    return (
        str(ds.PhotometricInterpretation) in _MONOCHROME
        and int(ds.get("SamplesPerPixel") or 1) == 1
        and int(ds.BitsAllocated) in (8, 16)
        and header.precision == int(ds.BitsStored) <= int(ds.BitsAllocated)
        and header.signed == bool(int(ds.PixelRepresentation))
        and (header.rows, header.cols) == (int(ds.Rows), int(ds.Columns))
        and _J2K_EOC in codestream[-8:]
    )


def _reduced_size(size: int, level: int) -> int:
    return -(-size // 2**level)  # OpenJPEG rounds up


def _reduction_level(rows: int, cols: int, levels: int, target_shape: TargetShape) -> int:
    """The most resolution levels to skip so that the image still covers the caller's target.

    The reduced image must be at least the target in both directions and must give the same
    target (with letterboxing, rounding up can change the aspect ratio by a hair).
    """
    target = tuple(target_shape(rows, cols))
    best = 0
    for level in range(1, levels + 1):
        reduced = (_reduced_size(rows, level), _reduced_size(cols, level))
        if reduced[0] < target[0] or reduced[1] < target[1]:
            break
        if tuple(target_shape(*reduced)) == target:
            best = level
    return best


def _recentre(pixels: np.ndarray, level: int, full_shape: tuple[int, int]) -> np.ndarray:
    """Resample a reduced image onto the grid an area average of the full image would use.

    A sample at a reduced level sits on the first pixel of the 2**level x 2**level block it
    summarises; an area average sits on its block's centre, and the last block, cut short by
    the rounding up, is narrower. So pixel j takes the value at full-resolution position
    ``(j + 0.5) * full / reduced - 0.5`` (linear interpolation, the edge repeated): about
    ``j + (2**level - 1) / 2**(level + 1)`` in reduced pixels. Without this the image shifts by
    up to half a reduced pixel, more at the far edges, against a full-resolution decode.
    """
    for axis, full in enumerate(full_shape):
        size = pixels.shape[axis]
        position = ((np.arange(size) + 0.5) * (full / size) - 0.5) / 2**level
        low = np.clip(np.floor(position).astype(np.intp), 0, size - 1)
        high = np.minimum(low + 1, size - 1)
        weight = np.clip(position - low, 0.0, 1.0).astype(np.float32)
        shape = (-1, 1) if axis == 0 else (1, -1)
        below, above = np.take(pixels, low, axis=axis), np.take(pixels, high, axis=axis)
        pixels = below + weight.reshape(shape) * (above - below)
    return pixels


def _pillow_j2k_decode(codestream: bytes, level: int, header: _J2kHeader, ds: Dataset) -> np.ndarray:
    """Decode at ``level`` with Pillow's OpenJPEG and undo Pillow's 8/16-bit scaling.

    Pillow returns samples as ``(value + signed offset) << (8 or 16 - precision)``, which is
    exact to undo; the result has the dtype pydicom would give (uint/int 8/16).
    """
    from PIL import Image  # only this path needs Pillow

    rows, cols = _reduced_size(header.rows, level), _reduced_size(header.cols, level)
    with Image.open(io.BytesIO(codestream), formats=["JPEG2000"]) as image:
        # Pillow sizes a reduced image by rounding to nearest, OpenJPEG rounds up (and Pillow
        # then rejects its tiles). Nominal sizes of (reduced size << level) round to the same.
        image._size = (cols << level, rows << level)
        image.reduce = level
        image.load()
        samples = np.asarray(image)
    if samples.shape != (rows, cols) or samples.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"Pillow returned {samples.dtype} {samples.shape}, expected {(rows, cols)}")
    values = samples.astype(np.int32) >> (8 * samples.itemsize - header.precision)
    if header.signed:
        values -= 1 << (header.precision - 1)
    kind = "int" if header.signed else "uint"
    return values.astype(f"{kind}{int(ds.BitsAllocated)}")


# --- Step 4: photometric interpretation -----------------------------------------------------


def _check_photometric(ds: Dataset, path: str | None) -> str:
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    if not photometric and int(ds.get("SamplesPerPixel") or 1) == 1:
        logger.debug("%s: no Photometric Interpretation, assuming MONOCHROME2", path)
        photometric = "MONOCHROME2"
    if photometric in _MONOCHROME or photometric in ("RGB", "PALETTE COLOR"):
        ds.PhotometricInterpretation = photometric
        return photometric
    if photometric.startswith("YBR_"):
        return photometric
    raise UnsupportedPhotometricError(
        f"unsupported Photometric Interpretation {photometric or '(missing)'!r}; expected "
        "MONOCHROME1, MONOCHROME2, RGB, YBR_* or PALETTE COLOR",
        path,
    )


def _colour_to_gray(
    frame: np.ndarray, ds: Dataset, photometric: str, decoded_photometric: str
) -> np.ndarray:
    """Luminance of a colour frame: palette applied first; YBR left unconverted keeps Y."""
    if photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
        decoded_photometric = "RGB"
    if frame.ndim == 2:
        return frame.astype(np.float64)
    if decoded_photometric.startswith("YBR_"):
        return frame[..., 0].astype(np.float64)  # Y is the luminance already
    return frame[..., :3].astype(np.float64) @ _LUMA_WEIGHTS


# --- Steps 5-7 for grayscale, through a table ----------------------------------------------

# A table pays when the image has this many times more pixels than the table has entries.
_MIN_PIXELS_PER_TABLE_ENTRY = 4
_LOOKUP_BLOCK = 128 * 1024  # pixels looked up at a time


def _monochrome_to_display(
    frame: np.ndarray,
    ds: Dataset,
    percentiles: tuple[float, float],
    max_samples: int,
    path: str | None,
) -> tuple[np.ndarray, str]:
    """Steps 5-7 for a grayscale frame: float32 display values in [0, 1] and the VOI source.

    Modality LUT/rescale, VOI, clipping and the MONOCHROME1 inversion depend on the stored
    value alone (the percentile range comes from the whole image first). For 8- and 16-bit
    frames they run, in float64 as always, on every value the dtype can hold (at most 65,536)
    and the frame is mapped through that table: the very same numbers as running them on
    every pixel, for one lookup per pixel instead of several float64 passes over it.
    """
    domain = _table_domain(frame)
    values = _modality_values(frame if domain is None else domain, ds, path)

    def percentile_range() -> tuple[float, float]:
        return _percentile_range(
            frame, percentiles, max_samples, lambda stored: _modality_values(stored, ds, path)
        )

    with np.errstate(over="ignore"):  # SIGMOID far from its centre: exp overflows to the limit
        unit, window_source = _voi_to_unit(values, ds, percentile_range)
    display = _unit_to_display(unit, invert=ds.PhotometricInterpretation == "MONOCHROME1")
    if domain is None:
        return display, window_source
    return _lookup(display, frame.view(f"u{frame.itemsize}")), window_source


def _table_domain(frame: np.ndarray) -> np.ndarray | None:
    """Every value of the frame's integer dtype, indexed by its unsigned bit pattern.

    None when a table does not pay: not 8/16-bit native integers, or a small image.
    """
    dtype = frame.dtype
    if dtype.kind not in "iu" or dtype.itemsize > 2 or not dtype.isnative:
        return None
    domain = np.arange(2 ** (8 * dtype.itemsize), dtype=f"u{dtype.itemsize}").view(dtype)
    return domain if frame.size >= _MIN_PIXELS_PER_TABLE_ENTRY * domain.size else None


def _lookup(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[index]`` for a 2-D index, a block of rows at a time.

    NumPy first widens a whole index array to 64-bit; block by block that stays in the CPU
    cache, which makes the lookup about twice as fast on a 2000 x 2500 image.
    """
    out = np.empty(index.shape, table.dtype)
    step = max(1, _LOOKUP_BLOCK // max(1, index.shape[1]))
    for start in range(0, index.shape[0], step):
        rows = slice(start, start + step)
        np.take(table, index[rows], out=out[rows], mode="clip")  # every index is in range
    return out


def _unit_to_display(unit: np.ndarray, *, invert: bool) -> np.ndarray:
    """Clip to [0, 1], float32, and ``1 - x`` for MONOCHROME1 (after the VOI step)."""
    pixels = np.clip(unit, 0.0, 1.0).astype(np.float32)
    return 1.0 - pixels if invert else pixels


# --- Step 5: modality LUT -------------------------------------------------------------------


def _modality_values(frame: np.ndarray, ds: Dataset, path: str | None) -> np.ndarray:
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds and ds[keyword].value in (None, ""):
            logger.debug("%s: empty %s ignored", path, keyword)
            del ds[keyword]
    try:
        return apply_modality_lut(frame, ds)
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DicomReadError(
            f"could not apply the Modality LUT / rescale ({exc})",
            path,
            reason="invalid_modality_lut",
        ) from exc


# --- Step 6: VOI ----------------------------------------------------------------------------


def _voi_to_unit(
    values: np.ndarray,
    ds: Dataset,
    percentile_range: Callable[[], tuple[float, float]],
) -> tuple[np.ndarray, str]:
    """Map modality values to [0, 1]-ish (clipped later) and say which VOI did it.

    ``percentile_range()`` gives the (low, high) modality values for the fallback; it is
    only called when there is neither a usable VOI LUT nor window.
    """
    if ds.get("VOILUTSequence"):
        try:
            return _voi_lut_to_unit(values, ds), "voi_lut"
        except (ValueError, TypeError, AttributeError, IndexError, NotImplementedError) as exc:
            logger.debug("unusable VOI LUT Sequence (%s); trying the window", exc)
    if _usable_window(ds):
        return _window_to_unit(values, ds), "window"
    return _percentile_to_unit(values, *percentile_range()), "percentile"


def _voi_lut_to_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries, first_mapped, bits = (int(v) for v in descriptor)
    entries = entries or 2**16
    # The LUT is indexed by integers; clipping to its input range first is what apply_voi
    # does anyway, and keeps large values from wrapping in its unsigned index array.
    lut_input = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1)
    out = apply_voi(lut_input.astype(np.int64), ds, index=0)
    return out.astype(np.float64) / (2**bits - 1)


def _usable_window(ds: Dataset) -> bool:
    center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if center is None or width is None:
        return False
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        logger.debug("unknown VOI LUT Function %r; using percentiles", function)
        return False
    min_width_ok = width >= 1 if function == "LINEAR" else width > 0
    if not min_width_ok:
        logger.debug("window width %s is invalid for %s; using percentiles", width, function)
    return min_width_ok


def _first_value(value) -> float | None:
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _window_to_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """apply_windowing, then divide by the output range it maps the window onto.

    pydicom puts values below the window at its y_min and above at y_max, which depend on
    Bits Stored, Pixel Representation, rescale and Modality LUT. Instead of repeating that
    rule, window two values far outside the window and read y_min/y_max off the result.
    """
    center = _first_value(ds.WindowCenter)
    width = _first_value(ds.WindowWidth)
    probe = np.array([center - 64 * width, center + 64 * width])
    y_min, y_max = apply_windowing(probe, ds, index=0)
    windowed = apply_windowing(values, ds, index=0)
    return (windowed - y_min) / (y_max - y_min)


def _percentile_range(
    image: np.ndarray,
    percentiles: tuple[float, float],
    max_samples: int,
    to_values: Callable[[np.ndarray], np.ndarray] = np.asarray,
) -> tuple[float, float]:
    """The (low, high) percentiles of ``to_values(image)`` on a grid subsample of the image;
    the full min-max if that range is empty. ``to_values`` is elementwise (modality LUT)."""
    low, high = np.percentile(to_values(_grid_sample(image, max_samples)), percentiles)
    if not high > low:
        values = to_values(image)
        low, high = values.min(), values.max()
    return float(low), float(high)


def _percentile_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] to [0, 1]; all zeros when the range is empty (a constant image)."""
    if not high > low:
        return np.zeros(values.shape)  # constant: reported as EmptyImageError by the caller
    return (values.astype(np.float64) - low) / (high - low)


def _grid_sample(values: np.ndarray, max_samples: int) -> np.ndarray:
    """At most ``max_samples`` pixels on a regular grid (same stride along both axes)."""
    stride = max(1, math.ceil(math.sqrt(values.size / max(1, max_samples))))
    return values[::stride, ::stride]


# --- Metadata -------------------------------------------------------------------------------


def _header_dict(ds: Dataset) -> dict[str, str]:
    file_meta = _file_meta(ds)
    fallbacks = {
        "SOPClassUID": file_meta.get("MediaStorageSOPClassUID"),
        "SOPInstanceUID": file_meta.get("MediaStorageSOPInstanceUID"),
    }
    header = {}
    for keyword in HEADER_FIELDS:
        if keyword == "TransferSyntaxUID":
            header[keyword] = str(_transfer_syntax(ds))
            continue
        try:
            value = ds.get(keyword)
        except (ValueError, TypeError) as exc:
            logger.debug("unreadable %s (%s)", keyword, exc)
            value = None
        if value in (None, "") and keyword in fallbacks:
            value = fallbacks[keyword]
        header[keyword] = _as_text(value)
    return header


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)
