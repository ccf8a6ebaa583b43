"""What a DICOM peer chooses (SOP Instance UID, AE title) stays data: it never chooses where the router writes,
never takes a folder destination down, and never forges a log or audit line.

Cheap objects only: the Storage SCP's handler fed with events shaped like pynetdicom's, the spool queue, and the
folder forwarder the router uses for the quarantine; no router process, no model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from utils.routing.delivery import forwarder as forwarder_module
from utils.routing import queue as q
from utils.routing.operations.audit import AuditLog, read_audit
from utils.routing.operations.config import Destination
from utils.routing.delivery.forwarder import FolderForwarder
from utils.routing.queue import Classification, SpoolQueue
from utils.routing.intake.scp import StoreHandler
from utils.untrusted import is_safe_component, safe_uid

VALID = "1.2.826.0.1.3680043.8.498.1"
HOSTILE_UIDS = {
    "climbing": "../../../escaped",
    "absolute": "/tmp/router-escaped-absolute",
    "missing_parent": "1.2/../../escaped-parent",  # once took the whole folder destination down
    "dotdot": "..",
    "dot": ".",
    "empty": "",
    "nul": "1.2\x00/../../x",
    "crlf": "1.2.3\r\n2024-01-01 00:00:00 INFO forged line",
    "very_long": "1." + "9" * 300,
    "rtl_override": "1.2.3\u202egpj.exe",
    "windows": "..\\..\\escaped",
    "windows_reserved": "NUL",
    "escape_sequence": "\x1b[2J",
    "valid": VALID,
}
HOSTILE_AES = ["../../AE", "AE\r\nFORGED", "\x1b[31mRED", "", "ST\u202eORE"]
CONFIG = SimpleNamespace(retry_initial_s=0.01, retry_max_s=0.02, max_attempts=2, ae_title="ROUTER")


class _Event:
    """The parts of pynetdicom's C-STORE event the StoreHandler reads."""

    def __init__(self, data: bytes, sop_instance_uid: str, calling_ae: str) -> None:
        self._data = data
        self.request = SimpleNamespace(AffectedSOPInstanceUID=sop_instance_uid,
                                       AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.1.1")
        self.context = SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1")
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title=calling_ae))

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        return self._data


@pytest.fixture
def spool(tmp_path):
    queue, audit = SpoolQueue(tmp_path / "spool"), AuditLog(tmp_path / "spool" / "audit.jsonl")
    yield queue, audit
    audit.close()
    queue.close()


def receive(queue, audit, uids: list[str]) -> list:
    """Each UID received through the Storage SCP's handler (a hostile AE title each), classified unreadable."""
    handler = StoreHandler(queue, audit, lambda: None)
    for i, uid in enumerate(uids):
        assert handler.handle_store(_Event(f"object {i}".encode(), uid, HOSTILE_AES[i % len(HOSTILE_AES)])) == 0
    items = queue.received(len(uids) + 1)
    queue.set_classified([Classification(i.id, "unreadable", None, "", "unreadable", "no_pixel_data") for i in items])
    return items


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def test_hostile_uids_are_quarantined_inside_the_folder_and_the_destination_stays_up(tmp_path, spool, caplog):
    queue, audit = spool
    before = files_under(tmp_path)
    outside = Path("/tmp/router-escaped-absolute.dcm")
    outside.unlink(missing_ok=True)
    items = receive(queue, audit, list(HOSTILE_UIDS.values()))
    quarantine = tmp_path / "spool" / "quarantine"
    worker = FolderForwarder(Destination("unreadable", folder=quarantine), ["unreadable"], queue, audit, CONFIG)
    with caplog.at_level(logging.INFO):
        assert worker.deliver(queue.due(["unreadable"], 100)) is None  # None: nobody calls the destination down

    assert all(queue.get(i.id).state == q.QUARANTINED for i in items)
    written = files_under(tmp_path) - before
    spooled = {p for p in written if p.is_relative_to(tmp_path / "spool") and not p.is_relative_to(quarantine)}
    copies = written - spooled
    assert copies and all(p.parent == quarantine and is_safe_component(p.name) for p in copies), sorted(copies)
    assert all(p.parent in (tmp_path / "spool", queue.files) for p in spooled), sorted(spooled)
    assert not outside.exists() and not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()

    sidecars = {json.loads(p.read_text())["sop_instance_uid"]: p for p in copies if p.suffix == ".json"}
    assert set(sidecars) == set(HOSTILE_UIDS.values())  # the UID is kept, as data, beside its copy
    assert sidecars[VALID].name == f"{VALID}.json"  # a valid UID names its copy as before
    for uid, sidecar in sidecars.items():
        assert sidecar.with_suffix(".dcm").is_file()
        if uid:
            assert sidecar.stem == safe_uid(uid)

    lines = (tmp_path / "spool" / "audit.jsonl").read_bytes().splitlines()
    assert all(line.isascii() and all(32 <= b < 127 for b in line) for line in lines)  # JSON escapes them
    records = read_audit(tmp_path / "spool" / "audit.jsonl")
    assert len(records) == len(lines) and {r["event"] for r in records} == {"received", "quarantined"}
    assert {r["calling_ae"] for r in records if r["event"] == "received"} == {a.strip() for a in HOSTILE_AES}
    assert not any(r["event"] == "destination_down" for r in records)
    assert not any(c in r.getMessage() for r in caplog.records for c in "\r\n\x1b\x00\u202e")


