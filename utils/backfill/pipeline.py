"""The Ray Data pipeline of backfill.py: paths -> decoding actors -> inference actors -> Parquet parts.

    result = run(files, model="model.onnx", output="out/", threshold=0.5, settings=Settings(workers=2))

Stages (one streaming Ray Data plan, so decoding, inference and writing overlap and memory stays
bounded however large the archive):

1. The paths still to do (those not in the output already, :class:`utils.backfill.store.OutputStore`)
   become a dataset of blocks of paths.
2. ``Decoder`` actors (``settings.workers`` of them, 1 CPU each) decode a batch of files with the
   engine predict.py uses (:class:`utils.infer.engine.Engine`, the model's preprocessing spec):
   each actor keeps an isolated worker process (utils/io/isolation.py), so a file that hangs its
   decoder, crashes it or needs too much memory becomes its own error row (``decode_timeout``,
   ``decoder_crashed``, ``out_of_memory``) and never kills a Ray worker. Actors rather than plain
   tasks: the isolated process starts once per actor, not once per batch. Remote files (URLs) are
   copied to a temporary file first (utils.backfill.sources.fetched); DICOMweb instances are fetched
   by WADO-RS, each actor keeping one pooled session per archive (utils.backfill.dicomweb). A file or
   instance that cannot be fetched is an error row (``fetch_failed``, ``file_not_found``).
3. ``Classifier`` actors (``settings.inference_workers``, each with ``inference_cpus`` CPUs and
   ``inference_gpus`` GPUs) hold the model (``load_predictor``: .keras, TFLite, ONNX, SavedModel)
   and turn decoded batches into predict.py's rows (Engine.predict_decoded, batch_predict's row).
4. The driver writes the rows in parts of ``rows_per_file`` rows (or every ``FLUSH_S`` seconds),
   each atomically, and shows progress.

Ray retries what a dying worker was doing (actors are restarted, their tasks re-run); rows reach
the output only when their part is renamed into place, so a run killed at any point loses only
the rows not yet written, and the next run does exactly those.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from utils import constants
from utils.backfill.dicomweb import Access
from utils.infer.engine import Decoded, error_reason
from utils.io.isolation import PoolSettings
from utils.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

FLUSH_S = 30.0  # write a part at least this often while rows arrive, so a killed run loses little
MAX_INPUT_BLOCKS = 10_000  # input blocks of paths; more only cost the driver bookkeeping


@dataclass(frozen=True)
class Settings:
    """How the pipeline is laid out; backfill.py's flags."""

    workers: int = constants.BACKFILL_WORKERS  # decoding actors; 0: the cluster's CPUs less the inference actors'
    inference_workers: int = constants.BACKFILL_INFERENCE_WORKERS  # actors holding the model
    inference_cpus: float = constants.BACKFILL_INFERENCE_CPUS  # CPUs reserved per inference actor
    inference_gpus: float = constants.BACKFILL_INFERENCE_GPUS  # GPUs per inference actor (Keras on a GPU node)
    batch_size: int = constants.BATCH_SIZE  # files per decode call and per model call
    rows_per_file: int = constants.BACKFILL_ROWS_PER_FILE  # rows per Parquet part
    projection_only: bool = constants.PROJECTION_ONLY  # the header guard: not_projection_radiography rows
    # each decoding actor's: one process, one OpenJPEG thread (the actor holds 1 CPU)
    pool: PoolSettings = field(default_factory=lambda: PoolSettings(workers=1, threads=1))
    dicomweb: Access = field(default_factory=Access)  # how decoding actors reach DICOMweb archives (no secrets in it)

    def decode_workers(self, cluster_cpus: float) -> int:
        if self.workers:
            return self.workers
        return max(1, int(cluster_cpus - self.inference_workers * self.inference_cpus))


