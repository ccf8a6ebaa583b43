"""The router as one object: queue + audit + classifier + forwarders + SCP, started and stopped in order.

    node = RouterNode(load_config("router.yaml"))
    node.start()          # recover the queue, load the model, start threads, listen
    node.wait()           # until stop() (router.py calls it on SIGTERM / SIGINT)

Start order puts consumers before producers: recovery, then model and forwarders and classifier,
and the SCP last, so nothing is accepted before it can be processed. Stop order is the reverse:
the SCP stops accepting (running associations get a grace period), then the classifier finishes
its batch and forwarders their current object. Everything not finished stays in the queue.

A watchdog thread checks the workers twice a second. A worker thread that ended without being
stopped (it died), or a classification running for longer than :func:`stall_limit` (a hung
decoder), stops the whole node: the SCP stops accepting, the failure is logged and audited
(``worker_failed``), :attr:`RouterNode.failure` says what happened and ``router.py`` exits with
``EXIT_WORKER_FAILED`` so that its supervisor (systemd ``Restart=on-failure``, a container
restart policy) starts it again. A restart recovers the queue; the object being classified when
it failed has its attempt counted and is given up after ``max_classify_attempts``.

Start-up repairs what a stop left behind before anything runs: the queue (``SpoolQueue.recover``),
unfinished copies in folder destinations (``remove_partial_copies``) and audit lines a crash cost
(``reconcile_audit``); the ``recovered`` audit event counts all of it. The watchdog also looks at
the free space of the spool's filesystem (``ReceptionGate.refresh``), so that reception pauses and
resumes with it even while nothing arrives.
"""

from __future__ import annotations

import logging
import threading
import time

from utils.io.isolation import PoolSettings
from utils.routing.audit import AuditLog
from utils.routing.classifier import Classifier, warm_up
from utils.routing.config import RouterConfig
from utils.routing.forwarder import enable_raw_sending, make_forwarders, remove_partial_copies
from utils.routing.queue import SpoolQueue
from utils.routing.reconcile import reconcile_audit
from utils.routing.scp import StoreHandler, start_scp
from utils.routing.space import ReceptionGate

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # how long running associations may finish after a stop request
WATCH_INTERVAL_S = 0.5  # how often the watchdog looks at the worker threads
CLASSIFY_STALL_S = 600.0  # one classification running this long (at least) means a hung decoder or model: restart
EXIT_WORKER_FAILED = 3  # router.py's exit status when a worker thread died or hung (1: --check failed, 2: bad setup)


def stall_limit(config: RouterConfig) -> float:
    """How long one classification may run before the classifier counts as hung.

    Longer than any legitimate batch: every object of a full batch running into the decode time
    limit one after the other, twice over, and never under ``CLASSIFY_STALL_S``.
    """
    return max(CLASSIFY_STALL_S, 2 * config.batch_size * config.decode_timeout_s)


