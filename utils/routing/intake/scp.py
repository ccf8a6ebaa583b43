"""The router's Storage SCP (and Verification SCP): receive, make durable, then answer.

Every storage SOP class pynetdicom knows (170, images and non-images: SR, encapsulated PDF,
presentation states...) is accepted with uncompressed and the common compressed transfer
syntaxes; the sender's preference order decides which one is used. The received bytes are
stored as sent (``event.encoded_dataset()``: the dataset is never decoded or re-encoded), so
forwarding can reproduce them exactly. Success (0x0000) is answered only after the spool file
and its queue row are on disk; a failure to store answers 0xA700 (out of resources) and the
sender keeps its copy. So does an object that would take the spool's filesystem below its
free-space reserve (utils/routing/intake/space.py), refused before anything is written.

With ``tls`` in the configuration the port speaks DICOM over TLS only (utils/routing/tls.py). Each
incoming connection reads whole PDUs with :func:`read_whole` (pynetdicom reads 4 KB per call).

Stopping (:func:`close_scp`) never waits for a peer that sends nothing: once the server stops
accepting, a connection that has not asked for an association (a health-check probe, a half-open
connection) and an association between two messages are closed at once; an association that is
receiving a C-STORE, or whose C-STORE is being stored, gets the grace period to have that object
stored and acknowledged (and no further one: a C-STORE that begins after the stop began is
answered 0xA700, the sender keeps it). Past the grace period what is left is aborted: an object
cut short is neither stored nor acknowledged. ``close_scp`` returns only when no object is being
stored any more, so the queue can be closed after it.

pynetdicom's internals, on purpose: pynetdicom offers no hook for how a connection reads or for what an
association holds, so this module reads and sets a few of its attributes, the same way as
utils/routing/intake/wakeup.py and under the same exact pin (``wakeup.PYNETDICOM_VERSION``, checked by
tests/routing/test_pynetdicom_internals.py):

- :func:`tune_connection` sets ``recv`` on this connection's ``AssociationSocket`` object (an instance
  attribute shadowing the method), which ``DULServiceProvider._read_pdu_data`` calls as
  ``self.socket.recv(nr_bytes)``; under another pynetdicom version it is left off, as wakeup's tuning is;
  ``set_tcp_nodelay`` uses ``dul.socket.socket``, the wrapped ``socket.socket`` (a documented attribute);
- :func:`receiving` reads ``assoc.dimse.message`` and ``assoc.dimse.msg_queue`` (documented attributes
  of ``DIMSEServiceProvider``, filled by its ``receive_primitive``); missing, every association counts
  as receiving;
- :func:`drop_connection` puts ``None`` on ``dul.to_user_queue``: ``Association.run_reactor`` of an
  acceptor waits there for the A-ASSOCIATE-RQ with ``dul.receive_pdu(wait=True, timeout=acse_timeout)``
  and treats ``None`` as that timeout (it ends the association).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from typing import TYPE_CHECKING

from utils.routing.intake import wakeup
from utils.routing.intake.accepted import TRANSFER_SYNTAXES  # noqa: F401 (callers import it from here too)
from utils.routing.operations.audit import AuditLog
from utils.routing.operations.metrics import NO_METRICS
from utils.routing.queue import SpoolQueue
from utils.routing.intake.space import ReceptionGate
from utils.untrusted import log_safe

if TYPE_CHECKING:  # annotations only: the configuration imports the workers' settings
    from utils.routing.operations.config import RouterConfig

log = logging.getLogger(__name__)

OUT_OF_RESOURCES = 0xA700
NETWORK_TIMEOUT_S = 60  # an idle or stalled peer is dropped after this long
MAX_PDU = 1 << 20  # largest PDU we accept: fewer, larger PDUs cost far less Python per object than 16 KB ones
CLOSE_POLL_S = 0.05  # how often close_scp looks at the associations while it waits
ABORT_WAIT_S = 1.0  # after an A-ABORT, how long the peer may take to close before the connection is cut


class StoreHandler:
    """C-STORE: spool + queue row, audit, wake the classifier; C-ECHO: success."""


    def __init__(self, queue: SpoolQueue, audit: AuditLog, on_received: Callable[[], None],
                 gate: ReceptionGate | None = None, metrics=NO_METRICS) -> None:
        """``gate``: the free-space reserve (None: none, a failing write still answers 0xA700); ``metrics``: the
        node's RouterMetrics when /metrics is on."""
        self.metrics = metrics
        self.queue = queue
        self.audit = audit
        self.on_received = on_received
        self.gate = gate
        self._lock = threading.Condition()
        self._storing: dict[int, int] = {}  # id(association) -> C-STOREs being handled for it
        self._closing = False
        self._may_finish: set[int] = set()  # associations receiving a C-STORE when closing began

    # --- stopping: which associations are in the middle of an object -------------------------

    def storing(self, assoc) -> bool:
        """A C-STORE of ``assoc`` is being handled (stored, committed) right now."""
        with self._lock:
            return self._storing.get(id(assoc), 0) > 0

    def begin_closing(self, receiving: list) -> None:
        """From now on only the associations in ``receiving`` (and those storing right now) may have one more
        C-STORE handled; every other C-STORE is answered 0xA700 before anything is written."""
        with self._lock:
            self._closing = True
            self._may_finish = {id(a) for a in receiving} | {k for k, n in self._storing.items() if n}

    def wait_stored(self, timeout: float) -> bool:
        """Wait until no C-STORE is being handled; False after ``timeout``."""
        with self._lock:
            return self._lock.wait_for(lambda: not any(self._storing.values()), timeout)

    def _enter(self, assoc) -> bool:
        with self._lock:
            key = id(assoc)
            if self._closing:
                if key not in self._may_finish:
                    return False
                self._may_finish.discard(key)  # one object: the one it was receiving
            self._storing[key] = self._storing.get(key, 0) + 1
            return True

    def _leave(self, assoc) -> None:
        with self._lock:
            key = id(assoc)
            self._storing[key] -= 1
            if not self._storing[key]:
                del self._storing[key]
            self._lock.notify_all()

    def handle_store(self, event) -> int:
        if not self._enter(event.assoc):
            log.info("refused %s: the router is stopping", log_safe(event.request.AffectedSOPInstanceUID))
            self.metrics.refused("stopping")
            return OUT_OF_RESOURCES  # nothing written; the sender keeps it and sends it again later
        try:
            return self._store(event)
        finally:
            self._leave(event.assoc)

    def _store(self, event) -> int:
        request = event.request
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        sop_class_uid = str(request.AffectedSOPClassUID or "")
        transfer_syntax = str(event.context.transfer_syntax)
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            data = event.encoded_dataset(include_meta=True)  # in memory: nothing written yet
            if self.gate is not None and self.gate.admit(len(data)) is not None:
                log.debug("refused %s from %s: below the free-space reserve", log_safe(sop_instance_uid),
                          log_safe(calling_ae))
                self.metrics.refused("disk_reserve")
                return OUT_OF_RESOURCES  # logged and audited once per pause by the gate
            try:
                item, duplicate = self.queue.store(data, sop_instance_uid=sop_instance_uid,
                                                   sop_class_uid=sop_class_uid, transfer_syntax=transfer_syntax,
                                                   calling_ae=calling_ae)
            finally:
                if self.gate is not None:
                    self.gate.release(len(data))
        except Exception as error:  # noqa: BLE001 - disk full, I/O error: refuse, the sender keeps its copy
            log.error("could not store %s from %s: %s", log_safe(sop_instance_uid), log_safe(calling_ae), error)
            self.metrics.refused("store_failed")
            self.audit.record("receive_failed", sop_instance_uid=sop_instance_uid, calling_ae=calling_ae, reason=str(error))
            return OUT_OF_RESOURCES
        # Stored and committed: success, even if the line cannot be written now (the next start writes it,
        # utils/routing/operations/reconcile.py).
        self.audit.record("received", sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
                    transfer_syntax=transfer_syntax, calling_ae=calling_ae, size=item.size, item=item.id,
                    duplicate=duplicate)
        self.metrics.received(calling_ae)
        self.on_received()
        return 0x0000


    @staticmethod
    def handle_echo(event) -> int:
        return 0x0000


