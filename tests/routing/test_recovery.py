"""Start-up repairs what a kill left outside the queue: unfinished folder copies, and audit lines a crash cost.

Crashes are real (a forked process killed with SIGKILL at the chosen point, between a queue commit
and the audit line that reports it); the start that follows is the code the node runs at start-up.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest

from utils.routing.delivery import forwarder as forwarder_module
from utils.routing import queue as q
from utils.routing.operations.audit import AuditLog, read_audit
from utils.routing.operations.config import Destination
from utils.routing.delivery.forwarder import FolderForwarder, remove_partial_copies
from utils.routing.queue import Classification, SpoolQueue
from utils.routing.operations.reconcile import reconcile_audit
from utils.routing.intake.scp import StoreHandler

from .conftest import bright_rows_image, everywhere, write_dicom
from .test_poison import images, uid

TIMEOUT = 60


# --- (2) unfinished copies in folder destinations ----------------------------------------------------


def test_start_up_removes_unfinished_quarantine_copies_and_nothing_else(router, peers, tmp_path, caplog):
    quarantine = tmp_path / "spool" / "quarantine"
    quarantine.mkdir(parents=True)
    left = [quarantine / f".{uuid.uuid4().hex}.part" for _ in range(2)]  # what a kill during a copy leaves
    for path in left:
        path.write_bytes(b"half a copy")
    kept = [quarantine / "1.2.3.dcm", quarantine / "1.2.3.json", quarantine / ".notours.part",
            quarantine / f".{uuid.uuid4().hex.upper()}.part"]
    for path in kept:
        path.write_bytes(b"x")
    node = router(everywhere(peers("GOOD")))
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)
    [recovered] = [r for r in read_audit(node.config.audit_log) if r["event"] == "recovered"]
    assert recovered["partial_copies_deleted"] == 2
    assert any("removed 2 unfinished copies" in r.getMessage() for r in caplog.records)


def test_remove_partial_copies_in_every_folder_destination(tmp_path):
    assert remove_partial_copies(tmp_path / "missing") == []
    share = tmp_path / "share"
    share.mkdir()
    part = share / f".{uuid.uuid4().hex}.part"
    part.write_bytes(b"x")
    assert remove_partial_copies(share) == [part] and not part.exists()


def test_a_copy_that_fails_midway_leaves_no_part_file(tmp_path, monkeypatch):
    """A full quarantine disk: the copy fails after writing some bytes; the temporary must not stay behind."""
    spool = SpoolQueue(tmp_path / "spool")
    audit = AuditLog(tmp_path / "audit.jsonl")
    try:
        item, _ = spool.store(b"x" * 5000, sop_instance_uid="1.1", sop_class_uid="1.2",
                              transfer_syntax="1.2.840.10008.1.2.1")
        spool.set_classified([Classification(item.id, "unreadable", None, "", "unreadable", "no_pixel_data")])
        folder = tmp_path / "quarantine"
        worker = FolderForwarder(Destination("unreadable", folder=folder), ["unreadable"], spool, audit, None)

        def copy_until_full(src, dst, length=0):
            dst.write(src.read(100))
            raise OSError(errno.ENOSPC, "No space left on device")

        real_copy = shutil.copyfileobj
        monkeypatch.setattr(forwarder_module.shutil, "copyfileobj", copy_until_full)
        problem = worker.deliver(spool.due(["unreadable"], 10))
        assert problem.startswith(f"cannot write into {folder}") and "No space left" in problem
        assert list(folder.iterdir()) == []
        monkeypatch.setattr(forwarder_module.shutil, "copyfileobj", real_copy)
        assert worker.deliver(spool.due(["unreadable"], 10)) is None  # the retry writes the copy and its reason
        assert sorted(p.name for p in folder.iterdir()) == ["1.1.dcm", "1.1.json"]
        assert spool.get(item.id).state == q.QUARANTINED
    finally:
        audit.close()
        spool.close()


# --- (3) audit lines a crash cost, written at the next start ---------------------------------------


def _start(root: Path) -> tuple[SpoolQueue, AuditLog, dict[str, int]]:
    """What the node does first at start-up: recover the queue, reconcile the audit log."""
    spool = SpoolQueue(root)
    audit = AuditLog(root / "audit.jsonl")
    spool.recover()
    return spool, audit, reconcile_audit(spool, audit, lambda route: f"{route.upper()}@folder")


def _die_after(method_owner, name: str):
    """Make ``method_owner.name`` run, then kill this process (kill -9) before anything after it runs."""
    original = getattr(method_owner, name)

    def run_then_die(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(method_owner, name, run_then_die)


class _Event:
    """The parts of pynetdicom's C-STORE event the StoreHandler reads."""

    def __init__(self, data: bytes, sop_instance_uid: str) -> None:
        from types import SimpleNamespace

        self._data = data
        self.request = SimpleNamespace(AffectedSOPInstanceUID=sop_instance_uid, AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.1.1")
        self.context = SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1")
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="SENDER"))

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        return self._data


