"""The Orthanc source without Orthanc: a small in-memory change feed stands in for Orthanc's REST API.

The real thing (Orthanc processes, kill -9) is tests/routing/test_orthanc.py; here each branch of
the source: the cursor committed with each row and resumed after a restart, skipped modalities and
the router's own objects, an instance deleted before it was fetched, Orthanc down then back, a
change feed behind the cursor (a new Orthanc database), and the cursor in one transaction with the row.
"""

from __future__ import annotations

import hashlib

import pydicom
import pytest

from utils.routing.operations.audit import AuditLog, read_audit
from utils.routing.intake.orthanc_source import (
    CURSOR_KEY,
    OrthancError,
    OrthancNotFound,
    OrthancSource,
    OrthancSourceSettings,
    read_cursor,
)
from utils.routing.queue import SpoolQueue

from .conftest import bright_rows_image, wait_for, write_dicom


def orthanc_id(name: str) -> str:
    """An identifier of Orthanc's shape (a SHA-1 in five groups of 8 hex digits) for a test's short name."""
    digest = hashlib.sha1(name.encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


class FakeOrthanc:
    """Orthanc's change feed and instances in memory: ``add`` stores an instance and logs its changes."""

    def __init__(self) -> None:
        self.changes_log: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.modality: dict[str, str] = {}
        self.remote: dict[str, str] = {}
        self.down = False
        self.asked: list[str] = []  # every path asked for

    def add(self, name: str, data: bytes, modality: str = "DX", remote: str = "MODALITY", *,
            raw_id: str | None = None) -> None:
        """An instance named ``name`` (its ID: orthanc_id(name)); ``raw_id``: the ID Orthanc's answer carries."""
        instance = orthanc_id(name) if raw_id is None else raw_id
        self.files[instance], self.modality[instance], self.remote[instance] = data, modality, remote
        for kind, resource in (("NewInstance", "Instance"), ("NewSeries", "Series")):
            self.changes_log.append({"Seq": len(self.changes_log) + 1, "ChangeType": kind, "ResourceType": resource,
                                     "ID": instance})

    def delete(self, name: str) -> None:
        del self.files[orthanc_id(name)]

    def _check(self) -> None:
        if self.down:
            raise OrthancError("GET http://fake/changes: [Errno 111] Connection refused")

    def changes(self, since: int, limit: int) -> dict:
        self._check()
        page = [c for c in self.changes_log if c["Seq"] > since][:limit]
        last = page[-1]["Seq"] if page else len(self.changes_log)
        return {"Changes": page, "Done": not page or last == len(self.changes_log), "Last": last}

    def last_change(self) -> int:
        self._check()
        return len(self.changes_log)

    def get_json(self, path: str) -> dict:
        self._check()
        self.asked.append(path)
        instance = path.split("/")[2]
        if instance not in self.files:
            raise OrthancNotFound(f"GET {path}: 404 not found")
        if path.endswith("/series"):
            return {"MainDicomTags": {"Modality": self.modality[instance]}}
        return {"RemoteAET": self.remote[instance]}

    def get(self, path: str) -> bytes:
        self._check()
        self.asked.append(path)
        instance = path.split("/")[2]
        if instance not in self.files:
            raise OrthancNotFound(f"GET {path}: 404 not found")
        return self.files[instance]


@pytest.fixture
def images(tmp_path):
    paths = [write_dicom(tmp_path / "in" / f"{i}.dcm", bright_rows_image(10 + i)) for i in range(4)]
    return [(p.read_bytes(), str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)) for p in paths]


def make_source(tmp_path, orthanc, **settings):
    queue, audit = SpoolQueue(tmp_path / "spool"), AuditLog(tmp_path / "spool" / "audit.jsonl")
    source = OrthancSource(OrthancSourceSettings("http://fake", poll_s=0.01, batch=3, **settings), queue, audit,
                           own_ae_title="ROUTER", on_received=lambda: None, retry_initial_s=0.01, retry_max_s=0.02,
                           client=orthanc)
    return source, queue, audit


def drain(source) -> None:
    while not source.step():
        pass


def test_cursor_advances_with_each_row_and_resumes_after_a_restart(tmp_path, images):
    orthanc = FakeOrthanc()
    orthanc.add("a", images[0][0])
    orthanc.add("ct", images[1][0], modality="CT")  # not a projection modality: not fetched
    orthanc.add("own", images[2][0], remote="ROUTER")  # sent to Orthanc by this router: not fetched again
    source, queue, audit = make_source(tmp_path, orthanc, start_from="beginning")
    drain(source)
    assert [i.sop_instance_uid for i in queue.items()] == [images[0][1]]
    assert queue.items()[0].calling_ae == "MODALITY"
    assert read_cursor(queue.get_meta(CURSOR_KEY)) == 6 and source.skipped == 2
    queue.close()
    audit.close()

    orthanc.add("b", images[3][0])
    orthanc.add("gone", images[3][0])
    orthanc.delete("gone")  # deleted from Orthanc before the router fetched it
    source, queue, audit = make_source(tmp_path, orthanc)
    drain(source)
    assert [i.sop_instance_uid for i in queue.items()] == [images[0][1], images[3][1]]  # "a" not fetched again
    assert read_cursor(queue.get_meta(CURSOR_KEY)) == 10
    events = [r["event"] for r in read_audit(tmp_path / "spool" / "audit.jsonl")]
    assert events == ["orthanc_cursor_start", "received", "received", "orthanc_skipped"]
    queue.close()


