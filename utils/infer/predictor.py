"""One interface over every model artifact: load it, read its spec, get probabilities.

    predictor = load_predictor("runs/mobilenet_v1-2026.../")      # or best.keras
    probs = predictor.predict(batch)                                # float32 (B, S, S, C) 0..255 -> (B, K)
    logits = predictor.logits(batch)                                # the model's raw output (B, K)

Entry points (test.py, predict.py, router.py) use this rather than Keras directly, so further
artifact formats plug in here with the same preprocessing spec: export.py writes .tflite, .onnx
and SavedModel artifacts with their metadata beside them, and ``load_predictor`` picks the runtime
by suffix (TFLite interpreter, ONNX Runtime, TensorFlow). Every predictor takes its spec, model id and
backbone from ``utils.artifacts.model_file.read_metadata`` (one schema, one reader for every format) and keeps the
whole ``ModelMetadata`` as ``.metadata``.

Every artifact returns logits; every predictor turns them into probabilities with the same
function, :func:`probabilities`: ``softmax(logits / T)``, T the temperature stored with the model
(``metadata.calibration["temperature"]``, fitted by utils.evaluate.calibration; 1.0 when absent).
So a .keras model and its TFLite, ONNX and SavedModel exports (which carry the same metadata)
give the same calibrated confidences. :func:`resolve_threshold` turns ``--threshold auto`` into the
threshold recommended by that calibration.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from utils.artifacts.model_file import (  # noqa: F401 (ARTIFACT_INFO, SAVED_MODEL_FILE, sidecar_path: still importable here)
    ARTIFACT_INFO,
    ARTIFACT_KEY,
    SAVED_MODEL_FILE,
    ModelMetadata,
    artifact_format,
    load_model,
    read_metadata,
    sidecar_path,
)
from utils.infer.decisions import AUTO_THRESHOLD
from utils.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)



class Predictor(Protocol):
    spec: PreprocessSpec
    model_id: str
    backbone: str
    metadata: ModelMetadata | None

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, S, S, C) with values 0..255 -> probabilities float32 (B, K): probabilities(logits, metadata)."""

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, S, S, C) with values 0..255 -> the model's logits float32 (B, K)."""

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (B, K), the pooled features the logits are computed from (B, D), or None when the
        artifact has no features output: exported before the out-of-distribution score existed)."""

    def score(self, batch: np.ndarray) -> Scored:
        """One model call: probabilities and the out-of-distribution score (None without one)."""


class Scored(NamedTuple):
    """What the engine gets for a batch: calibrated probabilities (B, K) and, when the model carries an
    out-of-distribution detector (utils.infer.ood) and exposes its features, one score per image (B,)."""

    probs: np.ndarray
    ood: np.ndarray | None = None
    ood_threshold: float | None = None  # above it: out_of_distribution


def scored(outputs: tuple[np.ndarray, np.ndarray | None], metadata: ModelMetadata | None) -> Scored:
    """(logits, features) -> Scored: probabilities(logits), and the OOD score when both the detector
    (``metadata.ood``) and the features are there."""
    from utils.infer.ood import detector_of, ood_score

    logits, features = outputs
    probs = probabilities(logits, metadata)
    detector = metadata.ood if metadata is not None else None
    if detector is None or features is None:
        return Scored(probs)
    return Scored(probs, ood_score(detector, features, logits), detector_of(detector).threshold)


def scorer(predictor):
    """The call the engine should make: ``predictor.score`` (probabilities and the OOD score) when the
    predictor has one, else ``predictor.predict`` (stand-ins, predictors from elsewhere)."""
    return getattr(predictor, "score", None) or predictor.predict


def concatenate(parts: list) -> Scored | np.ndarray:
    """Chunks of one batch (each probabilities or a Scored) joined back into one."""
    if not parts or not all(isinstance(part, Scored) for part in parts):
        return np.concatenate([getattr(part, "probs", part) for part in parts])
    oods = [part.ood for part in parts]
    ood = None if any(o is None for o in oods) else np.concatenate(oods)
    return Scored(np.concatenate([part.probs for part in parts]), ood, parts[0].ood_threshold)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, float32."""
    logits = np.asarray(logits, dtype=np.float32)
    if temperature != 1.0:
        logits = logits / np.float32(temperature)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def temperature_of(metadata: ModelMetadata | float | None) -> float:
    """The temperature a model's metadata stores (1.0 when it has none); a number is taken as it is."""
    if metadata is None:
        return 1.0
    if isinstance(metadata, (int, float)):
        return float(metadata)
    return metadata.temperature


def probabilities(logits: np.ndarray, metadata: ModelMetadata | float | None) -> np.ndarray:
    """The one place logits become probabilities, for every artifact format: softmax(logits / T),
    T the calibration temperature in ``metadata`` (or a number; 1.0 for None / no calibration)."""
    return softmax(logits, temperature_of(metadata))


