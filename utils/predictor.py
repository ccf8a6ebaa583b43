"""One interface over every model artifact: load it, read its spec, get probabilities.

    predictor = load_predictor("runs/mobilenet_v1-2026.../")      # or best.keras
    probs = predictor.predict(batch)                                # float32 (B, S, S, C) 0..255 -> (B, K)

Entry points (test.py, predict.py, router.py) use this rather than Keras directly, so further
artifact formats (TFLite, ONNX) plug in here with the same preprocessing spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from utils.preprocessing import PreprocessSpec


class Predictor(Protocol):
    spec: PreprocessSpec
    model_id: str
    backbone: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, S, S, C) with values 0..255 -> softmax probabilities float32 (B, K)."""


@dataclass
class KerasPredictor:
    """A .keras file saved by this project (or a run directory's best.keras)."""

    model: object
    spec: PreprocessSpec
    model_id: str
    backbone: str

    def __post_init__(self) -> None:
        import tensorflow as tf

        model = self.model
        self._infer = tf.function(lambda x: tf.nn.softmax(tf.cast(model(x, training=False), tf.float32)),
                                  reduce_retracing=True)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[1:] != self.spec.input_shape:
            raise ValueError(f"batch shape {batch.shape[1:]} differs from the model's {self.spec.input_shape}")
        return self._infer(np.asarray(batch, dtype=np.float32)).numpy()


def load_predictor(path: str | os.PathLike) -> Predictor:
    """A predictor for a run directory or a model file (by suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".keras":
        from utils.artifacts import load_model

        model, info = load_model(path)
        return KerasPredictor(model, info.spec, info.model_id, info.backbone)
    raise ValueError(f"{path}: unsupported model format {suffix!r} (expected a run directory or .keras)")
