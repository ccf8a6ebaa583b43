"""router.py --backup: a consistent copy of a live spool (queue database by SQLite's backup API, then its files)."""

import json
import sqlite3
import threading

import pytest
import yaml

import router
from utils.routing.operations import backup as backup_module
from utils.routing import queue as q
from utils.routing.operations.audit import AuditLog, read_audit
from utils.routing.operations.backup import BackupError, backup
from utils.routing.operations.config import load_config
from utils.routing.queue import Classification, SpoolQueue

CLASSES = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")


def store(spool: SpoolQueue, data: bytes, uid: str):
    return spool.store(data, sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                       transfer_syntax="1.2.840.10008.1.2.1", calling_ae="SENDER")[0]


def write_config(tmp_path, spool):
    path = tmp_path / "router.yaml"
    folders = {c: {"folder": str(tmp_path / "out" / c)} for c in (*CLASSES, "uncertain")}
    path.write_text(yaml.safe_dump({"model": "model.keras", "destinations": folders, "spool_dir": str(spool)}))
    return path


@pytest.fixture
def live(tmp_path):
    """A spool with a waiting, a classified, a failed and a forwarded object, a review link, a corrections dataset
    and an audit log; the queue stays open (as in a running router)."""
    spool_dir = tmp_path / "spool"
    spool = SpoolQueue(spool_dir)
    audit = AuditLog(spool_dir / "audit.jsonl")
    waiting = store(spool, b"waiting", "1.1")
    classified, failed, forwarded = (store(spool, f"obj{i}".encode(), f"1.{i}") for i in (2, 3, 4))
    spool.set_classified([Classification(i.id, "spine", 0.9, "model-7", "spine", decided_by="model:model-7")
                          for i in (classified, failed, forwarded)])
    spool.defer(spool.get(failed.id), "refused", delay=0, give_up=True)
    spool.mark_done(spool.get(forwarded.id), q.FORWARDED, "0x0000")
    (spool_dir / "review").mkdir()
    (spool_dir / "review" / f"{classified.id}.dcm").hardlink_to(spool.path(classified))
    (spool_dir / "corrections" / "files").mkdir(parents=True)
    (spool_dir / "corrections" / "files" / "1.2.dcm").write_bytes(b"obj2")
    (spool_dir / "corrections" / "labels.csv").write_text("path,label\nfiles/1.2.dcm,spine\n")
    audit.write("received", sop_instance_uid="1.1", item=waiting.id)
    yield spool, audit, write_config(tmp_path, spool_dir)
    audit.close()
    spool.close()


def open_copy(target):
    db = sqlite3.connect(target / "queue.sqlite3")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # self-contained, no WAL beside it
        return {r[0]: r[1] for r in db.execute("SELECT file, state FROM items")}
    finally:
        db.close()


def test_backup_of_a_live_spool_has_the_rows_and_their_files(live, tmp_path):
    spool, audit, config_file = live
    config = load_config(config_file)
    manifest, parts = backup(config, tmp_path / "bak", config_file)
    target = tmp_path / "bak"
    rows = open_copy(target)
    assert rows == {i.file: i.state for i in spool.items()}
    assert not list(target.glob("queue.sqlite3-*"))
    unsettled = {f for f, state in rows.items() if state not in q.DONE}
    assert {p.name for p in (target / "files").iterdir()} == unsettled
    for name in unsettled:
        assert (target / "files" / name).read_bytes() == (spool.files / name).read_bytes()
    assert (target / "review").is_dir() and len(list((target / "review").iterdir())) == 1
    assert (target / "corrections" / "labels.csv").read_text().startswith("path,label")
    assert (target / "corrections" / "files" / "1.2.dcm").read_bytes() == b"obj2"
    assert [r["event"] for r in read_audit(target / "audit.jsonl")] == ["received"]
    assert (target / "router.yaml").read_text() == config_file.read_text()
    written = json.loads((target / "backup.json").read_text())
    assert written == manifest
    assert written["rows_by_state"] == spool.counts() and written["model_id"] == "model-7"
    assert written["router_running"] is True and written["integrity_check"] == "ok"
    assert written["files"]["files"]["linked"] + written["files"]["files"]["copied"] == len(unsettled)
    assert parts["files"].skipped == 0
    # a hard link or a copy, never a move: the spool is untouched
    assert all(spool.path(i).is_file() for i in spool.items() if i.state not in q.DONE)
    # the copy is a spool a router opens (the schema is set up, WAL turned on again)
    spool_copy = SpoolQueue(target)
    try:
        assert spool_copy.counts() == spool.counts() and spool_copy.recover()["missing_files"] == 0
    finally:
        spool_copy.close()


