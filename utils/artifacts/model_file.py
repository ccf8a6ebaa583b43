"""Model files and their metadata: one schema (``ModelMetadata``), one reader (``read_metadata``).

Every model artifact of this project describes itself with the same JSON object, so that one file
(or one folder) says how to feed the model and what it answers:

    {
      "schema_version": 1,            # METADATA_VERSION; absent in files written before it existed
      "spec": {...},                  # PreprocessSpec.to_dict(): class names in order, size, channels, ...
      "model_id": "run/epoch-7",      # reader's default when absent: the file's stem / folder's name
      "backbone": "mobilenet_v1",     # "" when unknown
      "extra": {"epoch": 7, ...},     # facts from training (save_model's ``extra``); {} when none
      "format": "keras",              # keras | saved_model | tflite | onnx; the reader fills it in when absent
      "quantization": "int8",         # exports only: none | fp16 | int8
      "source": "runs/x/best.keras",  # exports only: the .keras file it was exported from
      "io": "input float32 ...",      # exports only: the input/output contract, in words
      "check": {...},                 # exports only: the comparison with the Keras model (utils.artifacts.export)
      "calibration": {                # optional (utils.evaluate.calibration; calibrate.py, end of training)
        "temperature": 1.7,           # predictors return softmax(logits / temperature); 1.0 when absent
        "fitted_on": "data/x split=val", "n_images": 812,
        "nll_before": 0.31, "nll_after": 0.12, "ece_before": 0.06, "ece_after": 0.01, "bins": 15,
        "threshold": {"target_accuracy": 0.995, "value": 0.93, "coverage": 0.88, "accuracy": 0.996,
                      "reachable": true, ...},      # the recommendation --threshold auto uses
        "reference": {"n_images": 812, "top_label_shares": [...], "confidence_quantiles": [...]}
                                      # the validation set as served: the router's drift windows compare with it
      },
      "ood": {                        # optional (utils.infer.ood; end of training, calibrate.py): the
        "method": "...",              # out-of-distribution detector on the pooled features, its
        "threshold": 12.3, ...        # parameters and the score above which an image is out_of_distribution
      }
    }

Keys a reader does not know are kept (``ModelMetadata.other``) and written back. Files written
before the version field (the .keras payload {spec, model_id, backbone, extra}; export sidecars
{spec, model_id, backbone, source, format, quantization, io, check}) are this schema without
``schema_version`` and read as version 1; and readers older than the field ignore the new keys.
Optional keys added later without a version bump, since older files simply lack them and older
readers keep them as unknown keys (and write them back): ``ood`` (a file without it has no
out-of-distribution score; older code serves the model without one), ``calibration`` (a file without it reads
as temperature 1.0, no recommended threshold; code older than it serves a calibrated model as it
always did, uncalibrated, and has no ``--threshold auto`` to misuse). A change that an older reader
would misread (a key whose meaning changes, a new required key) bumps METADATA_VERSION.

Where the metadata lives, per format (``read_metadata`` handles all of them):

    x.keras          ``preprocess.json`` inside the zip archive, written by ``save_model``; a plain
                     .keras saved elsewhere: a ``preprocess.json`` beside it (a spec, or this object)
    run directory    its ``best.keras``
    x.tflite         ``x.tflite.json`` beside it (``sidecar_path``)
    x.onnx           ``x.onnx.json`` beside it, else the same JSON embedded in the file's
                     ``metadata_props["artifact"]``
    SavedModel dir   ``<dir>/artifact.json``

``write_metadata`` replaces it in place for any of them (a .keras archive is rewritten atomically,
never given a second entry); calibrate.py uses it to add a calibration to an existing model.

This module only needs the standard library and utils.preprocessing; loading a .keras model
(``load_model``) imports keras, the backbones and utils.artifacts.keras_objects (the registered optimizer,
schedule and metric), never the training code.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.artifacts.run_dir import BEST_MODEL, LAST_MODEL, is_run_dir  # noqa: F401  (the run directory's names)
from utils.preprocessing import SPEC_FILENAME, PreprocessSpec

METADATA_VERSION = 1
KERAS_PAYLOAD = SPEC_FILENAME  # the metadata's name inside a .keras archive (and of a spec beside a plain one)
ARTIFACT_INFO = "artifact.json"  # inside an exported SavedModel directory
SAVED_MODEL_FILE = "saved_model.pb"
ARTIFACT_KEY = "artifact"  # the ONNX metadata_props key that holds the same JSON
FORMATS = ("keras", "saved_model", "tflite", "onnx")
_SUFFIX_FORMATS = {".keras": "keras", ".tflite": "tflite", ".onnx": "onnx"}


@dataclass(frozen=True)
class ModelMetadata:
    """What a model artifact says about itself; see the module docstring for the JSON schema."""

    spec: PreprocessSpec
    model_id: str = ""
    backbone: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format: str | None = None
    quantization: str | None = None
    source: str | None = None
    io: str | None = None
    check: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None  # utils.evaluate.calibration; None: uncalibrated (temperature 1)
    ood: dict[str, Any] | None = None  # utils.infer.ood: the out-of-distribution detector; None: no OOD score
    other: dict[str, Any] = field(default_factory=dict)  # keys this code does not know, kept as they were

    def replace(self, **changes: Any) -> ModelMetadata:
        return dataclasses.replace(self, **changes)

    @property
    def temperature(self) -> float:
        """The temperature predictors divide the logits by before the softmax; 1.0 without calibration."""
        return float((self.calibration or {}).get("temperature", 1.0))

    @property
    def recommended_threshold(self) -> dict[str, Any] | None:
        """The calibration's threshold recommendation (``value``, ``target_accuracy``, ``coverage``,
        ``accuracy``, ``reachable``), or None when the model has none."""
        threshold = (self.calibration or {}).get("threshold")
        return threshold if isinstance(threshold, dict) and "value" in threshold else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object; optional fields that are None are left out."""
        data: dict[str, Any] = {**self.other, "schema_version": METADATA_VERSION, "spec": self.spec.to_dict(),
                                "model_id": self.model_id, "backbone": self.backbone, "extra": dict(self.extra)}
        for name in ("format", "quantization", "source", "io", "check", "calibration", "ood"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        """Any version up to METADATA_VERSION, including files without ``schema_version``; ValueError
        for what is not metadata (no spec, a malformed spec, wrong types) or is newer than this code."""
        if not isinstance(data, dict):
            # ValueError, not TypeError: a bad file, as every other reading error here (callers catch ValueError)
            raise ValueError(f"model metadata must be a JSON object, not {type(data).__name__}")  # noqa: TRY004
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"bad schema_version {version!r}")
        if version > METADATA_VERSION:
            raise ValueError(f"metadata schema_version {version} is newer than this code ({METADATA_VERSION}); "
                             "update the code to read this model")
        if not isinstance(data.get("spec"), dict):
            raise ValueError("model metadata has no 'spec' object")  # noqa: TRY004
        known = {f.name for f in dataclasses.fields(cls)} - {"other"}
        values = {name: data[name] for name in known - {"spec"} if data.get(name) is not None}
        for name in ("model_id", "backbone", "format", "quantization", "source", "io"):
            if name in values and not isinstance(values[name], str):
                raise ValueError(f"model metadata: {name!r} must be a string, not {values[name]!r}")
        for name in ("extra", "check", "calibration", "ood"):
            if name in values and not isinstance(values[name], dict):
                raise ValueError(f"model metadata: {name!r} must be an object, not {values[name]!r}")
        if "calibration" in values:
            _check_calibration(values["calibration"])
        moved = {}
        if "ood" in values:
            from utils.infer.ood import METHOD, check_detector

            if values["ood"].get("method") == METHOD:
                check_detector(values["ood"])
            else:  # a detector of another version: kept as it is (written back), not used
                import logging

                logging.getLogger(__name__).warning(
                    "model metadata: out-of-distribution detector %r is not one this code uses (%r): the model is "
                    "served without an OOD score; run calibrate.py to fit one", values["ood"].get("method"), METHOD)
                moved["ood"] = values.pop("ood")
        try:
            spec = PreprocessSpec.from_dict(data["spec"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"model metadata: malformed spec ({error!r})") from error
        other = {k: v for k, v in data.items() if k not in known and k != "schema_version"}
        return cls(spec=spec, other={**other, **moved}, **values)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelMetadata:
        return cls.from_dict(json.loads(text))


def _check_calibration(calibration: dict[str, Any]) -> None:
    """ValueError for a calibration entry predictors could not use (a temperature that is not a
    positive finite number, a threshold value outside [0, 1])."""
    temperature = calibration.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"model metadata: calibration.temperature must be a positive number, not {temperature!r}")
    threshold = calibration.get("threshold")
    if threshold is None:
        return
    value = threshold.get("value") if isinstance(threshold, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"model metadata: calibration.threshold must be an object whose 'value' is in [0, 1], "
                         f"not {threshold!r}")


