"""Reception first: the router answers C-ECHO and C-STORE while its model is still loading, classifies
what waited once the model is ready, stops when the model cannot be loaded, runs a .tflite model
without TensorFlow; and a stop never waits for a connection that sends nothing.

The model's loading is held back by a file (tests/routing/slow_model_router.py): what a test does
before it creates that file happens while the model is loading. No test measures time, except
that a stop must end well before the (deliberately long) timeouts it would have waited for.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from utils.io.dicom_writer import write_dicom
from utils.routing import queue as q
from utils.routing.node import EXIT_MODEL_FAILED
from utils.routing.operations.service import echo

from .conftest import (
    ROOT,
    ROWS_BY_CLASS,
    bright_rows_image,
    everywhere,
    expected_labels,
    free_port,
    listening,
    send,
    wait_for,
    write_config,
)

TIMEOUT = 120  # generous: the machine is shared and slow
LONG_S = 120.0  # grace period and network timeouts of the stop test: a stop that waits for them takes this long



def events(spool: Path, name: str) -> list[dict]:
    path = spool / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == name]


def event_names(spool: Path) -> list[str]:
    return [json.loads(line)["event"] for line in (spool / "audit.jsonl").read_text().splitlines()]


def image(folder: Path, label: str = "spine") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_dicom(folder / f"{label}.dcm", bright_rows_image(ROWS_BY_CLASS[label]), bits_stored=12)


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def start_router(processes, config: Path, tmp_path: Path, **env):
    """tests/routing/slow_model_router.py as a process; returns it once it listens."""
    import os

    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
                   **{k: str(v) for k, v in env.items()}}
    process = processes([sys.executable, "-m", "tests.routing.slow_model_router", "--config", config],
                        tmp_path / "router.log", cwd=ROOT, env=environment)
    wait_for(lambda: "listening on port" in process.output() or not process.alive(), TIMEOUT, "the router to listen")
    assert process.alive(), process.output()
    return process


def test_echo_and_store_work_while_the_model_loads_and_what_waited_is_forwarded(processes, peers, model_file,
                                                                                   tmp_path):
    good = peers("GOOD")
    port, spool, gate = free_port(), tmp_path / "spool", tmp_path / "gate"
    config = write_config(tmp_path / "router.yaml", port=port, spool=spool, model=model_file,
                          destinations=everywhere(good))
    router = start_router(processes, config, tmp_path, ROUTER_TEST_GATE=gate)
    wait_for(lambda: Path(f"{gate}.loading").exists(), TIMEOUT, "the model to begin loading")

    # The model is loading (held at the gate): reception works all the same.
    assert echo("SENDER", "127.0.0.1", port, "ROUTER") is None
    path = image(tmp_path / "in")
    assert send(port, [path]) == [0]
    counts, _ = q.read_status(spool)
    assert counts == {q.RECEIVED: 1}  # spooled and committed, waiting for the model
    assert not gate.exists() and events(spool, "model_loaded") == []
    assert events(spool, "started")[0]["model_state"] == "loading"
    status = subprocess.run([sys.executable, "router.py", "--config", config, "--status"], cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert status.returncode == 0 and "loading the model since" in status.stdout, status.stdout + status.stderr

    gate.touch()  # let the model load: the object that waited is classified and forwarded
    wait_for(lambda: uid(path) in good.received, TIMEOUT, "the waiting object to be forwarded")
    expected = expected_labels(model_file, [path])[uid(path)].label
    classified = events(spool, "classified")
    assert [(c["sop_instance_uid"], c["label"]) for c in classified] == [(uid(path), expected)]
    names = event_names(spool)
    assert names.index("received") < names.index("model_loaded") < names.index("classified")
    assert events(spool, "model_loaded")[0]["runtime"] == "KerasPredictor"
    assert "out-of-distribution score" in router.output()  # the log says whether the OOD score is on
    assert router.kill(signal.SIGTERM, timeout=60) == 0, router.output()


def broken_model(model_file: Path, out: Path) -> Path:
    """A .keras archive whose metadata reads fine but whose weights are gone: loading it fails."""
    with zipfile.ZipFile(model_file) as source, zipfile.ZipFile(out, "w") as target:
        for item in source.infolist():
            if not item.filename.endswith(".h5"):
                target.writestr(item, source.read(item))
    return out


def test_a_model_that_cannot_be_loaded_stops_the_router_and_keeps_what_it_received(processes, peers, model_file,
                                                                                     tmp_path):
    good = peers("GOOD")
    port, spool, gate = free_port(), tmp_path / "spool", tmp_path / "gate"
    model = broken_model(model_file, tmp_path / "broken.keras")
    config = write_config(tmp_path / "router.yaml", port=port, spool=spool, model=model,
                          destinations=everywhere(good))
    router = start_router(processes, config, tmp_path, ROUTER_TEST_GATE=gate)
    wait_for(lambda: Path(f"{gate}.loading").exists(), TIMEOUT, "the model to begin loading")
    path = image(tmp_path / "in")
    assert send(port, [path]) == [0]
    gate.touch()

    assert router.proc.wait(TIMEOUT) == EXIT_MODEL_FAILED, router.output()
    output = router.output()
    assert "could not be loaded" in output and "Traceback" in output  # logged, with the cause
    failed = events(spool, "model_failed")
    assert len(failed) == 1 and failed[0]["exit_code"] == EXIT_MODEL_FAILED
    assert "broken.keras could not be loaded" in failed[0]["problem"]
    assert events(spool, "stopped")[-1]["failure"] == failed[0]["problem"]
    assert not listening(port)  # no longer accepting
    counts, _ = q.read_status(spool)
    assert counts == {q.RECEIVED: 1}  # what it acknowledged waits for a restart with a loadable model
    assert good.received == {}
    status = subprocess.run([sys.executable, "router.py", "--config", config, "--status"], cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert "could not be loaded" in status.stdout and f"(exit status {EXIT_MODEL_FAILED})" in status.stdout, (
        status.stdout + status.stderr)


def int8_tflite(model_file: Path, out: Path) -> Path:
    """The test model as a fully int8 .tflite (float input and output, as export.py writes them) with its sidecar."""
    import tensorflow as tf

    from utils.artifacts.export import IO_CONTRACT, quantize_int8
    from utils.artifacts.model_file import load_model, write_sidecar

    model, metadata = load_model(model_file)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    rng = np.random.default_rng(0)
    quantize_int8(converter, lambda: ([rng.uniform(0, 255, (1, *metadata.spec.input_shape)).astype(np.float32)]
                                      for _ in range(32)))
    out.write_bytes(converter.convert())
    write_sidecar(out, metadata.replace(format="tflite", quantization="int8", source=str(model_file), io=IO_CONTRACT))
    return out


def test_an_int8_tflite_model_is_served_without_importing_tensorflow(processes, peers, model_file, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="LiteRT (ai-edge-litert) runs .tflite models without TensorFlow")
    good = peers("GOOD")
    model = int8_tflite(model_file, tmp_path / "model.tflite")
    port, spool, report = free_port(), tmp_path / "spool", tmp_path / "report.json"
    config = write_config(tmp_path / "router.yaml", port=port, spool=spool, model=model,
                          destinations=everywhere(good))
    router = start_router(processes, config, tmp_path, ROUTER_TEST_REPORT=report)
    path = image(tmp_path / "in", "pediatric_chest")
    assert send(port, [path]) == [0]
    wait_for(lambda: uid(path) in good.received, TIMEOUT, "the object to be forwarded")
    assert events(spool, "model_loaded")[0]["runtime"] == "TFLitePredictor"
    assert events(spool, "classified")[0]["label"] == expected_labels(model, [path])[uid(path)].label
    assert router.kill(signal.SIGTERM, timeout=60) == 0, router.output()
    assert json.loads(report.read_text()) == {"tensorflow": False}


def test_an_idle_connection_does_not_delay_a_stop(processes, peers, model_file, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    good = peers("GOOD")
    port, spool = free_port(), tmp_path / "spool"
    config = write_config(tmp_path / "router.yaml", port=port, spool=spool, model=model_file,
                          destinations=everywhere(good))
    router = start_router(processes, config, tmp_path, ROUTER_TEST_STOP_GRACE_S=LONG_S)
    wait_for(lambda: events(spool, "model_loaded"), TIMEOUT, "the model to load")
    probe = socket.create_connection(("127.0.0.1", port))  # a health check: connects, sends nothing
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER")  # an association that goes quiet
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    try:
        started = time.monotonic()
        router.proc.send_signal(signal.SIGTERM)
        code = router.proc.wait(LONG_S)
        # Waiting for the idle peers would have taken LONG_S (grace period, network and ACSE timeouts).
        assert time.monotonic() - started < LONG_S / 2, "the stop waited for the idle connections"
        assert code == 0, router.output()
        assert events(spool, "stopped")[-1]["failure"] is None
        probe.settimeout(10)
        assert probe.recv(1) == b""  # closed by the router
        wait_for(lambda: assoc.is_aborted, 30, "the quiet association to be aborted")
    finally:
        probe.close()
        assoc.release()


def test_a_stop_lets_the_object_being_stored_finish_and_closes_idle_associations_at_once(router, peers, tmp_path,
                                                                                           monkeypatch):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    good = peers("GOOD")
    node = router(everywhere(good))
    storing, release = threading.Event(), threading.Event()
    store = node.queue.store

    def slow_store(*args, **kwargs):
        storing.set()
        assert release.wait(TIMEOUT)
        return store(*args, **kwargs)

    monkeypatch.setattr(node.queue, "store", slow_store)
    path, statuses = image(tmp_path / "in"), []
    sender = threading.Thread(target=lambda: statuses.extend(send(node.port, [path])))
    sender.start()
    ae = AE(ae_title="QUIET")
    ae.add_requested_context(Verification)
    quiet = ae.associate("127.0.0.1", node.port, ae_title="ROUTER")
    assert quiet.is_established
    assert storing.wait(TIMEOUT)  # the C-STORE is being stored

    stopper = threading.Thread(target=node.stop)
    stopper.start()
    # The quiet association is aborted while the object is still being stored ...
    wait_for(lambda: quiet.is_aborted, TIMEOUT, "the quiet association to be aborted")
    assert sender.is_alive() and not node.wait(0)
    release.set()
    # ... and the one being stored is stored and acknowledged before the node closes its queue.
    sender.join(TIMEOUT)
    stopper.join(TIMEOUT)
    assert statuses == [0] and node.wait(0)
    spool = q.SpoolQueue(node.config.spool_dir)
    try:
        assert [i.sop_instance_uid for i in spool.items()] == [uid(path)]
    finally:
        spool.close()
