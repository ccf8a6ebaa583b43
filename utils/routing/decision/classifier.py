"""The classifier thread: batches of received objects -> routing rules, then label, confidence, route.

Routing rules come first (utils/routing/decision/rules.py): each object's header (only the header, and
only when a rule needs it) decides whether the model may look at it at all. Objects a rule sends
elsewhere (CT, MR, reports, a site's own rules) are recorded at once with ``decided_by``
``rule:<name>`` and never decoded; a header that cannot be read sends its object to
``unreadable`` (``header_unreadable``). The rest go to the model (``decided_by``
``model:<model_id>``). In shadow mode (utils/routing/decision/shadow.py) the model's decision is recorded as
always, but the route is the shadow rule's (``decided_by`` ``shadow:destination`` / ``shadow:body_part_map``).

It takes whatever has arrived, up to ``batch_size`` objects, waiting at most ``batch_wait_ms``
after the oldest one arrived for the batch to fill; decodes and classifies them with
utils.infer.engine, as predict.py and test.py do (the model's own preprocessing spec; isolated worker
processes started once, so an object that hangs a codec past ``decode_timeout_s``, crashes it or
needs more than ``decode_memory_limit_mb`` gets reason ``decode_timeout`` / ``decoder_crashed``
instead of taking the router down); runs the model in power-of-two chunks (shapes warmed up at
start-up); and records every decision in one transaction. An object the model cannot see (not
DICOM, no pixel data such as SR or PDF, broken pixel data) gets label and route ``unreadable``
with the reason. A prediction below the threshold gets route ``uncertain``.

Poison objects: each classification attempt is counted in the queue (committed) before
decoding starts. An object whose attempts failed or never finished (a codec panic, a crash, a
hang ended by a restart, kill -9) ``max_classify_attempts`` times is given up: route
``unreadable``, reason ``classification_failed``, without being decoded again. Objects with an
earlier attempt are classified one at a time, so a crash counts against the object being
classified only. A batch that fails is split in halves until the failing objects are alone; a
failure where nothing at all could be classified (the model, the database) gives the attempts
back and pauses instead, so it never turns good objects unreadable.

Decisions that cannot be recorded (:class:`~utils.routing.queue.SpoolWriteError`: the spool's
disk is full, an I/O error) are nobody's fault: the batch is not split, its attempts are given
back (should that fail too, before anything else is tried: :meth:`Classifier._return_owed`), and
the classifier pauses ``ERROR_PAUSE_S`` and tries again, for as long as it takes.

The model is loaded in the classifier's own thread (:class:`BackgroundModel`), after the node
has started listening: reception needs only the model's metadata (its classes, for the routes),
so C-ECHO and C-STORE work during the seconds that importing TensorFlow and loading and warming
up the model take, and what arrives meanwhile waits in the spool. A model that cannot be loaded
ends the thread with :attr:`BackgroundModel.error` set; the node's watchdog stops the router.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import numpy as np

from utils import constants
from utils.infer.decisions import UNREADABLE, tag_disagrees
from utils.infer.engine import Engine
from utils.io.isolation import PoolSettings
from utils.routing.operations.audit import AuditLog
from utils.routing.operations.metrics import NO_METRICS
from utils.routing.queue import Classification, QueueItem, SpoolQueue, SpoolWriteError
from utils.routing.decision.rules import MODEL, RuleSet
from utils.routing.worker import FATAL, WakeableThread
from utils.untrusted import log_safe

log = logging.getLogger(__name__)

ERROR_PAUSE_S = 5.0  # after an unexpected error (e.g. the model failed) wait this long, then retry
CLASSIFY_FAILED = "classification_failed"  # reason code of objects given up after max_classify_attempts


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
    from utils.infer.predictor import scorer

    call = scorer(predictor)  # the call the classifier makes (with the OOD features when the model has them)
    for size in shapes:
        call(np.zeros((size, *predictor.spec.input_shape), np.float32))
    return shapes


class BackgroundModel:
    """The classifier's model: described at once by its metadata, loaded and warmed up by :meth:`load`.

    ``load_predictor()`` returns the predictor (the node passes ``utils.infer.predictor.load_predictor``
    for the configured path); ``spec``, ``model_id`` and ``metadata`` are the metadata's until then.
    ``ready`` is set once the predictor answers for every batch shape; ``error`` says why it never
    will. ``seconds`` is how long loading and warming up took.
    """

    def __init__(self, metadata, load_predictor: Callable[[], object], batch_size: int) -> None:
        self.metadata = metadata
        self.spec = metadata.spec
        self.model_id: str = metadata.model_id
        self.batch_size = batch_size
        self.predictor = None  # set once ready
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.loading_since: float | None = None  # time.monotonic() while load() runs
        self.seconds: float | None = None
        self.shapes: list[int] = []
        self._load_predictor = load_predictor

    @classmethod
    def of(cls, predictor, batch_size: int) -> BackgroundModel:
        """A predictor already loaded (tests, tools): :meth:`load` only warms it up."""
        metadata = getattr(predictor, "metadata", None) or SimpleNamespace(spec=predictor.spec,
                                                                           model_id=predictor.model_id)
        return cls(metadata, lambda: predictor, batch_size)

    def load(self) -> None:
        """Load and warm up the predictor; on failure ``error`` is set and the error raised."""
        self.loading_since = started = time.monotonic()
        try:
            predictor = self._load_predictor()
            if predictor.spec != self.spec or predictor.model_id != self.model_id:
                raise ValueError(f"the model changed while it was loaded: {predictor.model_id} {predictor.spec} "
                                 f"instead of {self.model_id} {self.spec}")
            self.shapes = warm_up(predictor, self.batch_size)  # the first call per batch shape is slow
        except BaseException as error:
            self.error = error
            raise
        finally:
            self.loading_since = None
        self.predictor = predictor
        self.seconds = time.monotonic() - started
        self.ready.set()

    def loading_for(self) -> float:
        """Seconds the current :meth:`load` has been running (0 when not loading)."""
        since = self.loading_since
        return 0.0 if since is None else time.monotonic() - since


def predict_in_chunks(predictor, batch: np.ndarray, batch_size: int):
    """The model on ``batch`` in chunks of at most ``batch_size``: probabilities, or a Scored with the
    out-of-distribution scores when the predictor has them (utils.infer.predictor.scorer)."""
    from utils.infer.predictor import concatenate, scorer

    call = scorer(predictor)
    out, start = [], 0
    for size in chunk_sizes(len(batch), batch_size):
        out.append(call(batch[start : start + size]))
        start += size
    return concatenate(out)


class Classifier(WakeableThread):

    def __init__(self, queue: SpoolQueue, predictor, audit: AuditLog, *, threshold: float, batch_size: int,
                 batch_wait_ms: int, pool: PoolSettings | None = None,
                 on_classified: Callable[[set[str]], None] = lambda r: None, rules: RuleSet | None = None,
                 shadow=None, max_classify_attempts: int = constants.ROUTER_MAX_CLASSIFY_ATTEMPTS,
                 metrics=NO_METRICS, keeper=None):
        """``predictor``: a :class:`BackgroundModel` (loaded when the thread starts) or a loaded predictor;
        ``pool``: how objects are decoded (default: isolated processes, utils/constants.py DECODE_*); ``rules``:
        evaluated before the model (default: the built-in policy alone, no ``pass_through`` destination);
        ``shadow``: shadow mode's ShadowRule (it picks the route, the model is recorded); ``metrics``: the node's
        RouterMetrics; ``keeper``: the console's review.Keeper (thumbnails, review copies)."""
        super().__init__(name="classifier")
        self.shadow, self.max_classify_attempts, self.metrics, self.keeper = shadow, max_classify_attempts, metrics, keeper
        self.queue = queue
        self.model = predictor if isinstance(predictor, BackgroundModel) else BackgroundModel.of(predictor, batch_size)
        self.audit = audit
        self.threshold = threshold
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.engine = Engine(self.model.spec, self._predict, threshold=threshold,
                             pool=pool)  # its worker processes start on first use
        self.on_classified = on_classified
        self.rules = rules if rules is not None else RuleSet((), ())
        self.batches = 0  # model calls so far (for tests and the bench)
        self._owed: list[QueueItem] = []  # counted attempts to give back (the database refused it last time)
        self._pending: tuple[dict, threading.Event] | None = None  # a reload's settings, applied between batches
        self._pending_lock = threading.Lock()

    def reconfigure(self, timeout: float | None = None, **settings) -> bool:
        """Apply a reload's ``settings`` (model: a loaded BackgroundModel, threshold, rules, shadow,
        max_classify_attempts, batch_wait_ms) between two batches: the batch being classified finishes with what it
        started with, the next one uses the new settings. True once applied (False after ``timeout``)."""
        done = threading.Event()
        with self._pending_lock:
            self._pending = (settings, done)
        if not self.is_alive():
            self._apply_pending()
        self.wake()
        return done.wait(timeout)

    def _apply_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        settings, done = pending
        model = settings.get("model", self.model)
        if model.spec != self.model.spec:  # another image size or preprocessing: decoding changes with it
            old, self.engine = self.engine, Engine(model.spec, self._predict, threshold=self.threshold,
                                                   pool=self.engine.settings)
            if self.is_alive():
                old.close()
                self.engine.__enter__()
        self.model = model
        if "threshold" in settings:
            self.threshold = self.engine.threshold = settings["threshold"]
        self.rules = settings.get("rules", self.rules)
        self.shadow = settings.get("shadow", self.shadow)
        self.max_classify_attempts = settings.get("max_classify_attempts", self.max_classify_attempts)
        if "batch_wait_ms" in settings:
            self.batch_wait = settings["batch_wait_ms"] / 1000.0
        done.set()

    @property
    def predictor(self):
        """The loaded predictor (None until the model is ready)."""
        return self.model.predictor

    def _predict(self, batch: np.ndarray) -> np.ndarray:
        return predict_in_chunks(self.model.predictor, batch, self.batch_size)

    def run(self) -> None:
        if not self._load_model():
            return  # the node's watchdog sees model.error and stops the router
        with self._decoding():
            while not self._halt.is_set():
                try:
                    self._apply_pending()  # a reload: between batches, never inside one
                    self._return_owed()  # no new attempt is counted while earlier ones are owed
                    items = self._next_batch()
                    if items:
                        self._classify_isolating(items)
                except FATAL:
                    raise
                except BaseException as error:  # noqa: BLE001 - a codec's panic must not end the thread
                    self._pause_after(error)
                finally:
                    self.busy_since = None

    def _load_model(self) -> bool:
        """Load the model (objects wait in the spool meanwhile); False when it cannot be loaded."""
        model = self.model
        if model.ready.is_set():
            return True
        log.info("loading the model %s (reception is running; objects wait in the spool meanwhile)", model.model_id)
        try:
            model.load()
        except FATAL:
            raise
        except BaseException as error:  # reported by the node's watchdog, which stops the router
            log.critical("the model %s could not be loaded: %s", model.model_id, describe(error), exc_info=error)
            return False
        if self.stopping:
            return False  # the node stopped meanwhile (without waiting for the load): the audit log is closed
        predictor = model.predictor
        log.info("model %s ready in %.1f s (%s; warmed up for batches of %s); classifying", model.model_id,
                 model.seconds, type(predictor).__name__, model.shapes)
        from utils.infer.ood import describe

        log.info("model %s: %s", model.model_id, describe(getattr(model.metadata, "ood", None)))
        try:
            self.audit.write("model_loaded", model_id=model.model_id, seconds=round(model.seconds, 3),
                             runtime=type(predictor).__name__, batch_shapes=model.shapes)
        except Exception as error:  # noqa: BLE001 - disk full, or closed by a stop that just began
            log.error("could not write the audit log: %s", error)
        self.wake()  # what arrived while the model was loading
        return True

    # --- the two places where the loop meets classify() -------------------------------------

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """What classify() decodes with, held for the thread's lifetime (a reload with another preprocessing spec
        replaces it: the one in use then is closed at the end)."""
        self.engine.__enter__()
        try:
            yield
        finally:
            self.engine.__exit__(None, None, None)

    def _classify_batch(self, items: list[QueueItem]) -> None:
        """Decode, predict and record the decisions of ``items`` (their attempt already counted)."""
        self.classify(items)

    # --- poison objects: counted attempts, isolation, giving up -----------------------------

    def _classify_isolating(self, items: list[QueueItem]) -> None:
        """Give up objects out of attempts; classify those tried before one by one, the rest as a batch."""
        limit = self.max_classify_attempts
        exhausted = [i for i in items if i.classify_attempts >= limit]
        if exhausted:
            self._give_up(exhausted)
        retried = [[i] for i in items if 0 < i.classify_attempts < limit]
        fresh = [i for i in items if i.classify_attempts == 0]
        classified, failures = 0, []
        for group in retried + ([fresh] if fresh else []):
            if self._halt.is_set():
                break
            done, failed = self._attempt(group)
            classified += done
            failures += failed
        if failures:
            self._settle(failures, classified)

    def _attempt(self, items: list[QueueItem]) -> tuple[int, list[tuple[QueueItem, BaseException]]]:
        """Count an attempt for each item, then classify them: (objects classified, [(item, error)]).

        A failing batch is split in halves (its attempts given back first) until each failure
        is alone, so one bad object cannot hold back the others.
        """
        started = self.queue.start_classification(items)  # committed: a crash from here on counts
        if not started:
            return 0, []
        self.busy_since = time.monotonic()
        try:
            self._classify_batch(started)
            self.metrics.classification(time.monotonic() - self.busy_since, len(started))
            return len(started), []
        except FATAL:
            raise
        except BaseException as error:  # noqa: BLE001 - a codec's panic is a BaseException
            left = self.queue.still_received(started)
            if isinstance(error, SpoolWriteError):  # the decisions could not be recorded: not these objects' fault
                self._give_back(left)
                raise
            done = len(started) - len(left)
            if not left:  # every decision was recorded; what failed came after
                self._report_error(error, "after its decisions were recorded", objects=len(started))
                return done, []
            if len(left) == 1:
                return done, [(left[0], error)]
            log.info("a batch of %d objects failed (%s: %s); classifying it in halves", len(left),
                     type(error).__name__, error)
            if not self._give_back(left):
                raise  # cannot give the attempts back: no new ones either; the loop pauses and retries
            half = len(left) // 2
            done_a, failed_a = self._attempt(left[:half])
            done_b, failed_b = self._attempt(left[half:])
            return done + done_a + done_b, failed_a + failed_b
        finally:
            self.busy_since = None

    def _settle(self, failures: list[tuple[QueueItem, BaseException]], classified: int) -> None:
        """Keep the attempts of objects that failed on their own; give them back after a systemic failure.

        A failure is the object's own when other objects were classified meanwhile, when it is
        not an ``Exception`` (a codec's panic), or when an earlier failure was already its own.
        Otherwise nothing at all could be classified (the model, the database): the attempts are
        given back and the classifier pauses.
        """
        systemic = []
        for item, error in failures:
            if classified or not isinstance(error, Exception) or item.reason:
                reason = describe(error)
                self.queue.note_classification_failure(item, reason)
                log.warning("classifying %s failed (attempt %d of %d): %s",
                            log_safe(item.sop_instance_uid or item.file), item.classify_attempts,
                            self.max_classify_attempts, reason, exc_info=error)
                self.audit.write("classification_failed", sop_instance_uid=item.sop_instance_uid, item=item.id,
                                 attempt=item.classify_attempts, max_attempts=self.max_classify_attempts,
                                 error=reason)
            else:
                systemic.append(item)
        if systemic:
            self._give_back(systemic)
            self._pause_after(failures[0][1], objects=len(systemic))

    def _give_back(self, items: list[QueueItem]) -> bool:
        """Return the attempts counted for ``items``; if the database refuses, keep them owed (returned before the
        next batch starts, see ``_return_owed``). True when nothing is owed any more."""
        known = {i.id for i in self._owed}
        self._owed += [i for i in items if i.id not in known]
        try:
            self._return_owed()
        except SpoolWriteError as error:
            log.error("could not give %d classification attempts back (%s); trying again before the next batch",
                      len(self._owed), error)
            return False
        return True

    def _return_owed(self) -> None:
        """Give back the attempts still owed; SpoolWriteError (the loop pauses and comes back) if it cannot."""
        if self._owed:
            self.queue.return_classification_attempts(self._owed)
            log.info("gave %d classification attempts back", len(self._owed))
            self._owed = []

    def _give_up(self, items: list[QueueItem]) -> None:
        """Route objects out of attempts to ``unreadable`` with the reason, without decoding them again."""
        decisions = [Classification(i.id, UNREADABLE, None, "", UNREADABLE, poison_reason(i), CLASSIFY_FAILED)
                     for i in items]
        self.queue.set_classified(decisions)
        for item, decision in zip(items, decisions):
            log.error("%s: classification failed or did not finish %d times; routed to %s (%s)",
                      log_safe(item.sop_instance_uid or item.file), item.classify_attempts, UNREADABLE,
                      decision.reason)
            self.audit.write("poisoned", sop_instance_uid=item.sop_instance_uid, item=item.id,
                             attempts=item.classify_attempts, route=UNREADABLE, reason=decision.reason)
            self.audit.write("classified", sop_instance_uid=item.sop_instance_uid, item=item.id, label=UNREADABLE,
                             top_label=None, confidence=None, model_id="", route=UNREADABLE, reason=decision.reason,
                             decided_by=CLASSIFY_FAILED)
            self.metrics.classified(UNREADABLE, CLASSIFY_FAILED)
        self.on_classified({UNREADABLE})

    def _report_error(self, error: BaseException, note: str, **fields) -> None:
        """Log with the traceback and audit (``classifier_error``) a failure that is not one object's."""
        log.error("classification failed %s: %s", note, describe(error), exc_info=error)
        try:
            self.audit.write("classifier_error", error=describe(error), **fields)
        except Exception:  # the audit log itself failing (disk full) must not end the thread
            log.exception("could not write the audit log")

    def _pause_after(self, error: BaseException, objects: int | None = None) -> None:
        """Report the failure, wait ``ERROR_PAUSE_S`` (a stop cuts it short), then the loop retries."""
        self._report_error(error, f"(retrying in {ERROR_PAUSE_S:.0f} s)", objects=objects, pause_s=ERROR_PAUSE_S)
        self._halt.wait(ERROR_PAUSE_S)

    def _next_batch(self) -> list[QueueItem]:
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

    def classify(self, items: list[QueueItem]) -> list[Classification]:
        """Route ``items`` by the rules; decode, predict and decide the rest as one batch (utils.infer.engine).
        Records the decisions (the rules' first, so a failing model holds nothing back that it need not see)."""
        routed, items = self.route_by_rules(items)
        if not items:
            return routed
        spec = self.model.spec
        paths = [self.queue.path(item) for item in items]
        decoded, predictions = [], []  # decoded: the console's thumbnails too
        # In chunks: the decoding processes decode chunk n+1 while the model runs on chunk n (Engine.chunk_size).
        for chunk in self.engine.decode_batches(paths, self.engine.chunk_size(len(paths))):
            decoded += chunk
            predictions += self.engine.predict_decoded(chunk)
        self.batches += any(p.readable for p in predictions)
        decided_by = f"{MODEL}:{self.model.model_id}" if self.shadow is None else self.shadow.decided_by
        decisions = [Classification(item.id, p.label, p.confidence, self.model.model_id, self._route(p), p.error,
                                    decided_by, **seen(p, spec.class_names)) for item, p in zip(items, predictions)]
        if self.keeper is not None:  # before the commit: once it is committed a forwarder may delete the spool file
            self.keeper.keep(items, decisions, decoded)
        self.queue.set_classified(decisions)
        for item, decision, p in zip(items, decisions, predictions):
            disagrees = None if decision.tag_disagrees is None else bool(decision.tag_disagrees)
            self.audit.write("classified", sop_instance_uid=item.sop_instance_uid, item=item.id,
                             label=decision.label, top_label=p.top_label or None, confidence=decision.confidence,
                             model_id=decision.model_id, route=decision.route, reason=decision.reason or None,
                             body_part_examined=decision.body_part_examined, decided_by=decided_by,
                             tag_disagrees=disagrees, ood_score=None if p.ood_score is None else round(p.ood_score, 4),
                             **self._shadow_fields(p, spec.class_names))
            self.metrics.classified(decision.label, decided_by)
        log.info("classified %d objects (%s)", len(items), ", ".join(sorted({d.label for d in decisions})))
        self.on_classified({d.route for d in decisions})
        return routed + decisions

    def _route(self, prediction) -> str:
        """Where an object the model decided goes: its label, or in shadow mode the shadow rule's destination."""
        if self.shadow is None:
            return prediction.label
        return self.shadow.route(prediction.header.get("BodyPartExamined"))

    def _shadow_fields(self, prediction, class_names) -> dict:
        """The audit fields shadow mode adds to a ``classified`` line (none in route mode)."""
        if self.shadow is None:
            return {}
        return {"mode": "shadow", "model_route": prediction.label, "probabilities": rounded_probs(prediction, class_names)}

    def route_by_rules(self, items: list[QueueItem]) -> tuple[list[Classification], list[QueueItem]]:
        """Record the decisions of the routing rules (header only, nothing decoded); (those, items for the model)."""
        decisions, routed, for_model = [], [], []
        for item in items:
            rule = self.rules.decide(item, self.queue.path(item))
            if rule.destination == MODEL:
                for_model.append(item)
                continue
            # label = route: what decided it is a rule, not a class of the model
            decisions.append(Classification(item.id, rule.destination, None, "", rule.destination, rule.reason,
                                            rule.decided_by,
                                            body_part_examined=str(rule.header.get("BodyPartExamined") or "")))
            routed.append((item, rule))
        if not decisions:
            return [], for_model
        self.queue.set_classified(decisions)
        for (item, rule), decision in zip(routed, decisions):
            self.audit.record("classified", sop_instance_uid=item.sop_instance_uid, item=item.id,
                              label=decision.label, top_label=None, confidence=None, model_id="",
                              route=decision.route, reason=decision.reason or None,
                              body_part_examined=rule.header.get("BodyPartExamined"),
                              modality=rule.header.get("Modality"), decided_by=decision.decided_by)
            self.metrics.classified(decision.label, decision.decided_by)
        log.info("routed %d objects by rule (%s)", len(decisions),
                 ", ".join(sorted({f"{d.decided_by} -> {d.route}" for d in decisions})))
        self.on_classified({d.route for d in decisions})
        return decisions, for_model


