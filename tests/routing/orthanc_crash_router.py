"""router.py that dies (os._exit) while its Orthanc source hands over the N-th instance: after the
spool file is written and fsynced, before its queue row and the source's cursor are committed.

    KILL_AT_ORTHANC_STORE=5 python -m tests.routing.orthanc_crash_router --config router.yaml

Stands in for kill -9 or a power loss at the worst moment of the hand-off: nothing in Python runs
after it, so only what was committed before survives (a file without a row; the cursor before it).
"""

from __future__ import annotations

import os
import sys

import router
from utils.routing.queue import SpoolQueue

KILL_STATUS = 71

_insert = SpoolQueue._insert
_handed_over = 0


def _insert_or_die(self, *args, **kwargs):
    global _handed_over
    if kwargs.get("meta") or (len(args) > 7 and args[7]):  # a row that carries the Orthanc source's cursor
        _handed_over += 1
        if _handed_over == int(os.environ["KILL_AT_ORTHANC_STORE"]):
            os._exit(KILL_STATUS)
    return _insert(self, *args, **kwargs)


if __name__ == "__main__":
    SpoolQueue._insert = _insert_or_die
    sys.exit(router.main(sys.argv[1:]))
