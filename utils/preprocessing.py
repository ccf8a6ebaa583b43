"""The preprocessing spec: the one contract shared by training and serving.

Training reads images that prepare.py wrote; predict, router and test may read raw DICOM. Both
paths go through :func:`preprocess_file`, so a model sees the same pixels in production as in
training:

1. decode to a 2-D float image in [0, 1] in display orientation (DICOM: modality LUT, VOI LUT or
   window or percentile range, MONOCHROME1 inverted; PNG/JPEG: taken as already displayed). A
   JPEG 2000 DICOM at least twice the output size is decoded at a reduced resolution level that
   still covers the output (``utils.io.dicom.read_dicom``'s ``target_shape``), so step 2 starts
   from an image 2**k times smaller: close to, not identical with, a full-resolution decode
   (tests/utils/io/dicom/test_decode_fast.py measures and bounds the difference);
2. resize to ``image_size`` with the aspect policy (``stretch`` or ``letterbox``), area
   interpolation when shrinking, linear when enlarging, in float;
3. round to 8 bits (this is what the cache stores as PNG);
4. the model input is that 8-bit image as float32 0..255, gray replicated to ``channels``.
   Backbone-specific normalisation is a layer inside the model (models/), so exported
   artifacts carry it too.

A :class:`PreprocessSpec` is saved with every prepared dataset (``preprocess.json``) and every
trained model, and entry points read it from the model, not from today's constants.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from utils import config, constants

SPEC_VERSION = 1  # the format of a spec file; what its pixels look like is PIPELINE_VERSION's business
# Bump when steps 2-3 below produce other 8-bit images for the same decoded image and spec.
# Prepared caches are keyed on it together with the reader's version (see pixel_provenance).
PIPELINE_VERSION = 1
SPEC_FILENAME = "preprocess.json"
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class ImageReadError(ValueError):
    """A raster image (PNG/JPEG...) could not be read; ``reason`` is a short code."""

    def __init__(self, message: str, reason: str = "unreadable_image", path: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn a file into the model's input tensor."""

    class_names: tuple[str, ...] = constants.CLASS_NAMES
    image_size: int = constants.IMAGE_SIZE
    channels: int = constants.CHANNELS
    aspect: str = constants.ASPECT
    window_percentiles: tuple[float, float] = constants.WINDOW_PERCENTILES
    input_range: str = "0-255"  # float32 8-bit display values; normalisation lives in the model
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        """The bounds of the flags (constants.py ``*_RANGE``/``*_CHOICES``, utils.config.validate)
        hold for a spec read from a file too; config.ConfigError is a ValueError."""
        config.validate({"class_names": self.class_names, "image_size": self.image_size, "channels": self.channels,
                         "aspect": self.aspect, "window_percentiles": self.window_percentiles},
                        where="preprocessing spec")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)

    def same_pixels(self, other: "PreprocessSpec") -> bool:
        """Whether both specs produce the same 8-bit cache images (size, aspect, windowing)."""
        return (self.image_size, self.aspect, tuple(self.window_percentiles)) == (
            other.image_size, other.aspect, tuple(other.window_percentiles))

    def pixel_fields(self) -> dict[str, Any]:
        """The fields that decide the cached 8-bit images (what same_pixels compares)."""
        return {"image_size": self.image_size, "aspect": self.aspect,
                "window_percentiles": [float(v) for v in self.window_percentiles]}

    def replace(self, **changes: Any) -> "PreprocessSpec":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["class_names"] = list(self.class_names)
        data["window_percentiles"] = list(self.window_percentiles)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing spec keys {sorted(unknown)}")
        if data.get("version", SPEC_VERSION) > SPEC_VERSION:
            raise ValueError(f"spec version {data['version']} is newer than this code ({SPEC_VERSION})")
        data = dict(data)
        data["class_names"] = tuple(data["class_names"])
        data["window_percentiles"] = tuple(float(v) for v in data["window_percentiles"])
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreprocessSpec":
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILENAME
        return cls.from_dict(json.loads(path.read_text()))


