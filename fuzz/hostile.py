"""Hand-made hostile DICOM files whose failure modes are known exactly (used by tests and the corpus)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np


def write_panicking_rle(path: str | os.PathLike, *, rows: int = 200, columns: int = 240, seed: int = 0) -> Path:
    """An RLE Lossless file whose second segment offset (70) points inside the first segment.

    pylibjpeg-rle 2.x panics on it (``pyo3_runtime.PanicException: index out of bounds``): a
    BaseException, not an Exception, that passes every ``except Exception``.
    """
    from pydicom import dcmread
    from pydicom.encaps import encapsulate, generate_fragmented_frames
    from pydicom.uid import RLELossless

    from utils.io.dicom_writer import write_dicom

    image = np.random.default_rng(seed).integers(0, 4096, (rows, columns)).astype(np.uint16)
    path = Path(path)
    write_dicom(path, image, transfer_syntax=RLELossless, bits_stored=12)
    ds = dcmread(path)
    frame = bytearray(next(generate_fragmented_frames(ds.PixelData))[0])
    struct.pack_into("<I", frame, 8, 70)  # header: segment count, then offsets of segments 1, 2...
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path, enforce_file_format=True)
    return path


def write_jp2_zero_length_box(path: str | os.PathLike, *, rows: int = 64, columns: int = 72, seed: int = 0) -> Path:
    """A JPEG 2000 Lossless file whose frame is a JP2 file (not a bare codestream) with a
    zero-length header box before its codestream box.

    Length 0 means "up to the end of the file", so only the last box may use it. pydicom
    3.0's ``get_j2k_parameters`` walks the boxes by their lengths and never gets past it:
    decoding such a frame with pydicom hangs.
    """
    from pydicom import dcmread
    from pydicom.encaps import encapsulate, generate_fragmented_frames
    from pydicom.uid import JPEG2000Lossless

    from utils.io.dicom_writer import write_dicom

    image = np.random.default_rng(seed).integers(0, 4096, (rows, columns)).astype(np.uint16)
    path = Path(path)
    write_dicom(path, image, transfer_syntax=JPEG2000Lossless, bits_stored=12)
    ds = dcmread(path)
    codestream = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    ds.PixelData = encapsulate([jp2_wrap(codestream, rows, columns, header_box_length=0)])
    ds.save_as(path, enforce_file_format=True)
    return path


def jp2_wrap(codestream: bytes, rows: int, columns: int, *, header_box_length: int | None = None) -> bytes:
    """``codestream`` in a JP2 file: signature, file type, header (image header, greyscale
    colour) and codestream boxes. ``header_box_length`` overrides the header box's length."""

    def box(kind: bytes, payload: bytes, length: int | None = None) -> bytes:
        return struct.pack(">I", 8 + len(payload) if length is None else length) + kind + payload

    image_header = box(b"ihdr", struct.pack(">IIHBBBB", rows, columns, 1, 11, 7, 0, 0))
    colour = box(b"colr", bytes([1, 0, 0]) + struct.pack(">I", 17))  # enumerated: greyscale
    return (box(b"jP  ", b"\r\n\x87\n") + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ")
            + box(b"jp2h", image_header + colour, header_box_length) + box(b"jp2c", codestream))


def write_oversized_jpeg_ls(path: str | os.PathLike, *, declared: tuple[int, int] = (20000, 20000),
                            header: tuple[int, int] | None = None) -> Path:
    """pydicom's 64 x 64 JPEG-LS test image (4 kB of codestream) with its frame header (SOF55)
    declaring ``declared`` (rows, columns) and the DICOM Rows/Columns ``header`` (default:
    the same). pylibjpeg-libjpeg decodes 20000 x 20000 of it for about 40 s, and allocates the
    whole frame first."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.encaps import encapsulate, generate_fragmented_frames

    ds = dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    frame = bytearray(b"".join(next(generate_fragmented_frames(ds.PixelData))))
    sof = frame.find(b"\xff\xf7")
    struct.pack_into(">HH", frame, sof + 5, *declared)  # length, precision, then Y, X
    ds.PixelData = encapsulate([bytes(frame)])
    ds.Rows, ds.Columns = header or declared
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_segmented_palette_bomb(path: str | os.PathLike, *, segments: int = 1000) -> Path:
    """A PALETTE COLOR image whose segmented lookup tables are ``segments`` linear segments of
    65,535 entries each: 23 kB that pydicom expands into 65 million entries per colour (9 s,
    several GB) before it compares them with the 256 entries the descriptor declares."""
    from pydicom import dcmread
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import DataElement

    from utils.io.dicom_writer import write_dicom

    path = Path(path)
    write_dicom(path, (np.arange(64 * 64) % 256).astype(np.uint8).reshape(64, 64))
    ds = dcmread(path)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    words = [0, 1, 0] + [1, 65535, 65535] * segments  # one discrete entry, then linear segments
    for colour in ("Red", "Green", "Blue"):
        descriptor = tag_for_keyword(f"{colour}PaletteColorLookupTableDescriptor")
        ds[descriptor] = DataElement(descriptor, "US", [256, 0, 16])
        data = tag_for_keyword(f"Segmented{colour}PaletteColorLookupTableData")
        ds[data] = DataElement(data, "OW", struct.pack(f"<{len(words)}H", *words))
    ds.save_as(path, enforce_file_format=True)
    return path
