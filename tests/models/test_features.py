"""models/features.py: the stage statistics output, for one backbone of each family."""

from __future__ import annotations

import numpy as np
import pytest

from models import build_model
from models.features import stage_sizes, with_features


@pytest.mark.parametrize("name, channels", [("mobilenet_v1", 1), ("mobilenet_v2", 3), ("resnet18", 1),
                                            ("efficientnet_b0", 3)])
def test_the_second_output_keeps_the_logits_and_adds_every_stage(name, channels):
    model = build_model(name, 4, (64, 64, channels))
    both = with_features(model)
    sizes = stage_sizes(model)
    assert both is not None and len(sizes) >= 4  # one block per resolution, 32 px down to 2 px at least
    batch = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, channels)).astype(np.float32)
    logits, features = (t.numpy() for t in both(batch, training=False))
    assert np.array_equal(logits, model(batch, training=False).numpy())  # the model's own logits, bit for bit
    assert features.shape == (3, sum(sizes)) and np.all(np.isfinite(features))
    assert len(both.layers) < len(model.layers) + 8  # the backbone runs once, not twice


def test_a_model_of_another_structure_has_no_features():
    import keras

    inputs = keras.Input((8, 8, 1))
    plain = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
    assert with_features(plain) is None and stage_sizes(plain) is None
