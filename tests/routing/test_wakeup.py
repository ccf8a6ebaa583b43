"""utils/routing/intake/wakeup.py: associations that wait instead of polling, and still answer at once."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("pynetdicom")

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from utils.routing.intake import wakeup


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_server(timeout: float | None = None):
    """A Verification SCP whose connections are made quiet (as the router's SCP does):
    (server, port, the associations accepted). ``timeout``: its ACSE and network timeouts."""
    ae = AE(ae_title="SCP")
    ae.add_supported_context(Verification)
    if timeout is not None:
        ae.acse_timeout = ae.network_timeout = timeout
    accepted = []

    def opened(event):
        wakeup.quiet(event, reactor=True)
        accepted.append(event.assoc)

    port = _port()
    srv = ae.start_server(("127.0.0.1", port), block=False,
                          evt_handlers=[(evt.EVT_CONN_OPEN, opened), (evt.EVT_CONN_CLOSE, wakeup.close)])
    return srv, port, accepted


@pytest.fixture
def server():
    srv, port, accepted = _quiet_server()
    yield port, accepted
    srv.shutdown()


def _associate(port: int, quiet: bool = True):
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    handlers = [(evt.EVT_CONN_OPEN, wakeup.quiet), (evt.EVT_CONN_CLOSE, wakeup.close)] if quiet else []
    assoc = ae.associate("127.0.0.1", port, evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def _count_ready_calls(assoc, seconds: float) -> int:
    """How often the DUL reactor asked its socket whether data had come, over ``seconds`` of an idle association."""
    cls = type(assoc.dul.socket)
    calls = [0]
    original = cls.ready

    def counting(self):
        calls[0] += 1
        return original.fget(self)

    cls.ready = property(counting)
    try:
        time.sleep(seconds)
    finally:
        cls.ready = original
    return calls[0]


def test_both_ends_wait_and_answer(server):
    port, accepted = server
    assoc = _associate(port)
    try:
        assert type(assoc.dul.socket).__name__ == "WaitingAssociationSocket"
        assert assoc.dul._run_loop_delay == 0
        for _ in range(20):  # each echo needs both reactors of both ends to act on what arrived
            assert assoc.send_c_echo().Status == 0
        (peer,) = accepted
        assert type(peer.dul.socket).__name__ == "WaitingAssociationSocket"
    finally:
        assoc.release()
    assert assoc.is_released
    deadline = time.monotonic() + 10
    while accepted[0].is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not accepted[0].is_alive()  # the accepting side saw the release request and ended its threads
    assert accepted[0].dul.socket.waker._closed  # EVT_CONN_CLOSE released the wake-up sockets


def test_an_idle_connection_does_not_poll(server):
    """pynetdicom's reactor looks at its socket every millisecond; a quiet one waits in select (WAIT_S at most)."""
    port, _ = server
    assoc = _associate(port)
    try:
        calls = _count_ready_calls(assoc, 1.0)
    finally:
        assoc.release()
    assert 0 < calls <= 3 / wakeup.WAIT_S  # about 1 / WAIT_S; polling would be hundreds


def test_a_plain_connection_polls(server):
    """The same count without quiet() on this end: the difference the module exists for."""
    port, _ = server
    assoc = _associate(port, quiet=False)
    try:
        calls = _count_ready_calls(assoc, 1.0)
    finally:
        assoc.release()
    assert calls > 3 / wakeup.WAIT_S


def test_unexpected_internals_leave_the_connection_alone():
    """Another pynetdicom with other internals: the connection stays as pynetdicom made it."""
    dul = SimpleNamespace(socket=SimpleNamespace(socket=None))
    event = SimpleNamespace(assoc=SimpleNamespace(dul=dul))
    wakeup.quiet(event, reactor=True)
    assert not hasattr(dul, "_run_loop_delay") and not hasattr(dul.socket, "waker")


def test_a_wake_reaches_a_waiting_select():
    waker = wakeup._Waker()
    try:
        threading.Timer(0.05, waker.wake).start()
        import select

        readable, _, _ = select.select([waker.reader], [], [], 10)
        assert readable == [waker.reader]
        waker.drain()
        readable, _, _ = select.select([waker.reader], [], [], 0)
        assert readable == []
    finally:
        waker.close()
    waker.wake()  # after close: ignored, no error


@pytest.mark.parametrize("partial", [b"", b"\x01\x00\x00\x00\x03\xe8\x00\x01"])  # nothing, or half a PDU header
def test_a_peer_that_vanishes_mid_pdu_is_timed_out_and_the_server_goes_on(partial):
    """A quiet connection waits in select, and pynetdicom's timers still fire: a peer that connects, sends nothing or
    a truncated A-ASSOCIATE-RQ and disappears is dropped after the ACSE / network timeout (1 s here; pynetdicom
    keeps such a connection until then, quiet or not), and the next association is served as usual."""
    srv, port, accepted = _quiet_server(timeout=1)
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(partial)  # A-ASSOCIATE-RQ announcing 1000 bytes, of which none come
            deadline = time.monotonic() + 10
            while not accepted and time.monotonic() < deadline:
                time.sleep(0.01)
        (vanished,) = accepted
        assert type(vanished.dul.socket).__name__ == "WaitingAssociationSocket"
        deadline = time.monotonic() + 30
        while vanished.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not vanished.is_alive()
        assoc = _associate(port)
        try:
            assert assoc.send_c_echo().Status == 0
        finally:
            assoc.release()
    finally:
        srv.shutdown()
