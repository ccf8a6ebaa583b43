"""One interface over every model artifact: load it, read its spec, get probabilities.

    predictor = load_predictor("runs/mobilenet_v1-2026.../")      # or best.keras
    probs = predictor.predict(batch)                                # float32 (B, S, S, C) 0..255 -> (B, K)

Entry points (test.py, predict.py, router.py) use this rather than Keras directly, so further
artifact formats plug in here with the same preprocessing spec: export.py writes .tflite, .onnx
and SavedModel artifacts with their spec beside them (``sidecar_path``), and ``load_predictor``
picks the runtime by suffix (TFLite interpreter, ONNX Runtime, TensorFlow).
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


ARTIFACT_INFO = "artifact.json"  # inside an exported SavedModel directory
SAVED_MODEL_FILE = "saved_model.pb"
ARTIFACT_KEY = "artifact"  # the ONNX metadata_props key that holds the same JSON


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """Where an exported file's metadata lives: ``model.tflite`` -> ``model.tflite.json``;
    a SavedModel directory -> ``<dir>/artifact.json``."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return artifact / ARTIFACT_INFO
    return artifact.with_name(artifact.name + ".json")


def read_artifact_info(artifact: str | os.PathLike, embedded: str | None = None) -> dict:
    """The metadata written by export.py beside an artifact ({spec, model_id, backbone, ...});
    ``embedded`` is the same JSON carried inside the artifact (ONNX), used without a sidecar."""
    import json

    path = sidecar_path(artifact)
    if not path.is_file() and embedded:
        payload = json.loads(embedded)
        payload["spec"] = PreprocessSpec.from_dict(payload["spec"])
        return payload
    if not path.is_file():
        raise ValueError(f"{artifact} has no preprocessing spec: expected {path} (written by export.py). "
                         "Without it the class names, input size and preprocessing are unknown; re-export "
                         "the model with export.py or put its metadata file beside it.")
    try:
        payload = json.loads(path.read_text())
        payload["spec"] = PreprocessSpec.from_dict(payload["spec"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: unreadable artifact metadata ({error})") from error
    return payload


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _check_batch(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    if batch.shape[1:] != spec.input_shape:
        raise ValueError(f"batch shape {batch.shape[1:]} differs from the model's {spec.input_shape}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def tflite_interpreter(path: str | os.PathLike, num_threads: int | None = None):
    """A TFLite interpreter: LiteRT (``ai_edge_litert``) when installed, else ``tf.lite.Interpreter``
    (deprecated in favour of LiteRT but still shipped with TensorFlow 2.21)."""
    num_threads = num_threads or os.cpu_count() or 1
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=str(path), num_threads=num_threads)
    return Interpreter(model_path=str(path), num_threads=num_threads)


class TFLitePredictor:
    """A ``.tflite`` file exported by export.py (fp32, fp16 or int8; input and output stay float32,
    an integer input/output would be (de)quantised here). Thread-safe (one interpreter, a lock)."""

    def __init__(self, path: str | os.PathLike, info: dict | None = None, num_threads: int | None = None) -> None:
        import threading

        info = info if info is not None else read_artifact_info(path)
        self.path = Path(path)
        self.spec: PreprocessSpec = info["spec"]
        self.model_id: str = info.get("model_id", self.path.stem)
        self.backbone: str = info.get("backbone", "")
        self.quantization: str = info.get("quantization", "")
        self._interpreter = tflite_interpreter(path, num_threads)
        self._input = self._interpreter.get_input_details()[0]
        self._output_index = self._interpreter.get_output_details()[0]["index"]
        self._batch = None
        self._lock = threading.Lock()
        shape = tuple(int(d) for d in self._input["shape_signature"][1:])
        if shape != self.spec.input_shape:
            raise ValueError(f"{path}: input shape {shape} differs from its spec's {self.spec.input_shape}")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        interpreter, detail = self._interpreter, self._input
        if self._batch != len(batch):
            interpreter.resize_tensor_input(detail["index"], batch.shape)
            interpreter.allocate_tensors()
            self._batch = len(batch)
        if detail["dtype"] != np.float32:  # an integer-input model: quantise 0..255 floats
            scale, zero = detail["quantization"]
            info = np.iinfo(detail["dtype"])
            batch = np.clip(np.round(batch / scale + zero), info.min, info.max).astype(detail["dtype"])
        interpreter.set_tensor(detail["index"], batch)
        interpreter.invoke()
        out = interpreter.get_output_details()[0]
        logits = interpreter.get_tensor(self._output_index)
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            logits = (logits.astype(np.float32) - zero) * scale
        return softmax(logits)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = _check_batch(batch, self.spec)
        if len(batch) == 0:
            return np.zeros((0, self.spec.num_classes), np.float32)
        with self._lock:
            return self._run(batch)


class SavedModelPredictor:
    """A SavedModel directory exported by export.py (its ``serve`` endpoint returns logits)."""

    def __init__(self, path: str | os.PathLike, info: dict | None = None) -> None:
        import tensorflow as tf

        info = info if info is not None else read_artifact_info(path)
        self.path = Path(path)
        self.spec: PreprocessSpec = info["spec"]
        self.model_id: str = info.get("model_id", self.path.name)
        self.backbone: str = info.get("backbone", "")
        self._module = tf.saved_model.load(str(path))
        endpoint = getattr(self._module, "serve", None) or self._module.signatures["serving_default"]
        self._infer = endpoint

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        batch = _check_batch(batch, self.spec)
        out = self._infer(tf.constant(batch))
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return softmax(np.asarray(out))


class ONNXPredictor:
    """A ``.onnx`` file exported by export.py, run by ONNX Runtime on the CPU (all cores)."""

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = num_threads or os.cpu_count() or 1
        try:
            self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own exception types: report as an unusable file
            raise ValueError(f"{path}: not a loadable ONNX model ({error})") from error
        embedded = self._session.get_modelmeta().custom_metadata_map.get(ARTIFACT_KEY)
        info = read_artifact_info(path, embedded)
        self.path = Path(path)
        self.spec: PreprocessSpec = info["spec"]
        self.model_id: str = info.get("model_id", self.path.stem)
        self.backbone: str = info.get("backbone", "")
        self._input = self._session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = _check_batch(batch, self.spec)
        if len(batch) == 0:
            return np.zeros((0, self.spec.num_classes), np.float32)
        return softmax(self._session.run(None, {self._input: batch})[0])


def load_predictor(path: str | os.PathLike) -> Predictor:
    """A predictor for a run directory, a .keras file, or an artifact of export.py: a .tflite or .onnx
    file, or a SavedModel directory."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir() and (path / SAVED_MODEL_FILE).is_file():
        return SavedModelPredictor(path)
    if suffix in (".tflite", ".onnx") and not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if suffix == ".tflite":
        return TFLitePredictor(path)
    if suffix == ".onnx":
        return ONNXPredictor(path)
    if path.is_dir() or suffix == ".keras":
        from utils.artifacts import load_model

        model, info = load_model(path)
        return KerasPredictor(model, info.spec, info.model_id, info.backbone)
    raise ValueError(f"{path}: unsupported model format {suffix!r} "
                     "(expected a run directory, .keras, .tflite, .onnx or an exported SavedModel directory)")
