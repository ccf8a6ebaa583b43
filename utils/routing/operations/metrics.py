"""Prometheus metrics of the router: ``GET /metrics`` in the Prometheus text format (prometheus-client).

    metrics:                         # in the router's YAML; off without this block
      host: 127.0.0.1                # default (keys and defaults: ROUTER_METRICS_* in utils/constants.py)
      port: 9108

Counters, incremented where the audit log writes the matching event (the hooks are the methods of
:class:`NoMetrics`, which does nothing, so that a router without metrics pays one no-op call):

- ``router_objects_received_total{calling_ae}`` (the Orthanc source: the modality that sent to Orthanc; the
  first 64 distinct titles get a series each, later ones are counted under ``(other)``);
- ``router_receive_refused_total{reason}``: C-STOREs answered 0xA700: ``disk_reserve``, ``store_failed``, ``stopping``;
  STOW-RS instances that failed, by the same reasons and ``not_dicom``, ``sop_class``, ``transfer_syntax``,
  ``study_mismatch``, ``too_large`` (utils/routing/intake/stow.py);
- ``router_objects_classified_total{label, decided_by}``: decided_by ``model``, ``rule:<name>``,
  ``header_unreadable``, ``classification_failed`` or in shadow mode ``shadow:<rule>`` (the model's id is in
  ``router_model_info``);
- ``router_objects_forwarded_total{label, destination, status}``: status ``success``, ``warning`` (a C-STORE
  warning), ``stored`` (a folder), ``retry``, ``failed`` (given up); destination is the node (``AE@host:port``
  or ``folder:<path>``).

Histograms: ``router_classification_seconds`` (per object: how long the classification of its batch took, rules,
decoding and model), ``router_end_to_end_seconds`` (received -> delivery confirmed by the destination).

Gauges, read from the queue when scraped (two indexed SQL queries under the queue's lock, which reception takes
only for its commit): ``router_queue_objects{state}``, ``router_retry_backlog{destination}`` (objects waiting for
another attempt: refused at least once, or everything for a destination that is unreachable now), ``router_reception_paused`` (1 below the
free-space reserve), ``router_model_info{model_id, state}`` = 1 (state ``loading``, ``ready`` or ``failed``), and with a
calibrated model the drift windows (utils/routing/operations/drift.py): ``router_drift_images{window}``,
``router_drift_label_share{window, label}``, ``router_drift_reference_label_share{label}``,
``router_drift_uncertain_share{window}``, ``router_drift_expected_uncertain_share``,
``router_drift_p_value{window, test}`` and ``router_drift_alarm{window, test}``.

Every node has its own ``CollectorRegistry`` (several nodes in one process do not collide) and its own HTTP
server, closed first on stop. prometheus-client is imported only when metrics are configured; configuring
them without it is refused with the pip command.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from utils import constants
from utils.config import ConfigError

log = logging.getLogger(__name__)

PREFIX = "ROUTER_METRICS_"  # the constants of the block's keys (the key is the name without the prefix)
POLL_S = 0.05  # how often the HTTP server looks for a stop request (stop waits at most this long for it)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)  # seconds
STATES = ("received", "classified", "forwarded", "quarantined", "failed")  # utils/routing/queue.py
# A calling AE title is the sender's word: a peer that cycles through titles must not grow /metrics (and the
# memory behind it) without bound. The first this many titles get a series of their own, later ones share OTHER_AE.
MAX_CALLING_AE_LABELS = 64
OTHER_AE = "(other)"  # cannot be an AE title: parentheses are not in the AE title character set


@dataclass(frozen=True)
class MetricsSettings:
    """The ``metrics`` block of the router's configuration, checked."""

    host: str = constants.ROUTER_METRICS_HOST
    port: int = constants.ROUTER_METRICS_PORT

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port}

    def describe(self) -> str:
        return f"Prometheus metrics on http://{self.host}:{self.port}/metrics"


