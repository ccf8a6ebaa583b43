"""The kinds of malformed file in the corpus: each a generator of (base, bytes, description).

``MAKERS[kind](bases, rng)`` yields an endless, deterministic stream of samples for ``kind``:
fixed recipes applied to one base after another, or random mutations drawn from ``rng``.
"""

from __future__ import annotations

import gzip
import io
import itertools
import random
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping

from fuzz import raw
from fuzz.bases import (
    BIG_ENDIAN,
    DEFLATED,
    EXPLICIT,
    HTJ2K,
    IMPLICIT,
    J2K,
    J2K_LOSSLESS,
    J2K_SYNTAXES,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS_SV1,
    JPEG_LS,
    JPEG_LS_NEAR,
    RLE,
    Base,
    syntax_name,
)

KINDS: dict[str, str] = {
    "valid": "the unbroken bases: every transfer syntax and grayscale pipeline; must decode",
    "not_dicom": "DICOM-named files that are not DICOM: empty, text, PNG, JPEG, gzip, random bytes",
    "codec_panic": "RLE frames with impossible segment headers (panics in the Rust RLE plugin)",
    "j2k_box": "JPEG 2000 frames wrapped in JP2 boxes, with zero-length or cut boxes",
    "jpeg_fallback": "the Se = 0 12-bit JPEG the GDCM fallback decodes, its codestream or pixel header broken",
    "voi_lut": "VOI LUT Sequences with bad descriptors or LUT data",
    "modality_lut": "Modality LUT Sequences and Rescale Slope/Intercept that cannot be applied",
    "window": "extreme, non-finite or contradictory Window Center/Width and VOI LUT Function",
    "palette": "PALETTE COLOR images with missing, short or inconsistent palettes",
    "pixel_module": "Rows/Columns/Frames/Bits/Samples multi-valued, non-integer, zero, absurd; empty Pixel Data",
    "lazy_value": "values pydicom converts on access: unknown VR, wrong value length, non-numbers",
    "sequence": "corrupt sequences: bad item tags, lengths past the end, missing delimiters",
    "huge": "headers declaring huge images (65535 x 65535, 20000 x 20000) on small data; a deflate bomb",
    "truncated": "files cut at element boundaries, inside headers, inside the pixel data",
    "byte_flip": "a few bytes flipped, mostly in the header",
    "overwrite": "a byte range overwritten with zeros, 0xFF or random bytes",
    "transfer_syntax": "the file meta claims another (or an unknown) transfer syntax",
    "encapsulation": "broken encapsulation: item tags, offset tables, fragment lengths, delimiters",
    "element_length": "element length fields of zero, odd, past the end or undefined",
}

# Tags the mutations touch.
ROWS, COLUMNS, FRAMES = 0x00280010, 0x00280011, 0x00280008
SAMPLES, PHOTOMETRIC, PLANAR = 0x00280002, 0x00280004, 0x00280006
BITS_ALLOCATED, BITS_STORED, HIGH_BIT, PIXEL_REPRESENTATION = 0x00280100, 0x00280101, 0x00280102, 0x00280103
WINDOW_CENTER, WINDOW_WIDTH, VOI_FUNCTION = 0x00281050, 0x00281051, 0x00281056
RESCALE_INTERCEPT, RESCALE_SLOPE, RESCALE_TYPE = 0x00281052, 0x00281053, 0x00281054
MODALITY_LUT_SEQUENCE, VOI_LUT_SEQUENCE = 0x00283000, 0x00283010
LUT_DESCRIPTOR, LUT_EXPLANATION, MODALITY_LUT_TYPE, LUT_DATA = 0x00283002, 0x00283003, 0x00283004, 0x00283006
PALETTE_DESCRIPTORS = (0x00281101, 0x00281102, 0x00281103)
PALETTE_DATA = (0x00281201, 0x00281202, 0x00281203)
SEGMENTED_PALETTE_DATA = (0x00281221, 0x00281222, 0x00281223)
SPECIFIC_CHARACTER_SET, MODALITY, SOP_CLASS = 0x00080005, 0x00080060, 0x00080016
PATIENT_NAME, PATIENT_ID, PATIENT_AGE = 0x00100010, 0x00100020, 0x00101010
BODY_PART, VIEW_POSITION = 0x00180015, 0x00185101
EXTENDED_OFFSET_TABLE, EXTENDED_OFFSET_LENGTHS = 0x7FE00001, 0x7FE00002

Sample = tuple[str, bytes, str]  # (base name, bytes, what was done)


# --- Helpers for the makers -----------------------------------------------------------------


def _pick(bases: Mapping[str, Base], test: Callable[[Base], bool]) -> list[Base]:
    return [base for base in bases.values() if test(base)]


def _cycle(recipes: list, targets: list[Base]) -> Iterator[tuple[object, Base]]:
    """Every recipe on the next target in turn, round after round, so counts above the number
    of recipes still give new (recipe, base) pairs."""
    round_ = 0
    while True:
        for index, recipe in enumerate(recipes):
            yield recipe, targets[(index + round_) % len(targets)]
        round_ += 1


def _frame(data: bytes) -> tuple[int, int]:
    """(start, end) of the first fragment's value: the codestream of frame 1."""
    _, items = raw.pixel_fragments(data)
    first = items[1]
    return first.value_start, first.value_start + first.length


def _replace_first_fragment(data: bytes, new: bytes) -> bytes:
    """Put ``new`` (padded to even length) as the first fragment; the offset table is emptied."""
    _, items = raw.pixel_fragments(data)
    if len(new) % 2:
        new += b"\x00"
    bot, first = items[0], items[1]
    out = raw.splice(
        data, first.start, first.value_start + first.length, struct.pack("<HHI", 0xFFFE, 0xE000, len(new)) + new
    )
    if bot.length:  # offsets would be wrong now; an empty table is always allowed
        out = raw.splice(out, bot.start, bot.value_start + bot.length, struct.pack("<HHI", 0xFFFE, 0xE000, 0))
    return out


def _us_value(data: bytes, tag: int) -> int:
    element = raw.find(raw.dataset_elements(data), tag)
    return struct.unpack_from("<H", data, element.value_start)[0]


def _us(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}H", *values)


def _text(value: str) -> bytes:
    data = value.encode("latin-1")
    return data + b" " if len(data) % 2 else data


def _lut_item(
    descriptor: bytes | None, data: bytes | None, *, descriptor_vr: str = "US", data_vr: str = "OW", extra: bytes = b""
) -> bytes:
    content = b""
    if descriptor is not None:
        content += raw.encode_element(LUT_DESCRIPTOR, descriptor_vr, descriptor)
    content += extra
    if data is not None:
        content += raw.encode_element(LUT_DATA, data_vr, data)
    return raw.encode_item(content)


# --- Kinds ----------------------------------------------------------------------------------


