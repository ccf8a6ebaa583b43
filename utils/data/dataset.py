"""labels.csv of a prepared dataset -> tf.data pipelines. Knows nothing of DICOM.

Small pure steps chained in :func:`build_dataset`: ``decode`` (PNG -> uint8), then for training
``random_affine`` (rotation, and zoom / translation / shear when asked, drawn per image) and
``augment_batch`` (gamma, sharpness, noise when asked, then contrast, brightness, flip; drawn per image),
``to_input`` (float32 0..255, gray replicated to the spec's channels), cache / shuffle / batch /
prefetch. Normalisation for the backbone is a layer inside
the model, so this pipeline and every serving path feed the same 0..255 values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import pandas as pd
import tensorflow as tf

from utils import constants
from utils.data.files import read_labels
from utils.data.split import Fold
from utils.preprocessing import PreprocessSpec


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation; every value is drawn per image."""

    rotation_deg: float = constants.AUGMENT_ROTATION_DEG
    brightness: float = constants.AUGMENT_BRIGHTNESS
    contrast: float = constants.AUGMENT_CONTRAST
    horizontal_flip: bool = constants.HORIZONTAL_FLIP
    scale: float = constants.AUGMENT_SCALE
    translate: float = constants.AUGMENT_TRANSLATE
    shear_deg: float = constants.AUGMENT_SHEAR_DEG
    gamma: float = constants.AUGMENT_GAMMA
    sharpness: float = constants.AUGMENT_SHARPNESS
    noise: float = constants.AUGMENT_NOISE
    border: float = constants.AUGMENT_BORDER  # another site's look (:func:`site_look`): probabilities per image
    invert: float = constants.AUGMENT_INVERT
    equalise: float = constants.AUGMENT_EQUALISE
    resample: float = constants.AUGMENT_RESAMPLE
    jpeg: float = constants.AUGMENT_JPEG

    @property
    def geometric(self) -> bool:
        """Whether an affine warp (rotation, scale, translation, shear) is drawn per image."""
        return bool(self.rotation_deg or self.scale or self.translate or self.shear_deg)

    @property
    def detector(self) -> bool:
        """Whether the look of another detector (gamma curve, blur / edge enhancement, noise) is drawn per image."""
        return bool(self.gamma or self.sharpness or self.noise)

    @property
    def site(self) -> bool:
        """Whether another site's rendering (borders, inversion, equalisation, resolution, JPEG) is drawn per image."""
        return bool(self.border or self.invert or self.equalise or self.resample or self.jpeg)

    @property
    def active(self) -> bool:
        return bool(self.geometric or self.detector or self.site or self.brightness or self.contrast
                    or self.horizontal_flip)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Augmentation:
        """The augmentation of a run's settings (config.json); settings a run predates are off."""
        return cls(settings["augment_rotation_deg"], settings["augment_brightness"], settings["augment_contrast"],
                   settings["horizontal_flip"],
                   **{field: settings.get(f"augment_{field}", 0.0)
                      for field in ("scale", "translate", "shear_deg", "gamma", "sharpness", "noise", "border",
                                    "invert", "equalise", "resample", "jpeg")})


NO_AUGMENTATION = Augmentation(0.0, 0.0, 0.0, False)


def split_frame(data_dir: str | os.PathLike, split: str, class_names: Sequence[str],
                fold: Fold | None = None) -> pd.DataFrame:
    """Rows of one split with absolute paths and integer labels (``y``) in class_names order.

    With ``fold``, the prepared splits are ignored: every labelled image is pooled and the split
    is the image's role in that cross-validation fold's run (utils.data.split)."""
    frame = read_labels(data_dir)
    if fold is not None:
        frame = frame.assign(split=fold.splits(frame["label"].tolist(), frame["group"].tolist()))
    frame = frame[frame["split"] == split].copy()
    unknown = sorted(set(frame["label"]) - set(class_names))
    if unknown:
        raise ValueError(f"{data_dir}: labels {unknown} are not among the class names {list(class_names)}")
    frame["abs_path"] = [str(Path(data_dir) / p) for p in frame["path"]]
    frame["y"] = frame["label"].map({c: i for i, c in enumerate(class_names)}).astype(np.int32)
    return frame.reset_index(drop=True)


