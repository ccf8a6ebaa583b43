"""The Orthanc source: the router pulls new instances from an Orthanc, so that nothing Orthanc stored is lost.

    orthanc_source:                 # in the router's YAML (keys and defaults: ROUTER_ORTHANC_* in utils/constants.py)
      url: http://127.0.0.1:8042
      username: router              # HTTP basic authentication (both or neither)
      password: change-me
      poll_s: 1                     # once caught up, ask for new changes this often
      modalities: [CR, DX, DR, RG]  # series Modality fetched ([]: every instance)
      start_from: latest            # where a new spool begins: Orthanc's latest change, or "beginning"

Why pull and not Orthanc's push (Lua ``OnStoredInstance`` + ``SendToModality``): Orthanc 1.10 ends
such a job as Success when the C-STORE fails and never retries it, so everything stored while the
router is down or restarting is silently never routed. Here the router keeps the position itself.

A thread follows Orthanc's ``/changes?since=<cursor>&limit=<batch>`` feed. For each
``NewInstance`` change it reads the series' Modality (``/instances/{id}/series``; skipped unless
in ``modalities``), the instance's metadata (``RemoteAET``: recorded as the object's
``calling_ae``, so rules on ``calling_ae`` see the modality that sent it to Orthanc; an instance
the router itself sent to that Orthanc is skipped, which keeps a ``pass_through`` to the same
archive from going round in a loop) and its DICOM file (``/instances/{id}/file``), and stores the
bytes through :meth:`SpoolQueue.store`, the path the Storage SCP uses: same spool, dedup, free
space reserve, rules, classification, forwarding and audit (``received`` with ``source:
"orthanc"`` and ``orthanc_id``).

**The cursor** (the ``Seq`` of the last change handled) lives in the queue's SQLite database
(table ``meta``, key :data:`CURSOR_KEY`) and advances in the *same transaction* as the row of the
instance it stands for, after the spool file is fsynced: a kill -9 (or power loss) at any point
either keeps both or neither. After a restart the source fetches again from the cursor: an object
whose file was written but whose row was not is registered from the spool at start-up and the
repeated fetch finds it waiting (the queue answers "duplicate", nothing is stored twice). So every
instance Orthanc reports is taken over exactly once into the queue; delivery to the destinations is
at least once, as for everything the router receives. Changes that are skipped (other change types,
other modalities, the router's own objects) advance the cursor once per page.

When Orthanc cannot be reached (connection refused, a timeout, HTTP 5xx, 401) the source logs and
audits ``orthanc_source_down`` once and retries with the router's backoff (``retry_initial_s`` ..
``retry_max_s``) for as long as it takes; ``orthanc_source_up`` follows. An instance Orthanc
deleted before the router fetched it (404) is skipped with an ``orthanc_skipped`` audit line, and so is a
change whose ``ID`` is not of the shape of Orthanc's identifiers (:data:`ORTHANC_ID`, five groups of 8 hex
digits): an ID goes into the URL paths the router asks for, so anything else (``../system``, ``a?b``) is never
asked for.
Below the spool's free-space reserve the source waits (nothing is skipped). A change feed that is
behind the cursor (``Last`` < cursor: Orthanc was given a new database) restarts from 0 with an
``orthanc_cursor_reset`` audit line.

Orthanc keeps its change log in its database (a change disappears with its resource), so the
router may be down for as long as Orthanc keeps the instances.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils import constants
from utils.config import ConfigError
from utils.routing.operations.audit import AuditLog, AuditWriteError
from utils.routing.operations.metrics import NO_METRICS
from utils.routing.operations.schema import resolve_path
from utils.routing.queue import SpoolQueue, SpoolWriteError
from utils.routing.worker import FATAL, WakeableThread
from utils.untrusted import log_safe

log = logging.getLogger(__name__)

CURSOR_KEY = "orthanc_source_cursor"  # queue meta: {"seq": N, "url": ...}, advanced with the stored rows
NOTE_KEY = "orthanc_source_state"  # queue meta: what the source last saw of Orthanc (for --status)
NEW_INSTANCE = "NewInstance"
PREFIX = "ROUTER_ORTHANC_"  # the constants of the block's keys (the key is the name without the prefix)
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")  # Orthanc's resource identifiers (a SHA-1, grouped)


@dataclass(frozen=True)
class OrthancSourceSettings:
    """The ``orthanc_source`` block of the router's configuration, checked."""

    url: str  # Orthanc's REST API, e.g. http://127.0.0.1:8042 (no trailing slash)
    username: str = ""
    password: str = field(default="", repr=False, compare=False)  # never in a repr, the audit log or --check
    poll_s: float = constants.ROUTER_ORTHANC_POLL_S
    batch: int = constants.ROUTER_ORTHANC_BATCH
    timeout_s: float = constants.ROUTER_ORTHANC_TIMEOUT_S
    start_from: str = constants.ROUTER_ORTHANC_START_FROM
    modalities: tuple[str, ...] = constants.ROUTER_ORTHANC_MODALITIES
    password_source: str = ""  # where the password came from ("file ...", "$VAR"; "" without one)

    def to_dict(self) -> dict[str, Any]:
        """For the audit log and saved configurations: the password is never written out."""
        return {"url": self.url, "username": self.username, "password": f"*** ({self.password_source})" if self.password else "",
                "poll_s": self.poll_s, "batch": self.batch, "timeout_s": self.timeout_s,
                "start_from": self.start_from, "modalities": list(self.modalities)}


