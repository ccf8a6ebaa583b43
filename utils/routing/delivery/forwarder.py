"""Forwarders: one thread per destination, C-STORE out (or a copy into a folder), with retries.

A DICOMweb destination's worker (STOW-RS) is utils/routing/delivery/dicomweb.py's ``DicomwebForwarder``: the same
loop, outcomes and records as below, over HTTP.

A DICOM forwarder opens one association per batch of due objects, proposing for each object
its SOP class with *only* the transfer syntax it was received in (plus Verification, so that the
association stands even when the destination refuses every other context), and sends the spool file's
dataset bytes unchanged (pynetdicom's chunked send: no decoding, no re-encoding, no silent
decompression). Outcomes:

- success or warning status: the object is done, the spool file removed (queue row first);
- the destination cannot be reached, rejects or aborts the association, or stops answering:
  the destination is *down*; the whole destination waits with exponential backoff
  (``retry_initial_s`` doubling up to ``retry_max_s``) and is retried for as long as it takes;
- the destination refuses this object (failure status, or no presentation context for its SOP
  class and transfer syntax): this object is retried with backoff, and after ``max_attempts``
  marked ``failed`` with the reason (the file stays in the spool; ``--requeue-failed``);
- the outcome cannot be recorded (the spool database or the audit log cannot be written: disk
  full, I/O error): nobody's fault; the forwarder waits with the same backoff and tries again,
  the destination is not reported down (an object confirmed but not recorded is sent again).

Each outcome is written to the audit log *before* the queue commit that records it: the line
states what the destination answered, so a kill between the two leaves the line (and, at worst,
a second delivery with a second line after the restart), never a delivered object without one.

A folder copy is written as ``.<32 hex digits>.part`` and linked to its name once complete and
fsynced; :func:`remove_partial_copies` deletes what a kill left of those at start-up. Its name is the SOP
Instance UID when that is a valid UID, else ``invalid-uid-...`` (utils/untrusted.py): a peer's UID never
chooses a folder, and every write is checked to stay inside the destination's folder. A copy that cannot be
written while the folder itself can (a name the filesystem refuses, a spool file gone) is that object's
failure (retried, then ``failed`` with the reason), not the destination's: the other objects go on.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from utils.infer.decisions import UNREADABLE
from utils.routing.intake import wakeup
from utils.routing.operations.audit import AuditLog, AuditWriteError
from utils.routing.operations.metrics import NO_METRICS
from utils.routing.queue import (
    FORWARDED,
    QUARANTINED,
    QueueItem,
    SpoolQueue,
    SpoolWriteError,
    fsync_dir,
    write_durably,
)
from utils.routing.intake.scp import set_tcp_nodelay
from utils.routing.worker import FATAL, WakeableThread
from utils.untrusted import UnsafePathError, contained, is_safe_component, log_safe, safe_component, safe_uid

if TYPE_CHECKING:  # annotations only: the configuration imports the workers' settings
    from utils.routing.operations.config import Destination, RouterConfig

log = logging.getLogger(__name__)

BATCH = 64  # objects sent per association at most
MAX_CONTEXTS = 127  # presentation contexts one association may propose (128, PS3.8), less Verification
TIMEOUT_S = 60  # ACSE / DIMSE / network timeout towards a destination
PARTIAL_COPY = re.compile(r"\.[0-9a-f]{32}\.part")  # the name of a folder copy being written (_copy_durably)
# A failed write with one of these means the folder cannot take anything now: the destination is down.
FOLDER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ENFILE, errno.EMFILE})


def backoff(attempt: int, initial: float, maximum: float) -> float:
    """Delay before retry number ``attempt`` (1, 2, ...): initial, 2x, 4x, ... capped at maximum."""
    return min(maximum, initial * 2.0 ** max(0, attempt - 1))


def enable_raw_sending() -> None:
    """Make pynetdicom send a file's dataset bytes as stored instead of decoding and re-encoding them.

    Sets ``pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True`` for the whole process, on purpose, once, at router
    start (RouterNode), and never restores it. What the flag changes (read in pynetdicom 3.0.4's source; the flag
    exists since 2.0; requirements.txt pins 3.0.4 and tests/routing/test_pynetdicom_internals.py checks the flag is
    still there): it is read in exactly one place, ``Association.send_c_store``, and only when its ``dataset``
    argument is a file path, not a ``pydicom.Dataset``. With a path and the flag on, pynetdicom does not ``dcmread``
    the file: it splits off the File Meta Information, takes the SOP class, SOP instance and transfer syntax from it
    (AttributeError when one is missing), refuses any conversion (an accepted presentation context with exactly that
    transfer syntax is required, ValueError otherwise; ``DicomForwarder.deliver`` checks it first) and streams the
    stored bytes after the meta in PDU-sized chunks. With the flag off the same call decodes the file and re-encodes
    it. Sending a ``Dataset`` object, receiving (``STORE_RECV_CHUNKED_DATASET``, left alone) and every other service
    are unaffected.

    Why process-wide and not scoped around each send: the flag is a module global read by whichever
    thread calls ``send_c_store``, and the forwarders are concurrent threads (one per destination).
    A set-and-restore block in one thread would flip it under another one mid-send, so an object
    could silently go out decoded and re-encoded, which the router promises never to do. The router
    process is the only user of this flag: it is the only code in it that sends from file paths
    (every forwarder wants raw sending), the tests' senders pass ``Dataset`` objects, and nothing
    else in this project calls ``send_c_store``. Setting it is idempotent.
    """
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True


class _Worker(WakeableThread):
    """Shared loop: wait for due items of our routes, hand them to ``deliver``, back off when down."""


    def __init__(self, destination: Destination, routes: list[str], queue: SpoolQueue, audit: AuditLog,
                 config: RouterConfig, metrics=NO_METRICS) -> None:
        super().__init__(name=f"forward-{destination.node}")
        self.metrics = metrics
        self.destination = destination
        self.routes = sorted(routes)
        self.queue = queue
        self.audit = audit
        self.config = config
        self.down_since: float | None = None
        self.failures = 0  # consecutive times the destination was unreachable
        self.record_failures = 0  # consecutive times an outcome could not be recorded (spool database, audit log)
        # for the console (utils/routing/operations/console.py): when it last delivered, what went wrong last, when it retries
        self.last_success: float | None = None
        self.last_error: tuple[float, str] | None = None  # (time, why)
        self.retry_at: float | None = None  # while down: the next attempt

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                items = self.queue.due(self.routes, BATCH)
                if not items:
                    next_due = self.queue.next_due(self.routes)
                    timeout = 1.0 if next_due is None else min(1.0, max(0.05, next_due - time.time()))
                    self._wake.wait(timeout)
                    self._wake.clear()
                    continue
                problem = self.deliver(items)
            except FATAL:
                raise
            except (SpoolWriteError, AuditWriteError) as error:  # not the destination's fault: wait, try again
                self._cannot_record(error)
                continue
            except BaseException as error:  # not only Exception: a thread that lets one out dies
                log.exception("forwarding to %s failed", self.destination.node)
                problem = f"{type(error).__name__}: {error}"
            if self.record_failures:
                log.info("forwarding to %s records its outcomes again", self.destination.node)
                self.record_failures = 0
            if problem:
                self._down(problem)
            elif self.failures:
                self._up()

    def _cannot_record(self, error: Exception) -> None:
        """An outcome could not be written (disk full?): back off and retry, as long as it takes."""
        self.record_failures += 1
        delay = backoff(self.record_failures, self.config.retry_initial_s, self.config.retry_max_s)
        log.error("forwarding to %s paused: %s; retrying in %.1f s", self.destination.node, error, delay)
        try:
            self.audit.write("forwarder_error", destination=self.destination.node, error=str(error), pause_s=delay)
        except AuditWriteError:
            pass  # the audit log is what failed; logged above
        self._halt.wait(delay)

    def _down(self, reason: str) -> None:
        self.failures += 1
        delay = backoff(self.failures, self.config.retry_initial_s, self.config.retry_max_s)
        self.last_error, self.retry_at = (time.time(), reason), time.time() + delay
        if self.failures == 1:
            self.down_since = time.time()
            log.warning("destination %s is down (%s); retrying with backoff", self.destination.node, reason)
            self.audit.write("destination_down", destination=self.destination.node, reason=reason)
        self._halt.wait(delay)

    def _up(self) -> None:
        log.info("destination %s is back after %.0f s", self.destination.node, time.time() - (self.down_since or 0))
        self.audit.write("destination_up", destination=self.destination.node,
                         down_s=round(time.time() - (self.down_since or time.time()), 3))
        self.failures, self.down_since, self.retry_at = 0, None, None

    def deliver(self, items: list[QueueItem]) -> str | None:
        """Send ``items``; return why the destination is unreachable, or None."""
        raise NotImplementedError

    def _done(self, item: QueueItem, status: str, detail: str = "") -> None:
        """The destination confirmed: audit it, then commit it (the line first: see the module's docstring)."""
        state = QUARANTINED if item.route == UNREADABLE else FORWARDED
        self.audit.write("quarantined" if state == QUARANTINED else "forwarded", sop_instance_uid=item.sop_instance_uid,
                         item=item.id, label=item.label, destination=self.destination.node, status=status,
                         detail=detail or None, reason=item.reason or None)
        self.queue.mark_done(item, state, detail)
        self.last_success = time.time()
        outcome = "stored" if self.destination.is_folder else "warning" if detail == "warning" else "success"
        self.metrics.forwarded(item.label or "", self.destination.node, outcome, item.received_at)

    def _refused(self, item: QueueItem, reason: str) -> None:
        attempts = item.attempts + 1
        give_up = attempts >= self.config.max_attempts
        delay = backoff(attempts, self.config.retry_initial_s, self.config.retry_max_s)
        log.warning("%s refused %s (attempt %d%s): %s", self.destination.node, log_safe(item.sop_instance_uid),
                    attempts, ", giving up" if give_up else "", log_safe(reason))
        self.audit.write("forwarded", sop_instance_uid=item.sop_instance_uid, item=item.id, label=item.label,
                         destination=self.destination.node, status="failed" if give_up else "retry",
                         detail=reason, attempts=attempts)
        self.queue.defer(item, reason, delay=delay, give_up=give_up)
        self.last_error = (time.time(), reason)
        self.metrics.forwarded(item.label or "", self.destination.node, "failed" if give_up else "retry")


class DicomForwarder(_Worker):
    """C-STORE SCU towards one DICOM node (AE title, host, port)."""

    def deliver(self, items: list[QueueItem]) -> str | None:
        from pynetdicom import AE, build_context, evt
        from pynetdicom.status import code_to_category

        pairs: list[tuple[str, str]] = []
        batch = []
        for item in items:
            pair = (item.sop_class_uid, item.transfer_syntax)
            if pair not in pairs:
                if len(pairs) == MAX_CONTEXTS:
                    continue  # next round
                pairs.append(pair)
            batch.append(item)
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
        ae.connection_timeout = 10
        dest = self.destination
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             contexts=[build_context(sop, ts) for sop, ts in pairs] + [build_context(Verification)],
                             tls_args=dest.tls.tls_args(dest.host) if dest.tls else None,
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), (evt.EVT_CONN_OPEN, wakeup.quiet),
                                           (evt.EVT_CONN_CLOSE, wakeup.close)])
        if not assoc.is_established:
            return ("association rejected" if assoc.is_rejected else
                    "association aborted" if assoc.is_aborted else "connection failed")
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        try:
            for item in batch:
                if self._halt.is_set():
                    break
                if (item.sop_class_uid, item.transfer_syntax) not in accepted:
                    self._refused(item, f"destination refused SOP class {item.sop_class_uid} with transfer syntax "
                                        f"{item.transfer_syntax} (sent only as received, never converted)")
                    continue
                status = assoc.send_c_store(self.queue.path(item))
                if "Status" not in status:
                    return "no answer to C-STORE (timeout or association aborted)"
                code = int(status.Status)
                category = code_to_category(code)
                if category in ("Success", "Warning"):
                    self._done(item, f"0x{code:04X}", "" if category == "Success" else "warning")
                else:
                    comment = str(status.get("ErrorComment", "") or "")
                    self._refused(item, f"C-STORE status 0x{code:04X} ({category}){': ' + comment if comment else ''}")
                if not assoc.is_established:
                    return "association ended by the destination"
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
        return None


