"""Steps 5-7 for grayscale frames: modality LUT / rescale, VOI, clipping, MONOCHROME1.

They depend on the stored value alone, so for 8- and 16-bit frames they run once over every
value the dtype can hold (at most 65,536) and the frame is mapped through that table: the same
numbers, bit for bit, as running them on every pixel. The percentile range (the VOI fallback)
comes from a strided subsample of the whole image first.

Header values pydicom cannot use never escape as bare exceptions: a VOI LUT Sequence that
cannot be applied falls back to the window, a window that cannot be applied to the
percentiles, and a Modality LUT or rescale that cannot be applied is ``invalid_modality_lut``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing

from .errors import DicomReadError, contained, passes_through

logger = logging.getLogger(__name__)

# A table pays when the image has this many times more pixels than the table has entries.
_MIN_PIXELS_PER_TABLE_ENTRY = 4
_LOOKUP_BLOCK = 128 * 1024  # pixels looked up at a time


def monochrome_to_display(
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
        return percentile_range_of(
            frame, percentiles, max_samples, lambda stored: _modality_values(stored, ds, path)
        )

    with np.errstate(over="ignore"):  # SIGMOID far from its centre: exp overflows to the limit
        unit, window_source = _voi_to_unit(values, ds, percentile_range, path)
    display = unit_to_display(unit, invert=ds.PhotometricInterpretation == "MONOCHROME1")
    if np.isnan(display).any():  # the table, when there is one: every value the image can hold
        raise DicomReadError(
            "the Modality LUT / Rescale Slope and Intercept give values that are not numbers",
            path,
            reason="invalid_modality_lut",
        )
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


def unit_to_display(unit: np.ndarray, *, invert: bool) -> np.ndarray:
    """Clip to [0, 1], float32, and ``1 - x`` for MONOCHROME1 (after the VOI step)."""
    pixels = np.clip(unit, 0.0, 1.0).astype(np.float32)
    return 1.0 - pixels if invert else pixels


# --- Step 5: modality LUT -------------------------------------------------------------------


def _modality_values(frame: np.ndarray, ds: Dataset, path: str | None) -> np.ndarray:
    with contained(path, "apply the Modality LUT / Rescale Slope and Intercept", reason="invalid_modality_lut"):
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if keyword in ds and ds[keyword].value in (None, ""):
                logger.debug("%s: empty %s ignored", path, keyword)
                del ds[keyword]
            elif keyword in ds and not _finite_or_unreadable(ds[keyword].value):
                raise ValueError(f"{keyword} is {ds[keyword].value!r}, not a finite number")
        return apply_modality_lut(frame, ds)


def _finite_or_unreadable(value) -> bool:
    """False only for a number that is NaN or infinite (anything else is apply_modality_lut's to judge)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


# --- Step 6: VOI ----------------------------------------------------------------------------


def _voi_to_unit(
    values: np.ndarray,
    ds: Dataset,
    percentile_range: Callable[[], tuple[float, float]],
    path: str | None = None,
) -> tuple[np.ndarray, str]:
    """Map modality values to [0, 1]-ish (clipped later) and say which VOI did it.

    ``percentile_range()`` gives the (low, high) modality values for the fallback; it is
    only called when there is neither a usable VOI LUT nor window. A VOI LUT or window that
    cannot be applied (bad descriptor, short data, non-numeric values...) is skipped.
    """
    if _present(ds, "VOILUTSequence", path):
        try:
            return _voi_lut_to_unit(values, ds), "voi_lut"
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to the window
            _reraise_resource_errors(exc)
            logger.debug("%s: unusable VOI LUT Sequence (%r); trying the window", path, exc)
    if _usable_window(ds, path):
        try:
            return _window_to_unit(values, ds), "window"
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to percentiles
            _reraise_resource_errors(exc)
            logger.debug("%s: window cannot be applied (%r); using percentiles", path, exc)
    return percentile_to_unit(values, *percentile_range()), "percentile"


def _present(ds: Dataset, keyword: str, path: str | None):
    """``ds.get(keyword)``, or None (logged) when pydicom cannot convert its value."""
    try:
        return ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - an unreadable optional element counts as absent
        _reraise_resource_errors(exc)
        logger.debug("%s: unreadable %s (%r) ignored", path, keyword, exc)
        return None


def _reraise_resource_errors(exc: Exception) -> None:
    if isinstance(exc, (MemoryError, RecursionError)) or passes_through(exc):
        raise exc


def _voi_lut_to_unit(values: np.ndarray, ds: Dataset) -> np.ndarray:
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries, first_mapped, bits = (int(v) for v in descriptor)
    entries = entries or 2**16
    if not 1 <= bits <= 32:
        raise ValueError(f"VOI LUT output of {bits} bits")
    # The LUT is indexed by integers; clipping to its input range first is what apply_voi
    # does anyway, and keeps large values from wrapping in its unsigned index array.
    lut_input = np.clip(np.rint(values), first_mapped, first_mapped + entries - 1)
    out = apply_voi(lut_input.astype(np.int64), ds, index=0)
    return out.astype(np.float64) / (2**bits - 1)


def _usable_window(ds: Dataset, path: str | None = None) -> bool:
    center = _first_value(_present(ds, "WindowCenter", path))
    width = _first_value(_present(ds, "WindowWidth", path))
    if center is None or width is None:
        return False
    function = str(_present(ds, "VOILUTFunction", path) or "LINEAR").strip().upper()
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
    if not (math.isfinite(y_min) and math.isfinite(y_max) and y_max > y_min):
        raise ValueError(f"the window maps onto [{y_min}, {y_max}]")
    windowed = apply_windowing(values, ds, index=0)
    return (windowed - y_min) / (y_max - y_min)


def percentile_range_of(
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


def percentile_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] to [0, 1]; all zeros when the range is empty (a constant image)."""
    if not high > low:
        return np.zeros(values.shape)  # constant: reported as EmptyImageError by the caller
    return (values.astype(np.float64) - low) / (high - low)


def _grid_sample(values: np.ndarray, max_samples: int) -> np.ndarray:
    """At most ``max_samples`` pixels on a regular grid (same stride along both axes)."""
    stride = max(1, math.ceil(math.sqrt(values.size / max(1, max_samples))))
    return values[::stride, ::stride]


# --- How fine the display steps are: what a reduced JPEG 2000 decode may leave out ------------


def stored_values_per_gray_level(
    ds: Dataset,
    coarse: Callable[[], np.ndarray],
    percentiles: tuple[float, float],
    max_samples: int,
    path: str | None = None,
) -> float | None:
    """How many stored values make one of the 256 display gray levels where steps 5-6 are
    steepest; None when that cannot be told before decoding (a Modality LUT Sequence, or any
    header value these steps would not use).

    The VOI comes from where ``_voi_to_unit`` takes it: a VOI LUT's largest step, the window
    width (a sigmoid is no steeper at its centre than the linear window), or for the percentile
    window the range of ``coarse()``, the image at a low resolution level, whose averaged pixels
    span a narrower range than the full image's (so the estimate errs towards finer steps).
    """
    try:
        if "ModalityLUTSequence" in ds:
            return None
        slope = abs(float(_first_value(_present(ds, "RescaleSlope", path)) or 1.0))
        if not slope:
            return None
        if _present(ds, "VOILUTSequence", path):
            item = ds.VOILUTSequence[0]
            bits = int(item.LUTDescriptor[2])
            steepest = float(np.abs(np.diff(np.asarray(item.LUTData, dtype=np.float64))).max()) / (2**bits - 1)
            return 1.0 / (255.0 * steepest * slope) if steepest > 0 else None
        if _usable_window(ds, path):
            return _first_value(ds.WindowWidth) / 255.0 / slope
        low, high = percentile_range_of(coarse(), percentiles, max_samples, lambda stored: _modality_values(stored, ds, path))
        return (high - low) / 255.0 / slope if high > low else None
    except Exception as exc:  # noqa: BLE001 - unknown here only means nothing is left out
        _reraise_resource_errors(exc)
        logger.debug("%s: display step unknown (%r)", path, exc)
        return None
