"""Batch prediction behind predict.py, and the per-image decisions the router shares with it.

    files, skipped = collect_inputs(["scans/", "more.dcm", "list.txt"])
    summary = run(predictor, files, output="predictions.csv", threshold=0.5, sort_into="sorted/")

Files are decoded in a background thread pool (the DICOM codecs and OpenCV release the GIL) while
the model runs on the previous batch. Every input becomes one CSV row: a file that cannot be read
gets label ``unreadable`` and its reason instead of stopping the run. ``--sort-into`` copies (or
links) each file into ``DIR/<label>/`` and never overwrites or touches a source file.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.evaluation import map_in_batches, prefetch, use_processes
from utils.preprocessing import PreprocessSpec, is_raster, preprocess_file, to_model_input

log = logging.getLogger(__name__)

UNCERTAIN = "uncertain"  # top probability below the threshold: route to manual review
UNREADABLE = "unreadable"  # not an image the model can see (broken, non-image object, not DICOM)
LIST_SUFFIXES = (".txt", ".lst", ".list")  # an input file with this suffix lists paths, one per line
SORT_MODES = ("copy", "hardlink", "symlink")

# Body Part Examined values (DICOM PS3.16 CID 4031 defined terms and common variants, compared
# upper-case without separators) that agree with each default class. Classes not listed here
# agree with a tag equal to their own name (e.g. a "knee" class with KNEE).
BODY_PART_TAGS: dict[str, frozenset[str]] = {
    "abdominal": frozenset({"ABDOMEN", "ABDOMENPELVIS", "ABD", "KUB", "BOWEL", "STOMACH"}),
    "adult_chest": frozenset({"CHEST", "THORAX", "LUNG", "CHESTPA", "CHESTAP", "CHESTLAT"}),
    "pediatric_chest": frozenset({"CHEST", "THORAX", "LUNG", "CHESTPA", "CHESTAP", "CHESTLAT"}),
    "spine": frozenset({"SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE", "LSSPINE",
                        "WHOLESPINE", "COCCYX", "SACRUM", "CERVICALSPINE", "THORACICSPINE", "LUMBARSPINE"}),
}
OTHER_CLASSES = ("others", "other")  # a catch-all class agrees with any tag no specific class claims


# --- Decoding -------------------------------------------------------------------------------


@dataclass
class Decoded:
    """One file after preprocessing: the 8-bit image, or why there is none."""

    path: str
    image: np.ndarray | None  # uint8 (S, S), None when unreadable
    header: dict[str, str] = field(default_factory=dict)  # DICOM header fields ("" where missing)
    reason: str = ""  # short error code (utils.dicom / utils.preprocessing reasons), "" when readable
    message: str = ""


def decode_file(path: str | os.PathLike, spec: PreprocessSpec) -> Decoded:
    """Preprocess one file with the model's spec; never raises for a bad file."""
    path = os.fspath(path)
    try:
        image, header = preprocess_file(path, spec)
        return Decoded(path, image, dict(header))
    except FileNotFoundError as error:
        return Decoded(path, None, {}, "file_not_found", str(error))
    except OSError as error:
        return Decoded(path, None, {}, "os_error", str(error))
    except Exception as error:  # noqa: BLE001 - every failure becomes a reported row
        reason = getattr(error, "reason", "") or type(error).__name__
        return Decoded(path, None, _header_or_empty(path), str(reason), str(error))


def _header_or_empty(path: str) -> dict[str, str]:
    """The UIDs and tags of a DICOM that has no usable image (an SR still has a SOPInstanceUID)."""
    if is_raster(path):
        return {}
    from utils.dicom import read_dicom_header

    try:
        return read_dicom_header(path)
    except Exception:  # noqa: BLE001 - best effort; the decode error is what gets reported
        return {}


def iter_decoded(files: Sequence[str], spec: PreprocessSpec, *, batch_size: int, workers: int = 0,
                 pool: str = "threads") -> Iterator[list[Decoded]]:
    """Decode ``files`` in a thread or process ``pool`` (constants.DECODE_POOL_CHOICES),
    ``batch_size`` at a time, in order. A file whose decoding process dies is reported as
    ``decoder_crashed``; the other files go on."""
    return map_in_batches(files, functools.partial(decode_file, spec=spec), batch_size=batch_size,
                          workers=workers, processes=use_processes(pool, files), on_crash=_crashed)


def _crashed(path: str) -> Decoded:
    return Decoded(path, None, _header_or_empty(path), "decoder_crashed",
                   "the process decoding this file died (a crash in an image codec); the file was not read")


# --- Decisions ------------------------------------------------------------------------------


def decide(probs: np.ndarray, class_names: Sequence[str], threshold: float) -> tuple[list[str], list[str], np.ndarray]:
    """(labels with ``uncertain`` below the threshold, top labels, confidences) for probs (N, K)."""
    top = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(probs)), top].astype(np.float64)
    top_labels = [class_names[i] for i in top]
    labels = [name if c >= threshold else UNCERTAIN for name, c in zip(top_labels, confidence)]
    return labels, top_labels, confidence