def sidecar_path(artifact: str | os.PathLike) -> Path:
    """Where an exported artifact's metadata lives: ``model.tflite`` -> ``model.tflite.json``;
    a SavedModel directory -> ``<dir>/artifact.json``."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return artifact / ARTIFACT_INFO
    return artifact.with_name(artifact.name + ".json")


def artifact_format(path: str | os.PathLike) -> str:
    """One of FORMATS, from the path: a directory with saved_model.pb is a SavedModel, any other
    directory a run directory ("keras"); a file by its suffix. FileNotFoundError for a path that
    does not exist, ValueError for a file of another kind."""
    path = Path(path)
    if path.is_dir():
        return "saved_model" if (path / SAVED_MODEL_FILE).is_file() else "keras"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    try:
        return _SUFFIX_FORMATS[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: unsupported model format {path.suffix.lower()!r} (expected a run directory, "
                         ".keras, .tflite, .onnx or an exported SavedModel directory)") from None


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A run directory -> its best.keras; a file -> itself."""
    path = Path(path)
    if path.is_dir():
        candidate = path / BEST_MODEL
        if not candidate.is_file():
            what = "a training run that has not finished an epoch yet" if is_run_dir(path) else "not a training run"
            raise FileNotFoundError(f"{path} has no {BEST_MODEL}: {what}")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return path


