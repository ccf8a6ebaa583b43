"""The router as one object: queue + audit + classifier + forwarders + SCP, started and stopped in order.

    node = RouterNode(load_config("router.yaml"))
    node.start()          # recover the queue, start forwarders, listen; the model loads in the background
    node.model_ready(60)  # (optional) True once the classifier has its model
    node.wait()           # until stop() (router.py calls it on SIGTERM / SIGINT)

Start order: recovery, then the routes checked against the model's *metadata* (read without
loading the model: its classes, id and calibration), the forwarders (they deliver whatever was
classified before), the SCP (C-ECHO and C-STORE work from here: every object is spooled durably
as always), the Orthanc source if one is configured (utils/routing/intake/orthanc_source.py: it stores what
it fetches through the same queue), and last the classifier thread, which loads and warms up the model and then
classifies what has been waiting. Importing TensorFlow and loading a Keras model takes seconds
(more on a busy machine); reception does not wait for it. A .tflite or .onnx model is run without
importing TensorFlow at all where LiteRT (``ai-edge-litert``) resp. ONNX Runtime is installed.

A model that cannot be loaded stops the router like a failed worker, with exit status
``EXIT_MODEL_FAILED`` (2, as for any failed start): the SCP closes, ``model_failed`` is audited
and the state is noted for ``--status``. What was received meanwhile stays in the spool and is
classified after a restart with a loadable model; the router never goes on acknowledging objects
that nothing will classify. Loading that takes longer than ``MODEL_LOAD_LIMIT_S`` counts as
hung (exit status 3).

Stop order is the reverse of start: the SCP stops accepting and closes idle connections at once
(also a TCP connection that never sent anything, and an association between two objects), while
an object being received gets the grace period to be stored and acknowledged
(:func:`utils.routing.intake.scp.close_scp`); then the classifier finishes its batch and forwarders their
current object. Everything not finished stays in the queue.

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
import os
import threading
import time
from collections.abc import Callable

from utils.io.isolation import PoolSettings
from utils.routing.operations.audit import AuditLog
from utils.routing.operations.drift import DriftMonitor
from utils.routing.decision.classifier import BackgroundModel, Classifier, describe
from utils.routing.operations.config import RouterConfig
from utils.routing.delivery.forwarder import enable_raw_sending, remove_partial_copies
from utils.routing.delivery.workers import make_forwarders
from utils.routing.operations.metrics import NO_METRICS, NoMetrics, RouterMetrics
from utils.routing.intake.orthanc_source import OrthancSource
from utils.routing.queue import SpoolQueue
from utils.routing.operations.reconcile import reconcile_audit
from utils.routing.intake.scp import StoreHandler, close_scp, start_scp
from utils.routing.intake.space import ReceptionGate
from utils.routing.intake.stow import StowReceiver, StowServer

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # how long running associations may finish after a stop request
WATCH_INTERVAL_S = 0.5  # how often the watchdog looks at the worker threads
CLASSIFY_STALL_S = 600.0  # one classification running this long (at least) means a hung decoder or model: restart
EXIT_WORKER_FAILED = 3  # router.py's exit status when a worker thread died or hung (1: --check failed, 2: bad setup)
EXIT_MODEL_FAILED = 2  # ... when the model could not be loaded (a failed start, noticed after reception began)
MODEL_LOAD_LIMIT_S = 600.0  # loading + warming up the model for longer than this counts as hung
STATE_KEY = "router_state"  # the queue's meta key where the node notes its state for --status
# What a reload (SIGHUP, the console) applies while running; any other changed setting needs a restart.
RELOADABLE = frozenset({"model", "threshold", "rules", "destinations", "mode", "shadow", "retry_initial_s",
                        "retry_max_s", "max_attempts", "max_classify_attempts", "batch_wait_ms",
                        "drift_min_images", "drift_p_value"})
FORWARDER_SETTINGS = frozenset({"destinations", "retry_initial_s", "retry_max_s", "max_attempts"})


def stall_limit(config: RouterConfig) -> float:
    """How long one classification may run before the classifier counts as hung.

    Longer than any legitimate batch: every object of a full batch running into the decode time
    limit one after the other, twice over, and never under ``CLASSIFY_STALL_S``.
    """
    return max(CLASSIFY_STALL_S, 2 * config.batch_size * config.decode_timeout_s)


class RouterNode:
    stall_s: float | None = None  # None: stall_limit(config)

    def __init__(self, config: RouterConfig, predictor=None,
                 read_config: Callable[[], RouterConfig] | None = None) -> None:
        """``read_config``: reads the configuration again for :meth:`reload` (router.py: the YAML file with the
        command line's overrides); None: the node cannot reload."""
        self.config = config
        self._predictor = predictor  # None: loaded from config.model, in the background, after start()
        self._read_config = read_config
        self._reload_lock = threading.Lock()
        self._by_route: dict = {}  # route -> its forwarder (replaced in place by a reload)
        self._destinations: dict = {}  # route -> Destination as the console shows it (updated in place by a reload)
        self.queue: SpoolQueue | None = None
        self.audit: AuditLog | None = None
        self.classifier: Classifier | None = None
        self.forwarders: list = []
        self.source: OrthancSource | None = None  # pulls from Orthanc's change feed (config.orthanc_source)
        self.gate: ReceptionGate | None = None  # the free-space reserve of the spool's filesystem
        self.metrics: NoMetrics = NO_METRICS  # a RouterMetrics serving /metrics when config.metrics is set
        self.console = None  # a utils.routing.operations.console.Console when config.console is set
        self.stow = None  # a utils.routing.intake.stow.StowServer when config.stow is set (STOW-RS intake)
        self.ae = None
        self.server = None
        self.handler: StoreHandler | None = None
        self.failure: str | None = None  # why the watchdog stopped the node
        self.drift: DriftMonitor | None = None  # the model's decisions of the last hour / day against its validation set
        self._exit_code = 0
        self.threshold: float | None = None  # the threshold classifying with (config's "auto" resolved at start)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def exit_code(self) -> int:
        """0 after a requested stop; EXIT_WORKER_FAILED or EXIT_MODEL_FAILED after the watchdog stopped the node."""
        return self._exit_code if self.failure else 0

    @property
    def predictor(self):
        """The model's predictor once loaded (None before)."""
        return self.classifier.predictor if self.classifier is not None else self._predictor

    def model_ready(self, timeout: float | None = None) -> bool:
        """Wait until the classifier has its model; False after ``timeout`` or when it cannot be loaded."""
        model = self.classifier.model if self.classifier is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        while model is not None and model.error is None and not self._stopped.is_set():
            if model.ready.wait(0.1):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
        return False

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
        model = self._describe_model()
        config.check_routes(model.spec.class_names)
        self.threshold = config.resolve_threshold(model.metadata)  # "auto": the model's calibrated recommendation
        enable_raw_sending()
        self.gate = ReceptionGate(config.spool_dir, config.min_free_mb, config.min_free_percent, self.audit)
        self.drift = DriftMonitor(self.queue.model_decisions,
                                  lambda: (self.classifier.model if self.classifier is not None else model).metadata,
                                  lambda: (self.threshold, self.config.drift_min_images, self.config.drift_p_value))
        if config.metrics is not None:  # listening before anything is accepted: a taken port fails the start
            self.metrics = self._serve_metrics(model)
        self.forwarders = make_forwarders(config, self.queue, self.audit, self.metrics)
        self._index_routes()
        by_route = self._by_route
        rules = config.rule_set()
        for line in rules.describe(config.destinations):
            log.info("routing rule %s", line.strip())
        if config.shadow is not None:
            log.info("shadow mode: the model's decisions are recorded, not followed; %s", config.shadow.describe())
        keeper = None
        if config.console is not None:  # the console shows thumbnails and review copies the classifier keeps
            from utils.routing.operations.review import Keeper

            keeper = Keeper(config.spool_dir, review_days=config.console.review_days,
                            review_max_mb=config.console.review_max_mb)
            keeper.prune()
        self.classifier = Classifier(self.queue, model, self.audit, threshold=self.threshold,
                                     batch_size=config.batch_size, batch_wait_ms=config.batch_wait_ms,
                                     pool=PoolSettings(config.decode_pool, config.decode_workers,
                                                       config.decode_timeout_s, config.decode_memory_limit_mb,
                                                       config.decode_threads),
                                     on_classified=lambda routes: [by_route[r].wake() for r in routes if r in by_route],
                                     rules=rules, shadow=config.shadow,  # shadow: the site's rule forwards
                                     max_classify_attempts=config.max_classify_attempts, metrics=self.metrics,
                                     keeper=keeper)
        self.handler = StoreHandler(self.queue, self.audit, self.classifier.wake, self.gate, self.metrics)
        if config.console is not None:  # listening before anything is accepted: a taken port fails the start
            self.console = self._serve_console(model, by_route)
        for thread in self.forwarders:
            thread.start()
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()
        self.gate.refresh()  # already below the reserve: say so before the first object arrives
        self.ae, self.server = start_scp(config, self.handler)
        if config.stow is not None:  # a second port into the same store as the SCP (POST /studies)
            receiver = StowReceiver(self.queue, self.audit, self.classifier.wake, self.gate, self.metrics)
            self.stow = StowServer(config.stow, self.queue, receiver).serve()
        if config.orthanc_source is not None:  # a second way in, through the same queue as the SCP
            self.source = OrthancSource(config.orthanc_source, self.queue, self.audit, own_ae_title=config.ae_title,
                                        on_received=self.classifier.wake, gate=self.gate,
                                        retry_initial_s=config.retry_initial_s, retry_max_s=config.retry_max_s,
                                        metrics=self.metrics)
            self.source.start()
        self.audit.write("started", ae_title=config.ae_title, port=self.port, model_id=model.model_id,
                         model_state="ready" if model.ready.is_set() else "loading",
                         threshold=self.threshold, threshold_setting=config.threshold,
                         temperature=getattr(model.metadata, "temperature", 1.0),
                         destinations=config.to_dict()["destinations"],
                         rules=[f"{r.name}: {r.describe()} -> {r.destination}" for r in rules.rules],
                         orthanc_source=config.to_dict()["orthanc_source"], metrics=config.to_dict()["metrics"],
                         console=config.to_dict()["console"], stow=config.to_dict()["stow"],
                         **({"mode": config.mode, "shadow": config.shadow.to_dict(),
                             "class_names": list(model.spec.class_names)} if config.shadow else {}))
        self._note_state("loading the model", model_id=model.model_id)
        log.info("%s listening on %s:%d; model %s loading in the background; %d destinations", config.ae_title,
                 config.host, self.port, model.model_id, len(self.forwarders))
        self.classifier.start()  # loads and warms up the model, then classifies what has arrived

    def _serve_metrics(self, model: BackgroundModel):
        """/metrics for this node (utils/routing/operations/metrics.py): its own registry, gauges read from the queue."""
        def model_state() -> tuple[str, str]:
            now = self.classifier.model if self.classifier is not None else model  # a reload replaces it
            state = "failed" if now.error is not None else "ready" if now.ready.is_set() else "loading"
            return now.model_id, state

        def down(node: str) -> bool:  # the forwarders of now (a reload replaces them)
            return any(f.destination.node == node and f.down_since is not None for f in self.forwarders)

        metrics = RouterMetrics(self.config.metrics, queue_gauges=self.queue.gauges, model=model_state,
                                paused=lambda: self.gate.paused,
                                node_of={route: d.node for route, d in self.config.destinations.items()},
                                down=down, drift=self.drift.readings)
        metrics.serve()
        return metrics

    def _serve_console(self, model: BackgroundModel, by_route: dict):
        """The web console (utils/routing/operations/console.py): the classifier keeps thumbnails and review copies for it."""
        from utils.routing.operations.console import Console, ConsoleContext
        from utils.routing.operations.review import ReviewDesk

        settings, spool = self.config.console, self.config.spool_dir

        def wake(route: str) -> None:  # "" = the classifier (a requeued object is classified again)
            worker = by_route.get(route) if route else self.classifier
            if worker is not None:
                worker.wake()

        def model_state() -> tuple[str, str]:
            now = self.classifier.model if self.classifier is not None else model  # a reload replaces it
            return now.model_id, "failed" if now.error is not None else "ready" if now.ready.is_set() else "loading"

        shadow = self.config.shadow is not None
        self._destinations.update(self.config.destinations)  # the console's view; a reload updates it in place
        desk = ReviewDesk(self.queue, self.audit, model.spec.class_names, self._destinations, spool / "review",
                          settings.corrections_dir, wake, forward=not shadow)

        def shadow_report(since: str | None, until: str | None) -> str:
            from utils.routing.decision.shadow import build_report

            return build_report(self.config, since, until, class_names=list(model.spec.class_names)).to_html()

        console = Console(settings, ConsoleContext(spool, model.spec.class_names, self._destinations, desk,
                                                   self.forwarders, model_state, title=self.config.ae_title,
                                                   shadow_report=shadow_report if shadow else None,
                                                   reload=self.reload if self._read_config is not None else None,
                                                   drift=self.drift.readings))
        console.serve()
        return console

    def _describe_model(self, path: str | None = None) -> BackgroundModel:
        """The model as its metadata describes it, to be loaded by the classifier thread; a predictor
        given to the node is used as it is (unless ``path`` names the model to describe: a reload)."""
        from utils.infer.predictor import load_predictor, read_metadata

        batch_size = self.config.batch_size
        if self._predictor is not None and path is None:
            return BackgroundModel.of(self._predictor, batch_size)
        path = path or self.config.model
        try:
            metadata = read_metadata(path)  # the standard library only: no model runtime imported yet
        except ValueError:
            if not str(path).endswith(".onnx"):
                raise
            # a .onnx file without its sidecar carries its metadata inside: load it now (ONNX Runtime, fast)
            return BackgroundModel.of(load_predictor(path), batch_size)
        return BackgroundModel(metadata, lambda: load_predictor(path), batch_size)

    def _note_state(self, state: str, **fields) -> None:
        """Note what the router is doing in the queue (``--status`` shows it); best effort."""
        import json

        try:
            self.queue.set_meta(STATE_KEY, json.dumps({"state": state, "time": time.time(), "pid": os.getpid(),
                                                       **fields}))
        except Exception as error:  # noqa: BLE001 - a full disk must not stop the node; the log and audit say it
            log.warning("could not note the router's state in the queue: %s", error)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the node has stopped (asked to, or after a worker failed: see ``failure``)."""
        return self._stopped.wait(timeout)

    # --- reload (SIGHUP, or the console) ----------------------------------------------------

    def reload(self, source: str = "SIGHUP") -> dict:
        """Read the configuration again and apply it without stopping reception.

        The audit log is reopened first (logrotate's ``postrotate`` sends SIGHUP). Rules, destinations, threshold,
        shadow settings, retries and the model take effect between batches: associations in progress go on, nothing
        received is lost or classified twice (the batch being classified finishes with the old settings; forwarders
        finish their current object before the new ones start). A configuration that does not validate, a model
        that does not load or whose classes the destinations do not cover, or a destination removed while objects
        still wait for it, is refused with its reason and everything running stays as it was. Settings that only a
        restart changes (the port, TLS, the spool...) are reported as ``restart_needed`` and left as they run.
        Returns what happened (also audited as ``reloaded`` or ``reload_refused``)."""
        with self._reload_lock:
            if self._stopping.is_set() or self.classifier is None:
                return {"reloaded": False, "problem": "the router is not running"}
            try:
                reopened = self.audit.reopen()
            except OSError as error:
                log.error("could not reopen the audit log %s: %s", self.config.audit_log, error)
                reopened = False
            try:
                result = self._reload(source)
            except Exception as error:  # noqa: BLE001 - whatever it is, the running configuration stays
                problem = describe(error, limit=2000)
                log.error("reload (%s) refused, the running configuration and model stay: %s", source, problem)
                self._audit("reload_refused", source=source, problem=problem)
                return {"reloaded": False, "problem": problem, "audit_reopened": reopened}
            result["audit_reopened"] = reopened
            return result

    def _reload(self, source: str) -> dict:
        import dataclasses

        from utils.infer.predictor import read_metadata

        if self._read_config is None:
            raise ValueError("this router was started without a configuration file to read again")
        old, new = self.config, self._read_config()
        changed = [f.name for f in dataclasses.fields(RouterConfig) if getattr(new, f.name) != getattr(old, f.name)]
        restart = [key for key in changed if key not in RELOADABLE]
        current = self.classifier.model
        try:
            new_id = read_metadata(new.model).model_id
        except (OSError, ValueError):
            new_id = None  # a .onnx without its sidecar: compared by path only
        model = current
        if new.model != old.model or (new_id is not None and new_id != current.model_id):
            if not current.ready.is_set():
                raise ValueError("the running model is still loading; reload once it is ready")
            model = self._describe_model(new.model)
            log.info("reload: loading the model %s from %s (classification goes on with %s meanwhile)",
                     model.model_id, new.model, current.model_id)
            model.load()  # raises: refused, the running model stays
        new.check_routes(model.spec.class_names)
        threshold = new.resolve_threshold(model.metadata)
        rules = new.rule_set()
        _, waiting = self.queue.gauges()
        orphaned = {route: n for route, (_, n) in waiting.items() if n and route not in new.destinations}
        if orphaned:
            raise ValueError(f"objects still wait for destinations the new configuration removes: {orphaned}; "
                             f"keep them until they are delivered (router.py --status shows the backlog)")
        applied = [key for key in changed if key in RELOADABLE]
        running = dataclasses.replace(new, **{key: getattr(old, key) for key in restart})  # what a restart changes
        if set(applied) & FORWARDER_SETTINGS:
            self._replace_forwarders(running)
        self.classifier.reconfigure(model=model, threshold=threshold, rules=rules, shadow=running.shadow,
                                    max_classify_attempts=running.max_classify_attempts,
                                    batch_wait_ms=running.batch_wait_ms)
        self.config, self.threshold = running, threshold
        if self._destinations:
            self._destinations.clear()
            self._destinations.update(running.destinations)
        if model is not current and "model" not in applied:
            applied.append("model")  # the same path, a new model in it
        for line in rules.describe(running.destinations):
            log.info("routing rule %s", line.strip())
        log.info("reloaded (%s): %s; model %s, threshold %s%s", source, ", ".join(applied) or "nothing changed",
                 model.model_id, threshold, f"; needs a restart, not applied: {', '.join(restart)}" if restart else "")
        result = {"reloaded": True, "source": source, "changed": applied, "restart_needed": restart,
                  "model_id": model.model_id, "threshold": threshold}
        self._audit("reloaded", **{k: v for k, v in result.items() if k != "reloaded"},
                    destinations=running.to_dict()["destinations"] if "destinations" in applied else None,
                    rules=[f"{r.name}: {r.describe()} -> {r.destination}" for r in rules.rules]
                    if "rules" in applied else None)
        self._note_state("running", model_id=model.model_id)
        return result

    def _index_routes(self) -> None:
        """route -> the forwarder that delivers it, rebuilt in place (the classifier holds the dict)."""
        self._by_route.clear()
        self._by_route.update({route: f for f in self.forwarders for route in f.routes})

    def _replace_forwarders(self, config: RouterConfig) -> None:
        """Stop the forwarders (each finishes the object it is sending), then start those of ``config``: one
        object is never sent by two at once."""
        old = list(self.forwarders)
        for thread in old:
            thread.stop()
        for thread in old:
            thread.join()
        new = make_forwarders(config, self.queue, self.audit, self.metrics)
        self.forwarders[:] = new
        self._index_routes()
        for thread in new:
            thread.start()

    def _audit(self, event: str, **fields) -> None:
        try:
            self.audit.write(event, **{k: v for k, v in fields.items() if v is not None})
        except Exception:  # noqa: BLE001 - a full disk must not turn a reload into a crash
            log.exception("could not write the audit log")

    # --- the watchdog ----------------------------------------------------------------------

    def _watch(self) -> None:
        noted_ready = False
        while not self._stopping.wait(WATCH_INTERVAL_S):
            problem = self.check_model()
            if problem:
                self._fail(problem, EXIT_MODEL_FAILED, "model_failed")
                return
            problem = self.check_workers()
            if problem:
                self._fail(problem)
                return
            if not noted_ready and self.classifier is not None and self.classifier.model.ready.is_set():
                noted_ready = True
                self._note_state("running", model_id=self.classifier.model.model_id)
            if self.gate is not None:
                try:
                    self.gate.refresh()
                except Exception:  # the watchdog must keep watching
                    log.exception("could not check the free space of the spool's filesystem")

    def check_model(self) -> str | None:
        """Why the model will never be ready (it could not be loaded); None while it loads or once it is ready."""
        model = self.classifier.model if self.classifier is not None else None
        if model is not None and model.error is not None:
            return f"the model {self.config.model or model.model_id} could not be loaded: {describe(model.error)}"
        return None

    def check_workers(self) -> str | None:
        """What is wrong with the worker threads: one died, or the classifier hangs; None when all is well."""
        for thread in [self.classifier, *self.forwarders, self.source]:
            if thread is not None and thread.died:
                return f"worker thread {thread.name} died"
        loading = self.classifier.model.loading_for() if self.classifier is not None else 0.0
        if loading > MODEL_LOAD_LIMIT_S:
            return f"worker thread {self.classifier.name} hangs: loading the model has taken {loading:.0f} s"
        busy = self.classifier.busy_for() if self.classifier is not None else 0.0
        if busy > (self.stall_s or stall_limit(self.config)):
            return f"worker thread {self.classifier.name} hangs: one classification has run for {busy:.0f} s"
        return None

    def _fail(self, problem: str, exit_code: int = EXIT_WORKER_FAILED, event: str = "worker_failed") -> None:
        """Stop the node so that its supervisor restarts the process (a clean state, the queue recovered)."""
        if self._stopping.is_set():
            return
        self.failure, self._exit_code = problem, exit_code
        log.critical("%s; stopping the router (exit status %d) for its supervisor to restart it", problem, exit_code)
        try:
            self.audit.write(event, problem=problem, exit_code=exit_code)
        except Exception:  # the audit log failing (disk full) must not keep the router running
            log.exception("could not write the audit log")
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
        if isinstance(self.metrics, RouterMetrics):
            self.metrics.close()  # first and at once: nothing scrapes a queue being closed
        if self.console is not None:
            self.console.close()  # nothing acts on a queue being closed
        if self.stow is not None:
            self.stow.close()  # uploads in progress finish (or fail with A700); nothing half-stored is acknowledged
        if self.server is not None:
            close_scp(self.server, self.handler, STOP_GRACE_S)
        threads = [t for t in [self.source, self.classifier, *self.forwarders] if t is not None]
        for thread in threads:
            thread.stop()
        if self.classifier is not None and self.classifier.model.loading_for():
            # Loading the model touches neither queue nor audit log, and cannot be cut short: not waited for.
            log.info("stopping while the model is being loaded")
            threads.remove(self.classifier)
        for thread in threads:
            if thread.is_alive():
                thread.join(timeout=STOP_GRACE_S)
        if self.ae is not None:
            self.ae.shutdown()
        if self.queue is not None and self.server is not None:
            self._note_state("stopped", failure=self.failure, exit_code=self.exit_code)
        if self.audit is not None:
            self.audit.write("stopped", counts=self.queue.counts() if self.queue else {}, failure=self.failure)
            self.audit.close()
        if self.queue is not None:
            self.queue.close()
