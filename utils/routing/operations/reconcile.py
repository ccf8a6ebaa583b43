"""Make the audit log complete again after a crash: the lines the queue says are owed, written at start-up.

The router commits a change to the queue, then writes its audit line (``received``,
``classified``). A kill -9 between the two loses the line, and an object re-registered at
recovery from a spool file without a row (killed between the file's rename and its row's commit)
never had one. At each start, after the queue's recovery and before anything is accepted,
:func:`reconcile_audit` compares the queue with the audit log and appends what is missing, each
line marked ``"reconciled": true`` with ``at``, the time the queue recorded for the change:

- ``received`` for every object registered by this recovery (``orphan: true``), and for every
  object the previous run received (item ids above the mark, see below) without a line;
- ``classified`` for every decision the previous run committed (``classified_at``) without a line;
- ``forwarded`` / ``quarantined`` (status ``confirmed``) for every delivery the previous run
  committed without a line (the forwarders write these lines before the commit, so this only
  catches an audit write that failed or an older router's crash);
- ``corrected`` / ``requeued`` for every action an operator took from the console's review list
  (utils/routing/operations/review.py) that the previous run committed without its line: the row keeps the
  line's fields (``review_note``) and its time (``reviewed_at``, also in the line, which tells an
  item's second correction from its first).

Only the previous run is compared, so the cost is one read of the lines it wrote, whatever the age
of the log: each start notes in the queue (table ``meta``, key ``audit_mark``) where the log ended,
the highest item id and the time. The previous run is then the log from that offset and the rows
changed since that time. A log that was replaced meanwhile (another inode, or shorter than the
mark: rotated) is not compared (a warning says so); nothing is ever written twice for one change.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from utils.routing.operations.audit import AuditLog, rotated
from utils.routing.queue import DONE, QUARANTINED, QueueItem, SpoolQueue

log = logging.getLogger(__name__)

MARK_KEY = "audit_mark"
_DELIVERED = ("forwarded", "quarantined")
_REVIEWED = ("corrected", "requeued")  # the console's actions (utils/routing/operations/review.py)


@dataclass(frozen=True)
class AuditMark:
    """Where one run's part of the audit log starts, and what the queue held then."""

    path: str
    inode: int
    offset: int
    time: float
    last_id: int


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.UTC).isoformat(timespec="milliseconds")


def read_mark(queue: SpoolQueue) -> AuditMark | None:
    text = queue.get_meta(MARK_KEY)
    if text is None:
        return None
    try:
        return AuditMark(**json.loads(text))
    except (TypeError, ValueError) as error:
        log.warning("spool database: unreadable %s (%s); the audit log is not compared this time", MARK_KEY, error)
        return None


def write_mark(queue: SpoolQueue, audit: AuditLog) -> AuditMark:
    mark = AuditMark(str(audit.path), os.stat(audit.path).st_ino, audit.size(), time.time(), queue.max_id())
    queue.set_meta(MARK_KEY, json.dumps(asdict(mark)))
    return mark


def logged_items(audit: AuditLog, mark: AuditMark) -> dict[str, set[int]] | None:
    """Item ids per event (received, classified, delivered) in the log since ``mark``; None if the file the mark
    points into is gone. After logrotate the mark's file is found among the rotated ones by its inode (an
    uncompressed ``audit.jsonl.1``, say) and read from the mark on, then every newer file."""
    files = [p for p in rotated(audit.path) if p.suffix != ".gz"]
    start = None
    for index, path in enumerate(files):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        if stat.st_ino == mark.inode and stat.st_size >= mark.offset:
            start = index
    if str(audit.path) != mark.path or start is None:
        log.warning("audit log %s was replaced since the last start (moved, or rotated and compressed?); the lines "
                    "a crash may have cost are not looked for this time", audit.path)
        return None
    seen: dict[str, set] = {"received": set(), "classified": set(), "delivered": set(), "reviewed": set()}
    for index, path in enumerate(files[start:]):
        with open(path, "rb") as handle:
            handle.seek(mark.offset if index == 0 else 0)
            _collect(handle, seen)
    return seen


