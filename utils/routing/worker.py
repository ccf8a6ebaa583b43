"""The router's background threads: woken when there is work, stopped by a flag, watched by the node."""

from __future__ import annotations

import threading
import time

# What a worker loop lets through: everything else is logged, audited and survived. Catching
# only Exception is not enough: codecs written in Rust raise pyo3's PanicException, a
# BaseException, and a thread it escapes from dies silently.
FATAL = (KeyboardInterrupt, SystemExit)


class WakeableThread(threading.Thread):
    """A daemon thread that sleeps on ``_wake`` until ``wake()``; ``stop()`` sets ``_halt`` and wakes it.

    Subclasses loop ``while not self._halt.is_set()`` and wait on ``self._wake`` (or on
    ``self._halt`` for a pause that a stop must cut short). A thread that ends without having
    been stopped has died; :class:`utils.routing.node.RouterNode` watches for that, and for a
    unit of work that has been running (``busy_since``) for too long.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._wake = threading.Event()
        self._halt = threading.Event()
        self.busy_since: float | None = None  # time.monotonic() when the current unit of work began

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._halt.is_set()

    @property
    def died(self) -> bool:
        """Started, ended, and never asked to stop."""
        return self.ident is not None and not self.is_alive() and not self._halt.is_set()

    def busy_for(self) -> float:
        """Seconds the current unit of work has been running (0 when idle)."""
        since = self.busy_since
        return 0.0 if since is None else time.monotonic() - since
