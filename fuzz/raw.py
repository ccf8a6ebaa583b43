"""Byte-level surgery on DICOM Part 10 files: find elements, rewrite values and length fields.

pydicom refuses to write most malformed files, so the corpus writes a valid file first and
then edits its bytes here. Only what the corpus needs is supported: the file meta group and
an explicit VR little endian (or, for the top level only, implicit VR) dataset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PREAMBLE_END = 132  # 128-byte preamble + b"DICM"
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
# Explicit VR: these VRs have 2 reserved bytes and a 4-byte length; the rest a 2-byte length.
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


@dataclass(frozen=True)
class Element:
    """Where one data element sits in the file."""

    tag: int  # (group << 16) | element
    vr: bytes  # b"" for implicit VR
    start: int  # offset of the tag
    length_at: int  # offset of the length field
    length_size: int  # 2 or 4
    length: int  # the length field's value (UNDEFINED for undefined length)
    value_start: int
    end: int  # offset just past the element, delimiters included

    @property
    def header(self) -> int:
        return self.value_start - self.start


def _tag_at(data: bytes, offset: int) -> int:
    group, element = struct.unpack_from("<HH", data, offset)
    return (group << 16) | element


def _read_element(data: bytes, offset: int, implicit: bool) -> Element:
    tag = _tag_at(data, offset)
    if tag in (ITEM, ITEM_END, SEQUENCE_END) or implicit:
        vr = b""
        length_at, length_size = offset + 4, 4
    else:
        vr = bytes(data[offset + 4 : offset + 6])
        if vr in LONG_VRS:
            length_at, length_size = offset + 8, 4
        else:
            length_at, length_size = offset + 6, 2
    fmt = "<I" if length_size == 4 else "<H"
    (length,) = struct.unpack_from(fmt, data, length_at)
    value_start = length_at + length_size
    if length == UNDEFINED and tag != ITEM:
        end = _skip_undefined(data, value_start, implicit)
    elif length == UNDEFINED:  # an item of undefined length: elements up to its delimiter
        end = _skip_elements(data, value_start, implicit, until=ITEM_END)
    else:
        end = value_start + length
    if end > len(data):
        raise ValueError(f"element {tag:08X} at {offset} runs past the end of the data")
    return Element(tag, vr, offset, length_at, length_size, length, value_start, end)


def _skip_undefined(data: bytes, offset: int, implicit: bool) -> int:
    """End of an undefined-length sequence or encapsulated pixel data (after its delimiter)."""
    while offset < len(data):
        tag = _tag_at(data, offset)
        if tag == SEQUENCE_END:
            return offset + 8
        if tag != ITEM:
            raise ValueError(f"expected an item at {offset}, found {tag:08X}")
        offset = _read_element(data, offset, implicit).end
    raise ValueError("undefined-length value without a sequence delimiter")


def _skip_elements(data: bytes, offset: int, implicit: bool, *, until: int) -> int:
    while offset < len(data):
        if _tag_at(data, offset) == until:
            return offset + 8
        offset = _read_element(data, offset, implicit).end
    raise ValueError("item of undefined length without an item delimiter")


def elements(data: bytes, start: int, stop: int | None = None, *, implicit: bool = False) -> list[Element]:
    """The elements one after another from ``start`` (nested sequences are not descended)."""
    stop = len(data) if stop is None else stop
    found = []
    offset = start
    while offset < stop:
        element = _read_element(data, offset, implicit)
        found.append(element)
        offset = element.end
    return found


def meta_elements(data: bytes) -> list[Element]:
    """The file meta group (0002,xxxx) after the preamble."""
    found = []
    offset = PREAMBLE_END
    while offset + 8 <= len(data) and _tag_at(data, offset) >> 16 == 0x0002:
        element = _read_element(data, offset, implicit=False)
        found.append(element)
        offset = element.end
    return found


def dataset_start(data: bytes) -> int:
    meta = meta_elements(data)
    return meta[-1].end if meta else PREAMBLE_END


def transfer_syntax(data: bytes) -> str:
    for element in meta_elements(data):
        if element.tag == 0x00020010:
            return data[element.value_start : element.end].rstrip(b"\x00 ").decode("ascii")
    raise ValueError("no Transfer Syntax UID in the file meta")


def dataset_elements(data: bytes) -> list[Element]:
    """Top-level dataset elements, for explicit or implicit VR little endian files."""
    implicit = transfer_syntax(data) == "1.2.840.10008.1.2"
    return elements(data, dataset_start(data), implicit=implicit)


def find(found: list[Element], tag: int) -> Element:
    for element in found:
        if element.tag == tag:
            return element
    raise KeyError(f"no element {tag:08X}")


def encode_element(tag: int, vr: bytes | str, value: bytes, *, length: int | None = None) -> bytes:
    """One explicit VR little endian element; ``length`` overrides the length field."""
    vr = vr.encode("ascii") if isinstance(vr, str) else vr
    length = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr in LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<I", length) + value
    return head + struct.pack("<H", length & 0xFFFF) + value


def splice(data: bytes, start: int, end: int, replacement: bytes) -> bytes:
    return bytes(data[:start]) + replacement + bytes(data[end:])


def set_length(data: bytes, element: Element, length: int) -> bytes:
    """Rewrite only the length field (the value stays: the file now lies about it)."""
    fmt = "<I" if element.length_size == 4 else "<H"
    out = bytearray(data)
    struct.pack_into(fmt, out, element.length_at, length & (0xFFFFFFFF if element.length_size == 4 else 0xFFFF))
    return bytes(out)


def replace_meta_value(data: bytes, tag: int, value: bytes) -> bytes:
    """Replace a file meta element's value (padded to even length) and fix the group length."""
    meta = meta_elements(data)
    element = find(meta, tag)
    if len(value) % 2:
        value += b"\x00"
    new = encode_element(tag, element.vr, value)
    out = splice(data, element.start, element.end, new)
    group_length = find(meta, 0x00020000)
    new_total = meta[-1].end - group_length.end + len(new) - (element.end - element.start)
    patched = bytearray(out)
    struct.pack_into("<I", patched, group_length.value_start, new_total)
    return bytes(patched)