def decode(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """PNG file -> uint8 (image_size, image_size, 1)."""
    image = tf.io.decode_png(tf.io.read_file(path), channels=1)
    # A cached PNG of another size fails here ("not compatible with expected shape"): the cache
    # must be prepared at the spec's size, never silently resized (train/serve skew).
    return tf.ensure_shape(image, [image_size, image_size, 1])


def replicate(image: tf.Tensor, channels: int) -> tf.Tensor:
    """(..., 1) -> (..., channels) by repeating the gray channel."""
    return tf.repeat(image, channels, axis=-1) if channels > 1 else image


def to_input(image: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 (..., H, W, 1) -> float32 (..., H, W, channels) with values 0..255."""
    return replicate(tf.cast(image, tf.float32), channels)


def rotate_uint8(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate an 8-bit (H, W, 1) image about its centre, bilinear, black outside (OpenCV, ~0.5 ms at 512px)."""
    rows, cols = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((cols - 1) / 2.0, (rows - 1) / 2.0), float(degrees), 1.0)
    out = cv2.warpAffine(image[:, :, 0], matrix, (cols, rows), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out[:, :, np.newaxis]


def affine_uint8(image: np.ndarray, degrees: float = 0.0, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0),
                 shear_deg: float = 0.0) -> np.ndarray:
    """Warp an 8-bit (H, W, 1) image about its centre: rotate by ``degrees`` (counter-clockwise, as
    rotate_uint8), zoom by ``scale``, shear horizontally by ``shear_deg``, then shift by ``shift``
    (x, y) pixels; bilinear, black outside."""
    rows, cols = image.shape[:2]
    centre = np.array([(cols - 1) / 2.0, (rows - 1) / 2.0])
    angle, shear = np.deg2rad(degrees), np.tan(np.deg2rad(shear_deg))
    rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    linear = scale * rotation @ np.array([[1.0, shear], [0.0, 1.0]])
    matrix = np.hstack([linear, (centre - linear @ centre + np.asarray(shift, dtype=float))[:, None]])
    out = cv2.warpAffine(image[:, :, 0], matrix, (cols, rows), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out[:, :, np.newaxis]


def _affine_batch(images: np.ndarray, params: np.ndarray) -> np.ndarray:
    """One warp per image; ``params`` rows: degrees, scale, shift x, shift y (pixels), shear degrees."""
    return np.stack([affine_uint8(image, d, s, (tx, ty), h) for image, (d, s, tx, ty, h) in zip(images, params)]) \
        if len(images) else images


def random_affine(images: tf.Tensor, aug: Augmentation, seed: tf.Tensor) -> tf.Tensor:
    """Rotation, zoom, translation and shear drawn per image of a uint8 batch (B, H, W, 1) from a
    stateless ``seed``. With rotation alone it is exactly ``random_rotate`` (the paper's recipe)."""
    if not (aug.scale or aug.translate or aug.shear_deg):
        return random_rotate(images, aug.rotation_deg, seed)
    seeds = tf.random.experimental.stateless_split(seed, num=5)
    batch = tf.shape(images)[0]
    size = tf.cast(tf.shape(images)[1:3], tf.float32)

    def draw(i, bound):
        return tf.random.stateless_uniform([batch], seeds[i], -bound, bound) if bound else tf.zeros([batch])

    params = tf.stack([draw(0, aug.rotation_deg), 1.0 + draw(1, aug.scale), draw(2, aug.translate) * size[1],
                       draw(3, aug.translate) * size[0], draw(4, aug.shear_deg)], axis=1)
    warped = tf.numpy_function(_affine_batch, [images, params], tf.uint8, stateful=False)
    return tf.ensure_shape(warped, images.shape)


def _rotate_batch(images: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    return np.stack([rotate_uint8(image, angle) for image, angle in zip(images, degrees)]) if len(images) else images


def random_rotate(images: tf.Tensor, max_degrees: float, seed: tf.Tensor) -> tf.Tensor:
    """Rotate each uint8 image of a batch (B, H, W, 1) by its own angle drawn in [-max, max]
    from a stateless ``seed`` (one OpenCV call per image, one Python call per batch)."""
    angles = tf.random.stateless_uniform([tf.shape(images)[0]], seed, -max_degrees, max_degrees)
    rotated = tf.numpy_function(_rotate_batch, [images, angles], tf.uint8, stateful=False)
    return tf.ensure_shape(rotated, images.shape)


def _gaussian_blur(images: tf.Tensor, sigma: float = 1.0) -> tf.Tensor:
    """A separable Gaussian blur of each channel of a float batch (B, H, W, C), edges mirrored."""
    radius = max(1, int(round(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = tf.constant(taps / taps.sum(), tf.float32)
    channels = images.shape[-1]
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    down = tf.tile(tf.reshape(taps, [-1, 1, 1, 1]), [1, 1, channels, 1])
    across = tf.tile(tf.reshape(taps, [1, -1, 1, 1]), [1, 1, channels, 1])
    rows = tf.nn.depthwise_conv2d(padded, down, strides=[1, 1, 1, 1], padding="VALID")
    return tf.nn.depthwise_conv2d(rows, across, strides=[1, 1, 1, 1], padding="VALID")


def detector_look(images: tf.Tensor, aug: Augmentation, seed: tf.Tensor) -> tf.Tensor:
    """The look of another detector and its processing, drawn per image of a gray float batch
    (B, H, W, 1) with values 0..255: a gamma curve 255 * (x / 255) ** exp(u), u in [-gamma, gamma];
    an unsharp mask x + a * (x - blur(x)), a in [-sharpness, sharpness] (a = -1 is a Gaussian blur
    of sigma 1 px, a > 0 the edge enhancement many X-ray systems apply); Gaussian noise of SD
    drawn in [0, noise] * 255. Each draw has its own seed (folded in), so turning one on leaves the
    others' draws alone."""
    batch = tf.shape(images)[0]

    def draw(k: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([batch, 1, 1, 1], tf.random.experimental.stateless_fold_in(seed, k),
                                           low, high)

    if aug.gamma:
        exponent = tf.exp(draw(0, -aug.gamma, aug.gamma))
        images = 255.0 * tf.pow(tf.clip_by_value(images / 255.0, 0.0, 1.0), exponent)
    if aug.sharpness:
        images = images + draw(1, -aug.sharpness, aug.sharpness) * (images - _gaussian_blur(images))
    if aug.noise:
        sd = draw(2, 0.0, aug.noise) * 255.0
        images = images + sd * tf.random.stateless_normal(tf.shape(images),
                                                          tf.random.experimental.stateless_fold_in(seed, 3))
    return tf.clip_by_value(images, 0.0, 255.0)


BORDER_MAX = 0.2  # the deepest collimation band site_look draws, as a fraction of the image side
RESAMPLE_MAX = 3.0  # the strongest shrink site_look draws (at a 128 px input: a 512 px source shrunk 12 times)
JPEG_QUALITY_MIN = 10  # the lowest JPEG quality site_look draws


def _equalise(image: tf.Tensor) -> tf.Tensor:
    """Global histogram equalisation of one float image (H, W, C) with values 0..255."""
    values = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256, dtype=tf.float32)
    cdf = tf.cumsum(hist)
    low = tf.reduce_min(tf.where(cdf > 0, cdf, tf.fill([256], cdf[-1])))
    lut = (cdf - low) / tf.maximum(cdf[-1] - low, 1.0) * 255.0
    return tf.gather(tf.clip_by_value(lut, 0.0, 255.0), values)


def site_look(images: tf.Tensor, aug: Augmentation, seed: tf.Tensor) -> tf.Tensor:
    """How another site renders the same X-ray, drawn per image of a float batch (B, H, W, C) with values 0..255,
    each with its probability: global histogram equalisation (``equalise``); collimation borders or letterbox bars
    (``border``: on each side with probability 1/2 a band up to BORDER_MAX deep, black or white); a lower
    resolution (``resample``: shrunk by a factor drawn in [1, RESAMPLE_MAX] with area averaging, enlarged back
    bilinearly); a lossy JPEG export (``jpeg``: quality drawn in [JPEG_QUALITY_MIN, 95]); the gray scale inverted
    (``invert``). The shifts of utils/evaluate/shifts.py that broke the small-data model at their mildest
    severities; each draw has its own seed (folded in)."""
    batch, height, width = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]

    def draw(k: int, shape, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
        return tf.random.stateless_uniform(shape, tf.random.experimental.stateless_fold_in(seed, k), low, high)

    if aug.equalise:
        equalised = tf.map_fn(_equalise, images, fn_output_signature=tf.float32)
        images = tf.where(draw(0, [batch, 1, 1, 1]) < aug.equalise, equalised, images)
    if aug.border:
        depth = draw(1, [batch, 4], 0.0, BORDER_MAX) * tf.cast(draw(2, [batch, 4]) < 0.5, tf.float32)
        rows = (tf.cast(tf.range(height), tf.float32) + 0.5) / tf.cast(height, tf.float32)
        cols = (tf.cast(tf.range(width), tf.float32) + 0.5) / tf.cast(width, tf.float32)
        rows, cols = rows[None, :, None, None], cols[None, None, :, None]
        band = ((rows < depth[:, 0, None, None, None]) | (rows > 1.0 - depth[:, 1, None, None, None])
                | (cols < depth[:, 2, None, None, None]) | (cols > 1.0 - depth[:, 3, None, None, None]))
        fill = tf.where(draw(3, [batch, 1, 1, 1]) < 0.5, 0.0, 255.0)
        images = tf.where(band & (draw(4, [batch, 1, 1, 1]) < aug.border), fill, images)
    if aug.resample:  # one factor per batch (resize takes one size), applied to each image with its probability
        factor = draw(6, [], 1.0, RESAMPLE_MAX)
        small = tf.maximum(tf.cast(tf.round(tf.cast(tf.stack([height, width]), tf.float32) / factor), tf.int32), 1)
        blurred = tf.image.resize(tf.image.resize(images, small, method="area"), [height, width], method="bilinear")
        images = tf.where(draw(7, [batch, 1, 1, 1]) < aug.resample, blurred, images)
    if aug.jpeg:
        keys = tf.cast(draw(8, [batch, 2], 0.0, 2.0 ** 30), tf.int32)

        def reencode(args):
            image, key = args
            encoded = tf.image.stateless_random_jpeg_quality(image / 255.0, JPEG_QUALITY_MIN, 95, key)
            return tf.cast(encoded, tf.float32) * 255.0

        reencoded = tf.map_fn(reencode, (images, keys), fn_output_signature=tf.float32)
        images = tf.where(draw(9, [batch, 1, 1, 1]) < aug.jpeg, reencoded, images)
    if aug.invert:
        images = tf.where(draw(5, [batch, 1, 1, 1]) < aug.invert, 255.0 - images, images)
    return images


def augment_batch(images: tf.Tensor, aug: Augmentation, seed: tf.Tensor) -> tf.Tensor:
    """Another site's look (:func:`site_look`), the detector look (gamma, sharpness, noise: :func:`detector_look`,
    on a gray batch), then contrast, brightness (and optional horizontal flip) drawn per image of a float batch
    (B, H, W, C).

    Contrast and brightness are fused into one multiply-add per pixel: x * f + (mean * (1 - f) + b).
    """
    seeds = tf.random.experimental.stateless_split(seed, num=3)
    batch = tf.shape(images)[0]
    if aug.site:
        images = site_look(images, aug, tf.random.experimental.stateless_fold_in(seed, 11))
    if aug.detector:
        images = detector_look(images, aug, tf.random.experimental.stateless_fold_in(seed, 7))
    if aug.contrast or aug.brightness:
        factor = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[0], 1.0 - aug.contrast, 1.0 + aug.contrast)
        shift = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[1], -aug.brightness, aug.brightness) * 255.0
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        images = images * factor + (mean * (1.0 - factor) + shift)
    if aug.horizontal_flip:
        flip = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[2]) < 0.5
        images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    return tf.clip_by_value(images, 0.0, 255.0)


def _seeds(seed: int) -> tf.data.Dataset:
    """An endless stream of stateless seeds (shape (2,)): reproducible, different every draw."""
    return tf.data.Dataset.random(seed=seed).batch(2).map(lambda s: tf.cast(s % (2 ** 31 - 1), tf.int32))


def build_dataset(paths: Sequence[str], labels: Sequence[int] | None, spec: PreprocessSpec, *,
                  training: bool, batch_size: int, augmentation: Augmentation = NO_AUGMENTATION,
                  cache: bool = False, shuffle_buffer: int = constants.SHUFFLE_BUFFER,
                  seed: int = constants.SEED, drop_remainder: bool = False) -> tf.data.Dataset:
    """(image float32 (B, S, S, C) 0..255, label int32 (B,)) batches; labels=None yields images only.

    Training shuffles every epoch and augments each image with its own random draw (rotation on
    the 8-bit image with OpenCV, then contrast/brightness/flip on the float batch); evaluation
    keeps the order of ``paths``. Decoded images are cached (before augmentation) when asked.
    """
    size, channels = spec.image_size, spec.channels
    autotune = tf.data.AUTOTUNE
    paths_ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
    ys = np.asarray(labels if labels is not None else [-1] * len(paths), dtype=np.int32)
    ds = tf.data.Dataset.zip((paths_ds, tf.data.Dataset.from_tensor_slices(ys)))
    ds = ds.map(lambda p, y: (decode(p, size), y), num_parallel_calls=autotune, deterministic=not training)
    if cache:
        ds = ds.cache()
    augmenting = training and augmentation.active
    if training:
        ds = ds.shuffle(min(shuffle_buffer, max(len(paths), 1)), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=autotune,
                  deterministic=not training)
    if augmenting and augmentation.geometric:
        ds = tf.data.Dataset.zip((ds, _seeds(seed))).map(
            lambda xy, s: (random_affine(xy[0], augmentation, s), xy[1]),
            num_parallel_calls=autotune, deterministic=False)
    if augmenting:
        # Photometric augmentation on the single gray channel, then replication (3x less work).
        ds = tf.data.Dataset.zip((ds, _seeds(seed + 1))).map(
            lambda xy, s: (replicate(augment_batch(tf.cast(xy[0], tf.float32), augmentation, s), channels), xy[1]),
            num_parallel_calls=autotune, deterministic=False)
    else:
        ds = ds.map(lambda x, y: (to_input(x, channels), y), num_parallel_calls=autotune,
                    deterministic=not training)
    if labels is None:
        ds = ds.map(lambda x, y: x)
    options = tf.data.Options()
    options.deterministic = not training
    return ds.with_options(options).prefetch(autotune)


def load_split(data_dir: str | os.PathLike, split: str, spec: PreprocessSpec, *, training: bool,
               batch_size: int, augmentation: Augmentation = NO_AUGMENTATION, cache: bool = False,
               seed: int = constants.SEED, fold: Fold | None = None) -> tuple[tf.data.Dataset, pd.DataFrame]:
    """The tf.data pipeline and the rows (in evaluation order) of one split of a prepared dataset
    (of one cross-validation fold's run, with ``fold``)."""
    frame = split_frame(data_dir, split, spec.class_names, fold)
    if frame.empty:
        raise ValueError(f"{data_dir}: split {split!r} is empty")
    dataset = build_dataset(frame["abs_path"].tolist(), frame["y"].tolist(), spec, training=training,
                            batch_size=batch_size, augmentation=augmentation, cache=cache, seed=seed)
    return dataset, frame