def settings_from(block, base: Path, where: str) -> OrthancSourceSettings:
    """The validated ``orthanc_source`` block (utils/routing/operations/schema.py) -> settings: the URL's form, the
    password read from ``password_file`` or the environment variable ``password_env``, the modalities' case.
    ConfigError naming the key."""
    where = f"{where}: orthanc_source"
    url = block.url.rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{where}.url: expected http(s)://host:port[/path], got {url!r}")
    if parts.username or parts.password:
        raise ConfigError(f"{where}.url: no credentials in the URL; give username, and the password in "
                          f"password_file or ${block.password_env}")
    if block.password_file and not block.username:
        raise ConfigError(f"{where}.password_file: a password without username; give both, or neither")
    password = _read_password(block, base, where) if block.username else ""
    if block.username and not password:
        raise ConfigError(f"{where}: give both username and a password (HTTP basic authentication: password_file, "
                          f"or the environment variable ${block.password_env}), or neither")
    lower = [m for m in block.modalities if m.strip() != m.strip().upper() or not m.strip()]
    if lower:
        raise ConfigError(f"{where}.modalities: Modality values are upper case (CR, DX), got {lower}")
    return OrthancSourceSettings(url=url, username=block.username, password=password, poll_s=block.poll_s,
                                 batch=block.batch, timeout_s=block.timeout_s, start_from=block.start_from,
                                 modalities=tuple(m.strip() for m in block.modalities),
                                 password_source=(f"file {block.password_file}" if block.password_file else
                                                  f"${block.password_env}" if password else ""))


def _read_password(block, base: Path, where: str) -> str:
    if block.password_file:
        path = resolve_path(block.password_file, base)
        try:
            return path.read_text().strip()
        except OSError as error:
            raise ConfigError(f"{where}.password_file: cannot read {path}: {error.strerror or error}") from error
    return os.environ.get(block.password_env, "").strip() if block.password_env else ""


# --- REST --------------------------------------------------------------------------------------


class OrthancError(RuntimeError):
    """Orthanc could not be asked (down, timeout, refused credentials, a server error): try again later."""


class OrthancNotFound(OrthancError):
    """HTTP 404: the resource is not (any more) in Orthanc."""


