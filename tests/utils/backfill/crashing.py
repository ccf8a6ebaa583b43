"""A decode function for the backfill tests: a file whose name contains ``crash`` kills the process decoding it
(as a segfaulting codec would); every other file is decoded as usual. Module level, so Ray actors
and the isolated decoding processes can import it."""

from __future__ import annotations

import os
import signal

from utils.infer.engine import decode_file


def crash_on_name(path, spec):
    if "crash" in os.path.basename(os.fspath(path)):
        os.kill(os.getpid(), signal.SIGKILL)
    return decode_file(path, spec)
