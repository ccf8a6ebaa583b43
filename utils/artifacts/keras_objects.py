"""The Keras objects a saved model refers to by name: the one-cycle schedule, coupled-L2 Adam and
the macro-F1 metric, registered as ``router>OneCycle``, ``router>AdamL2`` and ``router>MacroF1``.

A ``.keras`` file compiled for training (every checkpoint of a run) names these in its config;
``keras.models.load_model`` looks those names up in Keras' registry, which this module fills when
it is imported. It is a leaf on purpose (keras and tensorflow only, nothing from this project), so
that loading a model (utils.artifacts.model_file) does not import the training code (utils.train.components, which
re-exports these names for its callers).

The registered names (package "router", the class names) are part of the checkpoint format: do
not rename the classes or the package, or older checkpoints no longer load with ``compile=True``.
The ``module`` that a checkpoint records (``utils.train.components`` before this module existed) is not
used for registered objects, so moving them here kept those checkpoints loadable
(tests/utils/artifacts/test_model_file.py loads one written before the move).
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

REGISTERED_PACKAGE = "router"


@keras.saving.register_keras_serializable(package=REGISTERED_PACKAGE)
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


@keras.saving.register_keras_serializable(package=REGISTERED_PACKAGE)
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


@keras.saving.register_keras_serializable(package=REGISTERED_PACKAGE)
class MacroF1(keras.metrics.Metric):
    """Macro F1 from integer labels and logits, accumulated as a confusion matrix.

    Same semantics as utils.evaluate.metrics / scikit-learn's default: the macro average runs over the
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
    """The learning rate ``optimizer`` applies at its current step (a schedule is evaluated)."""
    lr = optimizer.learning_rate
    return float(lr(optimizer.iterations) if callable(lr) else lr)


__all__ = ["REGISTERED_PACKAGE", "AdamL2", "MacroF1", "OneCycle", "current_lr", "make_optimizer"]