def test_a_link_inside_the_folder_pointing_out_is_never_written_through(tmp_path, spool):
    queue, audit = spool
    quarantine, outside = tmp_path / "quarantine", tmp_path / "outside"
    quarantine.mkdir()
    outside.mkdir()
    (quarantine / f"{VALID}.dcm").symlink_to(outside / "victim.dcm")
    (quarantine / f"{VALID}_1.dcm").symlink_to(outside / "victim_1.dcm")
    (outside / "victim.json").write_text("precious")
    (quarantine / f"{VALID}_2.json").symlink_to(outside / "victim.json")
    [item] = receive(queue, audit, [VALID])
    worker = FolderForwarder(Destination("unreadable", folder=quarantine), ["unreadable"], queue, audit, CONFIG)
    assert worker.deliver(queue.due(["unreadable"], 10)) is None
    assert queue.get(item.id).state == q.QUARANTINED
    assert sorted(p.name for p in outside.iterdir()) == ["victim.json"] and (outside / "victim.json").read_text() \
        == "precious"
    copy = quarantine / f"{VALID}_2.dcm"
    assert copy.is_file() and not copy.is_symlink() and copy.read_bytes() == b"object 0"
    assert not (quarantine / f"{VALID}_2.json").is_symlink()  # the link was replaced, not followed
    assert json.loads((quarantine / f"{VALID}_2.json").read_text())["sop_instance_uid"] == VALID


def test_an_object_that_cannot_be_written_fails_alone_and_the_others_go_on(tmp_path, spool, monkeypatch, caplog):
    """One object's write fails while the folder takes files (a name the filesystem refuses, its spool file
    gone): that object is retried, then failed with the reason; the destination is not down."""
    queue, audit = spool
    items = receive(queue, audit, ["1.2.1", "1.2.2\r\nFORGED", "1.2.3"])
    queue.path(items[1]).unlink()  # its spool file is gone
    real_stem = forwarder_module.copy_stem
    monkeypatch.setattr(forwarder_module, "copy_stem",  # the old naming for one object: a path with a missing parent
                        lambda item: "1.2/../../x" if item.sop_instance_uid == "1.2.3" else real_stem(item))
    folder = tmp_path / "share"
    worker = FolderForwarder(Destination("unreadable", folder=folder), ["unreadable"], queue, audit, CONFIG)
    for _ in range(CONFIG.max_attempts):
        assert worker.deliver(queue.due(["unreadable"], 10, now=float("inf"))) is None
    states = {i.sop_instance_uid[:5]: queue.get(i.id) for i in items}
    assert states["1.2.1"].state == q.QUARANTINED
    assert states["1.2.2"].state == q.FAILED and "No such file" in states["1.2.2"].reason
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any("1.2.2\\r\\nFORGED" in m for m in refusals) and not any("\n" in m for m in refusals)
    assert states["1.2.3"].state == q.FAILED and "not a safe file name" in states["1.2.3"].reason
    assert sorted(p.name for p in folder.iterdir()) == ["1.2.1.dcm", "1.2.1.json"]  # no probe or part file left
    assert not (tmp_path / "x.dcm").exists()
    events = [r for r in read_audit(tmp_path / "spool" / "audit.jsonl") if r["event"] == "forwarded"]
    assert [r["status"] for r in events if r["sop_instance_uid"] == "1.2.3"] == ["retry", "failed"]
    assert worker.failures == 0


