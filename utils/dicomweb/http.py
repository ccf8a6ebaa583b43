"""The HTTP side of DICOMweb clients: base URL checks, credentials from the environment or a file, TLS, and one
pooled ``requests`` session per archive or destination.

    endpoint = Endpoint.create("https://pacs.example/dicom-web", auth=HttpAuth.basic("router", password, "$PACS_PW"),
                               ca="ca.pem", timeout_s=30)
    with endpoint.session() as http:
        answer = http.get(endpoint.url + "/studies", headers={"Accept": "application/dicom+json"})

Credentials never sit in a URL, a YAML file or a repr: :meth:`HttpAuth.to_dict` says where they came from, masked.
Every failure to ask (refused, unreachable, timeout, TLS, an HTTP error status) is a :class:`DicomwebError` whose
text names the method, the URL and the status, never the credentials or a body longer than a line.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.untrusted import log_safe

DEFAULT_TIMEOUT_S = 30.0
POOL_SIZE = 8  # connections kept open per archive: one per forwarding or fetching thread is plenty


class DicomwebError(RuntimeError):
    """The archive could not be asked or answered with an error: try again later (or give up, by the caller's rules).
    ``status``: the HTTP status, None when no answer came."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SecretError(ValueError):
    """A credential that was asked for could not be read."""


def read_secret(file: str | os.PathLike | None, env: str | None, where: str) -> tuple[str, str]:
    """(secret, where it came from) from ``file`` (stripped) or else the environment variable ``env``; ("", "") when
    neither gives one. SecretError naming ``where`` when the file cannot be read."""
    if file:
        path = Path(file)
        try:
            return path.read_text().strip(), f"file {path}"
        except OSError as error:
            raise SecretError(f"{where}: cannot read {path}: {error.strerror or error}") from error
    value = os.environ.get(env, "").strip() if env else ""
    return (value, f"${env}") if value else ("", "")


@dataclass(frozen=True)
class HttpAuth:
    """None, HTTP basic or a bearer token. ``source``: where the secret came from, for messages."""
    kind: str = "none"  # "none", "basic", "bearer"
    username: str = ""
    secret: str = field(default="", repr=False)
    source: str = ""

    @classmethod
    def basic(cls, username: str, password: str, source: str = "") -> HttpAuth:
        return cls("basic", username, password, source)

    @classmethod
    def bearer(cls, token: str, source: str = "") -> HttpAuth:
        return cls("bearer", "", token, source)

    def to_dict(self) -> dict[str, Any]:
        """For --check, the audit log and saved configurations: never the secret."""
        if self.kind == "none":
            return {"auth": "none"}
        out: dict[str, Any] = {"auth": self.kind, "secret": f"*** ({self.source})" if self.source else "***"}
        if self.username:
            out["username"] = self.username
        return out

    def headers(self) -> dict[str, str]:
        if self.kind == "bearer":
            return {"Authorization": f"Bearer {self.secret}"}
        return {}

    def requests_auth(self):
        return (self.username, self.secret) if self.kind == "basic" else None


def check_url(url: str, where: str = "url") -> str:
    """An http(s) base URL without credentials, query or fragment, without its trailing slash; ValueError naming
    ``where`` otherwise."""
    url = str(url).strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{where}: expected http(s)://host[:port][/path], got {log_safe(url)!r}")
    if parts.username or parts.password:
        raise ValueError(f"{where}: no credentials in the URL (give them by file or environment variable)")
    return url


@dataclass(frozen=True)
class Endpoint:
    """One DICOMweb service: its base URL (the part before ``/studies``), credentials, TLS and timeout."""
    url: str
    auth: HttpAuth = HttpAuth()
    ca: str | None = None  # PEM bundle to verify the server with (None: the system's)
    cert: str | None = None  # client certificate (PEM) and its key, for mutual TLS
    key: str | None = None
    verify: bool = True  # False only for tests against a self-signed server without its CA at hand
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def create(cls, url: str, where: str = "url", **settings) -> Endpoint:
        return cls(check_url(url, where), **settings)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, **self.auth.to_dict(), "timeout_s": self.timeout_s}
        if self.ca:
            out["ca"] = self.ca
        if self.cert:
            out["cert"] = self.cert
        return out

    def session(self):
        """A ``requests.Session`` with a connection pool, the credentials and the TLS settings of this endpoint.
        Not shared between threads (requests' sessions are not thread-safe): one per thread."""
        import requests
        from requests.adapters import HTTPAdapter

        http = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=POOL_SIZE, max_retries=0)
        http.mount("https://", adapter)
        http.mount("http://", adapter)
        http.auth = self.auth.requests_auth()
        http.headers.update(self.auth.headers())
        http.verify = (self.ca or True) if self.verify else False
        if self.cert:
            http.cert = (self.cert, self.key) if self.key else self.cert
        http.trust_env = False  # no proxy or .netrc credentials picked up from the service's environment
        return http

    def request(self, http, method: str, path: str, **kwargs):
        """``http.request`` on ``self.url + path`` with this endpoint's timeout; the response when its status is
        below 400 (or in ``ok``), DicomwebError otherwise (no answer, or an error status with a one-line reason)."""
        import requests

        ok = kwargs.pop("ok", ())
        url = path if path.startswith(("http://", "https://")) else self.url + path
        try:
            answer = http.request(method, url, timeout=kwargs.pop("timeout", self.timeout_s), **kwargs)
        except requests.RequestException as error:
            raise DicomwebError(f"{method} {log_safe(url)}: {log_safe(_reason(error))}") from error
        if answer.status_code >= 400 and answer.status_code not in ok:
            hint = " (check the credentials)" if answer.status_code in (401, 403) else ""
            answer.close()  # a streamed answer's connection goes back to the pool now, not when collected
            raise DicomwebError(f"{method} {log_safe(url)}: HTTP {answer.status_code} "
                                f"{log_safe(answer.reason or '')}{hint}", answer.status_code)
        return answer


PROBE_TIMEOUT_S = 10.0


def probe(endpoint: Endpoint, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """``router.py --check``'s look at a DICOMweb service without storing anything: a QIDO-RS search for one
    study (``GET URL/studies?limit=1``) with the endpoint's credentials and TLS. (True, what it answered) when
    the service answered as one that would take a STOW-RS (2xx; 403, 405 or 501 to the search: a store-only
    account or service, said); (False, why) when it cannot be reached (name, connection, TLS, timeout),
    refuses the credentials (401), has nothing at that path (404) or fails (5xx)."""
    http = endpoint.session()
    try:
        answer = endpoint.request(http, "GET", "/studies", params={"limit": "1"}, timeout=timeout_s,
                                  headers={"Accept": "application/dicom+json"}, ok=(403, 405, 501))
    except DicomwebError as error:
        status = error.status
        hint = {404: " (no DICOMweb service at this URL? it is the part before /studies)"}.get(status, "")
        return False, f"{error}{hint}"
    finally:
        http.close()
    status = answer.status_code
    answer.close()
    if status in (403, 405, 501):
        return True, f"reachable, HTTP {status} to a search (a store-only service or account may refuse searches; " \
                     f"STOW-RS itself is not tried)"
    return True, f"reachable, credentials accepted (HTTP {status} to a search)"


def _reason(error: Exception) -> str:
    """The innermost useful words of a requests / urllib3 error (not its whole chain of reprs)."""
    text = str(error)
    for marker in ("Caused by ", "Failed to establish a new connection: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.strip("()[]'\" ")[:200] or type(error).__name__
