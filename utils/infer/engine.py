"""The one inference engine behind predict.py, test.py and the router: decode -> stack -> predict -> decide.

    with Engine(predictor.spec, predictor.predict, threshold=0.5, pool=PoolSettings()) as engine:
        for predictions in engine.classify_batches(files, batch_size=32):  # decodes chunk n+1 while the model runs n
            ...
        predictions = engine.classify(paths)  # one batch; the same workers call after call (the router: decode + predict_decoded)

Files are decoded with the model's own preprocessing spec (utils.preprocessing.preprocess_file)
in a utils.io.isolation pool: worker processes by default, so a file that hangs a codec, crashes
it or needs gigabytes costs only its own row. Every file gives exactly one :class:`Decoded` (and
one :class:`Prediction`); decoding never raises for a bad file. ``reason`` is one of:

- ``file_not_found``: the file does not exist (whatever the reader raised);
- ``os_error``: it could not be read (permissions, I/O);
- ``decode_timeout``: decoding ran past the time limit; its worker process was killed;
- ``decoder_crashed``: the worker process died decoding it (segfault, abort, out of memory);
- ``out_of_memory``: decoding needed more than the worker's memory cap and failed cleanly;
- a reader's own code (``.reason`` of utils.io.dicom.DicomReadError / preprocessing.ImageReadError:
  ``not_dicom``, ``no_pixel_data``, ``truncated_pixel_data``, ``codec_panic`` (a codec's
  panic the reader caught), ``unreadable_image``...);
- ``unexpected_error``: anything else, an exception or a BaseException such as a Rust panic
  that the reader did not classify;
- ``not_projection_radiography``: with ``projection_only`` (predict.py, test.py and backfill.py by
  default; the router applies the same guard in its rules), a DICOM whose header says it is not
  projection radiography (utils.infer.decisions.not_projection): never shown to the model. The
  header is read first and its pixels are not decoded; this reason also wins over a decode failure
  (a CT whose pixel data is truncated, or that crashes a custom decode function) whenever the
  header is known.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from utils.infer.decisions import NOT_PROJECTION, UNCERTAIN, UNREADABLE, decide, not_projection
from utils import constants
from utils.infer.ood import OUT_OF_DISTRIBUTION
from utils.io.isolation import Failure, IsolatedPool, PoolSettings
from utils.preprocessing import PreprocessSpec, is_raster, preprocess_file, to_model_input

FILE_NOT_FOUND = "file_not_found"
OS_ERROR = "os_error"
DECODE_TIMEOUT = "decode_timeout"
DECODER_CRASHED = "decoder_crashed"
OUT_OF_MEMORY = "out_of_memory"
UNEXPECTED_ERROR = "unexpected_error"
CHUNK_FILES = 8  # files per model call in classify_batches (at least): small enough to overlap, large enough to batch


@dataclass
class Decoded:
    """One file after preprocessing: the 8-bit image, or why there is none."""

    path: str
    image: np.ndarray | None  # uint8 (S, S), None when unreadable
    header: dict[str, str] = field(default_factory=dict)  # DICOM header fields ("" where missing)
    reason: str = ""  # a reason code (module docstring), "" when readable
    message: str = ""


@dataclass
class Prediction:
    """One file's outcome: a class, ``uncertain`` or ``unreadable`` (then ``reason`` says why)."""

    path: str
    header: dict[str, str]
    label: str
    top_label: str = ""  # the most probable class ("" when unreadable)
    confidence: float | None = None  # its probability
    probs: np.ndarray | None = None  # (K,) softmax, None when unreadable
    reason: str = ""  # why it is unreadable, or out_of_distribution (readable, label uncertain)
    message: str = ""
    ood_score: float | None = None  # the model's out-of-distribution score (utils.infer.ood); None without one

    @property
    def readable(self) -> bool:
        return self.probs is not None

    @property
    def error(self) -> str:
        """"reason: message", or "" for a readable file the model could judge."""
        return f"{self.reason}: {self.message}" if self.reason else ""


