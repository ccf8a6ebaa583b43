"""Step 4: the Photometric Interpretation, and colour images to BT.601 luminance."""

from __future__ import annotations

import logging

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.uid import UID

from .errors import DicomReadError, UnsupportedPhotometricError, contained
from .pixel_module import element_value

logger = logging.getLogger(__name__)

MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# The YBR forms pydicom decodes (to RGB where it can).
_YBR = ("YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
# ITU-R BT.601 luma weights, the same as OpenCV's and Pillow's RGB -> gray.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def check_photometric(ds: Dataset, path: str | None) -> str:
    """The normalised Photometric Interpretation (written back for MONOCHROME/RGB/PALETTE);
    missing on a one-sample image means MONOCHROME2."""
    photometric = str(element_value(ds, "PhotometricInterpretation", path, None) or "").strip().upper()
    if not photometric:
        samples = element_value(ds, "SamplesPerPixel", path, None)
        if samples in (None, "", 1):
            logger.debug("%s: no Photometric Interpretation, assuming MONOCHROME2", path)
            photometric = "MONOCHROME2"
    if photometric in MONOCHROME or photometric in ("RGB", "PALETTE COLOR"):
        ds.PhotometricInterpretation = photometric
        return photometric
    if photometric in _YBR:
        return photometric
    raise UnsupportedPhotometricError(
        f"unsupported Photometric Interpretation {photometric or '(missing)'!r}; expected "
        "MONOCHROME1, MONOCHROME2, RGB, YBR_* or PALETTE COLOR",
        path,
    )


COLOURED = 0.1  # a pixel is coloured when its channels differ by more than this share of their range
COLOUR_SHARE_KEY = "ColourShare"  # the reader's metadata key: the share of coloured pixels of a colour image


def colour_share(frame: np.ndarray, decoded_photometric: str, bits_stored: int = 8) -> float:
    """The share of pixels of a colour frame (rows, cols, 3) whose channels differ by more than COLOURED
    of their range: 0 for a gray image stored as RGB, most of the image for a photo or a colour
    Doppler frame. YBR frames are judged by their chroma (Cb, Cr away from the middle)."""
    if frame.ndim != 3 or frame.shape[2] < 3 or frame.size == 0:
        return 0.0
    full = float(2 ** max(1, min(int(bits_stored or 8), 16)) - 1)
    step = max(1, int(np.ceil(np.sqrt(frame.shape[0] * frame.shape[1] / 250_000))))  # about 250k pixels judged
    sample = frame[::step, ::step, :3].astype(np.float32)
    if decoded_photometric.startswith("YBR_"):
        middle = (full + 1) / 2
        spread = 2 * np.abs(sample[..., 1:3] - middle).max(axis=-1)
    else:
        spread = sample.max(axis=-1) - sample.min(axis=-1)
    return float(np.mean(spread > COLOURED * full))


def colour_to_gray(
    frame: np.ndarray, ds: Dataset, photometric: str, decoded_photometric: str, path: str | None,
    bits_stored: int = 8,
) -> tuple[np.ndarray, float]:
    """(luminance of a colour frame, its share of coloured pixels: colour_share): palette applied first;
    YBR left unconverted keeps Y."""
    if photometric == "PALETTE COLOR":
        frame = _apply_palette(frame, ds, path)
        decoded_photometric = "RGB"
        bits_stored = 16 if frame.size and int(frame.max()) > 255 else 8
    if frame.ndim == 2:
        return frame.astype(np.float64), 0.0
    share = colour_share(frame, decoded_photometric, bits_stored)
    if decoded_photometric.startswith("YBR_"):
        return frame[..., 0].astype(np.float64), share  # Y is the luminance already
    return frame[..., :3].astype(np.float64) @ _LUMA_WEIGHTS, share


def _apply_palette(frame: np.ndarray, ds: Dataset, path: str | None) -> np.ndarray:
    with contained(path, "apply the Palette Color lookup tables", reason="invalid_palette"):
        _check_segmented_palettes(ds, path)
        rgb = apply_color_lut(frame, ds)
    if rgb.ndim != 3 or rgb.shape[:2] != frame.shape[:2]:
        raise DicomReadError(
            f"the Palette Color lookup tables turned a {frame.shape} frame into {rgb.shape}", path, reason="invalid_palette"
        )
    return rgb


# --- Segmented palettes: bounded before pydicom expands them ---------------------------------

_MAX_LUT_ENTRIES = 2**16  # a palette descriptor allows at most 65,536 entries
_MAX_SEGMENTS_VISITED = 200_000
_MAX_INDIRECTION = 64


def _check_segmented_palettes(ds: Dataset, path: str | None) -> None:
    """Refuse Segmented Palette Color LUT Data that expands beyond 65,536 entries.

    pydicom expands segments into a Python list as it goes: a 6-byte linear segment adds up
    to 65,535 entries, and indirect segments can repeat other segments, so a few kilobytes
    could otherwise take gigabytes and minutes. Counted here the way pydicom expands them.
    """
    for colour in ("Red", "Green", "Blue", "Alpha"):
        data = element_value(ds, f"Segmented{colour}PaletteColorLookupTableData", path, None)
        if not data:
            continue
        descriptor = element_value(ds, f"{colour}PaletteColorLookupTableDescriptor", path, None) or [0, 0, 16]
        little = UID(str(ds.file_meta.TransferSyntaxUID)).is_little_endian
        eight_bit = int(descriptor[2]) == 8
        dtype = np.dtype("u1" if eight_bit else ("<u2" if little else ">u2"))
        words = np.frombuffer(bytes(data)[: len(data) // dtype.itemsize * dtype.itemsize], dtype).tolist()
        if _segmented_length(words, 0, None, eight_bit, little, [0], 0) > _MAX_LUT_ENTRIES:
            raise DicomReadError(
                f"the segmented {colour} palette expands to more than {_MAX_LUT_ENTRIES:,} entries", path,
                reason="invalid_palette",
            )


def _segmented_length(words: list[int], base: int, segments: int | None, eight_bit: bool, little: bool,
                      visited: list[int], depth: int) -> int:
    """How many entries pydicom's ``_expand_segmented_lut`` makes of ``words[base:]`` (its
    indirect offsets count from the start of the data it was given); once over the maximum,
    some count above it."""
    if depth > _MAX_INDIRECTION:
        raise ValueError("segmented palette indirections nest too deeply")
    count, offset, done = 0, base, 0
    while offset + 1 < len(words) and count <= _MAX_LUT_ENTRIES and done != segments:
        visited[0] += 1
        if visited[0] > _MAX_SEGMENTS_VISITED:
            raise ValueError(f"segmented palette has more than {_MAX_SEGMENTS_VISITED:,} segments to expand")
        opcode, length = words[offset], words[offset + 1]
        offset += 2
        if opcode == 0:  # discrete: the next `length` values
            count += max(0, min(length, len(words) - offset))
            offset += length
        elif opcode == 1:  # linear: `length` values up to the next one
            count += length
            offset += 1
        elif opcode == 2:  # indirect: `length` segments again, from an offset
            if eight_bit:
                b = words[offset : offset + 4] + [0, 0, 0, 0]
                high, low = ((b[3] << 8 | b[2]), (b[1] << 8 | b[0])) if little else ((b[2] << 8 | b[3]), (b[0] << 8 | b[1]))
                offset += 4
            else:
                w = words[offset : offset + 2] + [0, 0]
                high, low = w[1], w[0]
                offset += 2
            count += _segmented_length(words, base + (high << 16 | low), length, eight_bit, little, visited, depth + 1)
        else:
            raise ValueError(f"unknown segment type {opcode}")
        done += 1
    return count