def set_tcp_nodelay(event) -> None:
    """EVT_CONN_OPEN handler: send each PDU at once (pynetdicom leaves Nagle's algorithm on; with the
    peer's delayed ACKs that costs up to 40 ms per message: 20 small objects/s instead of 300)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as error:
            log.debug("TCP_NODELAY not set: %s", error)


def read_whole(assoc_socket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` for the router's incoming connections: read ``nr_bytes`` into one buffer with as few
    ``recv_into`` calls as the kernel allows, instead of pynetdicom's 4 KB ``recv`` per call.

    Same contract (blocks until ``nr_bytes`` arrived; returns what came before the peer closed; raises what the
    socket raises). Why: each call releases and re-takes the GIL; a 2048 x 2048 16-bit image is 2,000 of pynetdicom's
    calls, and with 8 senders, the classifier and the forwarders in one process every re-take waits its turn: the
    profile had this line as the router's largest single cost (bench/RESULTS.md, "Router throughput").
    """
    sock = assoc_socket.socket
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    got = 0
    try:
        while got < nr_bytes:
            count = sock.recv_into(view[got:], nr_bytes - got)
            if not count:  # the connection was closed: what we have (pynetdicom then sees Evt17)
                return buffer[:got]
            got += count
    finally:
        view.release()
    return buffer


