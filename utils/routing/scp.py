"""The router's Storage SCP (and Verification SCP): receive, make durable, then answer.

Every storage SOP class pynetdicom knows (170, images and non-images: SR, encapsulated PDF,
presentation states...) is accepted with uncompressed and the common compressed transfer
syntaxes; the sender's preference order decides which one is used. The received bytes are
stored as sent (``event.encoded_dataset()``: the dataset is never decoded or re-encoded), so
forwarding can reproduce them exactly. Success (0x0000) is answered only after the spool file
and its queue row are on disk; a failure to store answers 0xA700 (out of resources) and the
sender keeps its copy. So does an object that would take the spool's filesystem below its
free-space reserve (utils/routing/space.py), refused before anything is written.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from utils.routing.audit import AuditLog, AuditWriteError
from utils.routing.config import RouterConfig
from utils.routing.queue import SpoolQueue
from utils.routing.space import ReceptionGate

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
    HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless,
]
OUT_OF_RESOURCES = 0xA700
NETWORK_TIMEOUT_S = 60  # an idle or stalled peer is dropped after this long
MAX_PDU = 1 << 20  # largest PDU we accept: fewer, larger PDUs cost far less Python per object than 16 KB ones


class StoreHandler:
    """C-STORE: spool + queue row, audit, wake the classifier; C-ECHO: success."""

    def __init__(self, queue: SpoolQueue, audit: AuditLog, on_received: Callable[[], None],
                 gate: ReceptionGate | None = None) -> None:
        """``gate``: the free-space reserve (None: none, a failing write still answers 0xA700)."""
        self.queue = queue
        self.audit = audit
        self.on_received = on_received
        self.gate = gate

    def handle_store(self, event) -> int:
        request = event.request
        sop_instance_uid = str(request.AffectedSOPInstanceUID or "")
        sop_class_uid = str(request.AffectedSOPClassUID or "")
        transfer_syntax = str(event.context.transfer_syntax)
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            data = event.encoded_dataset(include_meta=True)  # in memory: nothing written yet
            if self.gate is not None and self.gate.admit(len(data)) is not None:
                log.debug("refused %s from %s: below the free-space reserve", sop_instance_uid, calling_ae)
                return OUT_OF_RESOURCES  # logged and audited once per pause by the gate
            try:
                item, duplicate = self.queue.store(data, sop_instance_uid=sop_instance_uid,
                                                   sop_class_uid=sop_class_uid, transfer_syntax=transfer_syntax,
                                                   calling_ae=calling_ae)
            finally:
                if self.gate is not None:
                    self.gate.release(len(data))
        except Exception as error:  # noqa: BLE001 - disk full, I/O error: refuse, the sender keeps its copy
            log.error("could not store %s from %s: %s", sop_instance_uid, calling_ae, error)
            self._audit("receive_failed", sop_instance_uid=sop_instance_uid, calling_ae=calling_ae, reason=str(error))
            return OUT_OF_RESOURCES
        # Stored and committed: success, even if the line cannot be written now (the next start writes it,
        # utils/routing/reconcile.py).
        self._audit("received", sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
                    transfer_syntax=transfer_syntax, calling_ae=calling_ae, size=item.size, item=item.id,
                    duplicate=duplicate)
        self.on_received()
        return 0x0000

    def _audit(self, event: str, **fields) -> None:
        try:
            self.audit.write(event, **fields)
        except AuditWriteError as error:
            log.error("%s", error)

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
    """Listen on (host, port) in background threads; returns (ae, server)."""
    from pynetdicom import evt

    ae = build_ae(config)
    server = ae.start_server((config.host, config.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handler.handle_store),
                                           (evt.EVT_C_ECHO, handler.handle_echo),
                                           (evt.EVT_CONN_OPEN, set_tcp_nodelay)])
    return ae, server
