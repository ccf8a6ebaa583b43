"""The classifier thread: batches of received objects -> label, confidence, route.

It takes whatever has arrived, up to ``batch_size`` objects, waiting at most ``batch_wait_ms``
after the oldest one arrived for the batch to fill; decodes them in a thread pool with the
model's own preprocessing spec (utils.batch_predict.decode_file, the same as predict.py and
training); runs the model (in power-of-two chunks, shapes warmed up at start-up); and records every decision in one transaction. An object the
model cannot see (not DICOM, no pixel data such as SR or PDF, broken pixel data) gets label and
route ``unreadable`` with the reason. A prediction below the threshold gets route ``uncertain``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from utils.batch_predict import UNREADABLE, decide, decode_file, tag_disagrees
from utils.evaluation import default_workers
from utils.preprocessing import to_model_input
from utils.routing.audit import AuditLog
from utils.routing.queue import Classification, Item, SpoolQueue
from utils.routing.worker import WakeableThread

log = logging.getLogger(__name__)

ERROR_PAUSE_S = 5.0  # after an unexpected error (e.g. the model failed) wait this long, then retry


def chunk_sizes(count: int, batch_size: int) -> list[int]:
    """``count`` as powers of two no larger than ``batch_size``, largest first (13, 16 -> [8, 4, 1]).

    The model then only ever sees these few batch shapes, all run once at start-up: on CPU the
    first call with a new batch shape costs up to seconds (graph tracing, oneDNN set-up), which
    batches of whatever size happened to arrive would pay again and again.
    """
    largest = 1 << (max(1, batch_size).bit_length() - 1)
    sizes = []
    while count > 0:
        size = min(largest, 1 << (count.bit_length() - 1))
        sizes.append(size)
        count -= size
    return sizes


def warm_up(predictor, batch_size: int) -> list[int]:
    """Run every batch shape :func:`chunk_sizes` can produce once; the shapes run."""
    shapes = sorted({s for n in range(1, batch_size + 1) for s in chunk_sizes(n, batch_size)})
    for size in shapes:
        predictor.predict(np.zeros((size, *predictor.spec.input_shape), np.float32))
    return shapes


def predict_in_chunks(predictor, batch: np.ndarray, batch_size: int) -> np.ndarray:
    out, start = [], 0
    for size in chunk_sizes(len(batch), batch_size):
        out.append(predictor.predict(batch[start : start + size]))
        start += size
    return np.concatenate(out)


class Classifier(WakeableThread):
    def __init__(self, queue: SpoolQueue, predictor, audit: AuditLog, *, threshold: float, batch_size: int,
                 batch_wait_ms: int, workers: int = 0, on_classified: Callable[[set[str]], None] = lambda r: None):
        super().__init__(name="classifier")
        self.queue = queue
        self.predictor = predictor
        self.audit = audit
        self.threshold = threshold
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.workers = workers or default_workers()
        self.on_classified = on_classified
        self.batches = 0  # model calls so far (for tests and the bench)

    def run(self) -> None:
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="decode") as pool:
            while not self._halt.is_set():
                try:
                    items = self._next_batch()
                    if items:
                        self.classify(items, pool)
                except Exception:
                    log.exception("classification failed; retrying in %.0f s", ERROR_PAUSE_S)
                    self._halt.wait(ERROR_PAUSE_S)

    def _next_batch(self) -> list[Item]:
        """Received items once the batch is full or the oldest has waited ``batch_wait``; else []."""
        items = self.queue.received(self.batch_size)
        if not items:
            self._wake.wait(1.0)
            self._wake.clear()
            return []
        if len(items) < self.batch_size:
            remaining = min(i.received_at for i in items) + self.batch_wait - time.time()
            if remaining > 0:
                self._wake.wait(remaining)
                self._wake.clear()
                return []  # look again: more may have arrived
        return items

    def classify(self, items: list[Item], pool: ThreadPoolExecutor) -> list[Classification]:
        spec = self.predictor.spec
        decoded = list(pool.map(lambda item: decode_file(self.queue.path(item), spec), items))
        readable = [d for d in decoded if d.image is not None]
        if readable:
            batch = to_model_input(np.stack([d.image for d in readable]), spec.channels)
            probs = predict_in_chunks(self.predictor, batch, self.batch_size)
            self.batches += 1
        else:
            probs = np.zeros((0, spec.num_classes), np.float32)
        labels, top_labels, confidence = decide(probs, spec.class_names, self.threshold)
        results = iter(zip(labels, top_labels, confidence))
        decisions, notes = [], []
        for item, d in zip(items, decoded):
            if d.image is None:
                decisions.append(Classification(item.id, UNREADABLE, None, self.predictor.model_id, UNREADABLE,
                                                f"{d.reason}: {d.message}"))
                notes.append((None, d))
            else:
                label, top_label, conf = next(results)
                decisions.append(Classification(item.id, label, float(conf), self.predictor.model_id, label))
                notes.append((top_label, d))
        self.queue.set_classified(decisions)
        for item, decision, (top_label, d) in zip(items, decisions, notes):
            tag = d.header.get("BodyPartExamined", "")
            self.audit.write("classified", sop_instance_uid=item.sop_instance_uid, item=item.id,
                             label=decision.label, top_label=top_label, confidence=decision.confidence,
                             model_id=decision.model_id, route=decision.route, reason=decision.reason or None,
                             body_part_examined=tag,
                             tag_disagrees=tag_disagrees(top_label, tag, spec.class_names) if top_label else None)
        log.info("classified %d objects (%s)", len(items), ", ".join(sorted({d.label for d in decisions})))
        self.on_classified({d.route for d in decisions})
        return decisions
