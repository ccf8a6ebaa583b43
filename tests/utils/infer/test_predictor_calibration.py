"""Every artifact format applies the temperature stored with the model, the same way
(utils.infer.predictor.probabilities), and ``--threshold auto`` resolves to the stored recommendation."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from utils.artifacts.model_file import ModelMetadata
from utils.infer.predictor import AUTO_THRESHOLD, probabilities, resolve_threshold, softmax
from utils.preprocessing import PreprocessSpec

SIZE = 32
SPEC = PreprocessSpec(class_names=("a", "b", "c"), image_size=SIZE, channels=1)
TEMPERATURE = 3.0


def tiny_model():
    """Rescaling, a strided convolution, pooling and a dense layer with large weights (confident logits)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(3)
    model = keras.Model(inputs, dense(x))
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 40, bias])
    return model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A .keras model calibrated with T = 3, exported to TFLite (fp32), ONNX and SavedModel."""
    from utils.artifacts.export import export_model
    from utils.artifacts.model_file import read_metadata, save_model, write_metadata

    root = tmp_path_factory.mktemp("calibrated")
    keras_path = save_model(tiny_model(), root / "best.keras", SPEC, model_id="tiny", backbone="test")
    calibration = {"temperature": TEMPERATURE, "fitted_on": "synthetic split=val", "n_images": 10,
                   "threshold": {"target_accuracy": 0.99, "value": 0.8, "coverage": 0.5, "accuracy": 1.0,
                                 "reachable": True}}
    write_metadata(keras_path, read_metadata(keras_path).replace(calibration=calibration))
    paths = {"keras": keras_path}
    for fmt, name in (("tflite", "m.tflite"), ("onnx", "m.onnx"), ("saved_model", "m_saved_model")):
        result = export_model(keras_path, fmt, output=root / name, check_images=8)
        assert result.check["max_abs_prob_diff"] < 1e-4  # checked with the temperature on both sides
        paths[fmt] = result.path
    return paths, calibration


def test_every_format_applies_the_same_temperature(artifacts):
    from utils.infer.predictor import load_predictor

    paths, calibration = artifacts
    batch = np.random.default_rng(0).uniform(0, 255, (6, SIZE, SIZE, 1)).astype(np.float32)
    predictors = {fmt: load_predictor(path) for fmt, path in paths.items()}
    reference = predictors["keras"]
    logits = reference.logits(batch)
    expected = softmax(logits / TEMPERATURE)
    uncalibrated = softmax(logits)
    assert np.abs(expected - uncalibrated).max() > 0.05  # T = 3 changes what the model says
    for fmt, predictor in predictors.items():
        assert predictor.metadata.calibration == calibration, fmt  # the export carries it (sidecar / embedded)
        assert predictor.metadata.temperature == TEMPERATURE
        assert np.allclose(predictor.logits(batch), logits, atol=1e-3), fmt
        probs = predictor.predict(batch)
        assert np.allclose(probs, expected, atol=1e-5), fmt
        assert np.allclose(probs.sum(1), 1.0, atol=1e-5) and np.array_equal(probs.argmax(1), logits.argmax(1))
        assert resolve_threshold(AUTO_THRESHOLD, predictor, paths[fmt]) == 0.8


def test_onnx_embeds_the_calibration_too(artifacts, tmp_path):
    import shutil

    from utils.artifacts.model_file import read_metadata

    paths, calibration = artifacts
    alone = tmp_path / "alone.onnx"  # no sidecar beside it: the JSON inside the file
    shutil.copy(paths["onnx"], alone)
    assert read_metadata(alone).calibration == calibration
    sidecar = json.loads((paths["tflite"].with_name("m.tflite.json")).read_text())
    assert sidecar["calibration"] == calibration and "logits / calibration.temperature" in sidecar["io"]


def test_probabilities_is_softmax_of_logits_over_t():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], np.float32)
    meta = ModelMetadata(SPEC, calibration={"temperature": 2.0})
    assert np.allclose(probabilities(logits, meta), softmax(logits / 2.0))
    assert np.allclose(probabilities(logits, None), softmax(logits))
    assert np.allclose(probabilities(logits, ModelMetadata(SPEC)), softmax(logits))  # no calibration: T = 1
    assert np.allclose(probabilities(logits, 0.5), softmax(logits * 2.0))


@pytest.mark.parametrize("calibration, message", [
    ({"temperature": 0}, "positive"), ({"temperature": "2"}, "positive"), ({"temperature": float("inf")}, "positive"),
    ({"threshold": {"value": 1.5}}, "threshold"), ({"threshold": 0.5}, "threshold"), ([], "object"),
])
def test_unusable_calibrations_are_refused_when_read(calibration, message):
    data = {**ModelMetadata(SPEC).to_dict(), "calibration": calibration}
    with pytest.raises(ValueError, match=message):
        ModelMetadata.from_dict(data)


def test_resolve_threshold():
    calibrated = ModelMetadata(SPEC, calibration={"temperature": 1.5, "threshold": {"value": 0.93, "reachable": True,
                                                                                   "coverage": 0.9, "accuracy": 0.996,
                                                                                   "target_accuracy": 0.995}})
    assert resolve_threshold(0.7, calibrated) == 0.7  # a number stays a number
    assert resolve_threshold("auto", calibrated) == 0.93 and resolve_threshold("AUTO", SimpleNamespace(metadata=calibrated)) == 0.93
    for without in (ModelMetadata(SPEC), ModelMetadata(SPEC, calibration={"temperature": 2.0}),
                    SimpleNamespace(spec=SPEC, predict=None)):  # a predictor with no metadata at all
        with pytest.raises(ValueError, match=r"has none.*Run: python calibrate.py runs/x"):
            resolve_threshold("auto", without, "runs/x")
    unreachable = ModelMetadata(SPEC, calibration={"threshold": {"value": 1.0, "reachable": False,
                                                                 "target_accuracy": 0.995}})
    assert resolve_threshold("auto", unreachable) == 1.0  # review everything, with a warning


def test_resolve_threshold_warns_when_the_recommendation_rests_on_too_few_images(caplog):
    few = ModelMetadata(SPEC, calibration={"temperature": 0.05, "threshold": {
        "value": 1.0, "reachable": True, "coverage": 1.0, "accuracy": 1.0, "target_accuracy": 0.995,
        "n_images": 30, "routed_images": 30, "min_images": 200, "enough_images": False}})
    with caplog.at_level(logging.INFO, logger="utils.infer.predictor"):
        assert resolve_threshold("auto", few) == 1.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "30 of 30 images" in warnings[0] and "too few" in warnings[0], warnings
