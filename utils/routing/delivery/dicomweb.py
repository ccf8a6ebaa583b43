"""DICOMweb destinations: objects sent by STOW-RS, with the retries and records of every other destination.

    destinations:
      spine:
        dicomweb: https://pacs.example.org/dicom-web     # POST {dicomweb}/studies
        username: router                                 # HTTP basic; the password never in the YAML:
        password_env: ROUTER_PACS_PASSWORD               #   an environment variable, or password_file
        # token_env / token_file instead: a bearer token
        tls: {ca: tls/pacs-ca.pem, cert: tls/router-client.crt, key: tls/router-client.key}
        timeout_s: 60                                    # defaults: ROUTER_DICOMWEB_* in utils/constants.py
        batch: 16                                        # objects per request at most ...
        batch_mb: 64                                     # ... and megabytes (a larger object goes alone)

:class:`DicomwebForwarder` is a forwarder thread (utils/routing/delivery/forwarder.py) with its own pooled
``requests`` session. Each round it groups the due objects into requests (``batch`` objects, ``batch_mb``
megabytes, never the same SOP Instance UID twice in one) and sends each spool file's bytes exactly as received
(utils/dicomweb/stow.py: streamed from the file, never decoded or re-encoded). What the destination answers decides,
per object, what the queue and the audit log record:

- HTTP 200: every object stored (one the answer's FailedSOPSequence names is that object's failure); a body that is
  not a STOW-RS answer at all (a web page at a wrong URL) counts as the destination down, not as a delivery;
- HTTP 202: the ones in ReferencedSOPSequence are done (WarningReason: status ``warning``), the ones in
  FailedSOPSequence (FailureReason) and the ones the answer does not name are each that object's failure;
- HTTP 409: none stored; each object's failure, with its FailureReason;
- 400, 413, 415 and other 4xx: the request is refused. With several objects in it each is sent again alone, so that
  the refusal lands on the objects it is about; an object refused alone is that object's failure;
- an object's failure is retried with backoff and marked ``failed`` after ``max_attempts`` (``--requeue-failed``),
  as a C-STORE failure status is;
- 401 / 403: the destination is down, "check the credentials"; 404, 405, 408, 429, 3xx, 5xx, no answer (refused,
  unreachable, TLS, timeout, a dropped connection): the destination is down and retried with backoff for as long
  as it takes. Nothing is marked done without the destination's answer.

Everything the destination says (reason phrases, the body, FailureReason) reaches log and audit lines only through
utils.untrusted.log_safe; the UIDs of an answer are only compared with the objects sent.
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils import constants
from utils.config import ConfigError
from utils.dicomweb.http import DicomwebError, Endpoint, HttpAuth, SecretError, check_url, read_secret
from utils.dicomweb.stow import Cancelled, StowAnswer, plan, store_instances
from utils.routing.delivery.forwarder import _Worker
from utils.routing.operations.console import is_loopback
from utils.routing.operations.schema import resolve_path
from utils.routing.queue import QueueItem

log = logging.getLogger(__name__)

STORED = (200, 202, 409)  # statuses whose answer speaks per instance
DOWN_4XX = frozenset({404, 405, 408, 429})  # not about the objects: a wrong URL, a busy or slow server
CREDENTIALS = frozenset({401, 403})


@dataclass(frozen=True)
class DicomwebSettings:
    """A DICOMweb destination of the router's configuration, checked: the service and the batch limits."""

    endpoint: Endpoint  # URL, credentials (never in a repr), TLS, timeout (utils/dicomweb/http.py)
    batch: int = constants.ROUTER_DICOMWEB_BATCH
    batch_mb: int = constants.ROUTER_DICOMWEB_BATCH_MB

    @property
    def url(self) -> str:
        return self.endpoint.url

    def to_dict(self) -> dict[str, Any]:
        """For --check, the audit log and saved configurations: the secret masked."""
        shown = {k: v for k, v in self.endpoint.to_dict().items() if k != "url"}
        return {"dicomweb": self.url, **shown, "batch": self.batch, "batch_mb": self.batch_mb}

    def describe(self) -> str:
        auth = self.endpoint.auth
        who = (f"basic auth as {auth.username}" if auth.kind == "basic" else "bearer token" if auth.kind == "bearer"
               else "no authentication")
        source = f", secret from {auth.source}" if auth.source else ""
        tls = (f"; CA {self.endpoint.ca or 'system'}; client certificate {'yes' if self.endpoint.cert else 'no'}"
               if self.url.startswith("https://") else "")
        return f"STOW-RS to {self.url}/studies ({who}{source}{tls})"


