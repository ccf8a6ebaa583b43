"""The router's background threads: woken when there is work, stopped by a flag."""

from __future__ import annotations

import threading


class WakeableThread(threading.Thread):
    """A daemon thread that sleeps on ``_wake`` until ``wake()``; ``stop()`` sets ``_halt`` and wakes it.

    Subclasses loop ``while not self._halt.is_set()`` and wait on ``self._wake`` (or on
    ``self._halt`` for a pause that a stop must cut short).
    """

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._wake = threading.Event()
        self._halt = threading.Event()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._halt.set()
        self._wake.set()