def tune_connection(event) -> None:
    """EVT_CONN_OPEN handler of the SCP: TCP_NODELAY (:func:`set_tcp_nodelay`) and :func:`read_whole` as this
    connection's ``recv`` (on this socket object only; pynetdicom is not changed for anyone else)."""
    set_tcp_nodelay(event)
    assoc_socket = getattr(event.assoc.dul, "socket", None)
    if assoc_socket is not None and hasattr(assoc_socket, "recv") and wakeup.written_for_installed():
        assoc_socket.recv = lambda nr_bytes: read_whole(assoc_socket, nr_bytes)
    wakeup.quiet(event, reactor=True)


def build_ae(config: RouterConfig):
    """The pynetdicom AE that serves as Storage and Verification SCP."""
    from pynetdicom import AE, AllStoragePresentationContexts
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = MAX_PDU
    ae.network_timeout = NETWORK_TIMEOUT_S
    ae.acse_timeout = 30
    ae.dimse_timeout = NETWORK_TIMEOUT_S
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    if config.allowed_callers:
        ae.require_calling_aet = list(config.allowed_callers)
    return ae


def start_scp(config: RouterConfig, handler: StoreHandler):
    """Listen on (host, port) in background threads, with TLS when ``config.tls`` is set; returns (ae, server)."""
    from pynetdicom import evt

    ae = build_ae(config)
    context = None
    if config.tls is not None:
        from utils.routing.tls import server_context

        context = server_context(config.tls)  # checked at load already; read again at each start
    server = ae.start_server((config.host, config.port), block=False, ssl_context=context,
                             evt_handlers=[(evt.EVT_C_STORE, handler.handle_store),
                                           (evt.EVT_C_ECHO, handler.handle_echo),
                                           (evt.EVT_CONN_OPEN, tune_connection),
                                           (evt.EVT_CONN_CLOSE, wakeup.close)])
    return ae, server


# --- stopping ---------------------------------------------------------------------------------


def receiving(assoc) -> bool:
    """``assoc`` holds part of a DIMSE message (a C-STORE arriving) or a whole one not yet handled.

    Reads pynetdicom's DIMSE provider (``message``: the message being assembled from P-DATA;
    ``msg_queue``: complete ones waiting for the association's thread), the same in 2.x and 3.x;
    where they are missing, every association counts as receiving (the grace period applies).
    """
    dimse = getattr(assoc, "dimse", None)
    if dimse is None or not hasattr(dimse, "message") or not hasattr(dimse, "msg_queue"):
        return True
    return dimse.message is not None or not dimse.msg_queue.empty()


def drop_connection(assoc) -> None:
    """Close ``assoc``'s TCP connection without a word (a peer that never associated gets no A-ABORT: its state
    machine has none to send) and let an acceptor that waits for an A-ASSOCIATE-RQ end now, not after the ACSE
    timeout."""
    dul = getattr(assoc, "dul", None)
    sock = getattr(dul, "socket", None)
    try:
        if sock is not None:
            sock.close()  # shuts the socket down; the DUL sees the transport closed
    except OSError as error:
        log.debug("closing a connection: %s", error)
    if dul is not None and not assoc.is_established:
        dul.to_user_queue.put(None)  # what its wait for the A-ASSOCIATE-RQ returns on a timeout


def close_scp(server, handler: StoreHandler | None, grace_s: float) -> None:
    """Stop accepting; close what is idle at once; give C-STOREs in progress ``grace_s`` to finish; then cut the
    rest. Returns once no C-STORE is being stored (see the module docstring)."""
    server.shutdown()  # no new connections
    assocs = list(server.active_associations)
    if handler is not None:
        handler.begin_closing([a for a in assocs if a.is_established and receiving(a)])
    deadline = time.monotonic() + grace_s
    closed: dict[int, float] = {}  # id(association) -> when it was told to go
    dropped: set[int] = set()
    while True:
        now = time.monotonic()
        left = [a for a in server.active_associations if id(a) not in dropped]
        if not left:
            break
        for assoc in left:
            key = id(assoc)
            if key in closed:
                if now - closed[key] > ABORT_WAIT_S:  # the peer did not close after the A-ABORT (half-open)
                    drop_connection(assoc)
                    dropped.add(key)
                continue
            busy = assoc.is_established and (receiving(assoc) or (handler is not None and handler.storing(assoc)))
            if busy and now < deadline:
                continue
            if busy:
                log.warning("association with %s still receiving after %.0f s: aborted (the object is not "
                            "acknowledged)", log_safe(assoc.requestor.ae_title), grace_s)
            if assoc.is_established:
                assoc.abort(block=False)  # between two objects: the sender keeps what it did not send
                closed[key] = now
            else:
                drop_connection(assoc)  # connected, never associated (a probe) or still negotiating
                dropped.add(key)
        time.sleep(CLOSE_POLL_S)
    if handler is not None and not handler.wait_stored(grace_s):
        log.error("a C-STORE was still being stored %.0f s after the stop began", 2 * grace_s)