def _normalise_tag(value: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", (value or "").upper())


def tag_disagrees(label: str, tag: str, class_names: Sequence[str]) -> bool | None:
    """Does the BodyPartExamined tag contradict the predicted class? None when there is no tag.

    CHEST agrees with both chest classes; a catch-all class ("others") disagrees only with tags
    that another class claims; a tag no class claims contradicts every specific class.
    """
    tag = _normalise_tag(tag)
    if not tag or label not in class_names:
        return None
    claimed = {c for c in class_names if tag in BODY_PART_TAGS.get(c, frozenset({_normalise_tag(c)}))}
    if label in OTHER_CLASSES:
        return bool(claimed - {label})
    return label not in claimed


# --- Inputs ---------------------------------------------------------------------------------


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """Expand files, folders (recursive) and list files into (files, skipped files).

    A folder contributes its images and DICOM files (by content; hidden entries and other files
    are skipped and returned as skipped). A file named ``*.txt``/``*.lst``/``*.list`` that is not
    DICOM lists paths, one per line (``#`` comments and blank lines ignored; relative paths are
    taken relative to the list's folder, else to the working directory). Any other file is used
    as given, readable or not. Duplicates are kept once, in first-seen order.
    """
    from utils.dicom import is_dicom

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
                    (files if is_raster(full) or is_dicom(full) else skipped).append(full)
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
    stem, suffix = source.stem, source.suffix
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
            + ["BodyPartExamined", "tag_disagrees", "error", "sorted_to"])


@dataclass
class Summary:
    total: int = 0
    labels: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # unreadable files by reason
    disagreements: int = 0  # readable files whose BodyPartExamined contradicts the prediction
    missing_tag: int = 0  # readable files without a BodyPartExamined tag
    placed: int = 0  # files copied/linked by --sort-into (not counting ones already there)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.total / self.seconds if self.seconds > 0 else 0.0
        out = [f"{self.total} files in {self.seconds:.1f} s ({rate:.1f} files/s)"]
        out += [f"  {label:<18} {n}" for label, n in sorted(self.labels.items())]
        if self.errors:
            out.append("unreadable: " + ", ".join(f"{r} {n}" for r, n in sorted(self.errors.items())))
        out.append(f"BodyPartExamined contradicts the prediction: {self.disagreements}; "
                   f"tag missing: {self.missing_tag}")
        if self.placed:
            out.append(f"sorted: {self.placed} files placed")
        return out


def run(predictor, files: Sequence[str], *, output: str | os.PathLike, threshold: float, batch_size: int = 32,
        workers: int = 0, pool: str = "auto", sort_into: str | os.PathLike | None = None, sort_mode: str = "copy",
        progress: bool = True) -> Summary:
    """Classify ``files``, write one CSV row per file to ``output`` as batches finish; a Summary."""
    from tqdm import tqdm

    spec: PreprocessSpec = predictor.spec
    class_names = list(spec.class_names)
    summary = Summary(total=len(files))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = tqdm(total=len(files), desc="classifying", unit="file", disable=not progress)
    with open(output, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(class_names))
        writer.writeheader()
        for decoded in prefetch(iter_decoded(files, spec, batch_size=batch_size, workers=workers, pool=pool)):
            readable = [d for d in decoded if d.image is not None]
            probs = (predictor.predict(to_model_input(np.stack([d.image for d in readable]), spec.channels))
                     if readable else np.zeros((0, len(class_names)), np.float32))
            labels, top_labels, confidence = decide(probs, class_names, threshold)
            results = iter(zip(labels, top_labels, confidence, probs))
            for d in decoded:
                row = _row(d, next(results) if d.image is not None else None, class_names, summary)
                if sort_into is not None:
                    row["sorted_to"] = _sort(d.path, Path(sort_into) / row["label"], sort_mode, row, summary)
                writer.writerow(row)
            handle.flush()
            bar.update(len(decoded))
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _row(d: Decoded, result, class_names: list[str], summary: Summary) -> dict:
    tag = d.header.get("BodyPartExamined", "")
    row = {"path": d.path, "SOPInstanceUID": d.header.get("SOPInstanceUID", ""),
           "StudyInstanceUID": d.header.get("StudyInstanceUID", ""), "BodyPartExamined": tag,
           "error": "", "sorted_to": "", "tag_disagrees": "", "confidence": "", "top_label": ""}
    if result is None:
        row.update(label=UNREADABLE, error=f"{d.reason}: {d.message}")
        row.update({f"prob_{c}": "" for c in class_names})
        summary.errors[d.reason] += 1
    else:
        label, top_label, confidence, probs = result
        row.update(label=label, top_label=top_label, confidence=f"{confidence:.6f}")
        row.update({f"prob_{c}": f"{p:.6f}" for c, p in zip(class_names, probs)})
        disagrees = tag_disagrees(top_label, tag, class_names)
        if disagrees is None:
            summary.missing_tag += 1
        else:
            row["tag_disagrees"] = str(disagrees).lower()
            summary.disagreements += int(disagrees)
    summary.labels[row["label"]] += 1
    return row


def _sort(path: str, folder: Path, mode: str, row: dict, summary: Summary) -> str:
    try:
        target, new = place(path, folder, mode)
    except OSError as error:  # a missing source or a full disk is reported in the row, not fatal
        log.warning("could not place %s into %s: %s", path, folder, error)
        row["error"] = (row["error"] + "; " if row["error"] else "") + f"sort_failed: {error}"
        return ""
    summary.placed += int(new)
    return str(target)