class OrthancClient:
    """The few REST calls the source needs, on the standard library (no extra dependency)."""

    def __init__(self, url: str, username: str = "", password: str = "", timeout_s: float = 30.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self._headers = {"Accept": "application/json, application/dicom"}
        if username:
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"

    @classmethod
    def of(cls, settings: OrthancSourceSettings) -> OrthancClient:
        return cls(settings.url, settings.username, settings.password, settings.timeout_s)

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.url + path, headers=self._headers)  # http(s) only: checked by settings_from
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                return answer.read()
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise OrthancNotFound(f"GET {path}: 404 not found") from error
            hint = " (check orthanc_source.username / password)" if error.code == 401 else ""
            raise OrthancError(f"GET {self.url}{path}: HTTP {error.code} {error.reason}{hint}") from error
        except (urllib.error.URLError, OSError) as error:  # refused, unreachable, timeout, reset
            reason = getattr(error, "reason", error)
            raise OrthancError(f"GET {self.url}{path}: {reason}") from error

    def get_json(self, path: str) -> Any:
        data = self.get(path)
        try:
            return json.loads(data)
        except ValueError as error:
            raise OrthancError(f"GET {self.url}{path}: not JSON ({data[:80]!r})") from error

    def changes(self, since: int, limit: int) -> dict[str, Any]:
        return self.get_json(f"/changes?since={int(since)}&limit={int(limit)}")

    def last_change(self) -> int:
        return int(self.get_json("/changes?last")["Last"])


# --- the cursor --------------------------------------------------------------------------------


def cursor_value(seq: int, url: str) -> str:
    return json.dumps({"seq": int(seq), "url": url})


def read_cursor(note: str | None) -> int | None:
    """The change sequence number in a stored cursor; None when there is none."""
    if not note:
        return None
    try:
        return int(json.loads(note)["seq"])
    except (ValueError, KeyError, TypeError):
        log.error("unreadable Orthanc cursor %r in the spool database: starting as on a new spool", note[:100])
        return None


def _file_uids(data: bytes) -> tuple[str, str, str]:
    """(SOP Instance UID, SOP Class UID, transfer syntax) from the file meta of a DICOM file in memory."""
    from io import BytesIO

    import pydicom

    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID"])
    meta = ds.file_meta
    return (str(meta.get("MediaStorageSOPInstanceUID", "") or ds.get("SOPInstanceUID", "")),
            str(meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "")),
            str(meta.get("TransferSyntaxUID", "")))


# --- the thread --------------------------------------------------------------------------------


