"""Evaluation inputs and inference: which images, with which labels, through which path.

Images come from (a) a split of a prepared dataset whose preprocessing matches the model's spec
(the PNG cache, as in training), or else (b) source files preprocessed on the fly with the model's
spec: a prepared dataset prepared differently (its ``source_file`` column), any CSV of
path,label[,group], or a folder per class. Inference goes through utils.infer.engine, as in predict.py
and the router. A file that cannot be read (or hangs or crashes its decoder) is reported and
left out, never a crash; :class:`Coverage` counts what was listed, evaluated and skipped (by
reason), so that a report never quietly covers only part of the data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from utils.infer.engine import Decoded, Engine
from utils.io.isolation import PoolSettings
from utils.preprocessing import PreprocessSpec, to_model_input

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """Files to evaluate, their integer labels, patient groups (or None), and how to read them."""

    files: list[str]
    labels: np.ndarray
    groups: list[str] | None
    cached: bool  # True: files are prepared PNGs already at the spec; False: raw sources
    description: str
    split: str  # the split evaluated, or "all" for sources without one
    # listed but left out before decoding (not found, unknown label...): (file, "reason: message")
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _label_ids(labels: Sequence[str], class_names: Sequence[str], where: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} are not among the model's classes {list(class_names)}")
    return np.array([index[x] for x in labels], dtype=np.int64)


def eval_set(data: str | os.PathLike, split: str, spec: PreprocessSpec) -> EvalSet:
    """Resolve ``--data`` (prepared dir, CSV, or folder per class) into an :class:`EvalSet`."""
    from utils.data import files
    from utils.data.prepare import list_source
    from utils.preprocessing import pixel_provenance

    data = Path(data)
    if data.is_dir() and (data / files.LABELS).is_file():
        files.require_prepared(data)
        frame = files.read_labels(data)
        frame = frame[frame["split"] == split]
        if frame.empty:
            raise ValueError(f"{data}: split {split!r} is empty")
        labels = _label_ids(frame["label"].tolist(), spec.class_names, str(data))
        groups = frame["group"].tolist() if "group" in frame else None
        if files.read_spec(data).same_pixels(spec):
            made_with = files.read_provenance(data)
            note = ""
            if made_with != pixel_provenance():
                changed = "unknown (no pixels.json)" if made_with is None else ", ".join(
                    f"{k} {made_with.get(k, '?')} -> {v}" for k, v in pixel_provenance().items()
                    if made_with.get(k) != v)
                log.warning("%s was prepared with another reader or decoders than this machine serves with "
                            "(%s): its cached images may differ slightly from what predict.py and the router "
                            "feed the model. Re-run prepare.py on it to bring the cache up to date.", data, changed)
                note = "; cache made with other decoders: " + changed
            return EvalSet([str(data / p) for p in frame["path"]], labels, groups, True,
                           f"{data} split={split} (prepared cache{note})", split)
        log.warning("%s was prepared with other settings than the model's spec: reading its source files "
                    "with the model's preprocessing instead", data)
        return EvalSet(frame["source_file"].tolist(), labels, groups, False,
                       f"{data} split={split} (source files, model's preprocessing)", split)
    listing = list_source(data, spec.class_names)
    has_splits = any(it.split for it in listing.items)
    items = [it for it in listing.items if it.split == split] if has_splits else listing.items
    if not items:
        raise ValueError(f"{data}: no image in split {split!r}")
    labels = _label_ids([it.label for it in items], spec.class_names, str(data))
    groups = [it.group or it.source for it in items]
    # A reject the source placed in another split is not this evaluation's; one of no known split counts.
    rejects = [r for r in listing.rejects if not has_splits or r.split in (split, "")]
    return EvalSet([it.source for it in items], labels, groups, False, f"{data} ({listing.layout})",
                   split if has_splits else "all", skipped=[(r.source, f"{r.reason}: {r.message}") for r in rejects])


def split_reason(reason: str) -> tuple[str, str]:
    """``"reason_code: message"`` (or a bare code) -> (reason code, message)."""
    code, _, message = str(reason).partition(":")
    return code.strip(), message.strip()


@dataclass
class Coverage:
    """What an evaluation covered: each listed file is either evaluated or skipped with its reason."""

    listed: int
    evaluated: int
    skipped: list[tuple[str, str, str]]  # (file, reason code, message), listing rejects first
    max_skipped_share: float

    @classmethod
    def of(cls, subset: EvalSet, evaluated: int, errors: Sequence[tuple[str, str]],
           max_skipped_share: float) -> Coverage:
        """From the eval set (its files and listing rejects) and predict()'s decode errors."""
        skipped = [(str(path), *split_reason(reason)) for path, reason in list(subset.skipped) + list(errors)]
        listed = len(subset.files) + len(subset.skipped)
        if evaluated + len(skipped) != listed:  # every file is accounted for exactly once
            raise RuntimeError(f"coverage does not add up: {evaluated} evaluated + {len(skipped)} skipped "
                               f"!= {listed} listed")
        return cls(listed, evaluated, skipped, float(max_skipped_share))

    @property
    def skipped_share(self) -> float:
        return len(self.skipped) / self.listed if self.listed else 0.0

    @property
    def by_reason(self) -> dict[str, int]:
        """Skipped files per reason code, most frequent first (then by name)."""
        counts = Counter(reason for _, reason, _ in self.skipped)
        return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))

    @property
    def too_many_skipped(self) -> bool:
        """More than ``max_skipped_share`` of the listed files could not be read, or none could."""
        return self.evaluated == 0 or self.skipped_share > self.max_skipped_share

    def to_dict(self) -> dict:
        """results.json's ``coverage``."""
        return {"listed": self.listed, "evaluated": self.evaluated, "skipped": len(self.skipped),
                "skipped_share": self.skipped_share, "skipped_by_reason": self.by_reason,
                "max_skipped_share": self.max_skipped_share}


