"""A training run directory on disk: the one module that knows its file names.

training.py writes, into ``runs/<backbone>-<time>/`` (or --output)::

    config.json          resolved settings, spec, command, environment; "resumes" lists each --resume
    log.csv              one row per finished epoch (Keras CSVLogger)
    last.keras           the model after the last finished epoch; its metadata holds that epoch
    best.keras           the model of the best validation epoch; its metadata holds epoch and score
    best.json            the best epoch's logs, for people and scripts
    training_curves.png  loss / accuracy / macro-F1 / learning rate per epoch
    tensorboard/         TensorBoard event files

``is_run_dir`` is the one test of "is this a run directory?"; ``read_config``, ``read_best`` and
``training_data`` the readers. Nothing here imports TensorFlow: serving code may ask it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG = "config.json"
LOG = "log.csv"
LAST_MODEL = "last.keras"
BEST_MODEL = "best.keras"
BEST_INFO = "best.json"
CURVES = "training_curves.png"
TENSORBOARD = "tensorboard"
MONITOR = "val_macro_f1"  # what best.keras is chosen by


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run directory: config.json and a checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (
        (path / LAST_MODEL).is_file() or (path / BEST_MODEL).is_file())


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The whole config.json payload of a run ({"config": ..., "spec": ..., ...})."""
    return json.loads((Path(path) / CONFIG).read_text())


def write_config(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Replace a run's config.json atomically."""
    target = Path(path) / CONFIG
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, target)


def read_best(path: str | os.PathLike) -> dict[str, Any] | None:
    """best.json of a run, or None when there is none yet."""
    try:
        return json.loads((Path(path) / BEST_INFO).read_text())
    except (OSError, ValueError):
        return None


def training_data(path: str | os.PathLike) -> Path | None:
    """The prepared dataset a run directory (or a model file inside one) was trained on, as its
    config.json records it; None when there is no readable record. The folder may no longer exist."""
    path = Path(path)
    try:
        return Path(read_config(path if path.is_dir() else path.parent)["config"]["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
