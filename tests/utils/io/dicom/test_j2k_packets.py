"""JPEG 2000 packets rewritten with sub-bands or bit-planes left out (utils.io.dicom.j2k_packets).

Each rewritten codestream is decoded by OpenJPEG and checked against an independent model:
keeping every sub-band must give the very samples of the original, and leaving sub-bands out
must give the reversible 5/3 wavelet (T.800 Annex F, in NumPy below) with those sub-bands
zeroed, bit for bit, across tilings, precincts, code-block sizes, layers and progressions.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess

import cv2
import numpy as np
import pytest
from PIL import Image

from utils.io.dicom import j2k_packets, openjp2
from utils.io.dicom.j2k_packets import HH, HL, LH, Unsupported, thin

pytestmark = pytest.mark.skipif(not openjp2.available(), reason="no libopenjp2 2.5 or later")
ALL = frozenset({HL, LH, HH})


def xray_like(shape: tuple[int, int], seed: int = 0, bits: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = cv2.GaussianBlur(rng.random(shape), (0, 0), 6)
    smooth = (smooth - smooth.min()) / np.ptp(smooth)
    noisy = 0.05 + 0.85 * smooth + rng.normal(0, 0.01, shape)
    return np.clip(np.rint(noisy * (2**bits - 1)), 0, 2**bits - 1).astype(np.uint16)


def pillow_j2k(pixels: np.ndarray, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG2000", no_jp2=True, **options)
    return out.getvalue()


def levels_of(codestream: bytes) -> int:
    return codestream[codestream.index(b"\xff\x52") + 9]


# --- the 5/3 wavelet, as an independent model -----------------------------------------------


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    index = np.abs(index)
    return np.where(index >= n, 2 * (n - 1) - index, index)


def _forward_1d(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.moveaxis(np.asarray(x, np.int64), axis, 0)
    n = len(x)
    if n == 1:
        return np.moveaxis(x, 0, axis), np.moveaxis(x[:0], 0, axis)
    even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
    lifted = x.copy()
    lifted[odd] = x[odd] - np.floor_divide(x[_mirror(odd - 1, n)] + x[_mirror(odd + 1, n)], 2)
    low = x[even] + np.floor_divide(lifted[_mirror(even - 1, n)] + lifted[_mirror(even + 1, n)] + 2, 4)
    return np.moveaxis(low, 0, axis), np.moveaxis(lifted[odd], 0, axis)


def _inverse_1d(low: np.ndarray, high: np.ndarray, axis: int) -> np.ndarray:
    low, high = np.moveaxis(low, axis, 0), np.moveaxis(high, axis, 0)
    n = len(low) + len(high)
    if n == 1:
        return np.moveaxis(low, 0, axis)
    even, odd = np.arange(0, n, 2), np.arange(1, n, 2)
    y = np.empty((n,) + low.shape[1:], np.int64)
    y[even], y[odd] = low, high
    x = y.copy()
    x[even] = y[even] - np.floor_divide(y[_mirror(even - 1, n)] + y[_mirror(even + 1, n)] + 2, 4)
    x[odd] = y[odd] + np.floor_divide(x[_mirror(odd - 1, n)] + x[_mirror(odd + 1, n)], 2)
    return np.moveaxis(x, 0, axis)


def forward(image: np.ndarray) -> dict[str, np.ndarray]:
    """One level of the 2-D reversible 5/3 DWT (down the columns, then along the rows)."""
    low, high = _forward_1d(image, 0)
    (ll, hl), (lh, hh) = _forward_1d(low, 1), _forward_1d(high, 1)
    return {"LL": ll, "HL": hl, "LH": lh, "HH": hh}


def inverse(bands: dict[str, np.ndarray]) -> np.ndarray:
    return _inverse_1d(_inverse_1d(bands["LL"], bands["HL"], 1), _inverse_1d(bands["LH"], bands["HH"], 1), 0)


def model_decode(image: np.ndarray, skipped: int, keep: frozenset[int], bits: int = 12) -> np.ndarray:
    """What a decoder gives after skipping ``skipped`` levels with only ``keep`` left at the next."""
    for _ in range(skipped):
        image = forward(image)["LL"]
    bands = forward(image)
    for name, number in (("HL", HL), ("LH", LH), ("HH", HH)):
        if number not in keep:
            bands[name] = np.zeros_like(bands[name])
    return np.clip(inverse(bands), 0, 2**bits - 1)


def test_the_model_inverts_and_matches_openjpeg():
    image = xray_like((157, 133))
    np.testing.assert_array_equal(inverse(forward(image)), image)
    codestream = pillow_j2k(image)
    np.testing.assert_array_equal(openjp2.decode(codestream, 1)[0], forward(image)["LL"])


# --- keeping everything changes nothing ----------------------------------------------------

ENCODINGS = {
    "default": {},
    "3 levels": {"num_resolutions": 4},
    "tiles": {"tile_size": (128, 100)},
    "precincts": {"precinct_size": (64, 64)},
    "code-blocks 32x16": {"codeblock_size": (32, 16)},
    "RLCP": {"progression": "RLCP"},
    "RPCL with precincts": {"progression": "RPCL", "precinct_size": (64, 64)},
    "PCRL": {"progression": "PCRL"},
    "CPRL with tiles": {"progression": "CPRL", "tile_size": (64, 64)},
    "3 layers LRCP": {"quality_layers": [40, 10, 1], "quality_mode": "rates"},
    "3 layers RLCP": {"quality_layers": [40, 10, 1], "quality_mode": "rates", "progression": "RLCP"},
    "3 layers with precincts": {"quality_layers": [30, 5], "quality_mode": "rates", "precinct_size": (32, 32)},
    "irreversible": {"irreversible": True},
    "PLT markers": {"plt": True},
}


@pytest.mark.parametrize("options", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_keeping_every_sub_band_decodes_the_same(options):
    codestream = pillow_j2k(xray_like((300, 261), seed=1), **options)
    levels = levels_of(codestream)
    for resolution in range(1, levels + 1):
        thinned = thin(codestream, resolution, ALL)
        skipped = levels - resolution
        np.testing.assert_array_equal(openjp2.decode(thinned, skipped)[0], openjp2.decode(codestream, skipped)[0])
        if skipped:  # the levels above are emptied: a shorter codestream
            assert len(thinned) < len(codestream)


# --- leaving sub-bands out -------------------------------------------------------------------

UNTILED = {name: options for name, options in ENCODINGS.items()
           if "tile_size" not in options and not options.get("irreversible") and "quality_layers" not in options}


@pytest.mark.parametrize("keep", [frozenset({HL}), frozenset({LH}), frozenset({HL, HH}), frozenset()],
                         ids=["HL", "LH", "HL+HH", "none"])
@pytest.mark.parametrize("options", UNTILED.values(), ids=UNTILED.keys())
def test_left_out_sub_bands_decode_as_zeros(options, keep):
    image = xray_like((301, 250), seed=2)
    codestream = pillow_j2k(image, **options)
    levels = levels_of(codestream)
    for skipped in (0, 1):
        thinned = thin(codestream, levels - skipped, keep)
        np.testing.assert_array_equal(openjp2.decode(thinned, skipped)[0], model_decode(image, skipped, keep))


def test_layers_are_followed_where_a_code_block_first_appears():
    # Lossless in the last layer: every code-block has passes in several layers.
    image = xray_like((260, 300), seed=3)
    for progression in ("LRCP", "RLCP", "RPCL"):
        codestream = pillow_j2k(image, quality_layers=[80, 20, 0], quality_mode="rates", progression=progression,
                                precinct_size=(64, 64))
        levels = levels_of(codestream)
        thinned = thin(codestream, levels, frozenset({LH}))
        np.testing.assert_array_equal(openjp2.decode(thinned)[0], model_decode(image, 0, frozenset({LH})))


def test_tiles_are_thinned_one_by_one():
    codestream = pillow_j2k(xray_like((256, 256), seed=4), tile_size=(128, 128))
    image = openjp2.decode(codestream)[0]  # the samples coded (Pillow 13 garbles 16-bit tiles right of the first)
    thinned = openjp2.decode(thin(codestream, levels_of(codestream), frozenset({HL})))[0]
    for rows in (slice(0, 128), slice(128, 256)):
        for cols in (slice(0, 128), slice(128, 256)):
            np.testing.assert_array_equal(thinned[rows, cols], model_decode(image[rows, cols], 0, frozenset({HL})))


# --- leaving bit-planes out ------------------------------------------------------------------


@pytest.mark.parametrize("planes", [1, 3, 5])
def test_left_out_bit_planes_cost_at_most_their_weight(planes):
    image = xray_like((300, 240), seed=5)
    codestream = pillow_j2k(image)
    levels = levels_of(codestream)
    exact = openjp2.decode(thin(codestream, levels - 1, frozenset({HL})), 1)[0].astype(np.int64)
    cut = openjp2.decode(thin(codestream, levels - 1, frozenset({HL}), planes), 1)[0].astype(np.int64)
    error = np.abs(cut - exact)
    # Each coefficient is off by less than 2**(planes - 1) (the decoder takes the middle of what
    # is left); one inverse level spreads that over at most 2**planes.
    assert 0 < error.max() <= 2**planes, error.max()
    assert error.mean() < 2 ** (planes - 1)


def test_bit_planes_only_leave_code_blocks_coded_to_the_last_plane():
    # Reversible but rate-limited (lossy): the encoder stopped above the last bit-plane, so
    # "the last passes" would be high planes; no code-block here is coded to its end.
    codestream = pillow_j2k(xray_like((240, 200), seed=10), quality_layers=[20], quality_mode="rates")
    levels = levels_of(codestream)
    assert thin(codestream, levels, frozenset({HL}), 3) == thin(codestream, levels, frozenset({HL}), 0)


def test_bit_planes_only_leave_reversible_code_blocks():
    codestream = pillow_j2k(xray_like((200, 200), seed=6), irreversible=True)
    levels = levels_of(codestream)
    assert thin(codestream, levels, frozenset({HL}), 4) == thin(codestream, levels, frozenset({HL}), 0)


# --- what it leaves to the plain decoder -----------------------------------------------------


def test_several_components_are_left_alone():
    rgb = np.dstack([xray_like((64, 64), seed=s, bits=8).astype(np.uint8) for s in range(3)])
    with pytest.raises(Unsupported, match="one component"):
        thin(pillow_j2k(rgb), 1, ALL)


def test_htj2k_code_blocks_are_left_alone():
    codestream = bytearray(pillow_j2k(xray_like((64, 64))))
    cod = codestream.index(b"\xff\x52")
    codestream[cod + 12] |= 0x40  # the HT code-block style
    with pytest.raises(Unsupported, match="HTJ2K"):
        thin(bytes(codestream), 1, ALL)


def test_poc_markers_are_left_alone():
    codestream = pillow_j2k(xray_like((64, 64)))
    sot = codestream.index(b"\xff\x90")
    poc = bytes.fromhex("ff5f 0009 00 0000 0001 05 00")  # one progression change, LRCP... CPRL
    with pytest.raises(Unsupported, match="FF5F"):
        thin(codestream[:sot] + poc + codestream[sot:], 1, ALL)


def test_forged_sizes_are_refused_before_any_work():
    codestream = bytearray(pillow_j2k(xray_like((64, 64)), precinct_size=(64, 64)))
    siz = codestream.index(b"\xff\x51")
    codestream[siz + 6 : siz + 14] = (60000).to_bytes(4, "big") * 2  # a 60000 x 60000 image in one tile...
    codestream[siz + 22 : siz + 30] = (60000).to_bytes(4, "big") * 2
    cod = codestream.index(b"\xff\x52")
    codestream[cod + 6 : cod + 8] = (65535).to_bytes(2, "big")  # ...in 65535 layers
    with pytest.raises(Unsupported, match="packets"):
        thin(bytes(codestream), 1, ALL)


def _forged(width: int, height: int, cod: bytes, qcd_bands: int, tiles: list[bytes]) -> bytes:
    """SOC, SIZ (one 12-bit component, tiles of width x height), ``cod``, a QCD, the tiles' packet data."""
    siz = struct.pack(">HHH8IH", 0xFF51, 41, 0, width * len(tiles), height, 0, 0, width, height, 0, 0, 1) + bytes([11, 1, 1])
    qcd = struct.pack(">HHB", 0xFF5C, 3 + qcd_bands, 0x40) + bytes([0x60] * qcd_bands)
    out = bytearray(b"\xff\x4f" + siz + cod + qcd)
    for index, packets in enumerate(tiles):
        out += struct.pack(">HHHIBB", 0xFF90, 10, index, 14 + len(packets), 0, 1) + b"\xff\x93" + packets
    return bytes(out + b"\xff\xd9")