# --- Decoding one file (runs in a worker) ---------------------------------------------------


def decode_file(path: str | os.PathLike, spec: PreprocessSpec, projection_only: bool = False) -> Decoded:
    """Preprocess one file with the model's spec. Never raises for a bad file: any exception,
    a BaseException such as a Rust panic included (not KeyboardInterrupt/SystemExit), becomes a
    Decoded without an image. ``projection_only``: the header guard first; a DICOM whose header is
    not projection radiography comes back without an image, reason ``not_projection_radiography``,
    its pixels never decoded (a header that cannot be read is left to the decode to report)."""
    path = os.fspath(path)
    if projection_only and (why := not_projection(header := header_or_empty(path))):
        return Decoded(path, None, header, NOT_PROJECTION, why)
    try:
        image, header = preprocess_file(path, spec)
        return Decoded(path, image, dict(header))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:  # noqa: BLE001 - every failure becomes a reported row
        reason, message = error_reason(path, error)
        return Decoded(path, None, {} if reason == FILE_NOT_FOUND else header_or_empty(path), reason, message)


def error_reason(path: str, error: BaseException) -> tuple[str, str]:
    """(reason code, message) for an exception raised while reading ``path``. A missing file, a
    memory failure or an operating-system I/O error (one with an errno) gets its code also when
    a reader wrapped it."""
    chain = (error, error.__cause__)
    local = "://" not in str(path)  # a URL (s3://, dicomweb+https://...) is not looked for on this disk
    if any(isinstance(e, FileNotFoundError) for e in chain) or (local and not os.path.lexists(path)):
        return FILE_NOT_FOUND, str(error)
    if any(isinstance(e, MemoryError) for e in chain):
        return OUT_OF_MEMORY, f"decoding needs more memory than the limit allows ({error or 'MemoryError'})"
    if isinstance(error, OSError) or (isinstance(error.__cause__, OSError) and error.__cause__.errno is not None):
        return OS_ERROR, str(error)
    reason = getattr(error, "reason", "")
    if isinstance(reason, str) and reason:
        return reason, str(error)
    return UNEXPECTED_ERROR, f"{type(error).__name__}: {error}"