class OrthancSource(WakeableThread):
    """Follows Orthanc's change feed and stores each new instance in the queue (see the module docstring)."""

    def __init__(self, settings: OrthancSourceSettings, queue: SpoolQueue, audit: AuditLog, *, own_ae_title: str,
                 on_received, gate=None, retry_initial_s: float = 2.0, retry_max_s: float = 60.0,
                 client: OrthancClient | None = None, metrics=NO_METRICS) -> None:
        super().__init__(name="orthanc-source")
        self.metrics = metrics
        self.settings, self.queue, self.audit, self.gate = settings, queue, audit, gate
        self.own_ae_title, self.on_received = own_ae_title, on_received
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self.client = client or OrthancClient.of(settings)
        self.cursor: int | None = None
        self.down_since: float | None = None
        self.failures = 0
        self.stored = self.skipped = 0  # since start, for the state note

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                caught_up = self.step()
            except FATAL:
                raise
            except (OrthancError, SpoolWriteError, AuditWriteError) as error:
                self._down(str(error))
                continue
            except BaseException as error:  # a bug or a codec's panic must not end the thread
                log.exception("Orthanc source: unexpected error")
                self._down(f"unexpected error: {type(error).__name__}: {error}")
                continue
            if self.down_since is not None:
                self._up()
            if caught_up:
                self._halt.wait(self.settings.poll_s)

    def step(self) -> bool:
        """Handle one page of changes; True when Orthanc has nothing newer (wait before asking again)."""
        self.busy_since = time.monotonic()
        try:
            if self.cursor is None:
                self.cursor = self._initial_cursor()
            page = self.client.changes(self.cursor, self.settings.batch)
            last = int(page.get("Last", 0))
            if last < self.cursor:
                self._reset(last)
                return False
            for change in page.get("Changes", []):
                if self._halt.is_set():
                    return True
                seq = int(change["Seq"])
                if seq <= self.cursor:
                    continue
                new = change.get("ChangeType") == NEW_INSTANCE and change.get("ResourceType", "Instance") == "Instance"
                if new and not self._take(str(change["ID"]), seq):
                    return True  # stopping while waiting for free space: the cursor stays before it
            if last > self.cursor:
                self._save_cursor(last)
            done = bool(page.get("Done", True))
            if page.get("Changes") or self.down_since is not None:
                self._note(last)
            return done
        finally:
            self.busy_since = None

    def _initial_cursor(self) -> int:
        saved = read_cursor(self.queue.get_meta(CURSOR_KEY))
        if saved is not None:
            log.info("Orthanc source %s: resuming after change %d", self.settings.url, saved)
            return saved
        start = 0 if self.settings.start_from == "beginning" else self.client.last_change()
        self.queue.set_meta(CURSOR_KEY, cursor_value(start, self.settings.url))
        self.audit.record("orthanc_cursor_start", url=self.settings.url, seq=start, start_from=self.settings.start_from)
        log.info("Orthanc source %s: new spool, starting after change %d (%s)", self.settings.url, start,
                 self.settings.start_from)
        return start

    def _reset(self, last: int) -> None:
        log.warning("Orthanc source %s: its last change is %d, before the cursor %d (a new Orthanc database?); "
                    "reading its changes from the beginning", self.settings.url, last, self.cursor)
        self.audit.record("orthanc_cursor_reset", url=self.settings.url, previous=self.cursor, last=last)
        self._save_cursor(0)

    def _save_cursor(self, seq: int) -> None:
        self.queue.set_meta(CURSOR_KEY, cursor_value(seq, self.settings.url))
        self.cursor = seq

    def _take(self, instance: str, seq: int) -> bool:
        """Fetch one instance and store it with the cursor; False when stopping before it was stored."""
        client, settings = self.client, self.settings
        if not ORTHANC_ID.fullmatch(instance):  # it would become part of a URL path: never asked for
            log.warning("Orthanc change %d names an instance %r that is not an Orthanc identifier: skipped", seq,
                        log_safe(instance, 80))
            self.audit.record("orthanc_skipped", orthanc_id=instance[:200], seq=seq, reason="not an Orthanc identifier")
            self.skipped += 1
            return True
        try:
            if settings.modalities:
                series = client.get_json(f"/instances/{instance}/series")
                modality = str(series.get("MainDicomTags", {}).get("Modality", "")).strip()
                if modality not in settings.modalities:
                    log.debug("Orthanc instance %s: Modality %r not in %s, skipped", instance, log_safe(modality, 40),
                              settings.modalities)
                    self.skipped += 1
                    return True
            metadata = client.get_json(f"/instances/{instance}/metadata?expand")
            remote = str(metadata.get("RemoteAET", "")).strip()
            if remote and remote == self.own_ae_title:
                log.debug("Orthanc instance %s came from this router (%s): skipped", instance, log_safe(remote))
                self.skipped += 1
                return True
            data = client.get(f"/instances/{instance}/file")
        except OrthancNotFound as error:
            log.warning("Orthanc instance %s (change %d) was deleted before it was fetched: %s", instance, seq, error)
            self.audit.record("orthanc_skipped", orthanc_id=instance, seq=seq, reason="deleted from Orthanc before the "
                        "router fetched it")
            self.skipped += 1
            return True
        try:
            sop_instance_uid, sop_class_uid, transfer_syntax = _file_uids(data)
        except Exception as error:  # noqa: BLE001 - kept all the same: the classifier quarantines what it cannot read
            log.warning("Orthanc instance %s: unreadable file meta (%s); stored all the same", instance,
                        log_safe(error))
            sop_instance_uid = sop_class_uid = ""
            transfer_syntax = str(metadata.get("TransferSyntax", ""))
        sop_class_uid = sop_class_uid or str(metadata.get("SopClassUid", ""))
        if not self._admit(len(data)):
            return False
        try:
            item, duplicate = self.queue.store(data, sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
                                               transfer_syntax=transfer_syntax, calling_ae=remote,
                                               meta=(CURSOR_KEY, cursor_value(seq, settings.url)))
        finally:
            if self.gate is not None:
                self.gate.release(len(data))
        if duplicate:  # waiting in the queue already (registered from the spool after a kill): move past it
            self.queue.set_meta(CURSOR_KEY, cursor_value(seq, settings.url))
        self.cursor = seq
        self.stored += 1
        self.audit.record("received", sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
                    transfer_syntax=transfer_syntax, calling_ae=remote, size=item.size, item=item.id,
                    duplicate=duplicate, source="orthanc", orthanc_id=instance, seq=seq)
        self.metrics.received(remote)
        self.on_received()
        return True

    def _admit(self, size: int) -> bool:
        """Wait while the spool's filesystem is below its reserve (nothing is skipped); False when stopping."""
        if self.gate is None:
            return True
        while self.gate.admit(size) is not None:
            if self._halt.wait(self.settings.poll_s):
                return False
        return True

    # --- down / up, notes --------------------------------------------------------------------

    def _down(self, reason: str) -> None:
        self.failures += 1
        if self.down_since is None:
            self.down_since = time.time()
            log.error("Orthanc source %s: %s; retrying until it answers", self.settings.url, reason)
            self.audit.record("orthanc_source_down", url=self.settings.url, reason=reason)
            self._note(None, down=reason)
        else:
            log.debug("Orthanc source %s still down: %s", self.settings.url, reason)
        delay = min(self.retry_max_s, self.retry_initial_s * 2 ** min(self.failures - 1, 30))
        self._halt.wait(delay)

    def _up(self) -> None:
        down_s = time.time() - (self.down_since or time.time())
        log.info("Orthanc source %s answers again after %.0f s", self.settings.url, down_s)
        self.audit.record("orthanc_source_up", url=self.settings.url, down_s=round(down_s, 3))
        self.down_since, self.failures = None, 0

    def _note(self, last: int | None, down: str | None = None) -> None:
        """What the source last saw, for ``--status`` (best effort)."""
        try:
            self.queue.set_meta(NOTE_KEY, json.dumps({"time": time.time(), "last": last, "cursor": self.cursor,
                                                      "down": down, "url": self.settings.url}))
        except Exception as error:  # noqa: BLE001 - a note must not stop the source
            log.debug("could not note the Orthanc source's state: %s", error)



