"""The persistent queue: durable receive, state changes, and recovery from every crash point."""

import json
import multiprocessing
import os
import signal

import pytest

from utils.routing import queue as q
from utils.routing.operations.audit import AuditLog, read_audit
from utils.routing.queue import Classification, SpoolLockedError, SpoolQueue

from .conftest import bright_rows_image, write_dicom


def store(spool: SpoolQueue, data: bytes = b"x" * 100, uid: str = "1.2.3"):
    return spool.store(data, sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                       transfer_syntax="1.2.840.10008.1.2.1", calling_ae="SENDER")


def test_store_keeps_the_bytes_and_walks_the_states(tmp_path):
    spool = SpoolQueue(tmp_path)
    item, duplicate = store(spool, b"abc")
    assert not duplicate and item.state == q.RECEIVED and spool.path(item).read_bytes() == b"abc"
    assert not list(spool.incoming.iterdir())
    assert [i.id for i in spool.received(10)] == [item.id]
    spool.set_classified([Classification(item.id, "spine", 0.9, "m1", "spine")])
    assert spool.received(10) == [] and [i.id for i in spool.due(["spine"], 10)] == [item.id]
    assert spool.due(["others"], 10) == []
    item = spool.defer(spool.get(item.id), "busy", delay=60)
    assert item.attempts == 1 and item.state == q.CLASSIFIED and spool.due(["spine"], 10) == []
    assert spool.next_due(["spine"]) > item.updated_at + 50
    spool.mark_done(item, q.FORWARDED, "0x0000")
    assert spool.get(item.id).state == q.FORWARDED and not spool.path(item).exists()
    assert spool.counts() == {q.FORWARDED: 1}


def test_an_identical_resend_of_a_waiting_object_is_stored_once(tmp_path):
    spool = SpoolQueue(tmp_path)
    first, _ = store(spool, b"same")
    again, duplicate = store(spool, b"same")
    assert duplicate and again.id == first.id and len(list(spool.files.iterdir())) == 1
    other, duplicate = store(spool, b"changed")  # same UID, other content: kept too
    assert not duplicate and other.id != first.id


def test_give_up_after_attempts_and_requeue(tmp_path):
    spool = SpoolQueue(tmp_path)
    item, _ = store(spool)
    spool.set_classified([Classification(item.id, "spine", 0.9, "m1", "spine")])
    spool.defer(spool.get(item.id), "refused", delay=0, give_up=True)
    counts, failed = q.read_status(tmp_path)  # from "another process": no lock needed
    assert counts == {q.FAILED: 1} and failed[0].reason == "refused"
    assert q.requeue_failed(tmp_path) == 1
    assert spool.get(item.id).state == q.CLASSIFIED and spool.get(item.id).attempts == 0


def test_one_router_per_spool(tmp_path):
    spool = SpoolQueue(tmp_path)
    with pytest.raises(SpoolLockedError):
        SpoolQueue(tmp_path)
    spool.close()
    SpoolQueue(tmp_path).close()


def test_recover_repairs_every_crash_point(tmp_path):
    spool = SpoolQueue(tmp_path)
    waiting, _ = store(spool, b"waiting", "1.1")
    classified, _ = store(spool, b"classified", "1.2")
    spool.set_classified([Classification(classified.id, "spine", 0.9, "m", "spine")])
    spool.defer(spool.get(classified.id), "down", delay=3600)
    done, _ = store(spool, b"done", "1.3")
    spool.set_classified([Classification(done.id, "spine", 0.9, "m", "spine")])
    spool.mark_done(done, q.FORWARDED)
    (spool.files / done.file).write_bytes(b"done")  # killed after the commit, before the unlink
    (spool.incoming / "x.dcm.part").write_bytes(b"half")  # killed while writing: never acknowledged
    orphan = write_dicom(spool.files / "123-orphan.dcm", bright_rows_image(10), sop_uid="1.4")  # no row yet
    spool.close()

    spool = SpoolQueue(tmp_path)
    report = spool.recover()
    assert report["partial_deleted"] == 1 and report["orphans_registered"] == 1 and report["done_files_deleted"] == 1
    assert report["pending"] == 3
    assert not (spool.files / done.file).exists() and not list(spool.incoming.iterdir())
    received = {i.sop_instance_uid: i for i in spool.received(10)}
    assert set(received) == {"1.1", "1.4"} and received["1.4"].file == orphan.name
    assert received["1.4"].sop_class_uid and received["1.4"].transfer_syntax
    assert [i.id for i in spool.due(["spine"], 10)] == [classified.id]  # its backoff is reset at start-up
    assert spool.path(waiting).read_bytes() == b"waiting"


