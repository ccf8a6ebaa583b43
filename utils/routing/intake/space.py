"""The free-space reserve of the spool's filesystem: below it the router stops receiving, not working.

A full spool used to deadlock the router: once the disk was full, the classifier's and the
forwarders' queue commits failed too, so nothing was forwarded and no space was ever freed. The
reserve (``min_free_mb``, ``min_free_percent``: the larger counts) keeps room for the work that
drains the spool (database commits, audit lines, a quarantine copy): an object that would take the
free space below it is refused with 0xA700 (out of resources, the sender keeps its copy and
retries) *before* anything is written, while classification and forwarding go on. Reception
resumes by itself once the free space is back above the reserve plus ``RESUME_MARGIN`` of it, and
has room for the largest object refused meanwhile (so that it does not flap around the boundary). Each pause and resume is logged and audited once
(``reception_paused`` / ``reception_resumed``), not once per refused object.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MB = 1 << 20  # the reserve's unit, as DECODE_MEMORY_LIMIT_MB
RESUME_MARGIN = 0.1  # once paused, reception resumes when the free space is this fraction above the reserve


@dataclass(frozen=True)
class Reading:
    """Free and total bytes of a filesystem, and the reserve that applies to it."""

    free: int
    total: int
    reserve: int

    @property
    def resume_at(self) -> int:
        """Free bytes at which a paused reception resumes."""
        return self.reserve + math.ceil(self.reserve * RESUME_MARGIN)

    @property
    def below(self) -> bool:
        return self.free < self.reserve

    def fields(self) -> dict[str, Any]:
        """For the audit log and messages: sizes in MB, one decimal."""
        return {"free_mb": round(self.free / MB, 1), "reserve_mb": round(self.reserve / MB, 1),
                "resume_mb": round(self.resume_at / MB, 1)}


def reserve_bytes(total: int, min_free_mb: int, min_free_percent: float) -> int:
    """The reserve of a filesystem of ``total`` bytes: the larger of the two settings (0 and 0: none)."""
    return max(min_free_mb * MB, math.ceil(total * min_free_percent / 100))


def existing(path: str | os.PathLike) -> Path:
    """``path`` or its nearest existing parent (a spool folder not created yet lives on its parent's filesystem)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def measure(path: str | os.PathLike, min_free_mb: int, min_free_percent: float,
            probe: Callable[[str], Any] | None = None) -> Reading:
    """Free space of the filesystem holding ``path`` (what an unprivileged process may use) and its reserve.
    ``probe``: ``shutil.disk_usage`` (the default) or a stand-in with its ``.free`` and ``.total``."""
    usage = (probe or shutil.disk_usage)(str(existing(path)))
    return Reading(usage.free, usage.total, reserve_bytes(usage.total, min_free_mb, min_free_percent))


def describe(reading: Reading, where: str | os.PathLike) -> str:
    """One line for ``--status`` / ``--check``."""
    f = reading.fields()
    if reading.reserve == 0:
        return f"{f['free_mb']:.0f} MB free on the filesystem of {where} (no reserve: min_free_mb and min_free_percent are 0)"
    if reading.below:
        return (f"reception PAUSED for disk space: {f['free_mb']:.0f} MB free on the filesystem of {where}, below the "
                f"reserve of {f['reserve_mb']:.0f} MB; new objects are refused (0xA700) until {f['resume_mb']:.0f} MB "
                "are free; classification and forwarding go on")
    return (f"{f['free_mb']:.0f} MB free on the filesystem of {where} (reserve {f['reserve_mb']:.0f} MB: below it "
            "new objects are refused)")


