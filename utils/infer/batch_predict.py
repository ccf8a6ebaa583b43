"""Batch prediction behind predict.py.

    files, skipped = collect_inputs(["scans/", "more.dcm", "list.txt"])
    summary = run(predictor, files, output="predictions.csv", threshold=0.5, sort_into="sorted/")

Files go through utils.infer.engine (decoded in isolated worker processes, batch n+1 while the model
runs on batch n). Every input becomes one CSV row: a file that cannot be read, hangs or crashes
its decoder gets label ``unreadable`` and its reason instead of stopping the run. ``--sort-into``
copies (or links) each file into ``DIR/<label>/`` and never overwrites or touches a source file. The label (a
class name from the model file) and the file name become one harmless path component each
(utils/untrusted.py): a hostile class name or file name never places a file outside ``DIR``.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from utils.infer.decisions import UNREADABLE, tag_disagrees
from utils.infer.engine import Engine, Prediction
from utils.infer.ood import OUT_OF_DISTRIBUTION
from utils.infer.predictor import scorer
from utils.io.isolation import PoolSettings
from utils.preprocessing import PreprocessSpec, is_raster
from utils.untrusted import contained, safe_component, safe_filename

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst", ".list")  # an input file with this suffix lists paths, one per line
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")  # named as DICOM: kept from a folder even when the content is not
SORT_MODES = ("copy", "hardlink", "symlink")


# --- Inputs ---------------------------------------------------------------------------------


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """Expand files, folders (recursive) and list files into (files, skipped files).

    A folder contributes its images and DICOM files: named ``*.dcm``/``*.dicom``/``*.dic`` (any
    case; kept even when the content is not DICOM, so it gets a row with reason ``not_dicom``)
    or with DICOM content whatever the name; hidden entries and other files are skipped and
    returned as skipped. A file named ``*.txt``/``*.lst``/``*.list`` that is not
    DICOM lists paths, one per line (``#`` comments and blank lines ignored; relative paths are
    taken relative to the list's folder, else to the working directory). Any other file is used
    as given, readable or not. Duplicates are kept once, in first-seen order.
    """
    from utils.io.dicom import is_dicom

    files: list[str] = []
    skipped: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    full = os.path.join(root, name)
                    if name.startswith("."):
                        continue
                    wanted = is_raster(full) or name.lower().endswith(DICOM_SUFFIXES) or is_dicom(full)
                    (files if wanted else skipped).append(full)
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file() and not is_dicom(path):
            files += _read_list(path)
        elif path.exists():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    seen: set[str] = set()
    unique = [f for f in files if not (os.path.abspath(f) in seen or seen.add(os.path.abspath(f)))]
    return unique, skipped


def _read_list(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        entry = Path(line)
        if not entry.is_absolute() and (path.parent / entry).exists():
            entry = path.parent / entry
        out.append(str(entry))  # missing files stay: they become rows with reason file_not_found
    return out


# --- Sorting --------------------------------------------------------------------------------


def place(source: str | os.PathLike, folder: str | os.PathLike, mode: str = "copy") -> tuple[Path, bool]:
    """Copy, hard-link or symlink ``source`` into ``folder``; (destination, newly placed).

    Never overwrites: an existing file with the same content (or the same file) is left as it is
    and reported as not new; a different file of the same name gets ``_1``, ``_2``... The source is
    only read.
    """
    if mode not in SORT_MODES:
        raise ValueError(f"sort mode must be one of {SORT_MODES}, got {mode!r}")
    source, folder = Path(source), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = Path(safe_filename(source.name))  # unchanged unless it could not be a file name of its own
    stem, suffix = name.stem, name.suffix
    for n in range(10_000):
        target = folder / (f"{stem}{suffix}" if n == 0 else f"{stem}_{n}{suffix}")
        if target.exists() or target.is_symlink():
            if _same_content(source, target):
                return target, False
            continue
        try:
            if mode == "copy":
                with open(source, "rb") as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                shutil.copystat(source, target)
            elif mode == "hardlink":
                os.link(source, target)
            else:
                os.symlink(source.resolve(), target)
        except FileExistsError:  # another process took the name meanwhile
            continue
        return target, True
    raise FileExistsError(f"{folder}: too many files named like {source.name}")


def _same_content(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            while True:
                chunk = fa.read(1 << 20)
                if chunk != fb.read(1 << 20):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


# --- The run --------------------------------------------------------------------------------


def csv_columns(class_names: Sequence[str]) -> list[str]:
    return (["path", "SOPInstanceUID", "StudyInstanceUID", "label", "confidence", "top_label"]
            + [f"prob_{c}" for c in class_names]
            + ["ood_score", "BodyPartExamined", "tag_disagrees", "error", "sorted_to"])


@dataclass
class Summary:
    total: int = 0
    labels: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # unreadable files by reason
    disagreements: int = 0  # readable files whose BodyPartExamined contradicts the prediction
    missing_tag: int = 0  # readable files without a BodyPartExamined tag
    out_of_distribution: int = 0  # readable files the model's OOD score flagged (label uncertain)
    placed: int = 0  # files copied/linked by --sort-into (not counting ones already there)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.total / self.seconds if self.seconds > 0 else 0.0
        out = [f"{self.total} files in {self.seconds:.1f} s ({rate:.1f} files/s)"]
        out += [f"  {label:<18} {n}" for label, n in sorted(self.labels.items())]
        if self.errors:
            out.append("unreadable: " + ", ".join(f"{r} {n}" for r, n in sorted(self.errors.items())))
        if self.out_of_distribution:
            out.append(f"uncertain because unlike the training radiographs ({OUT_OF_DISTRIBUTION}): "
                       f"{self.out_of_distribution}")
        out.append(f"BodyPartExamined contradicts the prediction: {self.disagreements}; "
                   f"tag missing: {self.missing_tag}")
        if self.placed:
            out.append(f"sorted: {self.placed} files placed")
        return out


def run(predictor, files: Sequence[str], *, output: str | os.PathLike, threshold: float, batch_size: int = 32,
        pool: PoolSettings | None = None, sort_into: str | os.PathLike | None = None, sort_mode: str = "copy",
        progress: bool = True, projection_only: bool = True) -> Summary:
    """Classify ``files``, write one CSV row per file to ``output`` as batches finish; a Summary.

    ``pool`` sets how files are decoded (default: worker processes, utils/constants.py DECODE_*).
    ``projection_only``: a DICOM whose header is not projection radiography gets label ``unreadable``
    with reason ``not_projection_radiography`` instead of a body part (utils.infer.decisions.not_projection).
    """
    from tqdm import tqdm

    spec: PreprocessSpec = predictor.spec
    class_names = list(spec.class_names)
    summary = Summary(total=len(files))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=len(files), desc="classifying", unit="file", disable=not progress)
    with open(output, "w", newline="") as handle, \
            Engine(spec, scorer(predictor), threshold=threshold, pool=pool, projection_only=projection_only) as engine:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(class_names))
        writer.writeheader()
        for predictions in engine.classify_batches(files, batch_size):
            for prediction in predictions:
                row = row_of(prediction, class_names, summary)
                if sort_into is not None:
                    row["sorted_to"] = _sort(prediction.path, sort_into, row["label"], sort_mode, row, summary)
                writer.writerow(row)
            handle.flush()
            bar.update(len(predictions))
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def row_of(p: Prediction, class_names: list[str], summary: Summary) -> dict:
    """predict.py's CSV row of one prediction (also backfill.py's Parquet row), counted in ``summary``."""
    tag = p.header.get("BodyPartExamined", "")
    row = {"path": p.path, "SOPInstanceUID": p.header.get("SOPInstanceUID", ""),
           "StudyInstanceUID": p.header.get("StudyInstanceUID", ""), "BodyPartExamined": tag,
           "error": "", "sorted_to": "", "tag_disagrees": "", "confidence": "", "top_label": "", "ood_score": ""}
    if not p.readable:
        row.update(label=UNREADABLE, error=p.error)
        row.update({f"prob_{c}": "" for c in class_names})
        summary.errors[p.reason] += 1
    else:
        row.update(label=p.label, top_label=p.top_label, confidence=f"{p.confidence:.6f}", error=p.error)
        row.update({f"prob_{c}": f"{q:.6f}" for c, q in zip(class_names, p.probs)})
        if p.ood_score is not None:
            row["ood_score"] = f"{p.ood_score:.6g}"
        summary.out_of_distribution += int(p.reason == OUT_OF_DISTRIBUTION)
        disagrees = tag_disagrees(p.top_label, tag, class_names)
        if disagrees is None:
            summary.missing_tag += 1
        else:
            row["tag_disagrees"] = str(disagrees).lower()
            summary.disagreements += int(disagrees)
    summary.labels[row["label"]] += 1
    return row


def _sort(path: str, sort_into: str | os.PathLike, label: str, mode: str, row: dict, summary: Summary) -> str:
    folder = Path(sort_into) / safe_component(label)  # a class name from the model file: one harmless component
    try:
        contained(sort_into, folder.name)  # UnsafePathError (an OSError): a link there pointing out of sort_into
        target, new = place(path, folder, mode)
    except OSError as error:  # a missing source or a full disk is reported in the row, not fatal
        log.warning("could not place %s into %s: %s", path, folder, error)
        row["error"] = (row["error"] + "; " if row["error"] else "") + f"sort_failed: {error}"
        return ""
    summary.placed += int(new)
    return str(target)
