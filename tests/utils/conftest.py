"""Fixtures shared by the DICOM reader and writer tests."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from utils.io.dicom_writer import write_dicom


@pytest.fixture
def write(tmp_path):
    """``write(pixels, **write_dicom_kwargs) -> Path``: a fresh file in tmp_path per call."""
    counter = itertools.count()

    def _write(pixels: np.ndarray, name: str | None = None, **kwargs):
        return write_dicom(tmp_path / (name or f"image_{next(counter)}.dcm"), pixels, **kwargs)

    return _write


@pytest.fixture
def ramp12() -> np.ndarray:
    """Every 12-bit value once: 64 x 64 uint16, 0..4095 row by row."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)
