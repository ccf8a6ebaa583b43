"""The router's web console: what the router did, and the review list where operators requeue and correct.

    console:                         # in the router's YAML; off without this block
      host: 127.0.0.1                # default (keys and defaults: ROUTER_CONSOLE_* in utils/constants.py)
      port: 8108
      token_env: ROUTER_CONSOLE_TOKEN   # the operators' token is read from this environment variable ...
      token_file: console.token         # ... or from this file (never written in the YAML itself)
      users_file: console.users         # optional: HTTP basic auth, lines "name:pbkdf2_sha256$..." (hash-password)
      review_days: 30                   # review copies (spool/review/) kept this long ...
      review_max_mb: 2000               # ... and at most this much
      corrections_dir: corrections      # the corrections dataset (default: <spool_dir>/corrections)

Pages, server-rendered (Jinja2, inline CSS, one small inline script that reloads the live part every few seconds;
no build step): ``/`` counts by state, label and destination, each destination's health (last success, last
error, backlog, next retry), throughput and classification latency over the last hour, the latest decisions with
thumbnail, probabilities, BodyPartExamined, who decided and where the object went; ``/search?q=`` by SOP or Study
Instance UID or Patient ID; ``/review`` the review list (utils/routing/review.py) with its actions.

Security: actions (POST only) need the token, entered once on ``/login`` with the operator's name (kept in a
signed session cookie, HttpOnly, SameSite=Strict, signed with a key made at each start), or HTTP basic auth of a
user of ``users_file``, or ``Authorization: Bearer <token>`` (scripts). Forms carry a CSRF token tied to the
session (hidden field compared with the session's); a request whose Origin is another site is refused. Without a
token or users the console is read-only. Reading pages needs no login while the console listens on a loopback
address only; on any other address every page (they show patient IDs and images) needs the same authentication.
Responses carry a Content-Security-Policy (scripts only with the page's nonce, no framing).

The console runs in a thread of the router process (uvicorn on a socket the node binds at start, so a taken port
fails the start), reads the queue through its own read-only SQLite connection and stops first when the router
stops. starlette, uvicorn, jinja2 and python-multipart are imported only when the console is configured.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils import constants
from utils.config import ConfigError, check_value, refuse_unknown_keys

log = logging.getLogger(__name__)

PREFIX = "ROUTER_CONSOLE_"  # the constants of the block's keys (the key is the name without the prefix)
_KEYS = {"host", "port", "token_env", "token_file", "users_file", "review_days", "review_max_mb", "corrections_dir"}
_PACKAGES = {"starlette": "starlette", "uvicorn": "uvicorn", "jinja2": "jinja2", "python_multipart": "python-multipart"}
MIN_TOKEN_CHARS = 16  # a shorter token is refused (guessable)
HASH_ITERATIONS = 200_000  # pbkdf2_sha256 iterations of hash-password (verified once per process and password)
SESSION_HOURS = 8  # an operator's login lasts this long
LATEST = 30  # decisions on the front page
LISTED = 200  # rows of the review list and of a search at most
LIVE_REFRESH_S = 3  # the front page reloads its live part this often
TEMPLATES = Path(__file__).parent / "templates" / "console"


@dataclass(frozen=True)
class ConsoleSettings:
    """The ``console`` block, checked; the token and users are read at load and never printed or audited."""

    host: str = constants.ROUTER_CONSOLE_HOST
    port: int = constants.ROUTER_CONSOLE_PORT
    token_env: str = constants.ROUTER_CONSOLE_TOKEN_ENV
    token_file: Path | None = None
    users_file: Path | None = None
    review_days: float = constants.ROUTER_CONSOLE_REVIEW_DAYS
    review_max_mb: int = constants.ROUTER_CONSOLE_REVIEW_MAX_MB
    corrections_dir: Path | None = None  # None: <spool_dir>/corrections
    token: str | None = field(default=None, repr=False, compare=False)
    users: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # name -> pbkdf2 hash

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "token_env": self.token_env,
                "token_file": str(self.token_file) if self.token_file else None,
                "users_file": str(self.users_file) if self.users_file else None, "review_days": self.review_days,
                "review_max_mb": self.review_max_mb,
                "corrections_dir": str(self.corrections_dir) if self.corrections_dir else None}

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def describe(self, port: int | None = None) -> str:
        who = ([f"token ({'file ' + str(self.token_file) if self.token_file else '$' + self.token_env})"]
               if self.token else []) + ([f"{len(self.users)} users (basic auth)"] if self.users else [])
        actions = "actions need " + " or ".join(who) if who else (
            f"read-only: no token (set ${self.token_env} or token_file) and no users_file")
        reads = "pages open on loopback" if self.loopback else "every page needs authentication"
        return f"web console on http://{self.host}:{self.port if port is None else port}/ ({actions}; {reads})"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_settings(raw: Any, base: Path, where: str) -> ConsoleSettings:
    """The ``console`` mapping -> settings; ConfigError naming the key, or the pip command for what is missing."""
    where = f"{where}: console"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping (host, port, token_env, ...), got {type(raw).__name__}")
    refuse_unknown_keys(raw, _KEYS, where)
    values: dict[str, Any] = {}
    for key in ("host", "port", "token_env", "review_days", "review_max_mb"):
        name = PREFIX + key.upper()
        value, default = raw.get(key, getattr(constants, name)), getattr(constants, name)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, type(default)):
            raise ConfigError(f"{where}.{key}: expected {type(default).__name__}, got {type(value).__name__} {value!r}")
        check_value(name, value, f"{where}.{key}")
        values[key] = value.strip() if isinstance(value, str) else value
    if not values["host"]:
        raise ConfigError(f"{where}.host: expected an address to listen on (e.g. 127.0.0.1)")
    paths = {}
    for key in ("token_file", "users_file", "corrections_dir"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{where}.{key}: expected a path, got {value!r}")
        paths[key] = None if value is None else _path(value, base)
    token = _read_token(paths["token_file"], values["token_env"], where)
    users = _read_users(paths["users_file"], where) if paths["users_file"] else {}
    missing = [pip for module, pip in _PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"{where}: the console needs {' '.join(missing)} (pip install {' '.join(missing)}); "
                          f"install them or remove the console block")
    return ConsoleSettings(**values, **paths, token=token, users=users)


def _path(value: str, base: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def _read_token(token_file: Path | None, env: str, where: str) -> str | None:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"{where}.token_file: cannot read {token_file}: {error}") from error
        what = f"{where}.token_file {token_file}"
    else:
        token, what = os.environ.get(env, "").strip(), f"environment variable {env}"
    if not token:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"{what}: the console's token must have at least {MIN_TOKEN_CHARS} characters "
                          f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return token


def _read_users(path: Path, where: str) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ConfigError(f"{where}.users_file: cannot read {path}: {error}") from error
    users = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, hashed = line.strip().partition(":")
        if not name or not hashed.startswith("pbkdf2_sha256$") or len(hashed.split("$")) != 4:
            raise ConfigError(f"{where}.users_file {path}, line {number}: expected name:pbkdf2_sha256$... "
                              f"(python -m utils.routing.console hash-password NAME)")
        users[name] = hashed
    return users


def hash_password(password: str, iterations: int = HASH_ITERATIONS) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def check_password(password: str, hashed: str) -> bool:
    try:
        _, iterations, salt, digest = hashed.split("$")
        computed = hashlib.pbkdf2_hmac("sha256", password.encode(), bytes.fromhex(salt), int(iterations))
    except ValueError:
        return False
    return hmac.compare_digest(computed.hex(), digest)


# --- what the console reads --------------------------------------------------------------------


@dataclass
class ConsoleContext:
    """What the pages show and the actions use, without the web layer: the spool (read-only SQLite), the model's
    classes, the destinations, the forwarders (health), the model's state and the review desk (actions)."""

    spool_dir: Path
    class_names: Sequence[str]
    destinations: dict  # route -> utils.routing.config.Destination
    desk: Any  # utils.routing.review.ReviewDesk
    forwarders: Sequence = ()
    model: Callable[[], tuple[str, str]] = lambda: ("", "")  # (model id, state)
    title: str = "router"
    shadow_report: Callable[[str | None, str | None], str] | None = None  # (since, until) -> HTML; shadow mode only

    def node_of(self, route: str) -> str:
        destination = self.destinations.get(route)
        return destination.node if destination is not None else ""

    def _read(self, reader: Callable, attempts: int = 5) -> Any:
        """``reader(db)`` on a read-only connection; a busy or locked database (the router starting, SQLite
        recovering its WAL after a crash, a checkpoint) is asked again a few times before the error reaches the
        page."""
        import sqlite3

        from utils.routing.review import read_only

        for attempt in range(attempts):
            try:
                db = read_only(self.spool_dir)
                try:
                    return reader(db)
                finally:
                    db.close()
            except sqlite3.OperationalError as error:
                if attempt == attempts - 1:
                    raise
                log.info("console: the spool database is busy (%s); reading again", error)
                time.sleep(0.1 * (attempt + 1))

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """Counts by state, label and destination; per destination: health; the last hour in 5-minute bins."""
        now = time.time() if now is None else now
        hour = now - 3600

        def read(db):
            states = dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
            labels = dict(db.execute("SELECT label, COUNT(*) FROM items WHERE label != '' GROUP BY label"))
            routes = db.execute("SELECT route, COUNT(*), SUM(state = 'classified'), SUM(state = 'failed'),"
                                " MIN(CASE WHEN state = 'classified' AND attempts > 0 THEN next_attempt END)"
                                " FROM items WHERE route != '' GROUP BY route").fetchall()
            recent = db.execute("SELECT received_at, classified_at, state, updated_at FROM items"
                                " WHERE received_at >= ?", (hour,)).fetchall()
            return states, labels, routes, recent

        states, labels, routes, recent = self._read(read)
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

    def rows(self, condition: str = "1", parameters: Sequence = (), limit: int = LATEST) -> list[dict[str, Any]]:
        """Items (newest first) as the pages show them."""
        from utils.routing.review import review_path, thumb_path

        def read(db):
            return db.execute(f"SELECT * FROM items WHERE {condition} ORDER BY id DESC LIMIT ?",
                              (*parameters, limit)).fetchall()

        out = []
        for row in self._read(read):
            item = dict(row)
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
        return self.rows("sop_instance_uid = ? OR study_instance_uid = ? OR patient_id = ?", (text,) * 3, LISTED)

    def review_list(self) -> list[dict[str, Any]]:
        from utils.routing.review import REVIEW_CONDITION

        return self.rows(REVIEW_CONDITION, (), LISTED)