def read_metadata(path: str | os.PathLike, *, embedded: str | bytes | None = None) -> ModelMetadata:
    """The metadata of any artifact: a run directory, a .keras file, a .tflite or .onnx file, an exported
    SavedModel directory (see the module docstring for where each keeps it). ``format`` is always set,
    and ``model_id`` defaults to the file's stem (the SavedModel folder's name). ``embedded`` is the JSON
    an .onnx file carries, when the caller has already read it (ONNXPredictor); it is only used
    without a sidecar. FileNotFoundError for a missing path, ValueError for missing or unreadable
    metadata (the message says what was expected where)."""
    fmt = artifact_format(path)
    if fmt == "keras":
        path = resolve_model_path(path)
        metadata, default_id = _read_keras(path), path.stem
    else:
        path = Path(path)
        metadata = _read_export(path, fmt, embedded)
        default_id = path.name if fmt == "saved_model" else path.stem
    return metadata.replace(format=metadata.format or fmt, model_id=metadata.model_id or default_id)


def read_model_info(path: str | os.PathLike) -> ModelMetadata:
    """Alias of ``read_metadata`` (the name older callers use): ``.spec``, ``.model_id``, ``.backbone``,
    ``.extra`` of a run directory or a .keras file (any artifact, in fact), without loading weights."""
    return read_metadata(path)


def _read_keras(path: Path) -> ModelMetadata:
    try:
        with zipfile.ZipFile(path) as archive:
            text = archive.read(KERAS_PAYLOAD)
    except (zipfile.BadZipFile, KeyError) as error:
        sidecar = path.parent / KERAS_PAYLOAD
        if sidecar.is_file():  # a plain .keras saved elsewhere, next to a spec (or metadata) file
            return _read_keras_sidecar(sidecar, path)
        raise ValueError(f"{path} carries no preprocessing spec ({error}); it was not saved by this "
                         f"project. Put a {KERAS_PAYLOAD} beside it.") from error
    try:
        return ModelMetadata.from_json(text)
    except ValueError as error:
        raise ValueError(f"{path}: unreadable metadata in its {KERAS_PAYLOAD} ({error})") from error


def _read_keras_sidecar(sidecar: Path, model: Path) -> ModelMetadata:
    try:
        data = json.loads(sidecar.read_text())
        if isinstance(data, dict) and "spec" in data:
            return ModelMetadata.from_dict(data)
        return ModelMetadata(PreprocessSpec.from_dict(data), model.stem)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{sidecar}: unreadable preprocessing spec ({error})") from error


def _read_export(path: Path, fmt: str, embedded: str | bytes | None) -> ModelMetadata:
    sidecar = sidecar_path(path)
    if sidecar.is_file():
        where, text = sidecar, sidecar.read_text()
    else:
        if fmt == "onnx" and embedded is None:
            embedded = _onnx_embedded(path)
        if not embedded:
            raise ValueError(f"{path} has no preprocessing spec: expected {sidecar} (written by export.py). "
                             "Without it the class names, input size and preprocessing are unknown; re-export "
                             "the model with export.py or put its metadata file beside it.")
        where, text = f"{path} (metadata_props[{ARTIFACT_KEY!r}])", embedded
    try:
        return ModelMetadata.from_json(text)
    except ValueError as error:
        raise ValueError(f"{where}: unreadable artifact metadata ({error})") from error


