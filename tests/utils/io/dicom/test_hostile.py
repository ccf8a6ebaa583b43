"""Hostile DICOM files: the reader answers each with a DicomReadError and a known reason.

Every file is a small write_dicom output (or a pydicom test file) with its dataset or bytes
edited into one of the failures found by fuzzing: codec panics, a JP2 box walk that never ends,
unusable lookup tables, unusable Image Pixel values, lazily converted values, corrupt
sequences and sizes that would allocate gigabytes. The size checks run in a subprocess whose
address space is capped at 1 GiB, so a check that allocated before refusing would fail there.
"""

from __future__ import annotations

import errno
import io
import json
import struct
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_fragmented_frames
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from fuzz.hostile import (
    jp2_wrap,
    write_jp2_zero_length_box,
    write_oversized_jpeg_ls,
    write_panicking_rle,
    write_segmented_palette_bomb,
)
from utils.io.dicom import (
    REASONS,
    DicomReadError,
    read_dicom,
    read_dicom_header,
)
from utils.io.dicom import parse as dicom_parse
from utils.io.dicom_writer import write_dicom, write_non_image

RAMP = np.arange(4096, dtype=np.uint16).reshape(64, 64)
NOISE = np.random.default_rng(0).integers(0, 4096, (64, 72)).astype(np.uint16)


def reason(path, **kwargs) -> str:
    """The reason read_dicom gives, or "ok"."""
    try:
        read_dicom(path, **kwargs)
    except DicomReadError as exc:
        return exc.reason
    return "ok"


def edited(path: Path, edit: Callable[[Dataset], None], **write_kwargs) -> Path:
    """write_dicom(RAMP) (or ``pixels=``), then ``edit`` the dataset and save it again."""
    pixels = write_kwargs.pop("pixels", RAMP)
    write_kwargs.setdefault("bits_stored", 12 if pixels.dtype == np.uint16 else None)
    ds = pydicom.dcmread(write_dicom(path, pixels, **write_kwargs))
    edit(ds)
    ds.save_as(path)
    return path


def set_element(keyword: str, vr: str, value) -> Callable[[Dataset], None]:
    tag = tag_for_keyword(keyword)
    return lambda ds: ds.__setitem__(tag, DataElement(tag, vr, value))


