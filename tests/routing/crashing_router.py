"""router.py whose classification kills the process (os._exit) when a batch holds one SOP instance.

    KILL_ON_SOP_INSTANCE_UID=1.2.3 python -m tests.routing.crashing_router --config router.yaml

Stands in for a decoder that crashes the router (a segfault, the kernel's OOM killer, kill -9)
while one object is being classified: nothing in Python runs after it, so only what the queue
committed before the decode started survives.
"""

from __future__ import annotations

import os
import sys

import router
from utils.routing.decision.classifier import Classifier

KILL_STATUS = 70

_classify = Classifier.classify


def _classify_or_die(self, items, *args, **kwargs):
    if any(item.sop_instance_uid == os.environ["KILL_ON_SOP_INSTANCE_UID"] for item in items):
        os._exit(KILL_STATUS)
    return _classify(self, items, *args, **kwargs)


if __name__ == "__main__":
    Classifier.classify = _classify_or_die
    sys.exit(router.main(sys.argv[1:]))
