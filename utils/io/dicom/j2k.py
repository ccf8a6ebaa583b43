"""Step 3, JPEG 2000 at reduced resolution: decode fewer wavelet levels when the caller will
shrink the image anyway (see ``read_dicom``'s ``target_shape``).

OpenJPEG can stop before the finest resolution levels; the result is the codec's wavelet
low-pass, close to (not identical with) an area average of the full image, so ``recentre``
moves it onto the grid an area average would use. Anything unusual goes back to pydicom's full
decode.

Which OpenJPEG: libopenjp2 called directly (``openjp2``: from memory, with OpenJPEG's own
threads, ``set_decode_threads``; JPEG 2000 and HTJ2K), else Pillow's plugin (JPEG 2000 only, one
thread). Both return the same samples: the reversible wavelet's low-pass is exact, and both run
OpenJPEG.
"""

from __future__ import annotations

import io
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydicom.uid import HTJ2K, JPEG2000, UID, HTJ2KLossless, HTJ2KLosslessRPCL, JPEG2000Lossless

from . import j2k_packets, openjp2
from .pixel_module import PixelModule

logger = logging.getLogger(__name__)

# (rows, cols) of an image -> (rows, cols) the caller will resize it to.
TargetShape = Callable[[int, int], tuple[int, int]]
# coarse() -> stored values per display gray level (None: unknown); coarse() gives the image
# at its lowest resolution level (grayscale.stored_values_per_gray_level).
GrayStep = Callable[[Callable[[], np.ndarray]], float | None]

J2K_SYNTAXES = (JPEG2000Lossless, JPEG2000)
HTJ2K_SYNTAXES = (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)  # reduced only through ``openjp2`` (Pillow: no)
REDUCIBLE_SYNTAXES = J2K_SYNTAXES + HTJ2K_SYNTAXES
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"  # start of codestream, then the SIZ marker
_J2K_COD, _J2K_COC, _J2K_SOT = b"\xff\x52", b"\xff\x53", b"\xff\x90"
_J2K_EOC = b"\xff\xd9"
# Most levels skipped. A reduced level holds the codec's wavelet low-pass, not an area average:
# on 8-bit model inputs with a fixed window, mean |diff| against a full-resolution decode
# measured <= 0.6 gray levels at 1 level and <= 0.95 at 2, but up to 1.9 at 3 and 3.9 at 4.
MAX_J2K_REDUCTION = 2
# Bit-planes left out of the sub-bands kept at the finest level decoded (j2k_packets):
# OpenJPEG puts a coefficient cut short in the middle of what is left, and one level of the
# inverse wavelet then spreads the error to at most 2**planes stored values (measured 15 for 4
# planes); so as many planes go as keep that within one display gray level. Never more than:
MAX_DROPPED_PLANES = 8
_MAX_MAIN_HEADER_SEGMENTS = 1000  # real codestreams have a handful before the first tile
_threads = 1  # OpenJPEG threads per frame; set_decode_threads


def set_decode_threads(threads: int) -> None:
    """OpenJPEG threads for each reduced decode in this process (1: the caller's thread only).

    More than one only pays when fewer frames decode at once than there are cores: decoding
    processes that already hold a core each gain nothing from it. utils.infer.engine sets it in
    each decoding process (PoolSettings.thread_count: DECODE_THREADS in utils/constants.py)."""
    global _threads
    _threads = max(1, int(threads))


def decode_threads() -> int:
    return _threads


@dataclass(frozen=True)
class _J2kHeader:
    """What the reduced decode needs from a codestream's main header (SIZ and COD)."""

    rows: int
    cols: int
    precision: int
    signed: bool
    levels: int  # wavelet decomposition levels: how many times the image can be halved


def decode_reduced(
    codestream: bytes,
    module: PixelModule,
    target_shape: TargetShape,
    path: str | None,
    tsyntax: UID = JPEG2000Lossless,
    gray_step: GrayStep | None = None,
) -> tuple[np.ndarray, int] | None:
    """Frame 0 at the lowest resolution level that still covers the target, and that level.

    When one direction could lose one level more than the other, the finest level decoded
    keeps only the sub-bands the other direction needs (``thinning``): the same samples as a
    decode one level coarser down that direction, upsampled by the inverse wavelet.

    None means "decode at full resolution with pydicom": when no level can be skipped nor
    thinned, when the image or codestream is anything but plain grayscale whose header agrees
    with the DICOM attributes (pydicom has rules for the disagreements), for HTJ2K without
    ``openjp2``, and when anything fails.
    """
    try:
        if tsyntax in HTJ2K_SYNTAXES and not openjp2.available():
            return None
        header = _j2k_header(codestream)
        if header is None or not _j2k_matches_dataset(header, module, codestream):
            return None
        levels = min(header.levels, MAX_J2K_REDUCTION)
        level = reduction_level(header.rows, header.cols, levels, target_shape)
        keep = thinning(header.rows, header.cols, level, levels, target_shape)
        if openjp2.available() and keep is not None and tsyntax in J2K_SYNTAXES:
            stream = _thinned(codestream, header, level, keep, gray_step, path)
            if stream is not None:
                return _openjp2_decode(stream, level, header, module), level
        if level == 0:
            return None
        if openjp2.available():
            return _openjp2_decode(codestream, level, header, module), level
        return _pillow_j2k_decode(codestream, level, header, module), level
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
    for _ in range(_MAX_MAIN_HEADER_SEGMENTS):
        if codestream[position : position + 2] in (_J2K_SOT, b""):
            break
        marker = codestream[position : position + 2]
        (length,) = struct.unpack_from(">H", codestream, position + 2)
        if marker == _J2K_COC:  # component-specific coding: leave it to the full decoder
            return None
        if marker == _J2K_COD:  # Lcod, Scod, SGcod (4 bytes), then SPcod's level count
            levels = codestream[position + 9]
            return _J2kHeader(rows, cols, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels)
        position += 2 + length
    return None


