"""docs/alerts.yml: promtool checks the rules and the scrape configuration that loads them, and runs their unit tests
(alerts_test.yml, alerts_7d_test.yml beside this file; skipped without promtool: Debian's ``prometheus`` package);
every ``router_*`` metric and label the rules use is one that utils/routing/operations/metrics.py registers (read from a
RouterMetrics with stub sources: no router, no port)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "alerts.yml"
SCRAPE = ROOT / "docs" / "prometheus.yml"
UNIT_TESTS = sorted(Path(__file__).parent.glob("alerts*_test.yml"))
SCRAPE_LABELS = {"job", "instance", "site"}  # added by Prometheus / docs/prometheus.yml, not by the router
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}  # the series of a family


def promtool(*args: str) -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; only promtool is used)")
    done = subprocess.run([tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def registered() -> dict[str, set[str]]:
    """Series name the router exposes -> its label names, from a RouterMetrics whose hooks were each called once."""
    pytest.importorskip("prometheus_client")
    from utils.routing.operations import metrics as m

    from utils.routing.operations.drift import Reference, WindowReading

    reference = Reference(("chest", "spine"), (0.6, 0.4), (0.5, 1.0), 100, 0.01)
    reading = WindowReading("1h", 60, {"chest": 0.5, "spine": 0.5}, 0.1, 0.05, p_values={"label_mix": 0.5},
                            alarms={"label_mix": False}, enough=True)
    metrics = m.RouterMetrics(m.MetricsSettings(), queue_gauges=lambda: ({}, {"chest": (1, 2)}),
                              model=lambda: ("m1", "ready"), paused=lambda: False, node_of={"chest": "PACS@pacs:104"},
                              down=lambda node: False, drift=lambda: (reference, [reading]))
    metrics.received("MODALITY")
    metrics.refused("disk_reserve")
    metrics.classified("chest", "model:m1")
    metrics.classification(0.1, 1)
    metrics.forwarded("chest", "PACS@pacs:104", "success", received_at=0.0)
    names = {}
    for family in metrics.registry.collect():
        labels = set().union(*(sample.labels for sample in family.samples)) - {"le"}
        for suffix in ("", *SUFFIXES.get(family.type, ())):  # the family's own name: what the docs call it
            names[family.name + suffix] = labels
    assert metrics.server is None  # nothing listens
    return names


def test_rules_and_scrape_config_pass_promtool_check():
    assert "SUCCESS: 12 rules found" in promtool("check", "rules", str(RULES.relative_to(ROOT)))
    assert "1 rule files found" in promtool("check", "config", str(SCRAPE.relative_to(ROOT)))


@pytest.mark.parametrize("tests", UNIT_TESTS, ids=lambda p: p.name)
def test_rules_pass_their_unit_tests(tests):
    assert "SUCCESS" in promtool("test", "rules", str(tests.relative_to(ROOT)))


def test_every_rule_has_a_unit_test_a_duration_a_severity_and_instructions():
    tested = {m.group(1) for path in UNIT_TESTS for m in re.finditer(r"alertname:\s*(\w+)", path.read_text())}
    for rule in rules():
        name = rule["alert"]
        assert name in tested, f"{name}: no case in {[p.name for p in UNIT_TESTS]}"
        assert rule.get("for"), f"{name}: no for:"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, name


def test_scrape_config_loads_the_rules_for_the_job_they_select():
    scrape = yaml.safe_load(SCRAPE.read_text())
    assert (SCRAPE.parent / scrape["rule_files"][0]).resolve() == RULES
    jobs = {job["job_name"] for job in scrape["scrape_configs"]}
    assert set(re.findall(r'job="([^"]+)"', RULES.read_text())) == jobs


def test_every_metric_and_label_the_rules_use_is_registered():
    names = registered()
    text = RULES.read_text()
    used = set(re.findall(r"\b(router_[a-z0-9_]+)", text))  # expressions and annotations (alert names are CamelCase)
    assert used, "no router_ metric found in the rules"
    assert used <= set(names), f"not in utils/routing/operations/metrics.py: {sorted(used - set(names))}"
    for rule in rules():
        for metric, matchers in re.findall(r"\b(router_[a-z0-9_]+)\{([^}]*)\}", rule["expr"]):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            assert labels <= names[metric] | SCRAPE_LABELS, f"{rule['alert']}: {metric} has no {labels - names[metric]}"
        for by in re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"]):
            grouped = {label.strip() for label in by.split(",")}
            known = set().union(*(names[m] for m in re.findall(r"\b(router_[a-z0-9_]+)", rule["expr"])), SCRAPE_LABELS)
            assert grouped <= known, f"{rule['alert']}: groups by unknown labels {grouped - known}"
