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

    from utils.dicom_writer import write_dicom

    image = np.random.default_rng(seed).integers(0, 4096, (rows, columns)).astype(np.uint16)
    path = Path(path)
    write_dicom(path, image, transfer_syntax=RLELossless, bits_stored=12)
    ds = dcmread(path)
    frame = bytearray(next(generate_fragmented_frames(ds.PixelData))[0])
    struct.pack_into("<I", frame, 8, 70)  # header: segment count, then offsets of segments 1, 2...
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path, enforce_file_format=True)
    return path
