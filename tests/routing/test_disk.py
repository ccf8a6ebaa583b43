"""A full spool disk: reception pauses above the free-space reserve, the queue keeps draining, nothing wedges.

The free space is a stand-in (``shutil.disk_usage`` patched) in most tests; the last one runs the
router on a real 16 MB tmpfs and skips where mounting is not permitted.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import yaml
from pynetdicom import evt

import router as router_script
from utils.io.dicom_writer import write_dicom
from utils.routing.decision import classifier as classifier_module
from utils.routing import queue as q
from utils.routing.intake import space
from utils.routing.operations.audit import read_audit
from utils.routing.intake.scp import OUT_OF_RESOURCES
from utils.routing.intake.space import MB, ReceptionGate, reserve_bytes

from .conftest import CLASSES, ROWS_BY_CLASS, everywhere, expected_labels, free_port, send, wait_for
from .test_poison import images, uid

TIMEOUT = 90


class Disk:
    """A stand-in for ``shutil.disk_usage``: sizes in MB, changed by the test."""

    def __init__(self, total_mb: float, free_mb: float) -> None:
        self.total_mb, self.free_mb, self.calls = total_mb, free_mb, 0

    def __call__(self, path: str):
        self.calls += 1
        return SimpleNamespace(total=int(self.total_mb * MB), free=int(self.free_mb * MB))


class Audit:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def write(self, event: str, **fields) -> None:
        self.lines.append((event, fields))

    def events(self) -> list[str]:
        return [e for e, _ in self.lines]


def events(config, name: str) -> list[dict]:
    return [r for r in read_audit(config.audit_log) if r["event"] == name]


# --- the reserve and the gate, with the free space injected ---------------------------------------


def test_the_reserve_is_the_larger_of_its_two_settings():
    assert reserve_bytes(1000 * MB, 100, 0.0) == 100 * MB
    assert reserve_bytes(1000 * MB, 100, 20.0) == 200 * MB  # 20 % of 1000 MB beats 100 MB
    assert reserve_bytes(1000 * MB, 300, 20.0) == 300 * MB
    assert reserve_bytes(1000 * MB, 0, 0.0) == 0


def test_the_gate_pauses_and_resumes_once_per_transition(tmp_path, caplog):
    disk, audit = Disk(1000, 500), Audit()
    gate = ReceptionGate(tmp_path, 100, 0.0, audit, probe=disk)
    with caplog.at_level(logging.INFO, logger=space.__name__):
        assert gate.admit(10 * MB) is None and not gate.paused  # 500 - 10 >= 100
        gate.release(10 * MB)
        assert gate.admit(450 * MB) is not None and gate.paused  # would leave 50 MB: refused, nothing written
        disk.free_mb = 60
        for _ in range(5):  # a flood of refusals: one pause line, not five
            assert gate.admit(1 * MB) is not None
        gate.refresh()
        disk.free_mb = 105  # above the reserve, not yet above it + 10 %: stays paused (no flapping)
        assert gate.admit(1 * MB) is not None and gate.refresh() and gate.paused
        disk.free_mb = 111  # above reserve + 10 %, but the 450 MB object refused still would not fit
        assert gate.admit(1 * MB) is not None and gate.paused
        disk.free_mb = 551
        assert gate.admit(1 * MB) is None and not gate.paused  # resumed by the next object
    gate.release(1 * MB)
    assert audit.events() == ["reception_paused", "reception_resumed"]
    paused, resumed = (fields for _, fields in audit.lines)
    assert paused["free_mb"] == 500.0 and paused["reserve_mb"] == 100.0 and paused["resume_mb"] == 110.0
    assert paused["object_mb"] == 450.0
    assert resumed["refused"] == 8 and resumed["free_mb"] == 551.0
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]  # one line per transition
    assert "reception paused: 500.0 MB free" in caplog.records[0].getMessage()
    assert "50.0 MB once the 450.0 MB being received are written" in caplog.records[0].getMessage()
    assert "reception resumed" in caplog.records[1].getMessage() and "8 objects refused" in caplog.records[1].getMessage()


def test_the_gate_pauses_without_traffic_and_counts_objects_being_written(tmp_path, caplog):
    disk, audit = Disk(1000, 500), Audit()
    gate = ReceptionGate(tmp_path, 0, 10.0, audit, probe=disk)  # 10 % of 1000 MB: a 100 MB reserve
    assert gate.admit(300 * MB) is None  # being written: the free space does not show it yet
    assert gate.admit(150 * MB) is not None  # 500 - 300 - 150 < 100
    gate.release(300 * MB)
    assert gate.refresh().reserve == 100 * MB
    disk.free_mb = 120
    gate.refresh()  # 120 - 0 pending: resumed (>= 110)
    assert not gate.paused
    with caplog.at_level(logging.WARNING, logger=space.__name__):
        caplog.clear()
        disk.free_mb = 90  # another program filled the disk: paused with nothing arriving
        gate.refresh()
        gate.refresh()
    assert gate.paused and audit.events() == ["reception_paused", "reception_resumed", "reception_paused"]
    [record] = caplog.records
    assert "reception paused: 90.0 MB free" in record.getMessage() and "refused with 0xA700" in record.getMessage()


def test_without_a_reserve_or_a_readable_disk_the_gate_admits(tmp_path, caplog):
    disk = Disk(1000, 0)
    off = ReceptionGate(tmp_path, 0, 0.0, Audit(), probe=disk)
    assert off.admit(MB) is None and off.refresh() is None and disk.calls == 0

    def broken(path):
        raise OSError(5, "Input/output error")

    unreadable = ReceptionGate(tmp_path, 100, 0.0, Audit(), probe=broken)
    with caplog.at_level(logging.WARNING, logger=space.__name__):
        caplog.clear()
        assert unreadable.admit(MB) is None and unreadable.admit(MB) is None
    assert len(caplog.records) == 1 and "reserve is not enforced" in caplog.records[0].getMessage()


# --- the router: refuse before writing, keep draining, say so in --status and --check ---------------


def test_below_the_reserve_objects_are_refused_before_anything_is_written(router, peers, tmp_path, monkeypatch,
                                                                          capsys):
    disk = Disk(10_000, 5000)
    monkeypatch.setattr(shutil, "disk_usage", disk)
    good = peers("GOOD")
    node = router(everywhere(good), min_free_mb=100)
    first, *rest = images(tmp_path / "in", 4)
    stored = []
    store = node.queue.store
    monkeypatch.setattr(node.queue, "store", lambda *a, **k: stored.append(k["sop_instance_uid"]) or store(*a, **k))

    disk.free_mb = 5  # the classifier still needs to commit this one, the forwarder to send it
    assert send(node.port, [first]) == [OUT_OF_RESOURCES]
    assert stored == [] and node.queue.items() == [] and not list(node.queue.incoming.iterdir())
    disk.free_mb = 5000
    wait_for(lambda: events(node.config, "reception_resumed"), TIMEOUT, "reception to resume (watchdog)")
    assert send(node.port, [first]) == [0]
    disk.free_mb = 50  # below the reserve with one object waiting: it is still classified and forwarded
    wait_for(lambda: uid(first) in good.received, TIMEOUT, "the object accepted before the pause to be forwarded")
    assert send(node.port, rest) == [OUT_OF_RESOURCES] * 3
    assert send(node.port, rest) == [OUT_OF_RESOURCES] * 3
    assert stored == [uid(first)] and [i.sop_instance_uid for i in node.queue.items()] == [uid(first)]
    assert len(events(node.config, "reception_paused")) == 2  # once per pause, not once per refused object

    config_file = tmp_path / "router.yaml"
    assert router_script.main(["--config", str(config_file), "--status"]) == 0
    out = capsys.readouterr().out
    assert "disk: reception PAUSED for disk space: 50 MB free" in out and "reserve of 100 MB" in out
    assert "until 110 MB are free; classification and forwarding go on" in out
    assert router_script.main(["--config", str(config_file), "--check"]) == 1  # every destination answers
    assert "reception PAUSED" in capsys.readouterr().out

    disk.free_mb = 5000
    wait_for(lambda: len(events(node.config, "reception_resumed")) == 2, TIMEOUT, "reception to resume by itself")
    assert events(node.config, "reception_resumed")[-1]["refused"] == 6
    assert send(node.port, rest) == [0] * 3
    wait_for(lambda: {uid(p) for p in rest} <= set(good.received), TIMEOUT, "the objects sent after the pause")
    assert router_script.main(["--config", str(config_file), "--status"]) == 0
    assert "disk: 5000 MB free" in capsys.readouterr().out
    assert not events(node.config, "receive_failed") and not events(node.config, "classifier_error")


# --- commits that fail (disk full): retried, nobody's fault, progress once space is back ------------


class FullDisk:
    """Stands in for the queue's SQLite connection: while ``full``, statements containing one of ``patterns``
    fail as SQLite fails on a full disk. Everything else goes to the real connection."""

    def __init__(self, db: sqlite3.Connection, *patterns: str) -> None:
        self._db, self.patterns, self.full, self.refused = db, patterns, True, 0

    def __getattr__(self, name):
        return getattr(self._db, name)

    def _check(self, sql: str) -> None:
        if self.full and any(p in sql for p in self.patterns):
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql, *args):
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql, *args):
        self._check(sql)
        return self._db.executemany(sql, *args)


def full_disk(node, *patterns: str) -> FullDisk:
    with node.queue._lock:
        node.queue._db = proxy = FullDisk(node.queue._db, *patterns)
    return proxy


def test_a_classifier_whose_commits_fail_retries_and_never_gives_objects_up(router, peers, model_file, tmp_path,
                                                                          monkeypatch):
    """What deadlocked: set_classified failed with 'database or disk is full' (and so did giving attempts back);
    the attempts piled up until good objects were given up as unreadable."""
    monkeypatch.setattr(classifier_module, "ERROR_PAUSE_S", 0.1)
    good = peers("GOOD")
    node = router(everywhere(good))
    # set_classified and return_classification_attempts fail; counting an attempt (a smaller commit) works
    disk = full_disk(node, "classify_reason = ?", "MAX(0, classify_attempts - 1)")
    normal = images(tmp_path / "in", 3)
    assert send(node.port, normal) == [0] * 3
    limit = node.config.max_classify_attempts
    wait_for(lambda: len(events(node.config, "classifier_error")) > 2 * limit, TIMEOUT, "repeated failed commits")
    items = node.queue.items()
    assert all(i.state == q.RECEIVED for i in items)
    assert all(i.classify_attempts <= 1 for i in items), [i.classify_attempts for i in items]  # none piled up
    assert "database or disk is full" in events(node.config, "classifier_error")[0]["error"]

    disk.full = False  # space is back
    expected = {u: s.label for u, s in expected_labels(model_file, normal).items()}
    wait_for(lambda: set(expected) <= set(good.received), TIMEOUT, "the objects once commits work again")
    rows = {i.sop_instance_uid: i for i in node.queue.items()}
    assert {u: rows[u].label for u in expected} == expected  # their own labels, not "unreadable"
    assert all(rows[u].classify_attempts == 1 for u in expected)
    assert not events(node.config, "poisoned") and not events(node.config, "classification_failed")


def test_a_forwarder_whose_commits_fail_retries_without_calling_the_destination_down(router, peers, tmp_path):
    good = peers("GOOD")
    node = router(everywhere(good))
    disk = full_disk(node, "reason = CASE WHEN")  # mark_done
    normal = images(tmp_path / "in", 2)
    assert send(node.port, normal) == [0, 0]
    wait_for(lambda: disk.refused >= 3, TIMEOUT, "failed commits of deliveries")
    assert node.queue.counts() == {q.CLASSIFIED: 2}
    errors = events(node.config, "forwarder_error")
    assert errors and "database or disk is full" in errors[0]["error"]
    assert not events(node.config, "destination_down")  # the destination answered every time

    disk.full = False
    wait_for(lambda: node.queue.counts() == {q.FORWARDED: 2}, TIMEOUT, "the deliveries to be recorded")
    assert not list(node.queue.files.iterdir()) and node.failure is None
    forwarded = {r["sop_instance_uid"] for r in events(node.config, "forwarded") if r["status"] == "0x0000"}
    assert forwarded == {uid(p) for p in normal}


def test_a_failed_transaction_leaves_no_transaction_open(tmp_path):
    spool = q.SpoolQueue(tmp_path)
    try:
        item, _ = spool.store(b"x", sop_instance_uid="1.1", sop_class_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1")
        disk = FullDisk(spool._db, "classify_reason = ?")
        spool._db = disk
        with pytest.raises(q.SpoolWriteError, match="could not record 1 classifications: database or disk is full"):
            spool.set_classified([q.Classification(item.id, "spine", 0.9, "m", "spine")])
        assert not disk.in_transaction
        disk.full = False
        spool.set_classified([q.Classification(item.id, "spine", 0.9, "m", "spine")])
        assert spool.get(item.id).state == q.CLASSIFIED
    finally:
        spool.close()


def test_a_store_that_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    spool = q.SpoolQueue(tmp_path)

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(q.os, "fsync", no_space)
    try:
        with pytest.raises(OSError, match="No space left"):
            spool.store(b"x" * 1000, sop_instance_uid="1.1", sop_class_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1")
        assert not list(spool.incoming.iterdir()) and not list(spool.files.iterdir())
    finally:
        spool.close()


# --- a real small filesystem ---------------------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MB tmpfs, unmounted at teardown; skipped where mounting is not permitted (needs root or CAP_SYS_ADMIN)."""
    path = tmp_path / "small"
    path.mkdir()
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("no mount/umount command: cannot make a small filesystem")
    result = subprocess.run([mount, "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {(result.stderr or result.stdout).strip()}")
    yield path
    subprocess.run([umount, "-l", str(path)], check=False)


def big_images(folder: Path, count: int) -> list[Path]:
    """About 1 MB each (724 x 724, 16 bits), of several classes."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = list(ROWS_BY_CLASS)
    paths = []
    for i in range(count):
        image = np.full((724, 724), 100, np.uint16)
        image[: ROWS_BY_CLASS[labels[i % len(labels)]] * 724 // 64] = 3000
        paths.append(write_dicom(folder / f"big_{i}.dcm", image, bits_stored=12))
    return paths


def fill(folder: Path) -> Path:
    """Write a file until the filesystem is full (another program eating the reserve)."""
    path = folder / "filler"
    handle = open(path, "wb")  # noqa: SIM115 - closed below, also when the disk is full
    try:
        while True:
            handle.write(b"\0" * (64 << 10))
            handle.flush()
    except OSError:
        pass
    try:
        handle.close()
    except OSError:
        pass
    return path


def test_a_small_spool_filesystem_pauses_reception_drains_and_resumes(small_filesystem, router, peers, tmp_path):
    late = peers("LATE")
    late.ae.shutdown()  # the destination is down at first
    node = router({**{c: late.node() for c in CLASSES}, "uncertain": late.node()},
                  spool_dir=str(small_filesystem / "spool"), min_free_mb=6)
    objects = big_images(tmp_path / "in", 14)
    statuses = send(node.port, objects)
    accepted = statuses.count(0)
    assert 4 <= accepted <= 11 and statuses == [0] * accepted + [OUT_OF_RESOURCES] * (14 - accepted), statuses
    assert shutil.disk_usage(small_filesystem).free >= 5 * MB  # the reserve held (less the last object's rounding)
    # below the reserve the queue keeps working: everything accepted is classified and committed
    wait_for(lambda: node.queue.counts() == {q.CLASSIFIED: accepted}, TIMEOUT, "classification below the reserve")
    assert len(events(node.config, "reception_paused")) == 1 and not events(node.config, "receive_failed")

    filler = fill(small_filesystem)  # now the disk is completely full: commits and audit lines fail
    late.server = late.ae.start_server(("127.0.0.1", late.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, late._store)])
    wait_for(lambda: late.received, TIMEOUT, "the destination to get something")
    filler.unlink()  # space is back: the forwarder must not have wedged
    wait_for(lambda: node.queue.counts() == {q.FORWARDED: accepted}, TIMEOUT, "the spool to drain")
    wait_for(lambda: events(node.config, "reception_resumed"), TIMEOUT, "reception to resume by itself")
    assert send(node.port, objects[accepted:]) == [0] * (14 - accepted)
    wait_for(lambda: {uid(p) for p in objects} <= set(late.received), TIMEOUT, "every object to be delivered")
    assert node.failure is None and not events(node.config, "classifier_error")
    assert pydicom.dcmread(objects[0]).PixelData == pydicom.dcmread(
        pydicom.filebase.DicomBytesIO(late.received[uid(objects[0])]), force=True).PixelData


def test_a_full_disk_at_start_is_a_clear_error_not_a_traceback(small_filesystem, model_file, tmp_path, capsys):
    """The spool's filesystem full before the router's first start: no database can be created; the router says so
    (path, cause, free space) and exits 2 instead of raising sqlite3.OperationalError."""
    fill(small_filesystem)
    spool = small_filesystem / "spool"
    with pytest.raises(q.SpoolOpenError, match=r"queue\.sqlite3: .*full.*MB free of"):
        q.SpoolQueue(spool)
    q.SpoolQueue(tmp_path / "elsewhere").close()  # the lock file was released: nothing else is held
    config = tmp_path / "router.yaml"
    folder = {"folder": str(tmp_path / "out")}
    config.write_text(yaml.safe_dump({"model": str(model_file), "spool_dir": str(spool), "port": free_port(),
                                      "destinations": {**{c: folder for c in CLASSES}, "uncertain": folder}}))
    assert router_script.main(["--config", str(config)]) == 2
    assert "cannot open the spool database" in capsys.readouterr().err