class ReceptionGate:
    """Decides whether the SCP may store one more object, from the free space of the spool's filesystem.

    ``admit(size)`` before an object is written (None: go ahead, then ``release(size)`` once it is
    written or failed; otherwise the reading that refused it). Objects being written count against
    the free space, so concurrent associations cannot overshoot the reserve together. ``refresh()``
    (the node's watchdog, twice a second) notices a change without waiting for the next object.
    ``probe``: see :func:`measure`.
    """

    def __init__(self, path: str | os.PathLike, min_free_mb: int, min_free_percent: float, audit=None,
                 probe: Callable[[str], Any] | None = None) -> None:
        self.path = Path(path)
        self.min_free_mb, self.min_free_percent = min_free_mb, min_free_percent
        self.audit = audit
        self.probe = probe
        self.paused_since: float | None = None
        self.refused = 0  # objects refused during the current pause
        self.largest_refused = 0  # bytes: the pause lasts until the largest object refused during it fits
        self._pending = 0  # bytes admitted and not written yet
        self._lock = threading.Lock()
        self._probe_failed = False

    @property
    def enabled(self) -> bool:
        return self.min_free_mb > 0 or self.min_free_percent > 0

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def admit(self, size: int) -> Reading | None:
        """Room for an object of ``size`` bytes: None (it may be written; call ``release(size)`` after), or the
        reading that refused it."""
        with self._lock:
            reading = self._read()
            if reading is not None:
                available = self._available(reading)
                if self.paused or available - size < reading.reserve:
                    if not self.paused:
                        self._pause(reading, available, size)
                    self.refused += 1
                    self.largest_refused = max(self.largest_refused, size)
                    return reading
            self._pending += size
            return None

    def release(self, size: int) -> None:
        with self._lock:
            self._pending = max(0, self._pending - size)

    def refresh(self) -> Reading | None:
        """Pause or resume on the current free space (nothing arriving needed); the reading, if any."""
        with self._lock:
            reading = self._read()
            if reading is not None:
                available = self._available(reading)
                if not self.paused and available < reading.reserve:
                    self._pause(reading, available, 0)
            return reading

    def _available(self, reading: Reading) -> int:
        """Free bytes not promised to objects being written; resumes a paused reception when they allow it."""
        available = reading.free - self._pending
        if self.paused and self._may_resume(reading, available):
            self._resume(reading)
        return available

    def _may_resume(self, reading: Reading, available: int) -> bool:
        return available >= max(reading.resume_at, reading.reserve + self.largest_refused)

    def _read(self) -> Reading | None:
        if not self.enabled:
            return None
        try:
            reading = measure(self.path, self.min_free_mb, self.min_free_percent, self.probe)
        except OSError as error:  # cannot tell: do not block reception on it (a failing write still answers 0xA700)
            if not self._probe_failed:
                log.warning("cannot read the free space of %s (%s); the reserve is not enforced until it can",
                            self.path, error)
            self._probe_failed = True
            return None
        self._probe_failed = False
        return reading

    def _pause(self, reading: Reading, available: int, size: int) -> None:
        self.paused_since, self.refused, self.largest_refused = time.time(), 0, 0
        f = reading.fields()
        left = (available - size) / MB
        log.warning("reception paused: %.1f MB free on the spool's filesystem (%s)%s, below the reserve of %.1f MB "
                    "(min_free_mb %d, min_free_percent %g); new objects are refused with 0xA700 (out of resources) "
                    "until %.1f MB are free; classification and forwarding go on", f["free_mb"], self.path,
                    f", {left:.1f} MB once the {(self._pending + size) / MB:.1f} MB being received are written"
                    if self._pending + size else "", f["reserve_mb"], self.min_free_mb, self.min_free_percent,
                    max(f["resume_mb"], f["reserve_mb"] + size / MB))
        self._audit("reception_paused", path=str(self.path), object_mb=round(size / MB, 1) if size else None, **f)

    def _resume(self, reading: Reading) -> None:
        paused_s = time.time() - (self.paused_since or time.time())
        log.info("reception resumed: %.1f MB free on the spool's filesystem (%s) after a pause of %.0f s "
                 "(%d objects refused meanwhile)", reading.free / MB, self.path, paused_s, self.refused)
        self._audit("reception_resumed", path=str(self.path), paused_s=round(paused_s, 3), refused=self.refused,
                    **reading.fields())
        self.paused_since, self.refused = None, 0

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is None:
            return
        try:
            self.audit.write(event, **fields)
        except Exception:  # the audit log's disk may be the full one; the log line above stands
            log.exception("could not write %s to the audit log", event)
