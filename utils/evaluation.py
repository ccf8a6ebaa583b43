"""Evaluation inputs and inference: which images, with which labels, through which path.

Images come from (a) a split of a prepared dataset whose preprocessing matches the model's spec
(the PNG cache, as in training), or else (b) source files preprocessed on the fly with the model's
spec: a prepared dataset prepared differently (its ``source_file`` column), any CSV of
path,label[,group], or a folder per class. A file that cannot be read is reported and left out,
never a crash.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

from utils.constants import DECODE_POOL_CHOICES
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


def default_workers(processes: bool = False) -> int:
    """Decoders: OpenCV and most DICOM codecs release the GIL, so a few threads per core pay off;
    processes (for codecs that hold it, such as JPEG 2000) one per core."""
    cores = os.cpu_count() or 1
    return cores if processes else min(8, cores * 2)


PROCESS_POOL_MIN_ITEMS = 16  # "auto" never starts processes (about 1 s) for fewer files
# Measured on 2 cores, 2000x2500 files to 512 px: JPEG 2000 (its decoder holds the GIL) 9.6
# files/s in 2 processes against 5.7 in threads; uncompressed 41 in processes against 66 in threads.


def use_processes(pool: str, files: Sequence[str]) -> bool:
    """Whether a decoding ``pool`` setting (constants.DECODE_POOL_CHOICES) means processes.

    "auto": processes when there are at least PROCESS_POOL_MIN_ITEMS files, more than one core,
    and most of the first 8 files have a GIL-bound transfer syntax (read from their file meta).
    """
    if pool not in DECODE_POOL_CHOICES:
        raise ValueError(f"unknown decode pool {pool!r}")
    if pool != "auto":
        return pool == "processes"
    if len(files) < PROCESS_POOL_MIN_ITEMS or (os.cpu_count() or 1) < 2:
        return False
    from utils.dicom import GIL_BOUND_SYNTAXES, file_transfer_syntax

    sample = files[:8]
    return sum(file_transfer_syntax(path) in GIL_BOUND_SYNTAXES for path in sample) * 2 > len(sample)


def _process_pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: children never inherit the parent's TensorFlow threads and locks (fork would).
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=_single_threaded_worker)


def _single_threaded_worker() -> None:
    """One OpenCV thread per decoding process: the processes already fill the cores."""
    import cv2

    cv2.setNumThreads(1)


def map_in_batches(items: Sequence[T], load: Callable[[T], R], *, batch_size: int, workers: int = 0,
                   processes: bool = False, on_crash: Callable[[T], R] | None = None) -> Iterator[list[R]]:
    """``load`` every item in a thread or process pool, ``batch_size`` at a time, results in
    input order.

    With ``processes`` (``load`` must then be picklable: a module-level function or a
    functools.partial of one), a worker that dies (a codec crashing on a hostile file) breaks
    only its batch: the pool is rebuilt, that batch's items are loaded one at a time, and each
    item whose process died again becomes ``on_crash(item)`` (re-raised when on_crash is None).
    """
    workers = workers or default_workers(processes)
    if not processes:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start in range(0, len(items), batch_size):
                yield list(pool.map(load, items[start : start + batch_size]))
        return
    pool = _process_pool(workers)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            try:
                yield list(pool.map(load, chunk))
            except BrokenProcessPool:
                pool.shutdown(cancel_futures=True)
                pool, results = _load_one_by_one(chunk, load, workers, on_crash)
                yield results
    finally:
        pool.shutdown(cancel_futures=True)


class DecodingProcessesDied(RuntimeError):
    """Every item of a batch killed its decoding process: the cause is not a file."""


def _load_one_by_one(chunk: Sequence[T], load: Callable[[T], R], workers: int,
                     on_crash: Callable[[T], R] | None) -> tuple[Executor, list[R]]:
    """After a worker died: each item in a fresh pool of its own; (the pool to go on with, results).

    If the processes die on every item, the cause is not a file (a broken install, no memory,
    or a script that starts this work without an ``if __name__ == "__main__":`` guard, which
    the forkserver's children re-run): stop with an error instead of retrying file after file.
    """
    results, crashed = [], 0
    for item in chunk:
        pool = _process_pool(1)
        try:
            results.append(pool.submit(load, item).result())
        except BrokenProcessPool:
            crashed += 1
            if on_crash is None:
                raise
            if crashed == len(results) + 1 and crashed >= min(3, len(chunk)):  # every one so far
                raise DecodingProcessesDied(
                    f"decoding processes died on the first {crashed} files of a batch; run with threads instead "
                    "(predict.py --decode-pool threads) and check the script has a __main__ guard") from None
            log.warning("a decoding process died on %s", item)
            results.append(on_crash(item))
        finally:
            pool.shutdown(cancel_futures=True)
    return _process_pool(workers), results


def iter_batches(files: Sequence[str], spec: PreprocessSpec, *, cached: bool, batch_size: int,
                 workers: int = 0, processes: bool = False) -> Iterator[tuple[np.ndarray, list[int], list[tuple[int, str]]]]:
    """Decode in a background pool while the caller runs the model; yields
    (batch float32 (B, S, S, C), indices kept, [(index, error)])."""
    batches = map_in_batches(files, functools.partial(_load, spec=spec, cached=cached), batch_size=batch_size,
                             workers=workers, processes=processes, on_crash=_crashed)
    start = 0
    for results in batches:
        indices = range(start, start + len(results))
        start += len(results)
        kept = [i for i, (img, _) in zip(indices, results) if img is not None]
        errors = [(i, err) for i, (img, err) in zip(indices, results) if img is None]
        images = [img for img, _ in results if img is not None]
        batch = to_model_input(np.stack(images), spec.channels) if images else None
        yield batch, kept, errors


def _crashed(path: str) -> tuple[None, str]:
    return None, "decoder_crashed: the process decoding this file died"


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
    # Raw files use processes for large sets (JPEG 2000 decoders hold the GIL); the 8-bit cache
    # decodes fine in threads.
    batches = iter_batches(files, spec, cached=cached, batch_size=batch_size,
                           processes=not cached and use_processes("auto", files))
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
