"""TFLite and ONNX artifacts run without TensorFlow: LiteRT (``ai_edge_litert``) gives the int8 model the same
probabilities as TensorFlow's own interpreter, and loading either artifact imports no TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from utils.preprocessing import PreprocessSpec

ROOT = Path(__file__).resolve().parents[3]
SIZE = 32
SPEC = PreprocessSpec(class_names=("a", "b", "c"), image_size=SIZE, channels=1)


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (count, SIZE, SIZE, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A small Keras model (convolution, batch norm, dense) as .keras, int8 .tflite and .onnx, with metadata."""
    import keras
    import tensorflow as tf

    from utils.artifacts.export import IO_CONTRACT, convert_onnx, quantize_int8
    from utils.artifacts.model_file import load_model, save_model, write_sidecar

    root = tmp_path_factory.mktemp("runtimes")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = save_model(keras.Model(inputs, keras.layers.Dense(3)(x)), root / "m.keras", SPEC, model_id="m",
                      backbone="test")
    model, metadata = load_model(path)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    quantize_int8(converter, lambda: ([image[None]] for image in images(32, seed=1)))
    (root / "q.tflite").write_bytes(converter.convert())
    write_sidecar(root / "q.tflite", metadata.replace(format="tflite", quantization="int8", io=IO_CONTRACT))
    out = {"keras": path, "tflite": root / "q.tflite"}
    try:
        import onnxruntime  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError:
        return out
    onnx_metadata = metadata.replace(format="onnx", io=IO_CONTRACT)
    convert_onnx(model, SPEC, onnx_metadata, root / "m.onnx")
    write_sidecar(root / "m.onnx", onnx_metadata)
    return {**out, "onnx": root / "m.onnx"}


def test_litert_and_tensorflow_give_an_int8_model_the_same_probabilities(artifacts, monkeypatch):
    pytest.importorskip("ai_edge_litert")
    from utils.infer.predictor import TFLitePredictor, load_predictor

    litert = load_predictor(artifacts["tflite"])
    assert type(litert._interpreter).__module__.startswith("ai_edge_litert")
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # LiteRT missing: TensorFlow's interpreter
    tensorflow = TFLitePredictor(artifacts["tflite"])
    assert type(tensorflow._interpreter).__module__.startswith("tensorflow")
    batch = images(16, seed=2)
    assert np.int8 in {d["dtype"] for d in litert._interpreter.get_tensor_details()}  # really int8 inside
    np.testing.assert_allclose(litert.predict(batch), tensorflow.predict(batch), rtol=0, atol=1e-6)
    np.testing.assert_allclose(litert.predict(batch[:3]), tensorflow.predict(batch[:3]), rtol=0, atol=1e-6)
    keras_probs = load_predictor(artifacts["keras"]).predict(batch)
    assert (litert.predict(batch).argmax(1) == keras_probs.argmax(1)).mean() >= 0.8  # and int8 stays close to Keras


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_loading_and_running_tflite_or_onnx_imports_no_tensorflow(artifacts, kind):
    """In a fresh interpreter, as the router loads them (utils.routing imported too)."""
    if kind == "tflite":
        pytest.importorskip("ai_edge_litert", reason="without LiteRT, .tflite models run on tf.lite")
    if kind not in artifacts:
        pytest.skip("tf2onnx / onnxruntime not installed")
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        import router, utils.routing.operations.service, utils.routing.node
        from utils.infer.predictor import load_predictor
        predictor = load_predictor(sys.argv[1])
        probs = predictor.predict(np.zeros((2, *predictor.spec.input_shape), np.float32))
        print(json.dumps({"shape": list(probs.shape), "tensorflow": "tensorflow" in sys.modules,
                          "keras": "keras" in sys.modules}))
    """)
    result = subprocess.run([sys.executable, "-c", script, str(artifacts[kind])], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"shape": [2, 3], "tensorflow": False,
                                                                   "keras": False}


def test_an_int8_file_with_a_single_threaded_op_is_named_when_loaded(artifacts, tmp_path, caplog):
    """An int8 export whose features' std became SQUARED_DIFFERENCE (exports before models/features.py
    wrote it as sqrt(mean(d * d))) runs that op outside XNNPACK: loading it says to export again."""
    import keras
    import tensorflow as tf

    from utils.artifacts.export import quantize_int8
    from utils.artifacts.model_file import read_metadata, write_sidecar
    from utils.infer.predictor import TFLitePredictor, slow_int8_ops

    inputs = keras.Input((SIZE, SIZE, 1))
    maps = keras.layers.Conv2D(4, 3)(inputs)
    logits = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(maps))
    old_style = keras.Model(inputs, [logits, keras.ops.std(maps, axis=(1, 2))])
    converter = tf.lite.TFLiteConverter.from_keras_model(old_style)
    quantize_int8(converter, lambda: ([image[None]] for image in images(8, seed=2)))
    (tmp_path / "old.tflite").write_bytes(converter.convert())
    write_sidecar(tmp_path / "old.tflite", read_metadata(artifacts["tflite"]))
    caplog.clear()  # the conversion above logs through TensorFlow's logger
    with caplog.at_level("WARNING", logger="utils.infer.predictor"):
        current = TFLitePredictor(artifacts["tflite"])
        warned = [r for r in caplog.records if r.name == "utils.infer.predictor"]
        assert slow_int8_ops(current._interpreter) == [] and not warned
        old = TFLitePredictor(tmp_path / "old.tflite")
    assert slow_int8_ops(old._interpreter) == ["SQUARED_DIFFERENCE"]
    assert "SQUARED_DIFFERENCE" in caplog.text and "export the model again" in caplog.text
