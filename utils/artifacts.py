"""Self-describing model files: a Keras ``.keras`` archive that carries its preprocessing spec.

``save_model`` writes the model, then adds ``preprocess.json`` (the spec, the model id and the
backbone) inside the same zip archive, so a single file says how to feed it. ``load_model``
accepts that file or a training run directory (it then takes ``best.keras``).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.preprocessing import SPEC_FILENAME, PreprocessSpec

BEST_MODEL = "best.keras"
LAST_MODEL = "last.keras"


@dataclass(frozen=True)
class ModelInfo:
    spec: PreprocessSpec
    model_id: str
    backbone: str
    extra: dict[str, Any]


def save_model(model, path: str | os.PathLike, spec: PreprocessSpec, *, model_id: str, backbone: str,
               extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (with optimizer state) and embed the spec; atomic (temp file + rename)."""
    path = Path(path)
    temporary = path.with_name(path.stem + ".tmp.keras")
    model.save(temporary)
    payload = {"spec": spec.to_dict(), "model_id": model_id, "backbone": backbone, "extra": extra or {}}
    with zipfile.ZipFile(temporary, "a") as archive:
        archive.writestr(SPEC_FILENAME, json.dumps(payload, indent=2))
    os.replace(temporary, path)
    return path


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A run directory -> its best.keras; a file -> itself."""
    path = Path(path)
    if path.is_dir():
        candidate = path / BEST_MODEL
        if not candidate.is_file():
            raise FileNotFoundError(f"{path} has no {BEST_MODEL}: is it a finished training run?")
        return candidate
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return path


def training_data(path: str | os.PathLike) -> Path | None:
    """The prepared dataset a run directory (or a model file inside one) was trained on, as its
    config.json records it; None when there is no readable record. The folder may no longer exist."""
    path = Path(path)
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    try:
        return Path(json.loads(config_file.read_text())["config"]["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """The spec embedded in a .keras file (or a run directory's best.keras), without loading weights."""
    path = resolve_model_path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            payload = json.loads(archive.read(SPEC_FILENAME))
    except (zipfile.BadZipFile, KeyError) as error:
        sidecar = path.parent / SPEC_FILENAME
        if sidecar.is_file():  # a plain .keras saved elsewhere, next to a spec file
            return ModelInfo(PreprocessSpec.load(sidecar), path.stem, "", {})
        raise ValueError(f"{path} carries no preprocessing spec ({error}); it was not saved by this "
                         "project. Put a preprocess.json beside it.") from error
    return ModelInfo(PreprocessSpec.from_dict(payload["spec"]), payload.get("model_id", path.stem),
                     payload.get("backbone", ""), payload.get("extra", {}))


def load_model(path: str | os.PathLike, *, compile: bool = False):
    """(keras.Model, ModelInfo) from a .keras file or a run directory."""
    import keras

    import models  # noqa: F401  (registers the project's custom layers for deserialisation)
    from utils import training  # noqa: F401  (registers the custom optimizer, metric, schedule)

    path = resolve_model_path(path)
    info = read_model_info(path)
    model = keras.models.load_model(path, compile=compile)
    return model, info