def _j2k_matches_dataset(header: _J2kHeader, module: PixelModule, codestream: bytes) -> bool:
    """Grayscale, 8/16 bits allocated, and size, precision and sign as the DICOM header says.

    The codestream must also end with its EOC marker (give or take a few padding bytes), so
    that a cut-off one, which a reduced decode might not notice, goes to the full decoder.
    """
    return (
        module.photometric in _MONOCHROME
        and module.samples == 1
        and module.bits_allocated in (8, 16)
        and header.precision == module.bits_stored <= module.bits_allocated
        and header.signed == bool(module.pixel_representation)
        and (header.rows, header.cols) == (module.rows, module.columns)
        and _J2K_EOC in codestream[-8:]
    )


def _reduced_size(size: int, level: int) -> int:
    return -(-size // 2**level)  # OpenJPEG rounds up


def reduction_level(rows: int, cols: int, levels: int, target_shape: TargetShape) -> int:
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


def thinning(rows: int, cols: int, level: int, levels: int, target_shape: TargetShape) -> frozenset[int] | None:
    """The sub-bands to keep at the finest level decoded (``level`` skipped) when the rows or
    the columns alone could lose one level more (within ``levels``); None when neither can.

    Rows that can: keep HL (the detail across the columns), leave out LH and HH. Columns
    that can: keep LH."""
    if level + 1 > levels:
        return None
    target_rows, target_cols = target_shape(rows, cols)
    rows_can = _reduced_size(rows, level + 1) >= target_rows
    cols_can = _reduced_size(cols, level + 1) >= target_cols
    if rows_can == cols_can:  # both: the caller skipped as many levels as it may; neither: nothing to do
        return None
    return frozenset({j2k_packets.HL}) if rows_can else frozenset({j2k_packets.LH})


def dropped_planes(stored_per_gray_level: float | None) -> int:
    """Bit-planes to leave out of the kept sub-bands: ``2**planes`` stored values within one
    display gray level (0 when the display step is unknown)."""
    if not stored_per_gray_level or stored_per_gray_level < 2:
        return 0
    return min(MAX_DROPPED_PLANES, math.floor(math.log2(stored_per_gray_level)))


def _thinned(codestream: bytes, header: _J2kHeader, level: int, keep: frozenset[int], gray_step: GrayStep | None,
             path: str | None) -> bytes | None:
    """The codestream with the detail ``keep`` leaves out dropped (``j2k_packets.thin``), or
    None when it uses something ``j2k_packets`` leaves to the plain decode."""

    def coarse() -> np.ndarray:
        return openjp2.decode(codestream, header.levels, 1)[0]

    try:
        planes = dropped_planes(gray_step(coarse)) if gray_step is not None else 0
        return j2k_packets.thin(codestream, header.levels - level, keep, planes)
    except (j2k_packets.Unsupported, openjp2.OpenJpegError) as exc:
        logger.debug("%s: JPEG 2000 sub-bands not left out (%s)", path, exc)
        return None


def recentre(pixels: np.ndarray, level: int, full_shape: tuple[int, int]) -> np.ndarray:
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


def _openjp2_decode(codestream: bytes, level: int, header: _J2kHeader, module: PixelModule) -> np.ndarray:
    """Decode at ``level`` with libopenjp2 itself; the dtype pydicom would give (uint/int 8/16)."""
    # OpenJPEG clips the samples to the codestream's precision, which must be the header's
    # (checked below, and Bits Stored <= Bits Allocated before): the DICOM dtype holds them.
    dtype = f"{'int' if header.signed else 'uint'}{module.bits_allocated}"
    samples, precision, signed = openjp2.decode(codestream, level, _threads, dtype)
    rows, cols = _reduced_size(header.rows, level), _reduced_size(header.cols, level)
    if samples.shape != (rows, cols) or (precision, signed) != (header.precision, header.signed):
        raise ValueError(f"OpenJPEG returned {samples.shape}, {precision} bits, signed {signed}; expected "
                         f"{(rows, cols)}, {header.precision} bits, signed {header.signed}")
    return samples


def _pillow_j2k_decode(codestream: bytes, level: int, header: _J2kHeader, module: PixelModule) -> np.ndarray:
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
    return values.astype(f"{kind}{module.bits_allocated}")


