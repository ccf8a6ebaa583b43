"""Export a trained Keras model to a self-describing SavedModel, TFLite or ONNX artifact, and check it.

    result = export_model("runs/demo", "tflite", quantize="int8")

Every artifact gets its metadata beside it (``model.tflite.json``, ``model.onnx.json``;
``<saved_model>/artifact.json``; an ONNX file also embeds it in its ``metadata_props``), in the one
schema of every model file (``utils.artifacts.model_file.ModelMetadata``): the source model's metadata (the
preprocessing spec: class names in order, input size, channels, aspect policy, window percentiles,
input range 0..255 float, the normalisation being a layer inside the graph; the model id, the
backbone, the training facts in ``extra``, the calibration: temperature and recommended threshold)
with the format, the source model, the quantization, the input/output contract and the check.
Every predictor turns an artifact's logits into ``softmax(logits / T)`` with the T of that
metadata (utils.infer.predictor.probabilities), so an export gives the calibrated confidences of
its source model; a model calibrated after its export must be exported again (or calibrated as
an artifact: calibrate.py accepts one). ``utils.artifacts.model_file.read_metadata`` reads it (through
``utils.infer.predictor.load_predictor``), so predict.py, router.py and test.py accept the artifact with
the same preprocessing.

Quantization (TFLite only): ``fp16`` stores float16 weights (computed in float32); ``int8`` stores
int8 weights and activations, calibrated on a representative set drawn from the training split
of the prepared dataset. Input and output stay float32 in every case (the quantize/dequantize ops
are inside the model), so every artifact takes the same float32 0..255 batch and returns logits.

Every artifact has two outputs, the logits and the stage statistics of the backbone
(models/features.py), so that the out-of-distribution score stored in the metadata (``ood``,
utils.infer.ood) is computed by every runtime; predictors tell the outputs apart by shape. An int8
artifact's statistics are quantised, so its detector is fitted again on its own features.

The check runs the artifact (through its predictor) and the Keras model on one batch from the
validation split (else test, else train; random images when no dataset is found) and reports the
largest absolute probability difference and the top-1 agreement, and, for a model with an OOD
score, the largest score difference relative to the threshold and how often both sides of the
threshold agree; it is printed, stored in the metadata and written to ``<artifact>.check.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.artifacts.model_file import ARTIFACT_KEY, ModelMetadata, write_sidecar
from utils.artifacts.run_dir import training_data
from utils.data import files
from utils.infer.predictor import KerasPredictor, load_predictor, with_features

log = logging.getLogger(__name__)

FORMATS = ("saved_model", "tflite", "onnx")
ONNX_OPSET = 17
QUANTIZATIONS = ("none", "fp16", "int8")
CHECK_SPLITS = ("val", "test", "train")
IO_CONTRACT = ("input float32 (B, S, S, C) 0..255; outputs logits float32 (B, K), softmax(logits / "
               "calibration.temperature) applied by the predictor, and the pooled features float32 (B, D) the "
               "out-of-distribution score (metadata 'ood') is computed from")


@dataclass
class ExportResult:
    path: Path
    format: str
    quantization: str
    check: dict[str, Any]
    metadata: ModelMetadata  # as written beside the artifact, check included

    def summary(self) -> str:
        c = self.check
        return (f"{self.format} ({self.quantization}) -> {self.path}: max |prob diff| vs Keras "
                f"{c['max_abs_prob_diff']:.2e}, top-1 agreement {c['top1_agreement']:.4f} "
                f"({c['agreed']}/{c['images']} images, {c['source']})")


def default_output(model_path: Path, fmt: str, quantization: str) -> Path:
    """``runs/x/best.keras`` -> ``runs/x/best.tflite``, ``best_int8.tflite``, ``best_saved_model/``."""
    tag = "" if quantization == "none" else f"_{quantization}"
    if fmt == "saved_model":
        return model_path.with_name(f"{model_path.stem}_saved_model")
    if fmt == "onnx":
        return model_path.with_name(f"{model_path.stem}.onnx")
    return model_path.with_name(f"{model_path.stem}{tag}.tflite")


def data_dir_of(model_path: Path) -> Path | None:
    """The prepared dataset a run was trained on, if it still exists."""
    data = training_data(model_path)
    return data if data is not None and files.is_prepared(data) else None


def images_from_split(data_dir: str | os.PathLike, split: str, spec, limit: int, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` model inputs (float32 0..255) drawn at random (seeded) from one split, so that
    a labels.csv sorted by class still gives every class."""
    from utils.data.dataset import build_dataset, split_frame

    frame = split_frame(data_dir, split, spec.class_names)
    if frame.empty:
        raise ValueError(f"{data_dir}: split {split!r} is empty")
    rows = frame.sample(n=min(limit, len(frame)), random_state=seed).sort_index()
    dataset = build_dataset(rows["abs_path"].tolist(), None, spec, training=False, batch_size=64)
    return np.concatenate([images.numpy() for images in dataset])


