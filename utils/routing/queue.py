"""The router's persistent queue: spool files plus one SQLite row per received object.

Layout of the spool folder::

    spool/incoming/<name>.part   being written; never acknowledged, deleted at start-up
    spool/files/<name>.dcm       received exactly as sent (preamble, file meta, dataset bytes)
    spool/queue.sqlite3          one row per object: state, label, route, who decided it, attempts, reason,
                                 classification attempts
    spool/router.lock            held by the running router (a second one on the same spool fails)

States: ``received`` -> ``classified`` (label, route and ``decided_by`` set: ``rule:<name>`` or
``model:<model_id>``, see utils/routing/decision/rules.py) -> ``forwarded`` or ``quarantined``
(the destination confirmed; the spool file is deleted), or ``failed`` (a destination kept
refusing it; the file stays, ``router.py --requeue-failed`` tries again).

Classification attempts are counted durably: :meth:`SpoolQueue.start_classification` commits
``classify_attempts + 1`` before anything is decoded, so an attempt the process does not survive
(a decoder crash, a hang ended by a restart, kill -9) is counted too, and an object that keeps
killing the classifier can be given up (route ``unreadable``) instead of being first in the queue
after every restart. Attempts lost to a failure of the whole router (the model, the database) are
given back with :meth:`SpoolQueue.return_classification_attempts`.

Durability, in order: the file is written to ``incoming/``, fsynced, renamed into ``files/`` and
the folder fsynced; then the row is committed (WAL, ``synchronous=FULL``); only then does the SCP
answer success. A row is marked done before its file is unlinked. So after a crash (kill -9,
power loss) :meth:`SpoolQueue.recover` finds every state it can be in: a ``.part`` file (never
acknowledged: deleted), a file without a row (registered as received), a done row whose file
survived (file deleted), an unfinished row (it simply stays in the queue and is picked up again).
Delivery is at least once: an object can reach its destination twice if the router dies between
the destination's confirmation and the commit that records it, which DICOM receivers tolerate
(same SOP Instance UID).

A change that cannot be recorded (``database or disk is full``, an I/O error) raises
:class:`SpoolWriteError` and leaves the database as it was (a transaction whose COMMIT failed is
rolled back, never left open), so the caller can simply try again later; the workers treat it as
nobody's fault (no destination marked down, no classification attempt counted against an object).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from dataclasses import dataclass, field, replace
from pathlib import Path

from utils.untrusted import log_safe

log = logging.getLogger(__name__)

RECEIVED, CLASSIFIED, FORWARDED, QUARANTINED, FAILED = "received", "classified", "forwarded", "quarantined", "failed"
PENDING = (RECEIVED, CLASSIFIED)
DONE = (FORWARDED, QUARANTINED)
HISTORY_DAYS = 30  # rows of delivered objects are kept this long for `--status` and audits

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file TEXT NOT NULL UNIQUE,
    sop_instance_uid TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '',
    transfer_syntax TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    sha256 TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    confidence REAL,
    model_id TEXT NOT NULL DEFAULT '',
    route TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    classify_attempts INTEGER NOT NULL DEFAULT 0,
    classify_reason TEXT NOT NULL DEFAULT '',
    classified_at REAL NOT NULL DEFAULT 0,
    decided_by TEXT NOT NULL DEFAULT '',
    probs TEXT NOT NULL DEFAULT '',
    body_part_examined TEXT NOT NULL DEFAULT '',
    study_instance_uid TEXT NOT NULL DEFAULT '',
    patient_id TEXT NOT NULL DEFAULT '',
    tag_disagrees INTEGER,
    reviewed TEXT NOT NULL DEFAULT '',
    reviewed_at REAL NOT NULL DEFAULT 0,
    review_note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS items_state ON items (state, route, next_attempt);
CREATE INDEX IF NOT EXISTS items_sop ON items (sop_instance_uid);
CREATE INDEX IF NOT EXISTS items_received_at ON items (received_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Columns added after the first release: (name, definition); added in place to older spool databases.
_ADDED_COLUMNS = (("classify_attempts", "INTEGER NOT NULL DEFAULT 0"), ("classify_reason", "TEXT NOT NULL DEFAULT ''"),
                  ("classified_at", "REAL NOT NULL DEFAULT 0"), ("decided_by", "TEXT NOT NULL DEFAULT ''"),
                  # for the console (utils/routing/operations/console.py, review.py): what the classifier saw, and review
                  ("probs", "TEXT NOT NULL DEFAULT ''"), ("body_part_examined", "TEXT NOT NULL DEFAULT ''"),
                  ("study_instance_uid", "TEXT NOT NULL DEFAULT ''"), ("patient_id", "TEXT NOT NULL DEFAULT ''"),
                  ("tag_disagrees", "INTEGER"), ("reviewed", "TEXT NOT NULL DEFAULT ''"),
                  ("reviewed_at", "REAL NOT NULL DEFAULT 0"), ("review_note", "TEXT NOT NULL DEFAULT ''"))
# Indexes on added columns: created by migrate(), once the columns exist.
_ADDED_INDEXES = ("CREATE INDEX IF NOT EXISTS items_study ON items (study_instance_uid)",
                  "CREATE INDEX IF NOT EXISTS items_patient ON items (patient_id)",
                  "CREATE INDEX IF NOT EXISTS items_classified_at ON items (classified_at)")  # drift windows


class SpoolLockedError(RuntimeError):
    """Another router process is using this spool folder."""


class SpoolOpenError(OSError):
    """The spool database cannot be opened or set up (disk full, read-only, damaged); the router cannot start."""

    def __init__(self, root: Path, error: Exception) -> None:
        try:
            usage = shutil.disk_usage(root)
            space = f"; {usage.free / 1e6:.1f} MB free of {usage.total / 1e6:.0f} MB on its filesystem"
        except OSError:
            space = ""
        super().__init__(f"cannot open the spool database {root / 'queue.sqlite3'}: {error}{space}")


class SpoolWriteError(RuntimeError):
    """A change could not be recorded in the spool database (disk full, I/O error); nothing was changed."""


@dataclass(frozen=True)
class QueueItem:
    id: int
    file: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    calling_ae: str
    sha256: str
    size: int
    state: str
    label: str
    confidence: float | None
    model_id: str
    route: str
    reason: str
    attempts: int
    next_attempt: float
    received_at: float
    updated_at: float
    classify_attempts: int = 0  # classifications started (committed before decoding); see start_classification
    classify_reason: str = ""  # why the classifier routed it "unreadable"; kept when delivery problems fill ``reason``
    classified_at: float = 0.0  # when the decision was committed (0: not classified, or before this column)
    decided_by: str = ""  # "rule:<name>", "model:<model_id>", "header_unreadable", "classification_failed"
    probs: str = ""  # the model's probabilities, JSON {class: p} ("" when the model did not look at it)
    body_part_examined: str = ""  # header fields, as read when classified ("" when not read)
    study_instance_uid: str = ""
    patient_id: str = ""
    tag_disagrees: int | None = None  # 1: BodyPartExamined contradicts the top class; 0: agrees; None: no tag / model
    reviewed: str = ""  # what an operator did from the review list: "corrected", "requeued" (utils/routing/operations/review.py)
    reviewed_at: float = 0.0  # when (the latest action)
    review_note: str = ""  # its audit line's fields, JSON: a line a crash cost is rebuilt from it (reconcile.py)


@dataclass(frozen=True)
class Classification:
    """What the classifier decided for one received item."""

    item_id: int
    label: str  # a class, "uncertain" or "unreadable"
    confidence: float | None
    model_id: str
    route: str
    reason: str = ""  # "code: message": why unreadable, or out_of_distribution for an uncertain item; "" otherwise
    decided_by: str = ""  # who decided the route: "rule:<name>", "model:<model_id>", ... (QueueItem.decided_by)
    probs: str = ""  # what the classifier saw (QueueItem's fields of the same names)
    body_part_examined: str = ""
    study_instance_uid: str = ""
    patient_id: str = ""
    tag_disagrees: int | None = None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(target: Path, data: bytes | str) -> None:
    """Write ``data`` as ``target`` through a temporary file (``.<32 hex>.part``), fsync and a rename: an
    existing file or link of that name is replaced, never written through; the folder is fsynced."""
    import uuid

    temporary = target.with_name(f".{uuid.uuid4().hex}.part")
    try:
        with open(temporary, "xb" if isinstance(data, bytes) else "x") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(target.parent)


class SpoolQueue:
    """Thread-safe: one SQLite connection behind a lock (writes are short; SQLite serialises them anyway)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self.incoming = self.root / "incoming"
        for folder in (self.root, self.files, self.incoming):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.root / "router.lock", "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            self._lock_file.close()
            raise SpoolLockedError(f"{self.root} is in use by another router process") from error
        self._lock = threading.RLock()
        self.recovered_orphans: list[QueueItem] = []  # items registered by the last recover() from files without a row
        try:
            self._db = sqlite3.connect(self.root / "queue.sqlite3", check_same_thread=False, isolation_level=None,
                                       timeout=30)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the SCP answers
            self._db.executescript(_SCHEMA)
            migrate(self._db)
        except sqlite3.Error as error:  # a full disk, a read-only or damaged file: say which, not a traceback
            self._lock_file.close()
            raise SpoolOpenError(self.root, error) from error

    # --- receiving ------------------------------------------------------------------------

    def store(self, data: bytes, *, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str,
              calling_ae: str = "", meta: tuple[str, str] | None = None) -> tuple[QueueItem, bool]:
        """Make a received object durable; (item, duplicate). Returns only once file and row are on disk.

        An identical object (same SOP Instance UID and bytes) that is still waiting in the queue
        is not stored twice: a sender re-sending after a lost answer gets success again.
        ``meta``: a (key, value) note (table ``meta``) committed in the same transaction as the row,
        e.g. the Orthanc source's cursor (utils/routing/intake/orthanc_source.py): a crash keeps both or
        neither. Not written for a duplicate.
        """
        digest = hashlib.sha256(data).hexdigest()
        waiting = self._waiting_copy(sop_instance_uid, digest)
        if waiting is not None:
            return waiting, True
        name = self._write_file(data)
        item = self._insert(name, sop_instance_uid, sop_class_uid, transfer_syntax, calling_ae, digest, len(data),
                            meta)
        return item, False

    def new_part(self) -> Path:
        """A fresh path in ``incoming/`` for an object that arrives in pieces (STOW-RS): the caller writes it,
        fsyncs it and hands it to :meth:`store_file`, or deletes it. The next start deletes one left behind."""
        return self.incoming / f"{time.time_ns()}-{uuid.uuid4().hex[:12]}.dcm.part"

    def store_file(self, partial: Path, *, digest: str, size: int, sop_instance_uid: str, sop_class_uid: str,
                   transfer_syntax: str, calling_ae: str = "") -> tuple[QueueItem, bool]:
        """:meth:`store` for an object already written and fsynced to ``partial`` (from :meth:`new_part`), whose
        SHA-256 is ``digest``: renamed into ``files/`` (a duplicate's part is deleted); (item, duplicate)."""
        waiting = self._waiting_copy(sop_instance_uid, digest)
        if waiting is not None:
            partial.unlink(missing_ok=True)
            return waiting, True
        name = self._settle(partial)
        return self._insert(name, sop_instance_uid, sop_class_uid, transfer_syntax, calling_ae, digest, size), False

    def _waiting_copy(self, sop_instance_uid: str, digest: str) -> QueueItem | None:
        """The item of an identical object (same SOP Instance UID and SHA-256) still waiting in the queue, or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM items WHERE sop_instance_uid = ? AND sha256 = ? AND state IN (?, ?)",
                                   (sop_instance_uid, digest, *PENDING)).fetchone()
        return None if row is None else _item(row)

    def _write_file(self, data: bytes) -> str:
        """Write ``data`` durably into ``files/`` (incoming, fsync, rename, fsync the folder); its name."""
        partial = self.new_part()
        try:
            with open(partial, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            partial.unlink(missing_ok=True)  # never acknowledged; a full disk gets its space back at once
            raise
        return self._settle(partial)

    def _settle(self, partial: Path) -> str:
        """Rename a written, fsynced ``incoming/<name>.part`` to ``files/<name>`` and fsync the folder; the name."""
        name = partial.name.removesuffix(".part")
        try:
            os.rename(partial, self.files / name)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        fsync_dir(self.files)
        return name

    def _insert(self, name: str, sop_instance_uid: str, sop_class_uid: str, transfer_syntax: str, calling_ae: str,
                digest: str, size: int, meta: tuple[str, str] | None = None) -> QueueItem:
        now = time.time()
        what = f"record the received object {sop_instance_uid}"
        with self._lock, (self._transaction(what) if meta else self._writing(what)):
            cursor = self._db.execute(
                "INSERT INTO items (file, sop_instance_uid, sop_class_uid, transfer_syntax, calling_ae, sha256, size,"
                " state, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, sop_instance_uid, sop_class_uid, transfer_syntax, calling_ae, digest, size, RECEIVED, now, now))
            if meta:
                self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value ="
                                 " excluded.value", meta)
            row_id = cursor.lastrowid
        return self.get(row_id)

    # --- reading --------------------------------------------------------------------------

    def path(self, item: QueueItem) -> Path:
        return self.files / item.file

    def get(self, item_id: int) -> QueueItem:
        with self._lock:
            return _item(self._db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone())

    def received(self, limit: int) -> list[QueueItem]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM items WHERE state = ? ORDER BY id LIMIT ?",
                                    (RECEIVED, limit)).fetchall()
        return [_item(r) for r in rows]

    def due(self, routes: Iterable[str], limit: int, now: float | None = None) -> list[QueueItem]:
        """Classified items of these routes whose next attempt is due, oldest first."""
        routes = list(routes)
        now = time.time() if now is None else now
        marks = ",".join("?" * len(routes))
        with self._lock:
            rows = self._db.execute(
                f"SELECT * FROM items WHERE state = ? AND route IN ({marks}) AND next_attempt <= ? ORDER BY id LIMIT ?",
                (CLASSIFIED, *routes, now, limit)).fetchall()
        return [_item(r) for r in rows]

    def next_due(self, routes: Iterable[str]) -> float | None:
        routes = list(routes)
        marks = ",".join("?" * len(routes))
        with self._lock:
            row = self._db.execute(f"SELECT MIN(next_attempt) FROM items WHERE state = ? AND route IN ({marks})",
                                   (CLASSIFIED, *routes)).fetchone()
        return row[0]

    def still_received(self, items: Iterable[QueueItem]) -> list[QueueItem]:
        """Fresh rows of those ``items`` that are still waiting to be classified."""
        ids = [i.id for i in items]
        marks = ",".join("?" * len(ids))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM items WHERE id IN ({marks}) AND state = ? ORDER BY id",
                                    (*ids, RECEIVED)).fetchall()
        return [_item(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall()
        return {r[0]: r[1] for r in rows}

    def gauges(self) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
        """For /metrics (utils/routing/operations/metrics.py): (objects per state, route -> (objects refused at least once and
        waiting for another attempt, objects waiting in all)). Two indexed counts under the lock, which reception
        holds only for its commit."""
        with self._lock:
            states = self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall()
            waiting = self._db.execute("SELECT route, SUM(attempts > 0), COUNT(*) FROM items WHERE state = ?"
                                       " GROUP BY route", (CLASSIFIED,)).fetchall()
        return {s: n for s, n in states}, {r: (retried, n) for r, retried, n in waiting}

    def model_decisions(self, since: float) -> list[tuple[float, str, str]]:
        """(classified_at, probabilities as JSON, classify_reason) of the objects the model classified since
        ``since`` (a rule's or the header's decisions carry no probabilities): the drift windows
        (utils/routing/operations/drift.py)."""
        with self._lock:
            rows = self._db.execute("SELECT classified_at, probs, classify_reason FROM items"
                                    " WHERE classified_at >= ? AND probs != ''", (since,)).fetchall()
        return [(r[0], r[1], r[2]) for r in rows]

    def items(self, state: str | None = None) -> list[QueueItem]:
        with self._lock:
            rows = (self._db.execute("SELECT * FROM items ORDER BY id") if state is None else
                    self._db.execute("SELECT * FROM items WHERE state = ? ORDER BY id", (state,))).fetchall()
        return [_item(r) for r in rows]

    # --- state changes --------------------------------------------------------------------

    def set_classified(self, decisions: Sequence[Classification]) -> None:
        """Record a batch of decisions in one transaction."""
        now = time.time()
        with self._lock, self._transaction(f"record {len(decisions)} classifications"):
            self._db.executemany(
                "UPDATE items SET state = ?, label = ?, confidence = ?, model_id = ?, route = ?, reason = ?,"
                " classify_reason = ?, decided_by = ?, next_attempt = 0, updated_at = ?, classified_at = ?, probs = ?,"
                " body_part_examined = ?, study_instance_uid = ?, patient_id = ?, tag_disagrees = ?"
                " WHERE id = ? AND state = ?",
                [(CLASSIFIED, d.label, d.confidence, d.model_id, d.route, d.reason, d.reason, d.decided_by, now, now,
                  d.probs, d.body_part_examined, d.study_instance_uid, d.patient_id, d.tag_disagrees,
                  d.item_id, RECEIVED) for d in decisions])

    def start_classification(self, items: Iterable[QueueItem]) -> list[QueueItem]:
        """Count one classification attempt for each item still received; committed before returning.

        Called before decoding starts, so that an attempt the process does not survive is counted.
        Returns the updated rows (items classified meanwhile are left out).
        """
        ids = [i.id for i in items]
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        with self._lock, self._transaction("count classification attempts"):
            self._db.execute(f"UPDATE items SET classify_attempts = classify_attempts + 1, updated_at = ?"
                             f" WHERE id IN ({marks}) AND state = ?", (time.time(), *ids, RECEIVED))
        return self.still_received(items)

    def return_classification_attempts(self, items: Iterable[QueueItem]) -> None:
        """Take back the attempts counted for items still received (their failure was not their own)."""
        ids = [i.id for i in items]
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with self._lock, self._transaction("give classification attempts back"):
            self._db.execute(f"UPDATE items SET classify_attempts = MAX(0, classify_attempts - 1)"
                             f" WHERE id IN ({marks}) AND state = ?", (*ids, RECEIVED))

    def note_classification_failure(self, item: QueueItem, reason: str) -> None:
        """Keep why an attempt failed (shown by ``--status``, used as the reason if it is given up)."""
        with self._lock, self._writing("note a classification failure"):
            self._db.execute("UPDATE items SET reason = ?, updated_at = ? WHERE id = ? AND state = ?",
                             (reason, time.time(), item.id, RECEIVED))

    def mark_done(self, item: QueueItem, state: str, detail: str = "") -> None:
        """The destination confirmed: record it, then delete the spool file."""
        if state not in DONE:
            raise ValueError(f"not a final state: {state}")
        with self._lock, self._writing(f"record the delivery of item {item.id}"):
            self._db.execute("UPDATE items SET state = ?, reason = CASE WHEN ? = '' THEN reason ELSE ? END,"
                             " attempts = attempts + 1, updated_at = ? WHERE id = ?",
                             (state, detail, detail, time.time(), item.id))
        self.path(item).unlink(missing_ok=True)

    def defer(self, item: QueueItem, reason: str, *, delay: float, give_up: bool = False) -> QueueItem:
        """A failed attempt for this item: try again after ``delay`` seconds, or mark it failed."""
        with self._lock, self._writing(f"record a failed delivery of item {item.id}"):
            self._db.execute("UPDATE items SET state = ?, reason = ?, attempts = attempts + 1, next_attempt = ?,"
                             " updated_at = ? WHERE id = ?",
                             (FAILED if give_up else CLASSIFIED, reason, time.time() + delay, time.time(), item.id))
            return self.get(item.id)

    # --- the review list (utils/routing/operations/review.py) -------------------------------------------

    def resubmit(self, data: bytes, like: QueueItem, decision: Classification | None = None) -> QueueItem:
        """A new row for ``data`` (an object kept for review) with ``like``'s UIDs: ``received`` (classified
        again), or with ``decision`` already ``classified`` (forwarded to its route). Durable like :meth:`store`."""
        name = self._write_file(data)
        now = time.time()
        fields = {"file": name, "sop_instance_uid": like.sop_instance_uid, "sop_class_uid": like.sop_class_uid,
                  "transfer_syntax": like.transfer_syntax, "calling_ae": like.calling_ae,
                  "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "state": RECEIVED,
                  "received_at": now, "updated_at": now, "body_part_examined": like.body_part_examined,
                  "study_instance_uid": like.study_instance_uid, "patient_id": like.patient_id}
        if decision is not None:
            fields.update(state=CLASSIFIED, label=decision.label, confidence=decision.confidence,
                          model_id=decision.model_id, route=decision.route, reason=decision.reason,
                          decided_by=decision.decided_by, classified_at=now)
        with self._lock, self._writing(f"record a resubmitted copy of item {like.id}"):
            cursor = self._db.execute(f"INSERT INTO items ({', '.join(fields)}) VALUES ({','.join('?' * len(fields))})",
                                      tuple(fields.values()))
            row_id = cursor.lastrowid
        return self.get(row_id)

    def retry_failed(self, item_id: int, decision: Classification | None = None) -> bool:
        """A failed item gets a fresh set of attempts (to its route, or to ``decision``'s); False when it is not
        failed (any more)."""
        changes = "" if decision is None else ", label = ?, confidence = ?, route = ?, decided_by = ?, reason = ?"
        values = () if decision is None else (decision.label, decision.confidence, decision.route,
                                              decision.decided_by, decision.reason)
        with self._lock, self._writing(f"requeue failed item {item_id}"):
            return self._db.execute(f"UPDATE items SET state = ?, attempts = 0, next_attempt = 0, updated_at = ?"
                                    f"{changes} WHERE id = ? AND state = ?",
                                    (CLASSIFIED, time.time(), *values, item_id, FAILED)).rowcount == 1

    def mark_reviewed(self, item_id: int, what: str, note: dict | None = None) -> float:
        """Note what an operator did with an item of the review list (it leaves the list), and the fields of the
        audit line that says so (``note``, written after this commit: utils/routing/operations/reconcile.py rebuilds a line a
        crash cost from them). Returns the time recorded (``reviewed_at``)."""
        import json

        now = time.time()
        with self._lock, self._writing(f"note the review of item {item_id}"):
            self._db.execute("UPDATE items SET reviewed = ?, reviewed_at = ?, review_note = ? WHERE id = ?",
                             (what, now, json.dumps(note or {}, default=str, separators=(",", ":")), item_id))
        return now

    # --- start-up -------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Bring files and rows back in line after any stop, clean or not; counts of what was done."""
        report = {"partial_deleted": 0, "orphans_registered": 0, "done_files_deleted": 0, "missing_files": 0,
                  "pending": 0, "classify_retries": 0, "pruned": 0}
        for partial in self.incoming.glob("*.part"):
            partial.unlink(missing_ok=True)
            report["partial_deleted"] += 1
        with self._lock:
            rows = {r["file"]: (r["id"], r["state"]) for r in self._db.execute("SELECT id, file, state FROM items")}
        on_disk = {p.name for p in self.files.glob("*.dcm")}
        self.recovered_orphans = [self._register_orphan(self.files / name) for name in sorted(on_disk - set(rows))]
        report["orphans_registered"] = len(self.recovered_orphans)
        for name, (item_id, state) in rows.items():
            if state in DONE and name in on_disk:
                (self.files / name).unlink(missing_ok=True)
                report["done_files_deleted"] += 1
            elif state in PENDING + (FAILED,) and name not in on_disk:
                with self._lock:
                    self._db.execute("UPDATE items SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                                     (FAILED, "spool_file_missing", time.time(), item_id))
                report["missing_files"] += 1
        with self._lock:
            # Anything waiting is due now: a restart is a good moment to retry.
            self._db.execute("UPDATE items SET next_attempt = 0 WHERE state = ?", (CLASSIFIED,))
            report["pending"] = self._db.execute("SELECT COUNT(*) FROM items WHERE state IN (?, ?)",
                                                 PENDING).fetchone()[0]
            # Objects whose classification started and never finished (or failed): retried one at a time.
            report["classify_retries"] = self._db.execute(
                "SELECT COUNT(*) FROM items WHERE state = ? AND classify_attempts > 0", (RECEIVED,)).fetchone()[0]
            report["pruned"] = self._db.execute(
                "DELETE FROM items WHERE state IN (?, ?) AND updated_at < ?",
                (*DONE, time.time() - HISTORY_DAYS * 86400)).rowcount
        return report

    def _register_orphan(self, path: Path) -> QueueItem:
        """A file that was made durable but whose row was never committed (killed in between)."""
        from pydicom.filereader import read_file_meta_info

        try:
            meta = read_file_meta_info(path)
            uids = (str(meta.get("MediaStorageSOPInstanceUID", "")), str(meta.get("MediaStorageSOPClassUID", "")),
                    str(meta.get("TransferSyntaxUID", "")))
        except Exception as error:  # noqa: BLE001 - still kept: the classifier will quarantine it
            log.warning("%s: unreadable file meta (%s); registering it anyway", path, error)
            uids = ("", "", "")
        data = path.read_bytes()
        item = self._insert(path.name, *uids, "", hashlib.sha256(data).hexdigest(), len(data))
        log.info("recovered %s (%s) from the spool", path.name, log_safe(uids[0]))
        return item

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._lock_file.close()

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """One statement in autocommit mode (SQLite undoes it whole when it fails): SpoolWriteError on failure."""
        try:
            yield
        except sqlite3.Error as error:
            raise SpoolWriteError(f"spool database {self.root / 'queue.sqlite3'}: could not {what}: {error}") from error

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT. A failure anywhere, the COMMIT included (SQLITE_FULL, SQLITE_IOERR), rolls
        back what is still open and raises SpoolWriteError: the connection is never left inside a transaction
        (which would hold the write lock and make every later BEGIN fail), so a later try can succeed."""
        db = self._db
        with self._writing(what):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (then ROLLBACK itself would fail)
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error as error:
                        log.error("spool database: ROLLBACK failed after an error: %s", error)
                raise

    # --- the router's own notes (audit reconciliation) --------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._lock, self._writing(f"note {key}"):
            self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value ="
                             " excluded.value", (key, value))

    def max_id(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0]

    def rows_where(self, condition: str, parameters: Sequence = ()) -> list[QueueItem]:
        """Items matching an SQL condition on the items table, by id (for reconciliation and tests)."""
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM items WHERE {condition} ORDER BY id", tuple(parameters)).fetchall()
        return [_item(r) for r in rows]


def _item(row: sqlite3.Row) -> QueueItem:
    return QueueItem(**{k: row[k] for k in row.keys()})  # noqa: SIM118 - iterating a Row yields values


def migrate(db: sqlite3.Connection) -> list[str]:
    """Add the columns an older spool database lacks, in place (existing rows get the default); their names."""
    present = {r[1] for r in db.execute("PRAGMA table_info(items)")}
    added = []
    for name, definition in _ADDED_COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE items ADD COLUMN {name} {definition}")
            log.info("spool database: added column %s", name)
            added.append(name)
    for statement in _ADDED_INDEXES:
        db.execute(statement)
    return added


# --- Access from another process (router.py --status / --requeue-failed, while the router runs) ---


def _connect(root: str | os.PathLike) -> sqlite3.Connection:
    path = Path(root) / "queue.sqlite3"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no queue here (has the router run with this spool_dir?)")
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    return db


def spool_in_use(root: str | os.PathLike) -> bool:
    """True while a router process holds the spool's lock (``router.lock``, taken by :class:`SpoolQueue`).

    The kernel drops a flock when its process dies, kill -9 included, so this is the test of a running router; the
    note the router leaves in the database (``--status``'s "as it last noted") outlives a router killed that way.
    On Linux the kernel's table of locks (/proc/locks) is read: nothing is taken, so a router starting in that
    instant is never disturbed. Elsewhere the lock is taken shared without waiting and released at once (a router
    starting in that same instant would find the spool in use and fail to start; its supervisor starts it again)."""
    path = Path(root) / "router.lock"
    try:
        handle = open(path)  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return False
    with handle:
        held = _flock_held(os.fstat(handle.fileno()))
        if held is not None:
            return held
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _flock_held(stat: os.stat_result, table: str = "/proc/locks") -> bool | None:
    """Whether the kernel's lock table lists a granted flock on the file of ``stat``; None without the table.
    A line: ``1: FLOCK  ADVISORY  WRITE 4711 fd:01:1234567 0 EOF`` (``1: -> FLOCK ...``: a waiter, not a holder)."""
    try:
        text = Path(table).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == (os.major(stat.st_dev), os.minor(stat.st_dev),
                                                                stat.st_ino):
                return True
        except ValueError:
            continue
    return False


# The objects the review list shows: uncertain, failed, or whose header disagrees with the model; not yet reviewed.
REVIEW_CONDITION = "(label = 'uncertain' OR state = 'failed' OR tag_disagrees = 1) AND reviewed = ''"


def read_only(root: str | os.PathLike) -> sqlite3.Connection:
    """A read-only connection to the spool database (never takes the router's lock)."""
    path = Path(root) / "queue.sqlite3"
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10, check_same_thread=False)
    db.row_factory = sqlite3.Row
    return db


class QueueReader:
    """The read-only questions the web console and the review desk ask of a (running) router's queue: one short
    connection per question, waiting at most ``busy_timeout_s`` for a busy database (sqlite3 errors pass through:
    the caller decides whether to ask again)."""

    def __init__(self, root: str | os.PathLike, busy_timeout_s: float = 1.0) -> None:
        self.root, self.busy_timeout_s = Path(root), busy_timeout_s

    def _ask(self, question):
        db = read_only(self.root)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            return question(db)
        finally:
            db.close()

    def overview(self, since: float) -> tuple[dict[str, int], dict[str, int], list[tuple], list[tuple]]:
        """(objects per state, per label, per route (route, objects, waiting, failed, earliest retry), and
        (received_at, classified_at, state, updated_at) of each object received since ``since``)."""
        def question(db):
            states = dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
            labels = dict(db.execute("SELECT label, COUNT(*) FROM items WHERE label != '' GROUP BY label"))
            routes = [tuple(r) for r in db.execute(
                "SELECT route, COUNT(*), SUM(state = 'classified'), SUM(state = 'failed'),"
                " MIN(CASE WHEN state = 'classified' AND attempts > 0 THEN next_attempt END)"
                " FROM items WHERE route != '' GROUP BY route")]
            recent = [tuple(r) for r in db.execute("SELECT received_at, classified_at, state, updated_at FROM items"
                                                   " WHERE received_at >= ?", (since,))]
            return states, labels, routes, recent
        return self._ask(question)

    def rows(self, limit: int, *, uid: str | None = None, needing_review: bool = False) -> list[dict[str, Any]]:
        """Objects newest first, as dicts of the table's columns: all, those whose SOP Instance UID, Study Instance
        UID or Patient ID is ``uid``, or those needing review (REVIEW_CONDITION)."""
        condition, parameters = "1", ()
        if uid is not None:
            condition, parameters = "sop_instance_uid = ? OR study_instance_uid = ? OR patient_id = ?", (uid,) * 3
        elif needing_review:
            condition = REVIEW_CONDITION
        return self._ask(lambda db: [dict(r) for r in db.execute(
            f"SELECT * FROM items WHERE {condition} ORDER BY id DESC LIMIT ?", (*parameters, limit))])

    def ids(self) -> set[int]:
        return self._ask(lambda db: {r[0] for r in db.execute("SELECT id FROM items")})


def read_status(root: str | os.PathLike) -> tuple[dict[str, int], list[QueueItem]]:
    """(count per state, failed items) without taking the router's lock."""
    db = _connect(root)
    try:
        counts = {r[0]: r[1] for r in db.execute("SELECT state, COUNT(*) FROM items GROUP BY state")}
        failed = [_item(r) for r in db.execute("SELECT * FROM items WHERE state = ? ORDER BY id", (FAILED,))]
    finally:
        db.close()
    return counts, failed


@dataclass(frozen=True)
class Summary:
    """What ``router.py --status`` shows besides the counts per state."""

    routes: dict[str, int]  # objects per route (classified ones, pending or done, within HISTORY_DAYS)
    unreadable_by_reason: dict[str, int]  # objects routed "unreadable", by reason code (the text before ':')
    latest_unreadable: list[QueueItem]  # newest first
    classify_retries: list[QueueItem]  # waiting objects whose classification failed or did not finish before
    decided_by: dict[str, int] = field(default_factory=dict)  # decided objects per rule / model ("rule:ct", ...)


UNRECORDED = "(not recorded)"  # decided_by of objects decided before the column existed


def reason_code(reason: str) -> str:
    """``"no_pixel_data: the object has no Pixel Data"`` -> ``"no_pixel_data"``."""
    return reason.split(":", 1)[0].strip() or "unknown"


def read_summary(root: str | os.PathLike, unreadable: str, latest: int = 5) -> Summary:
    """Routes, unreadable objects and classification retries, without taking the router's lock.

    ``unreadable`` is the label of objects the model cannot look at. Works on a spool database
    that predates the classification attempt counter (no retries are shown then).
    """
    db = _connect(root)
    try:
        routes = {r[0]: r[1] for r in db.execute(
            "SELECT route, COUNT(*) FROM items WHERE route != '' GROUP BY route ORDER BY route")}
        columns = {r[1] for r in db.execute("PRAGMA table_info(items)")}
        why = "classify_reason" if "classify_reason" in columns else "reason"  # a database from before the column
        by_reason: dict[str, int] = {}
        for (reason,) in db.execute(f"SELECT {why} FROM items WHERE label = ?", (unreadable,)):
            code = reason_code(reason)
            by_reason[code] = by_reason.get(code, 0) + 1
        newest = [_item(r) for r in db.execute("SELECT * FROM items WHERE label = ? ORDER BY updated_at DESC, id DESC"
                                               " LIMIT ?", (unreadable, latest))]
        if why == "reason":
            newest = [replace(i, classify_reason=i.reason) for i in newest]
        retries = ([_item(r) for r in db.execute("SELECT * FROM items WHERE state = ? AND classify_attempts > 0"
                                                 " ORDER BY id", (RECEIVED,))]
                   if "classify_attempts" in columns else [])
        decided = ({r[0] or UNRECORDED: r[1] for r in db.execute(
            "SELECT decided_by, COUNT(*) FROM items WHERE route != '' GROUP BY decided_by ORDER BY decided_by")}
            if "decided_by" in columns else {})
    finally:
        db.close()
    return Summary(routes, dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))), newest, retries,
                   dict(sorted(decided.items(), key=lambda kv: (-kv[1], kv[0]))))