def resolve_threshold(threshold: float | str, predictor_or_metadata, model: str | os.PathLike = "MODEL") -> float:
    """A numeric threshold as it is; ``"auto"``: the threshold the model's calibration recommends
    (``calibration.threshold.value``). ValueError when the model has none (run calibrate.py).

    A recommendation whose target accuracy was unreachable on the calibration data is 1.0 (every
    image to review but those of confidence exactly 1); it is used, with a warning. So is one made
    on too few images to show the target (``enough_images`` False; utils.evaluate.calibration)."""
    if not (isinstance(threshold, str) and threshold.strip().lower() == AUTO_THRESHOLD):
        return float(threshold)
    metadata = getattr(predictor_or_metadata, "metadata", predictor_or_metadata)
    recommended = metadata.recommended_threshold if isinstance(metadata, ModelMetadata) else None
    if recommended is None:
        raise ValueError(f"threshold 'auto' uses the confidence threshold recommended by the model's calibration, "
                         f"and {model} has none (trained before calibration existed, or its calibration was skipped). "
                         f"Run: python calibrate.py {model}   (or give a number)")
    value = float(recommended["value"])
    target, where = recommended.get("target_accuracy"), metadata.calibration.get("fitted_on", "the calibration data")
    if recommended.get("reachable", True) and recommended.get("enough_images") is False:
        log.warning("threshold auto -> %.4f: on %s it routed %s of %s images automatically at accuracy %s, too few "
                    "to show the target accuracy %s (%s or more needed): the threshold is not supported by the "
                    "calibration data. Give a numeric threshold, or recalibrate on a larger validation split.",
                    value, where, recommended.get("routed_images"), recommended.get("n_images"),
                    _share(recommended.get("accuracy")), target, recommended.get("min_images"))
    elif recommended.get("reachable", True):
        log.info("threshold auto -> %.4f: on %s it routed %s of the images automatically at accuracy %s (target %s)",
                 value, where, _share(recommended.get("coverage")), _share(recommended.get("accuracy")), target)
    else:
        log.warning("threshold auto -> %.4f: the target accuracy %s was unreachable on %s, so (nearly) every "
                    "image goes to review ('uncertain'). Give a numeric threshold, or recalibrate with a lower "
                    "--target-accuracy.", value, target, where)
    return value


def _share(value) -> str:
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


class FromOutputs:
    """What every predictor derives from its ``outputs(batch)`` (logits, features): the logits, the calibrated
    probabilities, and the engine's :class:`Scored`. A predictor sets ``metadata`` and defines ``outputs``."""

    metadata: ModelMetadata | None

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.outputs(batch)[0]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return probabilities(self.logits(batch), self.metadata)

    def score(self, batch: np.ndarray) -> Scored:
        return scored(self.outputs(batch), self.metadata)


@dataclass
class KerasPredictor(FromOutputs):
    """A .keras file saved by this project (or a run directory's best.keras); ``logits`` alone skips the
    features."""

    model: object
    spec: PreprocessSpec
    model_id: str
    backbone: str
    metadata: ModelMetadata | None = field(default=None, repr=False)

    @classmethod
    def from_metadata(cls, model, metadata: ModelMetadata) -> KerasPredictor:
        return cls(model, metadata.spec, metadata.model_id, metadata.backbone, metadata)

    def __post_init__(self) -> None:
        import tensorflow as tf

        model = self.model
        self._infer = tf.function(lambda x: tf.cast(model(x, training=False), tf.float32), reduce_retracing=True)
        both = with_features(model)
        self._both = None if both is None else tf.function(
            lambda x: [tf.cast(t, tf.float32) for t in both(x, training=False)], reduce_retracing=True)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[1:] != self.spec.input_shape:
            raise ValueError(f"batch shape {batch.shape[1:]} differs from the model's {self.spec.input_shape}")
        return self._infer(np.asarray(batch, dtype=np.float32)).numpy()

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self._both is None:
            return self.logits(batch), None
        if batch.shape[1:] != self.spec.input_shape:
            raise ValueError(f"batch shape {batch.shape[1:]} differs from the model's {self.spec.input_shape}")
        logits, features = self._both(np.asarray(batch, dtype=np.float32))
        return logits.numpy(), features.numpy()


def with_features(model):
    """A Keras model with two outputs, (logits, the features the OOD score reads), sharing ``model``'s
    layers (models/features.py); None for a model without the project's backbone and head."""
    from models.features import with_features as build

    return build(model)