# --- router.py --check and --status --------------------------------------------------------------


def check_source(settings: OrthancSourceSettings, cursor: int | None) -> tuple[bool, str]:
    """(ok, one line) for ``--check``: Orthanc answers with these credentials; its last change and the cursor."""
    client = OrthancClient(settings.url, settings.username, settings.password, min(settings.timeout_s, 10.0))
    try:
        system = client.get_json("/system")
        last = client.last_change()
    except OrthancError as error:
        return False, f"orthanc source {settings.url}: {error}"
    where = ("no cursor yet (starts at the " + ("first" if settings.start_from == "beginning" else "latest")
             + " change)") if cursor is None else f"cursor {cursor}, {max(0, last - cursor)} changes to look at"
    return True, (f"orthanc source {settings.url}: Orthanc {system.get('Version', '?')} "
                  f"(AET {system.get('DicomAet', '?')}), last change {last}; {where}; modalities "
                  f"{list(settings.modalities) or 'all'}")


def describe_status(settings: OrthancSourceSettings, cursor_note: str | None, state_note: str | None) -> list[str]:
    """Lines for ``--status``: the cursor, Orthanc's last change (asked now, else as last noted) and the lag."""
    cursor = read_cursor(cursor_note)
    lines = [f"orthanc source {settings.url}: cursor "
             + ("none yet" if cursor is None else f"{cursor} (last change handed over to the queue or skipped)")]
    client = OrthancClient(settings.url, settings.username, settings.password, min(settings.timeout_s, 5.0))
    try:
        last = client.last_change()
        lag = f", {max(0, last - cursor)} changes behind" if cursor is not None else ""
        lines.append(f"  Orthanc's last change {last} (asked now){lag}")
    except OrthancError as error:
        lines.append(f"  Orthanc not reachable now: {error}")
    if state_note:
        try:
            state = json.loads(state_note)
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state["time"]))
            lines.append(f"  as the router last noted at {when}: " + (f"down: {state['down']}" if state.get("down")
                                                                       else f"last change {state.get('last')}"))
        except (ValueError, KeyError, TypeError):
            lines.append(f"  unreadable note {state_note[:100]!r}")
    return lines