def _run_and_die(root: Path, point: str, ready) -> None:
    """One router run, in a forked child: start, do the work up to ``point``, killed right after its commit."""
    spool, audit, _ = _start(root)
    handler = StoreHandler(spool, audit, lambda: None)
    if point == "received":  # the SCP committed the object; killed before its "received" line
        _die_after(spool, "store")
        ready.set()
        handler.handle_store(_Event(b"object 2.1", "2.1"))
    assert handler.handle_store(_Event(b"object 2.2", "2.2")) == 0
    [item] = spool.received(10)
    if point == "classified":  # the classifier committed its decision; killed before its "classified" line
        _die_after(spool, "set_classified")
        ready.set()
    spool.set_classified([Classification(item.id, "spine", 0.9, "m", "spine")])
    audit.write("classified", sop_instance_uid=item.sop_instance_uid, item=item.id, label="spine")
    forwarder = FolderForwarder(Destination("spine", folder=root / "share"), ["spine"], spool, audit, None)
    _die_after(spool, "mark_done")  # the delivery is committed; killed before anything else runs
    ready.set()
    forwarder.deliver(spool.due(["spine"], 10))


@pytest.mark.parametrize("point, event, uid_", [("received", "received", "2.1"),
                                                 ("classified", "classified", "2.2"),
                                                 ("forwarded", "forwarded", "2.2")])
def test_a_kill_between_a_commit_and_its_audit_line_loses_no_line(tmp_path, point, event, uid_):
    spool, audit, _ = _start(tmp_path)  # an earlier start: marks where the next run's lines begin
    audit.close()
    spool.close()
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_run_and_die, args=(tmp_path, point, ready))
    child.start()
    child.join(TIMEOUT)
    assert ready.is_set() and child.exitcode == -signal.SIGKILL

    spool, audit, written = _start(tmp_path)  # the restart
    try:
        lines = [r for r in read_audit(audit.path) if r["event"] == event and r["sop_instance_uid"] == uid_]
        [row] = [i for i in spool.items() if i.sop_instance_uid == uid_]
        assert len(lines) == 1, lines  # the line is there, once
        assert lines[0]["item"] == row.id
        if point == "forwarded":  # written before the commit: no reconstruction needed
            assert row.state == q.FORWARDED and "reconciled" not in lines[0] and lines[0]["status"] == "stored"
            assert written == {"received": 0, "classified": 0, "delivered": 0, "reviewed": 0}
        else:  # reconstructed from the queue at the restart
            assert lines[0]["reconciled"] is True and lines[0]["at"]
            assert written[event] == 1 and sum(written.values()) == 1
            if event == "received":
                assert lines[0]["size"] == len(b"object 2.1") and lines[0]["calling_ae"] == "SENDER"
                assert lines[0]["orphan"] is False
            else:
                assert lines[0]["label"] == "spine" and lines[0]["route"] == "spine"
        audit.close()
        spool.close()
        spool, audit, written = _start(tmp_path)  # another start writes nothing twice
        assert written == {"received": 0, "classified": 0, "delivered": 0, "reviewed": 0}
        assert len([r for r in read_audit(audit.path) if r["event"] == event and r["sop_instance_uid"] == uid_]) == 1
    finally:
        audit.close()
        spool.close()


def _correct_and_die(root: Path, ready) -> None:
    """One router run: an operator corrects an object from the review list; killed right after the commit that
    records the correction, before its ``corrected`` audit line."""
    from utils.routing.operations.review import ReviewDesk

    spool, audit, _ = _start(root)
    item, _ = spool.store(b"object 4.1", sop_instance_uid="4.1", sop_class_uid="1.2",
                          transfer_syntax="1.2.840.10008.1.2.1")
    spool.set_classified([Classification(item.id, "uncertain", 0.4, "m", "uncertain")])
    share = {route: Destination(route, folder=root / "share") for route in ("spine", "others")}
    desk = ReviewDesk(spool, audit, ("spine", "others"), share, root / "review", root / "corrections")
    desk.correct(item.id, "others", who="alice")  # a first correction, its line written
    _die_after(spool, "mark_reviewed")
    ready.set()
    desk.correct(item.id, "spine", who="bob")  # the second: committed, then killed


