"""The prepared dataset on disk: the one module that knows its file names and columns.

A prepared dataset (written by prepare.py) is a folder holding::

    images/<label>/<stem>_<cache key>.png   the 8-bit cache, named by what decides its pixels
    labels.csv           one row per image: LABEL_COLUMNS
    rejects.csv          one row per source file that could not be used: REJECT_COLUMNS
    preprocess.json      the PreprocessSpec the images were made with
    pixels.json          pixel_provenance() of the run that made them (pipeline, reader, decoders)
    prepare_config.json  the resolved settings, command and environment of the last run
    summary.txt          the printed summary

Everything else asks this module: ``is_prepared`` is the one test of "is this a prepared
dataset?", ``read_labels`` and ``read_spec`` the readers, ``write_csv`` the atomic writer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from utils.preprocessing import SPEC_FILENAME, PreprocessSpec

LABELS = "labels.csv"
REJECTS = "rejects.csv"
SPEC = SPEC_FILENAME
CONFIG = "prepare_config.json"
SUMMARY = "summary.txt"
PROVENANCE = "pixels.json"
IMAGES = "images"
SPLITS = ("train", "val", "test")
LABEL_COLUMNS = ("path", "label", "split", "group", "source_file", "SOPInstanceUID", "PatientID",
                 "Modality", "BodyPartExamined", "PatientAge", "PhotometricInterpretation",
                 "original_rows", "original_columns")
REJECT_COLUMNS = ("source_file", "reason", "message")


class NotPreparedError(FileNotFoundError):
    """The folder is not a prepared dataset (no labels.csv or preprocess.json)."""


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a prepared dataset folder: it holds labels.csv and preprocess.json."""
    path = Path(path)
    return path.is_dir() and (path / LABELS).is_file() and (path / SPEC).is_file()


def require_prepared(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or NotPreparedError saying how to make one."""
    path = Path(path)
    if not is_prepared(path):
        missing = [name for name in (LABELS, SPEC) if not (path / name).is_file()]
        raise NotPreparedError(f"{path} is not a prepared dataset (no {' or '.join(missing)}): prepare one "
                               f"first (python prepare.py --input SRC --output {path})")
    return path


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """labels.csv of a prepared dataset (text columns as strings), or NotPreparedError."""
    path = Path(path)
    if not (path / LABELS).is_file():
        require_prepared(path)
    return pd.read_csv(path / LABELS, dtype={"label": str, "split": str, "group": str, "path": str},
                       keep_default_na=False)


def read_spec(path: str | os.PathLike) -> PreprocessSpec:
    """The PreprocessSpec a prepared dataset was made with, or NotPreparedError."""
    path = Path(path)
    if not (path / SPEC).is_file():
        require_prepared(path)
    return PreprocessSpec.load(path / SPEC)


def read_provenance(path: str | os.PathLike) -> dict[str, str] | None:
    """pixels.json of a prepared dataset; None when absent or unreadable (prepared before it existed)."""
    try:
        data = json.loads((Path(path) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(data: dict, path: str | os.PathLike) -> None:
    """Write JSON atomically."""
    path = Path(path)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def image_path(root: str | os.PathLike, relative: str) -> Path:
    """The absolute file of a labels.csv ``path`` value."""
    return Path(root) / relative


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a CSV atomically (temporary file + rename): a killed run leaves the old file or the new one."""
    path = Path(path)
    temporary = path.with_suffix(".tmp")
    frame.to_csv(temporary, index=False)
    os.replace(temporary, path)
