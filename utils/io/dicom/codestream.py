"""Frame 0's compressed codestream, checked before any codec sees it.

Codecs trust the sizes a codestream declares: a 644-byte JPEG-LS frame declaring 20000 x 20000
pixels decodes for 40 s, and pydicom's own JP2 box walk never ends on a zero-length box. So
before decoding, the frame header is read here (JPEG SOFn, JPEG-LS SOF55, JPEG 2000 SIZ inside
an optional JP2 wrapper, the RLE segment table) and the frame is refused when it is malformed,
when its size disagrees with the DICOM header or is above the pixel budget, or when a large
frame comes from implausibly few bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from .errors import DicomReadError, ImageTooLargeError, exception_label
from .pixel_module import PixelModule

# A decoded frame at least this large must not come from a codestream compressed more than
# MAX_COMPRESSION_RATIO : 1. Real X-rays carry noise: lossless codecs reach 2-4:1, lossy ones
# 10-50:1, heavily collimated films with black borders a few hundred; a 4 kB frame declaring
# 7000 x 7000 pixels (24,000:1) is an attack that would decode for seconds. The margin is wide
# on purpose: refusing a real image is worse than a slow decode, which the time limit bounds.
RATIO_CHECKED_FROM_BYTES = 16 << 20
MAX_COMPRESSION_RATIO = 2000
# Marker segments before a JPEG frame header, or boxes before a JP2 codestream: real files
# have tens; the limit keeps a file made of empty segments from walking for long.
_MAX_SEGMENTS = 10_000
_MAX_J2K_TILES = 65_535  # tile indices (Isot) are 16-bit
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"

# JPEG frame headers: SOF0-3, 5-7, 9-11, 13-15 (not DHT C4, JPG C8, DAC CC), and JPEG-LS SOF55.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_LS_SOF = 0xF7
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length


@dataclass(frozen=True)
class FrameHeader:
    """Sizes a codestream declares for its image."""

    codec: str  # "JPEG", "JPEG-LS", "JPEG 2000" or "RLE"
    rows: int | None  # None for RLE, which declares no size
    columns: int | None
    components: int
    precision: int | None = None  # bits per sample (JPEG P, JPEG-LS P, JPEG 2000's largest Ssiz + 1)


class _Malformed(ValueError):
    """A codestream whose header cannot be read; becomes decode_failed with the codec named."""


def check_frame(
    frame: bytes, tsyntax: UID, module: PixelModule, path: str | None, max_pixels: int
) -> FrameHeader | None:
    """Check frame 0's codestream against the DICOM header and the budget; see the module
    docstring. Returns what it read, or None for syntaxes it has no parser for."""
    header = None
    try:
        if tsyntax in JPEGLSTransferSyntaxes:
            header = jpeg_frame_header(frame, "JPEG-LS")
        elif tsyntax in JPEGTransferSyntaxes:
            header = jpeg_frame_header(frame, "JPEG")
        elif tsyntax in JPEG2000TransferSyntaxes:
            header = j2k_frame_header(j2k_codestream(frame))
        elif tsyntax == RLELossless:
            header = rle_frame_header(frame, module)
    except (_Malformed, struct.error, IndexError) as exc:
        detail = str(exc) if isinstance(exc, _Malformed) else f"its header is cut off [{exception_label(exc)}]"
        raise DicomReadError(
            f"the {_codec_name(tsyntax)} data of frame 0 is malformed: {detail}", path, reason="decode_failed"
        ) from exc
    if header is not None and header.rows is not None:
        declared = header.rows * header.columns * header.components
        if declared > max_pixels:
            raise ImageTooLargeError(
                f"the {header.codec} data of frame 0 declares {header.rows} x {header.columns} pixels x "
                f"{header.components} component(s), above the limit of {max_pixels:,} samples per frame",
                path,
            )
        if (header.rows, header.columns) != (module.rows, module.columns):
            raise DicomReadError(
                f"the {header.codec} data of frame 0 is {header.rows} x {header.columns} pixels but the "
                f"DICOM header says {module.rows} x {module.columns}",
                path,
                reason="decode_failed",
            )
    _check_ratio(frame, module, path)
    return header


def _codec_name(tsyntax: UID) -> str:
    if tsyntax in JPEGLSTransferSyntaxes:
        return "JPEG-LS"
    if tsyntax in JPEGTransferSyntaxes:
        return "JPEG"
    if tsyntax in JPEG2000TransferSyntaxes:
        return "JPEG 2000"
    return "RLE" if tsyntax == RLELossless else "compressed"


def _check_ratio(frame: bytes, module: PixelModule, path: str | None) -> None:
    decoded = module.frame_bytes
    if decoded >= RATIO_CHECKED_FROM_BYTES and len(frame) * MAX_COMPRESSION_RATIO < decoded:
        raise DicomReadError(
            f"frame 0 declares {module.rows} x {module.columns} pixels ({decoded / 2**20:.0f} MiB decoded) "
            f"but its compressed data is only {len(frame):,} bytes, more than {MAX_COMPRESSION_RATIO}:1; "
            "no real image compresses that far",
            path,
            reason="implausible_compression",
        )


# --- JPEG and JPEG-LS -----------------------------------------------------------------------


def jpeg_frame_header(data: bytes, codec: str) -> FrameHeader:
    """The first frame header (SOFn, or SOF55 for JPEG-LS) after SOI, walking marker segments."""
    if data[:2] != b"\xff\xd8":
        raise _Malformed("it does not start with a JPEG SOI marker")
    position = 2
    for _ in range(_MAX_SEGMENTS):
        if data[position : position + 1] != b"\xff":  # bytes between segments: skip as decoders do
            position = data.find(b"\xff", position)
            if position < 0:
                break
        marker = data[position + 1] if position + 1 < len(data) else None
        if marker is None:
            break
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE:
            position += 2
            continue
        if marker in (0xDA, 0xD9):  # SOS or EOI before any frame header
            raise _Malformed("a scan or the end of the image comes before the frame header")
        (length,) = struct.unpack_from(">H", data, position + 2)
        if length < 2:
            raise _Malformed(f"marker segment FF{marker:02X} has length {length}")
        if marker in _JPEG_SOF or marker == _JPEG_LS_SOF:
            return _sof(data, position, length, marker, codec)
        position += 2 + length
    else:
        raise _Malformed(f"more than {_MAX_SEGMENTS} marker segments before the frame header")
    raise _Malformed("no frame header (SOF) before the end of the data")


def _sof(data: bytes, position: int, length: int, marker: int, codec: str) -> FrameHeader:
    if (marker == _JPEG_LS_SOF) != (codec == "JPEG-LS"):
        raise _Malformed(f"frame header FF{marker:02X} is not a {codec} frame header")
    if length < 8:
        raise _Malformed(f"frame header of length {length}")
    precision, rows, columns, components = struct.unpack_from(">BHHB", data, position + 4)
    if rows == 0 or columns == 0:  # JPEG: height from a DNL marker; JPEG-LS: sizes in an LSE segment
        raise _Malformed(f"frame header declares {rows} x {columns} pixels (size set elsewhere), not supported")
    if components == 0:
        raise _Malformed("frame header declares 0 components")
    return FrameHeader(codec, rows, columns, components, precision)


# --- JPEG 2000 ------------------------------------------------------------------------------


def j2k_codestream(data: bytes) -> bytes:
    """The raw codestream: ``data`` itself, or the contents of a JP2 file's codestream box.

    The boxes before the codestream box are walked as the standard defines them; any box
    pydicom's simpler walk would read differently (a zero or 64-bit length) is refused, since
    pydicom loops forever on some of them.
    """
    if not data.startswith(_JP2_SIGNATURE):
        return data
    position, boxes = 0, 0
    while position < len(data):
        boxes += 1
        if boxes > _MAX_SEGMENTS:
            raise _Malformed(f"more than {_MAX_SEGMENTS} JP2 boxes before the codestream")
        if position + 8 > len(data):
            raise _Malformed(f"JP2 box header cut off at byte {position}")
        declared, kind = struct.unpack_from(">I4s", data, position)
        length, header = declared, 8
        if declared == 1:  # a 64-bit length follows
            (length,) = struct.unpack_from(">Q", data, position + 8)
            header = 16
            if length < 16:
                raise _Malformed(f"JP2 box {kind!r} at byte {position} has length {length}")
        elif declared == 0:  # the box runs to the end of the data
            length = len(data) - position
        elif declared < 8:
            raise _Malformed(f"JP2 box {kind!r} at byte {position} has length {declared}")
        if position + length > len(data):
            raise _Malformed(f"JP2 box {kind!r} at byte {position} runs past the end of the frame")
        if kind == b"jp2c":
            return data[position + header : position + length]
        if declared in (0, 1):
            raise _Malformed(f"JP2 box {kind!r} before the codestream has a {'zero' if declared == 0 else '64-bit'} length")
        position += length
    raise _Malformed("no codestream (jp2c) box in the JP2 data")


def j2k_frame_header(codestream: bytes) -> FrameHeader:
    """Image size and components from the SIZ segment, with the tiling checked."""
    if codestream[:4] != b"\xff\x4f\xff\x51":
        raise _Malformed("it does not start with the JPEG 2000 SOC and SIZ markers")
    lsiz, _, xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, csiz = struct.unpack_from(
        ">HHIIIIIIIIH", codestream, 4
    )
    if not 1 <= csiz <= 16384 or lsiz != 38 + 3 * csiz:
        raise _Malformed(f"SIZ declares {csiz} components in a segment of length {lsiz}")
    if xsiz <= xosiz or ysiz <= yosiz:
        raise _Malformed(f"SIZ declares an empty image ({xsiz} x {ysiz} from offset {xosiz}, {yosiz})")
    if not (xtsiz and ytsiz and xtosiz <= xosiz and ytosiz <= yosiz
            and xtosiz + xtsiz > xosiz and ytosiz + ytsiz > yosiz):
        raise _Malformed(f"SIZ declares an invalid tiling ({xtsiz} x {ytsiz} from {xtosiz}, {ytosiz})")
    tiles = math.ceil((xsiz - xtosiz) / xtsiz) * math.ceil((ysiz - ytosiz) / ytsiz)
    if tiles > _MAX_J2K_TILES:
        raise _Malformed(f"SIZ declares {tiles:,} tiles, more than {_MAX_J2K_TILES:,}")
    precision = 0
    for component in range(csiz):
        ssiz, xrsiz, yrsiz = struct.unpack_from(">BBB", codestream, 42 + 3 * component)
        if (ssiz & 0x7F) + 1 > 38 or not xrsiz or not yrsiz:
            raise _Malformed(f"SIZ component {component} has precision {(ssiz & 0x7F) + 1} or subsampling 0")
        precision = max(precision, (ssiz & 0x7F) + 1)
    return FrameHeader("JPEG 2000", ysiz - yosiz, xsiz - xosiz, csiz, precision)


# --- RLE ------------------------------------------------------------------------------------


def rle_frame_header(data: bytes, module: PixelModule) -> FrameHeader:
    """The 64-byte RLE header: segment count and offsets (DICOM PS3.5 Annex G)."""
    if len(data) < 64:
        raise _Malformed(f"the frame has {len(data)} bytes, less than its 64-byte header")
    count, *offsets = struct.unpack_from("<16I", data)
    expected = module.samples * module.bits_allocated // 8
    if not 1 <= count <= 15 or (module.bits_allocated % 8 == 0 and count != expected):
        raise _Malformed(f"the header declares {count} segments, the image needs {expected}")
    offsets = offsets[:count]
    if offsets[0] != 64:
        raise _Malformed(f"the first segment starts at byte {offsets[0]}, not 64")
    for before, after in zip(offsets, offsets[1:] + [len(data)]):
        if not before < after <= len(data):
            raise _Malformed(f"segment offsets {offsets} are not increasing within the {len(data)}-byte frame")
    return FrameHeader("RLE", None, None, count)
