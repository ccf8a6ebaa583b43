"""Dataset preparation: a source of DICOM/PNG/JPEG files -> 8-bit PNG cache + labels.csv + rejects.csv.

Three source layouts are recognised (see data/README.md):

(a) the VinDr-BodyPartXR release: ``ROOT/train.csv`` and/or ``ROOT/test.csv`` holding an image
    id column and a label column, DICOM files in ``ROOT/train/`` and ``ROOT/test/``; the official
    train/test split is kept and validation is carved out of train;
(b) one folder per class (``ROOT/<class>/**``) of DICOM and/or PNG/JPEG files, with an optional
    ``ROOT/manifest.csv`` (``file,label[,group][,split]``) whose group and split columns are honoured;
(c) a CSV file of ``path,label[,group][,split]`` (paths relative to the CSV's folder or absolute).

Every row of labels.csv says where its image came from; every file that could not be used is in
rejects.csv with a reason code and message. One bad file never stops the run.

The cache is keyed on what decides its pixels: a PNG's name carries a hash of the source's path,
size and modification time, the spec's pixel fields and ``pixel_provenance()`` (pipeline,
reader and decoder versions). A re-run reuses a PNG only when all of these are unchanged; a
source edited in place, a new decoder or another spec gives a new name, and PNGs no longer
listed in labels.csv are removed at the end of the run. ``overwrite`` redoes every image.
The folder's file names and columns belong to ``utils.data.files``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import cv2
import numpy as np
import pandas as pd

from utils.data import files
from utils.data.files import LABEL_COLUMNS, REJECT_COLUMNS, SPLITS
from utils.data.split import PLACEHOLDER_IDS, assign_splits, group_key
from utils.io.isolation import Failure, IsolatedPool, PoolSettings
from utils.preprocessing import PreprocessSpec, is_raster, pixel_provenance, preprocess_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "test": "test", "testing": "test"}
_ID_COLUMNS = ("image_id", "imageid", "sopinstanceuid", "id", "file", "filename", "path")
_LABEL_COLUMNS_IN = ("label", "target", "class", "body_part", "bodypart")


class SourceError(ValueError):
    """The input folder or CSV is not in a supported layout."""


@dataclass(frozen=True)
class SourceFile:
    """One image to prepare, as the source describes it."""

    source: str
    label: str
    group: str = ""
    split: str = ""
    target: str = ""  # the cache PNG, relative to the output folder (set by prepare_dataset)


class Reject(NamedTuple):
    """A listed file that cannot be used, with the split the source gave it ("" when none)."""

    source: str
    reason: str
    message: str
    split: str = ""


@dataclass
class SourceListing:
    items: list[SourceFile]
    rejects: list[Reject] = field(default_factory=list)
    layout: str = ""


# --- Finding the items ------------------------------------------------------------------------

def list_source(source: str | os.PathLike, class_names: Sequence[str]) -> SourceListing:
    """Recognise the layout of ``source`` and list its items (no pixel is decoded here)."""
    source = Path(source)
    if not source.exists():
        raise SourceError(f"{source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise SourceError(f"{source} is a file but not a CSV of path,label[,group][,split]")
        return _list_csv(source, class_names)
    if any((source / f"{s}.csv").is_file() for s in ("train", "test")) and not any(
        (source / c).is_dir() for c in class_names
    ):
        return _list_vindr(source, class_names)
    if any((source / c).is_dir() for c in class_names):
        return _list_class_folders(source, class_names)
    raise SourceError(
        f"{source}: not a supported layout. Expected one folder per class ({', '.join(class_names)}), "
        "train.csv/test.csv with train/ and test/ folders (VinDr-BodyPartXR), or a CSV file of "
        "path,label[,group][,split]. See data/README.md.")


def _normalise_label(value: object, class_names: Sequence[str]) -> str | None:
    text = str(value).strip()
    if re.fullmatch(r"\d+", text):
        index = int(text)
        return class_names[index] if index < len(class_names) else None
    lowered = text.lower().replace(" ", "_").replace("-", "_")
    for name in class_names:
        if name.lower() == lowered:
            return name
    return None


def _normalise_split(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = str(value).strip().lower()
    if text and text not in _SPLIT_ALIASES:
        raise SourceError(f"unknown split value {value!r}; use train/val/test")
    return _SPLIT_ALIASES.get(text, "")


def _column(frame: pd.DataFrame, candidates: Iterable[str]) -> str | None:
    lowered = {c.lower(): c for c in frame.columns}
    for name in candidates:
        if name in lowered:
            return lowered[name]
    return None


def _rows_to_items(frame: pd.DataFrame, resolve_path, class_names: Sequence[str], *, id_column: str,
                   label_column: str, default_split: str = "") -> SourceListing:
    group_col, split_col = _column(frame, ("group",)), _column(frame, ("split",))
    listing = SourceListing(items=[])
    for row in frame.to_dict("records"):
        raw_label = row[label_column]
        split = _normalise_split(row[split_col]) if split_col else default_split
        path = resolve_path(str(row[id_column]))
        label = _normalise_label(raw_label, class_names)
        if path is None:
            listing.rejects.append(Reject(str(row[id_column]), "file_not_found", "listed but not found on disk", split))
            continue
        if label is None:
            listing.rejects.append(Reject(str(path), "unknown_label",
                                          f"label {raw_label!r} is not one of {list(class_names)} (or an index)",
                                          split))
            continue
        group = "" if group_col is None or pd.isna(row[group_col]) else str(row[group_col])
        listing.items.append(SourceFile(str(path), label, group, split))
    return listing


def _list_csv(csv_path: Path, class_names: Sequence[str]) -> SourceListing:
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    id_column, label_column = _column(frame, ("path", "file")), _column(frame, _LABEL_COLUMNS_IN)
    if id_column is None or label_column is None:
        raise SourceError(f"{csv_path}: needs columns path and label (found {list(frame.columns)})")

    def resolve(text: str) -> Path | None:
        path = Path(text) if Path(text).is_absolute() else csv_path.parent / text
        return path if path.is_file() else None

    listing = _rows_to_items(frame, resolve, class_names, id_column=id_column, label_column=label_column)
    listing.layout = f"CSV list {csv_path.name}"
    return listing


def _list_class_folders(root: Path, class_names: Sequence[str]) -> SourceListing:
    manifest = root / "manifest.csv"
    listed: dict[str, dict] = {}
    if manifest.is_file():
        frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        file_col = _column(frame, ("file", "path"))
        if file_col is None:
            raise SourceError(f"{manifest}: needs a file column")
        for row in frame.to_dict("records"):
            listed[str((root / row[file_col]).resolve())] = row
    listing = SourceListing(items=[], layout="one folder per class" + (" + manifest.csv" if listed else ""))
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in class_names:
            log.warning("ignoring folder %s: not one of the class names %s", folder, list(class_names))
            continue
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES and not _looks_like_dicom(path):
                listing.rejects.append(Reject(str(path), "not_an_image", "unrecognised file type"))
                continue
            row = listed.get(str(path.resolve()), {})
            label = folder.name
            if row.get("label") and _normalise_label(row["label"], class_names) not in (None, label):
                log.warning("%s: manifest label %r differs from its folder %r; using the folder",
                            path, row["label"], label)
            split = _normalise_split(row.get("split", ""))
            listing.items.append(SourceFile(str(path), label, str(row.get("group", "") or ""), split))
    return listing


def _list_vindr(root: Path, class_names: Sequence[str]) -> SourceListing:
    listing = SourceListing(items=[], layout="VinDr-BodyPartXR (train.csv/test.csv)")
    for split in ("train", "test"):
        csv_path = root / f"{split}.csv"
        if not csv_path.is_file():
            continue
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
        id_column, label_column = _column(frame, _ID_COLUMNS), _column(frame, _LABEL_COLUMNS_IN)
        if id_column is None or label_column is None:
            raise SourceError(f"{csv_path}: needs an image id column ({_ID_COLUMNS}) and a label "
                              f"column ({_LABEL_COLUMNS_IN}); found {list(frame.columns)}")
        multi = frame[label_column].str.strip().str.contains(r"\s")
        for value in frame.loc[multi, id_column]:
            listing.rejects.append(Reject(str(value), "multiple_labels", "more than one label for one image",
                                          "test" if split == "test" else ""))
        frame = frame.loc[~multi]
        folder = root / split

        def resolve(image_id: str, folder: Path = folder) -> Path | None:
            for candidate in (folder / image_id, folder / f"{image_id}.dicom", folder / f"{image_id}.dcm",
                              root / image_id):
                if candidate.is_file():
                    return candidate
            return None

        # The release's own split (train/test) is kept; val is carved from train later.
        part = _rows_to_items(frame, resolve, class_names, id_column=id_column, label_column=label_column,
                              default_split="test" if split == "test" else "")
        listing.items += part.items
        listing.rejects += part.rejects
    return listing


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


# --- Processing one file ----------------------------------------------------------------------

def cache_key(source: str, spec: PreprocessSpec) -> str:
    """What decides a cached image's pixels, hashed: the source's absolute path, size and
    modification time (ns), the spec's pixel fields and pixel_provenance(). Raises OSError when
    the source cannot be stat'ed."""
    stat = os.stat(source)
    parts = {"source": os.path.abspath(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "spec": spec.pixel_fields(), "provenance": pixel_provenance()}
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def output_name(source: str, label: str, key: str) -> str:
    """images/<label>/<stem>_<key>.png: readable, and a new name whenever the key changes."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).stem)[:80]
    return f"{files.IMAGES}/{label}/{stem}_{key}.png"


def process_item(item: SourceFile, output_dir: str, spec: PreprocessSpec) -> dict:
    """Decode, preprocess and write one image; returns a labels.csv row or a reject."""
    relative = item.target or output_name(item.source, item.label, cache_key(item.source, spec))
    target = Path(output_dir) / relative
    row = {"path": relative, "label": item.label, "source_file": item.source,
           "_group": item.group, "_split": item.split, "_study": ""}
    try:
        if target.is_file() and target.stat().st_size > 0:
            metadata, shape = _describe_existing(item.source)
            row["_skipped"] = True
        else:
            image, metadata = preprocess_file(item.source, spec)
            shape = (int(metadata.get("Rows") or 0), int(metadata.get("Columns") or 0)) if metadata else None
            if not shape or not all(shape):
                shape = _raster_shape(item.source)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_suffix(".tmp.png")
            if not cv2.imwrite(str(temporary), image):
                raise OSError(f"could not write {temporary}")
            os.replace(temporary, target)  # a killed run never leaves a half-written PNG behind
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: BLE001 - one strange file must not stop the batch
        from utils.infer.engine import error_reason  # the reason codes predict.py, test.py and the router give

        reason, message = error_reason(item.source, error)
        if reason == "unexpected_error":
            log.debug("unexpected error on %s", item.source, exc_info=True)
        return {"_reject": True, "source_file": item.source, "reason": reason, "message": message}
    for key in ("SOPInstanceUID", "PatientID", "Modality", "BodyPartExamined", "PatientAge",
                "PhotometricInterpretation"):
        row[key] = metadata.get(key, "")
    row["_study"] = metadata.get("StudyInstanceUID", "")
    row["original_rows"], row["original_columns"] = shape
    return row


def _describe_existing(source: str) -> tuple[dict, tuple[int, int]]:
    """Header fields and original shape of an already prepared source, without decoding pixels."""
    from utils.io import dicom

    if is_raster(source):
        return {}, _raster_shape(source)
    metadata = dicom.read_dicom_header(source)
    return metadata, (int(metadata.get("Rows") or 0), int(metadata.get("Columns") or 0))


def _raster_shape(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


# --- The whole run ----------------------------------------------------------------------------

@dataclass
class PrepareResult:
    labels: pd.DataFrame
    rejects: pd.DataFrame
    layout: str
    skipped: int  # images whose cached PNG was reused
    spec: PreprocessSpec | None = None  # the spec the images were made with
    removed: int = 0  # stale PNGs removed (their source, spec or decoders changed)

    def summary(self, output: str | os.PathLike | None = None) -> str:
        """The printed summary; ``output``: the dataset's folder, named in the advice when it has no val split."""
        lines = [f"source layout: {self.layout}",
                 f"images: {len(self.labels)} ({self.skipped} already prepared, reused; "
                 f"{self.removed} stale removed); rejected: {len(self.rejects)}"]
        if len(self.labels):
            table = pd.crosstab(self.labels["label"], self.labels["split"], margins=True, margins_name="total")
            table = table.reindex(columns=[c for c in (*SPLITS, "total") if c in table.columns])
            lines += ["", "images per class and split:", table.to_string()]
            groups = self.labels.groupby("split")["group"].nunique()
            lines += ["", "groups (patients) per split: " + ", ".join(f"{k} {v}" for k, v in groups.items())]
        if len(self.rejects):
            lines += ["", "rejects by reason:", self.rejects["reason"].value_counts().to_string()]
        advice = split_advice(self.labels, output)
        if advice:
            lines += ["", advice]
        return "\n".join(lines)


def split_advice(labels: pd.DataFrame, folder: str | os.PathLike | None = None) -> str:
    """What to do with a dataset whose validation split is empty (a few patient groups, e.g. the router's
    corrections, all go to train): "" when it has one."""
    if not len(labels) or (labels["split"] == "val").any():
        return ""
    groups = labels["group"].nunique()
    where = ", ".join(f"{count} in {split}" for split, count in labels["split"].value_counts().items())
    return (f"note: no validation images ({len(labels)} image(s), {where}; {groups} patient group(s) are too few "
            "to split). Training from scratch needs a validation split; to fine-tune a trained model on them "
            f"use: python training.py --finetune RUN_DIR --data {folder or 'THIS_FOLDER'}, which keeps RUN_DIR's validation "
            "set (and mixes some of its training images back in).")


def spec_of_model(model: str | os.PathLike, settings: dict, given: set[str]) -> PreprocessSpec:
    """The spec to prepare images for an existing model (prepare.py --model): the model's own (class names,
    size, channels, aspect, windowing). A flag written on the command line with another value is refused."""
    from utils.artifacts.model_file import read_metadata

    try:
        spec = read_metadata(model).spec
    except (OSError, ValueError) as error:
        raise SourceError(f"--model {model}: cannot read its preprocessing spec ({error})") from error
    conflicts = []
    for key in ("class_names", "image_size", "channels", "aspect", "window_percentiles"):
        flag = "--" + key.replace("_", "-")
        ours, asked = getattr(spec, key), settings.get(key)
        if flag in given and (tuple(ours) if isinstance(ours, (list, tuple)) else ours) != (
                tuple(asked) if isinstance(asked, (list, tuple)) else asked):
            conflicts.append(f"{flag} {asked} (the model has {ours})")
    if conflicts:
        raise SourceError(f"--model {model} prepares images as that model reads them; these flags ask for "
                          f"others: {'; '.join(conflicts)}. Leave them out.")
    return spec


def prepare_dataset(source: str | os.PathLike, output_dir: str | os.PathLike, spec: PreprocessSpec, *,
                    ratios: Sequence[float], seed: int, workers: int = 0, progress: bool = True,
                    overwrite: bool = False, pool: PoolSettings | None = None) -> PrepareResult:
    """Prepare ``source`` into ``output_dir``; see the module docstring. Files are read as
    ``pool`` says (default: isolated worker processes), with ``workers`` of them unless 0.
    ``overwrite`` redoes every image; without it, a folder prepared with other pixel settings
    is refused."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _check_existing_spec(output_dir, spec, overwrite)
    removed = _remove_pngs(output_dir, keep=set()) if overwrite else 0
    listing = list_source(source, spec.class_names)
    if not listing.items and not listing.rejects:
        raise SourceError(f"{source}: no image files found")
    log.info("%s: %d files (%s)", source, len(listing.items), listing.layout)

    rows, rejects = [], [dict(zip(REJECT_COLUMNS, r[:len(REJECT_COLUMNS)])) for r in listing.rejects]
    items = []
    for item in listing.items:
        try:
            key = cache_key(item.source, spec)
        except OSError as error:
            rejects.append({"source_file": item.source, "reason": "file_not_found" if isinstance(
                error, FileNotFoundError) else "os_error", "message": f"cannot stat the file ({error})"})
            continue
        items.append(dataclasses.replace(item, target=output_name(item.source, item.label, key)))
    pool = pool or PoolSettings()
    if workers:
        pool = dataclasses.replace(pool, workers=workers)
    for result in _map(items, str(output_dir), spec, pool, progress):
        if result.pop("_reject", False):
            rejects.append(result)
        else:
            rows.append(result)

    labels = _finish_labels(rows, ratios, seed)
    rejects_frame = pd.DataFrame(rejects, columns=list(REJECT_COLUMNS))
    spec.save(output_dir / files.SPEC)
    files.write_csv(labels, output_dir / files.LABELS)
    files.write_csv(rejects_frame, output_dir / files.REJECTS)
    files.write_json(pixel_provenance(), output_dir / files.PROVENANCE)
    removed += _remove_pngs(output_dir, keep=set(labels["path"]))
    skipped = int(sum(1 for r in rows if r.get("_skipped")))
    return PrepareResult(labels, rejects_frame, listing.layout, skipped, spec, removed)


def _remove_pngs(output_dir: Path, keep: set[str]) -> int:
    """Delete the cache PNGs (and leftover temporary files) whose relative path is not in ``keep``."""
    removed = 0
    for png in (output_dir / files.IMAGES).rglob("*.png"):
        if png.relative_to(output_dir).as_posix() not in keep:
            png.unlink(missing_ok=True)
            removed += not png.name.endswith(".tmp.png")
    return removed


def _check_existing_spec(output_dir: Path, spec: PreprocessSpec, overwrite: bool) -> None:
    """Refuse to turn a dataset prepared with other pixel settings into another one by accident."""
    existing = output_dir / files.SPEC
    if overwrite or not existing.is_file():
        return
    previous = PreprocessSpec.load(existing)
    if not previous.same_pixels(spec):
        raise SourceError(
            f"{output_dir} was prepared with image_size={previous.image_size}, aspect={previous.aspect}, "
            f"window_percentiles={previous.window_percentiles}; this run asks for image_size="
            f"{spec.image_size}, aspect={spec.aspect}, window_percentiles={spec.window_percentiles}. "
            "Use another --output, or --overwrite to redo every image.")


def _map(items: list[SourceFile], output_dir: str, spec: PreprocessSpec, pool: PoolSettings,
         progress: bool) -> Iterator[dict]:
    """process_item over ``items`` in the isolated pool (utils.io.isolation), in order: a source
    file that hangs or crashes its decoder, or needs more memory than the cap, becomes a reject
    with its reason (decode_timeout, decoder_crashed...) instead of stopping or stalling the run."""
    from tqdm import tqdm

    from utils.infer.engine import failure_reason

    work = functools.partial(process_item, output_dir=output_dir, spec=spec)
    batch = pool.worker_count * 16  # results and the bar arrive batch by batch
    bar = tqdm(total=len(items), desc="preparing", unit="img", disable=not progress)
    try:
        with IsolatedPool(pool, initializer="utils.infer.engine:init_decoder_process") as workers:
            for start, results in zip(range(0, len(items), batch), workers.map_batches(work, items, batch)):
                for item, result in zip(items[start : start + batch], results):
                    if isinstance(result, Failure):
                        reason, message = failure_reason(result, pool.timeout_s)
                        log.warning("%s: %s", item.source, message)
                        result = {"_reject": True, "source_file": item.source, "reason": reason, "message": message}
                    yield result
                bar.update(len(results))
    finally:
        bar.close()


def _finish_labels(rows: list[dict], ratios: Sequence[float], seed: int) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=list(LABEL_COLUMNS))
    frame = pd.DataFrame(rows)
    frame["group"] = [group_key(p, s, g, src) for p, s, g, src in
                      zip(frame["PatientID"], frame["_study"], frame["_group"], frame["source_file"])]
    _warn_dominant_groups(frame)
    frame["split"] = assign_splits(frame["label"].tolist(), frame["group"].tolist(), frame["_split"].tolist(),
                                   ratios, seed)
    frame = frame.sort_values(["split", "label", "path"], key=lambda s: s.map(
        {k: i for i, k in enumerate(SPLITS)}) if s.name == "split" else s).reset_index(drop=True)
    return frame[list(LABEL_COLUMNS)]


def _warn_dominant_groups(frame: pd.DataFrame) -> None:
    counts = frame["group"].value_counts()
    if len(frame) >= 20 and counts.iloc[0] > 0.2 * len(frame):
        log.warning("group %s holds %d of %d images: if that PatientID is a placeholder, the split will be "
                    "lopsided (placeholders ignored: %s)", counts.index[0], counts.iloc[0], len(frame),
                    sorted(PLACEHOLDER_IDS - {""}))
