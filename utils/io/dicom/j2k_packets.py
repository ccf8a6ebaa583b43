"""A JPEG 2000 codestream with the detail sub-bands a resize averages away left out.

Why: reduced-resolution decoding (``j2k.py``) skips whole wavelet levels, which halves both
sides at once. A 2000 x 2500 X-ray resized to 512 x 512 can skip one level (1000 x 1250) but
not two (500 x 625: too narrow). Its rows could still lose a second level, and almost all of
the decoding time is spent in the code-blocks of the finest level decoded (OpenJPEG's
entropy decoding costs the same per coefficient at every level). So this module rewrites the
codestream's packets (ITU-T T.800 Annex B) so that the finest decoded level keeps only the
sub-bands the resize needs:

- ``keep``: the sub-bands of that level to keep: HL (detail across the columns), LH (detail
  down the rows), HH (both). Rows that can lose one more level lose LH and HH: what is left is
  the image low-passed down the rows only, as if reduced one more level in that direction.
- ``drop_planes``: the lowest bit-planes of the kept code-blocks' coefficients to leave out
  (their last ``3 * drop_planes`` coding passes; reversible 5/3 wavelet, and only code-blocks
  coded down to their last bit-plane, 3 * (Mb - zero bit-planes) - 2 passes with Mb from the
  QCD marker). The decoder puts each such coefficient in the middle of the interval left, so
  it is off by less than ``2 ** (drop_planes - 1)`` stored values.

Code-blocks left out are marked "not included" in rewritten packet headers; packets of the
levels a reduced decode skips become empty packets. Every other packet is copied byte for byte,
and the rewritten stream is a valid JPEG 2000 codestream any decoder reads.

Anything unusual (several components, POC/PPM/PPT/RGN markers, per-tile coding styles, HTJ2K
code-blocks) raises ``Unsupported``, and the caller decodes the original codestream instead;
so does a codestream that is malformed or cut short, where the plain decoder gives its own
error, and one whose header asks for more code-blocks, packets or passes than real images
have (the work here is bounded by the codestream's size and those limits).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Markers (T.800 Table A.2).
_SOC, _SIZ, _COD, _COC, _TLM, _PLM, _PLT = 0xFF4F, 0xFF51, 0xFF52, 0xFF53, 0xFF55, 0xFF57, 0xFF58
_QCD, _QCC, _RGN, _POC, _PPM, _PPT = 0xFF5C, 0xFF5D, 0xFF5E, 0xFF5F, 0xFF60, 0xFF61
_SOT, _SOP, _EPH, _SOD, _EOC = 0xFF90, 0xFF91, 0xFF92, 0xFF93, 0xFFD9
_LRCP, _RLCP, _RPCL, _PCRL, _CPRL = range(5)
# Code-block styles (COD SPcod): selective arithmetic coding bypass, termination on each pass, HTJ2K.
_BYPASS, _TERMALL, _HT = 0x01, 0x04, 0x40
HL, LH, HH = 1, 2, 3  # sub-bands of a resolution level above 0, in packet order
_NEVER = 1 << 30  # tag-tree value of a code-block never included
_MAX_TAG = 1000  # above any layer index or zero bit-plane count a header can mean
# Work bounds for the whole codestream (all tiles): code-blocks set up (times layers) and
# packets. A 4000 x 5000 image in 32 x 32 code-blocks and 10 layers needs about 200,000 and
# 1,000 of them; a forged header asking for more makes the caller decode the plain way.
_MAX_CODE_BLOCKS = 1 << 18
_MAX_PACKETS = 1 << 18
_MAX_PASSES = 3 * 37 - 2  # coding passes of one code-block: 37 magnitude bit-planes at most (T.800 B.10.5)


class Unsupported(ValueError):
    """The codestream uses something this module leaves to the plain decoder (or is malformed)."""


@dataclass(frozen=True)
class _Coding:
    """What the packet headers depend on: SIZ, COD and QCD of the main header."""

    size: tuple[int, int, int, int]  # Xsiz, Ysiz, XOsiz, YOsiz
    tiling: tuple[int, int, int, int]  # XTsiz, YTsiz, XTOsiz, YTOsiz
    sop: bool
    eph: bool
    order: int
    layers: int
    levels: int
    block: tuple[int, int]  # code-block width and height exponents
    style: int
    reversible: bool
    precincts: tuple[tuple[int, int], ...]  # (PPx, PPy) per resolution level
    magnitude_planes: tuple[int, ...] | None  # Mb per sub-band (QCD order: LL, then HL, LH, HH per level)


# --- bits ------------------------------------------------------------------------------------


class _BitReader:
    """Packet-header bits (T.800 B.10.1): after a 0xFF byte the next byte holds 7 bits."""

    __slots__ = ("buf", "ct", "data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int):
        self.data, self.pos, self.end, self.buf, self.ct = data, pos, end, 0, 0

    def bit(self) -> int:
        if self.ct == 0:
            if self.pos >= self.end:
                raise Unsupported("a packet header runs past the end of its tile")
            self.buf = ((self.buf << 8) & 0xFFFF) | self.data[self.pos]
            self.ct = 7 if self.buf & 0xFF00 == 0xFF00 else 8
            self.pos += 1
        self.ct -= 1
        return (self.buf >> self.ct) & 1

    def bits(self, count: int) -> int:
        if count <= self.ct:  # all in the byte at hand
            self.ct -= count
            return (self.buf >> self.ct) & ((1 << count) - 1)
        value = 0
        for _ in range(count):
            value = (value << 1) | self.bit()
        return value

    def align(self) -> int:
        """Skip to the end of the header (a stuffed byte after a final 0xFF); returns its end."""
        if self.buf & 0xFF == 0xFF:
            if self.pos >= self.end:
                raise Unsupported("a packet header runs past the end of its tile")
            self.pos += 1
        self.ct = 0
        return self.pos


class _BitWriter:
    """The writing side of ``_BitReader`` (OpenJPEG's bio.c)."""

    __slots__ = ("buf", "ct", "out")

    def __init__(self):
        self.out, self.buf, self.ct = bytearray(), 0, 8

    def _byte(self) -> None:
        self.buf = (self.buf << 8) & 0xFFFF
        self.ct = 7 if self.buf == 0xFF00 else 8
        self.out.append(self.buf >> 8)

    def bit(self, value: int) -> None:
        if self.ct == 0:
            self._byte()
        self.ct -= 1
        self.buf |= value << self.ct

    def bits(self, value: int, count: int) -> None:
        for shift in range(count - 1, -1, -1):
            self.bit((value >> shift) & 1)

    def flush(self) -> bytes:
        self._byte()
        if self.ct == 7:
            self._byte()
        return bytes(self.out)


# --- tag trees (T.800 B.10.2) ----------------------------------------------------------------


class _TagTree:
    """A quad-tree over a grid of code-blocks; leaves first, then each coarser level."""

    __slots__ = ("known", "low", "parent", "paths", "value")

    def __init__(self, width: int, height: int):
        parent: list[int] = []
        level_start, w, h = 0, width, height
        while True:
            count = w * h
            if count <= 1:
                parent += [-1] * count
                break
            next_start, next_w = level_start + count, (w + 1) // 2
            parent += [next_start + (j // 2) * next_w + i // 2 for j in range(h) for i in range(w)]
            level_start, w, h = next_start, next_w, (h + 1) // 2
        self.parent = parent
        self.value = [_NEVER] * len(parent)
        self.low = [0] * len(parent)
        self.known = [False] * len(parent)
        self.paths: dict[int, list[int]] = {}

    def _path(self, leaf: int) -> list[int]:
        path = self.paths.get(leaf)
        if path is None:
            path = [leaf]
            while self.parent[path[-1]] >= 0:
                path.append(self.parent[path[-1]])
            path = self.paths[leaf] = path[::-1]  # root first
        return path

    def decode(self, reader: _BitReader, leaf: int, threshold: int) -> bool:
        """Whether the leaf's value is below ``threshold`` (reading bits as needed).

        With a threshold above any value this reads the whole value: a node's bits all come
        before its children's, as when the threshold grows one by one (B.10.2)."""
        low, value, lows, bit = 0, self.value, self.low, reader.bit
        for node in self._path(leaf):
            if lows[node] > low:  # noqa: PLR1730 - max() is a function call, this the hot loop
                low = lows[node]
            while low < threshold and low < value[node]:
                if bit():
                    value[node] = low
                else:
                    low += 1
                    if low > _MAX_TAG:
                        raise Unsupported("a tag-tree value out of range")
            lows[node] = low
        return value[leaf] < threshold

    def set_leaves(self, values: list[int]) -> None:
        """Encoder side: leaf values, each node the least of its children."""
        self.value = list(values) + [_NEVER] * (len(self.parent) - len(values))
        for node, parent in enumerate(self.parent):
            if parent >= 0 and self.value[node] < self.value[parent]:
                self.value[parent] = self.value[node]

    def encode(self, writer: _BitWriter, leaf: int, threshold: int) -> None:
        low = 0
        for node in self._path(leaf):
            low = max(low, self.low[node])
            while low < threshold:
                if low >= self.value[node]:
                    if not self.known[node]:
                        writer.bit(1)
                        self.known[node] = True
                    break
                writer.bit(0)
                low += 1
            self.low[node] = low


# --- codestream layout -----------------------------------------------------------------------


def _segments(data: bytes, position: int, stop: int):
    """(marker, start, end) of each marker segment from ``position`` until ``stop`` (SOT or SOD)."""
    while True:
        if position + 4 > len(data):
            raise Unsupported("the codestream ends inside a header")
        marker, length = struct.unpack_from(">HH", data, position)
        if marker == stop:
            return
        if marker >> 8 != 0xFF or length < 2:
            raise Unsupported(f"no marker segment at byte {position}")
        yield marker, position, position + 2 + length
        position += 2 + length


def _main_header(data: bytes) -> tuple[_Coding, bytearray, int]:
    """The coding parameters, the main header to write (TLM/PLM left out), the first SOT."""
    if data[:4] != b"\xff\x4f\xff\x51":
        raise Unsupported("not a JPEG 2000 codestream")
    lsiz = struct.unpack_from(">H", data, 4)[0]
    xsiz, ysiz, xosiz, yosiz, xtsiz, ytsiz, xtosiz, ytosiz, components = struct.unpack_from(">8IH", data, 8)
    if components != 1 or data[43:45] != b"\x01\x01" or not (xtsiz and ytsiz):
        raise Unsupported("only one component without subsampling")
    if not (xtosiz <= xosiz < xsiz and ytosiz <= yosiz < ysiz and xtosiz + xtsiz > xosiz
            and ytosiz + ytsiz > yosiz):
        raise Unsupported("SIZ marker with an invalid image or tile origin")
    header = bytearray(data[: 4 + lsiz])
    cod = qcd = None
    end = 4 + lsiz
    for marker, start, end in _segments(data, 4 + lsiz, _SOT):
        if marker in (_COC, _RGN, _POC, _PPM):
            raise Unsupported(f"marker {marker:04X} in the main header")
        if marker == _COD:
            cod = data[start:end]
        if marker == _QCD:
            qcd = data[start:end]
        if marker == _QCC:  # quantisation of component 0 given apart: the bit-plane counts are unknown
            qcd = b""
        if marker not in (_TLM, _PLM):
            header += data[start:end]
    if cod is None or len(cod) < 14:
        raise Unsupported("no COD marker")
    scod, order, layers, _mct, levels, cbw, cbh, style, transform = struct.unpack_from(">BBHBBBBBB", cod, 4)
    if style & _HT or order > _CPRL or not layers or levels > 32 or cbw + cbh > 8:
        raise Unsupported("HTJ2K code-blocks, or an invalid COD marker")
    if scod & 1:
        if len(cod) < 14 + levels + 1:
            raise Unsupported("COD marker too short for its precinct sizes")
        precincts = tuple((b & 0x0F, b >> 4) for b in cod[14 : 14 + levels + 1])
        if any(ppx == 0 or ppy == 0 for ppx, ppy in precincts[1:]):
            raise Unsupported("precincts of size 1 above resolution level 0")
    else:
        precincts = ((15, 15),) * (levels + 1)
    coding = _Coding((xsiz, ysiz, xosiz, yosiz), (xtsiz, ytsiz, xtosiz, ytosiz), bool(scod & 2), bool(scod & 4),
                     order, layers, levels, (cbw + 2, cbh + 2), style, transform == 1, precincts,
                     _magnitude_planes(qcd, levels))
    return coding, header, end


def _magnitude_planes(qcd: bytes | None, levels: int) -> tuple[int, ...] | None:
    """Mb = guard bits + exponent - 1 of each sub-band (T.800 E.1), from a QCD without
    quantisation (the reversible wavelet's); None for anything else."""
    if not qcd or len(qcd) < 5 or qcd[4] & 0x1F:
        return None
    guard, exponents = qcd[4] >> 5, qcd[5:]
    if len(exponents) < 3 * levels + 1:
        return None
    return tuple(guard + (exponent >> 3) - 1 for exponent in exponents[: 3 * levels + 1])


@dataclass
class _Tile:
    header: bytearray = field(default_factory=bytearray)  # first tile-part's segments, PLT left out
    parts: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each tile-part's packet data

    def body(self, data: bytes) -> tuple[bytes, int, int]:
        """(bytes, start, end) of the tile's packet data: the codestream itself for one part."""
        if len(self.parts) == 1:
            return data, *self.parts[0]
        joined = b"".join(data[start:end] for start, end in self.parts)
        return joined, 0, len(joined)


def _tiles(data: bytes, position: int) -> dict[int, _Tile]:
    """Each tile's header segments and packet data, in order of first appearance."""
    tiles: dict[int, _Tile] = {}
    while True:
        marker = struct.unpack_from(">H", data, position)[0] if position + 2 <= len(data) else None
        if marker == _EOC:
            return tiles
        if marker != _SOT:
            raise Unsupported(f"expected a tile-part at byte {position}")
        lsot, index, psot, part, _parts = struct.unpack_from(">HHIBB", data, position + 2)
        if lsot != 10:
            raise Unsupported("SOT marker of the wrong length")
        if (part == 0) == (index in tiles):
            raise Unsupported(f"tile-part {part} of tile {index} out of order")
        tile = tiles.setdefault(index, _Tile())
        if psot == 0 and data[-2:] != b"\xff\xd9":
            raise Unsupported("the last tile-part runs to an end without an EOC marker")
        end = position + psot if psot else len(data) - 2
        if end > len(data) or end <= position:
            raise Unsupported("a tile-part runs past the end of the codestream")
        sod = None
        for marker, start, stop in _segments(data, position + 12, _SOD):
            if marker in (_COD, _COC, _QCD, _QCC, _POC, _PPT, _RGN):
                raise Unsupported(f"marker {marker:04X} in a tile-part header")
            if marker != _PLT and part == 0:
                tile.header += data[start:stop]
            sod = stop
        sod = (sod if sod is not None else position + 12) + 2
        if sod > end:
            raise Unsupported("a tile-part header runs past its tile-part")
        tile.parts.append((sod, end))
        position = end


# --- geometry (T.800 B.5-B.7, as OpenJPEG's tcd.c computes it) ------------------------------


def _ceil_div_pow2(value: int, power: int) -> int:
    return -((-value) >> power)


class _Block:
    """A code-block's state while its packets are read, and its contributions at the level thinned."""

    __slots__ = ("contributions", "included", "lblock", "passes", "segments", "zero_planes")

    def __init__(self):
        self.included = False  # in the original stream, in a layer before the current one
        self.passes = 0  # in the original stream so far
        self.lblock = 3
        self.segments: list[list[int]] = []  # [passes, most passes] per codeword segment
        self.zero_planes = 0
        self.contributions: list[tuple[int, int, list[int], int]] = []  # layer, passes, lengths, offset


@dataclass
class _Precinct:
    """One precinct's code-blocks in each sub-band of its resolution level (empty bands: None)."""

    resolution: int
    bands: list[tuple[int, int, int] | None]  # (band number, code-blocks across, down)
    inclusion: list[_TagTree | None]
    zero_planes: list[_TagTree | None]
    blocks: list[list[_Block]]


def _precincts(coding: _Coding, tile_box: tuple[int, int, int, int], resolution: int,
               budget: list[int]) -> list[_Precinct]:
    """The precincts of one resolution level of a tile, their code-blocks counted against
    ``budget`` ([code-blocks x layers left for the codestream])."""
    tx0, ty0, tx1, ty1 = tile_box
    level = coding.levels - resolution
    rx0, ry0 = _ceil_div_pow2(tx0, level), _ceil_div_pow2(ty0, level)
    rx1, ry1 = _ceil_div_pow2(tx1, level), _ceil_div_pow2(ty1, level)
    ppx, ppy = coding.precincts[resolution]
    start_x, start_y = (rx0 >> ppx) << ppx, (ry0 >> ppy) << ppy
    across = 0 if rx0 == rx1 else ((_ceil_div_pow2(rx1, ppx) << ppx) - start_x) >> ppx
    down = 0 if ry0 == ry1 else ((_ceil_div_pow2(ry1, ppy) << ppy) - start_y) >> ppy
    if resolution == 0:
        numbers, grid_x, grid_y, cbg_w, cbg_h = [0], start_x, start_y, ppx, ppy
    else:
        numbers = [HL, LH, HH]
        grid_x, grid_y = _ceil_div_pow2(start_x, 1), _ceil_div_pow2(start_y, 1)
        cbg_w, cbg_h = ppx - 1, ppy - 1
    cb_w, cb_h = min(coding.block[0], cbg_w), min(coding.block[1], cbg_h)
    bands = []
    for number in numbers:
        if number == 0:
            bands.append((0, rx0, ry0, rx1, ry1))
        else:
            xb, yb = number & 1, number >> 1
            bands.append((number, _ceil_div_pow2(tx0 - (xb << level), level + 1),
                          _ceil_div_pow2(ty0 - (yb << level), level + 1),
                          _ceil_div_pow2(tx1 - (xb << level), level + 1),
                          _ceil_div_pow2(ty1 - (yb << level), level + 1)))
    result = []
    for index in range(across * down):
        shapes, inclusion, zeros, blocks = [], [], [], []
        cx, cy = grid_x + (index % across << cbg_w), grid_y + (index // across << cbg_h)
        for number, bx0, by0, bx1, by1 in bands:
            if bx1 == bx0 or by1 == by0:  # an empty band has no code-blocks in any precinct
                shapes.append(None), inclusion.append(None), zeros.append(None), blocks.append([])
                continue
            x0, y0 = max(cx, bx0), max(cy, by0)
            x1, y1 = min(cx + (1 << cbg_w), bx1), min(cy + (1 << cbg_h), by1)
            w = ((_ceil_div_pow2(x1, cb_w) << cb_w) - ((x0 >> cb_w) << cb_w)) >> cb_w
            h = ((_ceil_div_pow2(y1, cb_h) << cb_h) - ((y0 >> cb_h) << cb_h)) >> cb_h
            if w < 0 or h < 0 or (w * h and (x0 >= x1 or y0 >= y1)):
                raise Unsupported("a precinct outside its sub-band")
            budget[0] -= w * h * coding.layers
            if budget[0] < 0:
                raise Unsupported("too many code-blocks")
            shapes.append((number, w, h))
            inclusion.append(_TagTree(w, h) if w * h else None)
            zeros.append(_TagTree(w, h) if w * h else None)
            blocks.append([_Block() for _ in range(w * h)])
        result.append(_Precinct(resolution, shapes, inclusion, zeros, blocks))
    return result


def _packet_order(coding: _Coding, counts: list[int], box) -> list[tuple[int, int, int]]:
    """(layer, resolution, precinct) of each packet of a one-component tile, in stream order."""
    layers, resolutions = range(coding.layers), range(coding.levels + 1)
    if coding.order == _LRCP:
        return [(l, r, p) for l in layers for r in resolutions for p in range(counts[r])]
    if coding.order == _RLCP:
        return [(l, r, p) for r in resolutions for l in layers for p in range(counts[r])]
    if coding.order == _RPCL:  # a resolution's precincts in raster order
        return [(l, r, p) for r in resolutions for p in range(counts[r]) for l in layers]
    # PCRL and CPRL (one component: the same): positions on the reference grid, and at each the
    # resolutions whose precinct starts there. A precinct is met where OpenJPEG's pi.c (T.800
    # B.12.1.4) meets it: at the tile's first row (column) when that is on the precinct grid or the
    # resolution's origin is off it, else where the precinct grid line falls.
    tx0, ty0, tx1, _ = box
    keyed = []
    for r in resolutions:
        if not counts[r]:
            continue
        level = coding.levels - r
        ppx, ppy = coding.precincts[r]
        rx0, ry0, rx1 = _ceil_div_pow2(tx0, level), _ceil_div_pow2(ty0, level), _ceil_div_pow2(tx1, level)
        across = ((_ceil_div_pow2(rx1, ppx) << ppx) - ((rx0 >> ppx) << ppx)) >> ppx

        def met(t0: int, r0: int, pp: int, j: int, level: int = level) -> int:
            if j == 0 and (t0 % (1 << (pp + level)) == 0 or (r0 << level) % (1 << (pp + level))):
                return t0
            return (((r0 >> pp) + j) << pp) << level

        keyed += [(met(ty0, ry0, ppy, p // across), met(tx0, rx0, ppx, p % across), r, p) for p in range(counts[r])]
    keyed.sort()
    return [(l, r, p) for _, _, r, p in keyed for l in layers]


# --- packets ---------------------------------------------------------------------------------


def _new_segment(block: _Block, style: int) -> list[int]:
    """T.800 B.10.7: how many passes a codeword segment may hold (OpenJPEG's opj_t2_init_seg)."""
    if style & _TERMALL:
        most = 1
    elif style & _BYPASS:
        most = 10 if not block.segments else (2 if block.segments[-1][1] in (1, 10) else 1)
    else:
        most = 109
    segment = [0, most]
    block.segments.append(segment)
    return segment


def _passes(reader: _BitReader) -> int:
    if not reader.bit():
        return 1
    if not reader.bit():
        return 2
    value = reader.bits(2)
    if value != 3:
        return 3 + value
    value = reader.bits(5)
    return 6 + value if value != 31 else 37 + reader.bits(7)


def _read_packet(data: bytes, position: int, end: int, precinct: _Precinct, layer: int, coding: _Coding,
                 record: bool) -> tuple[int, int, int]:
    """Parse one packet; returns (header start after any SOP, body start, packet end).

    ``record`` keeps each code-block's contribution (passes, segment lengths, where its bytes are).
    """
    if coding.sop and data[position : position + 2] == b"\xff\x91":
        position += 6
    header_start = position
    reader = _BitReader(data, position, end)
    contributions = []
    if reader.bit():
        for band, inclusion, zeros, blocks in zip(precinct.bands, precinct.inclusion, precinct.zero_planes,
                                                  precinct.blocks):
            if band is None:
                continue
            for number, block in enumerate(blocks):
                if block.included:
                    if not reader.bit():
                        continue
                elif not inclusion.decode(reader, number, layer + 1):
                    continue
                first = not block.included
                if first:
                    zeros.decode(reader, number, _NEVER)
                    planes = zeros.value[number]
                    block.zero_planes, block.included = planes, True
                passes = _passes(reader)
                block.passes += passes
                if block.passes > _MAX_PASSES:
                    raise Unsupported("a code-block with more coding passes than bit-planes allow")
                while reader.bit():
                    block.lblock += 1
                    if block.lblock > 32:
                        raise Unsupported("a length indicator out of range")
                segment = _new_segment(block, coding.style) if first or block.segments[-1][0] == block.segments[-1][1] \
                    else block.segments[-1]
                lengths, left = [], passes
                while True:
                    take = min(segment[1] - segment[0], left)
                    lengths.append(reader.bits(block.lblock + take.bit_length() - 1))
                    segment[0] += take
                    left -= take
                    if not left:
                        break
                    segment = _new_segment(block, coding.style)
                contributions.append((block, passes, lengths))
    body = reader.align()
    if coding.eph:
        if data[body : body + 2] != b"\xff\x92":
            raise Unsupported("an EPH marker is missing")
        body += 2
    offset = body
    for block, passes, lengths in contributions:
        if record:
            block.contributions.append((layer, passes, lengths, offset))
        offset += sum(lengths)
    if offset > end:
        raise Unsupported("packet data runs past the end of its tile")
    return header_start, body, offset


def _kept_passes(block: _Block, drop_planes: int, magnitude_planes: int | None) -> int:
    """Passes to keep when the last ``drop_planes`` bit-planes go: 3 per plane (the first plane
    has its cleanup pass only). Only a code-block coded down to its last bit-plane, with
    3 * (Mb - zero bit-planes) - 2 passes, loses any: an encoder that stopped earlier (lossy
    coding) already left out more than that."""
    total = sum(passes for _, passes, _, _ in block.contributions)
    if not drop_planes or magnitude_planes is None:
        return total
    if total != 3 * (magnitude_planes - block.zero_planes) - 2:
        return total
    return max(0, total - 3 * drop_planes)


def _write_packet(precinct: _Precinct, layer: int, coding: _Coding, keep: frozenset[int], drop_planes: int,
                  data: bytes, state: dict) -> bytes:
    """A packet of the level being thinned: the kept bands' code-blocks, the others never included."""
    if not state:  # the encoder's tag trees: first layer included and zero bit-planes, per band
        for index, (band, blocks) in enumerate(zip(precinct.bands, precinct.blocks)):
            if band is None or not blocks:
                continue
            kept = band[0] in keep
            planes = coding.magnitude_planes
            band_planes = planes[1 + 3 * (precinct.resolution - 1) + band[0] - 1] if planes else None
            limits = [_kept_passes(block, drop_planes, band_planes) if kept else 0 for block in blocks]
            first = []
            for block, limit in zip(blocks, limits):
                seen, first_layer = 0, _NEVER
                for contribution_layer, passes, _, _ in block.contributions:
                    if seen < limit:
                        first_layer = min(first_layer, contribution_layer)
                    seen += passes
                first.append(first_layer)
            inclusion, zeros = _TagTree(band[1], band[2]), _TagTree(band[1], band[2])
            inclusion.set_leaves(first)
            zeros.set_leaves([block.zero_planes if layer_ != _NEVER else _NEVER
                              for block, layer_ in zip(blocks, first)])
            # ..., passes written, length indicators, next contribution, original passes before it
            state[index] = (inclusion, zeros, limits, [0] * len(blocks), [3] * len(blocks), [0] * len(blocks),
                            [0] * len(blocks))
    plan = []  # (state, block number, block, its contribution in this layer, passes kept)
    for index, (band, blocks) in enumerate(zip(precinct.bands, precinct.blocks)):
        if band is None or not blocks:
            continue
        limits, cursors, before = state[index][2], state[index][5], state[index][6]
        for number, block in enumerate(blocks):
            contribution, passes = None, 0
            if cursors[number] < len(block.contributions) and block.contributions[cursors[number]][0] == layer:
                contribution = block.contributions[cursors[number]]
                cursors[number] += 1
                passes = max(0, min(contribution[1], limits[number] - before[number]))
                before[number] += contribution[1]
            plan.append((state[index], number, contribution, passes))
    if not any(passes for *_, passes in plan):  # an empty packet; the tag trees are left as they are
        return b"\x00" + (b"\xff\x92" if coding.eph else b"")
    writer = _BitWriter()
    body = bytearray()
    writer.bit(1)
    for (inclusion, zeros, _, written, lblocks, _, _), number, contribution, passes in plan:
        if written[number]:
            writer.bit(1 if passes else 0)
        else:
            inclusion.encode(writer, number, layer + 1)
            if passes:
                zeros.encode(writer, number, _NEVER)
        if not passes:
            continue
        _, original_passes, lengths, offset = contribution
        if passes < original_passes:  # truncated: one segment (no bypass/termall), all its bytes
            lengths = [sum(lengths)]
        _write_passes(writer, passes)
        sizes = _segment_sizes(written[number], passes, original_passes, coding.style)
        need = max(length.bit_length() - (size.bit_length() - 1) for length, size in zip(lengths, sizes))
        increment = max(0, need - lblocks[number])
        writer.bits((1 << (increment + 1)) - 2, increment + 1)  # comma code: ones, then a zero
        lblocks[number] += increment
        for length, size in zip(lengths, sizes):
            writer.bits(length, lblocks[number] + size.bit_length() - 1)
        body += data[offset : offset + sum(lengths)]
        written[number] += passes
    return writer.flush() + (b"\xff\x92" if coding.eph else b"") + bytes(body)


def _segment_sizes(before: int, passes: int, original: int, style: int) -> list[int]:
    """Passes of each codeword segment a contribution of ``passes`` new passes spans."""
    if passes < original or not style & (_BYPASS | _TERMALL):
        return [passes]
    block = _Block()
    segment, seen = _new_segment(block, style), 0
    while seen + segment[1] <= before:  # segments filled by earlier contributions
        seen += segment[1]
        segment = _new_segment(block, style)
    segment[0] = before - seen
    sizes, left = [], passes
    while left:
        take = min(segment[1] - segment[0], left)
        sizes.append(take)
        left -= take
        segment[0] += take
        if left:
            segment = _new_segment(block, style)
    return sizes


def _write_passes(writer: _BitWriter, passes: int) -> None:
    if passes == 1:
        writer.bit(0)
    elif passes == 2:
        writer.bits(2, 2)
    elif passes <= 5:
        writer.bits(0xC | (passes - 3), 4)
    elif passes <= 36:
        writer.bits(0x1E0 | (passes - 6), 9)
    else:
        writer.bits(0xFF80 | (passes - 37), 16)


# --- the rewrite -----------------------------------------------------------------------------


def thin(codestream: bytes, resolution: int, keep: frozenset[int], drop_planes: int = 0) -> bytes:
    """``codestream`` with, at ``resolution`` (0 = the lowest), only the sub-bands in ``keep``
    (``HL``, ``LH``, ``HH``), their lowest ``drop_planes`` bit-planes left out, and the
    resolution levels above emptied. Decode the result with ``levels - resolution`` levels
    skipped. Bit-planes are left out of reversible (5/3) single-segment code-blocks only;
    elsewhere ``drop_planes`` is ignored (an irreversible wavelet's bit-planes are steps of
    its quantiser, whose size this module does not weigh)."""
    try:
        return _thin(bytes(codestream), resolution, keep, drop_planes)
    except (struct.error, IndexError) as exc:  # a header cut short
        raise Unsupported(f"the codestream ends early ({exc})") from exc
    except ArithmeticError as exc:  # sizes the SIZ checks let through
        raise Unsupported(f"impossible sizes ({exc!r})") from exc


def _thin(data: bytes, resolution: int, keep: frozenset[int], drop_planes: int) -> bytes:
    coding, header, position = _main_header(data)
    if not 1 <= resolution <= coding.levels:
        raise Unsupported(f"resolution level {resolution} of {coding.levels}")
    if not coding.reversible or coding.style & (_BYPASS | _TERMALL):
        drop_planes = 0  # see the docstring
    xsiz, ysiz, xosiz, yosiz = coding.size
    xtsiz, ytsiz, xtosiz, ytosiz = coding.tiling
    across = -(-(xsiz - xtosiz) // xtsiz)
    out = bytearray(header)
    budget = [_MAX_CODE_BLOCKS, _MAX_PACKETS]
    for index, tile in _tiles(data, position).items():
        p, q = index % across, index // across
        box = (max(xtosiz + p * xtsiz, xosiz), max(ytosiz + q * ytsiz, yosiz),
               min(xtosiz + (p + 1) * xtsiz, xsiz), min(ytosiz + (q + 1) * ytsiz, ysiz))
        if box[0] >= box[2] or box[1] >= box[3]:
            raise Unsupported(f"tile {index} outside the image")
        body = _thin_tile(*tile.body(data), coding, box, resolution, keep, drop_planes, budget)
        out += struct.pack(">HHHIBB", _SOT, 10, index, 12 + len(tile.header) + 2 + len(body), 0, 1)
        out += tile.header + struct.pack(">H", _SOD) + body
    out += struct.pack(">H", _EOC)
    return bytes(out)


def _thin_tile(data: bytes, start: int, end: int, coding: _Coding, box, resolution: int, keep: frozenset[int],
               drop_planes: int, budget: list[int]) -> bytes:
    """The packets of one tile (``data[start:end]``) rewritten; ``budget``: [code-blocks x layers,
    packets] left for the codestream, spent here."""
    levels: dict[int, list[_Precinct]] = {}  # built when a packet of that level is parsed

    def precincts(r: int) -> list[_Precinct]:
        if r not in levels:
            levels[r] = _precincts(coding, box, r, budget)
        return levels[r]

    counts = [_precinct_count(coding, box, r) for r in range(coding.levels + 1)]
    budget[1] -= sum(counts) * coding.layers
    if budget[1] < 0:
        raise Unsupported("too many packets")
    order = _packet_order(coding, counts, box)
    last_needed = max((i for i, (_, r, _) in enumerate(order) if r <= resolution), default=-1)
    empty = b"\x00" + (b"\xff\x92" if coding.eph else b"")
    out = bytearray()
    states: dict[int, dict] = {}
    thinned = []  # (where in ``out``, SOP bytes, precinct, layer): written once all are parsed
    position = start
    for i, (layer, r, p) in enumerate(order):
        if i > last_needed:
            out += empty
            continue
        packet_start = position
        header_start, _, position = _read_packet(data, position, end, precincts(r)[p], layer, coding,
                                                 record=r == resolution)
        if r < resolution:
            out += data[packet_start:position]
        elif r > resolution:  # a skipped level between needed packets (layer-major order)
            out += empty
        else:
            thinned.append((len(out), data[packet_start:header_start], precincts(r)[p], layer))
    # The kept code-blocks' truncation depends on their passes in all layers: write last.
    pieces, previous = [], 0
    for where, sop, precinct, layer in thinned:
        state = states.setdefault(id(precinct), {})
        pieces += [out[previous:where], sop, _write_packet(precinct, layer, coding, keep, drop_planes, data, state)]
        previous = where
    pieces.append(out[previous:])
    return b"".join(pieces)


def _precinct_count(coding: _Coding, box, resolution: int) -> int:
    tx0, ty0, tx1, ty1 = box
    level = coding.levels - resolution
    ppx, ppy = coding.precincts[resolution]
    rx0, ry0 = _ceil_div_pow2(tx0, level), _ceil_div_pow2(ty0, level)
    rx1, ry1 = _ceil_div_pow2(tx1, level), _ceil_div_pow2(ty1, level)
    across = 0 if rx0 == rx1 else ((_ceil_div_pow2(rx1, ppx) << ppx) - ((rx0 >> ppx) << ppx)) >> ppx
    down = 0 if ry0 == ry1 else ((_ceil_div_pow2(ry1, ppy) << ppy) - ((ry0 >> ppy) << ppy)) >> ppy
    return across * down