def _valid(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    for base in bases.values():
        yield base.name, base.data, f"unbroken: {base.note}"


def _not_dicom(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    from PIL import Image

    png, jpeg = io.BytesIO(), io.BytesIO()
    Image.new("L", (16, 16), 128).save(png, "PNG")
    Image.new("L", (16, 16), 128).save(jpeg, "JPEG")
    dicom = bases["ele_mono2_window"].data
    fixed = [
        (b"", "empty file"),
        (b"\x00", "one zero byte"),
        (b"Not a DICOM file, just text.\n" * 8, "plain text"),
        (png.getvalue(), "a PNG image"),
        (jpeg.getvalue(), "a JPEG image"),
        (b"\x00" * 128 + b"DICM", "preamble and DICM marker, nothing after"),
        (b"\x00" * 131, "131 zero bytes (one short of the DICM marker)"),
        (gzip.compress(dicom, mtime=0), "a gzip-compressed DICOM file"),
        (b'{"00080060": {"vr": "CS", "Value": ["CR"]}}', "DICOM JSON"),
        (b"<html><body>404</body></html>", "an HTML error page"),
        (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + b"0" * 200, "a PDF header"),
        (b"PK\x03\x04" + b"\x00" * 60, "a ZIP header"),
        (b"\x08\x00" + bytes(rng.randrange(256) for _ in range(300)), "starts like a bare dataset, then noise"),
        (b"\x02\x00\x10\x00UI" + b"\xff" * 64, "a meta tag, then 0xFF bytes"),
    ]
    yield from (("", data, what) for data, what in fixed)
    for size in itertools.cycle((16, 132, 512, 4096)):
        yield "", bytes(rng.randrange(256) for _ in range(size)), f"{size} random bytes"


def _codec_panic(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    """RLE header: segment count, then 15 segment offsets (PS3.5 G.5).

    pylibjpeg-rle 2.x panics (index out of bounds) when the last segment of a 16-bit frame
    starts anywhere but where the previous one ends, so most recipes move that offset.
    """
    targets = _pick(bases, lambda b: b.syntax == RLE and _us_value(b.data, BITS_ALLOCATED) == 16)

    def header(frame: bytes, count: int | None = None, offsets: dict[int, int] | None = None) -> bytes:
        out = bytearray(frame)
        if count is not None:
            struct.pack_into("<I", out, 0, count)
        for index, offset in (offsets or {}).items():
            struct.pack_into("<I", out, 4 + 4 * index, offset)
        return bytes(out)

    def second(frame: bytes) -> int:
        return struct.unpack_from("<I", frame, 8)[0]

    recipes: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("segment 2 offset 70, inside segment 1", lambda f: header(f, offsets={1: 70})),
        ("segment 2 offset 65", lambda f: header(f, offsets={1: 65})),
        ("segment 2 offset 100", lambda f: header(f, offsets={1: 100})),
        ("segment 2 offset one byte late", lambda f: header(f, offsets={1: second(f) + 1})),
        ("segment 2 offset one byte early", lambda f: header(f, offsets={1: second(f) - 1})),
        ("segment 2 offset in the middle of segment 1", lambda f: header(f, offsets={1: (64 + second(f)) // 2})),
        ("segment 2 offset 70 and segment count 3", lambda f: header(f, count=3, offsets={1: 70, 2: 72})),
        ("segment 2 offset past the end of the frame", lambda f: header(f, offsets={1: len(f) + 1000})),
        ("segment 2 offset 64, the same as segment 1", lambda f: header(f, offsets={1: 64})),
        ("segment 1 offset 0 (inside the header)", lambda f: header(f, offsets={0: 0})),
        ("segment offsets in decreasing order", lambda f: header(f, offsets={0: len(f) - 4, 1: 64})),
        ("segment count 0", lambda f: header(f, count=0)),
        ("segment count 16", lambda f: header(f, count=16)),
        ("segment count 0xFFFFFFFF", lambda f: header(f, count=0xFFFFFFFF)),
        ("one segment for 16-bit data", lambda f: header(f, count=1)),
        ("frame cut inside the 64-byte header", lambda f: f[:10]),
        ("last byte a literal run header promising 128 bytes", lambda f: f[:-2] + b"\x7f\x00"),
        ("segment data all replicate runs of 128", lambda f: f[:64] + b"\x81\x00" * ((len(f) - 64) // 2)),
    ]
    for (what, recipe), base in _cycle(recipes, targets):
        start, end = _frame(base.data)
        yield base.name, _replace_first_fragment(base.data, recipe(base.data[start:end])), what


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JP2_FTYP = struct.pack(">I4s4sI4s", 20, b"ftyp", b"jp2 ", 0, b"jp2 ")


def _box(kind: bytes, content: bytes, length: int | None = None) -> bytes:
    return struct.pack(">I4s", 8 + len(content) if length is None else length, kind) + content


def _j2k_box(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    targets = _pick(bases, lambda b: b.syntax in J2K_SYNTAXES)

    def jp2h(codestream: bytes) -> bytes:
        # SIZ: FF4F (SOC), FF51, Lsiz, Rsiz, then Xsiz and Ysiz at 8; Csiz at 40, Ssiz at 42
        cols, rows = struct.unpack_from(">II", codestream, 8)
        (components,) = struct.unpack_from(">H", codestream, 40)
        ihdr = _box(b"ihdr", struct.pack(">IIHBBBB", rows, cols, components, codestream[42], 7, 0, 0))
        colr = _box(b"colr", struct.pack(">BBBI", 1, 0, 0, 16 if components == 3 else 17))  # sRGB / grey
        return _box(b"jp2h", ihdr + colr)

    recipes: list[tuple[str, Callable[[bytes], bytes]]] = [
        (
            "signature box, then a zero-length ftyp box",
            lambda c: _JP2_SIGNATURE + _box(b"ftyp", b"", 0) + _box(b"jp2c", c),
        ),
        (
            "signature, ftyp, zero-length jp2h box",
            lambda c: _JP2_SIGNATURE + _JP2_FTYP + _box(b"jp2h", b"", 0) + _box(b"jp2c", c),
        ),
        ("signature box, then four zero bytes", lambda c: _JP2_SIGNATURE + b"\x00" * 4),
        ("signature box, then two zero bytes", lambda c: _JP2_SIGNATURE + b"\x00\x00"),
        ("signature box, then zero bytes where the codestream should be", lambda c: _JP2_SIGNATURE + b"\x00" * len(c)),
        (
            "signature box, a box of length 1 (XLBox), zeros",
            lambda c: _JP2_SIGNATURE + _box(b"xml ", b"", 1) + b"\x00" * 16,
        ),
        ("a complete JP2 file (ftyp, jp2h, jp2c)", lambda c: _JP2_SIGNATURE + _JP2_FTYP + jp2h(c) + _box(b"jp2c", c)),
        (
            "JP2 with a jp2c box of length 0 (to the end)",
            lambda c: _JP2_SIGNATURE + _JP2_FTYP + jp2h(c) + _box(b"jp2c", c, 0),
        ),
        (
            "JP2 with a jp2c box longer than the data",
            lambda c: _JP2_SIGNATURE + _JP2_FTYP + _box(b"jp2c", c, len(c) + 4096),
        ),
        (
            "JP2 boxes of length 4 (shorter than a box header)",
            lambda c: _JP2_SIGNATURE + _box(b"ftyp", b"", 4) * 3 + _box(b"jp2c", c),
        ),
        ("JP2 without a jp2c box", lambda c: _JP2_SIGNATURE + _JP2_FTYP + jp2h(c)),
        ("signature box only", lambda c: _JP2_SIGNATURE),
        (
            "zero-length box after a jp2h box, codestream last",
            lambda c: _JP2_SIGNATURE + _JP2_FTYP + jp2h(c) + _box(b"uuid", b"", 0) + c,
        ),
    ]
    for (what, recipe), base in _cycle(recipes, targets):
        start, end = _frame(base.data)
        yield base.name, _replace_first_fragment(base.data, recipe(base.data[start:end])), what


def _jpeg_marker(frame: bytes, marker: int) -> int:
    """Offset of the first 0xFF ``marker`` segment of a JPEG codestream (its 0xFF byte)."""
    return bytes(frame).index(bytes((0xFF, marker)))


def _jpeg_fallback(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    """The Se = 0 12-bit JPEG (libjpeg refuses it, so every sample reaches the GDCM fallback)
    with its codestream, or the pixel header describing it, broken."""
    if "jpeg_extended_se0" not in bases:
        return
    base = bases["jpeg_extended_se0"]
    start, end = _frame(base.data)
    frame = base.data[start:end]
    sof, sos = _jpeg_marker(frame, 0xC1), _jpeg_marker(frame, 0xDA)
    scan = sos + 2 + struct.unpack_from(">H", frame, sos + 2)[0]  # entropy-coded data starts here

    def patched(position: int, value: bytes) -> Callable[[], bytes]:
        out = bytearray(frame)
        out[position : position + len(value)] = value
        return lambda: _replace_first_fragment(base.data, bytes(out))

    def header(*changes: tuple[int, str, bytes]) -> Callable[[], bytes]:
        def apply() -> bytes:
            data = base.data
            for tag, vr, value in changes:
                data = raw.put(data, tag, vr, value)
            return data

        return apply

    def both_rows(rows: int) -> Callable[[], bytes]:
        out = bytearray(frame)
        struct.pack_into(">H", out, sof + 5, rows)
        return lambda: raw.put(_replace_first_fragment(base.data, bytes(out)), ROWS, "US", _us(rows))

    def segment_garbage(marker: int) -> Callable[[], bytes]:
        at = _jpeg_marker(frame, marker)
        length = struct.unpack_from(">H", frame, at + 2)[0]
        noise = bytes(rng.randrange(256) for _ in range(length - 2))
        return patched(at + 4, noise)

    recipes: list[tuple[str, Callable[[], bytes]]] = [
        ("SOF precision 8, header 12 bits", patched(sof + 4, b"\x08")),
        ("SOF precision 16, header 12 bits", patched(sof + 4, b"\x10")),
        ("SOF precision 0", patched(sof + 4, b"\x00")),
        ("header Bits Allocated/Stored 8, codestream 12-bit",
         header((BITS_ALLOCATED, "US", _us(8)), (BITS_STORED, "US", _us(8)), (HIGH_BIT, "US", _us(7)))),
        ("header Bits Stored 16, codestream 12-bit", header((BITS_STORED, "US", _us(16)), (HIGH_BIT, "US", _us(15)))),
        ("header Pixel Representation 1 (signed)", header((PIXEL_REPRESENTATION, "US", _us(1)))),
        ("header Bits Allocated 32, codestream 12-bit", header((BITS_ALLOCATED, "US", _us(32)))),
        ("header and SOF 512 rows, data for 1024", both_rows(512)),
        ("header and SOF 4096 rows, data for 1024", both_rows(4096)),
        ("Huffman tables overwritten with random bytes", segment_garbage(0xC4)),
        ("quantisation table overwritten with random bytes", segment_garbage(0xDB)),
        ("codestream cut right after the scan header", lambda: _replace_first_fragment(base.data, frame[:scan])),
        ("codestream cut in the middle of the scan", lambda: _replace_first_fragment(base.data, frame[: len(frame) // 2])),
        ("scan header component count 4", patched(sos + 4, b"\x04")),
        ("scan header Ss 63, Se 0, Ah/Al 0xFF", patched(scan - 3, b"\x3f\x00\xff")),
        ("entropy-coded data all 0xFF", lambda: _replace_first_fragment(
            base.data, frame[:scan] + b"\xff" * (len(frame) - scan - 2) + frame[-2:])),
    ]
    def flipped() -> Sample:
        out = bytearray(frame)
        positions = sorted(rng.randrange(len(frame)) for _ in range(rng.randrange(1, 9)))
        for position in positions:
            out[position] ^= 1 << rng.randrange(8)
        where = ", ".join(str(position) for position in positions)
        return base.name, _replace_first_fragment(base.data, bytes(out)), f"codestream bits flipped at {where}"

    for index, (what, make) in enumerate(recipes):  # two recipes, then random bits of the codestream flipped
        yield base.name, make(), what
        if index % 2:
            yield flipped()
    while True:
        yield flipped()


def _lut_recipes(entries: int, bits: int) -> list[tuple[str, Callable[[], bytes]]]:
    """Broken LUT items for a table that should have ``entries`` entries of ``bits`` bits."""
    good = _us(*[(i * 7) % (2**bits) for i in range(entries)])
    descriptor = _us(entries % 65536, 0, bits)
    return [
        ("LUT Descriptor with 2 values", lambda: _lut_item(_us(entries, 0), good)),
        ("LUT Descriptor with 4 values", lambda: _lut_item(_us(entries, 0, bits, 0), good)),
        ("LUT Descriptor of 3 bytes", lambda: _lut_item(b"\x00\x01\x00", good)),
        ("empty LUT Descriptor", lambda: _lut_item(b"", good)),
        ("no LUT Descriptor", lambda: _lut_item(None, good)),
        ("no LUT Data", lambda: _lut_item(descriptor, None)),
        ("empty LUT Data", lambda: _lut_item(descriptor, b"")),
        ("LUT Data of one byte", lambda: _lut_item(descriptor, b"\x01")),
        ("LUT Data as US with an odd length", lambda: _lut_item(descriptor, good[:7], data_vr="US")),
        ("LUT Data half as long as the descriptor says", lambda: _lut_item(descriptor, good[: len(good) // 2])),
        ("LUT Data twice as long as the descriptor says", lambda: _lut_item(descriptor, good * 2)),
        ("descriptor: 0 bits per entry", lambda: _lut_item(_us(entries, 0, 0), good)),
        ("descriptor: 64 bits per entry", lambda: _lut_item(_us(entries, 0, 64), good)),
        ("descriptor: 65535 bits per entry", lambda: _lut_item(_us(entries, 0, 65535), good)),
        ("descriptor: 0 entries (65536) with a short table", lambda: _lut_item(_us(0, 0, bits), good)),
        ("descriptor: first mapped value 65535", lambda: _lut_item(_us(entries, 65535, bits), good)),
        (
            "descriptor as SS: first mapped value -32768",
            lambda: _lut_item(_us(entries, 0x8000, bits), good, descriptor_vr="SS"),
        ),
        ("descriptor as text", lambda: _lut_item(_text("4096\\0\\16"), good, descriptor_vr="LO")),
        (
            "LUT Data as OB of 8-bit entries with a 16-bit descriptor",
            lambda: _lut_item(descriptor, bytes(entries), data_vr="OB"),
        ),
        ("empty item", lambda: raw.encode_item(b"")),
    ]


def _voi_lut(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    targets = _pick(bases, lambda b: b.explicit and b"MONOCHROME" in b.data[:4096])
    recipes = _lut_recipes(4096, 10)
    recipes.append(("an empty VOI LUT Sequence", lambda: b""))
    recipes.append(
        (
            "a broken item before a good one",
            lambda: _lut_item(_us(4096, 0), b"") + _lut_item(_us(4096, 0, 10), _us(*range(4096))),
        )
    )
    for (what, make), base in _cycle(recipes, targets):
        data = raw.put_raw(base.data, VOI_LUT_SEQUENCE, raw.encode_sequence(VOI_LUT_SEQUENCE, [make()]))
        yield base.name, data, f"VOI LUT: {what}"


def _modality_lut(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    targets = _pick(bases, lambda b: b.explicit and b"MONOCHROME" in b.data[:4096])
    lut_type = raw.encode_element(MODALITY_LUT_TYPE, "LO", _text("HU"))
    recipes: list[tuple[str, Callable[[bytes], bytes]]] = []
    for what, make in _lut_recipes(4096, 16):
        item = make()
        recipes.append(
            (
                f"Modality LUT: {what}",
                lambda d, item=item: raw.put_raw(
                    d, MODALITY_LUT_SEQUENCE, raw.encode_sequence(MODALITY_LUT_SEQUENCE, [item])
                ),
            )
        )
    for slope, intercept in [
        ("abc", "0"),
        ("1e400", "0"),
        ("nan", "0"),
        ("inf", "-inf"),
        ("0", "0"),
        ("1e308", "1e308"),
        ("1\\2", "0"),
        ("", "5"),
        ("-1e-320", "1"),
    ]:
        recipes.append(
            (
                f"Rescale Slope {slope!r}, Intercept {intercept!r}",
                lambda d, s=slope, i=intercept: raw.put(
                    raw.put(d, RESCALE_INTERCEPT, "DS", _text(i)), RESCALE_SLOPE, "DS", _text(s)
                ),
            )
        )
    recipes.append(("Rescale Slope as FD (8 bytes)", lambda d: raw.put(d, RESCALE_SLOPE, "FD", struct.pack("<d", 2.0))))
    recipes.append(
        (
            "Modality LUT Sequence with an empty item, and a rescale",
            lambda d: raw.put(
                raw.put_raw(
                    d, MODALITY_LUT_SEQUENCE, raw.encode_sequence(MODALITY_LUT_SEQUENCE, [raw.encode_item(lut_type)])
                ),
                RESCALE_SLOPE,
                "DS",
                _text("2"),
            ),
        )
    )
    for (what, recipe), base in _cycle(recipes, targets):
        yield base.name, recipe(base.data), what


def _window(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    targets = _pick(bases, lambda b: b.explicit and b"MONOCHROME" in b.data[:4096])
    cases = [
        ("1e308", "1e308", None),
        ("nan", "100", None),
        ("inf", "-inf", None),
        ("0", "0", None),
        ("-5", "1", None),
        ("100", "1e-300", "SIGMOID"),
        ("\\100", "\\200", None),
        ("100", "0", "LINEAR_EXACT"),
        ("100", "0.5", "LINEAR"),
        ("100", "-10", "SIGMOID"),
        ("100", "100", "BOGUS"),
        ("1e308", "-1e308", "SIGMOID"),
        ("100", "200", ""),
        ("\\".join(str(v) for v in range(40)), "1", None),
        ("2e9", "4e9", "LINEAR"),
        ("-1e20", "1e-20", "LINEAR_EXACT"),
    ]
    for (center, width, function), base in _cycle(cases, targets):
        data = raw.put(raw.put(base.data, WINDOW_CENTER, "DS", _text(center)), WINDOW_WIDTH, "DS", _text(width))
        if function is not None:
            data = raw.put(data, VOI_FUNCTION, "CS", _text(function))
        yield base.name, data, f"Window Center {center!r}, Width {width!r}, VOI LUT Function {function!r}"


def _palette(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    base = bases["ele_palette"]
    ramp = _us(*range(0, 65536, 256))  # 256 16-bit entries

    def tables(descriptor: bytes, data: list[bytes | None], vr: str = "OW", descriptor_vr: str = "US"):
        def apply(d: bytes) -> bytes:
            for tag_d, tag_v, value in zip(PALETTE_DESCRIPTORS, PALETTE_DATA, data):
                d = raw.put(d, tag_d, descriptor_vr, descriptor)
                d = raw.put(d, tag_v, vr, value) if value is not None else raw.remove(d, tag_v)
            return d

        return apply

    recipes: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("descriptors with 2 values", tables(_us(256, 0), [ramp] * 3)),
        ("0 entries (65536) with 256 entries of data", tables(_us(0, 0, 16), [ramp] * 3)),
        ("red 256 entries, green 128, blue 16", tables(_us(256, 0, 16), [ramp, ramp[:256], ramp[:32]])),
        ("8-bit descriptor, 16-bit data", tables(_us(256, 0, 8), [ramp] * 3)),
        ("16-bit descriptor, data of 256 bytes", tables(_us(256, 0, 16), [ramp[:256]] * 3)),
        ("first mapped value 200", tables(_us(256, 200, 16), [ramp] * 3)),
        ("first mapped value 65535", tables(_us(256, 65535, 16), [ramp] * 3)),
        ("odd data length (511 bytes)", tables(_us(256, 0, 16), [ramp[:511]] * 3, vr="OB")),
        ("4096 entries declared, 256 given", tables(_us(4096, 0, 16), [ramp] * 3)),
        ("0 bits per entry", tables(_us(256, 0, 0), [ramp] * 3)),
        ("32 bits per entry", tables(_us(256, 0, 32), [ramp] * 3)),
        ("descriptor of 3 bytes", tables(b"\x00\x01\x00", [ramp] * 3)),
        ("LUT data as US with 3 bytes", tables(_us(256, 0, 16), [b"\x01\x02\x03"] * 3, vr="US")),
        ("empty LUT data", tables(_us(256, 0, 16), [b""] * 3)),
        ("no green and blue data", tables(_us(256, 0, 16), [ramp, None, None])),
        ("descriptor as SS with -1 entries", tables(_us(0xFFFF, 0, 16), [ramp] * 3, descriptor_vr="SS")),
    ]

    def segmented(d: bytes) -> bytes:
        for tag_v, tag_s in zip(PALETTE_DATA, SEGMENTED_PALETTE_DATA):
            d = raw.put(raw.remove(d, tag_v), tag_s, "OW", _us(1, 200, 7, 3, 65535, 2, 0, 0))
        return d

    recipes.append(("segmented palettes with garbage opcodes", segmented))
    recipes.append(
        (
            "segmented palettes, empty",
            lambda d: raw.put(raw.remove(d, PALETTE_DATA[0]), SEGMENTED_PALETTE_DATA[0], "OW", b""),
        )
    )
    recipes.append(
        (
            "descriptors removed",
            lambda d: raw.remove(
                raw.remove(raw.remove(d, PALETTE_DESCRIPTORS[0]), PALETTE_DESCRIPTORS[1]), PALETTE_DESCRIPTORS[2]
            ),
        )
    )
    recipes.append(("PALETTE COLOR on a 16-bit RLE image without palettes", None))
    recipes.append(("PALETTE COLOR with 3 samples per pixel", lambda d: raw.put(d, SAMPLES, "US", _us(3))))
    for index, (what, recipe) in enumerate(itertools.cycle(recipes)):
        if recipe is None:
            other = bases["rle_mono2"]
            yield other.name, raw.put(other.data, PHOTOMETRIC, "CS", _text("PALETTE COLOR")), what
            continue
        data = recipe(base.data)
        if index >= len(recipes):  # later rounds: the same palette defects on a 16-bit image
            data = raw.put(
                raw.put(raw.put(data, BITS_ALLOCATED, "US", _us(16)), BITS_STORED, "US", _us(16)),
                HIGH_BIT,
                "US",
                _us(15),
            )
            data = raw.put(data, 0x7FE00010, "OW", _us(*[(i * 97) % 300 for i in range(64 * 64)]))
            what = f"{what}, 16-bit stored values up to 299"
        yield base.name, data, f"palette: {what}"


def _pixel_module(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    targets = _pick(bases, lambda b: b.explicit)
    recipes: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("Rows multi-valued [64, 64]", lambda d: raw.put(d, ROWS, "US", _us(64, 64))),
        ("Columns multi-valued [64, 64, 1]", lambda d: raw.put(d, COLUMNS, "US", _us(64, 64, 1))),
        ("Rows as IS '64.5'", lambda d: raw.put(d, ROWS, "IS", _text("64.5"))),
        ("Rows as DS '6.4e1'", lambda d: raw.put(d, ROWS, "DS", _text("6.4e1"))),
        ("Rows as LO 'sixty-four'", lambda d: raw.put(d, ROWS, "LO", _text("sixty-four"))),
        ("Rows as SS -64", lambda d: raw.put(d, ROWS, "SS", struct.pack("<h", -64))),
        ("Rows empty", lambda d: raw.put(d, ROWS, "US", b"")),
        ("Rows removed", lambda d: raw.remove(d, ROWS)),
        ("Number of Frames 'abc'", lambda d: raw.put(d, FRAMES, "IS", _text("abc"))),
        ("Number of Frames 0", lambda d: raw.put(d, FRAMES, "IS", _text("0"))),
        ("Number of Frames -1", lambda d: raw.put(d, FRAMES, "IS", _text("-1"))),
        ("Number of Frames '2.5'", lambda d: raw.put(d, FRAMES, "IS", _text("2.5"))),
        ("Number of Frames '1\\2'", lambda d: raw.put(d, FRAMES, "IS", _text("1\\2"))),
        ("Number of Frames empty", lambda d: raw.put(d, FRAMES, "IS", b"")),
        ("Number of Frames 13 digits", lambda d: raw.put(d, FRAMES, "IS", _text("9999999999999"))),
        ("Number of Frames 7 on fewer frames", lambda d: raw.put(d, FRAMES, "IS", _text("7"))),
        ("Bits Allocated 0", lambda d: raw.put(d, BITS_ALLOCATED, "US", _us(0))),
        ("Bits Allocated 1", lambda d: raw.put(d, BITS_ALLOCATED, "US", _us(1))),
        ("Bits Allocated 12", lambda d: raw.put(d, BITS_ALLOCATED, "US", _us(12))),
        ("Bits Allocated 64", lambda d: raw.put(d, BITS_ALLOCATED, "US", _us(64))),
        ("Bits Stored 0", lambda d: raw.put(d, BITS_STORED, "US", _us(0))),
        ("Bits Stored 17 > Bits Allocated", lambda d: raw.put(d, BITS_STORED, "US", _us(17))),
        ("High Bit 99", lambda d: raw.put(d, HIGH_BIT, "US", _us(99))),
        ("Pixel Representation 2", lambda d: raw.put(d, PIXEL_REPRESENTATION, "US", _us(2))),
        ("Pixel Representation flipped", lambda d: raw.put(d, PIXEL_REPRESENTATION, "US", _us(1))),
        ("Samples per Pixel 0", lambda d: raw.put(d, SAMPLES, "US", _us(0))),
        ("Samples per Pixel 2", lambda d: raw.put(d, SAMPLES, "US", _us(2))),
        ("Samples per Pixel 65535", lambda d: raw.put(d, SAMPLES, "US", _us(65535))),
        ("Planar Configuration 2", lambda d: raw.put(d, PLANAR, "US", _us(2))),
        ("empty Pixel Data (value None)", lambda d: raw.put(d, 0x7FE00010, "OB", b"")),
        ("Pixel Data as OF", lambda d: _retag_pixel_vr(d, b"OF")),
        ("Pixel Data as UN", lambda d: _retag_pixel_vr(d, b"UN")),
        ("Photometric Interpretation empty", lambda d: raw.put(d, PHOTOMETRIC, "CS", b"")),
        ("Photometric Interpretation MONOCHROME3", lambda d: raw.put(d, PHOTOMETRIC, "CS", _text("MONOCHROME3"))),
        (
            "Photometric Interpretation YBR_FULL on one sample",
            lambda d: raw.put(d, PHOTOMETRIC, "CS", _text("YBR_FULL")),
        ),
        ("Photometric Interpretation multi-valued", lambda d: raw.put(d, PHOTOMETRIC, "CS", _text("MONOCHROME2\\RGB"))),
        ("Photometric Interpretation RGB on one sample", lambda d: raw.put(d, PHOTOMETRIC, "CS", _text("RGB"))),
    ]
    for (what, recipe), base in _cycle(recipes, targets):
        try:
            data = recipe(base.data)
        except KeyError:  # e.g. "Rows removed" on a file... every base has Rows; keep going
            continue
        yield base.name, data, what


def _retag_pixel_vr(data: bytes, vr: bytes) -> bytes:
    pixel = raw.find(raw.dataset_elements(data), 0x7FE00010)
    if pixel.vr not in raw.LONG_VRS:
        return data
    return raw.splice(data, pixel.start + 4, pixel.start + 6, vr)


def _lazy_value(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    targets = _pick(bases, lambda b: b.explicit)
    unknown_vr = [
        ROWS,
        COLUMNS,
        BITS_ALLOCATED,
        WINDOW_CENTER,
        WINDOW_WIDTH,
        PATIENT_ID,
        MODALITY,
        BODY_PART,
        PHOTOMETRIC,
        RESCALE_SLOPE,
        FRAMES,
        SOP_CLASS,
        VIEW_POSITION,
        PATIENT_AGE,
    ]
    recipes: list[tuple[str, Callable[[bytes], bytes]]] = [
        (f"({tag >> 16:04X},{tag & 0xFFFF:04X}) with unknown VR 'ZZ'", lambda d, tag=tag: raw.put(d, tag, "ZZ", b"12"))
        for tag in unknown_vr
    ]
    recipes += [
        ("Rows as US of 3 bytes", lambda d: raw.put(d, ROWS, "US", b"\x40\x00\x00")),
        ("Bits Stored as US of 1 byte", lambda d: raw.put(d, BITS_STORED, "US", b"\x0c")),
        ("Rescale Slope as FD of 5 bytes", lambda d: raw.put(d, RESCALE_SLOPE, "FD", b"\x00" * 5)),
        ("Window Width as FL of 3 bytes", lambda d: raw.put(d, WINDOW_WIDTH, "FL", b"\x00" * 3)),
        ("Columns as UL of 3 bytes", lambda d: raw.put(d, COLUMNS, "UL", b"\x40\x00\x00")),
        ("Smallest Image Pixel Value as SS of 1 byte", lambda d: raw.put(d, 0x00280106, "SS", b"\x01")),
        ("Window Width 'abc'", lambda d: raw.put(d, WINDOW_WIDTH, "DS", _text("abc"))),
        ("Window Width '1\\abc'", lambda d: raw.put(d, WINDOW_WIDTH, "DS", _text("1\\abc"))),
        ("Window Center bytes 0xFF 0xFE", lambda d: raw.put(d, WINDOW_CENTER, "DS", b"\xff\xfe")),
        ("Window Width '1e'", lambda d: raw.put(d, WINDOW_WIDTH, "DS", _text("1e"))),
        ("Window Center '--1'", lambda d: raw.put(d, WINDOW_CENTER, "DS", _text("--1"))),
        ("Rescale Intercept 'x'", lambda d: raw.put(d, RESCALE_INTERCEPT, "DS", _text("x"))),
        (
            "Specific Character Set 'ISO_IR 999', Patient ID with 0xE9",
            lambda d: raw.put(
                raw.put(d, SPECIFIC_CHARACTER_SET, "CS", _text("ISO_IR 999")), PATIENT_ID, "LO", b"Ren\xe9"
            ),
        ),
        (
            "Patient Name with a cut ISO 2022 escape",
            lambda d: raw.put(
                raw.put(d, SPECIFIC_CHARACTER_SET, "CS", _text("\\ISO 2022 IR 87")), PATIENT_NAME, "PN", b"\x1b$B\x1b"
            ),
        ),
        (
            "Patient ID with invalid UTF-8 under ISO_IR 192",
            lambda d: raw.put(
                raw.put(d, SPECIFIC_CHARACTER_SET, "CS", _text("ISO_IR 192")), PATIENT_ID, "LO", b"\xc3\x28"
            ),
        ),
        ("Patient's Age 'abc'", lambda d: raw.put(d, PATIENT_AGE, "AS", _text("abc"))),
        ("Modality as US", lambda d: raw.put(d, MODALITY, "US", _us(7))),
        ("SOP Class UID of 0xFF bytes", lambda d: raw.put(d, SOP_CLASS, "UI", b"\xff" * 8)),
        ("Body Part Examined as SQ with garbage", lambda d: raw.put(d, BODY_PART, "SQ", b"\x01\x02\x03\x04")),
        (
            "Rows as SQ with one empty item",
            lambda d: raw.put_raw(d, ROWS, raw.encode_sequence(ROWS, [raw.encode_item(b"")])),
        ),
        ("Bits Allocated as AT of 3 bytes", lambda d: raw.put(d, BITS_ALLOCATED, "AT", b"\x00\x01\x02")),
    ]
    for (what, recipe), base in _cycle(recipes, targets):
        yield base.name, recipe(base.data), what


def _sequence(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    targets = _pick(bases, lambda b: b.explicit and b"MONOCHROME" in b.data[:4096])
    item = _lut_item(_us(256, 0, 8), _us(*range(256)))
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)

    def sq(tag: int, body: bytes, length: int | None = None) -> Callable[[bytes], bytes]:
        return lambda d: raw.put_raw(d, tag, raw.encode_element(tag, "SQ", body, length=length))

    recipes: list[tuple[str, Callable[[bytes], bytes]]] = []
    for tag, name in ((VOI_LUT_SEQUENCE, "VOI LUT Sequence"), (MODALITY_LUT_SEQUENCE, "Modality LUT Sequence")):
        recipes += [
            (f"{name}: item tag replaced by (0028,3002)", sq(tag, b"\x28\x00\x02\x30" + item[4:])),
            (
                f"{name}: item length past the end of the sequence",
                sq(tag, item[:4] + struct.pack("<I", 0x7FFF0000) + item[8:]),
            ),
            (f"{name}: defined length ending inside an item header", sq(tag, item[:4])),
            (f"{name}: 3 bytes of value", sq(tag, b"\xfe\xff\x00")),
            (f"{name}: undefined length, no delimiter", sq(tag, item, length=raw.UNDEFINED)),
            (
                f"{name}: undefined-length item without item delimiter",
                sq(tag, raw.encode_item(item[8:], undefined=True)[:-8] + sequence_end, length=raw.UNDEFINED),
            ),
            (f"{name}: item of random bytes", sq(tag, raw.encode_item(bytes(rng.randrange(256) for _ in range(40))))),
            (
                f"{name}: item element with length past the item",
                sq(tag, raw.encode_item(raw.encode_element(LUT_DESCRIPTOR, "US", _us(1), length=400))),
            ),
            (
                f"{name}: nested sequence cut short",
                sq(tag, raw.encode_item(raw.encode_element(0x00081140, "SQ", item[:12]))),
            ),
            (f"{name}: item delimiter where an item should be", sq(tag, item_end + item)),
        ]
    recipes.append(("Rows replaced by a sequence with a cut item", lambda d: raw.put(d, ROWS, "SQ", item[:6])))
    for (what, recipe), base in _cycle(recipes, targets):
        yield base.name, recipe(base.data), what


def _huge(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    def size(data: bytes, rows: int, cols: int) -> bytes:
        return raw.put(raw.put(data, ROWS, "US", _us(rows)), COLUMNS, "US", _us(cols))

    def codestream(base: Base, patch: Callable[[bytearray], None]) -> bytes:
        start, end = _frame(base.data)
        frame = bytearray(base.data[start:end])
        patch(frame)
        return _replace_first_fragment(base.data, bytes(frame))

    def jpeg_sof(frame: bytearray, rows: int, cols: int) -> None:
        # Start of frame: FFC0-FFCF (JPEG) or FFF7 (JPEG-LS), then length, precision, Y, X.
        for index in range(len(frame) - 1):
            if (
                frame[index] == 0xFF
                and (0xC0 <= frame[index + 1] <= 0xCF or frame[index + 1] == 0xF7)
                and frame[index + 1] not in (0xC4, 0xC8, 0xCC)
            ):
                struct.pack_into(">HH", frame, index + 5, rows, cols)
                return

    def j2k_siz(frame: bytearray, rows: int, cols: int) -> None:
        # SIZ after SOC: FF51, Lsiz, Rsiz, then Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz from 8
        struct.pack_into(">IIIIII", frame, 8, cols, rows, 0, 0, cols, rows)

    recipes: list[tuple[str, str, Callable[[], bytes]]] = []
    native = bases["ele_mono2_window"]
    recipes.append((native.name, "65535 x 65535 native, 8 KB of pixel data", lambda: size(native.data, 65535, 65535)))
    recipes.append((native.name, "20000 x 20000 native, 8 KB of pixel data", lambda: size(native.data, 20000, 20000)))
    recipes.append((native.name, "7072 x 7072 native (just over 50 megapixels)", lambda: size(native.data, 7072, 7072)))
    recipes.append(
        (
            native.name,
            "1 x 1 with 2**31 - 1 frames",
            lambda: raw.put(size(native.data, 1, 1), FRAMES, "IS", _text("2147483647")),
        )
    )
    recipes.append(
        (
            native.name,
            "65535 x 65535, 3 samples, 1000 frames",
            lambda: raw.put(
                raw.put(size(native.data, 65535, 65535), SAMPLES, "US", _us(3)), FRAMES, "IS", _text("1000")
            ),
        )
    )
    recipes.append(
        (native.name, "46341 x 46341 (rows x columns just over 2**31)", lambda: size(native.data, 46341, 46341))
    )
    if "jpegls_near_8bit" in bases:
        ls = bases["jpegls_near_8bit"]
        recipes.append(
            (
                ls.name,
                "JPEG-LS codestream and header declaring 20000 x 20000",
                lambda: size(codestream(ls, lambda f: jpeg_sof(f, 20000, 20000)), 20000, 20000),
            )
        )
        recipes.append(
            (
                ls.name,
                "JPEG-LS codestream 65535 x 65535, header 45 x 10",
                lambda: codestream(ls, lambda f: jpeg_sof(f, 65535, 65535)),
            )
        )
    if "jpeg_baseline_ybr" in bases:
        jpeg = bases["jpeg_baseline_ybr"]
        recipes.append(
            (
                jpeg.name,
                "JPEG baseline codestream and header declaring 20000 x 20000",
                lambda: size(codestream(jpeg, lambda f: jpeg_sof(f, 20000, 20000)), 20000, 20000),
            )
        )
    j2k = bases["j2k_lossless_mono1"]
    recipes.append(
        (
            j2k.name,
            "JPEG 2000 codestream and header declaring 20000 x 20000",
            lambda: size(codestream(j2k, lambda f: j2k_siz(f, 20000, 20000)), 20000, 20000),
        )
    )
    recipes.append(
        (j2k.name, "JPEG 2000 header 20000 x 20000, codestream 64 x 64", lambda: size(j2k.data, 20000, 20000))
    )
    recipes.append(
        (
            j2k.name,
            "JPEG 2000 codestream 60000 x 60000, header 64 x 64",
            lambda: codestream(j2k, lambda f: j2k_siz(f, 60000, 60000)),
        )
    )
    rle = bases["rle_mono2"]
    recipes.append((rle.name, "RLE header declaring 20000 x 20000", lambda: size(rle.data, 20000, 20000)))
    recipes.append(
        (
            rle.name,
            "RLE 65535 x 65535 with 1000 frames",
            lambda: raw.put(size(rle.data, 65535, 65535), FRAMES, "IS", _text("1000")),
        )
    )
    recipes.append(
        (
            "",
            "deflated: 8192 x 8192 of zeros behind a 64 x 64 header (a deflate bomb)",
            lambda: _deflate_bomb(native, 8192),
        )
    )
    for base_name, what, make in itertools.cycle(recipes):
        yield base_name, make(), what


def _deflate_bomb(native: Base, side: int) -> bytes:
    """Deflated transfer syntax whose dataset inflates to ``side``**2 16-bit zeros."""
    data = raw.put(native.data, ROWS, "US", _us(side))
    data = raw.put(data, COLUMNS, "US", _us(side))
    pixel = raw.find(raw.dataset_elements(data), 0x7FE00010)
    body = data[raw.dataset_start(data) : pixel.start] + raw.encode_element(
        0x7FE00010, "OW", b"", length=side * side * 2
    )
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(body)
    zeros = bytes(1 << 20)
    for _ in range(side * side * 2 >> 20):
        deflated += compressor.compress(zeros)
    deflated += compressor.flush()
    head = raw.set_transfer_syntax(data[: raw.dataset_start(data)] + b"", DEFLATED)
    return head + deflated


def _truncated(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    names = sorted(bases)
    while True:
        base = bases[rng.choice(names)]
        data = base.data
        cuts = _boundaries(base)
        mode = rng.choice(("boundary", "inside header", "random", "pixel data", "last bytes"))
        if mode == "boundary" and cuts:
            cut = rng.choice(cuts)
        elif mode == "inside header" and cuts:
            cut = rng.choice(cuts) + rng.randrange(1, 8)
        elif mode == "pixel data":
            cut = len(data) - rng.randrange(1, max(2, len(data) // 4))
        elif mode == "last bytes":
            cut = len(data) - rng.randrange(1, 10)
        else:
            cut = rng.randrange(1, len(data))
        cut = max(0, min(cut, len(data) - 1))
        yield base.name, data[:cut], f"cut to {cut} of {len(data)} bytes ({mode})"


def _boundaries(base: Base) -> list[int]:
    if not base.explicit:
        return []
    data = base.data
    cuts = [element.start for element in raw.meta_elements(data) + raw.dataset_elements(data)]
    if base.encapsulated:
        _, items = raw.pixel_fragments(data)
        cuts += [item.start for item in items] + [item.value_start for item in items]
    return cuts


def _header_end(base: Base) -> int:
    if base.explicit:
        return raw.find(raw.dataset_elements(base.data), 0x7FE00010).value_start + 64
    return min(len(base.data), 2048)


def _byte_flip(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    names = sorted(bases)
    while True:
        base = bases[rng.choice(names)]
        data = bytearray(base.data)
        header_end = min(len(data), _header_end(base))
        changes = []
        for _ in range(rng.randrange(1, 9)):
            position = rng.randrange(header_end) if rng.random() < 0.75 else rng.randrange(len(data))
            action = rng.choice(("bit", "0x00", "0xFF", "+1"))
            if action == "bit":
                data[position] ^= 1 << rng.randrange(8)
            elif action == "0x00":
                data[position] = 0
            elif action == "0xFF":
                data[position] = 0xFF
            else:
                data[position] = (data[position] + 1) % 256
            changes.append(f"{action}@{position}")
        yield base.name, bytes(data), "flipped " + ", ".join(changes)


def _overwrite(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    names = sorted(bases)
    while True:
        base = bases[rng.choice(names)]
        data = bytearray(base.data)
        header_end = min(len(data), _header_end(base))
        start = rng.randrange(128, header_end) if header_end > 129 and rng.random() < 0.7 else rng.randrange(len(data))
        length = min(len(data) - start, rng.choice((2, 4, 8, 16, 64, 256)))
        fill = rng.choice(("zeros", "0xFF", "random", "'A'"))
        content = {
            "zeros": bytes(length),
            "0xFF": b"\xff" * length,
            "'A'": b"A" * length,
            "random": bytes(rng.randrange(256) for _ in range(length)),
        }[fill]
        data[start : start + length] = content
        yield base.name, bytes(data), f"{length} bytes at {start} overwritten with {fill}"


def _transfer_syntax(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    with_meta = [base for base in bases.values() if base.data[128:132] == b"DICM"]
    claims = [
        EXPLICIT,
        IMPLICIT,
        DEFLATED,
        BIG_ENDIAN,
        RLE,
        J2K_LOSSLESS,
        J2K,
        JPEG_BASELINE,
        JPEG_EXTENDED,
        JPEG_LOSSLESS_SV1,
        JPEG_LS,
        JPEG_LS_NEAR,
        HTJ2K,
        "1.2.3.4",
        "",
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.1.2.4.100",
        "not a uid",
    ]
    for index in itertools.count():
        base = with_meta[index % len(with_meta)]
        claim = claims[(index * 7 + index // len(with_meta)) % len(claims)]
        if claim == base.syntax:
            claim = "1.2.3.4"
        yield (
            base.name,
            raw.set_transfer_syntax(base.data, claim),
            f"{syntax_name(base.syntax)} file claiming {claim!r} ({syntax_name(claim) if claim else 'empty'})",
        )


def _encapsulation(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    targets = _pick(bases, lambda b: b.encapsulated)

    def at_item(index: int, patch: Callable[[bytearray, raw.Fragment], None]) -> Callable[[bytes], bytes]:
        def apply(data: bytes) -> bytes:
            _, items = raw.pixel_fragments(data)
            out = bytearray(data)
            patch(out, items[min(index, len(items) - 1)])
            return bytes(out)

        return apply

    def without_delimiter(data: bytes) -> bytes:
        return data[:-8] if data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00") else data

    def offset_table(offsets: bytes) -> Callable[[bytes], bytes]:
        def apply(data: bytes) -> bytes:
            _, items = raw.pixel_fragments(data)
            bot = items[0]
            return raw.splice(
                data,
                bot.start,
                bot.value_start + bot.length,
                struct.pack("<HHI", 0xFFFE, 0xE000, len(offsets)) + offsets,
            )

        return apply

    def cut_fragment(data: bytes) -> bytes:
        _, items = raw.pixel_fragments(data)
        first = items[1]
        keep = (first.length // 2) & ~1
        out = raw.splice(data, first.value_start + keep, first.value_start + first.length, b"")
        return raw.splice(out, first.start + 4, first.start + 8, struct.pack("<I", keep))

    def split(count: int) -> Callable[[bytes], bytes]:
        def apply(data: bytes) -> bytes:
            _, items = raw.pixel_fragments(data)
            first = items[1]
            frame = data[first.value_start : first.value_start + first.length]
            step = max(2, (len(frame) // count) & ~1)
            pieces = [frame[i : i + step] for i in range(0, len(frame), step)]
            encoded = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(p)) + p for p in pieces)
            return raw.splice(data, first.start, first.value_start + first.length, encoded)

        return apply

    def set_u32(position: int, value: int) -> Callable[[bytearray, raw.Fragment], None]:
        return lambda out, item: struct.pack_into("<I", out, item.start + position, value)

    def extended_offsets(offsets: bytes, lengths: bytes) -> Callable[[bytes], bytes]:
        def apply(data: bytes) -> bytes:
            data = raw.put(data, EXTENDED_OFFSET_TABLE, "OV", offsets)
            return raw.put(data, EXTENDED_OFFSET_LENGTHS, "OV", lengths)

        return apply

    recipes: list[tuple[str, Callable[[bytes], bytes]]] = [
        (
            "offset table item tag (FFFE,E00D)",
            at_item(0, lambda out, item: out.__setitem__(slice(item.start + 2, item.start + 4), b"\x0d\xe0")),
        ),
        (
            "first fragment item tag (0008,0016)",
            at_item(1, lambda out, item: out.__setitem__(slice(item.start, item.start + 4), b"\x08\x00\x16\x00")),
        ),
        ("no sequence delimiter", without_delimiter),
        (
            "sequence delimiter replaced by an item past the end",
            lambda d: without_delimiter(d) + struct.pack("<HHI", 0xFFFE, 0xE000, 0x10000),
        ),
        ("offset table pointing past the data", offset_table(struct.pack("<I", 999999))),
        ("offset table of 3 bytes", offset_table(b"\x00\x00\x00")),
        ("offset table with decreasing offsets", offset_table(struct.pack("<III", 0, 5000, 8))),
        ("offset table with one offset for a multi-frame", offset_table(struct.pack("<I", 0))),
        ("fragment length larger than the data", at_item(1, set_u32(4, 0x7FFFFFF0))),
        (
            "fragment length odd",
            at_item(1, lambda out, item: struct.pack_into("<I", out, item.start + 4, item.length - 1)),
        ),
        ("fragment length undefined", at_item(1, set_u32(4, raw.UNDEFINED))),
        ("fragment length 0", at_item(1, set_u32(4, 0))),
        ("fragment cut to half its length", cut_fragment),
        ("frame split into 2 fragments", split(2)),
        ("frame split into 400 fragments", split(400)),
        (
            "no fragments: offset table and delimiter only",
            lambda d: (
                raw.splice(d, raw.pixel_fragments(d)[1][1].start, len(d) - 8, b"")
                if d.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
                else d
            ),
        ),
        (
            "Extended Offset Table with an offset past the data",
            extended_offsets(struct.pack("<Q", 1 << 40), struct.pack("<Q", 100)),
        ),
        ("Extended Offset Table of 5 bytes", extended_offsets(b"\x00" * 5, b"\x00" * 8)),
        (
            "Pixel Data of undefined length as OW with a native value",
            lambda d: raw.splice(
                d,
                raw.pixel_fragments(d)[0].start,
                len(d),
                raw.encode_element(0x7FE00010, "OW", b"\x00" * 64, length=raw.UNDEFINED) + b"\x00" * 64,
            ),
        ),
    ]
    for (what, recipe), base in _cycle(recipes, targets):
        yield base.name, recipe(base.data), what


def _element_length(bases: Mapping[str, Base], rng: random.Random) -> Iterator[Sample]:
    targets = _pick(bases, lambda b: b.explicit)
    while True:
        base = rng.choice(targets)
        data = base.data
        meta, dataset = raw.meta_elements(data), raw.dataset_elements(data)
        mode = rng.choice(
            (
                "zero",
                "odd",
                "past the end",
                "undefined",
                "short by 2",
                "pixel data 4 GB",
                "meta group length",
                "pixel data zero",
            )
        )
        if mode == "meta group length":
            element = raw.find(meta, 0x00020000)
            value = rng.choice((0, 2, 0xFFFFFFFF, struct.unpack_from("<I", data, element.value_start)[0] + 10))
            out = bytearray(data)
            struct.pack_into("<I", out, element.value_start, value)
            yield base.name, bytes(out), f"File Meta Information Group Length set to {value}"
            continue
        if mode.startswith("pixel data"):
            element = raw.find(dataset, 0x7FE00010)
            length = 0xFFFFFFF0 if mode == "pixel data 4 GB" else 0
            if element.length == raw.UNDEFINED and length == 0:
                length = 2
            yield base.name, raw.set_length(data, element, length), f"Pixel Data length set to {length}"
            continue
        element = rng.choice([e for e in dataset if e.length != raw.UNDEFINED] or dataset)
        full = 0xFFFF if element.length_size == 2 else 0xFFFFFFF0
        length = {
            "zero": 0,
            "odd": element.length + 1,
            "past the end": full,
            "undefined": raw.UNDEFINED,
            "short by 2": max(0, element.length - 2),
        }[mode]
        name = f"({element.tag >> 16:04X},{element.tag & 0xFFFF:04X})"
        yield (
            base.name,
            raw.set_length(data, element, length),
            f"{name} {element.vr.decode()} length {element.length} -> {length} ({mode})",
        )


MAKERS: dict[str, Callable[[Mapping[str, Base], random.Random], Iterator[Sample]]] = {
    "valid": _valid,
    "not_dicom": _not_dicom,
    "codec_panic": _codec_panic,
    "j2k_box": _j2k_box,
    "jpeg_fallback": _jpeg_fallback,
    "voi_lut": _voi_lut,
    "modality_lut": _modality_lut,
    "window": _window,
    "palette": _palette,
    "pixel_module": _pixel_module,
    "lazy_value": _lazy_value,
    "sequence": _sequence,
    "huge": _huge,
    "truncated": _truncated,
    "byte_flip": _byte_flip,
    "overwrite": _overwrite,
    "transfer_syntax": _transfer_syntax,
    "encapsulation": _encapsulation,
    "element_length": _element_length,
}
assert list(MAKERS) == list(KINDS)