def set_transfer_syntax(data: bytes, uid: str) -> bytes:
    """Claim another transfer syntax without re-encoding anything."""
    return replace_meta_value(data, 0x00020010, uid.encode("ascii"))


@dataclass(frozen=True)
class Fragment:
    start: int  # offset of the item tag
    value_start: int
    length: int


def pixel_fragments(data: bytes) -> tuple[Element, list[Fragment]]:
    """Encapsulated Pixel Data and its items: the Basic Offset Table first, then fragments."""
    pixel = find(dataset_elements(data), PIXEL_DATA)
    if pixel.length != UNDEFINED:
        raise ValueError("the pixel data is not encapsulated")
    items = []
    offset = pixel.value_start
    while _tag_at(data, offset) == ITEM:
        (length,) = struct.unpack_from("<I", data, offset + 4)
        items.append(Fragment(offset, offset + 8, length))
        offset += 8 + length
    return pixel, items


def put(data: bytes, tag: int, vr: bytes | str, value: bytes, *, length: int | None = None) -> bytes:
    """Replace the top-level element ``tag`` (or insert it in tag order) with raw bytes.

    Explicit VR little endian datasets only; ``length`` overrides the length field.
    """
    return put_raw(data, tag, encode_element(tag, vr, value, length=length))


def remove(data: bytes, tag: int) -> bytes:
    element = find(dataset_elements(data), tag)
    return splice(data, element.start, element.end, b"")


def encode_item(content: bytes, *, undefined: bool = False) -> bytes:
    if undefined:
        return struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED) + content + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def encode_sequence(tag: int, items: list[bytes], *, undefined: bool = False) -> bytes:
    """An SQ element around already encoded items."""
    body = b"".join(items)
    if undefined:
        return encode_element(tag, b"SQ", body + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0), length=UNDEFINED)
    return encode_element(tag, b"SQ", body)


def put_raw(data: bytes, tag: int, encoded: bytes) -> bytes:
    """Like ``put`` for an element already encoded (a sequence, a lying length...)."""
    for element in dataset_elements(data):
        if element.tag == tag:
            return splice(data, element.start, element.end, encoded)
        if element.tag > tag:
            return splice(data, element.start, element.start, encoded)
    return bytes(data) + encoded