def test_a_kill_between_an_operators_correction_and_its_audit_line_loses_no_line(tmp_path):
    spool, audit, _ = _start(tmp_path)
    audit.close()
    spool.close()
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_correct_and_die, args=(tmp_path, ready))
    child.start()
    child.join(TIMEOUT)
    assert ready.is_set() and child.exitcode == -signal.SIGKILL

    spool, audit, written = _start(tmp_path)
    try:
        lines = [r for r in read_audit(audit.path) if r["event"] == "corrected"]
        assert [(r["label"], r["who"], r.get("reconciled", False)) for r in lines] == [
            ("others", "alice", False), ("spine", "bob", True)]  # the lost one rebuilt, the first not twice
        [row] = [i for i in spool.items() if i.sop_instance_uid == "4.1" and i.reviewed]
        assert lines[1]["item"] == row.id and lines[1]["previous_label"] == "uncertain"
        assert lines[1]["new_item"] and lines[1]["destination"] == "folder:" + str(tmp_path / "share")
        assert lines[1]["reviewed_at"] == row.reviewed_at and lines[1]["at"]
        assert written["reviewed"] == 1
        audit.close()
        spool.close()
        spool, audit, written = _start(tmp_path)  # another start writes nothing twice
        assert written["reviewed"] == 0
        assert len([r for r in read_audit(audit.path) if r["event"] == "corrected"]) == 2
    finally:
        audit.close()
        spool.close()


def test_a_delivery_committed_without_its_line_is_reconstructed(tmp_path):
    """A forwarded line lost some other way (an older router, an audit write that failed) is written back."""
    spool, audit, _ = _start(tmp_path)
    item, _ = spool.store(b"x", sop_instance_uid="3.1", sop_class_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1")
    audit.write("received", sop_instance_uid="3.1", item=item.id)
    spool.set_classified([Classification(item.id, "spine", 0.9, "m", "spine")])
    audit.write("classified", sop_instance_uid="3.1", item=item.id, label="spine")
    spool.mark_done(spool.get(item.id), q.FORWARDED, "")
    audit.close()
    spool.close()
    spool, audit, written = _start(tmp_path)
    try:
        assert written == {"received": 0, "classified": 0, "delivered": 1, "reviewed": 0}
        [line] = [r for r in read_audit(audit.path) if r["event"] == "forwarded"]
        assert line["reconciled"] is True and line["destination"] == "SPINE@folder" and line["status"] == "confirmed"
    finally:
        audit.close()
        spool.close()


def test_an_orphan_registered_at_recovery_gets_its_received_line(router, peers, tmp_path):
    """A file made durable whose row was never committed: registered at start-up, and audited."""
    files = tmp_path / "spool" / "files"
    files.mkdir(parents=True)
    orphan = write_dicom(files / "123-orphan.dcm", bright_rows_image(19), sop_uid="1.2.826.0.1.99")
    good = peers("GOOD")
    node = router(everywhere(good))
    wait_for_delivery = [r for r in read_audit(node.config.audit_log) if r["event"] == "received"]
    [line] = wait_for_delivery
    assert line["sop_instance_uid"] == "1.2.826.0.1.99" and line["reconciled"] is True and line["orphan"] is True
    assert line["size"] == orphan.stat().st_size and line["item"] == node.queue.items()[0].id
    [recovered] = [r for r in read_audit(node.config.audit_log) if r["event"] == "recovered"]
    assert recovered["orphans_registered"] == 1 and recovered["audit_reconciled"] == 1


def test_a_line_torn_by_a_crash_does_not_swallow_the_next_one(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event":"received","item":1}\n{"event":"forwa')  # killed mid-line
    audit = AuditLog(path)
    audit.write("recovered", orphans_registered=0)
    audit.close()
    assert [r["event"] for r in read_audit(path)] == ["received", "recovered"]


def test_objects_forwarded_by_a_running_router_have_one_line_each(router, peers, tmp_path):
    from .conftest import send, wait_for

    good = peers("GOOD")
    node = router(everywhere(good))
    normal = images(tmp_path / "in", 2)
    assert send(node.port, normal) == [0, 0]
    wait_for(lambda: node.queue.counts() == {q.FORWARDED: 2}, TIMEOUT, "delivery")
    lines = [r for r in read_audit(node.config.audit_log) if r["event"] == "forwarded"]
    assert sorted(r["sop_instance_uid"] for r in lines) == sorted(uid(p) for p in normal)