def decode_cached(path: str, spec: PreprocessSpec) -> Decoded:
    """A PNG of a prepared cache (already at the spec) as a Decoded; never raises for a bad file."""
    import cv2

    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if image is None:
        reason = "unreadable_image" if os.path.lexists(path) else "file_not_found"
        return Decoded(path, None, {}, reason, f"{path}: unreadable PNG")
    if image.shape != (spec.image_size, spec.image_size):
        return Decoded(path, None, {}, "wrong_image_size",
                       f"{path}: {image.shape} is not the spec's {spec.image_size}px")
    return Decoded(path, image)


def _engine(spec: PreprocessSpec, predict, cached: bool, pool: PoolSettings | None,
            projection_only: bool = False) -> Engine:
    """Raw files: the isolated pool as set, the header guard if asked; the prepared cache (our own PNGs,
    whose sources prepare.py already judged): threads."""
    pool = pool or PoolSettings()
    if cached:
        return Engine(spec, predict, pool=dataclasses.replace(pool, mode="threads"), decode=decode_cached)
    return Engine(spec, predict, pool=pool, projection_only=projection_only)


def iter_batches(files: Sequence[str], spec: PreprocessSpec, *, cached: bool, batch_size: int,
                 pool: PoolSettings | None = None) -> Iterator[tuple[np.ndarray | None, list[int], list]]:
    """Decode ahead in the background while the caller runs the model; yields
    (batch float32 (B, S, S, C) or None, indices kept, [(index, "reason: message")])."""
    with _engine(spec, None, cached, pool) as engine:
        start = 0
        for decoded in engine.decode_batches(files, batch_size):
            indices = range(start, start + len(decoded))
            start += len(decoded)
            kept = [i for i, d in zip(indices, decoded) if d.image is not None]
            errors = [(i, f"{d.reason}: {d.message}") for i, d in zip(indices, decoded) if d.image is None]
            images = [d.image for d in decoded if d.image is not None]
            yield (to_model_input(np.stack(images), spec.channels) if images else None), kept, errors


def predict(predictor, files: Sequence[str], *, cached: bool, batch_size: int = 32, progress: bool = True,
            pool: PoolSettings | None = None,
            projection_only: bool = True) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Softmax probabilities for the readable files: (probs (M, K), kept indices (M,), errors).

    ``predictor`` is a utils.infer.predictor.Predictor; its spec decides the preprocessing. Raw files
    are decoded as ``pool`` says (default: isolated worker processes); decoding of batch n+1
    overlaps inference of batch n. ``projection_only``: a raw DICOM that is not projection radiography
    is left out with reason ``not_projection_radiography`` (counted in the coverage like any skip).
    """
    probs, _, _, kept, errors = predict_with_ood(predictor, files, cached=cached, batch_size=batch_size,
                                              progress=progress, pool=pool, projection_only=projection_only)
    return probs, kept, errors


def predict_with_ood(predictor, files: Sequence[str], *, cached: bool, batch_size: int = 32, progress: bool = True,
                     pool: PoolSettings | None = None, projection_only: bool = True
                     ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """:func:`predict`, plus the out-of-distribution score of each kept image (M,), or None when the
    model has no OOD score, and whether the engine made it ``out_of_distribution`` (M,) bool (its
    score, or a colour image): (probs, ood, flagged, kept, errors)."""
    from tqdm import tqdm

    from utils.infer.ood import OUT_OF_DISTRIBUTION
    from utils.infer.predictor import scorer

    spec = predictor.spec
    probs, ood, flagged, kept, errors = [], [], [], [], []
    bar = tqdm(total=len(files), desc="predicting", unit="img", disable=not progress)
    with _engine(spec, scorer(predictor), cached, pool, projection_only) as engine:
        start = 0
        for predictions in engine.classify_batches(files, batch_size):
            for index, p in enumerate(predictions, start):
                if p.readable:
                    probs.append(p.probs)
                    ood.append(p.ood_score)
                    flagged.append(p.reason == OUT_OF_DISTRIBUTION)
                    kept.append(index)
                else:
                    errors.append((p.path, p.error))
            start += len(predictions)
            bar.update(len(predictions))
    bar.close()
    num_classes = len(spec.class_names)
    scores = None if any(o is None for o in ood) else np.asarray(ood, dtype=np.float64)
    return (np.stack(probs) if probs else np.zeros((0, num_classes), np.float32), scores,
            np.asarray(flagged, dtype=bool), np.asarray(kept, dtype=np.int64), errors)


def time_inference(predictor, *, runs: int = 50, warmup: int = 5, throughput_batch: int = 32) -> dict:
    """Model-only latency at batch 1 (median and p95 over ``runs``, after warm-up) and throughput."""
    from utils.config import device_name

    rng = np.random.default_rng(0)
    one = rng.uniform(0, 255, (1, *predictor.spec.input_shape)).astype(np.float32)
    for _ in range(warmup):
        predictor.predict(one)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predictor.predict(one)
        times.append(time.perf_counter() - start)
    many = rng.uniform(0, 255, (throughput_batch, *predictor.spec.input_shape)).astype(np.float32)
    predictor.predict(many)
    batch_times = []
    for _ in range(max(3, runs // 10)):
        start = time.perf_counter()
        predictor.predict(many)
        batch_times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1000
    return {"device": device_name(), "batch1_ms_median": float(np.median(ms)),
            "batch1_ms_p95": float(np.percentile(ms, 95)), "batch1_runs": runs,
            "batch_size": throughput_batch,
            "throughput_images_per_s": float(throughput_batch / np.median(batch_times)),
            "note": "model only (no decoding), input already in memory, softmax included"}