def test_a_full_folder_is_still_the_destination_being_down(tmp_path, spool, monkeypatch):
    queue, audit = spool
    receive(queue, audit, ["1.2.1"])
    folder = tmp_path / "share"

    def full(*args, **kwargs):
        raise OSError(28, os.strerror(28))  # ENOSPC

    monkeypatch.setattr(forwarder_module.shutil, "copyfileobj", full)
    worker = FolderForwarder(Destination("unreadable", folder=folder), ["unreadable"], queue, audit, CONFIG)
    problem = worker.deliver(queue.due(["unreadable"], 10))
    assert problem and "No space left" in problem


def test_corrections_of_hostile_objects_stay_inside_the_dataset(tmp_path, spool):
    """The console's corrections dataset: one file per object, named from its UID, inside ``files/``; labels.csv
    keeps one row per line, with the UID and Patient ID the sender chose, escaped, and prepare.py reads it."""
    import csv

    from utils.data.prepare import list_source
    from utils.routing.operations.review import ReviewDesk, ReviewError

    queue, audit = spool
    uids = list(HOSTILE_UIDS.values())
    handler = StoreHandler(queue, audit, lambda: None)
    for i, uid in enumerate(uids):
        handler.handle_store(_Event(f"object {i}".encode(), uid, "AE"))
    items = queue.received(100)
    queue.set_classified([Classification(i.id, "uncertain", 0.4, "m", "uncertain", patient_id=f"P\r\n{n}=1+1\x00")
                          for n, i in enumerate(items)])
    corrections = tmp_path / "corrections"
    (corrections / "files").mkdir(parents=True)
    (corrections / "files" / f"{VALID}.dcm").symlink_to(tmp_path / "victim.dcm")
    desk = ReviewDesk(queue, audit, ("spine", "others"), {}, tmp_path / "spool" / "review", corrections,
                      forward=False)
    for item in items:
        if item.sop_instance_uid == VALID:
            with pytest.raises(ReviewError, match="would leave"):  # a planted link is refused, not followed
                desk.correct(item.id, "spine", who="alice")
            (corrections / "files" / f"{VALID}.dcm").unlink()
        desk.correct(item.id, "spine", who="alice\r\nmallory")
    assert not (tmp_path / "victim.dcm").exists()
    written = sorted(p for p in corrections.rglob("*") if p.is_file())
    assert all(p.parent in (corrections, corrections / "files") for p in written)
    assert len([p for p in written if p.parent == corrections / "files"]) == len(uids)
    lines = (corrections / "labels.csv").read_text().splitlines()
    assert len(lines) == len(uids) + 1 and "\x00" not in "".join(lines)
    rows = list(csv.DictReader((corrections / "labels.csv").open(newline="")))
    assert {r["group"] for r in rows} == {f"P\\r\\n{n}=1+1\\x00" for n in range(len(uids))}
    assert {r["who"] for r in rows} == {"alice\\r\\nmallory"}
    listing = list_source(corrections / "labels.csv", ("spine", "others"))
    assert len(listing.items) == len(uids) and not listing.rejects


def test_status_shows_hostile_uids_escaped(tmp_path, model_file, capsys):
    """``router.py --status`` prints UIDs and reasons to an operator's terminal: a sender's escape sequence or
    line break there is shown, not obeyed."""
    import router as router_script

    from .conftest import CLASSES, free_port, write_config

    config_file = write_config(tmp_path / "router.yaml", port=free_port(), spool=tmp_path / "spool",
                               model=model_file, destinations={c: {"folder": "out"} for c in [*CLASSES, "uncertain"]})
    queue = SpoolQueue(tmp_path / "spool")
    try:
        hostile = "1.2\x1b[2J\r\nFAKE"
        unreadable, failed = (queue.store(f"object {n}".encode(), sop_instance_uid=hostile + str(n),
                                          sop_class_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1")[0]
                              for n in (1, 2))
        queue.set_classified([Classification(unreadable.id, "unreadable", None, "m", "unreadable", "no_pixel_data"),
                              Classification(failed.id, "spine", 0.9, "m", "spine")])
        queue.defer(queue.get(failed.id), "C-STORE status 0xA700: comment\x1b]0;title\x07", delay=0, give_up=True)
        assert router_script.main(["--config", str(config_file), "--status"]) == 0
    finally:
        queue.close()
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\nFAKE" not in out
    assert "1.2\\x1b[2J\\r\\nFAKE1 (classified): no_pixel_data" in out
    assert "failed 1.2\\x1b[2J\\r\\nFAKE2 -> spine: C-STORE status 0xA700: comment\\x1b]0;title\\x07" in out
