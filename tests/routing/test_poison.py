"""Objects that break classification, and workers that die: the router must never stall.

A file that makes its codec panic (a BaseException) or that kills the router while it is being
classified goes to ``unreadable`` with its reason after ``max_classify_attempts``; the objects
around it are delivered; a failure of the whole classifier never turns good objects unreadable;
a worker thread that dies or hangs stops the router with exit status 3 for its supervisor.
No dcmtk needed: pynetdicom sends and receives.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

import router as router_script
from fuzz.hostile import write_panicking_rle
from utils.io.dicom_writer import write_dicom
from utils.routing.decision import classifier as classifier_module
from utils.routing import queue as q
from utils.routing.operations.audit import read_audit
from utils.routing.decision.classifier import CLASSIFY_FAILED, Classifier
from utils.routing.operations.config import load_config
from utils.routing.delivery.forwarder import DicomForwarder
from utils.routing.node import EXIT_WORKER_FAILED, RouterNode

from .conftest import (
    CLASSES,
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
from .crashing_router import KILL_STATUS

TIMEOUT = 90


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def images(folder: Path, count: int = 3) -> list[Path]:
    """Readable images of different classes, one of them RLE (the codec that panics on the hostile file)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = list(ROWS_BY_CLASS)
    return [write_dicom(folder / f"good_{i}.dcm", bright_rows_image(ROWS_BY_CLASS[labels[i % len(labels)]]),
                        bits_stored=12, transfer_syntax=RLELossless if i == 0 else ExplicitVRLittleEndian)
            for i in range(count)]



def quarantined(node_or_config) -> dict[str, dict]:
    """SOP Instance UID -> the quarantine folder's .json sidecar."""
    config = getattr(node_or_config, "config", node_or_config)
    folder = config.destinations["unreadable"].folder
    return {(d := json.loads(p.read_text()))["sop_instance_uid"]: d for p in folder.glob("*.json")}


def events(config, name: str) -> list[dict]:
    return [r for r in read_audit(config.audit_log) if r["event"] == name]


# --- (1) a codec panic: caught, retried, given up; everything else delivered ----------------------


def test_a_panicking_file_is_quarantined_and_the_images_after_it_are_forwarded(router, peers, model_file, tmp_path):
    good = peers("GOOD")
    node = router(everywhere(good))
    bad = write_panicking_rle(tmp_path / "panics.dcm")
    normal = images(tmp_path / "in")
    assert send(node.port, [bad]) == [0]
    assert send(node.port, normal) == [0] * len(normal)

    expected = {u: s.label for u, s in expected_labels(model_file, normal).items()}
    wait_for(lambda: set(expected) <= set(good.received), TIMEOUT, "the images after the panicking file")
    wait_for(lambda: uid(bad) in quarantined(node), TIMEOUT, "the panicking file to be quarantined")
    assert uid(bad) not in good.received
    reason = quarantined(node)[uid(bad)]["reason"]
    assert reason and quarantined(node)[uid(bad)]["label"] == "unreadable"
    assert node.failure is None and node.classifier.is_alive()  # the classifier survived the panic

    rows = {i.sop_instance_uid: i for i in node.queue.items()}
    assert rows[uid(bad)].label == "unreadable" and rows[uid(bad)].classify_reason == reason
    assert {u: rows[u].label for u in expected} == expected
    classified = {r["sop_instance_uid"]: r for r in events(node.config, "classified")}
    assert classified[uid(bad)]["label"] == "unreadable" and classified[uid(bad)]["reason"] == reason
    if reason.startswith(CLASSIFY_FAILED):  # the decoder ran in this process: the panic was caught and counted
        assert "PanicException" in reason and rows[uid(bad)].classify_attempts == node.config.max_classify_attempts
        assert [r["sop_instance_uid"] for r in events(node.config, "poisoned")] == [uid(bad)]
        failed = events(node.config, "classification_failed")
        assert [r["attempt"] for r in failed] == [1, 2, 3] and "PanicException" in failed[0]["error"]


class Panic(BaseException):
    """Like pyo3's PanicException: not an Exception."""


