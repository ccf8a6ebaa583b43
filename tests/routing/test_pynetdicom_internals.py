"""The pynetdicom internals utils/routing/intake/wakeup.py and utils/routing/intake/scp.py touch are still what they expect.

pynetdicom has no public hook for the connection tuning (see wakeup.py's docstring), so the router patches a few
of its internals per connection and pins pynetdicom exactly in requirements.txt. These tests are what makes the
pin safe to move: each internal touched is present with the shape used, and each pynetdicom function whose body
a patch depends on has the fingerprint recorded when the patch was checked against it. No server is started.

Moving the pin: read the failing function's new source against the "check" text of its entry, adapt the patch
if needed, run tests/routing/test_wakeup.py, test_network.py and bench/router_budget.py, then record the new
fingerprint (the failure message prints it) and the new version in requirements.txt and wakeup.PYNETDICOM_VERSION.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import queue
import re
import textwrap
import threading
import tokenize
from pathlib import Path
from types import SimpleNamespace

import pytest

pynetdicom = pytest.importorskip("pynetdicom")

from pynetdicom import AE, _config  # noqa: E402
from pynetdicom.association import Association  # noqa: E402
from pynetdicom.dimse import DIMSEServiceProvider  # noqa: E402
from pynetdicom.dul import DULServiceProvider  # noqa: E402
from pynetdicom.transport import AssociationSocket, RequestHandler  # noqa: E402

from utils.routing.intake import wakeup  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# --- the pin ------------------------------------------------------------------------------------------------


def _pinned() -> str:
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"\s*pynetdicom\s*([=<>!~]=?)\s*([^\s#,;]+)", line)
        if match:
            assert match.group(1) == "==", f"requirements.txt must pin pynetdicom exactly (==), not {line.strip()!r}"
            return match.group(2)
    raise AssertionError("requirements.txt has no pynetdicom line")


def test_the_pin_the_code_and_the_installed_version_agree():
    pinned = _pinned()
    assert pinned == wakeup.PYNETDICOM_VERSION, (
        f"requirements.txt pins pynetdicom=={pinned} but utils/routing/intake/wakeup.py says PYNETDICOM_VERSION = "
        f"{wakeup.PYNETDICOM_VERSION!r}: move both together, after this file's checks pass")
    assert pynetdicom.__version__ == pinned, (
        f"pynetdicom {pynetdicom.__version__} is installed, requirements.txt pins {pinned}: the router's connection "
        f"tuning stays off under it (wakeup.written_for_installed). Install the pinned version, or move the pin as "
        f"this module's docstring says")


# --- names and shapes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acceptor():
    """An Association as pynetdicom builds one for the server (no socket, no thread started)."""
    return Association(AE(ae_title="SCP"), "acceptor")


def test_the_association_holds_the_providers_and_queues_the_patches_wrap(acceptor):
    dul, dimse = acceptor.dul, acceptor.dimse
    what = "wakeup.quiet wraps its put / waits in ready; scp.drop_connection puts None on to_user_queue"
    assert isinstance(dul, DULServiceProvider), f"Association.dul is no DULServiceProvider ({what})"
    assert dul.socket is None and "socket" in vars(dul), "DULServiceProvider.socket is gone (wakeup, scp)"
    for name in ("to_provider_queue", "to_user_queue"):
        assert isinstance(getattr(dul, name, None), queue.Queue), (
            f"DULServiceProvider.{name} is no queue.Queue ({what})")
    assert isinstance(getattr(dul, "_run_loop_delay", None), float), (
        "DULServiceProvider._run_loop_delay (private) is gone or no longer a float: wakeup.quiet sets it to 0 so "
        "that run_reactor's idle sleep becomes a yield (the wait moved into the socket's ready); check run_reactor")
    assert getattr(dul, "_kill_thread", None) is False, (
        "DULServiceProvider._kill_thread is gone: wakeup wraps kill_dul/stop_dul to wake run_reactor so it sees it")
    assert isinstance(dimse, DIMSEServiceProvider), "Association.dimse is no DIMSEServiceProvider (wakeup, scp)"
    assert dimse.message is None, "DIMSEServiceProvider.message is gone (scp.receiving reads it)"
    assert isinstance(dimse.msg_queue, queue.Queue), (
        "DIMSEServiceProvider.msg_queue is no queue.Queue (scp.receiving reads it, wakeup wraps its put)")
    assert isinstance(acceptor, threading.Thread), (
        "Association is no longer a Thread: wakeup's get_msg wrapper waits only in the association's own thread "
        "(threading.current_thread() is assoc)")


SIGNATURES = {  # (owner, name): (parameters the patches call or replace it with, which patch)
    (DULServiceProvider, "kill_dul"): (["self"], "wakeup.quiet replaces it with kill_and_wake()"),
    (DULServiceProvider, "stop_dul"): (["self"], "wakeup.quiet replaces it with stop_and_wake() -> bool"),
    (DULServiceProvider, "receive_pdu"): (["self", "wait", "timeout"], "scp.drop_connection's None is its timeout"),
    (DIMSEServiceProvider, "get_msg"): (["self", "block"], "wakeup._wait_for_messages replaces it (block=False)"),
    (AssociationSocket, "recv"): (["self", "nr_bytes"], "scp.tune_connection replaces it with read_whole"),
    (AssociationSocket, "__init__"): (["self", "assoc", "client_socket", "address"],
                                      "wakeup subclasses AssociationSocket (WaitingAssociationSocket)"),
}


@pytest.mark.parametrize("owner, name", list(SIGNATURES), ids=[f"{o.__name__}.{n}" for o, n in SIGNATURES])
def test_the_methods_the_patches_replace_or_call_keep_their_parameters(owner, name):
    expected, patch = SIGNATURES[(owner, name)]
    member = getattr(owner, name, None)
    assert callable(member), f"pynetdicom's {owner.__name__}.{name} is gone; {patch}"
    got = list(inspect.signature(member).parameters)
    assert got == expected, (f"pynetdicom's {owner.__name__}.{name} now takes {got}, not {expected}; {patch}: "
                             f"adapt the replacement before moving the pin")


def test_ready_is_a_property_the_subclass_can_override_and_fall_back_to():
    assert isinstance(inspect.getattr_static(AssociationSocket, "ready"), property), (
        "AssociationSocket.ready is no longer a property: wakeup's WaitingAssociationSocket overrides it and calls "
        "AssociationSocket.ready.fget")
    assert issubclass(wakeup._waiting_socket_class(), AssociationSocket)


def test_the_global_the_forwarder_sets_still_exists():
    """utils/routing/delivery/forwarder.py's enable_raw_sending (documented in pynetdicom's configuration options)."""
    assert isinstance(getattr(_config, "STORE_SEND_CHUNKED_DATASET", None), bool), (
        "pynetdicom._config.STORE_SEND_CHUNKED_DATASET is gone: forwarder.enable_raw_sending sets it so that "
        "send_c_store streams stored bytes instead of re-encoding them")


# --- bodies the patches depend on ---------------------------------------------------------------------------


def fingerprint(function) -> str:
    """sha256 (16 hex digits) of a function's source without its docstring, comments, blank lines and indentation
    of the whole: formatting and comments do not count, code does (stable across Python versions)."""
    return fingerprint_source(inspect.getsource(function))


def fingerprint_source(source: str) -> str:
    source = textwrap.dedent(source)
    lines = source.splitlines()
    node = ast.parse(source).body[0]
    drop: set[int] = set()
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        drop.update(range(first.lineno - 1, first.end_lineno))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, col = token.start
            lines[row - 1] = lines[row - 1][:col]
    kept = [line.rstrip() for i, line in enumerate(lines) if i not in drop and line.strip()]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()[:16]


# (function, recorded fingerprint under the pinned version, the patch that depends on it, what to check)
BODIES = [
    (DULServiceProvider.run_reactor, "0a9e513074b72cac",
     "wakeup.quiet (_run_loop_delay = 0, WaitingAssociationSocket.ready, kill_dul/stop_dul waking it)",
     "each idle loop still sleeps self._run_loop_delay, checks self._kill_thread and asks the socket through "
     "_is_transport_event; timers (artim) are still checked once per loop, so a wait of WAIT_S is enough"),
    (DULServiceProvider._is_transport_event, "73411e20de546375",
     "wakeup's WaitingAssociationSocket.ready (the wait happens in it)",
     "it still asks self.socket.ready (once per loop) before reading a PDU"),
    (DULServiceProvider._process_recv_primitive, "ef649767c2bcec17",
     "wakeup: the waker.pending check in ready and the wrapped to_provider_queue.put",
     "primitives to send are still taken from self.to_provider_queue (peeked, then sent by the state machine)"),
    (DULServiceProvider.send_pdu, "f52607992ac2e2e5",
     "wakeup's put_and_wake on to_provider_queue",
     "primitives still go out through self.to_provider_queue.put (looked up on the queue object)"),
    (DULServiceProvider.kill_dul, "24b3f412a3a5aa21",
     "wakeup's kill_and_wake", "it still only sets a flag run_reactor checks (a wake-up makes it act at once)"),
    (DULServiceProvider.stop_dul, "e6c290ef8ee026db",
     "wakeup's stop_and_wake and _run_loop_delay = 0",
     "it still returns a bool and waits, sleeping _run_loop_delay, for the reactor thread to end"),
    (DULServiceProvider._read_pdu_data, "e07fd52c1d44e2e6",
     "scp.read_whole as the socket's recv",
     "it still reads through self.socket.recv(nr_bytes) and expects bytes-like, short only when the peer closed"),
    (DULServiceProvider.receive_pdu, "c8d4d80056a52a28",
     "wakeup's wrapped to_user_queue.put; scp.drop_connection's None",
     "peer primitives still arrive on self.to_user_queue; a None taken from it is still returned as is"),
    (AssociationSocket.ready.fget, "62f887d72feb8676",
     "wakeup's WaitingAssociationSocket.ready (falls back to this, mirrors its closed / TLS-pending checks)",
     "it still returns False for socket None or _is_connected False, reports Evt17 on a failed select, and "
     "counts SSLSocket.pending() as ready"),
    (AssociationSocket.recv, "44f3fd8b611eed0b",
     "scp.read_whole (same contract)",
     "it still blocks until nr_bytes arrived and returns what came before a close (read_whole must match)"),
    (AssociationSocket.close, "8d2f33cda24c5206",
     "wakeup's ready (reads _is_connected; close() sets it False)",
     "close still sets self.socket = None and self._is_connected = False"),
    (Association._run_reactor, "0502cb5a71b7fc2c",
     "wakeup._wait_for_messages (get_msg waits instead of the fixed 1 ms sleep)",
     "the loop still sleeps, then calls self.dimse.get_msg(block=False) once, and checks release/abort/DUL each "
     "loop; a wait of WAIT_S in get_msg delays those checks at most that long, the to_user_queue event cuts it"),
    (Association.run_reactor, "44c5aa7c5d9024ed",
     "scp.drop_connection (None on to_user_queue ends an acceptor waiting for its A-ASSOCIATE-RQ)",
     "an acceptor still waits with dul.receive_pdu(wait=True, timeout=acse_timeout) and ends on None"),
    (DIMSEServiceProvider.get_msg, "07582d8b41b5e165",
     "wakeup's get_msg_waiting (calls the original after its wait)",
     "it still takes from self.msg_queue, (None, None) when empty"),
    (DIMSEServiceProvider.receive_primitive, "68d256009563ec55",
     "scp.receiving (message, msg_queue); wakeup's wrapped msg_queue.put",
     "self.message is still the message being assembled (None between messages) and complete ones still go "
     "to self.msg_queue.put"),
    (RequestHandler.handle, "38c5a467974dfdfb",
     "wakeup.quiet / scp.tune_connection as EVT_CONN_OPEN handlers of the server",
     "EVT_CONN_OPEN still fires after the AssociationSocket is set and before the association's threads start"),
]


@pytest.mark.parametrize("function, recorded, patch, check", BODIES, ids=[b[0].__qualname__ for b in BODIES])
def test_the_bodies_the_patches_depend_on_are_unchanged(function, recorded, patch, check):
    got = fingerprint(function)
    assert got == recorded, (
        f"pynetdicom {pynetdicom.__version__}: {function.__module__}.{function.__qualname__} changed (fingerprint "
        f"{got}, recorded {recorded} under {wakeup.PYNETDICOM_VERSION}). Depends on it: {patch}. Check before "
        f"moving the pin: {check}. Then record {got} here (tests/routing/test_pynetdicom_internals.py).")


def test_the_fingerprint_ignores_comments_and_docstrings_but_not_code():
    plain = "def f():\n    x = 1\n    return x\n"
    commented = '    def f():\n        """Doc."""\n        # why\n\n        x = 1  # one\n        return x\n'
    changed = "def f():\n    x = 2\n    return x\n"
    assert fingerprint_source(plain) == fingerprint_source(commented)
    assert fingerprint_source(plain) != fingerprint_source(changed)


def _connected_acceptor():
    """An acceptor with an AssociationSocket on one end of a socket pair (threads not started); the other end."""
    import socket

    ours, theirs = socket.socketpair()
    assoc = Association(AE(ae_title="SCP"), "acceptor")
    assoc.set_socket(AssociationSocket(assoc, client_socket=ours))
    return assoc, theirs


@pytest.mark.parametrize("version", [wakeup.PYNETDICOM_VERSION, "9.9.9"])
def test_under_another_pynetdicom_the_connection_is_left_as_pynetdicom_made_it(version, monkeypatch, caplog):
    """The run-time side of the pin: another version gets no patch (one warning), whatever its attributes."""
    monkeypatch.setattr(pynetdicom, "__version__", version)
    monkeypatch.setattr(wakeup, "_CHECKED", {})
    assoc, peer = _connected_acceptor()
    try:
        with caplog.at_level("WARNING", logger=wakeup.__name__):
            for _ in range(2):
                wakeup.quiet(SimpleNamespace(assoc=assoc), reactor=True)
        patched = type(assoc.dul.socket) is not AssociationSocket
        assert patched == (version == wakeup.PYNETDICOM_VERSION)
        assert (assoc.dul._run_loop_delay == 0) == patched and ("get_msg" in vars(assoc.dimse)) == patched
        warned = [r for r in caplog.records if "9.9.9" in r.getMessage()]
        assert len(warned) == (0 if patched else 1)  # once per process, not per connection
    finally:
        wakeup.close(SimpleNamespace(assoc=assoc))
        assoc.dul.socket.socket.close()
        peer.close()
