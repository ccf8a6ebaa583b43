"""The router's web console: what the router did, and the review list where operators requeue and correct.

    console:                         # in the router's YAML; off without this block
      host: 127.0.0.1                # default (keys and defaults: ROUTER_CONSOLE_* in utils/constants.py)
      port: 8108
      allowed_hosts: [router.example.org]  # names the browser may use (default: the bind address, localhost,
                                           # 127.0.0.1, ::1, and this machine's hostname when not bound to loopback)
      trusted_proxies: [127.0.0.1]   # a reverse proxy in front: every page needs login; its X-Forwarded-For/-Proto
      tls: {cert: tls/console.crt, key: tls/console.key}   # optional: HTTPS (TLS 1.2+), session cookie marked Secure
      token_env: ROUTER_CONSOLE_TOKEN   # the operators' token is read from this environment variable ...
      token_file: console.token         # ... or from this file (never written in the YAML itself)
      users_file: console.users         # optional: HTTP basic auth, lines "name:$argon2id$..." (hash-password)
      session_hours: 8                  # a login lasts this long from the login, however much it is used ...
      idle_minutes: 30                  # ... and ends earlier after this long without a request
      max_failures: 10                  # failed authentications per client address before 429 ...
      failure_window_s: 300             # ... refilled at max_failures per this many seconds
      review_days: 30                   # review copies (spool/review/) kept this long ...
      review_max_mb: 2000               # ... and at most this much
      corrections_dir: corrections      # the corrections dataset (default: <spool_dir>/corrections)

Pages, server-rendered (Jinja2, inline CSS, one small inline script that reloads the live part every few seconds;
no build step): ``/`` counts by state, label and destination, each destination's health (last success, last
error, backlog, next retry), throughput and classification latency over the last hour, the latest decisions with
thumbnail, probabilities, BodyPartExamined, who decided and where the object went; ``/search?q=`` by SOP or Study
Instance UID or Patient ID; ``/review`` the review list (utils/routing/operations/review.py) with its actions.

Security (each point answers an attack that was tried):

- Host: a request whose ``Host`` name (the port is not compared) is not in ``allowed_hosts`` gets 400 before
  anything else runs, so a web page that rebinds its own DNS name to 127.0.0.1 cannot read the console.
- Reading: pages (patient IDs, images) are open without login only to a client on a loopback address, with no
  ``trusted_proxies`` declared and no X-Forwarded-For/Forwarded/X-Real-IP header on the request. Behind a reverse
  proxy, declare it in ``trusted_proxies`` (addresses or networks): every page then needs authentication, and
  the client address (rate limits, logs) and scheme come from the proxy's X-Forwarded-For and X-Forwarded-Proto.
- Who may act (POST only): the operators' token entered once on ``/login`` with the operator's name; a user of
  ``users_file`` by HTTP basic auth; or a script with ``Authorization: Bearer <token>`` and ``X-Operator: <name>``
  (1-64 printable characters, audited as who=<name>, auth=bearer; a bearer request without it gets 400). The token
  and the login name are a claim of who acts, as on the login form; basic auth names the user by password. Without
  a token or users the console is read-only. The token must have at least 16 characters, 8 distinct ones and an
  estimated 64 bits (length x log2 of the character classes used); otherwise the router does not start.
- Sessions: the cookie holds a random session id (HttpOnly, SameSite=Strict, Secure over HTTPS) that names a
  record kept in the router's memory (operator, creation, last use, CSRF token); ``/logout`` (a POST) deletes it,
  so a copied cookie stops working; a session ends ``session_hours`` after the login and after ``idle_minutes``
  unused (the overview's automatic reloads do not count); at most SESSIONS_MAX are kept (the least recently used
  goes first). A restart logs everyone out.
- CSRF: a logged-in form carries its session's CSRF token; the login form and basic-auth users carry one bound to
  a random cookie (HMAC with a key made at each start). A missing or empty token never matches. A basic-auth
  action (browsers resend basic credentials on their own) needs that token or an ``Origin`` of this console; a
  bearer request needs neither (a browser cannot add an Authorization header to another site's form). Any request
  whose Origin is another site is refused, ``/login`` and ``/logout`` included.
- Guessing: each failed authentication (login form, basic, bearer) is logged with the client address and the
  name (escaped; never the password or token) and spends one of ``max_failures`` per client address, refilled over
  ``failure_window_s``; an address with none left gets 429 with Retry-After for any credentials, right or wrong.
  Successful authentications are logged (a login each time; basic and bearer once per address and name).
- Passwords: ``hash-password`` writes argon2id (argon2-cffi); ``pbkdf2_sha256$`` lines of older files still
  verify. Verification runs in worker threads, VERIFY_THREADS at a time, so guessing does not stall the pages;
  an unknown user is checked against a dummy hash of the same kind (the same time as a known one); the last
  VERIFIED_CACHED successful checks are remembered (keyed by an HMAC of name and password with a per-start key)
  for VERIFIED_CACHE_S, so a page's thumbnails do not each cost a verification.
- The spool database is read in worker threads with a DB_TIMEOUT_S busy timeout, DB_ATTEMPTS times; a busy,
  missing or unreadable database answers 503 with the reason ("the spool database is busy ...", "... was not
  found at ..."), never a bare 500.
- Responses carry a Content-Security-Policy (scripts only with the page's nonce, no framing) and no-store.

The console runs in a thread of the router process (uvicorn on a socket the node binds at start, so a taken port
fails the start), reads the queue through its own read-only SQLite connections and stops first when the router
stops. starlette, uvicorn, jinja2 and python-multipart are imported only when the console is configured;
argon2-cffi only when it has a users_file.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import importlib.util
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils import constants
from utils.config import ConfigError
from utils.routing.http_server import ServerThread
from utils.routing.operations.schema import resolve_path as _path

log = logging.getLogger(__name__)

PREFIX = "ROUTER_CONSOLE_"  # the constants of the block's keys (the key is the name without the prefix)
_SCALARS = ("host", "port", "token_env", "session_hours", "idle_minutes", "max_failures", "failure_window_s",
            "review_days", "review_max_mb")
_LISTS = ("allowed_hosts", "trusted_proxies")
_PACKAGES = {"starlette": "starlette", "uvicorn": "uvicorn", "jinja2": "jinja2", "python_multipart": "python-multipart"}
MIN_TOKEN_CHARS = 16  # a shorter token is refused (guessable)
MIN_TOKEN_DISTINCT = 8  # ... and one with fewer distinct characters ("aaaaaaaaaaaaaaaa")
MIN_TOKEN_BITS = 64  # ... and one whose estimate (length x log2 of the character classes' size) is below this
HASH_ITERATIONS = 200_000  # pbkdf2_sha256 iterations of the older users files (still verified; not written)
VERIFY_THREADS = 2  # password verifications at once (argon2 takes ~50 ms and 64 MiB each)
VERIFIED_CACHED = 256  # successful basic-auth checks remembered (least recently used dropped) ...
VERIFIED_CACHE_S = 600  # ... for at most this long
SESSIONS_MAX = 1000  # logged-in sessions kept; beyond, the least recently used ends
CLIENTS_TRACKED = 10_000  # client addresses with failed authentications remembered (oldest dropped)
DB_TIMEOUT_S = 1.0  # a page waits this long for a busy spool database ...
DB_ATTEMPTS = 2  # ... this many times, then answers 503
LATEST = 30  # decisions on the front page
LISTED = 200  # rows of the review list and of a search at most
LIVE_REFRESH_S = 3  # the front page reloads its live part this often
MAX_NAME_CHARS = 64  # an operator's name (login form, X-Operator)
TEMPLATES = Path(__file__).parent / "templates" / "console"
SESSION_COOKIE = "router_console"  # the session id
FORM_COOKIE = "router_console_form"  # the random value the login form's CSRF token is bound to
_FORWARDING = ("x-forwarded-for", "forwarded", "x-real-ip")  # a proxy's headers: never an open page
_POLLED = {"/live", "/api/summary"}  # asked for by the page itself every few seconds: not a use of the session


@dataclass(frozen=True)
class ConsoleSettings:
    """The ``console`` block, checked; the token and users are read at load and never printed or audited."""

    host: str = constants.ROUTER_CONSOLE_HOST
    port: int = constants.ROUTER_CONSOLE_PORT
    allowed_hosts: tuple[str, ...] = constants.ROUTER_CONSOLE_ALLOWED_HOSTS  # (): the defaults of hosts()
    trusted_proxies: tuple[str, ...] = constants.ROUTER_CONSOLE_TRUSTED_PROXIES
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_env: str = constants.ROUTER_CONSOLE_TOKEN_ENV
    token_file: Path | None = None
    users_file: Path | None = None
    session_hours: float = constants.ROUTER_CONSOLE_SESSION_HOURS
    idle_minutes: float = constants.ROUTER_CONSOLE_IDLE_MINUTES
    max_failures: int = constants.ROUTER_CONSOLE_MAX_FAILURES
    failure_window_s: float = constants.ROUTER_CONSOLE_FAILURE_WINDOW_S
    review_days: float = constants.ROUTER_CONSOLE_REVIEW_DAYS
    review_max_mb: int = constants.ROUTER_CONSOLE_REVIEW_MAX_MB
    corrections_dir: Path | None = None  # None: <spool_dir>/corrections
    token: str | None = field(default=None, repr=False, compare=False)
    users: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # name -> argon2/pbkdf2 hash

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "allowed_hosts": list(self.allowed_hosts),
                "trusted_proxies": list(self.trusted_proxies),
                "tls": {"cert": str(self.tls_cert), "key": str(self.tls_key)} if self.tls_cert else None,
                "token_env": self.token_env, "token_file": str(self.token_file) if self.token_file else None,
                "users_file": str(self.users_file) if self.users_file else None,
                "session_hours": self.session_hours, "idle_minutes": self.idle_minutes,
                "max_failures": self.max_failures, "failure_window_s": self.failure_window_s,
                "review_days": self.review_days, "review_max_mb": self.review_max_mb,
                "corrections_dir": str(self.corrections_dir) if self.corrections_dir else None}

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def hosts(self) -> frozenset[str]:
        """The Host names served: ``allowed_hosts``, or the bind address, localhost, 127.0.0.1, ::1 and (not bound to
        loopback) this machine's hostname."""
        if self.allowed_hosts:
            return frozenset(h.lower() for h in self.allowed_hosts)
        names = {self.host.lower(), "localhost", "127.0.0.1", "::1"}
        if not self.loopback:
            names.add(socket.gethostname().lower())
        return frozenset(names - {"0.0.0.0", "::", ""})

    def describe(self, port: int | None = None) -> str:
        who = ([f"token ({'file ' + str(self.token_file) if self.token_file else '$' + self.token_env})"]
               if self.token else []) + ([f"{len(self.users)} users (basic auth)"] if self.users else [])
        actions = "actions need " + " or ".join(who) if who else (
            f"read-only: no token (set ${self.token_env} or token_file) and no users_file")
        reads = ("behind a proxy: every page needs authentication" if self.trusted_proxies else
                 "pages open to loopback clients" if self.loopback else
                 "pages open to loopback clients, every other needs authentication")
        hosts = ", ".join(sorted(self.hosts()))
        return (f"web console on {self.scheme}://{self.host}:{self.port if port is None else port}/ ({actions}; "
                f"{reads}; Host: {hosts})")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from(block, base: Path, where: str) -> ConsoleSettings:
    """The validated ``console`` block (utils/routing/operations/schema.py) -> settings: host names and proxy
    networks checked, paths resolved, the token and users read and judged, the packages the console needs
    present. ConfigError naming the key, or the pip command for what is missing."""
    where = f"{where}: console"
    values: dict[str, Any] = {key: getattr(block, key) for key in _SCALARS}
    for key in _LISTS:
        value = getattr(block, key)
        value = [value] if isinstance(value, str) else value
        if not all(v.strip() for v in value):
            raise ConfigError(f"{where}.{key}: expected a list of names or addresses, got {value!r}")
        values[key] = tuple(v.strip() for v in value)
    for name in values["allowed_hosts"]:
        if not (_is_ip(name.strip("[]")) or re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", name)):
            raise ConfigError(f"{where}.allowed_hosts: {name!r} is not a host name or address (no '*', no port)")
    values["allowed_hosts"] = tuple(h.strip("[]").rstrip(".").lower() for h in values["allowed_hosts"])
    for proxy in values["trusted_proxies"]:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError as error:
            raise ConfigError(f"{where}.trusted_proxies: {proxy!r} is not an address or network ({error})") from error
    paths = {key: None if getattr(block, key) is None else _path(getattr(block, key), base)
             for key in ("token_file", "users_file", "corrections_dir")}
    tls_cert, tls_key = read_tls(block.tls, base, f"{where}.tls")
    token = read_token(paths["token_file"], values["token_env"], where)
    missing = [pip for module, pip in _PACKAGES.items() if importlib.util.find_spec(module) is None]
    if paths["users_file"] and importlib.util.find_spec("argon2") is None:
        missing.append("argon2-cffi")
    if missing:
        raise ConfigError(f"{where}: the console needs {' '.join(missing)} (pip install {' '.join(missing)}); "
                          f"install them or remove the console block")
    users = read_users(paths["users_file"], where) if paths["users_file"] else {}
    return ConsoleSettings(**values, **paths, tls_cert=tls_cert, tls_key=tls_key, token=token, users=users)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def read_tls(block, base: Path, where: str) -> tuple[Path | None, Path | None]:
    """``tls: {cert, key}`` -> paths, loaded once here so that a wrong file stops the start with its name."""
    if block is None:
        return None, None
    cert, key = _path(block.cert, base), _path(block.key, base)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"{where}: cannot use certificate {cert} with key {key}: {error}") from error
    return cert, key


