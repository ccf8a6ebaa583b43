"""pynetdicom associations that wait for their socket instead of polling it every millisecond.

pynetdicom runs two threads per association, and both poll: the DUL reactor sleeps 1 ms, asks
``select`` with a timeout of 0 whether the socket has data and looks at its queue of primitives
to send; the association reactor sleeps 1 ms and looks at its queue of decoded DIMSE messages.
Each look takes the GIL. With 8 senders connected and two forwarders that is about 20,000
wake-ups a second in the router's one process: measured idle, 6 % of a core per association,
and under load every one of them also takes the GIL from the threads doing real work
(receiving, storing, classifying, forwarding).

:func:`quiet` (an EVT_CONN_OPEN handler, installed per connection; pynetdicom itself is not
changed for anyone else) makes both wait for what they wait for:

- the DUL reactor blocks in ``select`` on its socket *and* on a wake-up socket pair, which
  receives a byte whenever the association queues a primitive for it (``to_provider_queue.put``)
  or asks it to stop (``kill_dul`` / ``stop_dul``); so data from the peer and primitives from the
  association are acted on at once, and an idle connection wakes only every ``WAIT_S``
  (pynetdicom's timers are checked then);
- on an association the router accepts (``reactor=True``), the association reactor waits (up to
  ``WAIT_S``) until the DUL hands it something, a decoded DIMSE message or a release request or
  abort from the peer, instead of looking and sleeping 1 ms: a complete C-STORE is served as
  soon as it is decoded. (Not for the forwarder's associations: there pynetdicom pauses the
  reactor around each ``send_c_store`` and waits, polling, until it has paused; a reactor
  blocked in a wait would hold every send up.)

pynetdicom's internals, on purpose
----------------------------------
pynetdicom has no public hook for any of this: no event fires per reactor loop, the DUL's and the
association's loops sleep a fixed time and poll, and the ``AssociationSocket``,
``DULServiceProvider`` and ``DIMSEServiceProvider`` are built by pynetdicom itself (``AE.associate``
and ``RequestHandler._create_association``) with no factory argument to hand it a subclass
(``start_server(server_class=...)`` covers the server, not the objects it makes per connection).
So, per connection, from the public EVT_CONN_OPEN handler, this module touches:

- ``assoc.dul`` (``DULServiceProvider``) and ``dul.socket`` (``AssociationSocket``): where to wait;
- ``dul.to_provider_queue.put`` (wrapped on this queue object): ``send_pdu`` puts there and
  ``_process_recv_primitive`` peeks at ``queue[0]``; the wrapper wakes a waiting reactor;
- ``dul.kill_dul`` / ``dul.stop_dul`` (wrapped on this object): they set ``_kill_thread``, which
  ``run_reactor`` checks once per loop; the wrapper wakes it so that it sees the flag now
  (``stop_dul`` waits, sleeping ``_run_loop_delay``, until the thread has ended);
- ``dul._run_loop_delay`` (private, set to 0): ``run_reactor`` sleeps it on each idle loop;
- ``dul.socket.__class__`` (swapped for a subclass) overriding ``ready``, the property
  ``_is_transport_event`` asks once per loop; the subclass reads ``_is_connected`` (private) and
  falls back to ``AssociationSocket.ready``;
- with ``reactor=True``: ``assoc.dimse.msg_queue.put`` and ``dul.to_user_queue.put`` (wrapped: set an
  event) and ``assoc.dimse.get_msg`` (wrapped on this object), which ``Association._run_reactor``
  calls with ``block=False`` after its fixed ``time.sleep(0.001)``; the wrapper waits for the event
  first, in the association's own thread only.

These are pinned, not hoped for: requirements.txt pins pynetdicom exactly (``PYNETDICOM_VERSION``),
and tests/routing/test_pynetdicom_internals.py checks each name above (present, same signature) and
a fingerprint of every pynetdicom function whose body the patches depend on; it says which internal
changed, which patch depends on it and what to check before the pin moves. At run time, under any
other pynetdicom version (or wherever the internals are not what this module expects) the
connection is left as pynetdicom made it, with one warning in the log: slower, never broken. A
public hook to propose upstream: a per-association reactor delay, or a socket/provider factory
on ``AE``.
"""

from __future__ import annotations

import logging
import select
import socket
import threading

log = logging.getLogger(__name__)

WAIT_S = 0.05  # longest wait of an idle connection's threads: pynetdicom's timers and stop flags are checked then
PYNETDICOM_VERSION = "3.0.4"  # the pynetdicom whose internals this module (and scp.py's read_whole) is written against


def written_for_installed() -> bool:
    """The installed pynetdicom is the one this module's patches were written and tested against (else one warning)."""
    if "ok" not in _CHECKED:
        import pynetdicom

        _CHECKED["ok"] = installed = pynetdicom.__version__ == PYNETDICOM_VERSION
        if not installed:
            log.warning("pynetdicom %s is installed; the router's connection tuning (utils/routing/intake/wakeup.py, "
                        "scp.read_whole) is written against %s and is left off: connections poll as pynetdicom "
                        "makes them (see tests/routing/test_pynetdicom_internals.py)", pynetdicom.__version__,
                        PYNETDICOM_VERSION)
    return _CHECKED["ok"]