@functools.cache
def pixel_provenance() -> dict[str, str]:
    """What, beside the spec and the file, decides the pixels of a prepared image: this pipeline's
    version, OpenCV's (resizing, raster reading) and the DICOM reader's and its decoders'."""
    from utils.io import dicom

    return {"pipeline": str(PIPELINE_VERSION), "opencv": cv2.__version__, **dicom.decoder_versions()}


def is_raster(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in RASTER_SUFFIXES


def read_raster(path: str | os.PathLike) -> np.ndarray:
    """A PNG/JPEG/TIFF as a 2-D float32 image in [0, 1] (8- and 16-bit; colour -> luminance)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file", "empty_file", str(path))
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(f"{path}: not a readable image", "unreadable_image", str(path))
    if image.ndim == 3:
        if image.shape[2] == 4:
            image = image[:, :, :3]
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.shape[2] == 3 else image[:, :, 0]
    if image.dtype == np.uint8:
        out = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        out = image.astype(np.float32) / 65535.0
    else:
        out = image.astype(np.float32)
        lo, hi = float(out.min()), float(out.max())
        out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    if out.size == 0 or min(out.shape) == 0:
        raise ImageReadError(f"{path}: image has no pixels", "empty_image", str(path))
    return out


def load_display_image(path: str | os.PathLike, spec: PreprocessSpec) -> tuple[np.ndarray, dict[str, str]]:
    """Step 1: any supported file -> (2-D float32 [0, 1] display image, DICOM header fields).

    Raises utils.io.dicom.DicomReadError or ImageReadError with a ``reason``.
    """
    from utils.io import dicom  # pydicom is only needed for DICOM inputs

    if is_raster(path):
        return read_raster(path), {}
    image = dicom.read_dicom(path, percentiles=tuple(spec.window_percentiles),
                             target_shape=functools.partial(resized_shape, size=spec.image_size,
                                                            aspect=spec.aspect))
    return image.pixels, dict(image.metadata)


def resized_shape(rows: int, cols: int, size: int, aspect: str) -> tuple[int, int]:
    """The (rows, cols) step 2 resizes a (rows, cols) image to, before letterbox padding."""
    if aspect == "stretch":
        return size, size
    if aspect == "letterbox":
        scale = size / max(rows, cols)
        return max(1, round(rows * scale)), max(1, round(cols * scale))
    raise ValueError(f"unknown aspect policy {aspect!r}")


def resize_display(image: np.ndarray, size: int, aspect: str) -> np.ndarray:
    """Step 2: float image -> (size, size) float image with the aspect policy."""
    rows, cols = image.shape
    target_rows, target_cols = resized_shape(rows, cols, size, aspect)
    shrinking = target_rows * target_cols < rows * cols
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(np.ascontiguousarray(image, dtype=np.float32), (target_cols, target_rows),
                         interpolation=interpolation)
    if aspect == "stretch":
        return resized
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - target_rows) // 2, (size - target_cols) // 2
    canvas[top : top + target_rows, left : left + target_cols] = resized
    return canvas


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Step 3: [0, 1] float -> 8-bit, rounding to nearest."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def display_to_cache(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Steps 2-3: the 8-bit (size, size) image stored in the cache and fed to the model."""
    return to_uint8(resize_display(image, spec.image_size, spec.aspect))


def preprocess_file(path: str | os.PathLike, spec: PreprocessSpec) -> tuple[np.ndarray, dict[str, str]]:
    """Steps 1-3 for one file: (8-bit (size, size) image, DICOM header fields)."""
    image, metadata = load_display_image(path, spec)
    return display_to_cache(image, spec), metadata


def to_model_input(image_uint8: np.ndarray, channels: int) -> np.ndarray:
    """Step 4 (NumPy): 8-bit (H, W) or batch (N, H, W) -> float32 (..., H, W, channels), 0..255."""
    x = image_uint8.astype(np.float32)[..., np.newaxis]
    return np.repeat(x, channels, axis=-1) if channels > 1 else x