@dataclass
class Result:
    listed: int = 0  # files in the sources
    already_done: int = 0  # skipped: already in the output
    written: int = 0  # rows written by this run
    parts: int = 0  # parts written by this run
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        return [(f"{self.listed} files listed, {self.already_done} already in the output; {self.written} classified "
                 f"in {self.seconds:.1f} s ({rate:.1f} files/s), {self.parts} parts written")]


# --- Ray start -----------------------------------------------------------------------------------


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at ``address`` (or RAY_ADDRESS), else start Ray on this machine with
    ``num_cpus`` logical CPUs (default: all cores). Does nothing when Ray is already started."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


# --- Stage 2: decoding ---------------------------------------------------------------------------


class Decoder:
    """A Ray actor: paths -> decoded images (zeros where unreadable), headers, reasons."""

    def __init__(self, spec: PreprocessSpec, pool: PoolSettings, decode: Callable[..., Decoded] | None = None,
                 projection_only: bool = True, dicomweb: Access | None = None) -> None:
        from utils.backfill.dicomweb import ArchivePool
        from utils.infer.engine import Engine

        self.spec = spec
        self.engine = Engine(spec, pool=pool, decode=decode, projection_only=projection_only)
        self.archives = ArchivePool(dicomweb)  # sessions opened at the first DICOMweb instance, kept for the actor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from utils.backfill.dicomweb import fetch_error, header_of
        from utils.backfill.sources import fetched

        paths = [str(p) for p in batch["path"]]
        with fetched(paths, self.archives) as (local, errors):
            readable = [i for i, p in enumerate(local) if p is not None]
            decoded: dict[int, Decoded] = dict(zip(readable, self.engine.decode([local[i] for i in readable])))
        size = self.spec.image_size
        images = np.zeros((len(paths), size, size), np.uint8)
        headers, reasons, messages = [], [], []
        for i, path in enumerate(paths):
            if i in errors:
                reason, message = fetch_error(path, errors[i]) or error_reason(path, errors[i])
                header = header_of(path)  # a DICOMweb instance's UIDs, from its path; {} for a file
            else:
                d = decoded[i]
                reason, header = d.reason, d.header
                message = d.message.replace(local[i], path) if local[i] != path else d.message
                if d.image is not None:
                    images[i] = d.image
            headers.append(json.dumps(header))
            reasons.append(reason)
            messages.append(message)
        return {"path": np.array(paths, dtype=object), "image": images, "header": np.array(headers, dtype=object),
                "reason": np.array(reasons, dtype=object), "message": np.array(messages, dtype=object)}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        archives = getattr(self, "archives", None)
        if archives is not None:
            archives.close()


# --- Stage 3: inference --------------------------------------------------------------------------


class Classifier:
    """A Ray actor holding the model: decoded batches -> predict.py's rows, typed (store.output_schema)."""

    def __init__(self, model: str, threshold: float) -> None:
        from utils.infer.engine import Engine
        from utils.infer.predictor import load_predictor, scorer

        self.predictor = load_predictor(model)
        self.class_names = list(self.predictor.spec.class_names)
        # the engine's decisions only: its decoding pool is never used, so never started
        self.engine = Engine(self.predictor.spec, scorer(self.predictor), threshold=threshold)

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa

        from utils.backfill.store import output_schema, typed_record
        from utils.infer.batch_predict import Summary, row_of

        decoded = [Decoded(str(path), image if not reason else None, json.loads(header), str(reason), str(message))
                   for path, image, header, reason, message
                   in zip(batch["path"], batch["image"], batch["header"], batch["reason"], batch["message"])]
        summary = Summary()  # predict.py's row builder counts into one; the report counts here from the output
        records = [typed_record(row_of(p, self.class_names, summary), p.confidence, p.probs, self.class_names)
                   for p in self.engine.predict_decoded(decoded)]
        return pa.Table.from_pylist(records, schema=output_schema(self.class_names))


# --- The run -------------------------------------------------------------------------------------


