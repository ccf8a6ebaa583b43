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


def test_the_standard_deviation_is_keras_std_bit_for_bit_in_ops_an_int8_export_keeps_in_xnnpack():
    """The stage std is written as sqrt(mean(d * d)): the same float numbers as keras.ops.std (so detectors
    fitted on either agree), but no SQUARED_DIFFERENCE op, which int8 TFLite runs outside XNNPACK in a
    single-threaded reference kernel (3x the cost of the whole MobileNet at 512 px)."""
    import keras
    import tensorflow as tf

    from models import features

    maps = np.random.default_rng(1).uniform(0, 6, (2, 16, 16, 8)).astype(np.float32)
    assert np.array_equal(features._spatial_std(maps).numpy(), keras.ops.std(maps, axis=(1, 2)).numpy())
    inputs = keras.Input((16, 16, 8))
    model = keras.Model(inputs, features._spatial_std(keras.layers.Conv2D(8, 1)(inputs)))
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([m[None]] for m in maps)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    ops = {op["op_name"] for op in tf.lite.Interpreter(model_content=converter.convert())._get_ops_details()}
    assert "MEAN" in ops and "SQUARED_DIFFERENCE" not in ops