@pytest.mark.parametrize("error", [ValueError, Panic])
def test_an_object_that_breaks_every_batch_is_isolated_and_given_up(router, peers, tmp_path, monkeypatch, error):
    """One object making its whole batch fail holds back nobody: the batch is split until it is alone."""
    normal = images(tmp_path / "in", 5)
    bad = normal.pop(2)
    bad_uid, original = uid(bad), Classifier.classify

    def classify(self, items, *args, **kwargs):
        if any(i.sop_instance_uid == bad_uid for i in items):
            raise error("this batch cannot be classified")
        return original(self, items, *args, **kwargs)

    monkeypatch.setattr(Classifier, "classify", classify)
    good = peers("GOOD")
    node = router(everywhere(good), batch_size=8, batch_wait_ms=2000)  # all five in one batch
    assert send(node.port, [*normal[:2], bad, *normal[2:]]) == [0] * 5
    wait_for(lambda: {uid(p) for p in normal} <= set(good.received), TIMEOUT, "the other images")
    wait_for(lambda: uid(bad) in quarantined(node), TIMEOUT, "the failing object to be given up")
    reason = quarantined(node)[uid(bad)]["reason"]
    assert reason.startswith(f"{CLASSIFY_FAILED}: 3 classification attempts") and error.__name__ in reason
    attempts = {i.sop_instance_uid: i.classify_attempts for i in node.queue.items()}
    assert attempts[uid(bad)] == 3 and all(attempts[uid(p)] == 1 for p in normal)
    assert [r["attempt"] for r in events(node.config, "classification_failed")] == [1, 2, 3]
    assert node.failure is None and node.classifier.is_alive()


# --- a failure of the whole classifier is not the objects' fault ---------------------------------


def test_a_failing_model_never_turns_good_objects_unreadable(router, peers, tmp_path, monkeypatch):
    monkeypatch.setattr(classifier_module, "ERROR_PAUSE_S", 0.1)
    original = Classifier.classify
    broken = threading.Event()
    broken.set()

    def classify(self, items, *args, **kwargs):
        if broken.is_set():
            raise RuntimeError("the model failed")
        return original(self, items, *args, **kwargs)

    monkeypatch.setattr(Classifier, "classify", classify)
    good = peers("GOOD")
    node = router(everywhere(good))
    normal = images(tmp_path / "in", 2)
    assert send(node.port, normal) == [0, 0]
    wait_for(lambda: len(events(node.config, "classifier_error")) > 2 * node.config.max_classify_attempts, TIMEOUT,
             "repeated failures of the whole classifier")
    assert all(i.state == q.RECEIVED and i.label == "" for i in node.queue.items())  # nothing given up
    assert not events(node.config, "poisoned") and not events(node.config, "classification_failed")
    broken.clear()  # the model is back
    wait_for(lambda: {uid(p) for p in normal} <= set(good.received), TIMEOUT, "the images once the model works")


# --- (2) an object that kills the router while it is classified --------------------------------


def test_an_object_that_kills_the_router_is_given_up_after_the_limit(peers, processes, model_file, tmp_path):
    good = peers("GOOD")
    port = free_port()
    config_file = write_config(tmp_path / "router.yaml", port=port, spool=tmp_path / "spool", model=model_file,
                               destinations=everywhere(good), max_classify_attempts=2,
                               batch_wait_ms=3000)  # all sent objects in one batch
    config = load_config(config_file)
    normal = images(tmp_path / "in", 3)
    killer = write_dicom(tmp_path / "killer.dcm", bright_rows_image(ROWS_BY_CLASS["spine"]), bits_stored=12)
    env = {"KILL_ON_SOP_INSTANCE_UID": uid(killer), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}

    def start(run: int):
        return processes([sys.executable, "-m", "tests.routing.crashing_router", "--config", config_file],
                         tmp_path / f"router-{run}.log", cwd=ROOT, env={**os.environ, **env})

    def delivered() -> bool:
        return {uid(p) for p in normal} <= set(good.received) and uid(killer) in quarantined(config)

    deaths, run = 0, 0
    process = start(run)
    wait_for(lambda: "listening on port" in process.output() or not process.alive(), TIMEOUT, "the router to listen")
    assert send(port, [normal[0], killer, *normal[1:]]) == [0] * 4
    while True:
        wait_for(lambda p=process: not p.alive() or delivered(), TIMEOUT, "the router to die or deliver everything")
        if process.alive():
            break
        assert process.proc.returncode == KILL_STATUS, process.output()
        deaths += 1
        assert deaths <= config.max_classify_attempts, "the killer was not given up"
        run += 1
        process = start(run)  # what a supervisor does

    assert deaths == config.max_classify_attempts == 2
    reason = quarantined(config)[uid(killer)]["reason"]
    assert reason.startswith(f"{CLASSIFY_FAILED}: 2 classification attempts") and "killed" in reason
    assert uid(killer) not in good.received
    poisoned = events(config, "poisoned")
    assert [(r["sop_instance_uid"], r["attempts"]) for r in poisoned] == [(uid(killer), 2)]
    recovered = events(config, "recovered")
    assert len(recovered) == deaths + 1 and all(r["classify_retries"] >= 1 for r in recovered[1:])
    assert process.kill(signal.SIGTERM) == 0  # a requested stop: exit status 0