def _store_and_die(root, ready):
    spool = SpoolQueue(root)
    store(spool, b"survives", "9.9")
    ready.set()
    os.kill(os.getpid(), signal.SIGKILL)


def test_an_acknowledged_object_survives_kill_9(tmp_path):
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_store_and_die, args=(tmp_path, ready))
    child.start()
    child.join(60)
    assert ready.is_set() and child.exitcode == -signal.SIGKILL
    spool = SpoolQueue(tmp_path)  # the dead process's lock is gone with it
    spool.recover()
    [item] = spool.received(10)
    assert item.sop_instance_uid == "9.9" and spool.path(item).read_bytes() == b"survives"


def _note_running_and_wait(root, ready):
    from utils.routing.node import STATE_KEY

    spool = SpoolQueue(root)  # takes the spool's lock, as the router does
    spool.set_meta(STATE_KEY, json.dumps({"state": "running", "time": 0, "pid": os.getpid(), "model_id": "m"}))
    ready.set()
    signal.pause()


def test_status_tells_a_router_killed_with_kill_9_from_a_running_one(tmp_path, capsys):
    import yaml

    import router as router_script

    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump({"model": "model.keras", "spool_dir": str(tmp_path / "spool"),
                                      "destinations": {"others": {"folder": "out"}}}))
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_note_running_and_wait, args=(tmp_path / "spool", ready))
    child.start()
    try:
        assert ready.wait(30)
        assert q.spool_in_use(tmp_path / "spool")
        if q._flock_held(os.stat(tmp_path / "spool" / "router.lock")) is not None:  # Linux: the lock table is read
            flock = q.fcntl.flock
            q.fcntl.flock = lambda *a: (_ for _ in ()).throw(AssertionError("--status must not take the lock"))
            try:
                assert q.spool_in_use(tmp_path / "spool")
            finally:
                q.fcntl.flock = flock
        assert router_script.main(["--config", str(config), "--status"]) == 0
        assert "  router: running since 1970-01-01T00:00:00Z (pid" in capsys.readouterr().out
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    assert child.exitcode == -signal.SIGKILL and not q.spool_in_use(tmp_path / "spool")
    assert router_script.main(["--config", str(config), "--status"]) == 0
    out = capsys.readouterr().out
    assert "  router: not running (a stale note from a router that did not stop cleanly, e.g. kill -9" in out
    assert "it last noted: running since 1970-01-01T00:00:00Z" in out
    assert not q.spool_in_use(tmp_path / "nowhere")


def test_the_lock_table_is_read_by_device_and_inode(tmp_path):
    table = tmp_path / "locks"
    target = tmp_path / "router.lock"
    target.touch()
    stat = os.stat(target)
    mine = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    table.write_text(f"1: POSIX  ADVISORY  WRITE 10 {mine} 0 EOF\n"  # another kind of lock on it
                     f"2: -> FLOCK  ADVISORY  WRITE 11 {mine} 0 EOF\n"  # a waiter, not a holder
                     f"3: FLOCK  ADVISORY  WRITE 12 {mine[:-1]}9{stat.st_ino % 10 + 1} 0 EOF\n")  # another file
    assert q._flock_held(stat, str(table)) is False
    table.write_text(table.read_text() + f"4: FLOCK  ADVISORY  WRITE 13 {mine} 0 EOF\n")
    assert q._flock_held(stat, str(table)) is True
    assert q._flock_held(stat, str(tmp_path / "missing")) is None


def test_audit_lines_are_json_with_time_and_event(tmp_path):
    audit = AuditLog(tmp_path / "a" / "audit.jsonl")
    audit.write("received", sop_instance_uid="1.2", size=3)
    audit.write("forwarded", sop_instance_uid="1.2", destination="X@h:1", status="0x0000")
    audit.close()
    with open(tmp_path / "a" / "audit.jsonl", "a") as f:
        f.write('{"torn')  # a crash mid-line is skipped by the reader
    records = read_audit(tmp_path / "a" / "audit.jsonl")
    assert [r["event"] for r in records] == ["received", "forwarded"]
    assert all("time" in r and r["sop_instance_uid"] == "1.2" for r in records)
    assert json.loads((tmp_path / "a" / "audit.jsonl").read_text().splitlines()[0])["size"] == 3
