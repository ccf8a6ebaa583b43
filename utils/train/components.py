"""Training pieces: checkpoint / plotting callbacks, class weights, device strategy, precision
policy. Used by training.py (through utils.train.runner); nothing runs at import.

The paper's one-cycle schedule, coupled-L2 Adam and the macro-F1 metric live in
utils.artifacts.keras_objects (loading a model needs them, training code it does not) and are re-exported
here: ``training.OneCycle``, ``training.AdamL2``, ``training.MacroF1``, ``training.make_optimizer``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from utils.artifacts import run_dir as R
from utils.artifacts.keras_objects import AdamL2, MacroF1, OneCycle, current_lr, make_optimizer  # noqa: F401 (re-exported)
from utils.artifacts.model_file import save_model
from utils.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """Refresh BatchNorm moving statistics before each validation ("precise BN", simplified).

    On small data an epoch has few steps, and the moving averages lag behind fast-changing
    weights: inference-mode predictions collapse while training accuracy is high. Running
    ``steps`` forward passes in training mode on un-augmented training batches (no gradient step)
    brings the statistics to the current weights; the refreshed statistics are also what the
    checkpoint saves.
    """

    def __init__(self, dataset, steps: int) -> None:
        super().__init__()
        self.dataset, self.steps = dataset, int(steps)

    def on_test_begin(self, logs: dict | None = None) -> None:
        forward = tf.function(lambda x: self.model(x, training=True))
        for images, _ in self.dataset.take(self.steps):
            forward(images)


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the learning rate at the end of each epoch to the logs (CSV, TensorBoard, plots)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["learning_rate"] = current_lr(self.model.optimizer)


class Checkpoints(keras.callbacks.Callback):
    """last.keras every epoch (for --resume) and best.keras when ``monitor`` improves.

    Both carry the preprocessing spec. ``best.json`` records which epoch is in best.keras.
    """

    def __init__(self, run_dir: Path, spec: PreprocessSpec, backbone: str, monitor: str = R.MONITOR,
                 best: float = -math.inf) -> None:
        super().__init__()
        self.run_dir, self.spec, self.backbone, self.monitor, self.best = run_dir, spec, backbone, monitor, best

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        model_id = f"{self.run_dir.name}/epoch-{epoch + 1}"
        save_model(self.model, self.run_dir / R.LAST_MODEL, self.spec, model_id=model_id, backbone=self.backbone,
                   extra={"epoch": epoch + 1})
        value = logs.get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            save_model(self.model, self.run_dir / R.BEST_MODEL, self.spec, model_id=model_id,
                       backbone=self.backbone, extra={"epoch": epoch + 1, self.monitor: self.best})
            (self.run_dir / R.BEST_INFO).write_text(json.dumps(
                {"epoch": epoch + 1, "model_id": model_id,
                 **{k: float(v) for k, v in logs.items() if np.isscalar(v)}}, indent=2) + "\n")
            log.info("epoch %d: %s improved to %.4f, saved %s", epoch + 1, self.monitor, self.best, R.BEST_MODEL)


class PlotCurves(keras.callbacks.Callback):
    """Redraws training_curves.png from the CSV log after every epoch."""

    def __init__(self, csv_path: Path, png_path: Path) -> None:
        super().__init__()
        self.csv_path, self.png_path = csv_path, png_path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from utils.evaluate.plots import plot_training_curves

        if self.csv_path.is_file():
            try:
                plot_training_curves(self.csv_path, self.png_path)
            except Exception as error:  # noqa: BLE001 - a plot must never stop training
                log.warning("could not draw %s: %s", self.png_path, error)


def class_weights(labels: Sequence[int], num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights normalised to mean 1 over the present classes."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(float)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return {i: float(w) for i, w in enumerate(weights)}


class MultiWorkerUnsupported(RuntimeError):
    """Several workers were asked for; Keras 3 cannot train with MultiWorkerMirroredStrategy."""


def select_strategy() -> tf.distribute.Strategy:
    """Mirrored across local GPUs, else the default strategy; several workers are refused (see below)."""
    if os.environ.get("TF_CONFIG"):
        cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        if len(cluster.get("worker", [])) > 1:
            # Tried with two workers on localhost (TF 2.21, Keras 3.15): the strategy forms, then
            # Keras' fit fails converting PerReplica inputs to tensors. Upstream: keras-team/keras
            # issue 20585, tensorflow/tensorflow issue 72388. Refuse clearly instead.
            raise MultiWorkerUnsupported(
                f"TF_CONFIG names {len(cluster['worker'])} workers, but Keras 3's fit() does not work with "
                "tf.distribute.MultiWorkerMirroredStrategy (keras-team/keras#20585). Train on one machine "
                "(all its GPUs are used through MirroredStrategy), or unset TF_CONFIG.")
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        log.info("%d GPUs: MirroredStrategy", len(gpus))
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


PRECISION_MODES = ("auto", "on", "off")


def wants_mixed_precision(mode: str) -> bool:
    """"on", or "auto" with a GPU visible; anything else (normally "off") is float32."""
    return mode == "on" or (mode == "auto" and bool(tf.config.list_physical_devices("GPU")))


@contextlib.contextmanager
def precision_policy(mode: str) -> Iterator[bool]:
    """Keras' global dtype policy set for ``mode`` ("auto", "on", "off") inside the block, the previous
    policy restored on exit (also on an exception); yields whether mixed precision is on.

        with precision_policy("auto") as mixed:
            model = build_model(...)   # layers take the policy when they are created

    Keras reads the global policy when a layer is created, so the models built inside the block keep
    their dtype after it; code run after it (another test, another model in the same process) sees the
    policy that was in force before.
    """
    previous = keras.mixed_precision.global_policy()
    on = wants_mixed_precision(mode)
    keras.mixed_precision.set_global_policy("mixed_float16" if on else "float32")
    try:
        yield on
    finally:
        keras.mixed_precision.set_global_policy(previous)


def seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)