def _collect(handle, seen: dict[str, set]) -> None:
    for line in handle:
        if b'"item":' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by the crash
            continue
        event, item = record.get("event"), record.get("item")
        if not isinstance(item, int):
            continue
        if event in ("received", "classified"):
            seen[event].add(item)
        elif event in _DELIVERED and record.get("status") not in ("retry", "failed"):
            seen["delivered"].add(item)
        elif event in _REVIEWED:
            seen["reviewed"].add((event, item, record.get("reviewed_at")))


def reconcile_audit(queue: SpoolQueue, audit: AuditLog, destination_of: Callable[[str], str] = str,
                    orphans: list[QueueItem] | None = None) -> dict[str, int]:
    """Append the lines the queue says are missing, then mark where this run starts; counts per event.

    ``destination_of(route)`` names a route's destination for the reconstructed delivery lines;
    ``orphans`` (default: ``queue.recovered_orphans``) are the objects registered by this recovery.
    """
    orphans = queue.recovered_orphans if orphans is None else orphans
    written = {"received": 0, "classified": 0, "delivered": 0, "reviewed": 0}
    for item in orphans:
        _received(audit, item, orphan=True)
        written["received"] += 1
    mark = read_mark(queue)
    seen = logged_items(audit, mark) if mark is not None else None
    if seen is not None:
        orphan_ids = {i.id for i in orphans}
        for item in queue.rows_where("id > ?", (mark.last_id,)):
            if item.id not in seen["received"] and item.id not in orphan_ids:
                _received(audit, item, orphan=False)
                written["received"] += 1
        for item in queue.rows_where("classified_at >= ? AND label != ''", (mark.time,)):
            if item.id not in seen["classified"]:
                audit.write("classified", sop_instance_uid=item.sop_instance_uid, item=item.id, label=item.label,
                            confidence=item.confidence, model_id=item.model_id, route=item.route,
                            reason=item.classify_reason or None, decided_by=item.decided_by or None, reconciled=True,
                            at=_iso(item.classified_at))
                written["classified"] += 1
        for item in queue.rows_where(f"state IN ({','.join('?' * len(DONE))}) AND updated_at >= ?", (*DONE, mark.time)):
            if item.id not in seen["delivered"]:
                audit.write("quarantined" if item.state == QUARANTINED else "forwarded",
                            sop_instance_uid=item.sop_instance_uid, item=item.id, label=item.label,
                            destination=destination_of(item.route), status="confirmed", detail=item.reason or None,
                            reconciled=True, at=_iso(item.updated_at))
                written["delivered"] += 1
        for item in queue.rows_where("reviewed != '' AND reviewed_at >= ?", (mark.time,)):
            if item.reviewed in _REVIEWED and (item.reviewed, item.id, item.reviewed_at) not in seen["reviewed"]:
                try:
                    fields = json.loads(item.review_note or "{}")
                except ValueError:
                    fields = {}
                fields = {**fields, "sop_instance_uid": item.sop_instance_uid, "item": item.id}
                audit.write(item.reviewed, **fields, reviewed_at=item.reviewed_at, reconciled=True,
                            at=_iso(item.reviewed_at))
                written["reviewed"] += 1
    if any(written.values()):
        log.warning("audit log %s: wrote %s line(s) a crash had cost (marked \"reconciled\": true)", audit.path,
                    ", ".join(f"{n} {k}" for k, n in written.items() if n))
    write_mark(queue, audit)
    return written


def _received(audit: AuditLog, item: QueueItem, *, orphan: bool) -> None:
    audit.write("received", sop_instance_uid=item.sop_instance_uid, sop_class_uid=item.sop_class_uid,
                transfer_syntax=item.transfer_syntax, calling_ae=item.calling_ae, size=item.size, item=item.id,
                duplicate=False, reconciled=True, orphan=orphan, at=_iso(item.received_at))
