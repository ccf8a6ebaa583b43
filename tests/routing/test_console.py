"""The web console (utils/routing/operations/console.py) and the review loop (utils/routing/operations/review.py): the ``console`` block is
checked; a node with the console keeps thumbnails and review copies; the review desk requeues and corrects without
the web layer (the object reaches the corrected label's destination, the audit log and a corrections dataset that
prepare.py reads); the app (Starlette's TestClient) shows what the queue holds and refuses actions without the
token, without the session's CSRF token or from another site."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from utils.config import ConfigError
from utils.routing import queue as q
from utils.routing.operations.audit import read_audit
from utils.routing.operations.config import from_dict
from utils.routing.operations.review import ReviewError, review_path, thumb_path

from .conftest import CLASSES, ROWS_BY_CLASS, UNCERTAIN_ROWS, bright_rows_image, everywhere, send, wait_for

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("jinja2")
pytest.importorskip("python_multipart")
pytest.importorskip("httpx2")  # Starlette's TestClient

TOKEN = "test-token-0123456789abcdef"
LOCAL = ("127.0.0.1", 50000)  # the TestClient's client address: a loopback one (pages open without login)
TIMEOUT = 60


def config(console, **extra):
    return from_dict({"model": "m.keras", "destinations": {c: {"folder": c} for c in (*CLASSES, "uncertain")},
                      "console": console, **extra}, base=Path("/tmp/router"))


def test_console_block_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("ROUTER_CONSOLE_TOKEN", raising=False)
    assert config(None).console is None
    plain = config({})
    assert plain.console.host == "127.0.0.1" and plain.console.token is None and plain.console.loopback
    assert plain.console.corrections_dir == plain.spool_dir / "corrections"
    assert "read-only" in plain.console.describe()
    with pytest.raises(ConfigError, match="console: unknown key 'tokn'"):
        config({"tokn": "x"})
    with pytest.raises(ConfigError, match="console.port"):
        config({"port": 70000})
    with pytest.raises(ConfigError, match="console.review_days"):
        config({"review_days": 0})
    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        config({})
    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", "ab" * 12)  # long, but two letters
    with pytest.raises(ConfigError, match="too easy to guess: it has 2 distinct characters, at least 8"):
        config({})
    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", "0123456789012345678")  # digits only: ~63 bits
    with pytest.raises(ConfigError, match="about 63 bits, at least 64"):
        config({})
    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", TOKEN)
    settings = config({"host": "0.0.0.0"}).console
    assert settings.token == TOKEN and not settings.loopback
    assert "every other needs authentication" in settings.describe()
    assert {"localhost", "127.0.0.1", "::1"} <= settings.hosts() and "0.0.0.0" not in settings.hosts()
    proxied = config({"allowed_hosts": ["Router.Example.ORG", "[::1]"], "trusted_proxies": ["10.0.0.0/8"]}).console
    assert proxied.hosts() == {"router.example.org", "::1"} and "behind a proxy" in proxied.describe()
    for bad in ({"allowed_hosts": ["*"]}, {"allowed_hosts": ["evil.example:80"]}, {"trusted_proxies": ["proxy"]},
                {"idle_minutes": 0}, {"max_failures": 0}, {"tls": {"cert": "missing.crt", "key": "missing.key"}}):
        with pytest.raises(ConfigError, match=f"console.{next(iter(bad))}"):
            config(bad)
    token_file = tmp_path / "console.token"
    token_file.write_text("from-a-file-0123456789\n")
    users = tmp_path / "users"
    from utils.routing.operations.console import check_password, hash_password, pbkdf2_hash

    line = "alice:" + hash_password("correct horse", time_cost=1, memory_kib=1024)
    assert line.startswith("alice:$argon2id$")
    users.write_text(f"# operators\n{line}\nolder:{pbkdf2_hash('battery staple', iterations=1000)}\n")
    settings = config({"token_file": str(token_file), "users_file": str(users)}).console
    assert settings.token == "from-a-file-0123456789" and check_password("correct horse", settings.users["alice"])
    assert check_password("battery staple", settings.users["older"])  # files of before argon2 still work
    assert not check_password("battery staple", settings.users["alice"])
    assert TOKEN not in repr(settings) and "from-a-file" not in str(config({"token_file": str(token_file)}).to_dict())
    users.write_text("bob:plaintext\n")
    with pytest.raises(ConfigError, match="line 1"):
        config({"users_file": str(users)})


def write_image(path, rows, body_part, patient):
    from utils.io.dicom_writer import write_dicom

    return write_dicom(path, bright_rows_image(rows), body_part=body_part, patient_id=patient, bits_stored=12)


@pytest.fixture
def console_node(router, peers, tmp_path, monkeypatch):
    """A node with the console on port 0 (token set) and four objects delivered or failed: (node, items by kind,
    spine's peer). A refusing peer for ``others``."""
    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", TOKEN)
    good, refusing = peers("GOOD"), peers("REFUSING", status=0xA700)
    spine = peers("SPINE")
    destinations = {**everywhere(good), "spine": spine.node(),
                    "others": refusing.node()}
    node = router(destinations, console={"port": 0}, max_attempts=1)
    files = {"uncertain": write_image(tmp_path / "u.dcm", UNCERTAIN_ROWS, "CHEST", "PAT-U"),
             "disagrees": write_image(tmp_path / "d.dcm", ROWS_BY_CLASS["abdominal"], "CHEST", "PAT-D"),
             "agrees": write_image(tmp_path / "a.dcm", ROWS_BY_CLASS["adult_chest"], "CHEST", "PAT-A"),
             "failed": write_image(tmp_path / "f.dcm", ROWS_BY_CLASS["others"], "", "PAT-F")}
    assert send(node.port, list(files.values())) == [0] * len(files)
    wait_for(lambda: sum(node.queue.counts().get(s, 0) for s in (q.FORWARDED, q.FAILED)) == len(files), TIMEOUT,
             "every object to be delivered or failed")
    items = {name: node.queue.rows_where("sop_instance_uid = ?", [_uid(path)])[0] for name, path in files.items()}
    return node, items, spine


def _uid(path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_classification_fills_the_console_columns_and_keeps_review_copies(console_node):
    node, items, _ = console_node
    uncertain, disagrees, agrees, failed = (items[k] for k in ("uncertain", "disagrees", "agrees", "failed"))
    assert uncertain.label == "uncertain" and disagrees.tag_disagrees == 1 and agrees.tag_disagrees == 0
    assert failed.state == q.FAILED and failed.tag_disagrees is None  # no tag
    assert agrees.patient_id == "PAT-A" and agrees.body_part_examined == "CHEST" and agrees.study_instance_uid
    assert set(json.loads(agrees.probs)) == set(CLASSES)
    spool = node.config.spool_dir
    assert all(thumb_path(spool, i.id).read_bytes()[:2] == b"\xff\xd8" for i in items.values())  # JPEG
    assert review_path(spool, uncertain.id).is_file() and review_path(spool, disagrees.id).is_file()
    assert not review_path(spool, agrees.id).exists()  # nothing to review: no copy
    assert not node.queue.path(uncertain).exists()  # forwarded: the spool file is gone, the review copy stays


def test_review_desk_corrects_and_requeues_without_the_web_layer(console_node):
    from utils.data.prepare import list_source

    node, items, spine = console_node
    desk = node.console.context.desk
    uncertain, disagrees, failed = items["uncertain"], items["disagrees"], items["failed"]
    with pytest.raises(ReviewError, match="not one of the model's classes"):
        desk.correct(uncertain.id, "uncertain", who="alice")
    with pytest.raises(ReviewError, match="no object"):
        desk.correct(10_000, "spine", who="alice")
    outcome = desk.correct(uncertain.id, "spine", who="alice", auth="token")
    wait_for(lambda: uncertain.sop_instance_uid in spine.received, TIMEOUT, "the correction to reach spine")
    assert node.queue.get(outcome.new_item).decided_by == "review:alice"
    assert node.queue.get(uncertain.id).reviewed == "corrected"
    outcome = desk.correct(failed.id, "spine", who="bob")  # a failed object: re-routed in place
    assert outcome.new_item == failed.id
    wait_for(lambda: failed.sop_instance_uid in spine.received, TIMEOUT, "the failed object to reach spine")
    labels = node.config.console.corrections_dir / "labels.csv"
    rows = list(csv.DictReader(labels.open()))
    assert [(r["sop_instance_uid"], r["label"], r["group"], r["previous_label"], r["who"]) for r in rows] == [
        (uncertain.sop_instance_uid, "spine", "PAT-U", "uncertain", "alice"),
        (failed.sop_instance_uid, "spine", "PAT-F", "others", "bob")]
    desk.correct(uncertain.id, "abdominal", who="alice")  # a second correction replaces the row
    listing = list_source(labels, CLASSES)
    assert sorted((i.label, i.group) for i in listing.items) == [("abdominal", "PAT-U"), ("spine", "PAT-F")]
    assert not listing.rejects
    audit = [r for r in read_audit(node.config.audit_log) if r["event"] == "corrected"]
    assert [(r["sop_instance_uid"], r["label"], r["previous_label"], r["who"]) for r in audit] == [
        (uncertain.sop_instance_uid, "spine", "uncertain", "alice"), (failed.sop_instance_uid, "spine", "others", "bob"),
        (uncertain.sop_instance_uid, "abdominal", "uncertain", "alice")]
    outcome = desk.requeue(disagrees.id, who="carol")  # delivered: classified again as a new row
    wait_for(lambda: node.queue.get(outcome.new_item).state == q.FORWARDED, TIMEOUT, "the requeued object")
    assert node.queue.get(outcome.new_item).label == "abdominal"
    requeued = [r for r in read_audit(node.config.audit_log) if r["event"] == "requeued"]
    assert requeued[0]["who"] == "carol" and requeued[0]["item"] == disagrees.id
    records = read_audit(node.config.audit_log)  # new rows have their lines, as every row (nothing to reconcile)
    new_rows = {r["new_item"] for r in records if r["event"] in ("corrected", "requeued")} - {failed.id}
    assert new_rows <= {r["item"] for r in records if r["event"] == "received" and r.get("source") == "review"}
    assert new_rows <= {r["item"] for r in records if r["event"] == "classified"}
    with pytest.raises(ReviewError, match="no copy"):
        desk.requeue(items["agrees"].id, who="carol")


def test_confirming_the_label_an_object_was_forwarded_by_does_not_forward_it_again(console_node):
    node, items, _ = console_node
    desk = node.console.context.desk
    disagrees = items["disagrees"]  # the model said abdominal (forwarded to GOOD), the tag says CHEST
    assert disagrees.label == "abdominal" and disagrees.state == q.FORWARDED
    good = desk.destinations["abdominal"].node
    rows = node.queue.max_id()
    outcome = desk.correct(disagrees.id, "abdominal", who="alice", auth="token")
    assert outcome.new_item == disagrees.id and "not forwarded again (already forwarded to " + good in outcome.message
    assert node.queue.max_id() == rows and node.queue.get(disagrees.id).reviewed == "corrected"  # no new row
    [line] = [r for r in read_audit(node.config.audit_log) if r["event"] == "corrected"]
    assert (line["confirmed"], line["forwarded"], line["destination"], line["label"]) == (True, False, good,
                                                                                         "abdominal")
    labels = list(csv.DictReader((node.config.console.corrections_dir / "labels.csv").open()))
    assert [(r["sop_instance_uid"], r["label"]) for r in labels] == [(disagrees.sop_instance_uid, "abdominal")]
    outcome = desk.correct(disagrees.id, "spine", who="alice")  # another destination: forwarded there
    assert outcome.new_item > rows and "forwarded to" in outcome.message


def test_app_shows_the_queue_and_refuses_actions_without_token_or_csrf(console_node):
    from starlette.testclient import TestClient

    from utils.routing.operations.console import build_app

    node, items, spine = console_node
    uncertain = items["uncertain"]
    app = build_app(node.config.console, node.console.context)
    client = TestClient(app, base_url="http://127.0.0.1", client=LOCAL)
    home = client.get("/")
    assert home.status_code == 200 and 'data-count-state="forwarded">3<' in home.text
    assert "nonce-" in home.headers["content-security-policy"] and home.headers["x-frame-options"] == "DENY"
    assert client.get("/api/summary").json()["states"] == {"forwarded": 3, "failed": 1}
    assert client.get(f"/thumbs/{uncertain.id}.jpg").headers["content-type"] == "image/jpeg"
    found = client.get("/search", params={"q": "PAT-U"}).text
    assert uncertain.sop_instance_uid in found and items["agrees"].sop_instance_uid not in found
    review = client.get("/review").text
    assert {f'data-item="{items[k].id}"' in review for k in ("uncertain", "disagrees", "failed")} == {True}
    assert f'data-item="{items["agrees"].id}"' not in review
    csrf = re.search(r'name="csrf" value="([^"]+)"', review).group(1)

    url = f"/items/{uncertain.id}/correct"
    refused = client.post(url, data={"label": "spine", "csrf": csrf}, follow_redirects=False)
    assert refused.status_code == 401  # no token yet
    assert client.post("/login", data={"name": "alice", "token": "wrong" * 5, "csrf": csrf}).status_code == 401
    assert client.post("/login", data={"name": "alice", "token": TOKEN}).status_code == 403  # no CSRF token
    assert client.post("/login", data={"name": "alice", "token": TOKEN, "csrf": csrf},
                       follow_redirects=False).status_code == 303
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/review").text).group(1)  # renewed at login
    assert client.post(url, data={"label": "spine", "csrf": "forged"}).status_code == 403
    assert client.post(url, data={"label": "spine", "csrf": csrf},
                       headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.get(url).status_code == 405  # POST only
    assert "corrected" not in {r["event"] for r in read_audit(node.config.audit_log)}  # nothing was done so far
    done = client.post(url, data={"label": "spine", "csrf": csrf}, follow_redirects=False)
    assert done.status_code == 303 and "corrected+to+spine" in done.headers["location"]
    wait_for(lambda: uncertain.sop_instance_uid in spine.received, TIMEOUT, "the correction to reach spine")
    corrected = [r for r in read_audit(node.config.audit_log) if r["event"] == "corrected"]
    assert corrected[0]["who"] == "alice" and corrected[0]["auth"] == "token"

    bearer = TestClient(app, base_url="http://127.0.0.1", headers={"Authorization": f"Bearer {TOKEN}"})
    url = f"/items/{items['disagrees'].id}/requeue"
    assert bearer.post(url, follow_redirects=False).status_code == 400  # who is acting?
    assert bearer.post(url, headers={"X-Operator": "cron"}, follow_redirects=False).status_code == 303
    requeued = [r for r in read_audit(node.config.audit_log) if r["event"] == "requeued"]
    assert requeued[-1]["who"] == "cron" and requeued[-1]["auth"] == "bearer"
    wrong = TestClient(app, base_url="http://127.0.0.1", headers={"Authorization": "Bearer nope", "X-Operator": "x"})
    assert wrong.post(url, follow_redirects=False).status_code == 401


def test_pages_need_authentication_away_from_loopback(console_node):
    import base64
    import dataclasses

    from starlette.testclient import TestClient

    from utils.routing.operations.console import build_app, hash_password

    node, items, _ = console_node
    settings = dataclasses.replace(node.config.console, host="0.0.0.0", allowed_hosts=("10.0.0.2",),
                                   users={"dana": hash_password("s3cret-pass", time_cost=1, memory_kib=1024)})
    client = TestClient(build_app(settings, node.console.context), base_url="http://10.0.0.2:8108")
    assert client.get("/").status_code == 401  # users configured: a basic auth challenge
    auth = {"Authorization": "Basic " + base64.b64encode(b"dana:s3cret-pass").decode()}
    page = client.get("/review", headers=auth)
    assert page.status_code == 200 and "dana" in page.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    url = f"/items/{items['failed'].id}/requeue"
    assert client.post(url, headers=auth).status_code == 403  # basic auth is sent by the browser: CSRF needed
    assert client.post(url, data={"csrf": csrf}, headers=auth, follow_redirects=False).status_code == 303
    record = [r for r in read_audit(node.config.audit_log) if r["event"] == "requeued"][-1]
    assert record["who"] == "dana" and record["auth"] == "basic" and record["state"] == q.FAILED


def test_the_example_console_block_loads(monkeypatch):
    """router.example.yaml shows the console block commented out: uncommented, it loads."""
    import yaml

    monkeypatch.delenv("ROUTER_CONSOLE_TOKEN", raising=False)
    text = (Path(__file__).resolve().parents[2] / "router.example.yaml").read_text()
    block = text[text.index("# console:"):].split("\n\n")[0]
    raw = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))
    assert config(raw["console"]).console.port == 8108


def test_in_shadow_mode_a_correction_is_recorded_not_forwarded_and_the_trial_has_its_page(router, peers, tmp_path,
                                                                                          monkeypatch):
    """A shadow trial must send nothing live: a correction goes to the corrections dataset and the audit log (which
    the shadow report reads), no new row is queued; the console shows the report on /shadow."""
    from starlette.testclient import TestClient

    from utils.routing.operations.console import build_app

    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", TOKEN)
    pacs, spine = peers("PACS"), peers("SPINE")
    destinations = {**everywhere(spine), "pacs": pacs.node()}
    node = router(destinations, console={"port": 0}, mode="shadow", shadow={"destination": "pacs"})
    path = write_image(tmp_path / "u.dcm", UNCERTAIN_ROWS, "CHEST", "PAT-U")
    assert send(node.port, [path]) == [0]
    uid = _uid(path)
    wait_for(lambda: uid in pacs.received, TIMEOUT, "the object to reach the shadow rule's destination")
    (item,) = node.queue.rows_where("sop_instance_uid = ?", [uid])
    assert item.label == "uncertain" and item.route == "pacs"
    rows_before = node.queue.max_id()
    outcome = node.console.context.desk.correct(item.id, "spine", who="alice")
    assert outcome.new_item == item.id and "not forwarded" in outcome.message
    assert node.queue.max_id() == rows_before and uid not in spine.received  # nothing queued, nothing sent
    (line,) = [r for r in read_audit(node.config.audit_log) if r["event"] == "corrected"]
    assert (line["label"], line["previous_label"], line["forwarded"], line["route"]) == ("spine", "uncertain", False,
                                                                                        None)
    labels = node.config.console.corrections_dir / "labels.csv"
    assert [(r["sop_instance_uid"], r["label"]) for r in csv.DictReader(labels.open())] == [(uid, "spine")]

    client = TestClient(build_app(node.config.console, node.console.context), base_url="http://127.0.0.1",
                        client=LOCAL)
    assert 'href="/shadow"' in client.get("/").text
    page = client.get("/shadow")
    assert page.status_code == 200 and "<table>" in page.text and "Shadow trial" in page.text
    assert client.get("/shadow", params={"since": "not a date"}).status_code == 200  # the error is shown, not a 500
    assert "not a date" in client.get("/shadow", params={"since": "not a date"}).text


def test_a_busy_spool_database_is_read_again_not_a_server_error(tmp_path, monkeypatch):
    """The router starting, or SQLite recovering its WAL after a crash, can refuse a reader for a moment: read again
    once, then ConsoleUnavailable (the pages answer 503), never a wait of tens of seconds."""
    import sqlite3

    from utils.routing.operations.console import ConsoleContext, ConsoleUnavailable

    q.SpoolQueue(tmp_path).close()
    opened, real = [], q.read_only

    def flaky(spool_dir):
        opened.append(spool_dir)
        if len(opened) <= 1:
            raise sqlite3.OperationalError("database is locked")
        return real(spool_dir)

    monkeypatch.setattr(q, "read_only", flaky)
    context = ConsoleContext(tmp_path, CLASSES, {}, desk=None)
    assert context.summary()["total"] == 0 and len(opened) == 2
    monkeypatch.setattr(q, "read_only", lambda spool_dir: (_ for _ in ()).throw(
        sqlite3.OperationalError("database is locked")))
    with pytest.raises(ConsoleUnavailable, match="the spool database is busy") as busy:
        context.summary()  # not forever
    assert busy.value.busy
    monkeypatch.setattr(q, "read_only", lambda spool_dir: (_ for _ in ()).throw(sqlite3.OperationalError("x")))
    with pytest.raises(ConsoleUnavailable, match="cannot be read: x"):
        context.summary()


# --- attacks on the console: each was tried against the console before it was closed ---------------------------


class FakeDesk:
    """The review desk without a router: records who did what."""

    def __init__(self):
        self.done = []

    def requeue(self, item, *, who, auth=""):
        from utils.routing.operations.review import Outcome

        self.done.append(("requeue", item, who, auth))
        return Outcome(item, item, f"requeued {item}")

    def correct(self, item, label, *, who, auth=""):
        from utils.routing.operations.review import Outcome

        self.done.append(("correct", item, who, auth))
        return Outcome(item, item, f"corrected to {label}")


@pytest.fixture
def console_app(tmp_path, monkeypatch):
    """``make(client=LOCAL, base_url=..., app=None, **settings) -> (TestClient, app, desk)`` on an empty spool (no
    router); with ``app``, another client of that console."""
    import dataclasses

    from starlette.testclient import TestClient

    from utils.routing.operations.console import ConsoleContext, build_app

    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", TOKEN)
    q.SpoolQueue(tmp_path).close()

    def make(client=LOCAL, base_url="http://127.0.0.1:8108", spool=tmp_path, app=None, **changes):
        desk = FakeDesk()
        if app is None:
            settings = dataclasses.replace(config({"port": 0}).console, **changes)
            app = build_app(settings, ConsoleContext(spool, CLASSES, {}, desk=desk))
        return TestClient(app, base_url=base_url, client=client, follow_redirects=False), app, desk

    return make


def csrf_of(page) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def log_in(client, name="alice") -> str:
    """Logs in through the form; the session's CSRF token."""
    login = client.post("/login", data={"name": name, "token": TOKEN, "csrf": csrf_of(client.get("/login"))})
    assert login.status_code == 303, login.text
    return csrf_of(client.get("/review"))


def test_dns_rebinding_another_host_name_is_refused_before_anything(console_app):
    """A page on evil.example that rebinds its name to 127.0.0.1 sends Host: evil.example: 400, nothing read."""
    client, _, _ = console_app()
    assert client.get("/search", params={"q": "PAT-A"}, headers={"Host": "evil.example:8108"}).status_code == 400
    assert client.post("/login", headers={"Host": "evil.example"}).status_code == 400
    for host in ("127.0.0.1:8108", "localhost", "[::1]:8108", "LOCALHOST.:80"):
        assert client.get("/search", params={"q": "x"}, headers={"Host": host}).status_code == 200, host
    named, _, _ = console_app(allowed_hosts=("router.example.org",), base_url="http://router.example.org")
    assert named.get("/").status_code == 200 and named.get("/", headers={"Host": "127.0.0.1"}).status_code == 400


def test_pages_are_open_only_to_loopback_clients_without_a_proxy(console_app):
    local, _, _ = console_app()
    assert local.get("/").status_code == 200
    assert local.get("/", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 303  # an undeclared proxy
    remote, _, _ = console_app(client=("203.0.113.9", 40000), host="0.0.0.0")
    assert remote.get("/").status_code == 303 and remote.get("/").headers["location"] == "/login"
    proxied, _, _ = console_app(trusted_proxies=("127.0.0.1",))  # the proxy connects from loopback
    assert proxied.get("/search", params={"q": "x"}).status_code == 303
    log_in(proxied)
    assert proxied.get("/search", params={"q": "x"}).status_code == 200


def test_empty_csrf_tokens_never_match(console_app):
    import base64

    from utils.routing.operations.console import hash_password

    client, _, desk = console_app()
    assert client.post("/login", data={"name": "alice", "token": TOKEN, "csrf": ""}).status_code == 403  # no cookie
    client.cookies.set("router_console_form", "")
    assert client.post("/login", data={"name": "alice", "token": TOKEN, "csrf": ""}).status_code == 403
    auth = {"Authorization": "Basic " + base64.b64encode(b"dana:s3cret-pass").decode()}
    basic, _, desk = console_app(users={"dana": hash_password("s3cret-pass", time_cost=1, memory_kib=1024)})
    assert basic.post("/items/1/requeue", headers=auth).status_code == 403  # no cookie, no field, no Origin
    assert basic.post("/items/1/requeue", data={"csrf": ""}, headers=auth).status_code == 403
    assert basic.post("/items/1/requeue", headers={**auth, "Origin": "http://evil.example"}).status_code == 403
    assert desk.done == []
    assert basic.post("/items/1/requeue", headers={**auth, "Origin": "http://127.0.0.1:8108"}).status_code == 303
    assert basic.post("/items/2/requeue", data={"csrf": csrf_of(basic.get("/login", headers=auth))},
                      headers=auth).status_code == 303
    assert desk.done == [("requeue", 1, "dana", "basic"), ("requeue", 2, "dana", "basic")]


def test_logout_needs_csrf_and_same_origin_and_ends_the_session_server_side(console_app):
    client, app, desk = console_app()
    csrf = log_in(client)
    copied = client.cookies["router_console"]
    assert "alice" in client.get("/review").text
    assert client.get("/").headers.get("set-cookie") is None  # nothing re-signed per response
    assert client.post("/logout", data={"csrf": csrf}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/logout", data={"csrf": ""}).status_code == 403
    assert "alice" in client.get("/review").text  # still logged in
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303
    assert len(app.state.sessions) == 0
    thief, _, _ = console_app(app=app)
    thief.cookies.set("router_console", copied)  # a cookie copied before the logout
    assert thief.post("/items/1/requeue", data={"csrf": csrf}).status_code == 401 and desk.done == []


def test_sessions_end_after_their_lifetime_and_when_idle_and_are_secure_over_https(console_app):
    now = [1000.0]
    client, app, desk = console_app(session_hours=1.0, idle_minutes=10.0)
    app.state.sessions.clock = lambda: now[0]
    log_in(client)
    for _ in range(6):  # in use every 9 minutes ...
        now[0] += 9 * 60
        assert "alice" in client.get("/review").text
    now[0] += 9 * 60  # ... but an hour after the login it is over
    assert "alice" not in client.get("/review").text
    log_in(client)
    for _ in range(2):  # the overview reloading its live part by itself is not a use
        now[0] += 6 * 60
        assert client.get("/live").status_code == 200
    assert "alice" not in client.get("/review").text  # idle
    secure, _, _ = console_app(base_url="https://127.0.0.1:8108")
    login = secure.get("/login")
    assert "secure" in login.headers["set-cookie"].lower()
    answer = secure.post("/login", data={"name": "alice", "token": TOKEN, "csrf": csrf_of(login)})
    cookie = answer.headers["set-cookie"].lower()
    assert "router_console=" in cookie and {"secure", "httponly", "samesite=strict"} <= {
        p.strip() for p in cookie.split(";")}
    plain, _, _ = console_app()
    assert "secure" not in plain.get("/login").headers["set-cookie"].lower()


def test_a_locked_or_missing_spool_database_answers_503_with_the_reason(console_app, tmp_path, monkeypatch):
    import sqlite3
    import time

    client, _, _ = console_app()
    monkeypatch.setattr(q, "read_only", lambda spool_dir: (_ for _ in ()).throw(
        sqlite3.OperationalError("database is locked")))
    start = time.monotonic()
    busy = client.get("/", headers={"Accept": "text/html"})
    assert busy.status_code == 503 and "the spool database is busy" in busy.text and busy.headers["retry-after"]
    assert time.monotonic() - start < 5
    assert client.get("/api/summary").status_code == 503
    missing, _, _ = console_app(spool=tmp_path / "nowhere")
    page = missing.get("/review", headers={"Accept": "text/html"})
    assert page.status_code == 503 and f"was not found at {tmp_path / 'nowhere'}" in page.text


def test_guessing_is_throttled_logged_and_bearer_actions_name_their_operator(console_app, caplog):
    import logging

    client, app, desk = console_app(max_failures=3)
    wrong = {"Authorization": "Bearer wrong-token-0123456789", "X-Operator": "mallory"}
    with caplog.at_level(logging.INFO, logger="utils.routing.operations.console"):
        assert [client.post("/items/1/requeue", headers=wrong).status_code for _ in range(4)] == [401, 401, 401, 429]
        right = {"Authorization": f"Bearer {TOKEN}", "X-Operator": "cron"}
        refused = client.post("/items/1/requeue", headers=right)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0  # right or wrong: wait
        login = client.post("/login", data={"name": "m", "token": TOKEN, "csrf": csrf_of(client.get("/login"))})
        assert login.status_code == 429
        other, _, _ = console_app(client=("127.0.0.2", 1), app=app)  # the same console, another address
        assert other.post("/items/1/requeue", headers=right).status_code == 303
        assert other.post("/items/1/requeue", headers={**right, "X-Operator": "x" * 65}).status_code == 400
    assert desk.done == [("requeue", 1, "cron", "bearer")]
    text = caplog.text
    assert text.count("failed bearer authentication from 127.0.0.1 (name 'mallory')") == 3
    assert "'cron' authenticated (bearer) from 127.0.0.2" in text and "wrong-token" not in text and TOKEN not in text


def test_basic_auth_checks_unknown_names_as_long_and_off_the_event_loop(console_app, monkeypatch):
    import base64
    import threading

    from utils.routing.operations import console
    from utils.routing.operations.console import hash_password

    users = {"dana": hash_password("s3cret-pass", time_cost=1, memory_kib=1024)}
    checked, real = [], console.check_password

    def spy(password, hashed):
        checked.append((hashed, threading.current_thread().name))
        return real(password, hashed)

    monkeypatch.setattr(console, "check_password", spy)
    client, _, _ = console_app(client=("203.0.113.9", 1), host="0.0.0.0", users=users)

    def basic(user):
        return {"Authorization": "Basic " + base64.b64encode(user).decode()}

    assert client.get("/", headers=basic(b"nobody:s3cret-pass")).status_code == 401
    assert len(checked) == 1 and checked[0][0].startswith("$argon2id$") and checked[0][0] != users["dana"]
    assert client.get("/", headers=basic(b"dana:wrong")).status_code == 401 and checked[1][0] == users["dana"]
    for _ in range(3):
        assert client.get("/", headers=basic(b"dana:s3cret-pass")).status_code == 200
    assert len(checked) == 3  # a right password is verified once, then remembered (bounded)
    assert all(name != threading.current_thread().name and "MainThread" not in name for _, name in checked)


def test_served_over_tls_the_cookies_are_secure_and_a_slow_password_check_does_not_stall_pages(tmp_path,
                                                                                                 monkeypatch):
    """The real server (uvicorn in its thread) with ``tls``: HTTPS only, the cookies marked Secure, another Host
    refused; a basic-auth check that takes a second runs in a worker thread while a page is served."""
    import base64
    import dataclasses
    import http.client
    import ssl
    import threading
    import time

    from utils.routing.operations import console
    from utils.routing.operations.console import Console, ConsoleContext, hash_password

    from .test_tls import CA  # skips without the cryptography package

    ca = CA(tmp_path, "console-ca")
    cert, key = ca.issue("console")
    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", TOKEN)
    settings = config({"port": 0, "tls": {"cert": str(cert), "key": str(key)}}).console
    settings = dataclasses.replace(settings, users={"dana": hash_password("pw", time_cost=1, memory_kib=1024)})
    q.SpoolQueue(tmp_path).close()
    real = console.check_password
    monkeypatch.setattr(console, "check_password", lambda p, h: time.sleep(1.0) or real(p, h))
    server = Console(settings, ConsoleContext(tmp_path, CLASSES, {}, desk=FakeDesk()))
    server.serve()
    context = ssl.create_default_context(cafile=str(ca.pem))

    def get(path, headers=None):
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.getheader("set-cookie") or "", response.read()
        finally:
            connection.close()

    try:
        status, cookie, _ = get("/login")
        assert status == 200 and "; secure" in cookie.lower() and "httponly" in cookie.lower()
        assert get("/", {"Host": "evil.example"})[0] == 400
        slow = threading.Thread(target=get, args=("/", {"Authorization": "Basic " + base64.b64encode(
            b"dana:pw").decode()}))
        slow.start()
        time.sleep(0.2)
        assert get("/")[0] == 200 and slow.is_alive()  # served while the password is being checked
        slow.join()
        plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/")
            plain.getresponse()
        plain.close()
    finally:
        server.close()


def test_an_operator_reloads_the_router_from_the_console(tmp_path, monkeypatch):
    """POST /reload (an operator, their session's CSRF token) calls the node's reload with the operator as the source;
    what it answers comes back as the page's message or error; nobody else can."""
    import dataclasses
    from urllib.parse import parse_qs, urlsplit

    from starlette.testclient import TestClient

    from utils.routing.operations.console import ConsoleContext, build_app

    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", TOKEN)
    q.SpoolQueue(tmp_path).close()
    calls, answers = [], [
        {"reloaded": True, "changed": ["rules", "model"], "restart_needed": ["port"], "model_id": "m2",
         "threshold": 0.7},
        {"reloaded": False, "problem": "router.yaml: batch_size must be >= 1, got 0"}]

    def reload(source: str) -> dict:
        calls.append(source)
        return answers[len(calls) - 1]

    settings = dataclasses.replace(config({"port": 0}).console)
    app = build_app(settings, ConsoleContext(tmp_path, CLASSES, {}, desk=FakeDesk(), reload=reload))
    client = TestClient(app, base_url="http://127.0.0.1:8108", client=LOCAL, follow_redirects=False)
    assert 'action="/reload"' not in client.get("/").text  # only an operator sees the button
    assert client.post("/reload", data={"csrf": "x"}).status_code == 401 and calls == []
    csrf = log_in(client)
    assert 'action="/reload"' in client.get("/").text
    assert client.post("/reload", data={"csrf": "wrong"}).status_code == 403 and calls == []
    done = client.post("/reload", data={"csrf": csrf})
    assert done.status_code == 303 and calls == ["console:alice"]
    message = parse_qs(urlsplit(done.headers["location"]).query)["message"][0]
    assert message == "reloaded: rules, model; model m2, threshold 0.7; needs a restart, not applied: port"
    refused = client.post("/reload", data={"csrf": csrf})
    error = parse_qs(urlsplit(refused.headers["location"]).query)["error"][0]
    assert error == "reload refused: router.yaml: batch_size must be >= 1, got 0"
    assert "batch_size must be &gt;= 1" in client.get(refused.headers["location"]).text  # shown, escaped
    without = build_app(settings, ConsoleContext(tmp_path, CLASSES, {}, desk=FakeDesk()))
    other = TestClient(without, base_url="http://127.0.0.1:8108", client=LOCAL, follow_redirects=False)
    assert other.post("/reload", data={"csrf": log_in(other)}).status_code == 404