def _quantile(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


# --- the web application -------------------------------------------------------------------------


@dataclass(frozen=True)
class Operator:
    """Who is asking: a name, how they proved it, and whether their request needs a CSRF token (cookies and basic
    auth are sent by the browser on its own; a bearer token is not)."""

    who: str
    auth: str  # "token" (login form), "basic", "bearer"
    needs_csrf: bool


def build_app(settings: ConsoleSettings, context: ConsoleContext):
    """The Starlette application of the console."""
    import jinja2
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Route

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["when"] = _when
    env.filters["ago"] = lambda t, now=None: _ago(t, now)
    env.filters["seconds"] = lambda s: "-" if s is None else f"{s:.2f} s"
    verified: dict[tuple[str, str], bool] = {}  # (user, sha256 of the password) -> checked, so pbkdf2 runs once

    def operator(request: Request) -> Operator | None:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and settings.token:
            if hmac.compare_digest(value.strip().encode(), settings.token.encode()):
                return Operator("token", "bearer", False)
            return None
        if scheme.lower() == "basic" and settings.users:
            try:
                name, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            key = (name, hashlib.sha256(password.encode()).hexdigest())
            if key not in verified:
                verified[key] = name in settings.users and check_password(password, settings.users[name])
            return Operator(name, "basic", True) if verified[key] else None
        who = request.session.get("who")
        if who and settings.token and request.session.get("token") == _token_mark(settings.token):
            return Operator(who, "token", True)
        return None

    def csrf_token(request: Request) -> str:
        if "csrf" not in request.session:
            request.session["csrf"] = secrets.token_urlsafe(32)
        return request.session["csrf"]

    def page(request: Request, template: str, status: int = 200, **values) -> HTMLResponse:
        nonce = secrets.token_urlsafe(16)
        html = env.get_template(template).render({
            "title": context.title, "csrf": csrf_token(request), "operator": operator(request), "nonce": nonce,
            "can_act": bool(settings.token or settings.users), "message": request.query_params.get("message", ""),
            "error": request.query_params.get("error", ""), "refresh_s": LIVE_REFRESH_S,
            "classes": context.class_names, "shadow_mode": context.shadow_report is not None, **values})
        return HTMLResponse(html, status, headers=_security_headers(nonce))

    def reader(handler):
        """Read-only pages: open on loopback; elsewhere they need an operator too."""
        async def wrapped(request: Request):
            if not settings.loopback and operator(request) is None:
                if settings.users:
                    return PlainTextResponse("authentication required", 401,
                                             headers={"WWW-Authenticate": 'Basic realm="router console"'})
                return RedirectResponse("/login", 303)
            return await handler(request)
        return wrapped

    async def refuse(request: Request, status: int, text: str):
        if "text/html" in request.headers.get("accept", ""):
            return page(request, "refused.html", status, reason=text)
        return PlainTextResponse(text, status, headers=_security_headers(""))

    def action(handler):
        """POST actions: an operator, the CSRF token of their session, and no other site's Origin."""
        async def wrapped(request: Request):
            if not _same_origin(request):
                return await refuse(request, 403, "refused: the request comes from another site")
            if not (settings.token or settings.users):
                return await refuse(request, 403, "refused: the console is read-only (no token or users configured)")
            who = operator(request)
            if who is None:
                headers = {"WWW-Authenticate": 'Basic realm="router console"'} if settings.users else {}
                response = await refuse(request, 401, "refused: log in with the operators' token first")
                response.headers.update(headers)
                return response
            form = await request.form()
            if who.needs_csrf and not hmac.compare_digest(str(form.get("csrf", "")).encode(),
                                                          str(request.session.get("csrf", "")).encode()):
                return await refuse(request, 403, "refused: the form's CSRF token does not match your session "
                                                  "(reload the page and try again)")
            return await handler(request, who, form)
        return wrapped

    async def home(request: Request):
        return page(request, "home.html", summary=context.summary(), latest=context.latest())

    async def live(request: Request):
        return page(request, "live.html", summary=context.summary(), latest=context.latest())

    async def summary_json(request: Request):
        return JSONResponse(context.summary(), headers=_security_headers(""))

    async def search(request: Request):
        text = request.query_params.get("q", "")
        return page(request, "search.html", q=text, rows=context.search(text))

    async def review(request: Request):
        return page(request, "review.html", rows=context.review_list())

    async def shadow(request: Request):
        if context.shadow_report is None:
            return PlainTextResponse("the router runs in route mode: no shadow trial to report", 404)
        since, until = request.query_params.get("since") or None, request.query_params.get("until") or None
        try:
            report, problem = context.shadow_report(since, until), ""
        except (ValueError, FileNotFoundError) as error:
            report, problem = "", str(error)
        return page(request, "shadow.html", report=report, error=problem, since=since or "", until=until or "")

    async def thumb(request: Request):
        from utils.routing.review import thumb_path

        path = thumb_path(context.spool_dir, request.path_params["item"])
        if not path.is_file():
            return PlainTextResponse("no thumbnail", 404)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def login_form(request: Request):
        return page(request, "login.html")

    async def login(request: Request):
        form = await request.form()
        if not _same_origin(request) or not hmac.compare_digest(str(form.get("csrf", "")).encode(),
                                                                 str(request.session.get("csrf", "")).encode()):
            return await refuse(request, 403, "refused: the form's CSRF token does not match your session")
        name = str(form.get("name", "")).strip()
        token = str(form.get("token", ""))
        if not settings.token or not hmac.compare_digest(token.encode(), settings.token.encode()):
            log.warning("console: a login with a wrong token (name %r)", name[:64])
            return page(request, "login.html", 401, failed="wrong token")
        if not name or len(name) > 64 or not name.isprintable():
            return page(request, "login.html", 400, failed="give your name (1-64 characters): it goes into the audit log")
        request.session.update(who=name, token=_token_mark(settings.token), csrf=secrets.token_urlsafe(32))
        return RedirectResponse("/review", 303)

    async def logout(request: Request):
        request.session.clear()
        return RedirectResponse("/", 303)

    async def do_requeue(request: Request, who: Operator, form):
        return _act(lambda: context.desk.requeue(request.path_params["item"], who=who.who, auth=who.auth))

    async def do_correct(request: Request, who: Operator, form):
        label = str(form.get("label", ""))
        return _act(lambda: context.desk.correct(request.path_params["item"], label, who=who.who, auth=who.auth))

    def _act(call):
        from urllib.parse import urlencode

        from utils.routing.review import ReviewError

        try:
            outcome = call()
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
    ]
    middleware = [Middleware(SessionMiddleware, secret_key=secrets.token_hex(32), session_cookie="router_console",
                             max_age=SESSION_HOURS * 3600, same_site="strict", https_only=False)]
    return Starlette(routes=routes, middleware=middleware)