def test_a_forged_header_cannot_make_the_rewrite_work_for_long():
    # Each of these takes a few hundred bytes; unbounded, they took 3-8 s or minutes to rewrite.
    # 1. Every code-block coded again in each of 500 layers: more passes than bit-planes allow.
    cod = struct.pack(">HHBBHBBBBBB", 0xFF52, 12, 0, 0, 500, 0, 1, 4, 4, 0, 1)
    packets = bytearray()
    for layer in range(500):
        writer = j2k_packets._BitWriter()
        writer.bit(1)
        for _band in range(3):  # included (layer 0: the tag trees' bits too), 1 pass, length 0
            writer.bits(0b100010000 if layer == 0 else 0b10000, 9 if layer == 0 else 5)
        packets += b"\x00" + writer.flush()
    with pytest.raises(Unsupported, match="passes"):
        thin(_forged(8, 8, cod, 4, [bytes(packets)]), 1, ALL)
    # 2. 4 x 4 code-blocks on a 4096 x 4096 tile: a million code-blocks from 16 bytes.
    cod = struct.pack(">HHBBHBBBBBB", 0xFF52, 12, 0, 0, 1, 0, 1, 0, 0, 0, 1)
    with pytest.raises(Unsupported, match="code-blocks"):
        thin(_forged(4096, 4096, cod, 4, [b"\x00\x00"]), 1, ALL)
    # 3. Tiny precincts in 40 tiles of 16 bytes: 14 million empty packets to write.
    cod = struct.pack(">HHBBHBBBBBB", 0xFF52, 18, 1, 1, 1, 0, 5, 4, 4, 0, 1) + bytes([0xFF, 0xFF, 0x11, 0x11, 0x11, 0x11])
    with pytest.raises(Unsupported, match="packets"):
        thin(_forged(1024, 1024, cod, 16, [b"\x00\x00"] * 40), 1, ALL)
    # 4. A tile origin beyond the image (T.800 A.5.1).
    codestream = bytearray(pillow_j2k(xray_like((64, 64))))
    struct.pack_into(">I", codestream, 32, 65)  # XTOsiz > Xsiz
    with pytest.raises(Unsupported, match="origin"):
        thin(bytes(codestream), 1, ALL)


