"""docs/router.service: the sections and settings the router relies on (configparser, always), and
``systemd-analyze verify`` where it exists (a copy whose ExecStart runs this machine's python3, since verify
requires the program to exist; unknown keys only warn, so any warning about the file fails the test)."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "docs" / "router.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_has_the_sections_and_settings_the_router_needs():
    parsed = unit()
    assert parsed.sections() == ["Unit", "Service", "Install"]
    assert parsed["Unit"]["After"] == "network-online.target" and parsed["Unit"]["Wants"] == "network-online.target"
    assert parsed["Unit"]["Description"]
    service = parsed["Service"]
    assert service["User"] == service["Group"] == "dicom-router"
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/")
    assert re.fullmatch(r"\S*python\S* router\.py --config \S+\.yaml", service["ExecStart"])
    assert service["Restart"] == "on-failure" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 10
    protections = {"ProtectSystem": "strict", "ProtectHome": "true", "PrivateTmp": "true", "NoNewPrivileges": "true"}
    assert {key: service.get(key) for key in protections} == protections
    assert "/var/lib/dicom-router" in service["ReadWritePaths"].split()
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


def test_reload_sends_the_signal_the_router_handles():
    """``systemctl reload`` sends SIGHUP, which router.py handles (reload; tests/routing/test_reload.py): without the
    handler SIGHUP's default action would end the router."""
    import signal

    import router

    assert unit()["Service"]["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "signal.SIGHUP" in (ROOT / "router.py").read_text()

    class Node:  # run() installs the handler before it starts the node
        def start(self):
            self.handler = signal.getsignal(signal.SIGHUP)
            raise OSError("stop here")

    node = Node()
    before = signal.getsignal(signal.SIGHUP)
    assert router.run(node) == 2
    assert callable(node.handler) and node.handler not in (signal.SIG_DFL, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGHUP) == before  # given back after the run


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", UNIT.read_text(), flags=re.MULTILINE)
    copy = tmp_path / "dicom-router.service"
    copy.write_text(text)
    done = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60)
    about_it = [line for line in (done.stdout + done.stderr).splitlines() if copy.name in line]
    assert done.returncode == 0 and not about_it, done.stdout + done.stderr
