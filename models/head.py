"""The one classification head every backbone shares: pool, dropout, Dense producing logits."""

from __future__ import annotations

import keras

HEAD_LAYER_NAMES = ("avg_pool", "head_dropout", "logits")


def classification_head(features, num_classes: int, dropout: float):
    """Global average pooling, dropout, then a Dense layer giving LOGITS (no softmax).

    The Dense layer computes in float32 so logits stay float32 under mixed precision.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)  # kept at rate 0: same graph
    return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
