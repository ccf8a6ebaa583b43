"""The backfill's output folder: a Parquet dataset written in atomic parts, and what it already holds.

    store = OutputStore("out/", class_names, identity={"model_id": ..., "threshold": 0.5})
    todo = [f for f in files if f not in store.done_paths()]
    store.write(table)        # part-<run>-<n>.parquet, complete or absent
    frame = store.read()      # every row written so far, all runs

One row per file, with predict.py's CSV columns (utils.infer.batch_predict.csv_columns), typed:
``confidence`` and ``prob_<class>`` float64 (null for an unreadable file), ``tag_disagrees``
boolean (null without a tag), every other column a string. ``sorted_to`` stays empty (a
backfill does not sort) so that tools reading predict.py's CSV read these files alike.

A part is written to a hidden temporary file, fsynced, then renamed: a run killed at any point
leaves whole parts and at most a ``.part-*.tmp`` file, which is deleted and never read. The
folder's ``backfill.json`` records the model and threshold that wrote it; a run with another
model or threshold is refused (its rows would silently mix with the old ones).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.infer.batch_predict import csv_columns

PART_GLOB = "part-*.parquet"
TMP_GLOB = ".part-*.tmp"
IDENTITY_FILE = "backfill.json"
FLOAT_PREFIX = "prob_"


class OutputMismatch(ValueError):
    """The output folder was written by another model, classes or threshold."""


def output_schema(class_names: Sequence[str]):
    """The Parquet schema: predict.py's columns, numbers as float64, tag_disagrees as bool."""
    import pyarrow as pa

    fields = []
    for name in csv_columns(class_names):
        if name in ("confidence", "ood_score") or name.startswith(FLOAT_PREFIX):
            fields.append(pa.field(name, pa.float64()))
        elif name == "tag_disagrees":
            fields.append(pa.field(name, pa.bool_()))
        else:
            fields.append(pa.field(name, pa.string()))
    return pa.schema(fields)


def typed_record(row: Mapping[str, str], confidence: float | None, probs: Sequence[float] | None,
                 class_names: Sequence[str]) -> dict[str, Any]:
    """predict.py's CSV row (strings) with its numbers at full precision and its flag as a bool."""
    record: dict[str, Any] = {name: row.get(name, "") for name in csv_columns(class_names)}
    record["confidence"] = None if confidence is None else float(confidence)
    for i, name in enumerate(class_names):
        record[f"{FLOAT_PREFIX}{name}"] = None if probs is None else float(probs[i])
    record["tag_disagrees"] = {"true": True, "false": False}.get(row.get("tag_disagrees", ""))
    record["ood_score"] = float(row["ood_score"]) if row.get("ood_score") else None
    return record


class OutputStore:
    def __init__(self, folder: str | os.PathLike, class_names: Sequence[str],
                 identity: Mapping[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.class_names = list(class_names)
        self.schema = output_schema(self.class_names)
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        self._sequence = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(TMP_GLOB):  # a part a killed run was writing: never complete
            stale.unlink()
        self._check_identity({**(identity or {}), "class_names": self.class_names})

    def _check_identity(self, identity: dict[str, Any]) -> None:
        path = self.folder / IDENTITY_FILE
        if path.is_file():
            stored = json.loads(path.read_text())
            differing = sorted(k for k in identity if k in stored and stored[k] != identity[k])
            if differing:
                raise OutputMismatch(f"{self.folder} was written with other settings ("
                                     + "; ".join(f"{k}: {stored[k]!r} there, {identity[k]!r} now" for k in differing)
                                     + "); use another --output folder")
        elif self.parts():
            raise OutputMismatch(f"{self.folder} holds parts but no {IDENTITY_FILE}: not a backfill output")
        else:
            _atomic_write_bytes(path, json.dumps(identity, indent=2).encode())

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob(PART_GLOB))

    def done_paths(self) -> set[str]:
        """The paths of every row already written (all runs)."""
        import pyarrow.parquet as pq

        done: set[str] = set()
        for part in self.parts():
            done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
        return done

    def write(self, table) -> Path:
        """Write one part atomically (temporary file, fsync, rename); its final path."""
        import pyarrow.parquet as pq

        self._sequence += 1
        name = f"part-{self.run_id}-{self._sequence:06d}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table.select(self.schema.names).cast(self.schema), tmp)
        _fsync(tmp)
        final = self.folder / name
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        return final

    def read(self, columns: Sequence[str] | None = None):
        """Every row written so far as a pandas DataFrame (empty, with the columns, when none).

        A part written before a column existed (``ood_score`` came later) has it as typed nulls."""
        import pyarrow as pa

        names = list(columns) if columns is not None else self.schema.names
        schema = pa.schema([self.schema.field(n) for n in names])
        tables = [_read_part(p, schema) for p in self.parts()]
        if not tables:
            return schema.empty_table().to_pandas()
        return pa.concat_tables(tables).to_pandas()


def _read_part(path: Path, schema):
    """One part with ``schema``'s columns, in its order: the ones the part has, cast to the schema's type; the
    ones it lacks as nulls of that type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[n for n in schema.names if n in present])
    return pa.table([table.column(f.name).cast(f.type) if f.name in present else pa.nulls(len(table), f.type)
                     for f in schema], schema=schema)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that readers see the old or the new one, never half of it."""
    _atomic_write_bytes(Path(path), text.encode())