def test_start_from_latest_skips_what_orthanc_had_before(tmp_path, images):
    orthanc = FakeOrthanc()
    orthanc.add("old", images[0][0])
    source, queue, _ = make_source(tmp_path, orthanc)
    drain(source)
    orthanc.add("new", images[1][0])
    drain(source)
    assert [i.sop_instance_uid for i in queue.items()] == [images[1][1]]
    queue.close()


def test_orthanc_down_is_reported_once_and_retried(tmp_path, images):
    orthanc = FakeOrthanc()
    orthanc.down = True
    source, queue, _ = make_source(tmp_path, orthanc, start_from="beginning")
    source.start()
    try:
        wait_for(lambda: source.failures >= 3, 10, "three failed attempts")
        orthanc.add("a", images[0][0])
        orthanc.down = False
        wait_for(lambda: queue.items(), 10, "the instance to be fetched once Orthanc is back")
    finally:
        source.stop()
        source.join(5)
    events = [r["event"] for r in read_audit(tmp_path / "spool" / "audit.jsonl")]
    assert events.count("orthanc_source_down") == 1 and events.count("orthanc_source_up") == 1
    assert not source.died
    queue.close()


def test_a_feed_behind_the_cursor_starts_again_from_the_beginning(tmp_path, images):
    orthanc = FakeOrthanc()
    source, queue, _ = make_source(tmp_path, orthanc)
    queue.set_meta(CURSOR_KEY, '{"seq": 500, "url": "http://fake"}')  # from another Orthanc database
    orthanc.add("a", images[0][0])
    drain(source)
    assert [i.sop_instance_uid for i in queue.items()] == [images[0][1]]
    queue.close()


def test_the_cursor_is_committed_with_the_row_or_not_at_all(tmp_path):
    queue = SpoolQueue(tmp_path)
    queue.store(b"abc", sop_instance_uid="1.2", sop_class_uid="1.3", transfer_syntax="1.2.840.10008.1.2.1",
                meta=(CURSOR_KEY, '{"seq": 7}'))
    assert read_cursor(queue.get_meta(CURSOR_KEY)) == 7
    _, duplicate = queue.store(b"abc", sop_instance_uid="1.2", sop_class_uid="1.3",
                               transfer_syntax="1.2.840.10008.1.2.1", meta=(CURSOR_KEY, '{"seq": 8}'))
    assert duplicate and read_cursor(queue.get_meta(CURSOR_KEY)) == 7  # a duplicate writes nothing
    queue._db.execute("CREATE TRIGGER refuse BEFORE INSERT ON items BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(Exception, match="disk full"):
        queue.store(b"def", sop_instance_uid="1.4", sop_class_uid="1.3", transfer_syntax="1.2.840.10008.1.2.1",
                    meta=(CURSOR_KEY, '{"seq": 9}'))
    assert read_cursor(queue.get_meta(CURSOR_KEY)) == 7 and not queue._db.in_transaction
    queue.close()


@pytest.mark.parametrize("hostile", ["../../system", "a/../../tools/reset", "x?expand", "", "..",
                                     orthanc_id("a").upper(), orthanc_id("a") + "/../../system", "id\r\nX-Header: 1"])
def test_an_id_not_of_orthancs_shape_is_never_put_into_a_url(tmp_path, images, hostile, caplog):
    orthanc = FakeOrthanc()
    orthanc.add("bad", images[0][0], raw_id=hostile)
    orthanc.add("good", images[1][0])
    source, queue, audit = make_source(tmp_path, orthanc, start_from="beginning")
    drain(source)
    assert [i.sop_instance_uid for i in queue.items()] == [images[1][1]]  # the next instance is fetched
    assert orthanc.asked and all(path.split("/")[2] == orthanc_id("good") for path in orthanc.asked)
    assert read_cursor(queue.get_meta(CURSOR_KEY)) == 4 and source.skipped == 1 and source.down_since is None
    [skipped] = [r for r in read_audit(tmp_path / "spool" / "audit.jsonl") if r["event"] == "orthanc_skipped"]
    assert skipped["orthanc_id"] == hostile and skipped["reason"] == "not an Orthanc identifier"
    assert not any("\n" in r.getMessage() or "\r" in r.getMessage() for r in caplog.records)
    queue.close()
    audit.close()
