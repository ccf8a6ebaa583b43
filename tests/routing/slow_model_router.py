"""router.py whose model loads only when the test says so, and which reports whether TensorFlow was imported.

    ROUTER_TEST_GATE=/tmp/gate python -m tests.routing.slow_model_router --config router.yaml

With ``ROUTER_TEST_GATE`` set, loading the model first creates ``<gate>.loading``, then waits until
the file ``<gate>`` exists, then loads as router.py does. Whatever a test does between seeing
``<gate>.loading`` and creating ``<gate>`` happens while the model is still loading: an ordering
established by files, not by timing. ``ROUTER_TEST_STOP_GRACE_S`` replaces the grace period
running associations get at a stop, and the SCP's network timeouts, so a test can tell a prompt
stop from one that waited for them. At exit ``<report>`` (``ROUTER_TEST_REPORT``) says whether
``tensorflow`` was imported.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import router
import utils.infer.predictor as predictor_module
from utils.routing import node
from utils.routing.intake import scp

GATE_LIMIT_S = 600  # a test that never opens the gate is torn down long before this

_load_predictor = predictor_module.load_predictor


def _load_when_allowed(path):
    gate = Path(os.environ["ROUTER_TEST_GATE"])
    Path(f"{gate}.loading").touch()
    deadline = time.monotonic() + GATE_LIMIT_S
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return _load_predictor(path)


def _long_timeouts(seconds: float) -> None:
    node.STOP_GRACE_S = seconds
    build_ae = scp.build_ae

    def build(config):
        ae = build_ae(config)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = seconds
        return ae

    scp.build_ae = build


if __name__ == "__main__":
    if os.environ.get("ROUTER_TEST_GATE"):
        predictor_module.load_predictor = _load_when_allowed
    if os.environ.get("ROUTER_TEST_STOP_GRACE_S"):
        _long_timeouts(float(os.environ["ROUTER_TEST_STOP_GRACE_S"]))
    code = router.main(sys.argv[1:])
    if os.environ.get("ROUTER_TEST_REPORT"):
        Path(os.environ["ROUTER_TEST_REPORT"]).write_text(json.dumps({"tensorflow": "tensorflow" in sys.modules}))
    sys.exit(code)