def check_batch(data_dir: Path | None, spec, size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """The images used to compare an artifact with its Keras model, and where they came from."""
    if data_dir is not None:
        for split in CHECK_SPLITS:
            try:
                return images_from_split(data_dir, split, spec, size), f"{data_dir} split {split}"
            except ValueError:  # empty split
                continue
    log.warning("no prepared dataset: checking the export on random images (weak check)")
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (size,) + spec.input_shape).astype(np.float32), "random images"


def compare(reference: np.ndarray, candidate: np.ndarray, source: str) -> dict[str, Any]:
    agreed = int((reference.argmax(1) == candidate.argmax(1)).sum())
    return {"max_abs_prob_diff": float(np.abs(reference - candidate).max()),
            "top1_agreement": agreed / len(reference), "agreed": agreed, "images": len(reference),
            "source": source}


def predict_in_batches(predictor, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([predictor.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def refit_int8_ood(out: Path, metadata: ModelMetadata, data_dir: Path | None) -> ModelMetadata:
    """An int8 artifact's stage statistics are quantised, so the float model's OOD detector does not fit
    them: it is fitted again on the artifact's own features (same settings, same splits). Without the
    dataset the artifact is exported without an OOD score, with a warning."""
    from utils.evaluate.calibration import refit_ood

    try:
        if data_dir is None:
            raise ValueError("no prepared dataset (--data) to fit it on")
        entry = refit_ood(load_predictor(out), data_dir, metadata.ood)
    except ValueError as error:
        log.warning("int8 export without an out-of-distribution score: it must be fitted again on the int8 "
                    "features and could not be (%s)", error)
        entry = None
    metadata = metadata.replace(ood=entry)
    write_sidecar(out, metadata)
    return metadata


def compare_ood(reference, candidate, images: np.ndarray, batch_size: int = 32) -> dict[str, Any] | None:
    """The OOD scores of the artifact against the Keras model's on ``images`` (None without a detector)."""
    metadata = reference.metadata
    if metadata is None or metadata.ood is None:
        return None
    chunks = [(reference.score(images[i:i + batch_size]), candidate.score(images[i:i + batch_size]))
              for i in range(0, len(images), batch_size)]
    if any(c.ood is None for _, c in chunks):
        return {"ood_available": False}
    ref = np.concatenate([r.ood for r, _ in chunks])
    got = np.concatenate([c.ood for _, c in chunks])
    threshold = metadata.ood["threshold"]
    return {"ood_available": True, "max_abs_ood_diff_over_threshold": float(np.abs(ref - got).max() / threshold),
            "ood_flag_agreement": float(np.mean((ref > threshold) == (got > threshold)))}


def representative_dataset(data_dir: Path, spec, samples: int) -> Iterator[list[np.ndarray]]:
    """Calibration inputs for int8: one image at a time from the training split."""
    images = images_from_split(data_dir, "train", spec, samples)
    for image in images:
        yield [image[None]]


def write_saved_model(model, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.export(str(out_dir), format="tf_saved_model", verbose=False)


def convert_tflite(model, quantization: str, calibration: Path | None, spec, samples: int) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved_model"
        write_saved_model(model, saved)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if quantization == "fp16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            if calibration is None:
                raise ValueError("int8 needs a prepared dataset for calibration (--data, or a run whose "
                                 "config.json names an existing dataset)")
            quantize_int8(converter, lambda: representative_dataset(calibration, spec, samples))
        return converter.convert()


def quantize_int8(converter, representative: Callable[[], Iterator[list[np.ndarray]]]) -> None:
    """Full int8 (weights per channel, activations calibrated on ``representative()``), with
    float32 input and output kept so that every artifact takes the same 0..255 input."""
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]


def convert_onnx(model, spec, metadata: ModelMetadata, out: Path) -> None:
    """tf2onnx from a tf.function around the Keras model; the metadata is embedded too
    (``metadata_props["artifact"]``), so the .onnx file describes itself even without its sidecar."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    function = tf.function(lambda x: model(x, training=False))
    signature = [tf.TensorSpec((None,) + tuple(spec.input_shape), tf.float32, name="image")]
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=ONNX_OPSET)
    entry = proto.metadata_props.add()
    entry.key, entry.value = ARTIFACT_KEY, json.dumps(metadata.to_dict())
    temporary = out.with_name(out.name + ".tmp")
    onnx.save(proto, str(temporary))
    os.replace(temporary, out)


def export_model(model_path: str | os.PathLike, fmt: str, *, quantize: str = "none",
                 output: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                 check_images: int = 64, calibration_images: int = 200) -> ExportResult:
    """Export, write the metadata, check against the Keras model; see the module docstring."""
    from utils.artifacts.model_file import load_model, resolve_model_path

    quantize = quantize or "none"
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantize!r}; choose from {QUANTIZATIONS}")
    if fmt != "tflite" and quantize != "none":
        raise ValueError(f"--quantize applies to tflite only, not {fmt}")
    source = resolve_model_path(model_path)
    data_dir = Path(data) if data else data_dir_of(source)
    if data_dir is not None:
        files.require_prepared(data_dir)
    model, info = load_model(source)
    spec = info.spec
    out = Path(output) if output else default_output(source, fmt, quantize)
    out.parent.mkdir(parents=True, exist_ok=True)

    metadata = info.replace(source=str(source), format=fmt, quantization=quantize, check=None, io=IO_CONTRACT)
    serving = with_features(model) or model  # (logits, features): the OOD score is computed by every runtime
    if serving is model:
        log.warning("%s is not built as models/registry.py builds models (a nested 'backbone', then the head's "
                    "layers): the export has no features output, so no out-of-distribution score", source)
    if fmt == "saved_model":
        write_saved_model(serving, out)
    elif fmt == "onnx":
        convert_onnx(serving, spec, metadata, out)
    else:
        content = convert_tflite(serving, quantize, data_dir, spec, calibration_images)
        temporary = out.with_name(out.name + ".tmp")
        temporary.write_bytes(content)
        os.replace(temporary, out)
    write_sidecar(out, metadata)  # load_predictor reads it for the check below
    if quantize == "int8" and metadata.ood is not None:
        metadata = refit_int8_ood(out, metadata, data_dir)

    images, where = check_batch(data_dir, spec, check_images)
    keras_predictor, exported = KerasPredictor.from_metadata(model, info), load_predictor(out)
    reference = predict_in_batches(keras_predictor, images)
    candidate = predict_in_batches(exported, images)
    check = compare(reference, candidate, where)
    check.update(compare_ood(keras_predictor, exported, images) or {})
    metadata = metadata.replace(check=check)
    write_sidecar(out, metadata)
    check_file = out / "check.json" if out.is_dir() else out.with_name(out.name + ".check.json")
    check_file.write_text(json.dumps(check, indent=2) + "\n")
    return ExportResult(out, fmt, quantize, check, metadata)