def settings_from(block, base: Path, where: str) -> DicomwebSettings:
    """A validated DICOMweb destination (utils/routing/operations/schema.py ``DicomwebDestination``) -> settings:
    the URL's form, the secret read now from its file or environment variable, the TLS files loaded. ConfigError
    naming the key (``where``: ``router.yaml: destinations.spine``)."""
    try:
        url = check_url(block.dicomweb, f"{where}.dicomweb")
    except ValueError as error:
        raise ConfigError(str(error)) from None
    auth = _auth(block, base, where)
    ca = cert = key = None
    if block.tls is not None:
        if not url.startswith("https://"):
            raise ConfigError(f"{where}.tls: TLS settings need an https:// URL, got {url}")
        ca, cert, key = _tls_files(block.tls, base, f"{where}.tls")
    endpoint = Endpoint(url, auth, ca=ca, cert=cert, key=key, timeout_s=block.timeout_s)
    return DicomwebSettings(endpoint, batch=block.batch, batch_mb=block.batch_mb)


def _auth(block, base: Path, where: str) -> HttpAuth:
    username = block.username.strip()
    password = (block.password_env, block.password_file)
    token = (block.token_env, block.token_file)
    if any(password) and not username:
        raise ConfigError(f"{where}: a password ({'password_env' if password[0] else 'password_file'}) without "
                          f"username; give both, or neither")
    if username and any(token):
        raise ConfigError(f"{where}: give username with password_env or password_file (HTTP basic), or token_env "
                          f"or token_file (a bearer token), not both")
    if ":" in username or not username.isprintable():
        raise ConfigError(f"{where}.username: a user name for HTTP basic authentication has no ':' and no control "
                          f"characters")
    if username:
        return HttpAuth.basic(username, *_secret(block, base, where, "password"))
    if any(token):
        return HttpAuth.bearer(*_secret(block, base, where, "token"))
    return HttpAuth()


def _secret(block, base: Path, where: str, kind: str) -> tuple[str, str]:
    """(secret, where it came from) of ``password`` or ``token``: from ``<kind>_file`` or ``<kind>_env``."""
    env, file = getattr(block, f"{kind}_env"), getattr(block, f"{kind}_file")
    if env and file:
        raise ConfigError(f"{where}: give {kind}_env or {kind}_file, not both")
    if not env and not file:
        raise ConfigError(f"{where}: username needs a password: password_env (an environment variable) or "
                          f"password_file (a file only the router's user can read)")
    path = resolve_path(file, base) if file else None
    try:
        secret, source = read_secret(path, env, f"{where}.{kind}_file")
    except SecretError as error:
        raise ConfigError(str(error)) from None
    if not secret:
        raise ConfigError(f"{where}.{kind}_file: {path} is empty" if file else
                          f"{where}.{kind}_env: the environment variable ${env} is not set (or empty)")
    return secret, source


def _tls_files(block, base: Path, where: str) -> tuple[str | None, str | None, str | None]:
    """The TLS block's files, resolved, read and loaded now (a wrong file is refused at start, not at the first
    request): (ca, cert, key) as strings for requests."""
    from utils.routing.tls import ClientTLS, client_context

    if bool(block.cert) != bool(block.key):
        raise ConfigError(f"{where}: a client certificate needs both cert and key")
    paths = {}
    for name in ("ca", "cert", "key"):
        value = getattr(block, name)
        if not value:
            continue
        path = resolve_path(value, base)
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as error:
            raise ConfigError(f"{where}.{name}: {path}: cannot be read ({error.strerror or error})") from None
        paths[name] = path
    client_context(ClientTLS(ca=paths.get("ca"), cert=paths.get("cert"), key=paths.get("key")), where)
    return tuple(str(paths[n]) if n in paths else None for n in ("ca", "cert", "key"))