def _split_outputs(arrays: list[np.ndarray], num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """An artifact's outputs -> (logits, features or None): the (B, K) one is the logits, whatever the
    order the runtime lists them in (TFLite sorts outputs by name)."""
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    logits = [a for a in arrays if a.ndim == 2 and a.shape[1] == num_classes]
    others = [a for a in arrays if not (a.ndim == 2 and a.shape[1] == num_classes)]
    if not logits:
        raise ValueError(f"no output of shape (B, {num_classes}) among {[a.shape for a in arrays]}")
    return logits[0], (others[0] if others else (logits[1] if len(logits) > 1 else None))


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


SLOW_INT8_OPS = ("SQUARED_DIFFERENCE",)  # int8 ops XNNPACK has no kernel for: TFLite's single-threaded reference kernels


def slow_int8_ops(interpreter) -> list[str]:
    """The ops of SLOW_INT8_OPS in a TFLite graph: an int8 export made before models/features.py
    wrote the stage std as sqrt(mean(d * d)) has SQUARED_DIFFERENCE there, which costs ~3x the
    whole MobileNet at 512 px; exporting the model again removes it."""
    try:
        names = {op["op_name"] for op in interpreter._get_ops_details()}
    except Exception:  # noqa: BLE001 - a private API: no answer rather than no predictor
        return []
    return [name for name in SLOW_INT8_OPS if name in names]


class TFLitePredictor(FromOutputs):
    """A ``.tflite`` file exported by export.py (fp32, fp16 or int8; input and output stay float32,
    an integer input/output would be (de)quantised here). Thread-safe (one interpreter, a lock)."""

    def __init__(self, path: str | os.PathLike, metadata: ModelMetadata | None = None,
                 num_threads: int | None = None) -> None:
        import threading

        self.path = Path(path)
        self.metadata = metadata if metadata is not None else read_metadata(path)
        self.spec: PreprocessSpec = self.metadata.spec
        self.model_id: str = self.metadata.model_id
        self.backbone: str = self.metadata.backbone
        self.quantization: str = self.metadata.quantization or ""
        self._interpreter = tflite_interpreter(path, num_threads)
        self._input = self._interpreter.get_input_details()[0]
        self._batch = None
        self._lock = threading.Lock()
        shape = tuple(int(d) for d in self._input["shape_signature"][1:])
        if self.quantization == "int8" and (slow := slow_int8_ops(self._interpreter)):
            log.warning("%s: its int8 graph has %s, which TFLite runs outside XNNPACK on one thread "
                        "(an export from an older version: the OOD features' std); export the model again "
                        "with export.py for about 3x faster inference", path, ", ".join(slow))
        if shape != self.spec.input_shape:
            raise ValueError(f"{path}: input shape {shape} differs from its spec's {self.spec.input_shape}")

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
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
        arrays = []
        for out in interpreter.get_output_details():
            values = interpreter.get_tensor(out["index"])
            if out["dtype"] != np.float32:
                scale, zero = out["quantization"]
                values = (values.astype(np.float32) - zero) * scale
            arrays.append(np.array(values, dtype=np.float32))  # a copy: the interpreter reuses its output buffer
        return arrays

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        batch = _check_batch(batch, self.spec)
        if len(batch) == 0:
            return np.zeros((0, self.spec.num_classes), np.float32), None
        with self._lock:
            return _split_outputs(self._run(batch), self.spec.num_classes)


class SavedModelPredictor(FromOutputs):
    """A SavedModel directory exported by export.py (its ``serve`` endpoint returns logits)."""

    def __init__(self, path: str | os.PathLike, metadata: ModelMetadata | None = None) -> None:
        import tensorflow as tf

        self.path = Path(path)
        self.metadata = metadata if metadata is not None else read_metadata(path)
        self.spec: PreprocessSpec = self.metadata.spec
        self.model_id: str = self.metadata.model_id
        self.backbone: str = self.metadata.backbone
        self._module = tf.saved_model.load(str(path))
        endpoint = getattr(self._module, "serve", None) or self._module.signatures["serving_default"]
        self._infer = endpoint

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        import tensorflow as tf

        batch = _check_batch(batch, self.spec)
        out = self._infer(tf.constant(batch))
        if isinstance(out, dict):
            out = [out[k] for k in sorted(out)]
        elif not isinstance(out, (list, tuple)):
            out = [out]
        return _split_outputs([np.asarray(t) for t in out], self.spec.num_classes)


class ONNXPredictor(FromOutputs):
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
        self.path = Path(path)
        self.metadata = read_metadata(path, embedded=embedded or "")
        self.spec: PreprocessSpec = self.metadata.spec
        self.model_id: str = self.metadata.model_id
        self.backbone: str = self.metadata.backbone
        self._input = self._session.get_inputs()[0].name

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        batch = _check_batch(batch, self.spec)
        if len(batch) == 0:
            return np.zeros((0, self.spec.num_classes), np.float32), None
        return _split_outputs(self._session.run(None, {self._input: batch}), self.spec.num_classes)


def load_predictor(path: str | os.PathLike) -> Predictor:
    """A predictor for a run directory, a .keras file, or an artifact of export.py: a .tflite or .onnx
    file, or a SavedModel directory. FileNotFoundError for a missing path, ValueError for another
    kind of file or one without readable metadata."""
    fmt = artifact_format(path)
    if fmt == "saved_model":
        return SavedModelPredictor(path)
    if fmt == "tflite":
        return TFLitePredictor(path)
    if fmt == "onnx":
        return ONNXPredictor(path)
    model, metadata = load_model(path)  # imports keras, the backbones and the registered objects, only now
    return KerasPredictor.from_metadata(model, metadata)