def _token_mark(token: str) -> str:
    """What the session keeps of the token: a hash (a new token logs everyone out)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def _same_origin(request) -> bool:
    """No Origin (not a browser's cross-site form), or this console's own."""
    from urllib.parse import urlsplit

    origin = request.headers.get("origin")
    return not origin or urlsplit(origin).netloc == request.headers.get("host", "")


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
    """The console's HTTP server in a thread of the router process."""

    def __init__(self, settings: ConsoleSettings, context: ConsoleContext) -> None:
        self.settings, self.context = settings, context
        self.server = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._socket.getsockname()[1]

    def serve(self, timeout: float = 10.0) -> None:
        """Bind (OSError when the port is taken: the node does not start), then serve in a thread."""
        import uvicorn

        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        config = uvicorn.Config(build_app(self.settings, self.context), log_level="warning", access_log=False,
                                lifespan="off", server_header=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="console-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        log.info("%s", self.settings.describe(self.port))

    def close(self) -> None:
        """Stop serving (requests in progress get up to 2 s)."""
        if self.server is None:
            return
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()
        self.server = None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m utils.routing.console hash-password NAME``: a line for the console's users_file."""
    import argparse
    import getpass

    parser = argparse.ArgumentParser(prog="python -m utils.routing.console", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    hashing = sub.add_parser("hash-password", help="print NAME:pbkdf2_sha256$... for users_file")
    hashing.add_argument("name")
    args = parser.parse_args(argv)
    if ":" in args.name or not args.name.strip():
        parser.error("NAME must not be empty or contain ':'")
    password = getpass.getpass(f"password for {args.name}: ")
    if len(password) < 8 or password != getpass.getpass("again: "):
        print("error: passwords differ or are shorter than 8 characters")
        return 2
    print(f"{args.name}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