def _plain_http_to_another_host(endpoint: Endpoint) -> bool:
    parts = urllib.parse.urlsplit(endpoint.url)
    if parts.scheme != "http" or endpoint.auth.kind == "none":
        return False
    return not is_loopback(parts.hostname or "")


class DicomwebForwarder(_Worker):
    """STOW-RS towards one DICOMweb service (``Destination.dicomweb``); see the module's docstring."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.settings: DicomwebSettings = self.destination.dicomweb
        self._http = None  # the requests session: made, used and closed by this thread only
        if _plain_http_to_another_host(self.settings.endpoint):
            log.warning("destination %s: credentials go over plain http to another host; use https",
                        self.destination.node)

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self._http is not None:
                self._http.close()
                self._http = None

    def deliver(self, items: list[QueueItem]) -> str | None:
        if self._http is None:
            self._http = self.settings.endpoint.session()
        batches = plan([item.size for item in items], [item.sop_instance_uid for item in items],
                       max_instances=self.settings.batch, max_bytes=self.settings.batch_mb << 20)
        for indices in batches:
            if self._halt.is_set():
                break
            problem = self._send([items[i] for i in indices])
            if problem:
                return problem
        return None

    def _send(self, batch: list[QueueItem]) -> str | None:
        """One request; why the destination is down, or None (each object's outcome recorded)."""
        present = []
        for item in batch:
            if self.queue.path(item).is_file():
                present.append(item)
            else:
                self._refused(item, f"the spool file {item.file} is missing")
        if not present:
            return None
        try:
            answer = store_instances(self._http, self.settings.endpoint, [self.queue.path(i) for i in present],
                                     cancelled=self._halt.is_set)
        except Cancelled:  # stopping: nothing recorded, the objects are sent again after the restart
            return None
        except DicomwebError as error:  # refused, unreachable, TLS, timeout, dropped: log-safe already
            return str(error)
        return self._settle(present, answer)

    def _settle(self, batch: list[QueueItem], answer: StowAnswer) -> str | None:
        status, url = answer.status, f"{self.settings.url}/studies"
        if status in STORED and (answer.readable or (status == 200 and answer.empty)):
            for item in batch:
                outcome = answer.outcome(item.sop_instance_uid)
                if outcome.stored:
                    warning = f", WarningReason {outcome.reason}" if outcome.warning else ""
                    self._done(item, f"HTTP {status}{warning}", "warning" if outcome.warning else "")
                elif status == 409:
                    self._refused(item, f"STOW-RS HTTP 409, none stored: "
                                        f"{('FailureReason ' + outcome.reason) if outcome.listed else answer.excerpt}")
                else:
                    self._refused(item, f"STOW-RS HTTP {status}: " + (f"FailureReason {outcome.reason}"
                                                                      if outcome.listed else outcome.reason))
            return None
        if status == 200:
            return f"POST {url}: HTTP 200 without a STOW-RS answer ({answer.problem}); check the url"
        if status in STORED:  # 202 / 409 whose answer cannot be read: nothing known per object
            for item in batch:
                self._refused(item, f"STOW-RS {answer.describe()} ({answer.problem})")
            return None
        if status in CREDENTIALS:
            return f"POST {url}: {answer.describe()}: check the credentials ({self.settings.describe()})"
        if 400 <= status < 500 and status not in DOWN_4XX:
            if len(batch) > 1:  # which of them? each alone
                for item in batch:
                    if self._halt.is_set():
                        return None
                    problem = self._send([item])
                    if problem:
                        return problem
                return None
            self._refused(batch[0], f"STOW-RS refused: {answer.describe()}")
            return None
        hint = " (a redirect: configure the URL it points to)" if 300 <= status < 400 else ""
        return f"POST {url}: {answer.describe()}{hint}"
