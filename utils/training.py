"""Training pieces: the paper's one-cycle schedule and coupled-L2 Adam, a macro-F1 metric,
checkpoint / plotting callbacks, device strategy. Used by training.py; nothing runs at import.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from utils.artifacts import BEST_MODEL, LAST_MODEL, save_model
from utils.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="router")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """torch.optim.lr_scheduler.OneCycleLR (anneal_strategy="cos", three_phase=False), per step.

    Starts at ``max_lr / start_div``, rises by cosine to ``max_lr`` over ``warmup_fraction`` of
    ``total_steps``, then anneals by cosine to ``max_lr / start_div / final_div``.
    """

    def __init__(self, max_lr: float, total_steps: int, warmup_fraction: float = 0.3,
                 start_div: float = 25.0, final_div: float = 1e4) -> None:
        self.max_lr, self.total_steps = float(max_lr), int(total_steps)
        self.warmup_fraction, self.start_div, self.final_div = float(warmup_fraction), float(start_div), float(final_div)

    def __call__(self, step):
        initial = self.max_lr / self.start_div
        final = initial / self.final_div
        step = tf.cast(step, tf.float32)
        # torch's phase ends: (pct_start * total - 1) and (total - 1)
        warm_end = tf.maximum(self.warmup_fraction * self.total_steps - 1.0, 1.0)
        end = tf.maximum(float(self.total_steps - 1), warm_end + 1.0)

        def cosine(start, stop, pct):
            return stop + (start - stop) / 2.0 * (tf.cos(math.pi * pct) + 1.0)

        rising = cosine(initial, self.max_lr, tf.clip_by_value(step / warm_end, 0.0, 1.0))
        falling = cosine(self.max_lr, final, tf.clip_by_value((step - warm_end) / (end - warm_end), 0.0, 1.0))
        return tf.where(step <= warm_end, rising, falling)

    def get_config(self) -> dict[str, Any]:
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "warmup_fraction": self.warmup_fraction,
                "start_div": self.start_div, "final_div": self.final_div}


@keras.saving.register_keras_serializable(package="router")
class AdamL2(keras.optimizers.Adam):
    """Adam with coupled L2 weight decay, as torch.optim.Adam(weight_decay=wd): grad += wd * w.

    Applied to every trainable variable (as torch does), after gradient clipping (Keras clips in
    apply_gradients, before update_step; torch clips before optimizer.step()).
    """

    def __init__(self, *args: Any, l2: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        if self.l2:
            gradient = gradient + tf.cast(self.l2, gradient.dtype) * tf.cast(variable, gradient.dtype)
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["l2"] = self.l2
        return config


@keras.saving.register_keras_serializable(package="router")
class MacroF1(keras.metrics.Metric):
    """Macro F1 from integer labels and logits, accumulated as a confusion matrix.

    Same semantics as utils.metrics / scikit-learn's default: the macro average runs over the
    classes present in the labels or the predictions seen so far.
    """

    def __init__(self, num_classes: int, name: str = "macro_f1", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.matrix = self.add_variable(shape=(self.num_classes, self.num_classes), initializer="zeros",
                                        name="confusion", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        y_hat = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        batch = tf.math.confusion_matrix(y_true, y_hat, num_classes=self.num_classes, dtype=tf.float32)
        self.matrix.assign_add(batch)

    def result(self):
        tp = tf.linalg.diag_part(self.matrix)
        actual, predicted = tf.reduce_sum(self.matrix, 1), tf.reduce_sum(self.matrix, 0)
        precision = tf.math.divide_no_nan(tp, predicted)
        recall = tf.math.divide_no_nan(tp, actual)
        f1 = tf.math.divide_no_nan(2 * precision * recall, precision + recall)
        present = tf.cast((actual + predicted) > 0, tf.float32)
        return tf.math.divide_no_nan(tf.reduce_sum(f1 * present), tf.reduce_sum(present))

    def reset_state(self):
        self.matrix.assign(tf.zeros_like(self.matrix))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_classes": self.num_classes}


def make_optimizer(*, max_lr: float, total_steps: int, warmup_fraction: float, start_div: float,
                   final_div: float, weight_decay: float, clip_value: float) -> AdamL2:
    schedule = OneCycle(max_lr, total_steps, warmup_fraction, start_div, final_div)
    return AdamL2(learning_rate=schedule, l2=weight_decay, clipvalue=clip_value or None)


def current_lr(optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr(optimizer.iterations) if callable(lr) else lr)


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

    def __init__(self, run_dir: Path, spec: PreprocessSpec, backbone: str, monitor: str = "val_macro_f1",
                 best: float = -math.inf) -> None:
        super().__init__()
        self.run_dir, self.spec, self.backbone, self.monitor, self.best = run_dir, spec, backbone, monitor, best

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        model_id = f"{self.run_dir.name}/epoch-{epoch + 1}"
        save_model(self.model, self.run_dir / LAST_MODEL, self.spec, model_id=model_id, backbone=self.backbone,
                   extra={"epoch": epoch + 1})
        value = logs.get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            save_model(self.model, self.run_dir / BEST_MODEL, self.spec, model_id=model_id,
                       backbone=self.backbone, extra={"epoch": epoch + 1, self.monitor: self.best})
            (self.run_dir / "best.json").write_text(json.dumps(
                {"epoch": epoch + 1, "model_id": model_id,
                 **{k: float(v) for k, v in logs.items() if np.isscalar(v)}}, indent=2) + "\n")
            log.info("epoch %d: %s improved to %.4f, saved %s", epoch + 1, self.monitor, self.best, BEST_MODEL)


class PlotCurves(keras.callbacks.Callback):
    """Redraws training_curves.png from the CSV log after every epoch."""

    def __init__(self, csv_path: Path, png_path: Path) -> None:
        super().__init__()
        self.csv_path, self.png_path = csv_path, png_path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from utils.plots import plot_training_curves

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


def configure_precision(mode: str) -> bool:
    """Set the global mixed-precision policy; returns whether mixed precision is on."""
    on = mode == "on" or (mode == "auto" and bool(tf.config.list_physical_devices("GPU")))
    keras.mixed_precision.set_global_policy("mixed_float16" if on else "float32")
    return on


def device_name() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        try:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"{len(gpus)} x {details.get('device_name', 'GPU')}"
        except (ValueError, RuntimeError):
            return f"{len(gpus)} GPU(s)"
    from utils.config import cpu_name

    return f"CPU ({cpu_name()}, {os.cpu_count()} cores)"


def seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)
