"""models: every backbone builds and trains, inputs are normalized as its weights expect,
weights load (ImageNet offline, files), BN momentum and freezing work, ResNets are ResNets."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
from models import (
    BACKBONE_INFO,
    WeightsMismatchError,
    WeightsUnavailableError,
    build_model,
    list_models,
)
from models.registry import iter_layers

ALL = ["mobilenet_v1", "mobilenet_v2", "resnet18", "resnet34",
       "efficientnet_b0", "efficientnet_b1", "efficientnet_b2"]
WITH_IMAGENET = ["mobilenet_v1", "mobilenet_v2", "efficientnet_b0", "efficientnet_b1",
                 "efficientnet_b2"]
KERAS_APPS = {
    "mobilenet_v1": (keras.applications.MobileNet, keras.applications.mobilenet.preprocess_input),
    "mobilenet_v2": (keras.applications.MobileNetV2,
                     keras.applications.mobilenet_v2.preprocess_input),
    "efficientnet_b0": (keras.applications.EfficientNetB0,
                        keras.applications.efficientnet.preprocess_input),
    "efficientnet_b1": (keras.applications.EfficientNetB1,
                        keras.applications.efficientnet.preprocess_input),
    "efficientnet_b2": (keras.applications.EfficientNetB2,
                        keras.applications.efficientnet.preprocess_input),
}
SIZE = 64
NUM_CLASSES = 5


@functools.cache
def _built(name: str, channels: int = 3) -> keras.Model:
    """One model per (backbone, channels) shared by the read-only checks below."""
    return build_model(name, NUM_CLASSES, (SIZE, SIZE, channels))


def _images(channels=3, batch=2, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, channels)).astype("float32")


def _layer_output(model, layer_name, x):
    return keras.Model(model.input, model.get_layer(layer_name).output)(x).numpy()


# --- registry -------------------------------------------------------------------------------

def test_list_models_in_paper_order():
    assert list_models() == ALL


def test_imagenet_availability():
    assert [n for n in ALL if BACKBONE_INFO[n].imagenet] == WITH_IMAGENET


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("resnet50", NUM_CLASSES, (SIZE, SIZE, 3))
    for name in ALL:
        assert name in str(err.value)


# --- every backbone -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_forward_and_backward(name):
    model = build_model(name, NUM_CLASSES, (SIZE, SIZE, 3))
    x, y = _images(), np.array([0, 3])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = loss_fn(y, logits)
    assert logits.shape == (2, NUM_CLASSES) and logits.dtype == tf.float32
    assert np.isfinite(logits.numpy()).all()
    grads = tape.gradient(loss, model.trainable_weights)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    before = model.get_layer("logits").kernel.numpy().copy()
    keras.optimizers.SGD(0.1).apply_gradients(zip(grads, model.trainable_weights))
    assert not np.allclose(before, model.get_layer("logits").kernel.numpy())


@pytest.mark.parametrize("name", ALL)
def test_layout_and_bn_momentum_everywhere(name):
    model = _built(name)
    names = [layer.name for layer in model.layers]
    assert names[-3:] == ["avg_pool", "head_dropout", "logits"]
    assert "preprocess" in names and "backbone" in names and "gray_to_rgb" not in names
    assert model.get_layer("logits").activation is keras.activations.linear  # logits
    bns = [layer for layer in iter_layers(model)
           if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(bn.momentum == 0.9 for bn in bns)
    assert all(isinstance(layer, keras.layers.BatchNormalization) is False
               for layer in model.layers)  # every BN sits inside the backbone


# What each backbone's weights expect, from the papers / keras.applications' preprocess_input,
# written out here rather than read from the implementation.
_MEAN, _STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
EXPECTED_RANGE = {
    "mobilenet": lambda c: (np.full(c, -1.0), np.full(c, 1.0)),
    "resnet": lambda c: (np.zeros(c), np.ones(c)),
    "efficientnet": lambda c: ((-_MEAN / _STD, (1 - _MEAN) / _STD) if c == 3 else
                               (np.full(1, -_MEAN.mean() / _STD.mean()),
                                np.full(1, (1 - _MEAN.mean()) / _STD.mean()))),
}


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", ALL)
def test_preprocess_maps_0_255_to_backbone_range(name, channels):
    model = _built(name, channels)
    low, high = EXPECTED_RANGE[BACKBONE_INFO[name].family](channels)
    x = np.stack([np.zeros((SIZE, SIZE, channels)), np.full((SIZE, SIZE, channels), 255.0)])
    out = _layer_output(model, "preprocess", x.astype("float32"))
    np.testing.assert_allclose(out[0], np.broadcast_to(low, out[0].shape), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], np.broadcast_to(high, out[1].shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_single_channel_from_scratch_feeds_backbone_one_channel(name):
    model = _built(name, 1)
    assert "gray_to_rgb" not in [layer.name for layer in model.layers]
    assert model.get_layer("backbone").input.shape[-1] == 1
    logits = model(_images(channels=1), training=False).numpy()
    assert logits.shape == (2, NUM_CLASSES) and np.isfinite(logits).all()


def test_mixed_precision_still_gives_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = build_model("mobilenet_v1", NUM_CLASSES, (32, 32, 3))
        assert model.get_layer("backbone").compute_dtype == "float16"
        logits = model(_images(size=32), training=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == tf.float32 and np.isfinite(logits.numpy()).all()


def test_dropout_is_configurable():
    model = build_model("resnet18", NUM_CLASSES, (32, 32, 3), dropout=0.5)
    assert model.get_layer("head_dropout").rate == 0.5
    with pytest.raises(ValueError, match="dropout"):
        build_model("resnet18", NUM_CLASSES, (32, 32, 3), dropout=1.0)


def test_bad_input_shape_is_rejected():
    with pytest.raises(ValueError, match="input_shape"):
        build_model("resnet18", NUM_CLASSES, (32, 32, 2))


# --- ResNet ---------------------------------------------------------------------------------

# torchvision.models.resnet18/34().parameters(): conv weights (no bias), BN weight + bias, fc.
# That is exactly Keras' trainable set (kernels, BN gamma/beta, Dense); the BN running mean and
# variance are torch buffers but Keras non-trainable weights: 2 per BN channel.
TORCHVISION = {"resnet18": 11_689_512, "resnet34": 21_797_672}
BN_CHANNELS = {
    # stem + 2 BN per block + the projection BN of stages 2-4
    "resnet18": 64 + 2 * (2 * 64 + 2 * 128 + 2 * 256 + 2 * 512) + 128 + 256 + 512,
    "resnet34": 64 + 2 * (3 * 64 + 4 * 128 + 6 * 256 + 3 * 512) + 128 + 256 + 512,
}


@pytest.mark.parametrize("name, blocks", [("resnet18", 8), ("resnet34", 16)])
def test_resnet_matches_torchvision(name, blocks):
    model = build_model(name, 1000, (224, 224, 3))
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    assert trainable == TORCHVISION[name]
    assert non_trainable == 2 * BN_CHANNELS[name]
    backbone = model.get_layer("backbone")
    assert backbone.output.shape[1:] == (7, 7, 512)  # /32 like torchvision
    adds = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == blocks
    projections = [layer for layer in backbone.layers if layer.name.endswith("_proj_conv")]
    assert [p.kernel.shape[:2] for p in projections] == [(1, 1)] * 3
    assert [p.strides for p in projections] == [(2, 2)] * 3


def test_resnet_residual_branch_carries_the_signal():
    """With the second BN of every block zeroed the conv branch outputs 0: only the shortcut
    keeps the features alive (the paper's code, which dropped it, would output zeros)."""
    model = build_model("resnet18", NUM_CLASSES, (SIZE, SIZE, 3))
    backbone = model.get_layer("backbone")
    for layer in backbone.layers:
        if layer.name.endswith("_2_bn"):
            layer.gamma.assign(np.zeros(layer.gamma.shape))
            layer.beta.assign(np.zeros(layer.beta.shape))
    features = keras.Model(model.input, model.get_layer("avg_pool").output)(_images()).numpy()
    assert np.abs(features).max() > 1e-3


# --- BatchNormalization momentum ------------------------------------------------------------

@pytest.mark.parametrize("momentum, expected", [(0.9, 0.9), (None, 0.99)])
def test_bn_momentum_takes_effect_in_a_training_step(momentum, expected):
    """After one fit step from moving_mean 0 / moving_var 1, Keras' BN holds
    m * old + (1 - m) * batch statistic; check it on the first BN layer."""
    model = build_model("resnet18", NUM_CLASSES, (32, 32, 3), bn_momentum=momentum)
    backbone = model.get_layer("backbone")
    bn = backbone.get_layer("stem_bn")
    assert bn.momentum == expected
    x, y = _images(batch=4, size=32), np.array([0, 1, 2, 3])
    stem = keras.Model(backbone.input, backbone.get_layer("stem_conv").output)
    conv_out = stem(model.get_layer("preprocess")(x)).numpy()
    batch_mean, batch_var = conv_out.mean(axis=(0, 1, 2)), conv_out.var(axis=(0, 1, 2))
    model.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, y)
    np.testing.assert_allclose(bn.moving_mean.numpy(), (1 - expected) * batch_mean,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               expected * 1.0 + (1 - expected) * batch_var, rtol=1e-4)