# --- (3) a worker thread that dies or hangs stops the router, exit status 3 -----------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death, on purpose
def test_a_dead_classifier_thread_stops_the_router_with_exit_status_3(peers, model_file, tmp_path, monkeypatch):
    def die(self, items, *args, **kwargs):
        raise SystemExit  # ends a thread silently: the way a worker used to disappear

    monkeypatch.setattr(Classifier, "classify", die)
    good = peers("GOOD")
    port = free_port()
    config = load_config(write_config(tmp_path / "router.yaml", port=port, spool=tmp_path / "spool",
                                      model=model_file, destinations=everywhere(good)))
    image = images(tmp_path / "in", 1)
    statuses = []

    node = RouterNode(config)

    def sender():
        wait_for(lambda: node.server is not None, TIMEOUT, "the router to listen")
        statuses.extend(send(port, image))

    thread = threading.Thread(target=sender)
    thread.start()
    assert router_script.run(node) == EXIT_WORKER_FAILED  # what router.py exits with
    thread.join(TIMEOUT)
    assert statuses == [0]
    assert "classifier died" in node.failure
    assert not listening(port)  # no longer accepting objects
    failed = events(config, "worker_failed")
    assert len(failed) == 1 and failed[0]["exit_code"] == EXIT_WORKER_FAILED
    assert events(config, "stopped")[-1]["failure"] == node.failure
    spool = q.SpoolQueue(config.spool_dir)  # the object waits for the restart, its attempt counted
    try:
        assert [(i.state, i.classify_attempts) for i in spool.items()] == [(q.RECEIVED, 1)]
    finally:
        spool.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death, on purpose
def test_a_forwarder_survives_a_panic_and_its_death_stops_the_router(router, peers, tmp_path, monkeypatch):
    original, raised = DicomForwarder.deliver, []

    def deliver(self, items):
        if not raised:
            raised.append(Panic("a codec panicked"))
            raise raised[0]
        if len(raised) == 1 and self.queue.counts().get(q.FORWARDED):
            raised.append(SystemExit())
            raise raised[1]
        return original(self, items)

    monkeypatch.setattr(DicomForwarder, "deliver", deliver)
    good = peers("GOOD")
    node = router(everywhere(good))
    first, second = images(tmp_path / "in", 2)
    assert send(node.port, [first]) == [0]
    wait_for(lambda: uid(first) in good.received, TIMEOUT, "delivery after the panic")  # the loop survived it
    assert node.failure is None
    assert events(node.config, "destination_down")[0]["reason"] == "Panic: a codec panicked"
    assert send(node.port, [second]) == [0]
    assert node.wait(TIMEOUT) and node.exit_code == EXIT_WORKER_FAILED
    assert node.failure == f"worker thread forward-GOOD@127.0.0.1:{good.port} died"


def test_a_hung_classification_stops_the_router(router, peers, tmp_path, monkeypatch):
    release = threading.Event()

    def hang(self, items, *args, **kwargs):
        release.wait(TIMEOUT)

    monkeypatch.setattr(Classifier, "classify", hang)
    monkeypatch.setattr(RouterNode, "stall_s", 0.5)
    good = peers("GOOD")
    node = router(everywhere(good))
    try:
        assert send(node.port, images(tmp_path / "in", 1)) == [0]
        wait_for(lambda: node.failure, TIMEOUT, "the watchdog to notice the hung classification")
    finally:
        release.set()
    assert node.wait(TIMEOUT) and node.exit_code == EXIT_WORKER_FAILED and "hangs" in node.failure
    assert events(node.config, "worker_failed")[0]["problem"] == node.failure


# --- (4) the attempt counter in the queue, and older spool databases ----------------------------


OLD_SCHEMA = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY AUTOINCREMENT, file TEXT NOT NULL UNIQUE,
    sop_instance_uid TEXT NOT NULL DEFAULT '', sop_class_uid TEXT NOT NULL DEFAULT '',
    transfer_syntax TEXT NOT NULL DEFAULT '', calling_ae TEXT NOT NULL DEFAULT '', sha256 TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, label TEXT NOT NULL DEFAULT '', confidence REAL,
    model_id TEXT NOT NULL DEFAULT '', route TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0,
    received_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE INDEX items_state ON items (state, route, next_attempt);