def test_cut_or_damaged_codestreams_raise_only_unsupported():
    image = xray_like((200, 180), seed=7)
    codestream = pillow_j2k(image, quality_layers=[20, 0], quality_mode="rates", precinct_size=(64, 64))
    levels = levels_of(codestream)
    rng = np.random.default_rng(8)
    outcomes = {"unsupported": 0, "rewritten": 0}
    for trial in range(300):
        data = bytearray(codestream)
        if trial % 3 == 0:
            data = data[: rng.integers(2, len(data))]
        else:
            for position in rng.integers(0, len(data), rng.integers(1, 8)):
                data[position] = rng.integers(0, 256)
        try:
            thin(bytes(data), int(rng.integers(1, levels + 1)), frozenset({HL}), int(rng.integers(0, 4)))
            outcomes["rewritten"] += 1
        except Unsupported:
            outcomes["unsupported"] += 1
    assert outcomes["unsupported"] > 50 and outcomes["rewritten"] > 20, outcomes


# --- codestreams from OpenJPEG's own encoder: mode switches, SOP and EPH markers ------------


@pytest.mark.skipif(shutil.which("opj_compress") is None, reason="opj_compress not installed (libopenjp2-tools)")
@pytest.mark.parametrize("flags", [["-SOP", "-EPH"], ["-M", "1"], ["-M", "4"], ["-M", "63"],
                                   ["-SOP", "-EPH", "-r", "20,5,1", "-M", "1"], ["-TP", "R", "-t", "64,64"],
                                   ["-n", "3", "-p", "PCRL", "-t", "63,63", "-c", "[256,256],[32,32],[256,256]"],
                                   ["-p", "CPRL", "-c", "[32,32],[32,32],[64,64]", "-d", "0,63"],
                                   ["-p", "PCRL", "-c", "[64,64],[32,32]", "-t", "100,70", "-d", "7,11", "-T", "5,9"]],
                         ids=["SOP+EPH", "bypass", "termall", "all mode switches", "layers, bypass, markers",
                              "tile-parts", "PCRL, odd tiles", "CPRL, image offset", "PCRL, tile offset"])
def test_openjpeg_encoder_options(tmp_path, flags):
    image = xray_like((180, 150), seed=9)
    source, target = tmp_path / "in.pgm", tmp_path / "out.j2k"
    cv2.imwrite(str(source), image)
    subprocess.run(["opj_compress", "-i", str(source), "-o", str(target), *flags], check=True, capture_output=True)
    codestream = target.read_bytes()
    levels = levels_of(codestream)
    for resolution in range(1, levels + 1):
        skipped = levels - resolution
        np.testing.assert_array_equal(openjp2.decode(thin(codestream, resolution, ALL), skipped)[0],
                                      openjp2.decode(codestream, skipped)[0])
    if not {"-t", "-r", "-d"} & set(flags):
        np.testing.assert_array_equal(openjp2.decode(thin(codestream, levels, frozenset({LH})))[0],
                                      model_decode(image, 0, frozenset({LH})))