def patched_bytes(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert data.count(old) == 1, old
    path.write_bytes(data.replace(old, new))
    return path


def lut_item(descriptor, data, data_vr: str = "US") -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US", descriptor)  # LUT Descriptor
    if data is not None:
        item.add_new(0x00283006, data_vr, data)  # LUT Data
    return item


def first_frame(ds: Dataset) -> bytearray:
    return bytearray(b"".join(next(generate_fragmented_frames(ds.PixelData))))


def replace_frame(frame: bytes) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        ds.PixelData = encapsulate([bytes(frame)])

    return edit


# --- Every hostile file and the reason it must get ----------------------------------------------


def palette(ds: Dataset, descriptor=(256, 0, 16), entries: int = 256) -> None:
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour in ("Red", "Green", "Blue"):
        ds[tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor")] = DataElement(
            tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor"), "US", list(descriptor))
        ds[tag_for_keyword(f"{colour}PaletteColorLookupTableData")] = DataElement(
            tag_for_keyword(f"{colour}PaletteColorLookupTableData"), "OW",
            np.arange(entries, dtype="<u2").tobytes())


def rle_with_offsets(path: Path, offsets: list[int], count: int | None = None) -> Path:
    ds = pydicom.dcmread(write_dicom(path, NOISE, bits_stored=12, transfer_syntax=RLELossless))
    frame = first_frame(ds)
    struct.pack_into(f"<{1 + len(offsets)}I", frame, 0, len(offsets) if count is None else count, *offsets)
    replace_frame(frame)(ds)
    ds.save_as(path)
    return path


def j2k_with_size(path: Path, size: int, header: int) -> Path:
    """A JPEG 2000 frame whose SIZ (image and tile size) declares size x size."""
    ds = pydicom.dcmread(write_dicom(path, NOISE, bits_stored=12, transfer_syntax=JPEG2000Lossless))
    frame = first_frame(ds)
    struct.pack_into(">II", frame, 8, size, size)  # Xsiz, Ysiz
    struct.pack_into(">II", frame, 24, size, size)  # XTsiz, YTsiz: one tile
    replace_frame(frame)(ds)
    ds.Rows = ds.Columns = header
    ds.save_as(path)
    return path


def cut_inside_sequence(path: Path, sop_class: str) -> Path:
    """A file that ends inside an undefined-length sequence, before any pixel data."""
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, "1.2.3.4"
    if sop_class == pydicom.uid.BasicTextSRStorage:
        write_non_image(path, sop_class, Modality="SR", ReferencedImageSequence=Sequence([item] * 3))
    else:
        write_dicom(path, RAMP, bits_stored=12, extra={"ReferencedImageSequence": Sequence([item] * 3)})
    ds = pydicom.dcmread(path)
    ds["ReferencedImageSequence"].is_undefined_length = True  # parsed while reading, not lazily
    ds.save_as(path)
    data = path.read_bytes()
    start = data.find(b"\x08\x00\x40\x11SQ")  # (0008,1140) Referenced Image Sequence
    assert start > 0
    path.write_bytes(data[: start + 60])  # inside its first item
    return path


def deeply_nested(path: Path, depth: int = 3000) -> Path:
    write_dicom(path, RAMP, bits_stored=12)
    data = path.read_bytes()
    level = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    at = data.find(b"\x28\x00\x10\x00US")  # before Rows
    path.write_bytes(data[:at] + level * depth + close * depth + data[at:])
    return path


def empty_encapsulated(path: Path) -> Path:
    """RLE Lossless whose encapsulated Pixel Data holds no items at all, only its delimiter."""
    data = write_dicom(path, NOISE, bits_stored=12, transfer_syntax=RLELossless).read_bytes()
    head = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
    path.write_bytes(data[: data.index(head) + len(head)] + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    return path


def jpeg_without_sof(path: Path) -> Path:
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    frame = first_frame(ds)
    sof = frame.find(b"\xff\xc0")
    frame[sof + 1] = 0xFE  # SOF0 -> COM: a comment segment, so no frame header before the scan
    replace_frame(frame)(ds)
    ds.save_as(path)
    return path


HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    # 1. A Rust codec panics (pyo3_runtime.PanicException is a BaseException).
    "rle-panic": (lambda p: write_panicking_rle(p), "codec_panic"),
    # 2. A JP2-wrapped frame with a zero-length box: pydicom's box walk never ends.
    "jp2-zero-length-box": (lambda p: write_jp2_zero_length_box(p), "decode_failed"),
    "jp2-without-codestream-box": (lambda p: edited(p, replace_frame(jp2_wrap(b"", 64, 72)[:-8]),
                                                    pixels=NOISE, transfer_syntax=JPEG2000Lossless), "decode_failed"),
    # 3. Modality LUT data that cannot be applied (struct.error, AttributeError, IndexError).
    "modality-lut-short": (lambda p: write_dicom(p, RAMP, bits_stored=12, extra={"ModalityLUTSequence": Sequence(
        [lut_item([4096, 0, 16], b"\x00\x01" * 10, "OW")])}), "invalid_modality_lut"),
    "modality-lut-empty-item": (lambda p: write_dicom(p, RAMP, bits_stored=12, extra={
        "ModalityLUTSequence": Sequence([Dataset()])}), "invalid_modality_lut"),
    "rescale-slope-nan": (lambda p: patched_bytes(write_dicom(p, RAMP, bits_stored=12, rescale=(2.5, 0.0)),
                                                  b"2.5", b"NaN"), "invalid_modality_lut"),
    # 4. Palettes that cannot be applied, and one that would expand to 65 M entries per colour.
    "palette-shorter-than-descriptor": (lambda p: edited(p, lambda ds: palette(ds, (4096, 0, 16), 10),
                                                         pixels=(RAMP % 256).astype(np.uint8)), "invalid_palette"),
    "palette-without-tables": (lambda p: edited(p, set_element("PhotometricInterpretation", "CS", "PALETTE COLOR"),
                                                pixels=(RAMP % 256).astype(np.uint8)), "invalid_palette"),
    "palette-segmented-bomb": (lambda p: write_segmented_palette_bomb(p), "invalid_palette"),
    # 5. Image Pixel values that are multi-valued, non-integer, negative, strings or out of range.
    "rows-two-values": (lambda p: edited(p, set_element("Rows", "US", [64, 64])), "invalid_pixel_module"),
    "rows-text": (lambda p: edited(p, set_element("Rows", "LO", "sixty-four")), "invalid_pixel_module"),
    "rows-negative": (lambda p: edited(p, set_element("Rows", "SS", -64)), "invalid_pixel_module"),
    "columns-fraction": (lambda p: edited(p, set_element("Columns", "DS", "63.5")), "invalid_pixel_module"),
    "rows-missing": (lambda p: edited(p, lambda ds: ds.__delattr__("Rows")), "invalid_pixel_module"),
    "bits-allocated-12": (lambda p: edited(p, set_element("BitsAllocated", "US", 12)), "invalid_pixel_module"),
    "bits-stored-above-allocated": (lambda p: edited(p, set_element("BitsStored", "US", 20)), "invalid_pixel_module"),
    "samples-per-pixel-2": (lambda p: edited(p, set_element("SamplesPerPixel", "US", 2)), "invalid_pixel_module"),
    "monochrome-with-3-samples": (lambda p: edited(p, set_element("SamplesPerPixel", "US", 3)), "invalid_pixel_module"),
    "pixel-representation-2": (lambda p: edited(p, set_element("PixelRepresentation", "US", 2)), "invalid_pixel_module"),
    "frames-negative": (lambda p: edited(p, set_element("NumberOfFrames", "IS", "-3")), "invalid_pixel_module"),
    "frames-text": (lambda p: edited(p, set_element("NumberOfFrames", "LO", "three")), "invalid_pixel_module"),
    "frames-above-is-range": (lambda p: edited(p, set_element("NumberOfFrames", "LO", "2147483648")),
                              "invalid_pixel_module"),
    "frames-absurd": (lambda p: edited(p, set_element("NumberOfFrames", "IS", "2147483647")), "truncated_pixel_data"),
    "planar-configuration-5": (lambda p: edited(p, set_element("PlanarConfiguration", "US", 5),
                                                pixels=np.zeros((8, 8, 3), np.uint8) + 7, photometric="RGB"),
                               "invalid_pixel_module"),
    "pixel-data-empty": (lambda p: edited(p, lambda ds: setattr(ds, "PixelData", b"")), "truncated_pixel_data"),
    "pixel-data-empty-encapsulated": (lambda p: empty_encapsulated(p), "truncated_pixel_data"),
    "pixel-data-as-numbers": (lambda p: edited(p, set_element("PixelData", "US", [1, 2, 3])), "malformed_dicom"),
    # 6. Values pydicom converts lazily: unknown VR, wrong value length.
    "rows-unknown-vr": (lambda p: patched_bytes(write_dicom(p, RAMP, bits_stored=12), b"\x28\x00\x10\x00US",
                                                b"\x28\x00\x10\x00ZZ"), "malformed_dicom"),
    "rows-three-bytes": (lambda p: patched_bytes(write_dicom(p, RAMP, bits_stored=12),
                                                 b"\x28\x00\x10\x00US\x02\x00\x40\x00",
                                                 b"\x28\x00\x10\x00US\x03\x00\x40\x00\x00"), "malformed_dicom"),
    # 7. Parser failures: pydicom's errno-less OSError ("No tag to read"), recursion.
    "sr-cut-inside-sequence": (lambda p: cut_inside_sequence(p, pydicom.uid.BasicTextSRStorage), "malformed_dicom"),
    "image-cut-inside-sequence": (lambda p: cut_inside_sequence(p, pydicom.uid.CTImageStorage), "truncated_pixel_data"),
    "sequences-nested-3000-deep": (deeply_nested, "malformed_dicom"),
    # 8. Codestream checks: header disagreements, malformed segment tables, implausible ratios.
    "jpeg-ls-larger-than-header": (lambda p: write_oversized_jpeg_ls(p, declared=(128, 128), header=(64, 64)),
                                   "decode_failed"),
    "jpeg-ls-7000-from-4-kb": (lambda p: write_oversized_jpeg_ls(p, declared=(7000, 7000)), "implausible_compression"),
    "jpeg-sof-missing": (lambda p: jpeg_without_sof(p), "decode_failed"),
    "rle-first-offset-not-64": (lambda p: rle_with_offsets(p, [60, 400]), "decode_failed"),
    "rle-offsets-decreasing": (lambda p: rle_with_offsets(p, [64, 400, 300]), "decode_failed"),
    "rle-segment-count-wrong": (lambda p: rle_with_offsets(p, [64, 400, 600]), "decode_failed"),
    "j2k-siz-larger-than-header": (lambda p: j2k_with_size(p, 128, 64), "decode_failed"),
}


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    return {name: build(folder / f"{name}.dcm") for name, (build, _) in HOSTILE.items()}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_gets_its_reason(hostile_files, name):
    with pytest.raises(DicomReadError) as caught:
        read_dicom(hostile_files[name])
    assert caught.value.reason == HOSTILE[name][1], caught.value.message
    assert caught.value.reason in REASONS
    assert str(hostile_files[name]) in str(caught.value)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_header_reader_raises_only_dicom_read_errors(hostile_files, name):
    try:
        header = read_dicom_header(hostile_files[name])
    except DicomReadError as exc:
        assert exc.reason in REASONS
    else:
        assert all(isinstance(value, str) for value in header.values())


@pytest.mark.parametrize("name", list(HOSTILE))
def test_warnings_as_errors_still_give_dicom_read_errors(hostile_files, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for read in (read_dicom, read_dicom_header):
            try:
                read(hostile_files[name])
            except DicomReadError as exc:
                assert exc.reason in REASONS


def test_rust_panic_message_names_the_panic(hostile_files):
    with pytest.raises(DicomReadError) as caught:
        read_dicom(hostile_files["rle-panic"])
    assert "PanicException" in str(caught.value) and "RLE Lossless" in str(caught.value)
    assert read_dicom_header(hostile_files["rle-panic"])["Rows"] == "200"  # header needs no codec


def test_pydicom_oserror_without_errno_is_malformed(hostile_files):
    with pytest.raises(DicomReadError) as caught:
        read_dicom(hostile_files["sr-cut-inside-sequence"])
    cause = caught.value.__cause__
    assert isinstance(cause, OSError) and cause.errno is None and "No tag to read" in str(cause)


# --- What must keep working, and what must pass through --------------------------------------


def test_bad_voi_luts_fall_back_to_the_window(tmp_path):
    # struct.error (data shorter than the descriptor) and KeyError (no LUT Data) before.
    for i, item in enumerate([lut_item([4096, 0, 16], b"\x00\x01" * 10, "OW"), lut_item([4096, 0, 16], None)]):
        path = write_dicom(tmp_path / f"voi{i}.dcm", RAMP, bits_stored=12, window=(2000.0, 1000.0),
                           extra={"VOILUTSequence": Sequence([item])})
        assert read_dicom(path).window_source == "window"


@pytest.mark.parametrize("width", [b"1\\abcd", b"abc.de", b"nan   ", b"1e999 "])
def test_unusable_window_values_fall_back_to_percentiles(tmp_path, width):
    # "1\abcd": the first width is usable, pydicom's apply_windowing then fails (a TypeError before)
    path = patched_bytes(write_dicom(tmp_path / "w.dcm", RAMP, bits_stored=12, window=(2000.0, 1000.0)),
                         b"1000.0", width)
    image = read_dicom(path)
    assert image.window_source == "percentile"
    assert np.isfinite(image.pixels).all()


def test_unreadable_header_field_is_empty_not_an_error(tmp_path):
    path = write_dicom(tmp_path / "b.dcm", RAMP, bits_stored=12, body_part="CHEST")
    patched_bytes(path, b"\x18\x00\x15\x00CS", b"\x18\x00\x15\x00ZZ")  # Body Part Examined, unknown VR
    assert read_dicom(path).metadata["BodyPartExamined"] == ""
    assert read_dicom_header(path)["BodyPartExamined"] == ""


@pytest.mark.parametrize("frames", ["0", ""])
def test_zero_or_empty_number_of_frames_means_one(tmp_path, frames):
    path = edited(tmp_path / "f.dcm", set_element("NumberOfFrames", "IS", frames))
    assert np.array_equal(read_dicom(path).pixels, read_dicom(write_dicom(tmp_path / "p.dcm", RAMP,
                                                                          bits_stored=12)).pixels)


def test_well_formed_jp2_wrapper_still_decodes(tmp_path):
    plain = write_dicom(tmp_path / "plain.dcm", NOISE, bits_stored=12, transfer_syntax=JPEG2000Lossless)
    ds = pydicom.dcmread(plain)
    replace_frame(jp2_wrap(bytes(first_frame(ds)), *NOISE.shape))(ds)
    ds.save_as(tmp_path / "jp2.dcm")
    np.testing.assert_array_equal(read_dicom(tmp_path / "jp2.dcm").pixels, read_dicom(plain).pixels)


def test_real_io_errors_propagate(tmp_path):
    data = write_dicom(tmp_path / "a.dcm", RAMP, bits_stored=12).read_bytes()

    class FailingDisk(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 200:
                raise OSError(errno.EIO, "Input/output error")
            return super().read(size)

    with pytest.raises(OSError) as caught:
        read_dicom(FailingDisk(data))
    assert caught.value.errno == errno.EIO and not isinstance(caught.value, DicomReadError)
    with pytest.raises(IsADirectoryError):
        read_dicom(tmp_path)
    with pytest.raises(io.UnsupportedOperation):  # a stream that cannot seek is the caller's problem
        read_dicom(io.BufferedReader(io.RawIOBase()))
    with pytest.raises(FileNotFoundError):
        read_dicom_header(tmp_path / "absent.dcm")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_interrupts_pass_through(tmp_path, monkeypatch, interrupt):
    path = write_dicom(tmp_path / "a.dcm", RAMP, bits_stored=12)

    def interrupted(*args, **kwargs):
        raise interrupt()

    monkeypatch.setattr(get_decoder(ExplicitVRLittleEndian), "as_array", interrupted)
    with pytest.raises(interrupt):
        read_dicom(path)
    monkeypatch.setattr(dicom_parse, "dcmread", interrupted)
    with pytest.raises(interrupt):
        read_dicom_header(path)


@pytest.mark.parametrize(("raised", "expected"), [(MemoryError, "out_of_memory"), (RecursionError, "malformed_dicom"),
                                                  (type("PanicException", (BaseException,), {}), "codec_panic"),
                                                  (RuntimeError, "decode_failed")])
def test_anything_a_decoder_raises_becomes_a_reason(tmp_path, monkeypatch, raised, expected):
    path = write_dicom(tmp_path / "a.dcm", RAMP, bits_stored=12)

    def failing(*args, **kwargs):
        raise raised("from the decoder")

    monkeypatch.setattr(get_decoder(ExplicitVRLittleEndian), "as_array", failing)
    assert reason(path) == expected


# --- Limits -----------------------------------------------------------------------------------


def test_max_pixels_is_the_budget(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", RAMP, bits_stored=12)
    assert reason(path, max_pixels=64 * 64) == "ok"
    assert reason(path, max_pixels=64 * 64 - 1) == "image_too_large"
    lying = write_oversized_jpeg_ls(tmp_path / "b.dcm", declared=(128, 128), header=(64, 64))
    assert reason(lying, max_pixels=10_000) == "image_too_large"  # the codestream's own size counts
    with pytest.raises(ValueError, match="max_pixels"):
        read_dicom(path, max_pixels=0)


def test_deflated_dataset_that_inflates_too_far_is_refused(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "d.dcm", np.tile(RAMP, (8, 8)), bits_stored=12,
                       transfer_syntax=DeflatedExplicitVRLittleEndian)  # 512 x 512: 512 kB inflated
    assert reason(path) == "ok"
    monkeypatch.setattr(dicom_parse, "MAX_INFLATED_BYTES", 100_000)
    assert reason(path) == "image_too_large"
    with pytest.raises(DicomReadError, match="deflate"):
        read_dicom_header(path)


_BUDGET_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from utils.io.dicom import DicomReadError, read_dicom, read_dicom_header
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    results = {}
    for path in sys.argv[1:]:
        outcome = []
        for read in (read_dicom, read_dicom_header):
            try:
                read(path)
                outcome.append("ok")
            except DicomReadError as exc:
                outcome.append(exc.reason)
        results[path] = outcome
    print(json.dumps(results))
""")


def test_huge_declarations_are_refused_without_allocating(tmp_path):
    """Under a 1 GiB address-space cap (a 20000 x 20000 16-bit frame alone is 800 MB)."""
    files = {}
    for size in (20000, 65535):
        files[f"native-{size}"] = edited(tmp_path / f"native-{size}.dcm", lambda ds, s=size: (
            setattr(ds, "Rows", s), setattr(ds, "Columns", s)))
        files[f"jpeg-ls-{size}"] = write_oversized_jpeg_ls(tmp_path / f"jls-{size}.dcm", declared=(size, size))
        files[f"jpeg-ls-{size}-header-64"] = write_oversized_jpeg_ls(tmp_path / f"jls-{size}-64.dcm",
                                                                     declared=(size, size), header=(64, 64))
        files[f"j2k-{size}"] = j2k_with_size(tmp_path / f"j2k-{size}.dcm", size, size)
        files[f"j2k-{size}-header-64"] = j2k_with_size(tmp_path / f"j2k-{size}-64.dcm", size, 64)
    files["jp2-zero-length-box"] = write_jp2_zero_length_box(tmp_path / "jp2.dcm")
    # An element declaring 4 GiB in a 9 kB file (CPython's buffered read(n) allocates n first).
    files["element-4-gib"] = patched_bytes(write_dicom(tmp_path / "len.dcm", RAMP, bits_stored=12),
                                           b"\x10\x00\x20\x00LO", b"\x10\x00\x20\x00UN\x00\x00\xf0\xff\xff\xff")
    run = subprocess.run([sys.executable, "-c", _BUDGET_SCRIPT, *map(str, files.values())], capture_output=True,
                         text=True, timeout=300, check=False, cwd=Path(__file__).resolve().parents[4])
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    outcome = {name: results[str(path)] for name, path in files.items()}
    for size in (20000, 65535):
        for name in (f"native-{size}", f"jpeg-ls-{size}", f"jpeg-ls-{size}-header-64", f"j2k-{size}",
                     f"j2k-{size}-header-64"):
            assert outcome[name][0] == "image_too_large", (name, outcome[name])
            assert outcome[name][1] == "ok", (name, outcome[name])  # the header alone is fine
    assert outcome["jp2-zero-length-box"] == ["decode_failed", "ok"]
    assert "out_of_memory" not in outcome["element-4-gib"] and outcome["element-4-gib"][0] != "ok"