def token_problem(token: str) -> str | None:
    """Why ``token`` is too weak to guard patient data, or None: fewer than MIN_TOKEN_CHARS characters, fewer than
    MIN_TOKEN_DISTINCT distinct ones, or an estimate below MIN_TOKEN_BITS bits (length x log2 of the size of the
    character classes it uses: lower case, upper case, digits, others)."""
    if len(token) < MIN_TOKEN_CHARS:
        return f"it has {len(token)} characters, at least {MIN_TOKEN_CHARS} characters are needed"
    if len(set(token)) < MIN_TOKEN_DISTINCT:
        return (f"it has {len(set(token))} distinct characters, at least {MIN_TOKEN_DISTINCT} distinct characters "
                f"are needed")
    pool = (26 * any(c.islower() for c in token) + 26 * any(c.isupper() for c in token)
            + 10 * any(c.isdigit() for c in token) + 33 * any(not c.isalnum() for c in token))
    bits = len(token) * math.log2(max(pool, 2))
    if bits < MIN_TOKEN_BITS:
        return f"it carries about {bits:.0f} bits, at least {MIN_TOKEN_BITS} bits are needed"
    return None


def read_token(token_file: Path | None, env: str, where: str, what: str = "the console's token") -> str | None:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"{where}.token_file: cannot read {token_file}: {error}") from error
        source = f"{where}.token_file {token_file}"
    else:
        token, source = os.environ.get(env, "").strip(), f"environment variable {env}"
    if not token:
        return None
    problem = token_problem(token)
    if problem:
        raise ConfigError(f"{source}: {what} is too easy to guess: {problem} "
                          f"(make one with python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


def read_users(path: Path, where: str) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ConfigError(f"{where}.users_file: cannot read {path}: {error}") from error
    users = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, hashed = line.strip().partition(":")
        if not name or not _known_hash(hashed):
            raise ConfigError(f"{where}.users_file {path}, line {number}: expected name:$argon2id$... "
                              f"(python -m utils.routing.operations.console hash-password NAME) or name:pbkdf2_sha256$...")
        users[name] = hashed
    return users


def _known_hash(hashed: str) -> bool:
    if hashed.startswith("pbkdf2_sha256$"):
        return len(hashed.split("$")) == 4
    if hashed.startswith("$argon2"):
        import argon2

        try:
            argon2.extract_parameters(hashed)
        except argon2.exceptions.InvalidHashError:
            return False
        return True
    return False


def hash_password(password: str, *, time_cost: int | None = None, memory_kib: int | None = None) -> str:
    """An argon2id hash (argon2-cffi's defaults: RFC 9106's low-memory profile) for users_file; tests pass cheaper
    costs."""
    import argon2

    default = argon2.PasswordHasher()
    hasher = argon2.PasswordHasher(time_cost=time_cost or default.time_cost,
                                   memory_cost=memory_kib or default.memory_cost,
                                   parallelism=1 if memory_kib else default.parallelism)
    return hasher.hash(password)


def pbkdf2_hash(password: str, iterations: int = HASH_ITERATIONS) -> str:
    """The older users_file format (still verified, no longer written by hash-password)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def check_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches an argon2 or pbkdf2_sha256 hash (slow on purpose: call it in a thread)."""
    if hashed.startswith("$argon2"):
        import argon2

        try:
            return argon2.PasswordHasher().verify(hashed, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    try:
        _, iterations, salt, digest = hashed.split("$")
        computed = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(computed.hex(), digest)


def dummy_hash(users: dict[str, str]) -> str:
    """A hash of the same kind and cost as the users' (argon2 if any is), to check an unknown name against: it
    answers in the same time as a known one."""
    argon = next((h for h in users.values() if h.startswith("$argon2")), None)
    if argon is not None:
        import argon2

        parameters = argon2.extract_parameters(argon)
        return argon2.PasswordHasher.from_parameters(parameters).hash(secrets.token_urlsafe(16))
    iterations = int(next(iter(users.values())).split("$")[1]) if users else HASH_ITERATIONS
    return pbkdf2_hash(secrets.token_urlsafe(16), iterations)


class PasswordChecker:
    """HTTP basic passwords against a users file, for the console and STOW-RS: each verification in a worker thread,
    VERIFY_THREADS at a time; an unknown name checked against a dummy hash of the same kind (the same time as a known
    one); the last VERIFIED_CACHED successes remembered for VERIFIED_CACHE_S, keyed by an HMAC of name and password
    with a key of this start's."""

    def __init__(self, users: dict[str, str]) -> None:
        import anyio

        self.users = users
        self._key = secrets.token_bytes(32)
        self._limiter = anyio.CapacityLimiter(VERIFY_THREADS)
        self._verified: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._dummy: list[str] = []  # made on first need (in a thread: it costs one hashing)

    async def check(self, name: str, password: str) -> bool:
        import anyio

        mark = hmac.new(self._key, f"{len(name)}:{name}:{password}".encode(), hashlib.sha256).digest()
        when = self._verified.get(mark)
        if when is not None and time.monotonic() - when < VERIFIED_CACHE_S:
            self._verified.move_to_end(mark)
            return True
        hashed = self.users.get(name)
        if hashed is None:  # the same work as for a known name
            if not self._dummy:
                self._dummy.append(await anyio.to_thread.run_sync(dummy_hash, self.users, limiter=self._limiter))
            await anyio.to_thread.run_sync(check_password, password, self._dummy[0], limiter=self._limiter)
            return False
        if not await anyio.to_thread.run_sync(check_password, password, hashed, limiter=self._limiter):
            return False
        self._verified[mark] = time.monotonic()
        self._verified.move_to_end(mark)
        while len(self._verified) > VERIFIED_CACHED:
            self._verified.popitem(last=False)
        return True


# --- what the console reads --------------------------------------------------------------------


class ConsoleUnavailable(Exception):
    """The spool database cannot be read now: the pages answer 503 with this text (``busy``: try again soon)."""

    def __init__(self, text: str, busy: bool = False) -> None:
        super().__init__(text)
        self.busy = busy


@dataclass
class ConsoleContext:
    """What the pages show and the actions use, without the web layer: the spool (read-only SQLite), the model's
    classes, the destinations, the forwarders (health), the model's state and the review desk (actions)."""

    spool_dir: Path
    class_names: Sequence[str]
    destinations: dict  # route -> utils.routing.operations.config.Destination
    desk: Any  # utils.routing.operations.review.ReviewDesk
    forwarders: Sequence = ()
    model: Callable[[], tuple[str, str]] = lambda: ("", "")  # (model id, state)
    title: str = "router"
    shadow_report: Callable[[str | None, str | None], str] | None = None  # (since, until) -> HTML; shadow mode only
    reload: Callable[[str], dict] | None = None  # RouterNode.reload(source): configuration + model read again
    drift: Callable[[], tuple] | None = None  # DriftMonitor.readings: (reference, readings per window)

    def node_of(self, route: str) -> str:
        destination = self.destinations.get(route)
        return destination.node if destination is not None else ""

    def _read(self, question: Callable, attempts: int = DB_ATTEMPTS) -> Any:
        """``question(reader)`` with a :class:`utils.routing.queue.QueueReader` (call it in a worker thread, not the
        event loop). A busy or locked database (the router starting, SQLite recovering its WAL after a crash, a
        checkpoint) is waited for DB_TIMEOUT_S, ``attempts`` times; then, or when the database is missing or
        unreadable, ConsoleUnavailable says what is wrong."""
        import sqlite3

        from utils.routing.queue import QueueReader

        path = self.spool_dir / "queue.sqlite3"
        reader = QueueReader(self.spool_dir, DB_TIMEOUT_S)
        for attempt in range(attempts):
            if not path.is_file():
                raise ConsoleUnavailable(f"the spool database was not found at {path} (has the router started with "
                                         f"this spool_dir?)")
            try:
                return question(reader)
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) and "busy" not in str(error):
                    raise ConsoleUnavailable(f"the spool database at {path} cannot be read: {error}") from error
                if attempt == attempts - 1:
                    raise ConsoleUnavailable(f"the spool database is busy ({error}); the page will answer again "
                                             f"when the router lets go of it", busy=True) from error
                log.info("console: the spool database is busy (%s); reading again", error)
                time.sleep(0.1)
            except sqlite3.Error as error:
                raise ConsoleUnavailable(f"the spool database at {path} cannot be read: {error}") from error

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """Counts by state, label and destination; per destination: health; the last hour in 5-minute bins."""
        now = time.time() if now is None else now
        hour = now - 3600

        states, labels, routes, recent = self._read(lambda reader: reader.overview(since=hour))
        by_node: dict[str, dict[str, Any]] = {}
        for route, total, waiting, failed, next_attempt in routes:
            node = self.node_of(route) or route
            entry = by_node.setdefault(node, {"node": node, "routes": [], "objects": 0, "backlog": 0, "failed": 0,
                                              "next_attempt": None})
            entry["routes"].append(route)
            entry["objects"] += total
            entry["backlog"] += waiting or 0
            entry["failed"] += failed or 0
            if next_attempt and (entry["next_attempt"] is None or next_attempt < entry["next_attempt"]):
                entry["next_attempt"] = next_attempt
        for worker in self.forwarders:
            node = worker.destination.node
            entry = by_node.setdefault(node, {"node": node, "routes": list(worker.routes), "objects": 0,
                                              "backlog": 0, "failed": 0, "next_attempt": None})
            entry.update(last_success=worker.last_success, last_error=worker.last_error,
                         down_since=worker.down_since)
            if worker.retry_at is not None:
                entry["next_attempt"] = worker.retry_at
        bins = 12
        received, classified, delivered = [0] * bins, [0] * bins, [0] * bins
        latencies = []
        for received_at, classified_at, state, updated_at in recent:
            received[min(bins - 1, int((received_at - hour) // 300))] += 1
            if classified_at:
                latencies.append(max(0.0, classified_at - received_at))
                if classified_at >= hour:
                    classified[min(bins - 1, int((classified_at - hour) // 300))] += 1
            if state in ("forwarded", "quarantined") and updated_at >= hour:
                delivered[min(bins - 1, int((updated_at - hour) // 300))] += 1
        latencies.sort()
        model_id, model_state = self.model()
        return {"states": states, "labels": dict(sorted(labels.items())), "destinations": sorted(
                    by_node.values(), key=lambda e: e["node"]), "total": sum(states.values()),
                "hour": {"received": received, "classified": classified, "delivered": delivered,
                         "objects": len(recent), "latency_p50": _quantile(latencies, 0.5),
                         "latency_p95": _quantile(latencies, 0.95), "per_minute": round(len(recent) / 60, 2)},
                "model_id": model_id, "model_state": model_state, "now": now}

    def rows(self, limit: int = LATEST, **which) -> list[dict[str, Any]]:
        """Items (newest first) as the pages show them; ``which``: QueueReader.rows's ``uid`` / ``needing_review``."""
        from utils.routing.operations.review import review_path, thumb_path

        out = []
        for item in self._read(lambda reader: reader.rows(limit, **which)):
            probs = json.loads(item["probs"]) if item.get("probs") else {}
            item["top"] = sorted(probs.items(), key=lambda kv: -kv[1])[:3]
            item["top_label"] = item["top"][0][0] if item["top"] else ""
            item["thumb"] = thumb_path(self.spool_dir, item["id"]).is_file()
            item["kept"] = review_path(self.spool_dir, item["id"]).is_file() or item["state"] in (
                "received", "classified", "failed")
            item["destination"] = self.node_of(item["route"]) if item["route"] else ""
            out.append(item)
        return out

    def latest(self, limit: int = LATEST) -> list[dict[str, Any]]:
        return self.rows(limit=limit)

    def search(self, text: str) -> list[dict[str, Any]]:
        text = text.strip()
        if not text:
            return []
        return self.rows(LISTED, uid=text)

    def review_list(self) -> list[dict[str, Any]]:
        return self.rows(LISTED, needing_review=True)


def _quantile(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


# --- the web application -------------------------------------------------------------------------


@dataclass(frozen=True)
class Operator:
    """Who is asking: a name, how they proved it, and the CSRF token of their session (login form only)."""

    who: str
    auth: str  # "token" (login form, a session), "basic", "bearer"
    csrf: str = ""


@dataclass
class Session:
    who: str
    created: float
    seen: float
    csrf: str
    address: str


class SessionStore:
    """Logged-in sessions by random id, in memory: an absolute lifetime from the login, an idle timeout, at most
    ``limit`` (the least recently used goes first). ``clock`` is time.monotonic (tests move it)."""

    def __init__(self, hours: float, idle_minutes: float, limit: int = SESSIONS_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lifetime_s, self.idle_s, self.limit, self.clock = hours * 3600, idle_minutes * 60, limit, clock
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, who: str, address: str) -> tuple[str, Session]:
        now = self.clock()
        for sid in [s for s, record in self._sessions.items() if not self._alive(record, now)]:
            del self._sessions[sid]
        while len(self._sessions) >= self.limit:
            self._sessions.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = session = Session(who, now, now, secrets.token_urlsafe(32), address)
        return sid, session

    def get(self, sid: str | None, touch: bool = True) -> Session | None:
        """The live session of ``sid`` (with ``touch``, its last use now), or None (unknown, ended or revoked)."""
        session = self._sessions.get(sid) if sid else None
        if session is None:
            return None
        now = self.clock()
        if not self._alive(session, now):
            del self._sessions[sid]
            return None
        if touch:
            session.seen = now
            self._sessions.move_to_end(sid)
        return session

    def revoke(self, sid: str | None) -> Session | None:
        return self._sessions.pop(sid, None) if sid else None

    def _alive(self, session: Session, now: float) -> bool:
        return now - session.created < self.lifetime_s and now - session.seen < self.idle_s


class FailureLimiter:
    """A token bucket per client address: ``burst`` failed authentications, refilled at ``burst`` per ``window_s``;
    ``wait_s`` says how long an address must wait (0: it may try). At most ``limit`` addresses are remembered."""

    def __init__(self, burst: int, window_s: float, limit: int = CLIENTS_TRACKED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.rate, self.limit, self.clock = burst, burst / window_s, limit, clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _level(self, address: str, now: float) -> float:
        level, stamp = self._buckets.get(address, (self.burst, now))
        return min(self.burst, level + (now - stamp) * self.rate)

    def wait_s(self, address: str) -> float:
        level = self._level(address, self.clock())
        return 0.0 if level >= 1 else (1 - level) / self.rate

    def failed(self, address: str) -> None:
        now = self.clock()
        self._buckets[address] = (self._level(address, now) - 1, now)
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.limit:
            self._buckets.popitem(last=False)


class _AllowedHosts:
    """ASGI middleware: 400 for a Host name not in ``hosts`` (the port is not compared), before anything else."""

    def __init__(self, app, hosts: frozenset[str]) -> None:
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host_name(host) not in self.hosts:
                from starlette.responses import PlainTextResponse

                log.warning("console: refused a request for Host %r from %s (not in allowed_hosts)", host[:100],
                            (scope.get("client") or ("?",))[0])
                response = PlainTextResponse("refused: this console does not answer to that host name (see "
                                             "allowed_hosts in the console block)", 400, headers=_security_headers(""))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def host_name(host: str) -> str:
    """The name of a Host header without its port: ``[::1]:8108`` -> ``::1``, ``Router.Example:80`` ->
    ``router.example``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def operator_name(value: str) -> str | None:
    """A name for the audit log (login form, X-Operator): 1-64 printable characters, or None."""
    value = value.strip()
    return value if 0 < len(value) <= MAX_NAME_CHARS and value.isprintable() else None


def _matches(expected: str, given: str) -> bool:
    """Constant-time comparison where an empty or missing value never matches."""
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


def build_app(settings: ConsoleSettings, context: ConsoleContext):
    """The Starlette application of the console (``app.state.sessions`` and ``app.state.failures`` are its session
    store and failure limiter)."""
    import anyio
    import jinja2
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["when"] = _when
    env.filters["ago"] = lambda t, now=None: _ago(t, now)
    env.filters["seconds"] = lambda s: "-" if s is None else f"{s:.2f} s"
    key = secrets.token_bytes(32)  # this start's: form CSRF tokens
    passwords = PasswordChecker(settings.users)
    sessions = SessionStore(settings.session_hours, settings.idle_minutes)
    failures = FailureLimiter(settings.max_failures, settings.failure_window_s)
    acting = anyio.CapacityLimiter(1)  # one review action at a time, as on a single thread before
    announced: collections.OrderedDict[tuple[str, str, str], None] = collections.OrderedDict()
    bearer_digest = hashlib.sha256(settings.token.encode()).digest() if settings.token else b""
    challenge = {"WWW-Authenticate": 'Basic realm="router console", charset="UTF-8"'} if settings.users else {}

    class Refusal(Exception):
        def __init__(self, status: int, text: str, headers: dict | None = None) -> None:
            super().__init__(text)
            self.status, self.text, self.headers = status, text, headers or {}

    def address(request: Request) -> str:
        return request.client.host if request.client else "?"

    def announce(request: Request, who: str, auth: str) -> None:
        entry = (address(request), who, auth)
        if entry not in announced:
            log.info("console: %r authenticated (%s) from %s", who, auth, entry[0])
            announced[entry] = None
            if len(announced) > CLIENTS_TRACKED:
                announced.popitem(last=False)

    def failed(request: Request, auth: str, name: str, status: int = 401, text: str = "") -> Refusal:
        failures.failed(address(request))
        log.warning("console: failed %s authentication from %s (name %r)", auth, address(request),
                    name[:MAX_NAME_CHARS])
        return Refusal(status, text or "refused: wrong credentials", challenge if auth == "basic" else {})

    def throttle(request: Request) -> None:
        wait = failures.wait_s(address(request))
        if wait > 0:
            raise Refusal(429, f"refused: too many failed authentications from {address(request)}; try again in "
                               f"{math.ceil(wait)} s", {"Retry-After": str(math.ceil(wait))})

    async def password_ok(name: str, password: str) -> bool:
        return await passwords.check(name, password)

    async def operator(request: Request) -> Operator | None:
        """The operator of the request (Authorization header first, then the session cookie); Refusal for wrong
        credentials (401), a bearer without X-Operator (400) or an address with too many failures (429)."""
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and settings.token:
            throttle(request)
            digest = hashlib.sha256(value.strip().encode()).digest()
            if not hmac.compare_digest(digest, bearer_digest):
                raise failed(request, "bearer", request.headers.get("x-operator", ""))
            name = operator_name(request.headers.get("x-operator", ""))
            if name is None:
                raise Refusal(400, f"refused: a bearer request names its operator in the X-Operator header "
                                   f"(1-{MAX_NAME_CHARS} printable characters); it goes into the audit log")
            announce(request, name, "bearer")
            return Operator(name, "bearer")
        if scheme == "basic" and settings.users:
            throttle(request)
            try:
                name, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise failed(request, "basic", "") from None
            if not await password_ok(name, password):
                raise failed(request, "basic", name)
            announce(request, name, "basic")
            return Operator(name, "basic")
        sid = request.cookies.get(SESSION_COOKIE)
        session = sessions.get(sid, touch=request.url.path not in _POLLED) if settings.token else None
        return Operator(session.who, "token", session.csrf) if session else None

    def form_token(request: Request) -> str:
        """The CSRF token of the login form and basic-auth users: an HMAC of the request's form cookie."""
        value = request.cookies.get(FORM_COOKIE, "") or getattr(request.state, "form_cookie", "")
        return hmac.new(key, value.encode(), hashlib.sha256).hexdigest() if value else ""

    def set_cookie(request: Request, response, name: str, value: str, max_age: int | None = None) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")

    def page(request: Request, template: str, status: int = 200, **values) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        who = getattr(request.state, "operator", None)
        if not request.cookies.get(FORM_COOKIE):
            request.state.form_cookie = secrets.token_urlsafe(24)
        html = env.get_template(template).render({
            "title": context.title, "csrf": who.csrf if who and who.csrf else form_token(request), "operator": who,
            "nonce": nonce, "can_act": bool(settings.token or settings.users), "can_reload": context.reload is not None,
            "message": request.query_params.get("message", ""), "error": request.query_params.get("error", ""),
            "refresh_s": LIVE_REFRESH_S, "classes": context.class_names,
            "shadow_mode": context.shadow_report is not None, **values})
        response = HTMLResponse(html, status, headers=_security_headers(nonce))
        if getattr(request.state, "form_cookie", None):
            set_cookie(request, response, FORM_COOKIE, request.state.form_cookie)
        return response

    def refuse(request: Request, status: int, text: str, headers: dict | None = None):
        if "text/html" in request.headers.get("accept", ""):
            response = page(request, "refused.html", status, reason=text)
        else:
            response = PlainTextResponse(text, status, headers=_security_headers(""))
        response.headers.update(headers or {})
        return response

    def open_to(request: Request) -> bool:
        """Pages without login: a loopback client, no proxy declared, no proxy's header on the request."""
        return (not settings.trusted_proxies and is_loopback(address(request))
                and not any(h in request.headers for h in _FORWARDING))

    def reader(handler):
        """Read-only pages: open to loopback clients (no proxy); otherwise they need an operator too."""
        async def wrapped(request: Request):
            try:
                request.state.operator = await operator(request)
            except Refusal as refusal:
                return refuse(request, refusal.status, refusal.text, refusal.headers)
            if request.state.operator is None and not open_to(request):
                if settings.users:
                    return refuse(request, 401, "authentication required", challenge)
                return RedirectResponse("/login", 303)
            try:
                return await handler(request)
            except ConsoleUnavailable as error:
                headers = {"Retry-After": "2"} if error.busy else {}
                if "text/html" in request.headers.get("accept", ""):
                    response = page(request, "unavailable.html", 503, reason=str(error))
                    response.headers.update(headers)
                    return response
                return PlainTextResponse(f"unavailable: {error}", 503, headers={**_security_headers(""), **headers})
        return wrapped

    def action(handler):
        """POST actions: an operator, and the CSRF token of their session (login), that token or this console's
        Origin (basic auth) or nothing more (bearer); never another site's Origin."""
        async def wrapped(request: Request):
            if not _same_origin(request):
                return refuse(request, 403, "refused: the request comes from another site")
            if not (settings.token or settings.users):
                return refuse(request, 403, "refused: the console is read-only (no token or users configured)")
            try:
                who = await operator(request)
            except Refusal as refusal:
                return refuse(request, refusal.status, refusal.text, refusal.headers)
            request.state.operator = who
            if who is None:
                return refuse(request, 401, "refused: log in with the operators' token first", challenge)
            form = await request.form()
            given = str(form.get("csrf", ""))
            if who.auth == "token" and not _matches(who.csrf, given) or who.auth == "basic" and not (
                    _matches(form_token(request), given) or request.headers.get("origin")):
                return refuse(request, 403, "refused: the form's CSRF token does not match your session "
                                            "(reload the page and try again)")
            return await handler(request, who, form)
        return wrapped

    def drift_readings():
        """(reference, readings) for the page; (None, []) without a monitor or when it cannot be read."""
        if context.drift is None:
            return None, []
        try:
            return context.drift()
        except Exception as error:  # noqa: BLE001 - the rest of the page is still shown
            log.warning("console: could not read the drift windows: %s", error)
            return None, []

    async def read(call, *args):
        return await run_in_threadpool(call, *args)

    async def home(request: Request):
        summary, latest = await read(context.summary), await read(context.latest)
        return page(request, "home.html", summary=summary, latest=latest, drift=await read(drift_readings))

    async def live(request: Request):
        summary, latest = await read(context.summary), await read(context.latest)
        return page(request, "live.html", summary=summary, latest=latest, drift=await read(drift_readings))

    async def summary_json(request: Request):
        return JSONResponse(await read(context.summary), headers=_security_headers(""))

    async def search(request: Request):
        text = request.query_params.get("q", "")
        return page(request, "search.html", q=text, rows=await read(context.search, text))

    async def review(request: Request):
        return page(request, "review.html", rows=await read(context.review_list))

    async def shadow(request: Request):
        if context.shadow_report is None:
            return PlainTextResponse("the router runs in route mode: no shadow trial to report", 404)
        since, until = request.query_params.get("since") or None, request.query_params.get("until") or None
        try:
            report, problem = await read(context.shadow_report, since, until), ""
        except (ValueError, FileNotFoundError) as error:
            report, problem = "", str(error)
        return page(request, "shadow.html", report=report, error=problem, since=since or "", until=until or "")

    async def thumb(request: Request):
        from utils.routing.operations.review import thumb_path

        path = thumb_path(context.spool_dir, request.path_params["item"])
        if not path.is_file():
            return PlainTextResponse("no thumbnail", 404)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def login_form(request: Request):
        return page(request, "login.html")

    async def login(request: Request):
        form = await request.form()
        if not _same_origin(request) or not _matches(form_token(request), str(form.get("csrf", ""))):
            return refuse(request, 403, "refused: the form's CSRF token does not match your session "
                                        "(reload the login page and try again)")
        if not settings.token:
            return refuse(request, 403, "refused: no operators' token is configured (the console is read-only "
                                        "or uses basic auth)")
        name = str(form.get("name", ""))
        try:
            throttle(request)
        except Refusal as refusal:
            return refuse(request, refusal.status, refusal.text, refusal.headers)
        given = hashlib.sha256(str(form.get("token", "")).encode()).digest()
        if not hmac.compare_digest(given, bearer_digest):
            failed(request, "login", name)
            return page(request, "login.html", 401, failed="wrong token")
        who = operator_name(name)
        if who is None:
            return page(request, "login.html", 400,
                        failed=f"give your name (1-{MAX_NAME_CHARS} characters): it goes into the audit log")
        sessions.revoke(request.cookies.get(SESSION_COOKIE))
        sid, _ = sessions.create(who, address(request))
        log.info("console: %r logged in from %s", who, address(request))
        response = RedirectResponse("/review", 303)
        set_cookie(request, response, SESSION_COOKIE, sid, max_age=int(settings.session_hours * 3600))
        return response

    async def logout(request: Request):
        if not _same_origin(request):
            return refuse(request, 403, "refused: the request comes from another site")
        sid = request.cookies.get(SESSION_COOKIE)
        session = sessions.get(sid)
        if session is not None:
            form = await request.form()
            if not _matches(session.csrf, str(form.get("csrf", ""))):
                return refuse(request, 403, "refused: the form's CSRF token does not match your session "
                                            "(reload the page and try again)")
            sessions.revoke(sid)
            log.info("console: %r logged out from %s", session.who, address(request))
        response = RedirectResponse("/", 303)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    async def do_requeue(request: Request, who: Operator, form):
        item = request.path_params["item"]
        return await _act(lambda: context.desk.requeue(item, who=who.who, auth=who.auth))

    async def do_correct(request: Request, who: Operator, form):
        item, label = request.path_params["item"], str(form.get("label", ""))
        return await _act(lambda: context.desk.correct(item, label, who=who.who, auth=who.auth))

    async def do_reload(request: Request, who: Operator, form):
        """Read the configuration file and the model again, as SIGHUP does (RouterNode.reload); audited with the
        operator's name as the source."""
        from urllib.parse import urlencode

        if context.reload is None:
            return refuse(request, 404, "refused: this router was started without a configuration file to reload")
        log.info("console: %r asks for a reload", who.who)
        outcome = await anyio.to_thread.run_sync(context.reload, f"console:{who.who}", limiter=acting)
        if not outcome.get("reloaded"):
            return RedirectResponse("/?" + urlencode({"error": f"reload refused: {outcome.get('problem')}"}), 303)
        text = (f"reloaded: {', '.join(outcome['changed']) or 'nothing changed'}; model {outcome['model_id']}, "
                f"threshold {outcome['threshold']}")
        if outcome.get("restart_needed"):
            text += f"; needs a restart, not applied: {', '.join(outcome['restart_needed'])}"
        return RedirectResponse("/?" + urlencode({"message": text}), 303)

    async def _act(call):
        from urllib.parse import urlencode

        from utils.routing.operations.review import ReviewError

        try:
            outcome = await anyio.to_thread.run_sync(call, limiter=acting)
        except ReviewError as error:
            return RedirectResponse("/review?" + urlencode({"error": str(error)}), 303)
        return RedirectResponse("/review?" + urlencode({"message": outcome.message}), 303)

    routes = [
        Route("/", reader(home)), Route("/live", reader(live)), Route("/api/summary", reader(summary_json)),
        Route("/search", reader(search)), Route("/review", reader(review)), Route("/shadow", reader(shadow)),
        Route("/thumbs/{item:int}.jpg", reader(thumb)),
        Route("/login", login_form, methods=["GET"]), Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/items/{item:int}/requeue", action(do_requeue), methods=["POST"]),
        Route("/items/{item:int}/correct", action(do_correct), methods=["POST"]),
        Route("/reload", action(do_reload), methods=["POST"]),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_AllowedHosts, hosts=settings.hosts())])
    app.state.sessions, app.state.failures = sessions, failures
    return app


def _same_origin(request) -> bool:
    """No Origin (not a browser's cross-site form), or this console's own (the Host was checked first)."""
    from urllib.parse import urlsplit

    origin = request.headers.get("origin")
    return not origin or urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()


def _security_headers(nonce: str) -> dict[str, str]:
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    return {"Content-Security-Policy": f"default-src 'self'; script-src {script}; style-src 'unsafe-inline'; "
                                       f"img-src 'self'; frame-ancestors 'none'; form-action 'self'",
            "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store"}


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return time.strftime("%m-%d %H:%M:%S", time.localtime(timestamp))


def _ago(timestamp: float | None, now: float | None = None) -> str:
    if not timestamp:
        return "never"
    delta = (now or time.time()) - timestamp
    future = delta < 0
    delta = abs(delta)
    text = (f"{delta:.0f} s" if delta < 120 else f"{delta / 60:.0f} min" if delta < 7200 else
            f"{delta / 3600:.1f} h")
    return f"in {text}" if future else f"{text} ago"


# --- the server ----------------------------------------------------------------------------------


class Console:
    """The console's HTTP server in a thread of the router process (utils/routing/http_server.py)."""

    def __init__(self, settings: ConsoleSettings, context: ConsoleContext) -> None:
        self.settings, self.context = settings, context
        proxies = list(settings.trusted_proxies)
        # X-Forwarded-For/-Proto are believed from the declared proxies only (uvicorn's default trusts 127.0.0.1)
        self._http = ServerThread("console-http", settings.host, settings.port,
                                  tls=(settings.tls_cert, settings.tls_key) if settings.tls_cert else None,
                                  grace_s=2.0, proxy_headers=bool(proxies), forwarded_allow_ips=proxies or None)

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def server(self):
        """uvicorn's server while serving, else None."""
        return self._http.server

    def serve(self, timeout: float = 10.0) -> None:
        """Bind (OSError when the port is taken: the node does not start), then serve in a thread."""
        self._http.serve(build_app(self.settings, self.context), timeout)
        log.info("%s", self.settings.describe(self.port))

    def close(self) -> None:
        """Stop serving (requests in progress get up to 2 s)."""
        self._http.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m utils.routing.operations.console hash-password NAME``: a line for the console's users_file (argon2id)."""
    import argparse
    import getpass

    parser = argparse.ArgumentParser(prog="python -m utils.routing.operations.console", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    hashing = sub.add_parser("hash-password", help="print NAME:$argon2id$... for users_file")
    hashing.add_argument("name")
    args = parser.parse_args(argv)
    if ":" in args.name or operator_name(args.name) != args.name:
        parser.error(f"NAME must be 1-{MAX_NAME_CHARS} printable characters without ':' or surrounding spaces")
    password = getpass.getpass(f"password for {args.name}: ")
    if len(password) < 8 or password != getpass.getpass("again: "):
        print("error: passwords differ or are shorter than 8 characters")
        return 2
    print(f"{args.name}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
