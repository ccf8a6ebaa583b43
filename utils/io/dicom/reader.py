"""The public functions: ``read_dicom``, ``read_dicom_header``, ``is_dicom``.

See the package docstring for the contract: for anything about a file's content they raise
only ``DicomReadError`` (or return False / "").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from utils.constants import MAX_IMAGE_PIXELS, WINDOW_PERCENTILES

from .colour import COLOUR_SHARE_KEY, MONOCHROME, check_photometric, colour_to_gray
from .decode import decode_first_frame
from .errors import DicomReadError, EmptyImageError, contained
from .grayscale import (
    monochrome_to_display,
    percentile_range_of,
    percentile_to_unit,
    stored_values_per_gray_level,
    unit_to_display,
)
from .j2k import TargetShape, recentre
from .parse import (
    BARE_DATASET_STARTS,
    Source,
    describe,
    file_meta,
    open_source,
    parse,
    require_pixel_data,
    transfer_syntax,
)
from .pixel_module import read_pixel_module

logger = logging.getLogger(__name__)

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

@dataclass(frozen=True)
class DicomImage:
    """A decoded image: ``pixels`` in [0, 1] as displayed (bone bright), how it was windowed."""

    pixels: np.ndarray  # float32, (rows, cols), 0 = black, 1 = white as displayed
    window_source: str  # "voi_lut" | "window" | "percentile"
    metadata: dict[str, str]  # HEADER_FIELDS, "" where the tag is missing
    # JPEG 2000 resolution levels skipped when decoding (see read_dicom's target_shape); each
    # halves rows and columns, rounding up, so pixels is smaller than Rows x Columns when > 0.
    reduced_by: int = 0
    # What turned the pixel data into stored values: "native" (uncompressed), pydicom's plugin
    # ("pylibjpeg", "pillow", "pyjpegls", "pydicom" for RLE), "gdcm" (the fallback, after the
    # others failed), "openjp2"/"pillow" (a reduced JPEG 2000 decode).
    decoder: str = ""


def read_dicom(
    source: Source,
    *,
    percentiles: tuple[float, float] = WINDOW_PERCENTILES,
    max_percentile_samples: int = 1_000_000,
    target_shape: TargetShape | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> DicomImage:
    """Decode the first frame of a DICOM image into display-ready gray values in [0, 1].

    Steps, in order:

    1. Parse with ``pydicom.dcmread``. Files without the 128-byte preamble and ``DICM``
       marker are accepted only if they start like a DICOM dataset and the parse finds
       real DICOM elements; anything else (PNG, text, empty file) -> ``NotDicomError``.
       A file with the marker whose elements cannot be parsed -> ``malformed_dicom``.
    2. No *Pixel Data* (SR, RT plan, encapsulated PDF, or *Float Pixel Data* which this
       reader does not handle) -> ``NoPixelDataError`` naming the SOP Class. But an Image
       Pixel module (Rows, Columns, Bits Allocated) without Pixel Data, or an image file that
       ends inside its header, was cut off -> ``TruncatedPixelDataError``.
    3. Check the Image Pixel module (Rows, Columns, Samples per Pixel, Bits Allocated/Stored,
       Pixel Representation, Number of Frames: one integer each, in range, else
       ``invalid_pixel_module``; zero rows/columns -> ``EmptyImageError``) and the size of one
       frame against ``max_pixels`` (``image_too_large``), before anything is allocated.
       Then decode only the first frame (pydicom's decoder with ``index=0``; its plugins but
       GDCM, and GDCM only as a fallback for a compressed frame they all refuse, e.g. 12-bit
       JPEG Extended with a scan header of Se = 0; see ``fallback``). A transfer
       syntax without an installed decoder -> ``UnsupportedTransferSyntaxError`` saying what
       to install; pixel data shorter than Rows x Columns x frames needs (or encapsulated
       pixel data cut off by the end of the file) -> ``TruncatedPixelDataError``. Compressed
       frame 0 is checked first: its own declared size (JPEG/JPEG-LS frame header, JPEG 2000
       SIZ, RLE segment table) must be well formed and match the header (``decode_failed``)
       and the budget (``image_too_large``), and a frame of 16 MiB or more decoded must not
       come from a codestream more than 500:1 smaller (``implausible_compression``).
       With ``target_shape``, a grayscale JPEG 2000 image may instead be decoded at a
       reduced resolution (see ``target_shape`` below).
    4. Photometric interpretation: MONOCHROME1/2 go on; RGB and YBR_* (which pydicom
       converts to RGB) and PALETTE COLOR (after its palette; ``invalid_palette`` when it
       cannot be applied) become BT.601 luminance; anything else
       -> ``UnsupportedPhotometricError``.
    5. Modality LUT or Rescale Slope/Intercept (``apply_modality_lut``), monochrome only;
       ``invalid_modality_lut`` when it cannot be applied or gives non-finite values.
    6. VOI, first of: the VOI LUT Sequence (``apply_voi``; "voi_lut"), scaled by the LUT's
       output bit depth; Window Center/Width, first value, honouring VOI LUT Function
       LINEAR/LINEAR_EXACT/SIGMOID (``apply_windowing``; "window"), scaled by the output
       range pydicom maps the window onto, so ``center - width/2`` -> 0 and
       ``center + width/2`` -> 1 (LINEAR follows the standard's half-pixel offsets, so
       ``center + width/2 - 1`` already reaches 1); else the ``percentiles`` range of the
       modality values, taken on a strided grid of at most ``max_percentile_samples``
       pixels ("percentile"). Colour images have no VOI and use the percentile range.
       An unusable window (width < 1 for LINEAR, <= 0 otherwise) falls back to
       percentiles, and so does a VOI LUT or window that cannot be applied (after the VOI
       LUT, the window is tried). The result is clipped to [0, 1].
    7. MONOCHROME1 is inverted after the VOI step: ``1 - pixels``.
    8. An image with a single value after all this -> ``EmptyImageError``.

    Errors: for anything about the file's content only ``DicomReadError`` subclasses, with a
    ``reason`` from ``utils.io.dicom.REASONS``, whatever pydicom or a codec raises: exceptions,
    panics of compiled plugins (``codec_panic``), ``MemoryError`` (``out_of_memory``),
    ``RecursionError`` and warnings turned into errors. An ``OSError`` that carries an errno
    (missing file, permission, disk error) propagates unchanged, as do a file object that
    cannot seek (``io.UnsupportedOperation``), KeyboardInterrupt and SystemExit. A bad ``percentiles`` or ``max_pixels`` argument is a plain ``ValueError``.

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
            average of its 2**k x 2**k block would. When only one side could lose level
            k + 1 too, level k keeps just the detail the other side needs (``j2k.thinning``).
            Anything unusual about the codestream, or any failure, falls back to the
            full-resolution decode.
        max_pixels: the most samples (Rows x Columns x Samples per Pixel) one frame may
            declare, in the DICOM header or in its codestream; more -> ``image_too_large``.

    Returns:
        ``DicomImage`` with float32 ``pixels`` of shape (rows, cols), or the reduced shape.
    """
    low_pct, high_pct = _check_percentiles(percentiles)
    if int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be at least 1, got {max_pixels}")
    path = describe(source)
    with contained(path, "read the DICOM file"):
        return _read(source, path, (low_pct, high_pct), max_percentile_samples, target_shape, int(max_pixels))


def _read(
    source: Source,
    path: str | None,
    percentiles: tuple[float, float],
    max_samples: int,
    target_shape: TargetShape | None,
    max_pixels: int,
) -> DicomImage:
    with open_source(source) as view:
        ds = parse(view, path, stop_before_pixels=False)
        require_pixel_data(ds, view, path)
    photometric = check_photometric(ds, path)
    metadata = header_dict(ds)  # before decoding, which may normalise values in ds
    module = read_pixel_module(ds, photometric, path, max_pixels)
    with contained(path, "read the transfer syntax"):
        tsyntax = transfer_syntax(ds)

    def gray_step(coarse):  # how much a reduced JPEG 2000 decode may leave out
        return stored_values_per_gray_level(ds, coarse, percentiles, max_samples, path)

    frame, decoded_photometric, reduced_by, decoder = decode_first_frame(
        ds, module, tsyntax, path, max_pixels, target_shape, gray_step if photometric in MONOCHROME else None)

    if photometric in MONOCHROME:
        pixels, window_source = monochrome_to_display(frame, ds, percentiles, max_samples, path)
        if reduced_by:
            pixels = recentre(pixels, reduced_by, (module.rows, module.columns))
    else:
        gray, share = colour_to_gray(frame, ds, photometric, decoded_photometric, path, module.bits_stored)
        metadata[COLOUR_SHARE_KEY] = f"{share:.4f}"  # a colour image is not a radiograph: the engine's OOD check
        low, high = percentile_range_of(gray, percentiles, max_samples)
        pixels = unit_to_display(percentile_to_unit(gray, low, high), invert=False)
        window_source = "percentile"

    if pixels.ndim != 2:
        raise DicomReadError(f"the decoded image has shape {pixels.shape}, not rows x columns", path,
                             reason="decode_failed")
    if pixels.min() == pixels.max():  # zero rows/columns were rejected before decoding
        raise EmptyImageError(
            f"the image has no contrast: every pixel displays as {float(pixels.flat[0]):.3g} "
            f"after the {window_source} step",
            path,
        )
    return DicomImage(pixels=pixels, window_source=window_source, metadata=metadata, reduced_by=reduced_by,
                      decoder=decoder)


def read_dicom_header(source: Source) -> dict[str, str]:
    """Return ``HEADER_FIELDS`` as strings ("" when missing or unreadable) without reading
    pixel data.

    Raises ``NotDicomError`` when ``source`` is not DICOM (same rules as ``read_dicom``), and
    for any other problem with the content only ``DicomReadError`` (see ``read_dicom``).
    """
    path = describe(source)
    with contained(path, "read the DICOM header"):
        with open_source(source) as view:
            ds = parse(view, path, stop_before_pixels=True)
        return header_dict(ds)


def is_dicom(path: str | os.PathLike) -> bool:
    """Cheap check: ``DICM`` at byte 128, or a preamble-less file that parses as DICOM."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if head[:2] not in BARE_DATASET_STARTS:
        return False
    try:
        read_dicom_header(path)
    except (DicomReadError, OSError):
        return False
    return True


def _check_percentiles(percentiles: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(p) for p in percentiles)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    return low, high


# --- Metadata -------------------------------------------------------------------------------


def header_dict(ds: Dataset) -> dict[str, str]:
    """``HEADER_FIELDS`` as text; "" for missing elements and for values pydicom cannot convert."""
    meta = file_meta(ds)
    header = {}
    for keyword in HEADER_FIELDS:
        if keyword == "TransferSyntaxUID":
            header[keyword] = _as_text(_readable(lambda: transfer_syntax(ds), keyword))
            continue
        value = _readable(lambda key=keyword: ds.get(key), keyword)
        if value in (None, "") and keyword in ("SOPClassUID", "SOPInstanceUID"):
            value = _readable(lambda key=keyword: meta.get(f"MediaStorage{key}"), keyword)
        header[keyword] = _as_text(value)
    return header


def _readable(get, keyword: str):
    """``get()``, or None (logged) when pydicom cannot convert the value."""
    try:
        return get()
    except Exception as exc:  # one unreadable field does not make the file unreadable
        if isinstance(exc, MemoryError):
            raise
        logger.debug("unreadable %s (%r)", keyword, exc)
        return None


def _as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value)
    return str(value)