_CHECKED: dict[str, bool] = {}


def quiet(event, reactor: bool = False) -> None:
    """EVT_CONN_OPEN handler: no busy polling on this connection (``reactor``: the association reactor's too, for
    associations the router accepts; see the module docstring)."""
    if not written_for_installed():
        return
    assoc = event.assoc
    dul = getattr(assoc, "dul", None)
    assoc_socket = getattr(dul, "socket", None)
    needed = (getattr(dul, "to_provider_queue", None), getattr(assoc_socket, "socket", None),
              getattr(dul, "_run_loop_delay", None))
    if any(part is None for part in needed) or not isinstance(assoc_socket, _socket_class()):
        return
    waker = _Waker()
    provider_queue = dul.to_provider_queue
    put, kill_dul, stop_dul = provider_queue.put, dul.kill_dul, dul.stop_dul

    def put_and_wake(*args, **kwargs):
        put(*args, **kwargs)
        if waker.waiting:  # (a write per PDU while the reactor is busy anyway would cost a syscall each)
            waker.wake()

    def kill_and_wake():
        kill_dul()
        waker.wake()

    def stop_and_wake():
        stopped = stop_dul()
        waker.wake()
        return stopped

    provider_queue.put = put_and_wake
    waker.pending = provider_queue
    dul.kill_dul, dul.stop_dul = kill_and_wake, stop_and_wake
    assoc_socket.waker = waker
    assoc_socket.__class__ = _waiting_socket_class()
    dul._run_loop_delay = 0  # the wait is in ``ready`` now; sleep(0) only yields
    if reactor:
        _wait_for_messages(assoc)


def close(event) -> None:
    """EVT_CONN_CLOSE handler: release the connection's wake-up sockets."""
    waker = getattr(getattr(event.assoc.dul, "socket", None), "waker", None)
    if waker is not None:
        waker.wake()  # a reactor blocked in select returns and sees the closed socket
        waker.close()


def _wait_for_messages(assoc) -> None:
    """The association reactor waits for what it looks for: a decoded DIMSE message (``dimse.msg_queue``) or an
    ACSE primitive from the peer (``dul.to_user_queue``: a release request, an abort)."""
    dimse, dul = getattr(assoc, "dimse", None), assoc.dul
    queues = (getattr(dimse, "msg_queue", None), getattr(dul, "to_user_queue", None))
    if any(q is None for q in queues) or not hasattr(dimse, "get_msg"):
        return
    arrived = threading.Event()
    for q in queues:
        _also_set(q, arrived)
    messages, get_msg = queues[0], dimse.get_msg

    def get_msg_waiting(block: bool = False):
        if not block and threading.current_thread() is assoc and messages.empty():
            arrived.wait(WAIT_S)
            arrived.clear()  # (a message put between the wait and here is still in the queue: get_msg finds it)
        return get_msg(block)

    dimse.get_msg = get_msg_waiting


def _also_set(q, event: threading.Event) -> None:
    put = q.put

    def put_and_set(*args, **kwargs):
        put(*args, **kwargs)
        event.set()

    q.put = put_and_set


class _Waker:
    """A socket pair: ``wake`` writes a byte (never blocks), the reactor's ``select`` watches the other end."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self._closed = False
        self.waiting = False  # the reactor is in (or about to enter) select: a put must wake it
        self.pending = None  # the queue of primitives to send: not empty, the reactor must not wait

    def wake(self) -> None:
        if not self._closed:
            try:
                self.writer.send(b"\0")
            except OSError:  # full (a wake-up is pending anyway) or closed meanwhile
                pass

    def drain(self) -> None:
        try:
            while self.reader.recv(4096):
                pass
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self.reader.close()
        self.writer.close()


def _socket_class():
    from pynetdicom.transport import AssociationSocket

    return AssociationSocket


_WAITING: dict[str, type] = {}


def _waiting_socket_class() -> type:
    """A subclass of pynetdicom's AssociationSocket whose ``ready`` waits (see the module docstring)."""
    if "class" not in _WAITING:
        import ssl

        base = _socket_class()

        class WaitingAssociationSocket(base):
            @property
            def ready(self) -> bool:
                sock, waker = self.socket, getattr(self, "waker", None)
                if waker is None or waker._closed or sock is None or self._is_connected is False:
                    return base.ready.fget(self)
                if isinstance(sock, ssl.SSLSocket) and sock.pending():
                    return True  # decrypted data select() cannot see
                waker.waiting = True  # then look at the queue: a put from now on wakes the select below
                try:
                    if waker.pending is not None and not waker.pending.empty():
                        return base.ready.fget(self)  # a primitive to send: look, do not wait
                    readable, _, _ = select.select([sock, waker.reader], [], [], WAIT_S)
                except (OSError, ValueError):
                    return base.ready.fget(self)  # closed meanwhile: pynetdicom's own check reports it
                finally:
                    waker.waiting = False
                if waker.reader in readable:
                    waker.drain()
                return sock in readable

        _WAITING["class"] = WaitingAssociationSocket
    return _WAITING["class"]
