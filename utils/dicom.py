"""Read a DICOM X-ray into a float image as a viewer would display it.

``read_dicom`` is the one entry point for pixels; ``read_dicom_header`` reads the few header
fields the project uses without decoding pixels; ``is_dicom`` is a cheap file-type check.

Everything that cannot be read raises a subclass of ``DicomReadError`` (a ``ValueError``)
whose ``reason`` is a short code, so callers can count and report failures by kind. The
subclasses cover the expected cases; the base class itself is raised with
``reason="decode_failed"`` when a codec rejects the data or the Image Pixel module is
unusable (e.g. no Rows), and ``reason="invalid_modality_lut"`` when the Modality LUT
cannot be applied. A missing file is not a DICOM problem: ``FileNotFoundError`` and other
``OSError``s propagate unchanged.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
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


def read_dicom(
    source: Source,
    *,
    percentiles: tuple[float, float] = WINDOW_PERCENTILES,
    max_percentile_samples: int = 1_000_000,
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

    Returns:
        ``DicomImage`` with float32 ``pixels`` of shape (rows, cols).
    """
    low_pct, high_pct = _check_percentiles(percentiles)
    path = _describe(source)
    ds = _parse(source, path, stop_before_pixels=False)
    _require_pixel_data(ds, source, path)
    photometric = _check_photometric(ds, path)
    frame, decoded_photometric = _decode_first_frame(ds, path)

    if photometric in _MONOCHROME:
        values = _modality_values(frame, ds, path)
        unit, window_source = _voi_to_unit(
            values, ds, (low_pct, high_pct), max_percentile_samples
        )
    else:
        gray = _colour_to_gray(frame, ds, photometric, decoded_photometric)
        unit = _percentile_to_unit(gray, low_pct, high_pct, max_percentile_samples)
        window_source = "percentile"

    pixels = np.clip(unit, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    if pixels.min() == pixels.max():  # zero rows/columns were rejected before decoding
        raise EmptyImageError(
            f"the image has no contrast: every pixel displays as {float(pixels.flat[0]):.3g} "
            f"after the {window_source} step",
            path,
        )
    return DicomImage(pixels=pixels, window_source=window_source, metadata=_header_dict(ds))


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


def _decode_first_frame(ds: Dataset, path: str | None) -> tuple[np.ndarray, str]:
    """Stored values of frame 0 and the photometric interpretation they came out in."""
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

    try:
        frame, meta = decoder.as_array(ds, index=0, validate=True, **as_pixel_options(ds))
    except MemoryError:
        raise
    except Exception as exc:  # codecs raise RuntimeError/ValueError/AttributeError...
        raise _decode_error(exc, tsyntax, path) from exc
    return frame, str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))


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
    percentiles: tuple[float, float],
    max_samples: int,
) -> tuple[np.ndarray, str]:
    """Map modality values to [0, 1]-ish (clipped later) and say which VOI did it."""
    if ds.get("VOILUTSequence"):
        try:
            return _voi_lut_to_unit(values, ds), "voi_lut"
        except (ValueError, TypeError, AttributeError, IndexError, NotImplementedError) as exc:
            logger.debug("unusable VOI LUT Sequence (%s); trying the window", exc)
    if _usable_window(ds):
        return _window_to_unit(values, ds), "window"
    return _percentile_to_unit(values, *percentiles, max_samples), "percentile"


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


def _percentile_to_unit(
    values: np.ndarray, low_pct: float, high_pct: float, max_samples: int
) -> np.ndarray:
    """Map the [low, high] percentile range to [0, 1]; full min-max if that range is empty."""
    sample = _grid_sample(values, max_samples)
    low, high = np.percentile(sample, [low_pct, high_pct])
    if not high > low:
        low, high = float(values.min()), float(values.max())
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
