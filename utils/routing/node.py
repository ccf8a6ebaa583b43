"""The router as one object: queue + audit + classifier + forwarders + SCP, started and stopped in order.

    node = RouterNode(load_config("router.yaml"))
    node.start()          # recover the queue, load the model, start threads, listen
    node.wait()           # until stop() (router.py calls it on SIGTERM / SIGINT)

Start order puts consumers before producers: recovery, then model and forwarders and classifier,
and the SCP last, so nothing is accepted before it can be processed. Stop order is the reverse:
the SCP stops accepting (running associations get a grace period), then the classifier finishes
its batch and forwarders their current object. Everything not finished stays in the queue.
"""

from __future__ import annotations

import logging
import threading
import time

from utils.routing.audit import AuditLog
from utils.routing.classifier import Classifier, warm_up
from utils.routing.config import RouterConfig
from utils.routing.forwarder import enable_raw_sending, make_forwarders
from utils.routing.queue import SpoolQueue
from utils.routing.scp import StoreHandler, start_scp

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # how long running associations may finish after a stop request


class RouterNode:
    def __init__(self, config: RouterConfig, predictor=None) -> None:
        self.config = config
        self.predictor = predictor  # None: loaded from config.model at start()
        self.queue: SpoolQueue | None = None
        self.audit: AuditLog | None = None
        self.classifier: Classifier | None = None
        self.forwarders: list = []
        self.ae = None
        self.server = None
        self._stopped = threading.Event()

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
        self.audit.write("recovered", **report)
        log.info("spool %s: %s", config.spool_dir, report)
        if self.predictor is None:
            from utils.predictor import load_predictor

            self.predictor = load_predictor(config.model)
        spec = self.predictor.spec
        config.check_routes(spec.class_names)
        started = time.perf_counter()
        shapes = warm_up(self.predictor, config.batch_size)  # the first call per batch shape is slow
        log.info("model warmed up for batches of %s in %.1f s", shapes, time.perf_counter() - started)
        enable_raw_sending()
        self.forwarders = make_forwarders(config, self.queue, self.audit)
        by_route = {route: f for f in self.forwarders for route in f.routes}
        self.classifier = Classifier(self.queue, self.predictor, self.audit, threshold=config.threshold,
                                     batch_size=config.batch_size, batch_wait_ms=config.batch_wait_ms,
                                     workers=config.decode_workers,
                                     on_classified=lambda routes: [by_route[r].wake() for r in routes if r in by_route])
        for thread in [*self.forwarders, self.classifier]:
            thread.start()
        handler = StoreHandler(self.queue, self.audit, self.classifier.wake)
        self.ae, self.server = start_scp(config, handler)
        self.audit.write("started", ae_title=config.ae_title, port=self.port, model_id=self.predictor.model_id,
                         threshold=config.threshold, destinations=config.to_dict()["destinations"])
        log.info("%s listening on %s:%d; model %s; %d destinations", config.ae_title, config.host, self.port,
                 self.predictor.model_id, len(self.forwarders))

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def stop(self) -> None:
        """Stop accepting, let work in progress finish, close the queue. Safe to call twice."""
        if self._stopped.is_set():
            return
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
            self.audit.write("stopped", counts=self.queue.counts() if self.queue else {})
            self.audit.close()
        if self.queue is not None:
            self.queue.close()
        self._stopped.set()
