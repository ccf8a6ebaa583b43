"""A short coverage-guided campaign against the reader: no finding in a bounded number of runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

REPO = Path(__file__).resolve().parents[2]
RUNS = 2000


def _fuzz(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fuzz.reader_target", *args], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=timeout)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz_seeds")
    run = subprocess.run([sys.executable, "-m", "fuzz.reader_target", "--make-seeds", str(directory)],
                         cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    return directory


def test_seed_corpus_covers_every_syntax(seeds):
    names = {path.stem.removeprefix("seed-") for path in seeds.iterdir()}
    for prefix in ("ele_", "ile_", "deflate_", "rle_", "j2k_lossless", "j2k_lossy", "jpegls_", "jpeg_baseline"):
        assert any(name.startswith(prefix) for name in names), prefix
    assert all(path.stat().st_size <= 64 * 1024 for path in seeds.iterdir())


def test_bounded_campaign_finds_nothing(seeds, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    run = _fuzz(f"-runs={RUNS}", "-max_total_time=30", "-seed=1",
                f"-artifact_prefix={tmp_path}/", str(work), str(seeds))
    output = run.stdout + run.stderr
    finding = next(tmp_path.glob("crash-*"), None) or next(tmp_path.glob("timeout-*"), None) \
        or next(tmp_path.glob("oom-*"), None)
    assert run.returncode == 0 and finding is None, (
        f"the reader broke its promise (exit {run.returncode}, input {finding}):\n{output[-6000:]}")
    executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    assert executed and int(executed.group(1)) > 0, output[-3000:]


def test_campaign_counts_no_escapes(seeds, tmp_path):
    """--keep-going --campaign records escapes in summary.json instead of stopping; on this run
    it must record none, and the summary must account for every execution."""
    findings = tmp_path / "findings"
    work = tmp_path / "work"
    work.mkdir()
    run = _fuzz("--keep-going", str(findings), "--campaign", "60", "-runs=300", "-seed=2", str(work), str(seeds))
    summary = json.loads((findings / "summary.json").read_text())
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert summary["executions"] >= 300
    assert summary["escapes"] == 0 and not summary["stops"], json.dumps(summary, indent=1)[:4000]
    assert "300" in run.stdout or "executions" in run.stdout


def flaky_reader(open_source, state):
    """A stand-in for ``fuzz.probe.exercise`` that escapes on some input lengths."""
    data = open_source().read()
    state["stage"] = "read_dicom"
    if len(data) % 5 == 3:
        raise KeyError("escaped")
    return {"outcome": "decoded", "reason": "", "stages": {}}


def test_a_finding_fails_the_campaign_and_is_counted(seeds, tmp_path):
    probe = "tests.fuzz.test_atheris:flaky_reader"
    work = tmp_path / "work"
    work.mkdir()
    stopped = _fuzz("--probe", probe, "-runs=500", "-seed=3", f"-artifact_prefix={tmp_path}/", str(work), str(seeds))
    assert stopped.returncode != 0 and next(tmp_path.glob("crash-*"), None) is not None, stopped.stderr[-2000:]
    assert "KeyError" in stopped.stdout + stopped.stderr

    findings = tmp_path / "findings"
    counted = _fuzz("--probe", probe, "--keep-going", str(findings), "-runs=200", "-seed=3", str(work), str(seeds))
    summary = json.loads((findings / "summary.json").read_text())
    assert counted.returncode == 0, counted.stderr[-2000:]
    assert summary["escapes"] > 0 and summary["executions"] >= 200
    (entry,) = summary["signatures"]
    assert entry["exception_type"] == "KeyError" and Path(entry["example"]).exists()