def read_meta(root: str | os.PathLike, key: str) -> str | None:
    """One of the router's notes (table ``meta``) without taking its lock; None when absent."""
    db = _connect(root)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    finally:
        db.close()
    return None if row is None else row[0]


def backup_database(root: str | os.PathLike, target: str | os.PathLike, timeout: float = 30) -> str:
    """Copy the spool database into ``target`` (a new file) through SQLite's online backup API, while a router may be
    writing: one read transaction on a read-only connection, so the copy is the database as of one commit, whatever
    is committed meanwhile. The copy is one self-contained file (rollback journal, no WAL beside it); the router
    turns WAL on again when it opens it. Returns ``PRAGMA integrity_check`` of the copy ("ok")."""
    path = Path(root) / "queue.sqlite3"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no queue here (has the router run with this spool_dir?)")
    source = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
    try:
        copy = sqlite3.connect(target, isolation_level=None)
        try:
            source.backup(copy)  # all pages in one step: one snapshot, and writers are never blocked (WAL)
            copy.execute("PRAGMA journal_mode=DELETE")
            return copy.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            copy.close()
    finally:
        source.close()


def unsettled_files(root: str | os.PathLike) -> list[str]:
    """Names (in ``files/``) of the objects not delivered yet: received, classified or failed, by id."""
    db = _connect(root)
    try:
        return [r[0] for r in db.execute("SELECT file FROM items WHERE state IN (?, ?, ?) ORDER BY id",
                                         (*PENDING, FAILED))]
    finally:
        db.close()


def latest_model_id(root: str | os.PathLike) -> str | None:
    """The model id of the most recent model decision in the queue; None when there is none."""
    db = _connect(root)
    try:
        row = db.execute("SELECT model_id FROM items WHERE model_id != '' ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        db.close()
    return None if row is None else row[0]


def requeue_failed(root: str | os.PathLike) -> int:
    """Give failed items a fresh set of attempts (a running router picks them up within a second)."""
    db = _connect(root)
    try:
        return db.execute("UPDATE items SET state = ?, attempts = 0, next_attempt = 0, updated_at = ? WHERE state = ?",
                          (CLASSIFIED, time.time(), FAILED)).rowcount
    finally:
        db.close()