class FolderForwarder(_Worker):
    """Copies objects into a folder (the quarantine by default), with a ``.json`` reason beside each."""

    def deliver(self, items: list[QueueItem]) -> str | None:
        import json

        folder = Path(self.destination.folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return f"cannot create {folder}: {error}"
        for item in items:
            if self._halt.is_set():
                break
            target = None
            try:
                target = _copy_durably(self.queue.path(item), folder, copy_stem(item))
                sidecar = {k: getattr(item, k) for k in ("sop_instance_uid", "sop_class_uid", "transfer_syntax",
                                                         "calling_ae", "label", "confidence", "model_id", "reason")}
                sidecar["received_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(item.received_at))
                write_durably(target.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
            except OSError as error:
                if target is not None:  # no copy without its reason: the retry writes both again
                    target.unlink(missing_ok=True)
                if not _objects_own(error, folder):
                    return f"cannot write into {folder}: {error}"
                self._refused(item, f"cannot write into {folder}: {error}")  # this object's failure only
                continue
            self._done(item, "stored", str(target))
        return None


def copy_stem(item: QueueItem) -> str:
    """The name (without ``.dcm``) of an object's copy in a folder destination: its SOP Instance UID when that is
    a valid UID, else a name derived from it (utils/untrusted.py); without a UID, the spool file's name."""
    if item.sop_instance_uid:
        return safe_uid(item.sop_instance_uid)
    return safe_component(Path(item.file).stem)


def _objects_own(error: OSError, folder: Path) -> bool:
    """Whether a failed write is the object's own problem (its name, its spool file), not the folder's: the
    folder takes a small file now and the error is not one that says the whole folder is unusable."""
    if isinstance(error, UnsafePathError):
        return True
    if error.errno in FOLDER_ERRNOS:
        return False
    probe = folder / f".{uuid.uuid4().hex}.part"  # PARTIAL_COPY: a kill leaves nothing remove_partial_copies misses
    try:
        with open(probe, "xb") as handle:
            handle.write(b"probe")
        probe.unlink()
    except OSError:
        return False
    return True


def _copy_durably(source: Path, folder: Path, stem: str) -> Path:
    """Copy into ``folder`` as ``stem.dcm`` (``stem_1.dcm``... if taken), fsynced; never overwrites, never writes
    through a link. ``stem`` must be one harmless path component (UnsafePathError otherwise)."""
    if not is_safe_component(stem):
        raise UnsafePathError(f"{log_safe(stem)!r} is not a safe file name")
    temporary = folder / f".{uuid.uuid4().hex}.part"  # PARTIAL_COPY; what a kill leaves: remove_partial_copies
    try:
        with open(source, "rb") as src, open(temporary, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        for n in range(10_000):
            name = f"{stem}.dcm" if n == 0 else f"{stem}_{n}.dcm"
            try:
                contained(folder, name)
            except UnsafePathError:  # a link of that name points out of the folder: taken
                continue
            target = folder / name
            try:
                os.link(temporary, target)  # a new name: fails on anything already there, a link included
            except FileExistsError:
                continue
            fsync_dir(folder)
            return target
        raise FileExistsError(f"{folder}: too many files named {stem}")
    finally:
        temporary.unlink(missing_ok=True)


def remove_partial_copies(folder: Path) -> list[Path]:
    """Delete the unfinished copies (``.<32 hex>.part``) a kill left in a folder destination; the paths deleted.

    Called at start-up, before any forwarder runs. Only names that ``_copy_durably`` makes are
    touched. Should another router be copying into the same folder right now, its copy fails to
    link and is simply retried (nothing is lost: its spool file stays until a copy is complete).
    """
    removed = []
    try:
        candidates = [p for p in Path(folder).iterdir() if PARTIAL_COPY.fullmatch(p.name)]
    except FileNotFoundError:
        return []
    for path in candidates:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        log.warning("%s: removed %d unfinished copies (%s) left by an earlier stop", folder, len(removed),
                    ", ".join(p.name for p in removed[:5]) + (", ..." if len(removed) > 5 else ""))
    return removed