# --- freezing -------------------------------------------------------------------------------

def test_freezing_backbone_leaves_only_the_head_trainable():
    model = build_model("mobilenet_v1", NUM_CLASSES, (32, 32, 3))
    model.get_layer("backbone").trainable = False
    head = model.get_layer("logits")
    assert [id(w) for w in model.trainable_weights] == [id(head.kernel), id(head.bias)]
    backbone_before = [w.numpy().copy() for w in model.get_layer("backbone").weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(_images(size=32), np.array([0, 1]))
    after = model.get_layer("backbone").weights
    assert all(np.array_equal(b, a.numpy()) for b, a in zip(backbone_before, after))


# --- ImageNet weights (this machine is offline: the download is replaced) --------------------

def test_imagenet_for_resnet_is_a_clear_error():
    with pytest.raises(ValueError, match="ImageNet weights are not available for resnet18"):
        build_model("resnet18", NUM_CLASSES, (SIZE, SIZE, 3), weights="imagenet")


@pytest.mark.parametrize("name", WITH_IMAGENET)
def test_imagenet_offline_says_what_to_do(name, monkeypatch, tmp_path):
    fname = BACKBONE_INFO[name].imagenet_file((512, 512, 3)).fname

    def offline(fname, origin, **kwargs):
        # exactly what keras.utils.get_file raises offline
        raise Exception(f"URL fetch failure on {origin}: None -- [Errno -2] Name or service "  # noqa: TRY002
                        "not known")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(models.weights, "get_file", offline)
    with pytest.raises(WeightsUnavailableError) as err:
        build_model(name, NUM_CLASSES, (512, 512, 3), weights="imagenet")
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert f"ImageNet weights for {name} could not be downloaded" in message
    assert "URL fetch failure" in message
    assert str(tmp_path / "models" / fname) in message  # where Keras looks, exact file name
    assert "https://storage.googleapis.com/" in message
    assert "--weights none" in message and "--weights PATH" in message


class _Requested(Exception):
    pass


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square")
@pytest.mark.parametrize("name", WITH_IMAGENET)
@pytest.mark.parametrize("size", [96, 512])
def test_imagenet_file_is_the_one_keras_applications_uses(name, size, monkeypatch):
    """Same file name, URL and hash as keras.applications, so its cache is shared."""
    requested = {}

    def record(fname, origin, **kwargs):
        requested.update(fname=fname, origin=origin, file_hash=kwargs.get("file_hash"))
        raise _Requested

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", record)
    application = KERAS_APPS[name][0]
    with pytest.raises(_Requested):
        application(include_top=False, weights="imagenet", input_shape=(size, size, 3))
    ours = BACKBONE_INFO[name].imagenet_file((size, size, 3))
    assert (ours.fname, ours.origin, ours.file_hash) == (
        requested["fname"], requested["origin"], requested["file_hash"])


def _fake_imagenet_file(name, path):
    """A legacy .h5 shaped like the published no-top file, with random weights whose BN
    statistics are calibrated (so the features depend on the input, unlike a raw random net).
    EfficientNet files store the ImageNet mean and, as variance, the std (tensorflow#49930)."""
    application, preprocess_input = KERAS_APPS[name]
    base = application(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.Normalization)]

    def set_normalization(variance):
        for norm in norms:
            norm.adapt_mean.assign(_MEAN)
            norm.adapt_variance.assign(variance)
            norm.finalize_state()

    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # the next training-mode call stores the batch statistics
    set_normalization(_STD**2)  # calibrate on what the ImageNet model sees: (x/255 - mean)/std
    base(preprocess_input(_images(batch=8, seed=3)), training=True)
    set_normalization(_STD)  # what the published files store
    base.save(str(path))  # legacy HDF5, the format of the published files
    return str(path)


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square")
@pytest.mark.parametrize("name", ["mobilenet_v1", "efficientnet_b0"])
def test_imagenet_gray_input_matches_keras_applications(name, monkeypatch, tmp_path):
    """C=1 + "imagenet": the model repeats the gray channel, normalizes as keras.applications'
    own ImageNet model does (after its documented preprocess_input), and loads the file."""
    fake = _fake_imagenet_file(name, tmp_path / BACKBONE_INFO[name].imagenet_file((SIZE,) * 3).fname)
    calls = []

    def cached(fname, origin, **kwargs):
        calls.append(fname)
        return fake

    monkeypatch.setattr(models.weights, "get_file", cached)
    model = build_model(name, NUM_CLASSES, (SIZE, SIZE, 1), weights="imagenet")
    assert calls == [BACKBONE_INFO[name].imagenet_file((SIZE, SIZE, 1)).fname]
    assert model.get_layer("gray_to_rgb") is not None
    assert model.get_layer("backbone").input.shape[-1] == 3

    monkeypatch.setattr("keras.src.utils.file_utils.get_file", cached)
    application, preprocess_input = KERAS_APPS[name]
    reference = application(include_top=False, weights="imagenet", input_shape=(SIZE, SIZE, 3))
    gray = _images(channels=1)
    features = reference(preprocess_input(np.repeat(gray, 3, axis=-1)), training=False)
    pooled = tf.reduce_mean(features, axis=(1, 2)).numpy()
    assert np.abs(pooled[0] - pooled[1]).mean() > 0.1 * np.abs(pooled).mean()  # not degenerate
    expected = model.get_layer("logits")(tf.reduce_mean(features, axis=(1, 2))).numpy()
    # float32 through ~80 layers whose kernels oneDNN picks at run time: the two graphs differ by about 1e-5 of the
    # largest logit (0.002 on logits up to ~250, in every element, small ones included); a wrong normalisation
    # differs by whole units.
    np.testing.assert_allclose(model(gray, training=False).numpy(), expected,
                               rtol=1e-3, atol=1e-4 * float(np.abs(expected).max()))