def build_dataset(paths: Sequence[str], *, model: str, spec: PreprocessSpec, threshold: float, settings: Settings,
                  decode: Callable[..., Decoded] | None = None):
    """The lazy Ray dataset of output rows for ``paths`` (Ray must be started)."""
    import pyarrow as pa
    import ray

    workers = settings.decode_workers(cluster_cpus())
    # a batch per call as asked, smaller when there are too few files to keep every worker busy
    batch = max(1, min(settings.batch_size, math.ceil(len(paths) / workers)))
    rows = max(batch, math.ceil(len(paths) / MAX_INPUT_BLOCKS))
    table = pa.table({"path": pa.array(list(paths), pa.string())})
    ds = ray.data.from_arrow([table.slice(i, rows) for i in range(0, len(paths), rows)])
    ds = ds.map_batches(Decoder, fn_constructor_kwargs={"spec": spec, "pool": settings.pool, "decode": decode,
                                                        "projection_only": settings.projection_only,
                                                        "dicomweb": settings.dicomweb},
                        batch_size=batch, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    return ds.map_batches(Classifier, fn_constructor_kwargs={"model": str(model), "threshold": threshold},
                          batch_size=batch, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=settings.inference_workers),
                          num_cpus=settings.inference_cpus, num_gpus=settings.inference_gpus)


def run(files: Sequence[str], *, model: str | os.PathLike, output: str | os.PathLike, threshold: float,
        settings: Settings | None = None, identity: dict | None = None, progress: bool = True,
        decode: Callable[..., Decoded] | None = None,
        on_part: Callable[[int], None] | None = None) -> Result:
    """Classify the ``files`` not yet in ``output``; parts written as rows arrive; a Result.

    Ray must be started (:func:`start_ray`). ``decode`` replaces the engine's decode function in
    the decoding actors (as Engine's ``decode``). ``on_part(n)`` is called after the n-th part of
    this run is in place (progress hooks, tests)."""
    import pyarrow as pa
    from tqdm import tqdm

    from utils.artifacts.model_file import read_metadata
    from utils.backfill.store import OutputStore

    settings = settings or Settings()
    metadata = read_metadata(model)  # spec and class names without loading the model here
    spec = metadata.spec
    store = OutputStore(output, spec.class_names,
                        identity={"model_id": metadata.model_id, "threshold": float(threshold),
                                  "projection_only": bool(settings.projection_only), **(identity or {})})
    done = store.done_paths()
    todo = [f for f in files if f not in done]
    result = Result(listed=len(files), already_done=len(files) - len(todo))
    if not todo:
        return result
    start = time.perf_counter()
    ds = build_dataset(todo, model=str(model), spec=spec, threshold=threshold, settings=settings, decode=decode)
    pending: list = []
    pending_rows, last_flush = 0, time.monotonic()
    bar = tqdm(total=len(todo), desc="backfill", unit="file", disable=not progress)

    def flush() -> None:
        nonlocal pending, pending_rows, last_flush
        table = pa.concat_tables(pending)
        paths = table.column("path").to_pylist()
        keep = [i for i, p in enumerate(paths) if p not in done]  # a row Ray produced twice is written once
        done.update(paths)
        if keep:
            store.write(table.take(keep))
            result.parts += 1
            result.written += len(keep)
            if on_part is not None:
                on_part(result.parts)
        pending, pending_rows, last_flush = [], 0, time.monotonic()

    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        pending.append(table)
        pending_rows += table.num_rows
        bar.update(table.num_rows)
        while pending_rows >= settings.rows_per_file:  # whole parts of rows_per_file rows
            merged = pa.concat_tables(pending)
            pending = [merged.slice(0, settings.rows_per_file)]
            rest = merged.slice(settings.rows_per_file)
            pending_rows = settings.rows_per_file
            flush()
            pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        if pending and time.monotonic() - last_flush >= FLUSH_S:
            flush()
    if pending:
        flush()
    bar.close()
    result.seconds = time.perf_counter() - start
    return result
