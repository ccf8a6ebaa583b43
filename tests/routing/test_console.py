"""The web console (utils/routing/console.py) and the review loop (utils/routing/review.py): the ``console`` block is
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
from utils.routing.audit import read_audit
from utils.routing.config import from_dict
from utils.routing.review import ReviewError, review_path, thumb_path

from .conftest import CLASSES, ROWS_BY_CLASS, UNCERTAIN_ROWS, bright_rows_image, everywhere, send, wait_for

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("jinja2")
pytest.importorskip("python_multipart")
pytest.importorskip("httpx2")  # Starlette's TestClient

TOKEN = "test-token-0123456789abcdef"
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
    monkeypatch.setenv("ROUTER_CONSOLE_TOKEN", TOKEN)
    settings = config({"host": "0.0.0.0"}).console
    assert settings.token == TOKEN and not settings.loopback and "every page needs authentication" in settings.describe()
    token_file = tmp_path / "console.token"
    token_file.write_text("from-a-file-0123456789\n")
    users = tmp_path / "users"
    from utils.routing.console import check_password, hash_password

    line = "alice:" + hash_password("correct horse", iterations=1000)
    users.write_text(f"# operators\n{line}\n")
    settings = config({"token_file": str(token_file), "users_file": str(users)}).console
    assert settings.token == "from-a-file-0123456789" and check_password("correct horse", settings.users["alice"])
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


def test_app_shows_the_queue_and_refuses_actions_without_token_or_csrf(console_node):
    from starlette.testclient import TestClient

    from utils.routing.console import build_app

    node, items, spine = console_node
    uncertain = items["uncertain"]
    app = build_app(node.config.console, node.console.context)
    client = TestClient(app, base_url="http://127.0.0.1")
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
    assert bearer.post(f"/items/{items['disagrees'].id}/requeue", follow_redirects=False).status_code == 303
    wrong = TestClient(app, base_url="http://127.0.0.1", headers={"Authorization": "Bearer nope"})
    assert wrong.post(f"/items/{items['disagrees'].id}/requeue", follow_redirects=False).status_code == 401


def test_pages_need_authentication_away_from_loopback(console_node):
    import base64
    import dataclasses

    from starlette.testclient import TestClient

    from utils.routing.console import build_app, hash_password

    node, items, _ = console_node
    settings = dataclasses.replace(node.config.console, host="0.0.0.0",
                                   users={"dana": hash_password("s3cret-pass", iterations=1000)})
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

    from utils.routing.console import build_app

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

    client = TestClient(build_app(node.config.console, node.console.context), base_url="http://127.0.0.1")
    assert 'href="/shadow"' in client.get("/").text
    page = client.get("/shadow")
    assert page.status_code == 200 and "<table>" in page.text and "Shadow trial" in page.text
    assert client.get("/shadow", params={"since": "not a date"}).status_code == 200  # the error is shown, not a 500
    assert "not a date" in client.get("/shadow", params={"since": "not a date"}).text


def test_a_busy_spool_database_is_read_again_not_a_server_error(tmp_path, monkeypatch):
    """The router starting, or SQLite recovering its WAL after a crash, can refuse a reader for a moment."""
    import sqlite3

    from utils.routing import review
    from utils.routing.console import ConsoleContext

    q.SpoolQueue(tmp_path).close()
    opened, real = [], review.read_only

    def flaky(spool_dir):
        opened.append(spool_dir)
        if len(opened) <= 2:
            raise sqlite3.OperationalError("database is locked")
        return real(spool_dir)

    monkeypatch.setattr(review, "read_only", flaky)
    context = ConsoleContext(tmp_path, CLASSES, {}, desk=None)
    assert context.summary()["total"] == 0 and len(opened) == 3
    opened.clear()
    monkeypatch.setattr(review, "read_only", lambda spool_dir: (_ for _ in ()).throw(sqlite3.OperationalError("x")))
    with pytest.raises(sqlite3.OperationalError):
        context.summary()  # not forever