CREATE INDEX items_sop ON items (sop_instance_uid);
"""


def old_spool(root: Path) -> Path:
    """A spool written by a router from before the classification attempt counter: one object waiting."""
    (root / "files").mkdir(parents=True)
    (root / "files" / "1.dcm").write_bytes(b"x")
    db = sqlite3.connect(root / "queue.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO items (file, sop_instance_uid, state, received_at, updated_at)"
               " VALUES ('1.dcm', '1.2.3', 'received', 1, 1)")
    db.commit()
    db.close()
    return root


def test_an_old_spool_database_gets_the_attempt_counter_in_place(tmp_path):
    root = old_spool(tmp_path / "spool")
    counts, _ = q.read_status(root)  # --status before the new router ever opened it
    assert counts == {q.RECEIVED: 1} and q.read_summary(root, "unreadable").classify_retries == []
    spool = q.SpoolQueue(root)
    [item] = spool.received(10)
    assert item.sop_instance_uid == "1.2.3" and item.classify_attempts == 0
    assert spool.recover()["pending"] == 1
    spool.close()
    q.SpoolQueue(root).close()  # opening a migrated database again changes nothing
    columns = [r[1] for r in sqlite3.connect(root / "queue.sqlite3").execute("PRAGMA table_info(items)")]
    assert columns.count("classify_attempts") == 1 and columns.count("classify_reason") == 1


def _classify_and_die(root, ids, ready):
    """A router that starts classifying ``ids`` and is killed (kill -9) before deciding anything."""
    spool = q.SpoolQueue(root)
    spool.start_classification([spool.get(i) for i in ids])
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def test_attempts_are_committed_before_classifying_and_survive_kill_9(tmp_path):
    spool = q.SpoolQueue(tmp_path)
    a, b = (spool.store(u.encode(), sop_instance_uid=u, sop_class_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1")[0]
            for u in ("1.1", "1.2"))
    spool.close()
    context = multiprocessing.get_context("fork")
    for ids in ([a.id, b.id], [a.id], [a.id]):  # a batch of both, then "a" alone twice
        ready = context.Event()
        child = context.Process(target=_classify_and_die, args=(tmp_path, ids, ready))
        child.start()
        child.join(60)
        assert ready.is_set() and child.exitcode == -signal.SIGKILL
    spool = q.SpoolQueue(tmp_path)
    try:
        assert spool.recover()["classify_retries"] == 2
        assert {i.sop_instance_uid: i.classify_attempts for i in spool.received(10)} == {"1.1": 3, "1.2": 1}
        spool.return_classification_attempts([b, b])  # given back (a systemic failure), never below 0
        assert spool.get(b.id).classify_attempts == 0
        spool.note_classification_failure(spool.get(a.id), "PanicException: boom")
        assert spool.get(a.id).reason == "PanicException: boom"
        spool.set_classified([q.Classification(a.id, "unreadable", None, "", "unreadable", "x")])
        assert spool.start_classification([spool.get(a.id)]) == []  # decided: no attempt counted any more
    finally:
        spool.close()


# --- (5) --status ---------------------------------------------------------------------------


def test_status_shows_unreadable_objects_with_their_reasons(tmp_path, model_file, capsys):
    config_file = write_config(tmp_path / "router.yaml", port=free_port(), spool=tmp_path / "spool",
                               model=model_file, destinations={c: {"folder": "out"} for c in [*CLASSES, "uncertain"]})
    spool = q.SpoolQueue(tmp_path / "spool")

    def stored(uid_: str):
        return spool.store(uid_.encode(), sop_instance_uid=uid_, sop_class_uid="1.2",
                           transfer_syntax="1.2.840.10008.1.2.1")[0]

    sr, broken, killer, spine, waiting = (stored(u) for u in ("1.1", "1.2", "1.3", "1.4", "1.5"))
    spool.set_classified([
        q.Classification(sr.id, "unreadable", None, "m", "unreadable", "no_pixel_data: an SR has no pixels"),
        q.Classification(broken.id, "unreadable", None, "m", "unreadable", "no_pixel_data: no (7FE0,0010)"),
        q.Classification(killer.id, "unreadable", None, "", "unreadable",
                         f"{CLASSIFY_FAILED}: 3 classification attempts failed or did not finish; last error: "
                         "PanicException: index out of bounds"),
        q.Classification(spine.id, "spine", 0.9, "m", "spine")])
    spool.mark_done(spool.get(sr.id), q.QUARANTINED, "/quarantine/1.1.dcm")  # the delivery note fills `reason`
    spool.start_classification([waiting])
    spool.note_classification_failure(waiting, "PanicException: index out of bounds")

    assert router_script.main(["--config", str(config_file), "--status"]) == 0
    out = capsys.readouterr().out
    assert "classified 3, quarantined 1, received 1" in out
    assert "by route: spine 1, unreadable 3" in out
    assert f"unreadable 3 by reason: no_pixel_data 2, {CLASSIFY_FAILED} 1" in out
    latest = out.split("latest unreadable (newest first):\n")[1].splitlines()
    assert "1.1 (quarantined): no_pixel_data: an SR has no pixels" in latest[0]  # done last
    assert "1.3 (classified): classification_failed: 3 classification attempts" in latest[1]
    assert "classification tried 1 of 3 times: 1.5, last error PanicException: index out of bounds" in out
    spool.close()
