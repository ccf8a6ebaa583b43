"""The Image Pixel module, checked before anything is allocated or decoded.

``read_pixel_module`` turns Rows, Columns, Samples per Pixel, Bits Allocated/Stored, Pixel
Representation, Number of Frames and Planar Configuration into plain integers, refusing values
that are missing, multi-valued, non-integer or out of range (``invalid_pixel_module``) and
frames above the pixel budget (``image_too_large``). The decoder then gets these numbers, not
whatever the header held.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .errors import (
    EmptyImageError,
    ImageTooLargeError,
    InvalidPixelModuleError,
    MalformedDicomError,
    TruncatedPixelDataError,
    exception_label,
)

_MAX_FRAMES = 2**31 - 1  # Number of Frames is an IS: at most 2**31 - 1
_INTEGER_TEXT = re.compile(r"\s*[+-]?\d{1,12}\s*")
_MISSING = object()


@dataclass(frozen=True)
class PixelModule:
    """The Image Pixel attributes the decoder needs, as checked integers."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    frames: int
    planar_configuration: int
    photometric: str

    @property
    def frame_pixels(self) -> int:
        """Samples in one frame: Rows x Columns x Samples per Pixel."""
        return self.rows * self.columns * self.samples

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame (whole bytes per sample, as decoders return them)."""
        return self.frame_pixels * max(1, math.ceil(self.bits_allocated / 8))

    def native_length(self) -> int:
        """Bytes of uncompressed Pixel Data for all frames (pydicom's get_expected_length)."""
        length = self.frame_pixels * self.frames
        if self.bits_allocated == 1:
            length = length // 8 + (length % 8 > 0)
        else:
            length *= self.bits_allocated // 8
        if self.photometric == "YBR_FULL_422":
            length = length // 3 * 2
        return length

    def decoding_options(self) -> dict[str, int | str]:
        """pydicom decoding options that replace the header's own values."""
        options: dict[str, int | str] = {
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples,
            "bits_allocated": self.bits_allocated,
            "bits_stored": self.bits_stored,
            "pixel_representation": self.pixel_representation,
            "number_of_frames": self.frames,
            "photometric_interpretation": self.photometric,
        }
        if self.samples > 1:
            options["planar_configuration"] = self.planar_configuration
        return options


def read_pixel_module(ds: Dataset, photometric: str, path: str | None, max_pixels: int) -> PixelModule:
    """Check the Image Pixel module of ``ds``; see the module docstring."""
    rows = _integer(ds, "Rows", path, range(2**16))
    columns = _integer(ds, "Columns", path, range(2**16))
    if rows is None or columns is None:
        raise InvalidPixelModuleError("the image has no Rows/Columns", path)
    if rows == 0 or columns == 0:
        raise EmptyImageError(f"the image has {rows} rows and {columns} columns", path)
    samples = _integer(ds, "SamplesPerPixel", path, (1, 3))
    samples = 1 if samples is None else samples
    if rows * columns * samples > max_pixels:
        raise ImageTooLargeError(
            f"the image is {rows} x {columns} pixels x {samples} sample(s) per pixel, "
            f"above the limit of {max_pixels:,} samples per frame",
            path,
        )
    bits_allocated = _integer(ds, "BitsAllocated", path, (1, 8, 16, 32, 64))
    if bits_allocated is None:
        raise InvalidPixelModuleError("the image has no Bits Allocated", path)
    bits_stored = _integer(ds, "BitsStored", path, range(1, bits_allocated + 1))
    representation = _integer(ds, "PixelRepresentation", path, (0, 1))
    frames = _integer(ds, "NumberOfFrames", path, range(_MAX_FRAMES + 1))
    planar = _integer(ds, "PlanarConfiguration", path, (0, 1)) if samples > 1 else 0
    if photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR") and samples != 1:
        raise InvalidPixelModuleError(
            f"a {photometric} image must have 1 sample per pixel, the header says {samples}", path
        )
    return PixelModule(
        rows=rows,
        columns=columns,
        samples=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_allocated if bits_stored is None else bits_stored,
        pixel_representation=representation or 0,
        frames=frames or 1,  # absent, empty or 0: one frame, as pydicom assumes
        planar_configuration=planar or 0,
        photometric=photometric,
    )


def _integer(ds: Dataset, keyword: str, path: str | None, allowed) -> int | None:
    """A single integer value in ``allowed``; None when absent or empty."""
    value = element_value(ds, keyword, path)
    if value is _MISSING or value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        if len(value) != 1:
            raise InvalidPixelModuleError(f"{keyword} has {len(value)} values ({_show(value)}), expected one", path)
        value = value[0]
    number = _as_int(value)
    if number is None:
        raise InvalidPixelModuleError(f"{keyword} is not an integer: {_show(value)}", path)
    if number not in allowed:
        raise InvalidPixelModuleError(f"{keyword} is {number}, {_describe_allowed(allowed)}", path)
    return number


def element_value(ds: Dataset, keyword: str, path: str | None, default=_MISSING):
    """``ds.<keyword>`` or ``default``; a value pydicom cannot convert -> ``malformed_dicom``."""
    if keyword not in ds:
        return default
    try:
        return ds[keyword].value
    except Exception as exc:  # unknown VR, wrong value length, bad characters...
        raise MalformedDicomError(
            f"the header element {keyword} cannot be read (wrong length, VR or encoding) [{exception_label(exc)}]",
            path,
        ) from exc


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
        return int(value)
    return None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe_allowed(allowed) -> str:
    if isinstance(allowed, range):
        return f"outside {allowed.start}..{allowed.stop - 1}"
    return "expected one of " + ", ".join(str(v) for v in allowed)


# --- Uncompressed pixel data: enough bytes? ------------------------------------------------------


def pixel_data_bytes(ds: Dataset, path: str | None) -> bytes:
    """The Pixel Data value as bytes ("" when empty); another type -> ``malformed_dicom``."""
    value = element_value(ds, "PixelData", path, default=b"")
    if value is None:
        return b""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise MalformedDicomError(
            f"the Pixel Data element holds {type(value).__name__} values, not bytes (wrong VR)", path
        )
    return value


def check_native_length(ds: Dataset, module: PixelModule, path: str | None) -> None:
    """Uncompressed Pixel Data must hold every declared frame (before pydicom touches it)."""
    actual = len(pixel_data_bytes(ds, path))
    expected = module.native_length()
    if actual < expected:
        raise TruncatedPixelDataError(
            f"the pixel data has {actual} bytes but {module.rows} x {module.columns} x "
            f"{module.samples} samples x {module.bits_allocated} bits x {module.frames} frame(s) needs {expected}",
            path,
        )