def test_gray_to_rgb_flag_is_checked():
    with pytest.raises(ValueError, match="1-channel"):
        build_model("mobilenet_v1", NUM_CLASSES, (32, 32, 3), gray_to_rgb=True)
    with pytest.raises(ValueError, match="3 channels"):
        build_model("mobilenet_v1", NUM_CLASSES, (32, 32, 1), weights="imagenet",
                    gray_to_rgb=False)


# --- weights files --------------------------------------------------------------------------

def _perturbed(name, shape, seed=0, **kwargs):
    """A model whose weights and BN statistics are all moved away from their initial values."""
    model = build_model(name, NUM_CLASSES, shape, **kwargs)
    rng = np.random.default_rng(seed)
    for w in model.weights:
        value = w.numpy()
        if "variance" in w.path:
            w.assign(value * rng.uniform(0.5, 2.0, value.shape))
        else:
            w.assign(value + rng.normal(0, 0.05, value.shape))
    return model


def _predict(model, x):
    return model(x, training=False).numpy()  # eager: no tf.function tracing on 2 cores


@pytest.mark.parametrize("name", ["mobilenet_v1", "efficientnet_b0"])
def test_weights_file_round_trip(name, tmp_path):
    shape = (32, 32, 3)
    model = _perturbed(name, shape)
    x = _images(size=32, seed=5)
    expected = _predict(model, x)
    model.save_weights(tmp_path / "w.weights.h5")
    model.save(tmp_path / "m.keras")
    for path in (tmp_path / "w.weights.h5", tmp_path / "m.keras"):
        rebuilt = build_model(name, NUM_CLASSES, shape, weights=str(path))
        np.testing.assert_allclose(_predict(rebuilt, x), expected, rtol=1e-5, atol=1e-5)
    loaded = keras.models.load_model(tmp_path / "m.keras")  # the whole model, as evaluation does
    np.testing.assert_allclose(_predict(loaded, x), expected, rtol=1e-5, atol=1e-5)