def test_the_copy_is_one_commit_while_a_writer_keeps_going(live, tmp_path):
    spool, _, config_file = live
    config = load_config(config_file)
    stop, stored = threading.Event(), []

    def writer():
        while not stop.is_set():
            stored.append(store(spool, f"more{len(stored)}".encode(), f"2.{len(stored)}"))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(stored) < 20:
            pass
        backup(config, tmp_path / "bak")
    finally:
        stop.set()
        thread.join()
    rows = open_copy(tmp_path / "bak")
    assert len(rows) >= 24  # the four of the fixture and what the writer committed before the copy
    assert all((tmp_path / "bak" / "files" / f).is_file() for f, state in rows.items() if state not in q.DONE)


def test_a_write_transaction_held_during_the_backup_is_not_in_the_copy(live, tmp_path):
    spool, _, config_file = live
    before = spool.counts()
    writer = sqlite3.connect(spool.root / "queue.sqlite3", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE items SET state = 'forwarded'")
    try:
        backup(load_config(config_file), tmp_path / "bak")  # does not wait for the writer (WAL)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert sorted(open_copy(tmp_path / "bak").values()) == sorted(
        state for state, n in before.items() for _ in range(n))


def test_a_non_empty_target_is_refused(live, tmp_path):
    _, _, config_file = live
    target = tmp_path / "bak"
    target.mkdir()
    (target / "something").write_text("x")
    with pytest.raises(BackupError, match="not an empty folder"):
        backup(load_config(config_file), target)
    assert [p.name for p in target.iterdir()] == ["something"]
    (target / "something").unlink()
    backup(load_config(config_file), target)  # an empty folder is fine


def test_a_file_delivered_during_the_copy_is_skipped(live, tmp_path, monkeypatch):
    spool, _, config_file = live
    first = spool.items()[0]
    real = backup_module._link_or_copy

    def deliver_first(source, target, tally, name):
        if name == first.file:
            spool.mark_done(spool.get(first.id), q.FORWARDED, "0x0000")  # delivered meanwhile: file deleted
        real(source, target, tally, name)

    monkeypatch.setattr(backup_module, "_link_or_copy", deliver_first)
    manifest, parts = backup(load_config(config_file), tmp_path / "bak")
    assert parts["files"].skipped == 1 and parts["files"].skipped_names == [first.file]
    assert manifest["files"]["files"]["skipped"] == 1
    assert not (tmp_path / "bak" / "files" / first.file).exists()


def test_router_backup_flag(live, tmp_path, capsys):
    _, _, config_file = live
    target = tmp_path / "bak"
    assert router.main(["--config", str(config_file), "--backup", str(target)]) == 0
    out = capsys.readouterr().out
    assert f"in {target}" in out and "integrity ok" in out and "files: 3 files" in out and "backup.json" in out
    assert (target / "backup.json").is_file()
    assert router.main(["--config", str(config_file), "--backup", str(target)]) == 2  # not empty any more
    assert "not an empty folder" in capsys.readouterr().err


def test_backup_of_a_stopped_router_and_of_no_queue(tmp_path):
    spool = SpoolQueue(tmp_path / "spool")
    store(spool, b"a", "1.1")
    spool.close()
    config_file = write_config(tmp_path, tmp_path / "spool")
    manifest, _ = backup(load_config(config_file), tmp_path / "bak")
    assert manifest["router_running"] is False and manifest["rows_by_state"] == {q.RECEIVED: 1}
    with pytest.raises(BackupError, match="no queue here"):
        backup(load_config(write_config(tmp_path, tmp_path / "nothing")), tmp_path / "bak2")
