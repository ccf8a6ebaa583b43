import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from utils.evaluate import metrics
from utils.train.components import AdamL2, MacroF1, OneCycle, class_weights
from utils.train.runner import Phase, plan_phases


def torch_one_cycle(step, max_lr, total, pct=0.3, div=25.0, final_div=1e4):
    """torch.optim.lr_scheduler.OneCycleLR (cos, two phases), transcribed from its documented rule."""
    initial = max_lr / div
    low = initial / final_div
    phase1_end = pct * total - 1
    phase2_end = total - 1

    def cos(start, end, p):
        return end + (start - end) / 2.0 * (math.cos(math.pi * p) + 1)

    if step <= phase1_end:
        return cos(initial, max_lr, step / phase1_end)
    return cos(max_lr, low, (step - phase1_end) / (phase2_end - phase1_end))


def test_one_cycle_matches_torch_rule():
    schedule = OneCycle(0.01, 1000, 0.3, 25.0, 1e4)
    steps = [0, 1, 150, 299, 300, 500, 998, 999]
    ours = [float(schedule(s)) for s in steps]
    ref = [torch_one_cycle(s, 0.01, 1000) for s in steps]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-10)
    assert ours[0] == pytest.approx(0.0004, rel=1e-5) and max(ours) == pytest.approx(0.01, rel=1e-5)
    assert ours[-1] == pytest.approx(0.01 / 25 / 1e4, rel=1e-3)


def test_one_cycle_round_trips_through_config():
    schedule = OneCycle(0.003, 77, 0.25, 10.0, 100.0)
    clone = OneCycle.from_config(schedule.get_config())
    assert float(clone(40)) == pytest.approx(float(schedule(40)))


def test_adam_l2_adds_coupled_decay_before_adam():
    w = keras.Variable(np.array([1.0, -2.0], np.float32))
    grad = np.array([0.5, 0.0], np.float32)
    lr, wd, b1, b2, eps = 0.1, 0.5, 0.9, 0.999, 1e-7
    AdamL2(learning_rate=lr, l2=wd, epsilon=eps).apply_gradients([(tf.constant(grad), w)])
    g = grad + wd * np.array([1.0, -2.0])  # torch: grad += weight_decay * param
    m, v = (1 - b1) * g, (1 - b2) * g * g
    expected = np.array([1.0, -2.0]) - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-5)
    plain = keras.Variable(np.array([1.0, -2.0], np.float32))
    AdamL2(learning_rate=lr, l2=0.0).apply_gradients([(tf.constant(grad), plain)])
    assert plain.numpy()[1] == pytest.approx(-2.0)  # no gradient, no decay -> unchanged
    assert AdamL2.from_config(AdamL2(l2=1e-4).get_config()).l2 == pytest.approx(1e-4)


def test_macro_f1_metric_matches_utils_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    y[y == 3] = 2  # class 3 absent from the labels...
    logits = rng.normal(size=(300, 5)).astype(np.float32)
    logits[:20, 4] += 10  # ...class 4 only predicted
    metric = MacroF1(5)
    for start in range(0, 300, 64):  # accumulates across batches
        metric.update_state(y[start:start + 64], logits[start:start + 64])
    expected = metrics.classification_metrics(y, logits.argmax(1), 5)["macro_f1"]
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_class_weights_inverse_frequency():
    weights = class_weights([0] * 80 + [1] * 20, 3)
    assert weights[2] == 0.0
    assert weights[0] * 80 == pytest.approx(weights[1] * 20)
    assert (weights[0] * 80 + weights[1] * 20) / 100 == pytest.approx(1.0)


@pytest.mark.parametrize("epochs, freeze, pretrained, expected", [
    (10, 2, True, [Phase(0, 2, True), Phase(2, 10, False)]),
    (10, 2, False, [Phase(0, 10, False)]),
    (10, 0, True, [Phase(0, 10, False)]),
    (3, 5, True, [Phase(0, 3, False)]),
])
def test_plan_phases(epochs, freeze, pretrained, expected):
    assert plan_phases(epochs, freeze, pretrained) == expected


def test_several_workers_are_refused_with_the_reason(monkeypatch):
    import json

    from utils.train.components import MultiWorkerUnsupported, select_strategy

    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    with pytest.raises(MultiWorkerUnsupported, match="keras-team/keras#20585"):
        select_strategy()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    assert select_strategy().num_replicas_in_sync == 1


def test_batchnorm_recalibration_brings_moving_statistics_to_the_data():
    from utils.train.components import RecalibrateBatchNorm

    inputs = keras.Input((4,))
    bn = keras.layers.BatchNormalization(momentum=0.9)
    model = keras.Model(inputs, keras.layers.Dense(2)(bn(inputs)))
    data = tf.data.Dataset.from_tensor_slices((np.full((64, 4), 100.0, np.float32) + np.arange(4, dtype=np.float32),
                                               np.zeros(64, np.int32))).batch(8).repeat()
    weights_before = [w.numpy().copy() for w in model.trainable_weights]
    assert np.allclose(bn.moving_mean.numpy(), 0.0)
    callback = RecalibrateBatchNorm(data, steps=60)
    callback.set_model(model)
    callback.on_test_begin()
    np.testing.assert_allclose(bn.moving_mean.numpy(), [100, 101, 102, 103], rtol=0.01)
    for before, after in zip(weights_before, model.trainable_weights):  # statistics only, no gradient step
        np.testing.assert_array_equal(before, after.numpy())


def test_training_reexports_the_registered_keras_objects():
    """utils.train.components keeps the names its callers use; the objects live (and register) in the leaf
    utils.artifacts.keras_objects, under the names older checkpoints were saved with."""
    from utils.artifacts import keras_objects
    from utils.train import components as training

    for name, registered in (("OneCycle", "router>OneCycle"), ("AdamL2", "router>AdamL2"),
                             ("MacroF1", "router>MacroF1")):
        cls = getattr(keras_objects, name)
        assert getattr(training, name) is cls and cls.__module__ == "utils.artifacts.keras_objects"
        assert keras.saving.get_registered_name(cls) == registered
        assert keras.saving.get_registered_object(registered) is cls
    assert training.make_optimizer is keras_objects.make_optimizer
    optimizer = training.make_optimizer(max_lr=0.01, total_steps=10, warmup_fraction=0.3, start_div=25.0,
                                        final_div=1e4, weight_decay=1e-4, clip_value=0.0)
    assert isinstance(optimizer, AdamL2) and optimizer.clipvalue is None and optimizer.l2 == pytest.approx(1e-4)


@pytest.fixture
def restore_policy():
    before = keras.mixed_precision.global_policy()
    yield before
    keras.mixed_precision.set_global_policy(before)


def test_precision_policy_is_scoped_and_restores_the_previous_policy(restore_policy):
    from utils.train.components import precision_policy

    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # something other than the default
    with precision_policy("on") as mixed:
        assert mixed is True and keras.mixed_precision.global_policy().name == "mixed_float16"
        dense = keras.layers.Dense(2)
        with precision_policy("off") as inner:  # nests
            assert inner is False and keras.mixed_precision.global_policy().name == "float32"
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert dense.compute_dtype == "float16"  # a layer made inside keeps the policy it was made with

    with pytest.raises(RuntimeError), precision_policy("off"):  # restored on an exception too
        raise RuntimeError("boom")
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"

    with precision_policy("auto") as auto:
        assert auto == bool(tf.config.list_physical_devices("GPU"))
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