class RouterNode:
    stall_s: float | None = None  # None: stall_limit(config)

    def __init__(self, config: RouterConfig, predictor=None) -> None:
        self.config = config
        self.predictor = predictor  # None: loaded from config.model at start()
        self.queue: SpoolQueue | None = None
        self.audit: AuditLog | None = None
        self.classifier: Classifier | None = None
        self.forwarders: list = []
        self.gate: ReceptionGate | None = None  # the free-space reserve of the spool's filesystem
        self.ae = None
        self.server = None
        self.failure: str | None = None  # why the watchdog stopped the node
        self.threshold: float | None = None  # the threshold classifying with (config's "auto" resolved at start)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def exit_code(self) -> int:
        """0 after a requested stop, EXIT_WORKER_FAILED after the watchdog stopped the node."""
        return EXIT_WORKER_FAILED if self.failure else 0

    @property
    def port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        return self.server.server_address[1]

    def start(self) -> RouterNode:
        config = self.config
        self.queue = SpoolQueue(config.spool_dir)
        try:
            self.audit = AuditLog(config.audit_log)
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        config = self.config
        report = self.queue.recover()
        folders = {d.folder for d in config.destinations.values() if d.is_folder}
        report["partial_copies_deleted"] = sum(len(remove_partial_copies(f)) for f in sorted(folders))
        nodes = {route: d.node for route, d in config.destinations.items()}
        reconciled = reconcile_audit(self.queue, self.audit, lambda route: nodes.get(route, route))
        report["audit_reconciled"] = sum(reconciled.values())
        self.audit.write("recovered", **report)
        log.info("spool %s: %s", config.spool_dir, report)
        if self.predictor is None:
            from utils.infer.predictor import load_predictor

            self.predictor = load_predictor(config.model)
        spec = self.predictor.spec
        config.check_routes(spec.class_names)
        self.threshold = config.resolve_threshold(self.predictor)  # "auto": the model's calibrated recommendation
        started = time.perf_counter()
        shapes = warm_up(self.predictor, config.batch_size)  # the first call per batch shape is slow
        log.info("model warmed up for batches of %s in %.1f s", shapes, time.perf_counter() - started)
        enable_raw_sending()
        self.forwarders = make_forwarders(config, self.queue, self.audit)
        by_route = {route: f for f in self.forwarders for route in f.routes}
        rules = config.rule_set()
        for line in rules.describe(config.destinations):
            log.info("routing rule %s", line.strip())
        self.classifier = Classifier(self.queue, self.predictor, self.audit, threshold=self.threshold,
                                     batch_size=config.batch_size, batch_wait_ms=config.batch_wait_ms,
                                     pool=PoolSettings(config.decode_pool, config.decode_workers,
                                                       config.decode_timeout_s, config.decode_memory_limit_mb),
                                     on_classified=lambda routes: [by_route[r].wake() for r in routes if r in by_route],
                                     rules=rules)
        self.classifier.max_classify_attempts = config.max_classify_attempts
        for thread in [*self.forwarders, self.classifier]:
            thread.start()
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()
        self.gate = ReceptionGate(config.spool_dir, config.min_free_mb, config.min_free_percent, self.audit)
        self.gate.refresh()  # already below the reserve: say so before the first object arrives
        handler = StoreHandler(self.queue, self.audit, self.classifier.wake, self.gate)
        self.ae, self.server = start_scp(config, handler)
        self.audit.write("started", ae_title=config.ae_title, port=self.port, model_id=self.predictor.model_id,
                         threshold=self.threshold, threshold_setting=config.threshold,
                         temperature=getattr(getattr(self.predictor, "metadata", None), "temperature", 1.0),
                         destinations=config.to_dict()["destinations"],
                         rules=[f"{r.name}: {r.describe()} -> {r.destination}" for r in rules.rules])
        log.info("%s listening on %s:%d; model %s; %d destinations", config.ae_title, config.host, self.port,
                 self.predictor.model_id, len(self.forwarders))

    def wait(self, timeout: float | None = None) -> bool:
        """True once the node has stopped (asked to, or after a worker failed: see ``failure``)."""
        return self._stopped.wait(timeout)

    # --- the watchdog ----------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL_S):
            problem = self.check_workers()
            if problem:
                self._fail(problem)
                return
            if self.gate is not None:
                try:
                    self.gate.refresh()
                except Exception:  # the watchdog must keep watching
                    log.exception("could not check the free space of the spool's filesystem")

    def check_workers(self) -> str | None:
        """What is wrong with the worker threads: one died, or the classifier hangs; None when all is well."""
        for thread in [self.classifier, *self.forwarders]:
            if thread is not None and thread.died:
                return f"worker thread {thread.name} died"
        busy = self.classifier.busy_for() if self.classifier is not None else 0.0
        if busy > (self.stall_s or stall_limit(self.config)):
            return f"worker thread {self.classifier.name} hangs: one classification has run for {busy:.0f} s"
        return None

    def _fail(self, problem: str) -> None:
        """Stop the node so that its supervisor restarts the process (a clean state, the queue recovered)."""
        if self._stopping.is_set():
            return
        self.failure = problem
        log.critical("%s; stopping the router (exit status %d) for its supervisor to restart it", problem,
                     EXIT_WORKER_FAILED)
        self.audit.write("worker_failed", problem=problem, exit_code=EXIT_WORKER_FAILED)
        self.stop()

    def stop(self) -> None:
        """Stop accepting, let work in progress finish, close the queue. Safe to call twice, from any thread."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopping.set()
            try:
                self._stop()
            finally:
                self._stopped.set()

    def _stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            deadline = time.time() + STOP_GRACE_S
            while self.server.active_associations and time.time() < deadline:
                time.sleep(0.1)
            for assoc in self.server.active_associations:
                assoc.abort()
        threads = [t for t in [self.classifier, *self.forwarders] if t is not None]
        for thread in threads:
            thread.stop()
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=STOP_GRACE_S)
        if self.ae is not None:
            self.ae.shutdown()
        if self.audit is not None:
            self.audit.write("stopped", counts=self.queue.counts() if self.queue else {}, failure=self.failure)
            self.audit.close()
        if self.queue is not None:
            self.queue.close()