def _onnx_embedded(path: Path) -> str | None:
    """The metadata JSON embedded in an .onnx file, None when it has none."""
    try:
        import onnx
    except ImportError:
        onnx = None
    try:
        if onnx is not None:
            proto = onnx.load(str(path), load_external_data=False)
            return next((p.value for p in proto.metadata_props if p.key == ARTIFACT_KEY), None)
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.get_modelmeta().custom_metadata_map.get(ARTIFACT_KEY)
    except ImportError:
        raise ValueError(f"{path}: no metadata file beside it, and neither onnx nor onnxruntime is installed "
                         "to read the metadata embedded in it") from None
    except Exception as error:  # onnx / onnxruntime's own exception types: report as an unusable file
        raise ValueError(f"{path}: not a loadable ONNX model ({error})") from error


def write_sidecar(artifact: str | os.PathLike, metadata: ModelMetadata) -> Path:
    """Write ``metadata`` where ``read_metadata`` looks for an exported artifact's (atomic)."""
    path = sidecar_path(artifact)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(metadata.to_json())
    os.replace(temporary, path)
    return path


def embed_in_keras(archive: str | os.PathLike, metadata: ModelMetadata) -> None:
    """Put ``metadata`` into a .keras zip archive: appended when the archive has none, else the
    archive is rewritten with the new entry in place of the old one (a copy beside it, then an
    atomic rename: a reader never sees a half-written file, and there is never a second entry)."""
    archive = Path(archive)
    with zipfile.ZipFile(archive) as zipped:
        present = KERAS_PAYLOAD in zipped.namelist()
    if not present:
        with zipfile.ZipFile(archive, "a") as zipped:
            zipped.writestr(KERAS_PAYLOAD, metadata.to_json())
        return
    temporary = archive.with_name(archive.name + ".tmp")
    try:
        with zipfile.ZipFile(archive) as source, zipfile.ZipFile(temporary, "w") as target:
            for info in source.infolist():
                if info.filename == KERAS_PAYLOAD:
                    continue
                with source.open(info) as read, target.open(copy.copy(info), "w") as write:
                    shutil.copyfileobj(read, write, 1 << 20)
            target.writestr(KERAS_PAYLOAD, metadata.to_json())
        shutil.copymode(archive, temporary)
        os.replace(temporary, archive)
    finally:
        temporary.unlink(missing_ok=True)


def embed_in_onnx(path: str | os.PathLike, metadata: ModelMetadata) -> None:
    """Replace the metadata JSON an .onnx file embeds (``metadata_props[ARTIFACT_KEY]``); atomic."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != ARTIFACT_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = ARTIFACT_KEY, json.dumps(metadata.to_dict())
    temporary = path.with_name(path.name + ".tmp")
    try:
        onnx.save(proto, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_metadata(path: str | os.PathLike, metadata: ModelMetadata) -> Path:
    """Store ``metadata`` where ``read_metadata`` finds it for this artifact, replacing what was there:
    inside a .keras archive (a run directory: its best.keras), an export's sidecar, and an .onnx
    file's embedded copy as well. Returns the file written. Used to add a calibration afterwards."""
    fmt = artifact_format(path)
    if fmt == "keras":
        target = resolve_model_path(path)
        embed_in_keras(target, metadata)
        return target
    written = write_sidecar(path, metadata)
    if fmt == "onnx":
        try:
            embed_in_onnx(path, metadata)
        except ImportError:  # the sidecar (read first) has it; the embedded copy stays as it was
            pass
    return written


def save_model(model, path: str | os.PathLike, spec: PreprocessSpec, *, model_id: str, backbone: str,
               extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (with optimizer state) and embed its metadata; atomic (temp file + rename)."""
    path = Path(path)
    temporary = path.with_name(path.stem + ".tmp.keras")
    model.save(temporary)
    embed_in_keras(temporary, ModelMetadata(spec, model_id, backbone, dict(extra or {}), format="keras"))
    os.replace(temporary, path)
    return path


def load_model(path: str | os.PathLike, *, compile: bool = False):
    """(keras.Model, ModelMetadata) from a .keras file or a run directory.

    ``compile=True`` restores the optimizer (with its state), loss and metrics, which may be the
    project's registered objects: importing utils.artifacts.keras_objects registers them (it is a leaf; the
    training code is not imported)."""
    import keras

    import models

    models.load_backbones()  # whatever the backbone modules register for deserialisation
    import utils.artifacts.keras_objects  # noqa: F401  (registers router>OneCycle, router>AdamL2, router>MacroF1)

    path = resolve_model_path(path)
    metadata = read_metadata(path)
    model = keras.models.load_model(path, compile=compile)
    return model, metadata
