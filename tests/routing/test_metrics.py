"""Prometheus /metrics (utils/routing/operations/metrics.py): a node with metrics receives objects through its SCP, then
/metrics is scraped over HTTP and compared with what was sent, the queue and the audit log; the config block is
checked; metrics off opens no port; stop closes it."""

from __future__ import annotations

import urllib.request

import pytest

from utils.config import ConfigError
from utils.routing.operations import metrics as m
from utils.routing import queue as q
from utils.routing.operations.audit import read_audit
from utils.routing.operations.config import from_dict

from .conftest import CLASSES, free_port, listening, send, wait_for

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

TIMEOUT = 60


def scrape(port: int) -> dict[str, list]:
    """name -> samples [(sample name, labels, value)] of every family."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {f.name: [(s.name, s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def values(families: dict, family: str, sample: str | None = None) -> dict[tuple, float]:
    """{sorted label items: value} of one family's samples named ``sample`` (default: the family's own)."""
    return {tuple(sorted(labels.items())): value for name, labels, value in families.get(family, [])
            if name == (sample or family)}


def test_counts_gauges_and_histograms_match_what_was_sent(router, peers, samples, tmp_path):
    good, refusing = peers("GOOD"), peers("REFUSING", status=0xA700)
    port = free_port()
    node = router({**{c: good.node() for c in CLASSES if c != "others"}, "others": refusing.node(),
                   "uncertain": good.node()}, metrics={"port": port}, max_attempts=2)
    assert node.metrics.port == port and listening(port)
    statuses = send(node.port, [s.path for s in samples.values()], calling="MODALITY_A")
    assert statuses == [0] * len(samples)
    others = [s for s in samples.values() if s.label == "others"]
    wait_for(lambda: node.queue.counts().get(q.FAILED, 0) == len(others)
             and sum(node.queue.counts().values()) == node.queue.counts().get(q.FAILED, 0)
             + node.queue.counts().get(q.FORWARDED, 0) + node.queue.counts().get(q.QUARANTINED, 0),
             TIMEOUT, "every object to be delivered, quarantined or failed")

    families = scrape(port)
    assert values(families, "router_objects_received", "router_objects_received_total") == {
        (("calling_ae", "MODALITY_A"),): len(samples)}
    audit = read_audit(node.config.audit_log)
    classified = {}
    for record in (r for r in audit if r["event"] == "classified"):
        key = (("decided_by", m.decided_by_label(record["decided_by"])), ("label", record["label"]))
        classified[key] = classified.get(key, 0) + 1
    assert values(families, "router_objects_classified", "router_objects_classified_total") == classified
    expected_by_label = {}
    for s in samples.values():
        expected_by_label[s.label] = expected_by_label.get(s.label, 0) + 1
    by_label = {}
    for (_, label), n in values(families, "router_objects_classified", "router_objects_classified_total").items():
        by_label[label[1]] = by_label.get(label[1], 0) + n
    assert by_label == expected_by_label  # what the model / rules decided for what was sent
    assert any(k[0] == ("decided_by", "model") for k in classified)

    good_node, refusing_node = f"GOOD@127.0.0.1:{good.port}", f"REFUSING@127.0.0.1:{refusing.port}"
    quarantine = node.config.destinations["unreadable"].node
    forwarded = values(families, "router_objects_forwarded", "router_objects_forwarded_total")
    expected = {}
    for s in samples.values():
        if s.label == "others":
            for status in ("retry", "failed"):  # max_attempts 2: one retry, then given up
                expected[(("destination", refusing_node), ("label", "others"), ("status", status))] = len(others)
            continue
        dest, status = (quarantine, "stored") if s.label == "unreadable" else (good_node, "success")
        key = (("destination", dest), ("label", s.label), ("status", status))
        expected[key] = expected.get(key, 0) + 1
    assert forwarded == expected
    assert set(good.received) == {u for u, s in samples.items() if s.label not in ("others", "unreadable")}

    counts = node.queue.counts()
    assert values(families, "router_queue_objects") == {
        (("state", state),): counts.get(state, 0) for state in m.STATES}
    backlog = values(families, "router_retry_backlog")
    assert backlog[(("destination", refusing_node),)] == 0  # failed: no more attempts
    assert backlog[(("destination", good_node),)] == 0
    delivered = len(samples) - len(others)
    assert values(families, "router_end_to_end_seconds", "router_end_to_end_seconds_count") == {(): delivered}
    assert values(families, "router_classification_seconds", "router_classification_seconds_count") == {
        (): len(samples)}
    assert values(families, "router_classification_seconds", "router_classification_seconds_sum")[()] > 0
    model_id = node.classifier.model.model_id
    assert values(families, "router_model_info") == {(("model_id", model_id), ("state", "ready")): 1}
    assert values(families, "router_reception_paused") == {(): 0}

    node.stop()
    assert not listening(port)  # stop closes /metrics


def test_retry_backlog_and_queue_while_a_destination_refuses(router, peers, samples):
    good, refusing = peers("GOOD"), peers("REFUSING", status=0xA700)
    port = free_port()
    node = router({**{c: good.node() for c in CLASSES if c != "others"}, "others": refusing.node(),
                   "uncertain": good.node()}, metrics={"port": port}, retry_initial_s=600.0, retry_max_s=600.0)
    others = [s.path for s in samples.values() if s.label == "others"]
    send(node.port, others)
    wait_for(lambda: refusing.calls >= len(others), TIMEOUT, "the destination to refuse every object")
    families = scrape(port)
    refusing_node = f"REFUSING@127.0.0.1:{refusing.port}"
    assert values(families, "router_retry_backlog")[(("destination", refusing_node),)] == len(others)
    assert values(families, "router_queue_objects")[(("state", q.CLASSIFIED),)] == len(others)
    assert values(families, "router_objects_forwarded", "router_objects_forwarded_total") == {
        (("destination", refusing_node), ("label", "others"), ("status", "retry")): len(others)}
    assert values(families, "router_end_to_end_seconds", "router_end_to_end_seconds_count") == {(): 0}


def test_metrics_off_opens_no_port_and_imports_nothing(router, peers):
    good = peers("GOOD")
    port = free_port()
    node = router({**{c: good.node() for c in CLASSES}, "uncertain": good.node()})
    assert node.config.metrics is None and node.metrics is m.NO_METRICS
    assert not listening(port) and not listening(m.constants.ROUTER_METRICS_PORT)


def test_a_taken_port_fails_the_start(router, peers):
    import socket

    good = peers("GOOD")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            router({**{c: good.node() for c in CLASSES}, "uncertain": good.node()},
                   metrics={"port": taken.getsockname()[1]})


def base(tmp_path) -> dict:
    return {"model": "m.keras", "destinations": {"a": {"folder": "a"}}, "spool_dir": str(tmp_path)}


def test_metrics_block_is_checked(tmp_path, monkeypatch):
    assert from_dict(base(tmp_path), base=tmp_path).metrics is None
    config = from_dict({**base(tmp_path), "metrics": {}}, base=tmp_path)
    assert config.metrics == m.MetricsSettings("127.0.0.1", 9108)  # local unless configured
    assert config.to_dict()["metrics"] == {"host": "127.0.0.1", "port": 9108}
    assert from_dict({**base(tmp_path), "metrics": {"host": "0.0.0.0", "port": 9200}},
                     base=tmp_path).metrics == m.MetricsSettings("0.0.0.0", 9200)
    for bad, words in [({"port": 0}, "metrics.port"), ({"port": "x"}, "metrics.port: expected int"),
                       ({"prot": 1}, "unknown key 'prot'"), ({"host": ""}, "metrics.host"), ([], "metrics: expected dict"),
                       ({"port": True}, "expected int")]:
        with pytest.raises(ConfigError, match=words):
            from_dict({**base(tmp_path), "metrics": bad}, base=tmp_path)
    monkeypatch.setattr(m.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install prometheus-client"):
        from_dict({**base(tmp_path), "metrics": {}}, base=tmp_path)
    assert from_dict(base(tmp_path), base=tmp_path).metrics is None  # without the block, nothing is needed


def test_a_peer_cycling_through_calling_ae_titles_cannot_grow_the_metrics(monkeypatch):
    monkeypatch.setattr(m, "MAX_CALLING_AE_LABELS", 3)
    metrics = m.RouterMetrics(m.MetricsSettings(), queue_gauges=lambda: ({}, {}), model=lambda: ("m", "ready"),
                              paused=lambda: False, node_of={}, down=lambda node: False)
    for title in ["A", "B", "A", "C", "D", "E", "B", "F"]:
        metrics.received(title)
    from prometheus_client import generate_latest

    families = {f.name: [(s.name, s.labels, s.value) for s in f.samples]
                for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    count = values(families, "router_objects_received", "router_objects_received_total")
    assert count == {(("calling_ae", "A"),): 2, (("calling_ae", "B"),): 2, (("calling_ae", "C"),): 1,
                     (("calling_ae", m.OTHER_AE),): 3}  # the first three titles, then one shared series
