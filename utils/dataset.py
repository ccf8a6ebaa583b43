"""labels.csv of a prepared dataset -> tf.data pipelines. Knows nothing of DICOM.

Small pure steps chained in :func:`build_dataset`: ``decode`` (PNG -> uint8), ``to_input``
(float32 0..255, gray replicated to the spec's channels), ``augment`` (training only, drawn per
image), then cache / shuffle / batch / prefetch. Normalisation for the backbone is a layer inside
the model, so this pipeline and every serving path feed the same 0..255 values.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from utils import constants
from utils.preprocessing import PreprocessSpec
from utils.prepare import read_labels


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation; every value is drawn per image."""

    rotation_deg: float = constants.AUGMENT_ROTATION_DEG
    brightness: float = constants.AUGMENT_BRIGHTNESS
    contrast: float = constants.AUGMENT_CONTRAST
    horizontal_flip: bool = constants.HORIZONTAL_FLIP

    @property
    def active(self) -> bool:
        return bool(self.rotation_deg or self.brightness or self.contrast or self.horizontal_flip)


NO_AUGMENTATION = Augmentation(0.0, 0.0, 0.0, False)


def split_frame(data_dir: str | os.PathLike, split: str, class_names: Sequence[str]) -> pd.DataFrame:
    """Rows of one split with absolute paths and integer labels (``y``) in class_names order."""
    frame = read_labels(data_dir)
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
    image = tf.ensure_shape(image, [None, None, 1])
    tf.debugging.assert_equal(tf.shape(image)[:2], [image_size, image_size],
                              message="cached image size differs from the spec's image_size")
    return tf.ensure_shape(image, [image_size, image_size, 1])


def to_input(image: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 (H, W, 1) -> float32 (H, W, channels) with values 0..255."""
    image = tf.cast(image, tf.float32)
    return tf.repeat(image, channels, axis=-1) if channels > 1 else image


def rotation_matrix(angles: tf.Tensor, size: int) -> tf.Tensor:
    """Projective transforms (N, 8) rotating N images by ``angles`` (radians) about the centre."""
    centre = (size - 1) / 2.0
    cos, sin = tf.cos(angles), tf.sin(angles)
    # Maps output coordinates to input coordinates, as ImageProjectiveTransformV3 expects.
    x_offset = centre - (cos * centre - sin * centre)
    y_offset = centre - (sin * centre + cos * centre)
    zeros = tf.zeros_like(angles)
    return tf.stack([cos, -sin, x_offset, sin, cos, y_offset, zeros, zeros], axis=1)


def augment(image: tf.Tensor, aug: Augmentation, seed: tf.Tensor) -> tf.Tensor:
    """Random rotation, brightness, contrast (and optional flip) for one float image (H, W, C).

    ``seed`` is a stateless seed of shape (2,), different for every image and epoch.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    size = image.shape[0]
    if aug.rotation_deg:
        angle = tf.random.stateless_uniform([1], seeds[0], -aug.rotation_deg, aug.rotation_deg) * (math.pi / 180)
        image = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[tf.newaxis], transforms=rotation_matrix(angle, size),
            output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="BILINEAR",
            fill_mode="CONSTANT")[0]
    if aug.contrast:
        factor = tf.random.stateless_uniform([], seeds[1], 1.0 - aug.contrast, 1.0 + aug.contrast)
        mean = tf.reduce_mean(image)
        image = (image - mean) * factor + mean
    if aug.brightness:
        image = image + tf.random.stateless_uniform([], seeds[2], -aug.brightness, aug.brightness) * 255.0
    if aug.horizontal_flip:
        flip = tf.random.stateless_uniform([], seeds[3]) < 0.5
        image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    return tf.clip_by_value(image, 0.0, 255.0)


def build_dataset(paths: Sequence[str], labels: Sequence[int] | None, spec: PreprocessSpec, *,
                  training: bool, batch_size: int, augmentation: Augmentation = NO_AUGMENTATION,
                  cache: bool = False, shuffle_buffer: int = constants.SHUFFLE_BUFFER,
                  seed: int = constants.SEED, drop_remainder: bool = False) -> tf.data.Dataset:
    """(image float32 (B, S, S, C) 0..255, label int32 (B,)) batches; labels=None yields images only.

    Training shuffles every epoch and augments each image with its own random draw; evaluation
    keeps the order of ``paths``. Decoded images are cached (before augmentation) when asked.
    """
    size, channels = spec.image_size, spec.channels
    autotune = tf.data.AUTOTUNE
    paths_ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
    if labels is not None:
        ds = tf.data.Dataset.zip((paths_ds, tf.data.Dataset.from_tensor_slices(
            tf.constant(np.asarray(labels, dtype=np.int32)))))
    else:
        ds = paths_ds.map(lambda p: (p, tf.constant(-1, tf.int32)))
    ds = ds.map(lambda p, y: (decode(p, size), y), num_parallel_calls=autotune, deterministic=not training)
    if cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(shuffle_buffer, max(len(paths), 1)), seed=seed, reshuffle_each_iteration=True)
    if training and augmentation.active:
        # Per-image stateless seeds from a counter: reproducible and different every epoch.
        counter = tf.data.Dataset.random(seed=seed).batch(2)
        ds = tf.data.Dataset.zip((ds, counter)).map(
            lambda xy, s: (augment(to_input(xy[0], channels), augmentation, tf.cast(s, tf.int32)), xy[1]),
            num_parallel_calls=autotune, deterministic=False)
    else:
        ds = ds.map(lambda x, y: (to_input(x, channels), y), num_parallel_calls=autotune,
                    deterministic=not training)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=autotune)
    if labels is None:
        ds = ds.map(lambda x, y: x)
    options = tf.data.Options()
    options.deterministic = not training
    return ds.with_options(options).prefetch(autotune)


def load_split(data_dir: str | os.PathLike, split: str, spec: PreprocessSpec, *, training: bool,
               batch_size: int, augmentation: Augmentation = NO_AUGMENTATION, cache: bool = False,
               seed: int = constants.SEED) -> tuple[tf.data.Dataset, pd.DataFrame]:
    """The tf.data pipeline and the rows (in evaluation order) of one split of a prepared dataset."""
    frame = split_frame(data_dir, split, spec.class_names)
    if frame.empty:
        raise ValueError(f"{data_dir}: split {split!r} is empty")
    dataset = build_dataset(frame["abs_path"].tolist(), frame["y"].tolist(), spec, training=training,
                            batch_size=batch_size, augmentation=augmentation, cache=cache, seed=seed)
    return dataset, frame