def rounded_probs(prediction, class_names) -> dict[str, float] | None:
    """class -> probability, 4 decimals (the queue row and shadow mode's audit line); None when unreadable."""
    if prediction.probs is None:
        return None
    return {c: round(float(x), 4) for c, x in zip(class_names, prediction.probs)}


def seen(prediction, class_names) -> dict:
    """What the classifier saw of one object, for its queue row (the console shows it): the probabilities
    (JSON, 4 decimals), BodyPartExamined, Study Instance UID, Patient ID, and whether the tag disagrees."""
    header = prediction.header
    tag = str(header.get("BodyPartExamined") or "")
    top = prediction.top_label or None
    disagrees = tag_disagrees(top, tag, class_names) if top else None
    probs = rounded_probs(prediction, class_names)
    return {"probs": "" if probs is None else json.dumps(probs, separators=(",", ":")), "body_part_examined": tag,
            "study_instance_uid": str(header.get("StudyInstanceUID") or ""),
            "patient_id": str(header.get("PatientID") or ""),
            "tag_disagrees": None if disagrees is None else int(disagrees)}


def describe(error: BaseException, limit: int = 500) -> str:
    """``"PanicException: index out of bounds..."``, cut to ``limit`` characters."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def poison_reason(item: QueueItem) -> str:
    """The reason recorded for an object given up after its attempts (the last error, if one was caught)."""
    cause = (f"last error: {item.reason}" if item.reason else
             "the router crashed, hung or was killed while classifying it")
    return f"{CLASSIFY_FAILED}: {item.classify_attempts} classification attempts failed or did not finish; {cause}"
