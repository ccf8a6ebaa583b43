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

A cross-validation (``training.py --folds K``) is a directory of K such runs plus the pooled
out-of-fold predictions::

    cv.json              folds, seed, data, settings, command; per-fold counts once finished
    fold-1/ ... fold-K/  one run directory each (the layout above)
    oof_predictions.csv  every image predicted once, by the model that never saw it
    oof_skipped.csv      images of a fold's test part that could not be read (file, reason)

``is_cv_dir`` tells one apart.
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
CV_INFO = "cv.json"
OOF_PREDICTIONS = "oof_predictions.csv"
OOF_SKIPPED = "oof_skipped.csv"


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run directory: config.json and a checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file() and (
        (path / LAST_MODEL).is_file() or (path / BEST_MODEL).is_file())


def default_dir(prefix: str) -> Path:
    """Where a new run (or cross-validation) goes without --output: RUNS_DIR/<prefix>-<local time>."""
    import datetime as _dt

    from utils import constants

    return Path(constants.RUNS_DIR) / f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def is_cv_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a cross-validation directory (training.py --folds K)."""
    return Path(path).is_dir() and (Path(path) / CV_INFO).is_file()


def fold_dir(path: str | os.PathLike, index: int) -> Path:
    """The run directory of fold ``index`` (0-based) of a cross-validation directory."""
    return Path(path) / f"fold-{index + 1}"


def read_cv(path: str | os.PathLike) -> dict[str, Any]:
    """cv.json of a cross-validation directory."""
    return json.loads((Path(path) / CV_INFO).read_text())


def write_cv(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Replace a cross-validation directory's cv.json atomically."""
    _write_json(Path(path) / CV_INFO, payload)


def _write_json(target: Path, payload: dict[str, Any]) -> None:
    """Temporary file + rename: a killed process leaves the old file or the new one, never half of one."""
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, target)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The whole config.json payload of a run ({"config": ..., "spec": ..., ...})."""
    return json.loads((Path(path) / CONFIG).read_text())


def write_config(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Replace a run's config.json atomically."""
    _write_json(Path(path) / CONFIG, payload)


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
