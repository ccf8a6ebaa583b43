"""Evaluation inputs and inference: which images, with which labels, through which path.

Images come from (a) a split of a prepared dataset whose preprocessing matches the model's spec
(the PNG cache, as in training), or else (b) source files preprocessed on the fly with the model's
spec: a prepared dataset prepared differently (its ``source_file`` column), any CSV of
path,label[,group], or a folder per class. A file that cannot be read is reported and left out,
never a crash.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from utils.preprocessing import SPEC_FILENAME, PreprocessSpec, preprocess_file, to_model_input

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class EvalSet:
    """Files to evaluate, their integer labels, patient groups (or None), and how to read them."""

    files: list[str]
    labels: np.ndarray
    groups: list[str] | None
    cached: bool  # True: files are prepared PNGs already at the spec; False: raw sources
    description: str
    split: str  # the split evaluated, or "all" for sources without one
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _label_ids(labels: Sequence[str], class_names: Sequence[str], where: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(class_names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} are not among the model's classes {list(class_names)}")
    return np.array([index[x] for x in labels], dtype=np.int64)


def eval_set(data: str | os.PathLike, split: str, spec: PreprocessSpec) -> EvalSet:
    """Resolve ``--data`` (prepared dir, CSV, or folder per class) into an :class:`EvalSet`."""
    from utils.prepare import list_source, read_labels

    data = Path(data)
    if data.is_dir() and (data / "labels.csv").is_file():
        frame = read_labels(data)
        frame = frame[frame["split"] == split]
        if frame.empty:
            raise ValueError(f"{data}: split {split!r} is empty")
        labels = _label_ids(frame["label"].tolist(), spec.class_names, str(data))
        groups = frame["group"].tolist() if "group" in frame else None
        dataset_spec = PreprocessSpec.load(data / SPEC_FILENAME) if (data / SPEC_FILENAME).is_file() else None
        if dataset_spec is not None and dataset_spec.same_pixels(spec):
            return EvalSet([str(data / p) for p in frame["path"]], labels, groups, True,
                           f"{data} split={split} (prepared cache)", split)
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
    return EvalSet([it.source for it in items], labels, groups, False, f"{data} ({listing.layout})",
                   split if has_splits else "all", skipped=[(r[0], r[1]) for r in listing.rejects])


def _read_cached(path: str, spec: PreprocessSpec) -> np.ndarray:
    import cv2

    image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"{path}: unreadable PNG")
    if image.shape != (spec.image_size, spec.image_size):
        raise ValueError(f"{path}: {image.shape} is not the spec's {spec.image_size}px")
    return image


def _load(path: str, spec: PreprocessSpec, cached: bool) -> tuple[np.ndarray | None, str]:
    try:
        if cached:
            return _read_cached(path, spec), ""
        return preprocess_file(path, spec)[0], ""
    except Exception as error:  # noqa: BLE001 - reported per file, never stops the batch
        return None, f"{getattr(error, 'reason', type(error).__name__)}: {error}"


def default_workers() -> int:
    """Decode threads: OpenCV and the DICOM codecs release the GIL, so a few per core pay off."""
    return min(8, (os.cpu_count() or 1) * 2)


def map_in_batches(items: Sequence[T], load: Callable[[T], R], *, batch_size: int,
                   workers: int = 0) -> Iterator[list[R]]:
    """``load`` every item in a thread pool, ``batch_size`` at a time, results in input order."""
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        for start in range(0, len(items), batch_size):
            yield list(pool.map(load, items[start : start + batch_size]))


def iter_batches(files: Sequence[str], spec: PreprocessSpec, *, cached: bool, batch_size: int,
                 workers: int = 0) -> Iterator[tuple[np.ndarray, list[int], list[tuple[int, str]]]]:
    """Decode in a background thread pool while the caller runs the model; yields
    (batch float32 (B, S, S, C), indices kept, [(index, error)])."""
    batches = map_in_batches(range(len(files)), lambda i: (i, *_load(files[i], spec, cached)),
                             batch_size=batch_size, workers=workers)
    for results in batches:
        kept = [i for i, img, _ in results if img is not None]
        errors = [(i, err) for i, img, err in results if img is None]
        images = [img for _, img, _ in results if img is not None]
        batch = to_model_input(np.stack(images), spec.channels) if images else None
        yield batch, kept, errors


def predict(predictor, files: Sequence[str], *, cached: bool, batch_size: int = 32,
            progress: bool = True) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Softmax probabilities for the readable files: (probs (M, K), kept indices (M,), errors).

    ``predictor`` is a utils.predictor.Predictor; its spec decides the preprocessing.
    """
    from tqdm import tqdm

    spec = predictor.spec
    probs, kept, errors = [], [], []
    bar = tqdm(total=len(files), desc="predicting", unit="img", disable=not progress)
    # Prefetch: decoding of batch n+1 overlaps inference of batch n.
    batches = iter_batches(files, spec, cached=cached, batch_size=batch_size)
    for batch, idx, errs in prefetch(batches):
        if batch is not None:
            probs.append(predictor.predict(batch))
            kept += idx
        errors += [(files[i], e) for i, e in errs]
        bar.update(len(idx) + len(errs))
    bar.close()
    num_classes = len(spec.class_names)
    return (np.concatenate(probs) if probs else np.zeros((0, num_classes), np.float32),
            np.asarray(kept, dtype=np.int64), errors)


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead of the consumer."""
    import queue
    import threading

    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def fill() -> None:
        try:
            for item in iterator:
                buffer.put(item)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            buffer.put(error)
        buffer.put(done)

    threading.Thread(target=fill, daemon=True).start()
    while (item := buffer.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def time_inference(predictor, *, runs: int = 50, warmup: int = 5, throughput_batch: int = 32) -> dict:
    """Model-only latency at batch 1 (median and p95 over ``runs``, after warm-up) and throughput."""
    from utils.training import device_name

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
