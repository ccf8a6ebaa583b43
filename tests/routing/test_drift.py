"""Drift (utils/routing/operations/drift.py): the model's decisions of the last hour and day against the validation
distribution its file carries; the tests' alarms, the windows read from the queue, /metrics and the console."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from utils.evaluate.calibration import reference_entry
from utils.routing import queue as q
from utils.routing.operations.drift import DriftMonitor, Reference, read_window

CLASSES = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")
SHARES = np.array([0.15, 0.35, 0.2, 0.2, 0.1])


def validation_probs(n: int, rng, *, shares=SHARES, confidence=(0.85, 1.0)) -> np.ndarray:
    """n probability vectors whose top labels follow ``shares`` and whose top probability is uniform in
    ``confidence``."""
    top = rng.choice(len(CLASSES), size=n, p=np.asarray(shares) / np.sum(shares))
    conf = rng.uniform(*confidence, size=n)
    probs = np.tile(((1 - conf) / (len(CLASSES) - 1))[:, None], (1, len(CLASSES)))
    probs[np.arange(n), top] = conf
    return probs


def metadata(probs: np.ndarray, ood_flagged: float | None = 0.01):
    return SimpleNamespace(calibration={"reference": reference_entry(probs)},
                           spec=SimpleNamespace(class_names=CLASSES),
                           ood={"val_flagged": ood_flagged} if ood_flagged is not None else None)


@pytest.fixture
def reference():
    return Reference.of(metadata(validation_probs(400, np.random.default_rng(0))))


def decisions(probs: np.ndarray, ood: int = 0) -> list[tuple[np.ndarray, str]]:
    return [(p, "out_of_distribution" if i < ood else "") for i, p in enumerate(probs)]


def test_the_reference_is_the_validation_set_as_served(reference):
    entry = reference_entry(validation_probs(400, np.random.default_rng(0)))
    assert entry["n_images"] == 400 and abs(sum(entry["top_label_shares"]) - 1) < 1e-6
    assert len(entry["confidence_quantiles"]) == 21 and entry["confidence_quantiles"] == sorted(entry["confidence_quantiles"])
    assert reference.class_names == CLASSES and reference.ood_flagged == 0.01
    assert reference.expected_below(0.85) == pytest.approx(0.0, abs=0.01)
    assert reference.expected_below(0.925) == pytest.approx(0.5, abs=0.08)
    assert Reference.of(SimpleNamespace(calibration={"temperature": 1.2}, spec=None, ood=None)) is None  # older model
    assert Reference.of(SimpleNamespace(calibration=None, spec=None, ood=None)) is None


def test_images_like_the_validation_set_raise_no_alarm(reference):
    rng = np.random.default_rng(1)
    reading = read_window(reference, decisions(validation_probs(300, rng), ood=3), 0.9, window="1h", min_images=50,
                          p_value=0.001)
    assert reading.enough and reading.n == 300
    assert set(reading.p_values) == {"label_mix", "confidence", "uncertain", "out_of_distribution"}
    assert not any(reading.alarms.values()), reading.p_values
    assert reading.uncertain_share == pytest.approx(reading.expected_uncertain, abs=0.1)


@pytest.mark.parametrize("change, alarmed", [
    ({"shares": [0.6, 0.1, 0.1, 0.1, 0.1]}, {"label_mix"}),  # another department sends abdomens
    ({"confidence": (0.5, 0.9)}, {"confidence", "uncertain"}),  # a new detector: the model is unsure
    ({"ood": 30}, {"out_of_distribution"}),  # 10 % flagged against 1 % on the validation set
])
def test_a_changed_stream_raises_the_alarm_of_what_changed(reference, change, alarmed):
    rng = np.random.default_rng(2)
    ood = change.pop("ood", 0)
    probs = validation_probs(300, rng, **change)
    reading = read_window(reference, decisions(probs, ood=ood), 0.9, window="24h", min_images=50, p_value=0.001)
    assert {test for test, on in reading.alarms.items() if on} == alarmed, reading.p_values


def test_a_window_with_too_few_decisions_claims_nothing(reference):
    probs = validation_probs(20, np.random.default_rng(3), shares=[1, 0, 0, 0, 0], confidence=(0.3, 0.5))
    reading = read_window(reference, decisions(probs), 0.9, window="1h", min_images=50, p_value=0.001)
    assert not reading.enough and not any(reading.alarms.values())
    assert reading.p_values["label_mix"] < 0.001  # the evidence is shown, the alarm waits for enough images
    empty = read_window(reference, [], 0.9, window="1h", min_images=50, p_value=0.001)
    assert empty.n == 0 and empty.alarms == {} and empty.uncertain_share is None


def test_the_monitor_reads_its_windows_from_the_queue(tmp_path):
    """The windows come from the queue rows (they survive a restart); rows of another model's classes, of rules and
    older than a day are left out; a reading is cached."""
    rng = np.random.default_rng(4)
    queue = q.SpoolQueue(tmp_path)
    probs = validation_probs(120, rng)
    items = [queue.store(b"DICM" + bytes([i % 256, i // 256]), sop_instance_uid=f"1.2.{i}", sop_class_uid="1.2",
                         transfer_syntax="1.2.840.10008.1.2.1")[0] for i in range(123)]
    queue.start_classification(items)
    classified = [q.Classification(item.id, "x", float(p.max()), "m", "x", "", "model:m",
                                   json.dumps(dict(zip(CLASSES, map(float, p)))))
                  for item, p in zip(items, probs)]
    classified.append(q.Classification(items[120].id, "pass_through", None, "", "pass_through", "", "rule:ct"))
    classified.append(q.Classification(items[121].id, "x", 0.9, "old", "x", "", "model:old",
                                       json.dumps({"chest": 0.9, "other": 0.1})))
    classified.append(q.Classification(items[122].id, "x", 0.9, "m", "x", "out_of_distribution", "model:m",
                                       json.dumps(dict(zip(CLASSES, [0.9, 0.025, 0.025, 0.025, 0.025])))))
    queue.set_classified(classified)
    now = [time.time()]
    reads = []

    def model_decisions(since):
        reads.append(since)
        return queue.model_decisions(since)

    monitor = DriftMonitor(model_decisions, lambda: metadata(validation_probs(400, np.random.default_rng(0))),
                           lambda: (0.9, 50, 0.001), clock=lambda: now[0])
    reference, readings = monitor.readings()
    assert [r.window for r in readings] == ["1h", "24h"] and [r.n for r in readings] == [121, 121]
    assert readings[0].ood_share == pytest.approx(1 / 121)
    assert not any(readings[1].alarms.values()), readings[1].p_values
    monitor.readings()
    assert len(reads) == 1  # cached
    now[0] += 2 * 86400  # two days later: both windows are empty
    assert [r.n for r in monitor.readings()[1]] == [0, 0] and len(reads) == 2
    assert DriftMonitor(model_decisions, lambda: SimpleNamespace(calibration=None), lambda: (0.9, 50, 0.001)
                        ).readings() == (None, [])
    queue.close()


def test_drift_gauges_are_served_and_the_console_shows_the_windows(tmp_path):
    from prometheus_client import generate_latest
    from starlette.testclient import TestClient

    from utils.routing.operations.console import ConsoleContext, ConsoleSettings, build_app
    from utils.routing.operations.metrics import MetricsSettings, RouterMetrics

    rng = np.random.default_rng(5)
    reference = Reference.of(metadata(validation_probs(400, np.random.default_rng(0))))
    shifted = read_window(reference, decisions(validation_probs(300, rng, shares=[0.6, 0.1, 0.1, 0.1, 0.1])), 0.9,
                          window="1h", min_images=50, p_value=0.001)
    metrics = RouterMetrics(MetricsSettings(port=0), queue_gauges=lambda: ({}, {}), model=lambda: ("m", "ready"),
                            paused=lambda: False, node_of={}, down=lambda node: False,
                            drift=lambda: (reference, [shifted]))
    text = generate_latest(metrics.registry).decode()
    assert 'router_drift_alarm{test="label_mix",window="1h"} 1.0' in text
    assert 'router_drift_alarm{test="confidence",window="1h"} 0.0' in text
    assert 'router_drift_images{window="1h"} 300.0' in text
    assert 'router_drift_reference_label_share{label="adult_chest"}' in text
    assert "router_drift_expected_uncertain_share" in text
    bare = RouterMetrics(MetricsSettings(port=0), queue_gauges=lambda: ({}, {}), model=lambda: ("m", "ready"),
                         paused=lambda: False, node_of={}, down=lambda node: False, drift=lambda: (None, []))
    assert "router_drift" not in generate_latest(bare.registry).decode()  # a model without a reference

    q.SpoolQueue(tmp_path).close()
    app = build_app(ConsoleSettings(port=0), ConsoleContext(tmp_path, CLASSES, {}, desk=None,
                                                            drift=lambda: (reference, [shifted])))
    page = TestClient(app, base_url="http://127.0.0.1:8108", client=("127.0.0.1", 50000)).get("/").text
    assert 'data-drift-window="1h"' in page and 'class="bad" data-drift-test="label_mix"' in page
    abdominal = f"{100 * shifted.shares['abdominal']:.1f} %"  # about 60 %, next to the validation set's share
    assert abdominal in page and f"{100 * reference.shares[0]:.1f} %" in page and shifted.shares["abdominal"] > 0.5


def test_calibration_stores_the_reference_the_router_compares_with():
    from utils.evaluate.calibration import calibration_entry

    rng = np.random.default_rng(6)
    labels = rng.integers(0, 5, size=200)
    logits = rng.normal(size=(200, 5)).astype(np.float32)
    logits[np.arange(200), labels] += 4.0
    entry, _, after = calibration_entry(logits, labels, fitted_on="test")
    assert entry["reference"] == reference_entry(after)
    reference = Reference.of(SimpleNamespace(calibration=entry, spec=SimpleNamespace(class_names=CLASSES), ood=None))
    assert reference.n_images == 200 and reference.ood_flagged is None
    assert abs(reference.shares[0] - np.mean(after.argmax(axis=1) == 0)) < 1e-6
