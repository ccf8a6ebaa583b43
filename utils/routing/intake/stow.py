"""The router's STOW-RS intake: ``POST /studies`` (PS3.18 10.5) on an HTTP(S) port of its own, next to the Storage SCP.

    stow:                               # in the router's YAML (keys and defaults: ROUTER_STOW_* in utils/constants.py)
      host: 0.0.0.0
      port: 8104
      tls: {cert: stow.crt, key: stow.key}
      token_env: ROUTER_STOW_TOKEN      # senders: Authorization: Bearer <token> ...
      users_file: stow-users            # ... or HTTP basic, name:$argon2id$... lines (console.py hash-password)

A request is ``multipart/related; type="application/dicom"``, one DICOM PS3.10 file per part. The body is parsed as
it arrives (python-multipart's streaming parser) and each part is written straight to the spool's ``incoming/``
folder while its SHA-256 is computed, never held whole in memory; when a part ends it goes through the same store as
a C-STORE (utils/routing/queue.py: fsync, rename, queue row; an identical object still waiting is not stored twice),
then the audit line ``received`` (``transport: stow-rs``), the metrics and the classifier's wake-up. The answer is
sent once every part is durable or has failed: an instance is acknowledged only once it is on disk, so a router
killed in the middle of a request loses nothing acknowledged (the sender, without an answer, sends again).

The answer is the standard Store Instances Response (DICOM JSON, or XML when the sender accepts only
``application/dicom+xml``): ``ReferencedSOPSequence`` for the stored instances, ``FailedSOPSequence`` with a
``FailureReason`` for the others; HTTP 200 when all were stored, 202 when some failed, 409 when none was stored.
Failure reasons (the same codes as the Storage SCP's statuses where there is one):

- ``0xA700`` out of resources: below the spool's free-space reserve, a part over ``max_instance_mb``, the store
  failed, or the router is stopping; the sender keeps its copy and sends it again later;
- ``0xC000`` cannot understand: a part that is not ``application/dicom`` or not a DICOM PS3.10 file (no file meta,
  no SOP Class / Instance UID, a data set whose SOP Instance UID differs from its file meta's);
- ``0x0122`` SOP class not supported: not a storage SOP class the Storage SCP accepts either;
- ``0xC122`` transfer syntax not supported: not one of the SCP's transfer syntaxes (forwarders send in it unchanged);
- ``0xC409`` the instance's Study Instance UID differs from the one in the URL (``POST /studies/{study}``).

The whole request: 408 when the body stops arriving for ``BODY_IDLE_S`` (what was stored before stays stored),
401 without valid credentials (429 after ``max_failures`` failed tries from one address),
415 for a body that is not ``multipart/related`` of ``application/dicom``, 413 over ``max_request_mb`` (told by
Content-Length before anything is read; a chunked body is cut at the limit, and what was stored before the cut
stays stored), 503 with ``Retry-After`` when ``max_concurrent`` uploads are running or the router is stopping,
400 for a malformed multipart body. Values from the sender (UIDs, part headers) reach logs only through
``log_safe`` and the answer only through the JSON / XML encoders.

starlette, uvicorn and python-multipart are imported when the block is configured (the console's packages).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from utils import constants
from utils.config import ConfigError
from utils.dicomweb.stow import (
    FAILED_SOP_SEQUENCE,
    FAILURE_REASON,
    PART_TYPE,
    REFERENCED_SOP_CLASS_UID,
    REFERENCED_SOP_INSTANCE_UID,
    REFERENCED_SOP_SEQUENCE,
)
from utils.routing.operations.audit import AuditLog
from utils.routing.operations.metrics import NO_METRICS
from utils.routing.queue import SpoolQueue
from utils.routing.intake.accepted import TRANSFER_SYNTAXES, storage_sop_classes
from utils.routing.intake.space import ReceptionGate
from utils.routing.http_server import ServerThread
from utils.untrusted import UID_MAX, log_safe

log = logging.getLogger(__name__)

TRANSPORT = "stow-rs"
CALLING_AE = "STOW-RS"  # the queue's calling_ae of what came by STOW-RS (rules can match it; metrics label it)
CHUNK_BYTES = 1 << 20  # how much of a part is written at once (request chunks are gathered up to this)
HEAD_BYTES = 1 << 16  # kept of a part that is not written (refused), to name its instance in the answer
RETRY_AFTER_S = 5  # told to a sender turned away because max_concurrent uploads run
BODY_IDLE_S = 60.0  # a request body that sends nothing this long is dropped (408): a trickle cannot hold a slot
STOP_WAIT_S = 10.0  # how long close() waits for parts being stored

# Failure reasons (PS3.18 Store Instances Response; PS3.4 C-STORE statuses)
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
STUDY_MISMATCH = 0xC409

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
_TAGS = {"FailedSOPSequence": (FAILED_SOP_SEQUENCE, "SQ"), "ReferencedSOPSequence": (REFERENCED_SOP_SEQUENCE, "SQ"),
         "ReferencedSOPClassUID": (REFERENCED_SOP_CLASS_UID, "UI"),
         "ReferencedSOPInstanceUID": (REFERENCED_SOP_INSTANCE_UID, "UI"), "FailureReason": (FAILURE_REASON, "US")}


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StowSettings:
    host: str = constants.ROUTER_STOW_HOST
    port: int = constants.ROUTER_STOW_PORT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_env: str = constants.ROUTER_STOW_TOKEN_ENV
    token_file: Path | None = None
    users_file: Path | None = None
    max_request_mb: int = constants.ROUTER_STOW_MAX_REQUEST_MB
    max_instance_mb: int = constants.ROUTER_STOW_MAX_INSTANCE_MB
    max_concurrent: int = constants.ROUTER_STOW_MAX_CONCURRENT
    max_failures: int = constants.ROUTER_STOW_MAX_FAILURES
    failure_window_s: float = constants.ROUTER_STOW_FAILURE_WINDOW_S
    token: str | None = field(default=None, repr=False)
    users: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """For --check and the audit log: never the token or the password hashes."""
        return {"host": self.host, "port": self.port, "tls": bool(self.tls_cert),
                "token": (f"*** ({'file ' + str(self.token_file) if self.token_file else '$' + self.token_env})"
                          if self.token else None),
                "users_file": str(self.users_file) if self.users_file else None, "users": len(self.users),
                "max_request_mb": self.max_request_mb, "max_instance_mb": self.max_instance_mb,
                "max_concurrent": self.max_concurrent, "max_failures": self.max_failures,
                "failure_window_s": self.failure_window_s}

    def describe(self, port: int | None = None) -> str:
        scheme = "https" if self.tls_cert else "http"
        who = ([f"token ({'file ' + str(self.token_file) if self.token_file else '$' + self.token_env})"]
               if self.token else []) + ([f"{len(self.users)} users"] if self.users else [])
        return (f"STOW-RS intake on {scheme}://{self.host}:{self.port if port is None else port}/studies "
                f"({', '.join(who) or 'no authentication: loopback only'})")


def settings_from(block, base: Path, where: str) -> StowSettings:
    """The validated ``stow`` block (utils/routing/operations/schema.py) -> settings: paths resolved, TLS files
    loaded, the token and users read and judged; without either, only a loopback address is allowed. ConfigError
    naming the key."""
    from utils.routing.operations.console import is_loopback, read_tls, read_token, read_users
    from utils.routing.operations.schema import resolve_path

    where = f"{where}: stow"
    token_file = resolve_path(block.token_file, base) if block.token_file else None
    users_file = resolve_path(block.users_file, base) if block.users_file else None
    tls_cert, tls_key = read_tls(block.tls, base, f"{where}.tls")
    token = read_token(token_file, block.token_env, where, what="the STOW-RS token")
    users = read_users(users_file, where) if users_file else {}
    if not token and not users and not is_loopback(block.host):
        raise ConfigError(f"{where}.host: STOW-RS without authentication may listen on a loopback address only, "
                          f"got {block.host!r}; set ${block.token_env} (or token_file) or users_file")
    return StowSettings(host=block.host, port=block.port, tls_cert=tls_cert, tls_key=tls_key,
                        token_env=block.token_env, token_file=token_file, users_file=users_file,
                        max_request_mb=block.max_request_mb, max_instance_mb=block.max_instance_mb,
                        max_concurrent=block.max_concurrent, max_failures=block.max_failures,
                        failure_window_s=block.failure_window_s, token=token, users=users)


# --- one part: checked, stored, answered -------------------------------------------------------


@dataclass
class Part:
    """One part of a request as it arrives: written to ``path`` (or, refused, only its first bytes kept)."""
    path: Path | None
    headers: dict[str, str] = field(default_factory=dict)
    size: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)
    head: bytearray = field(default_factory=bytearray)
    refused: str = ""  # why its bytes are not written ("too_large", "disk_reserve", "stopping")
    handle: Any = None
    admitted: int = 0  # bytes the free-space gate admitted for it

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def close(self, durable: bool = False) -> None:
        """Close its file (if still open), with ``durable`` after an fsync."""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            try:
                if durable:
                    handle.flush()
                    os.fsync(handle.fileno())
            finally:
                handle.close()


@dataclass(frozen=True)
class Outcome:
    sop_class_uid: str
    sop_instance_uid: str
    failure: int | None = None  # None: stored
    reason: str = ""  # why it failed, for the log (the answer carries the code)
    duplicate: bool = False


def _uid(value: Any) -> str:
    text = str(value or "").rstrip("\x00 ")
    return text if 0 < len(text) <= UID_MAX and text.isascii() and text.isprintable() else ""


def identify(source) -> tuple[str, str, str, str, str]:
    """(SOP class, SOP instance, transfer syntax, study, problem) of a PS3.10 file (a path or bytes); a problem
    text instead of an exception for what is not one."""
    import io

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        handle = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else source
        dataset = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=[
            "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
    except InvalidDicomError:
        return "", "", "", "", "not a DICOM PS3.10 file (no 'DICM' prefix)"
    except Exception as error:  # noqa: BLE001 - any malformed content is the sender's problem, told as C000
        return "", "", "", "", f"not a readable DICOM file ({type(error).__name__})"
    meta = dataset.file_meta
    sop_class = _uid(meta.get("MediaStorageSOPClassUID", ""))
    sop_instance = _uid(meta.get("MediaStorageSOPInstanceUID", ""))
    syntax = _uid(meta.get("TransferSyntaxUID", ""))
    study = _uid(dataset.get("StudyInstanceUID", ""))
    if not (sop_class and sop_instance and syntax):
        return sop_class, sop_instance, syntax, study, "file meta without SOP Class, SOP Instance or Transfer Syntax UID"
    if _uid(dataset.get("SOPInstanceUID", "")) != sop_instance or _uid(dataset.get("SOPClassUID", "")) != sop_class:
        return sop_class, sop_instance, syntax, study, "the data set's SOP Class / Instance UID are missing or differ from its file meta"
    return sop_class, sop_instance, syntax, study, ""


class StowReceiver:
    """Checks a finished part and puts it in the spool: the part of STOW-RS that is not HTTP. Thread-safe."""

    def __init__(self, queue: SpoolQueue, audit: AuditLog, on_received: Callable[[], None],
                 gate: ReceptionGate | None = None, metrics=NO_METRICS) -> None:
        self.queue, self.audit, self.on_received, self.gate, self.metrics = queue, audit, on_received, gate, metrics
        self.sop_classes = storage_sop_classes()
        self.transfer_syntaxes = frozenset(str(uid) for uid in TRANSFER_SYNTAXES)
        self._lock = threading.Condition()
        self._storing = 0
        self._closing = False

    def admit(self, size: int) -> str:
        """Before ``size`` more bytes of a part are written: "" or why not ("stopping", "disk_reserve")."""
        if self._closing:
            return "stopping"
        if self.gate is not None and self.gate.admit(size) is not None:
            return "disk_reserve"
        return ""

    def release(self, size: int) -> None:
        if self.gate is not None and size:
            self.gate.release(size)

    @property
    def closing(self) -> bool:
        return self._closing

    def begin_closing(self) -> None:
        with self._lock:
            self._closing = True

    def wait_stored(self, timeout: float) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: not self._storing, timeout)

    def finish(self, part: Part, *, study: str | None, user: str, peer: str) -> Outcome:
        """Check the finished ``part`` and store it (its file is made durable, then moved into the spool or
        deleted)."""
        with self._lock:
            self._storing += 1
        try:
            return self._finish(part, study, user, peer)
        finally:
            part.close()
            if part.path is not None:
                part.path.unlink(missing_ok=True)  # stored: renamed away already; otherwise never acknowledged
            self.release(part.admitted)
            with self._lock:
                self._storing -= 1
                self._lock.notify_all()

    def _finish(self, part: Part, study: str | None, user: str, peer: str) -> Outcome:
        source = part.head if part.refused or part.path is None else part.path  # None: an empty part
        sop_class, sop_instance, syntax, its_study, problem = identify(source)
        if part.refused:
            reason = {"too_large": f"larger than max_instance_mb ({part.size} bytes and more)",
                      "disk_reserve": "below the spool's free-space reserve",
                      "stopping": "the router is stopping"}.get(part.refused, part.refused)
            return self._failed(sop_class, sop_instance, OUT_OF_RESOURCES, reason, part.refused, user, peer)
        if part.content_type != PART_TYPE:
            return self._failed(sop_class, sop_instance, CANNOT_UNDERSTAND,
                                f"part of type {part.content_type or 'none'!r}, not application/dicom", "not_dicom",
                                user, peer)
        if problem:
            return self._failed(sop_class, sop_instance, CANNOT_UNDERSTAND, problem, "not_dicom", user, peer)
        if sop_class not in self.sop_classes:
            return self._failed(sop_class, sop_instance, SOP_CLASS_NOT_SUPPORTED,
                                f"SOP class {sop_class} is not a storage SOP class", "sop_class", user, peer)
        if syntax not in self.transfer_syntaxes:
            return self._failed(sop_class, sop_instance, TRANSFER_SYNTAX_NOT_SUPPORTED,
                                f"transfer syntax {syntax} is not supported", "transfer_syntax", user, peer)
        if study is not None and its_study != study:
            return self._failed(sop_class, sop_instance, STUDY_MISMATCH,
                                f"Study Instance UID {its_study or '(none)'} is not the URL's {study}",
                                "study_mismatch", user, peer)
        try:
            part.close(durable=True)  # fsync here, in a worker thread, not in the server's event loop
            item, duplicate = self.queue.store_file(part.path, digest=part.sha256.hexdigest(), size=part.size,
                                                    sop_instance_uid=sop_instance, sop_class_uid=sop_class,
                                                    transfer_syntax=syntax, calling_ae=CALLING_AE)
        except Exception as error:  # noqa: BLE001 - disk full, I/O error: refused, the sender keeps its copy
            self.audit.record("receive_failed", sop_instance_uid=sop_instance, transport=TRANSPORT, user=user, peer=peer,
                        reason=str(error))
            return self._failed(sop_class, sop_instance, OUT_OF_RESOURCES, f"could not store: {error}",
                                "store_failed", user, peer)
        part.path = None  # renamed into the spool (or, a duplicate, deleted)
        # Stored and committed: success, even if the line cannot be written now (the next start writes it).
        self.audit.record("received", sop_instance_uid=sop_instance, sop_class_uid=sop_class, transfer_syntax=syntax,
                    calling_ae=CALLING_AE, transport=TRANSPORT, user=user, peer=peer, size=item.size, item=item.id,
                    duplicate=duplicate)
        self.metrics.received(CALLING_AE)
        self.on_received()
        return Outcome(sop_class, sop_instance, duplicate=duplicate)

    def _failed(self, sop_class: str, sop_instance: str, code: int, reason: str, metric: str, user: str,
                peer: str) -> Outcome:
        log.warning("STOW-RS from %s (%s): instance %s failed (0x%04X): %s", log_safe(peer), log_safe(user),
                    log_safe(sop_instance or "?"), code, log_safe(reason))
        self.metrics.refused(metric)
        return Outcome(sop_class, sop_instance, code, reason)



# --- the answer ----------------------------------------------------------------------------------


def response_status(outcomes: list[Outcome]) -> int:
    failed = sum(o.failure is not None for o in outcomes)
    return 200 if not failed else 409 if failed == len(outcomes) else 202


def response_json(outcomes: list[Outcome]) -> dict[str, Any]:
    """The Store Instances Response as DICOM JSON (PS3.18 F.2)."""
    def element(name: str, value: Any = None) -> tuple[str, dict]:
        tag, vr = _TAGS[name]
        return tag, ({"vr": vr, "Value": [value]} if value not in (None, "") else {"vr": vr})

    def item(o: Outcome) -> dict:
        out = dict([element("ReferencedSOPClassUID", o.sop_class_uid),
                    element("ReferencedSOPInstanceUID", o.sop_instance_uid)])
        if o.failure is not None:
            out.update([element("FailureReason", o.failure)])
        return out

    document: dict[str, Any] = {}
    stored = [item(o) for o in outcomes if o.failure is None]
    failed = [item(o) for o in outcomes if o.failure is not None]
    if failed:
        document[_TAGS["FailedSOPSequence"][0]] = {"vr": "SQ", "Value": failed}
    if stored:
        document[_TAGS["ReferencedSOPSequence"][0]] = {"vr": "SQ", "Value": stored}
    return document


def response_xml(outcomes: list[Outcome]) -> str:
    """The Store Instances Response in the Native DICOM Model (PS3.19 A.1)."""
    def attribute(name: str, value: Any) -> str:
        tag, vr = _TAGS[name]
        inner = f'<Value number="1">{escape(str(value))}</Value>' if value not in (None, "") else ""
        return f'<DicomAttribute tag="{tag}" vr="{vr}" keyword="{name}">{inner}</DicomAttribute>'

    def sequence(name: str, items: list[Outcome]) -> str:
        tag, _ = _TAGS[name]
        body = "".join(
            f'<Item number="{n}">{attribute("ReferencedSOPClassUID", o.sop_class_uid)}'
            f'{attribute("ReferencedSOPInstanceUID", o.sop_instance_uid)}'
            f'{attribute("FailureReason", o.failure) if o.failure is not None else ""}</Item>'
            for n, o in enumerate(items, 1))
        return f'<DicomAttribute tag="{tag}" vr="SQ" keyword="{name}">{body}</DicomAttribute>'

    failed = [o for o in outcomes if o.failure is not None]
    stored = [o for o in outcomes if o.failure is None]
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<NativeDicomModel>'
            + (sequence("FailedSOPSequence", failed) if failed else "")
            + (sequence("ReferencedSOPSequence", stored) if stored else "") + "</NativeDicomModel>\n")


def wants_xml(accept: str) -> bool:
    """XML only when the sender accepts XML and not JSON (JSON is the default)."""
    accept = accept.lower()
    return DICOM_XML in accept and DICOM_JSON not in accept and "application/json" not in accept


# --- HTTP ----------------------------------------------------------------------------------------


class RequestRefused(Exception):
    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers or {}


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """``multipart/related; type="application/dicom"; boundary=x`` -> ("multipart/related", {type:..., boundary:...})."""
    main, _, rest = content_type.partition(";")
    parameters = {}
    for piece in rest.split(";"):
        key, _, value = piece.strip().partition("=")
        if key:
            parameters[key.strip().lower()] = value.strip().strip('"')
    return main.strip().lower(), parameters


class PartWriter:
    """python-multipart's callbacks for one request: each part's bytes written to a new spool part file as they
    come (through the free-space gate), its headers and SHA-256 kept; finished parts are collected in ``done``."""

    def __init__(self, queue: SpoolQueue, receiver: StowReceiver, max_instance: int) -> None:
        self.queue, self.receiver, self.max_instance = queue, receiver, max_instance
        self.done: list[Part] = []
        self.part: Part | None = None
        self._field = bytearray()
        self._value = bytearray()
        self._buffer = bytearray()

    def callbacks(self) -> dict[str, Callable]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self.part = Part(path=None)
        self._field.clear()
        self._value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = self._field.decode("latin-1").strip().lower()
        self.part.headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._buffer += data[start:end]
        if len(self._buffer) >= CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        part, chunk = self.part, self._buffer
        if not chunk:
            return
        if len(part.head) < HEAD_BYTES:
            part.head += chunk[:HEAD_BYTES - len(part.head)]
        part.size += len(chunk)
        if not part.refused and part.size > self.max_instance:
            part.refused = "too_large"
        if not part.refused:
            part.refused = self.receiver.admit(len(chunk))
            if not part.refused:
                part.admitted += len(chunk)
        if part.refused:
            self._drop(part)
        else:
            if part.handle is None:
                part.path = self.queue.new_part()
                part.handle = open(part.path, "xb")  # noqa: SIM115 - closed by Part.close
            part.handle.write(chunk)
            part.sha256.update(chunk)
        self._buffer = bytearray()

    def _drop(self, part: Part) -> None:
        part.close()
        if part.path is not None:
            part.path.unlink(missing_ok=True)
            part.path = None

    def _end(self) -> None:
        self._flush()
        if self.part.handle is not None:  # written through for reading; the fsync is StowReceiver's, in a thread
            self.part.handle.flush()
        self.done.append(self.part)
        self.part = None

    def close(self) -> None:
        """After a request ends early: delete what was written of an unfinished part and of parts never stored."""
        if self.part is not None:
            self._drop(self.part)
            self.receiver.release(self.part.admitted)
        for part in self.done:
            self._drop(part)
            self.receiver.release(part.admitted)
            part.admitted = 0
        self.done.clear()


async def _idle_limited(chunks, idle_s: float):
    """The chunks of ``chunks`` (an async iterator); TimeoutError when the next one takes longer than ``idle_s``."""
    iterator = chunks.__aiter__()
    while True:
        try:
            yield await asyncio.wait_for(iterator.__anext__(), idle_s)
        except StopAsyncIteration:
            return


def build_app(settings: StowSettings, queue: SpoolQueue, receiver: StowReceiver):
    """The STOW-RS Starlette application: POST /studies and POST /studies/{study}."""
    from python_multipart.multipart import MultipartParser
    from python_multipart.exceptions import MultipartParseError
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from utils.routing.operations.console import FailureLimiter, PasswordChecker

    max_request = settings.max_request_mb * 1024 * 1024
    max_instance = settings.max_instance_mb * 1024 * 1024
    failures = FailureLimiter(settings.max_failures, settings.failure_window_s)
    passwords = PasswordChecker(settings.users)
    bearer_digest = hashlib.sha256(settings.token.encode()).digest() if settings.token else b""
    running = [0]
    challenge = {"WWW-Authenticate": 'Basic realm="router STOW-RS", charset="UTF-8"'} if settings.users else {}

    def address(request: Request) -> str:
        return request.client.host if request.client else "?"


    async def sender(request: Request) -> str:
        """Who sends (``token`` or the user's name); RequestRefused 401 / 429."""
        if not settings.token and not settings.users:
            return "anonymous"  # allowed on a loopback address only (settings_from)
        wait = failures.wait_s(address(request))
        if wait > 0:
            raise RequestRefused(429, f"too many failed authentications from {address(request)}; try again in "
                                      f"{math.ceil(wait)} s", {"Retry-After": str(math.ceil(wait))})
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and settings.token:
            if hmac.compare_digest(hashlib.sha256(value.strip().encode()).digest(), bearer_digest):
                return "token"
        elif scheme == "basic" and settings.users:
            try:
                name, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                name, password = "", None
            if password is not None and await passwords.check(name, password):
                return name
        failures.failed(address(request))
        log.warning("STOW-RS: failed authentication from %s", log_safe(address(request)))
        raise RequestRefused(401, "authentication required: a bearer token or a user's name and password", challenge)

    def check_request(request: Request) -> str:
        """The multipart boundary; RequestRefused 413 / 415 before the body is read."""
        kind, parameters = media_type(request.headers.get("content-type", ""))
        if kind != "multipart/related":
            raise RequestRefused(415, f"expected multipart/related; type=\"application/dicom\", got {log_safe(kind)!r}")
        if parameters.get("type", PART_TYPE).lower() != PART_TYPE:
            raise RequestRefused(415, f"only application/dicom parts are accepted (not bulk data or metadata), got "
                                      f"type={log_safe(parameters.get('type'))!r}")
        boundary = parameters.get("boundary", "")
        if not boundary or len(boundary) > 70:
            raise RequestRefused(400, "multipart/related without a valid boundary")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_request):
            raise RequestRefused(413, f"the request is larger than max_request_mb ({settings.max_request_mb} MB)")
        return boundary

    async def store(request: Request) -> Response:
        study = request.path_params.get("study")
        if study is not None and not _uid(study):
            return PlainTextResponse("the study in the URL is not a UID", status_code=400)
        try:
            who = await sender(request)
            boundary = check_request(request)
        except RequestRefused as refused:
            return PlainTextResponse(refused.text, status_code=refused.status, headers=refused.headers)
        if running[0] >= settings.max_concurrent or receiver.closing:
            return PlainTextResponse(f"busy: {settings.max_concurrent} uploads are being received; try again later",
                                     status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        running[0] += 1
        writer = PartWriter(queue, receiver, max_instance)
        outcomes: list[Outcome] = []
        peer = address(request)
        try:
            parser = MultipartParser(boundary, writer.callbacks())
            received = 0
            async for chunk in _idle_limited(request.stream(), BODY_IDLE_S):
                received += len(chunk)
                if received > max_request:
                    return PlainTextResponse(f"the request is larger than max_request_mb ({settings.max_request_mb} "
                                             f"MB); {len(outcomes)} instances before the limit were stored",
                                             status_code=413, headers={"Connection": "close"})
                parser.write(chunk)
                while writer.done:
                    part = writer.done.pop(0)
                    outcomes.append(await run_in_threadpool(receiver.finish, part, study=study, user=who, peer=peer))
            parser.finalize()
            if writer.part is not None or not outcomes:
                return PlainTextResponse("the multipart body ended before its closing boundary" if outcomes or
                                         writer.part is not None else "the request has no parts", status_code=400)
        except TimeoutError:
            log.warning("STOW-RS: %s sent nothing for %.0f s; %d instances stored before, the rest dropped",
                        log_safe(peer), BODY_IDLE_S, len(outcomes))
            return PlainTextResponse(f"nothing received for {BODY_IDLE_S:.0f} s", status_code=408,
                                     headers={"Connection": "close"})
        except MultipartParseError as error:
            return PlainTextResponse(f"malformed multipart body: {log_safe(error)}", status_code=400)
        except ClientDisconnect:
            log.info("STOW-RS: %s disconnected after %d instances", log_safe(peer), len(outcomes))
            return Response(status_code=400)
        finally:
            writer.close()
            running[0] -= 1
        status = response_status(outcomes)
        stored = sum(o.failure is None for o in outcomes)
        log.info("STOW-RS from %s (%s): %d instances stored, %d failed", log_safe(peer), log_safe(who), stored,
                 len(outcomes) - stored)
        if wants_xml(request.headers.get("accept", "")):
            return Response(response_xml(outcomes), status_code=status, media_type=DICOM_XML)
        return JSONResponse(response_json(outcomes), status_code=status, media_type=DICOM_JSON)

    # Nothing else is served: another path is 404, another method 405 (Starlette's own answers)
    return Starlette(routes=[Route("/studies", store, methods=["POST"]),
                             Route("/studies/{study}", store, methods=["POST"])])


class StowServer:
    """The STOW-RS HTTP server in a thread of the router process (utils/routing/http_server.py; bound at start: a
    taken port fails it)."""

    def __init__(self, settings: StowSettings, queue: SpoolQueue, receiver: StowReceiver) -> None:
        self.settings, self.queue, self.receiver = settings, queue, receiver
        self._http = ServerThread("stow-http", settings.host, settings.port,
                                  tls=(settings.tls_cert, settings.tls_key) if settings.tls_cert else None,
                                  grace_s=STOP_WAIT_S, h11_max_incomplete_event_size=64 * 1024)

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def socket(self):
        """The listening socket."""
        return self._http.socket

    def serve(self, timeout: float = 10.0) -> StowServer:
        self._http.serve(build_app(self.settings, self.queue, self.receiver), timeout)
        log.info("%s", self.settings.describe(self.port))
        return self

    def close(self) -> None:
        """Stop accepting; uploads in progress get STOP_WAIT_S to finish (a part that begins meanwhile fails with
        A700); returns when no part is being stored any more, so the queue can be closed after it."""
        if self._http.server is None:
            return
        self.receiver.begin_closing()
        self._http.close()
        if not self.receiver.wait_stored(STOP_WAIT_S):
            log.warning("STOW-RS: parts still being stored after %.0f s", STOP_WAIT_S)
