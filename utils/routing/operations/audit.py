"""The router's audit log: one JSON object per line, appended, never rewritten.

Events (each with ``time`` in UTC ISO 8601 and ``event``; per-object events carry
``sop_instance_uid``):

- ``received``: calling_ae, sop_class_uid, transfer_syntax, size, item id (``duplicate`` when an
  identical copy was already waiting);
- ``classified``: label, confidence, model_id, route, body_part_examined, tag_disagrees, reason
  (why unreadable, if so), decided_by (``rule:<name>``, ``model:<model_id>``, ``header_unreadable``
  or ``classification_failed``; utils/routing/decision/rules.py), modality (for decisions of a rule); in shadow mode
  decided_by ``shadow:<rule>``, route the one used, and mode, model_route, probabilities (utils/routing/decision/shadow.py);
- ``forwarded``: destination, status (``0x0000``, a warning, ``retry`` or ``failed``), detail;
- ``quarantined``: destination, reason;
- ``destination_down`` / ``destination_up`` (no SOP instance UID): node, reason;
- ``started`` / ``recovered`` / ``stopped``: what the router did at start and stop;
- ``reception_paused`` / ``reception_resumed``: the spool's filesystem went below / back above
  its free-space reserve (utils/routing/intake/space.py);
- from the Orthanc source (utils/routing/intake/orthanc_source.py): ``received`` with ``source: "orthanc"``,
  ``orthanc_id`` and ``seq``; ``orthanc_cursor_start``, ``orthanc_cursor_reset``,
  ``orthanc_source_down`` / ``orthanc_source_up``, ``orthanc_skipped``.

Lines are written with one ``os.write`` on an O_APPEND descriptor, so they stay whole even with
several threads, and reach the OS before the call returns (a kill -9 loses none). A line is
written after the queue commit it reports for ``received`` and ``classified`` (what they record,
the item id, exists only then) and before it for ``forwarded`` / ``quarantined`` (they record the
destination's answer); a kill between a commit and its line is repaired at the next start by
:mod:`utils.routing.operations.reconcile`, which writes the missing line with ``"reconciled": true``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class AuditWriteError(OSError):
    """A line could not be appended to the audit log (disk full, I/O error)."""


log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        if not _ends_with_newline(self.path):  # a line torn by a crash: start the next one on its own line
            os.write(self._fd, b"\n")

    def write(self, event: str, **fields: Any) -> None:
        record = {"time": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds"), "event": event}
        record.update(fields)
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd >= 0:
                try:
                    os.write(self._fd, line)
                except OSError as error:
                    raise AuditWriteError(error.errno, f"audit log {self.path}: could not write {event}: "
                                                       f"{error.strerror}") from error

    def record(self, event: str, **fields: Any) -> None:
        """:meth:`write` for an event whose state is already committed: a line that cannot be written is logged,
        not raised (the next start writes it from the queue, utils/routing/operations/reconcile.py)."""
        try:
            self.write(event, **fields)
        except AuditWriteError as error:
            log.error("%s", error)

    def reopen(self) -> bool:
        """Open the configured path again (after logrotate moved the file away: later lines go to a new file there,
        none to the moved one). True when it was a different file. Called by the router's reload (SIGHUP)."""
        with self._lock:
            if self._fd < 0:
                return False
            try:
                same = os.path.samestat(os.fstat(self._fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.close(self._fd)
            self._fd = fd
            return True

    def size(self) -> int:
        """Bytes in the log now (where the next line starts)."""
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def rotated(path: str | os.PathLike) -> list[Path]:
    """The audit log and the files logrotate made of it, oldest first: ``audit.jsonl.N`` ... ``audit.jsonl.1``
    (and ``.gz`` ones, compressed), then ``audit.jsonl``; dated names (``dateext``) sort by name."""
    path = Path(path)
    def order(p: Path) -> tuple:
        suffix = p.name[len(path.name) + 1:].removesuffix(".gz")
        return (0, -int(suffix), "") if suffix.isdigit() else (1, 0, suffix)
    older = sorted((p for p in path.parent.glob(path.name + ".*") if p.is_file()), key=order)
    return older + ([path] if path.exists() else [])


def records(path: str | os.PathLike, *, with_rotated: bool = False) -> Iterator[dict[str, Any]]:
    """The records of an audit log, one line at a time (a torn line, from a crash mid-write, is skipped);
    ``with_rotated``: of the files logrotate made of it too, oldest first (:func:`rotated`, ``.gz`` ones
    included). FileNotFoundError when there is no log at all."""
    import gzip

    for file in (rotated(path) if with_rotated else []) or [Path(path)]:
        opener = gzip.open if file.suffix == ".gz" else open
        with opener(file, "rt", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    yield record


def read_audit(path: str | os.PathLike, *, with_rotated: bool = False) -> list[dict[str, Any]]:
    """Every record of an audit log (:func:`records`)."""
    return list(records(path, with_rotated=with_rotated))