def test_single_channel_file_picks_its_layout(tmp_path):
    shape = (32, 32, 1)
    x = _images(channels=1, size=32)
    for gray_to_rgb in (True, False):
        model = _perturbed("mobilenet_v1", shape, gray_to_rgb=gray_to_rgb)
        path = str(tmp_path / f"{gray_to_rgb}.weights.h5")
        model.save_weights(path)
        rebuilt = build_model("mobilenet_v1", NUM_CLASSES, shape, weights=path)
        assert ("gray_to_rgb" in [layer.name for layer in rebuilt.layers]) == gray_to_rgb
        np.testing.assert_allclose(_predict(rebuilt, x), _predict(model, x), rtol=1e-5, atol=1e-5)


def test_weights_file_of_another_architecture_is_refused(tmp_path):
    # Keras alone loads a file with MORE layers than the model without complaint.
    resnet34 = build_model("resnet34", NUM_CLASSES, (32, 32, 3))
    resnet34.save_weights(tmp_path / "r34.weights.h5")
    with pytest.raises(WeightsMismatchError, match="resnet18"):
        build_model("resnet18", NUM_CLASSES, (32, 32, 3), weights=str(tmp_path / "r34.weights.h5"))
    other_classes = build_model("resnet18", 3, (32, 32, 3))
    other_classes.save_weights(tmp_path / "r18.weights.h5")
    with pytest.raises(ValueError, match=r"shapes differ.*\(512, 5\) vs file \(512, 3\)"):
        build_model("resnet18", NUM_CLASSES, (32, 32, 3), weights=str(tmp_path / "r18.weights.h5"))


def test_weights_argument_is_validated(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_model("resnet18", NUM_CLASSES, (32, 32, 3), weights=str(tmp_path / "x.weights.h5"))
    with pytest.raises(ValueError, match="neither"):
        build_model("resnet18", NUM_CLASSES, (32, 32, 3), weights="model.pt")
    for scratch in (None, "none", "None"):
        assert build_model("resnet18", NUM_CLASSES, (32, 32, 3), weights=scratch) is not None