def settings_from(block, where: str) -> MetricsSettings:
    """The validated ``metrics`` block (utils/routing/operations/schema.py) -> settings; ConfigError when
    prometheus-client is missing."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(f"{where}: metrics: metrics need the prometheus-client package (pip install "
                          f"prometheus-client); install it or remove the metrics block")
    return MetricsSettings(host=block.host, port=block.port)


class NoMetrics:
    """The hooks the router calls; this one counts nothing (metrics not configured)."""

    def received(self, calling_ae: str) -> None:
        pass

    def refused(self, reason: str) -> None:
        pass

    def classified(self, label: str, decided_by: str) -> None:
        pass

    def classification(self, seconds: float, objects: int) -> None:
        pass

    def forwarded(self, label: str, destination: str, status: str, received_at: float | None = None) -> None:
        pass


NO_METRICS = NoMetrics()


def decided_by_label(decided_by: str) -> str:
    """``model:<model_id>`` -> ``model`` (the id is router_model_info's label); rules and the rest as they are."""
    return "model" if decided_by.startswith("model:") else decided_by


class RouterMetrics(NoMetrics):
    """The counters and histograms of one node, its scrape-time gauges, and its /metrics server.

    ``queue_gauges()``: (objects per state, objects waiting for a retry per route), read when scraped;
    ``model()``: (model id, state); ``paused()``: reception below the free-space reserve;
    ``node_of``: route -> destination node; ``down(node)``: that destination is unreachable now (everything waiting
    for it counts as retry backlog; otherwise what it refused at least once).
    """

    def __init__(self, settings: MetricsSettings, *, queue_gauges: Callable[[], tuple[dict, dict]],
                 model: Callable[[], tuple[str, str]], paused: Callable[[], bool], node_of: dict[str, str],
                 down: Callable[[str], bool], drift: Callable[[], tuple] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.settings = settings
        self.registry = CollectorRegistry()
        self._queue_gauges, self._model, self._paused = queue_gauges, model, paused
        self._node_of, self._down, self._drift = node_of, down, drift
        self._received = Counter("router_objects_received", "Objects received and spooled",
                                 ["calling_ae"], registry=self.registry)
        self._callers: set[str] = set()  # the calling AE titles with a series of their own (MAX_CALLING_AE_LABELS)
        self._callers_lock = threading.Lock()
        self._refused = Counter("router_receive_refused",
                                "Objects refused: C-STOREs answered 0xA700, STOW-RS instances failed (the sender keeps them)",
                                ["reason"], registry=self.registry)
        self._classified = Counter("router_objects_classified", "Objects classified (decisions recorded)",
                                   ["label", "decided_by"], registry=self.registry)
        self._forwarded = Counter("router_objects_forwarded", "Delivery attempts by outcome",
                                  ["label", "destination", "status"], registry=self.registry)
        self._classify_s = Histogram("router_classification_seconds",
                                     "Per object: seconds its batch took to classify (rules, decoding, model)",
                                     buckets=LATENCY_BUCKETS, registry=self.registry)
        self._end_to_end_s = Histogram("router_end_to_end_seconds",
                                       "Seconds from reception to the destination's confirmation",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_ScrapeTimeGauges(self))
        self.server = None
        self._thread: threading.Thread | None = None

    # --- the hooks ---------------------------------------------------------------------------

    def received(self, calling_ae: str) -> None:
        with self._callers_lock:
            if calling_ae not in self._callers:
                if len(self._callers) < MAX_CALLING_AE_LABELS:
                    self._callers.add(calling_ae)
                else:
                    calling_ae = OTHER_AE
        self._received.labels(calling_ae).inc()

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()

    def classified(self, label: str, decided_by: str) -> None:
        self._classified.labels(label, decided_by_label(decided_by)).inc()

    def classification(self, seconds: float, objects: int) -> None:
        for _ in range(objects):
            self._classify_s.observe(seconds)

    def forwarded(self, label: str, destination: str, status: str, received_at: float | None = None) -> None:
        self._forwarded.labels(label, destination, status).inc()
        if received_at is not None:
            self._end_to_end_s.observe(max(0.0, time.time() - received_at))

    # --- the HTTP server ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port /metrics listens on."""
        return self.server.server_address[1]

    def serve(self) -> None:
        """Listen on the configured address (OSError when the port is taken: the node does not start)."""
        from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET

        self.server = make_server(self.settings.host, self.settings.port, make_wsgi_app(self.registry), Server,
                                  handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": POLL_S},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("%s", MetricsSettings(self.settings.host, self.port).describe())

    def close(self) -> None:
        """Stop listening (at most ``POLL_S`` for the server loop; a scrape in progress is not waited for)."""
        if self.server is None:
            return
        if self._thread is not None and self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        self.server = None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("metrics: " + format, *args)


class _ScrapeTimeGauges:
    """The gauges read when scraped: queue, retry backlog, reception pause, model."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return []  # nothing read at registration (the queue may not be open yet)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        m = self.metrics
        try:
            counts, retrying = m._queue_gauges()
        except Exception as error:  # noqa: BLE001 - a closed or failing database: the counters are still served
            log.warning("metrics: could not read the queue: %s", error)
        else:
            states = GaugeMetricFamily("router_queue_objects", "Objects in the queue by state", labels=["state"])
            for state in sorted({*STATES, *counts}):
                states.add_metric([state], counts.get(state, 0))
            yield states
            backlog = GaugeMetricFamily("router_retry_backlog", "Objects waiting for another delivery attempt",
                                        labels=["destination"])
            per_node = dict.fromkeys(m._node_of.values(), 0)
            for route, (retried, waiting) in retrying.items():
                node = m._node_of.get(route, route)
                per_node[node] = per_node.get(node, 0) + (waiting if m._down(node) else retried)
            for node, n in sorted(per_node.items()):
                backlog.add_metric([node], n)
            yield backlog
        yield GaugeMetricFamily("router_reception_paused", "1 while reception is paused below the free-space "
                                "reserve", value=int(bool(m._paused())))
        model_id, state = m._model()
        info = GaugeMetricFamily("router_model_info", "The model classifying, and its state",
                                 labels=["model_id", "state"])
        info.add_metric([model_id, state], 1)
        yield info
        if m._drift is not None:
            try:
                reference, readings = m._drift()
            except Exception as error:  # noqa: BLE001 - the other metrics are still served
                log.warning("metrics: could not read the drift windows: %s", error)
            else:
                yield from _drift_families(reference, readings)


def _drift_families(reference, readings) -> list:
    """router_drift_* (utils/routing/operations/drift.py): nothing for a model without a reference."""
    from prometheus_client.core import GaugeMetricFamily

    if reference is None:
        return []
    images = GaugeMetricFamily("router_drift_images", "Model decisions in the drift window", labels=["window"])
    shares = GaugeMetricFamily("router_drift_label_share", "Share of each top label in the window",
                               labels=["window", "label"])
    expected = GaugeMetricFamily("router_drift_reference_label_share", "Share of each top label on the model's "
                                 "validation set", labels=["label"])
    uncertain = GaugeMetricFamily("router_drift_uncertain_share", "Share below the threshold in the window",
                                  labels=["window"])
    expected_uncertain = GaugeMetricFamily("router_drift_expected_uncertain_share", "Share of the validation set "
                                           "below the running threshold")
    p_values = GaugeMetricFamily("router_drift_p_value", "p-value of each drift test in the window (small: the "
                                 "images differ from the validation set)", labels=["window", "test"])
    alarms = GaugeMetricFamily("router_drift_alarm", "1 when a drift test is below drift_p_value in a window with "
                               "at least drift_min_images decisions", labels=["window", "test"])
    for name, share in zip(reference.class_names, reference.shares):
        expected.add_metric([name], share)
    for r in readings:
        images.add_metric([r.window], r.n)
        for name in reference.class_names:
            shares.add_metric([r.window, name], r.shares.get(name, 0.0))
        if r.uncertain_share is not None:
            uncertain.add_metric([r.window], r.uncertain_share)
        for test, p in r.p_values.items():
            p_values.add_metric([r.window, test], p)
            alarms.add_metric([r.window, test], int(r.alarms.get(test, False)))
    if readings:
        expected_uncertain.add_metric([], readings[0].expected_uncertain)
    return [images, shares, expected, uncertain, expected_uncertain, p_values, alarms]