def header_or_empty(path: str) -> dict[str, str]:
    """The UIDs and tags of a DICOM that has no usable image (an SR still has a SOPInstanceUID)."""
    if is_raster(path):
        return {}
    try:
        from utils.io.dicom import read_dicom_header

        return dict(read_dicom_header(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - best effort; the decode error is what gets reported
        return {}


def failure_reason(failure: Failure, timeout_s: float) -> tuple[str, str]:
    """(reason code, message) for an item the pool could not run to its end."""
    if failure.kind == "timeout":
        return DECODE_TIMEOUT, f"decoding took longer than {timeout_s:g} s; the process decoding it was stopped"
    if failure.kind == "crashed":
        return DECODER_CRASHED, (f"the process decoding this file died ({failure.message}): a crash in an "
                                 "image codec, or out of memory; the file was not read")
    return UNEXPECTED_ERROR, failure.message


def init_decoder_process(j2k_threads: int = 1) -> None:
    """Start of each decoding process: one OpenCV thread (the processes already fill the cores),
    ``j2k_threads`` OpenJPEG threads per JPEG 2000 frame (PoolSettings.thread_count), pydicom's
    per-file warnings silenced (a broken file's row already says what was wrong; a batch of damaged
    files would otherwise flood the terminal), and the readers imported now, under the memory cap,
    rather than in the first file's time."""
    import warnings

    import cv2

    cv2.setNumThreads(1)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    import utils.io.dicom
    import utils.preprocessing

    utils.io.dicom.set_j2k_threads(j2k_threads)


# --- The engine -----------------------------------------------------------------------------


class Engine:
    """Decoding pool + model + decisions for one model; see the module docstring.

    ``predict`` maps a float32 batch (N, S, S, C) to probabilities (N, K) (a Predictor's
    ``predict``, or the router's chunked call), or to a utils.infer.predictor.Scored (a Predictor's
    ``score``: probabilities, out-of-distribution scores and their threshold): an image above the
    threshold gets label ``uncertain`` with reason ``out_of_distribution`` (its probabilities kept).
    Without ``predict``, only the decode methods work.
    ``decode(path, spec) -> Decoded`` replaces :func:`decode_file` (picklable in processes mode).
    ``projection_only``: the header guard; a DICOM that is not projection radiography comes out of
    :meth:`decode` without an image, reason ``not_projection_radiography``, whether it decoded or
    not (decode_file reads its header before its pixels; a custom ``decode`` is checked after).
    The pool starts on first use and is kept until :meth:`close`.
    """

    def __init__(self, spec: PreprocessSpec, predict: Callable[[np.ndarray], np.ndarray] | None = None, *,
                 threshold: float = 0.0, pool: PoolSettings | None = None,
                 decode: Callable[..., Decoded] | None = None, projection_only: bool = False,
                 colour_limit: float = constants.COLOUR_SHARE_LIMIT) -> None:
        self.spec = spec
        self.threshold = threshold
        self.projection_only = projection_only
        self.colour_limit = colour_limit
        self.settings = pool or PoolSettings()
        self._predict = predict
        self._decode = (functools.partial(decode, spec=spec) if decode is not None
                        else functools.partial(decode_file, spec=spec, projection_only=projection_only))
        threads = self.settings.thread_count
        # string form while the default applies: the worker imports this module under its memory cap
        initializer = (f"{__name__}:init_decoder_process" if threads == 1
                       else functools.partial(init_decoder_process, j2k_threads=threads))
        if self.settings.mode == "threads" and threads > 1:  # the pool's threads decode in this process
            from utils.io.dicom import set_j2k_threads

            set_j2k_threads(threads)
        self._pool = IsolatedPool(self.settings, initializer=initializer)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    def decode(self, paths: Iterable[str | os.PathLike]) -> list[Decoded]:
        """One batch, in order. Raises only utils.io.isolation.WorkersDied (a broken setup)."""
        paths = [os.fspath(p) for p in paths]
        outcomes = self._pool.map(self._decode, paths)
        failed = [i for i, o in enumerate(outcomes) if isinstance(o, Failure)]
        headers: dict[int, dict] = {}
        wanted = [i for i in failed if outcomes[i].kind != "timeout"]  # a hang is not tried twice
        if wanted:
            found = self._pool.map(header_or_empty, [paths[i] for i in wanted])
            headers = {i: h for i, h in zip(wanted, found) if isinstance(h, dict)}
        out = []
        for i, (path, outcome) in enumerate(zip(paths, outcomes)):
            if isinstance(outcome, Failure):
                outcome = Decoded(path, None, headers.get(i, {}), *failure_reason(outcome, self.settings.timeout_s))
            # the guard's reason wins over a decode failure too, whenever the header is known
            if self.projection_only and outcome.reason != NOT_PROJECTION and (why := not_projection(outcome.header)):
                outcome = Decoded(path, None, outcome.header, NOT_PROJECTION, why)
            out.append(outcome)
        return out

    def decode_batches(self, paths: Sequence[str | os.PathLike], batch_size: int) -> Iterator[list[Decoded]]:
        """:meth:`decode`, ``batch_size`` files at a time, decoding ahead in a background thread."""
        paths = list(paths)
        batches = (self.decode(paths[i : i + batch_size]) for i in range(0, len(paths), max(1, batch_size)))
        return prefetch(batches)

    def classify(self, paths: Iterable[str | os.PathLike]) -> list[Prediction]:
        """Decode one batch, run the model once on its readable images, decide."""
        return self.predict_decoded(self.decode(paths))

    def classify_batches(self, paths: Sequence[str | os.PathLike], batch_size: int) -> Iterator[list[Prediction]]:
        """:meth:`classify` over ``paths``, yielded ``batch_size`` at a time. Inside, files are decoded
        and given to the model in smaller chunks (:meth:`chunk_size`), chunk n+1 decoded while the
        model runs on chunk n: the model starts after the first few files instead of after a whole
        batch, and the decoders never wait for it at the end (on a CPU the model is as fast per
        image at batch 8 as at 32)."""
        pending: list[Prediction] = []
        for decoded in self.decode_batches(paths, self.chunk_size(batch_size)):
            pending += self.predict_decoded(decoded)
            while len(pending) >= max(1, batch_size):
                yield pending[:batch_size]
                pending = pending[batch_size:]
        if pending:
            yield pending

    def chunk_size(self, batch_size: int) -> int:
        """Files per model call in :meth:`classify_batches`: two per decoding worker, at least
        CHUNK_FILES, at most ``batch_size``."""
        return max(1, min(batch_size, max(CHUNK_FILES, 2 * self._pool.workers)))

    def predict_decoded(self, decoded: Sequence[Decoded]) -> list[Prediction]:
        if self._predict is None:
            raise ValueError("this engine has no model: give Engine a predict function")
        class_names = list(self.spec.class_names)
        readable = [d for d in decoded if d.image is not None]
        ood = ood_threshold = None
        if readable:
            result = self._predict(to_model_input(np.stack([d.image for d in readable]), self.spec.channels))
            if hasattr(result, "probs"):  # a Scored
                ood, ood_threshold = result.ood, result.ood_threshold
                result = result.probs
            probs = np.asarray(result)
            if probs.shape != (len(readable), len(class_names)):
                raise ValueError(f"the model returned {probs.shape} for {len(readable)} images of "
                                 f"{len(class_names)} classes")
        else:
            probs = np.zeros((0, len(class_names)), np.float32)
        labels, top_labels, confidence = decide(probs, class_names, self.threshold)
        out, j = [], 0
        for d in decoded:
            if d.image is None:
                out.append(Prediction(d.path, d.header, UNREADABLE, reason=d.reason, message=d.message))
                continue
            prediction = Prediction(d.path, d.header, labels[j], top_labels[j], float(confidence[j]), probs[j])
            if ood is not None:
                prediction.ood_score = float(ood[j])
                if ood_threshold is not None and prediction.ood_score > ood_threshold:
                    prediction.label, prediction.reason = UNCERTAIN, OUT_OF_DISTRIBUTION
                    prediction.message = (f"the image is unlike the radiographs the model was trained on "
                                          f"(OOD score {prediction.ood_score:.4g} > {ood_threshold:.4g})")
            coloured = _colour_share(d.header)
            if coloured > self.colour_limit and prediction.reason != OUT_OF_DISTRIBUTION:
                prediction.label, prediction.reason = UNCERTAIN, OUT_OF_DISTRIBUTION
                prediction.message = (f"a colour image ({100 * coloured:.1f} % of its pixels coloured, more than "
                                      f"{100 * self.colour_limit:g} %): not a radiograph")
            out.append(prediction)
            j += 1
        return out


def _colour_share(header: dict) -> float:
    """The reader's share of coloured pixels of a colour DICOM (utils.io.dicom.colour.colour_share); 0 otherwise."""
    try:
        return float(header.get(COLOUR_SHARE_KEY) or 0.0)
    except (TypeError, ValueError):
        return 0.0


COLOUR_SHARE_KEY = "ColourShare"  # utils.io.dicom.colour.COLOUR_SHARE_KEY (not imported: no pydicom here)


# --- Prefetch -------------------------------------------------------------------------------


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, at most ``depth`` items ahead of the consumer.
    Its exceptions are re-raised in the consumer; a consumer that stops early stops it after
    the item in progress."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            put(_Raised(error))
            return
        put(done)

    threading.Thread(target=fill, name="prefetch", daemon=True).start()
    try:
        while (item := buffer.get()) is not done:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
