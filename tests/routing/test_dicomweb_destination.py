"""DICOMweb destinations (utils/routing/delivery/dicomweb.py): objects sent by STOW-RS with the queue states, audit
lines and metrics of every other destination.

Against a fake STOW-RS server in a thread (tests/fake_stow_server.py): HTTP 200 in bounded batches with each spool
file's bytes, over one pooled connection; 202 (stored, stored with a warning, failed: each object on its own);
409 (XML); 400 / 413 / 415 (the batch is sent again one object at a time, so the refusal lands on the object it is
about); 401 (down: check the credentials); 503, a dropped connection, a timeout, a web page, a redirect, 404, 429
(down, nothing recorded per object, then up again); a spool file gone; HTTPS with a client certificate. The
configuration: keys, secrets (from the environment or a file, never shown), TLS files, one service per settings.
Then once against a real Orthanc with its DICOMweb plugin, through a whole router: each image there exactly once,
byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from tests.fake_stow_server import DROP, FakeStowServer, Reply
from utils.config import ConfigError
from utils.io.dicom_writer import write_dicom
from utils.routing import queue as q
from utils.routing.delivery.dicomweb import DicomwebForwarder
from utils.routing.delivery.workers import make_forwarders
from utils.routing.operations.audit import AuditLog, read_audit
from utils.routing.operations.config import load_config
from utils.routing.operations.metrics import MetricsSettings, RouterMetrics
from utils.routing.queue import Classification, SpoolQueue

from .conftest import CLASSES, ROOT, free_port, send, wait_for, write_config

PASSWORD_ENV = "ROUTER_TEST_DICOMWEB_PASSWORD"
SECRET = "Pacs-Secret-4711"
TIMEOUT = 60


@pytest.fixture
def server():
    made = FakeStowServer()
    yield made
    made.close()


def image_files(folder: Path, n: int) -> list[Path]:
    """``n`` small DX images in three transfer syntaxes, each with its own SOP Instance UID."""
    syntaxes = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless)
    return [write_dicom(folder / f"image{i}.dcm", np.full((64, 64), 100 + 40 * i, np.uint16),
                        transfer_syntax=syntaxes[i % 3], bits_stored=12) for i in range(n)]


class Rig:
    """A spool queue, audit log and metrics with objects classified for a DICOMweb destination, and its forwarder
    (driven directly: ``deliver`` once, or started as the thread the router runs)."""

    def __init__(self, tmp_path: Path, destination: dict, **settings) -> None:
        self.config = load_config(write_config(tmp_path / "router.yaml", port=free_port(), spool=tmp_path / "spool",
                                               model=tmp_path / "model.keras",
                                               destinations={"adult_chest": destination, "uncertain": destination},
                                               **{"retry_initial_s": 0.05, "retry_max_s": 0.2, "max_attempts": 2,
                                                  **settings}))
        self.queue = SpoolQueue(self.config.spool_dir)
        self.audit = AuditLog(self.config.audit_log)
        self.node = self.config.destinations["adult_chest"].node
        self.metrics = RouterMetrics(MetricsSettings(), queue_gauges=self.queue.gauges, model=lambda: ("m", "ready"),
                                     paused=lambda: False, node_of={r: self.node for r in ("adult_chest", "uncertain")},
                                     down=lambda node: False)
        workers = make_forwarders(self.config, self.queue, self.audit, self.metrics)
        self.forwarder = next(w for w in workers if isinstance(w, DicomwebForwarder))
        self.folder = tmp_path / "images"
        self.folder.mkdir()
        self.bytes: dict[str, bytes] = {}  # SOP Instance UID -> the spool file's bytes

    def add(self, n: int, label: str = "adult_chest") -> list[q.QueueItem]:
        items = []
        for path in image_files(self.folder, n):
            data = path.read_bytes()
            meta = pydicom.dcmread(path, stop_before_pixels=True)
            uid = str(meta.SOPInstanceUID)
            item, _ = self.queue.store(data, sop_instance_uid=uid, sop_class_uid=str(meta.SOPClassUID),
                                       transfer_syntax=str(meta.file_meta.TransferSyntaxUID), calling_ae="SENDER")
            self.queue.set_classified([Classification(item.id, label, 0.9, "m", label, decided_by="model:m")])
            self.bytes[uid] = data
            items.append(self.queue.get(item.id))
        for path in self.folder.iterdir():
            path.unlink()
        return items

    def due(self) -> list[q.QueueItem]:
        return self.queue.due(self.forwarder.routes, 64, now=time.time() + 3600)

    def state(self, item: q.QueueItem) -> q.QueueItem:
        return self.queue.get(item.id)

    def forwarded(self, status: str, label: str = "adult_chest") -> float:
        return self.metrics.registry.get_sample_value(
            "router_objects_forwarded_total", {"label": label, "destination": self.node, "status": status}) or 0.0

    def lines(self, event: str | None = None) -> list[dict]:
        return [r for r in read_audit(self.config.audit_log) if event is None or r["event"] == event]

    def close(self) -> None:
        self.forwarder.stop()
        if self.forwarder.is_alive():
            self.forwarder.join(10)
        self.audit.close()
        self.queue.close()


@pytest.fixture
def rig(tmp_path, server, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    made: list[Rig] = []

    def make(**settings) -> Rig:
        destination = {"dicomweb": server.url, "username": "router", "password_env": PASSWORD_ENV,
                       **settings.pop("destination", {})}
        made.append(Rig(tmp_path, destination, **settings))
        return made[-1]

    yield make
    for each in made:
        each.close()


def uid_of(item: q.QueueItem) -> str:
    return item.sop_instance_uid


# --- delivery --------------------------------------------------------------------------------------------------


def test_objects_go_in_bounded_batches_byte_for_byte_over_one_pooled_connection(rig, server):
    rig = rig(destination={"batch": 2})
    items = rig.add(5)
    rig.forwarder.start()
    wait_for(lambda: rig.queue.counts() == {q.FORWARDED: 5}, TIMEOUT, "the objects to be forwarded")
    assert [len(r.parts) for r in server.requests] == [2, 2, 1]
    assert sorted(server.received_uids()) == sorted(rig.bytes)  # each once
    for request in server.requests:
        assert request.path == "/dicom-web/studies" and not request.chunked
        assert request.headers["authorization"].startswith("Basic ")
        for uid, part in zip(request.uids, request.parts):
            assert part == rig.bytes[uid]  # the spool file's bytes, not re-encoded
    assert len({r.client_port for r in server.requests}) == 1  # the session's pooled connection, kept alive
    assert not list((rig.config.spool_dir / "files").iterdir())  # spool files removed once confirmed
    forwarded = rig.lines("forwarded")
    assert sorted(r["sop_instance_uid"] for r in forwarded) == sorted(map(uid_of, items))
    assert {(r["status"], r["destination"]) for r in forwarded} == {("HTTP 200", f"dicomweb:{server.url}")}
    assert rig.forwarded("success") == 5
    assert rig.metrics.registry.get_sample_value("router_end_to_end_seconds_count") == 5
    assert SECRET not in rig.config.audit_log.read_text()


def test_202_decides_per_object_stored_warning_and_failed(rig, server):
    rig = rig()
    stored, coerced, refused = rig.add(3)
    server.script = lambda request: Reply.json(202, stored=[stored.sop_instance_uid, coerced.sop_instance_uid],
                                               failed={refused.sop_instance_uid: 0xA700},
                                               warnings={coerced.sop_instance_uid: 0xB000})
    assert rig.forwarder.deliver(rig.due()) is None
    assert rig.state(stored).state == rig.state(coerced).state == q.FORWARDED
    again = rig.state(refused)
    assert (again.state, again.attempts) == (q.CLASSIFIED, 1)
    assert "STOW-RS HTTP 202: FailureReason 0xA700 (out of resources)" in again.reason
    lines = {r["sop_instance_uid"]: r for r in rig.lines("forwarded")}
    assert lines[stored.sop_instance_uid]["status"] == "HTTP 202"
    assert lines[coerced.sop_instance_uid]["status"] == "HTTP 202, WarningReason 0xB000 (coercion of data elements)"
    assert lines[coerced.sop_instance_uid]["detail"] == "warning"
    assert lines[refused.sop_instance_uid]["status"] == "retry"
    assert (rig.forwarded("success"), rig.forwarded("warning"), rig.forwarded("retry")) == (1, 1, 1)
    # the failed one alone, again: max_attempts (2) reached -> failed, its spool file kept for --requeue-failed
    assert rig.forwarder.deliver(rig.due()) is None
    assert server.requests[-1].uids == [refused.sop_instance_uid]
    final = rig.state(refused)
    assert final.state == q.FAILED and rig.queue.path(final).is_file()
    assert [r["status"] for r in rig.lines("forwarded") if r["sop_instance_uid"] == refused.sop_instance_uid] == \
        ["retry", "failed"]
    assert rig.forwarded("failed") == 1


def test_409_in_xml_stores_none_and_gives_each_its_reason(rig, server):
    rig = rig()
    first, second = rig.add(2)
    server.script = lambda request: Reply.xml(409, failed={first.sop_instance_uid: 0x0122})
    assert rig.forwarder.deliver(rig.due()) is None
    assert "HTTP 409, none stored: FailureReason 0x0122 (SOP class not supported)" in rig.state(first).reason
    assert rig.state(second).reason.startswith("STOW-RS HTTP 409, none stored")
    assert {rig.state(i).state for i in (first, second)} == {q.CLASSIFIED}
    assert rig.forwarded("retry") == 2 and not rig.lines("destination_down")


@pytest.mark.parametrize("status", [400, 413, 415])
def test_a_refused_request_is_sent_again_object_by_object_and_the_refusal_lands_on_its_object(rig, server, status):
    rig = rig()
    good, bad, other = rig.add(3)

    def script(request):
        if bad.sop_instance_uid in request.uids:
            return Reply(status, b"Bad object \x1b[31m\nFORGED audit line", "text/plain")
        return Reply.json(200, stored=request.uids)

    server.script = script
    assert rig.forwarder.deliver(rig.due()) is None
    assert [r.uids for r in server.requests][1:] == [[good.sop_instance_uid], [bad.sop_instance_uid],
                                                   [other.sop_instance_uid]]
    assert rig.state(good).state == rig.state(other).state == q.FORWARDED
    refused = rig.state(bad)
    assert refused.state == q.CLASSIFIED and refused.attempts == 1
    assert refused.reason.startswith(f"STOW-RS refused: HTTP {status}")
    detail = next(r["detail"] for r in rig.lines("forwarded") if r["status"] == "retry")
    assert "\n" not in detail and "\x1b" not in detail and "FORGED" in detail  # escaped, not dropped
    assert rig.forwarder.deliver(rig.due()) is None
    assert rig.state(bad).state == q.FAILED  # not retried endlessly: max_attempts


def test_401_is_the_destination_down_with_check_the_credentials(rig, server):
    rig = rig()
    items = rig.add(2)
    server.script = lambda request: Reply(401, b"", "text/plain")
    problem = rig.forwarder.deliver(rig.due())
    assert "HTTP 401" in problem and "check the credentials" in problem and f"${PASSWORD_ENV}" in problem
    assert SECRET not in problem
    assert [(rig.state(i).state, rig.state(i).attempts) for i in items] == [(q.CLASSIFIED, 0)] * 2
    assert not rig.lines("forwarded")


def _slow(request):
    time.sleep(1.5)
    return Reply.json(200, stored=request.uids)


@pytest.mark.parametrize(("reply", "says"), [
    (Reply(503, b"maintenance", "text/plain"), "HTTP 503"),
    (DROP, "POST http://127.0.0.1"),
    (_slow, "timed out"),
    (Reply(200, b"<html><body>Welcome</body></html>", "text/html"), "without a STOW-RS answer"),
    (Reply(302, b"", "text/plain"), "a redirect"),
    (Reply(404, b"", "text/plain"), "HTTP 404"),
    (Reply(429, b"", "text/plain"), "HTTP 429"),
], ids=["503", "dropped", "timeout", "web-page", "redirect", "404", "429"])
def test_the_destination_down_records_nothing_per_object(rig, server, reply, says):
    rig = rig(destination={"timeout_s": 0.5})
    items = rig.add(2)
    server.script = reply if callable(reply) else (lambda request: reply)
    problem = rig.forwarder.deliver(rig.due())
    assert problem and says in problem, problem
    assert [(rig.state(i).state, rig.state(i).attempts) for i in items] == [(q.CLASSIFIED, 0)] * 2
    assert not rig.lines("forwarded") and rig.forwarded("retry") == 0


def test_down_is_retried_with_backoff_until_it_is_up_and_each_object_arrives_once(rig, server):
    rig = rig()
    items = rig.add(2)
    replies = [Reply(503, b"", "text/plain"), DROP]
    server.script = lambda request: replies.pop(0) if replies else Reply.json(200, stored=request.uids)
    rig.forwarder.start()
    wait_for(lambda: rig.queue.counts() == {q.FORWARDED: 2}, TIMEOUT, "the objects to be forwarded")
    wait_for(lambda: rig.lines("destination_up"), TIMEOUT, "destination_up")
    assert len(server.requests) == 3 and sorted(server.requests[-1].uids) == sorted(map(uid_of, items))
    down, = rig.lines("destination_down")
    assert "HTTP 503" in down["reason"] and down["destination"] == rig.node
    assert len(rig.lines("forwarded")) == 2 and rig.forwarded("retry") == 0 and rig.forwarded("success") == 2


def test_a_missing_spool_file_is_its_objects_failure_only(rig, server):
    rig = rig()
    gone, kept = rig.add(2)
    rig.queue.path(gone).unlink()
    assert rig.forwarder.deliver(rig.due()) is None
    assert server.received_uids() == [kept.sop_instance_uid] and rig.state(kept).state == q.FORWARDED
    assert "is missing" in rig.state(gone).reason and rig.state(gone).attempts == 1


def test_https_with_a_client_certificate(tmp_path, monkeypatch):
    from .test_tls import CA

    authority = CA(tmp_path, "web-ca")
    server_cert, server_key = authority.issue("pacs")
    client_cert, client_key = authority.issue("router-client")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(cafile=authority.pem)
    context.verify_mode = ssl.CERT_REQUIRED
    server = FakeStowServer(ssl_context=context)
    try:
        monkeypatch.setenv(PASSWORD_ENV, SECRET)
        rig = Rig(tmp_path, {"dicomweb": server.url, "username": "router", "password_env": PASSWORD_ENV,
                             "tls": {"ca": str(authority.pem), "cert": str(client_cert), "key": str(client_key)}})
        try:
            items = rig.add(1)
            assert rig.forwarder.deliver(rig.due()) is None
            assert rig.state(items[0]).state == q.FORWARDED
            assert rig.config.destinations["adult_chest"].dicomweb.describe().endswith("client certificate yes)")
        finally:
            rig.close()
        # without the client certificate the handshake fails: down, not a refusal of the object
        (tmp_path / "again").mkdir()
        rig = Rig(tmp_path / "again", {"dicomweb": server.url, "tls": {"ca": str(authority.pem)}})
        try:
            items = rig.add(1)
            assert rig.forwarder.deliver(rig.due())
            assert rig.state(items[0]).attempts == 0
        finally:
            rig.close()
    finally:
        server.close()


# --- configuration ---------------------------------------------------------------------------------------------


def config_file(tmp_path: Path, destination, **extra) -> Path:
    destinations = {c: destination for c in CLASSES} | {"uncertain": {"folder": "review"}}
    return write_config(tmp_path / "router.yaml", port=11112, spool=tmp_path / "spool", model=tmp_path / "m.keras",
                        destinations=destinations, **extra)


def test_a_dicomweb_destination_loads_with_its_secret_masked_everywhere(tmp_path, monkeypatch):
    from utils.routing.operations.service import describe_config

    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    config = load_config(config_file(tmp_path, {"dicomweb": "https://pacs.example/dicom-web/", "username": "router",
                                                "password_env": PASSWORD_ENV, "batch_mb": 8}))
    spine = config.destinations["spine"]
    settings = spine.dicomweb
    assert (settings.url, settings.batch, settings.batch_mb) == ("https://pacs.example/dicom-web", 16, 8)
    assert settings.endpoint.timeout_s == 60.0 and settings.endpoint.auth.secret == SECRET
    assert spine.node == "dicomweb:https://pacs.example/dicom-web" and not spine.is_folder
    text = describe_config(config)
    assert "dicomweb: 'https://pacs.example/dicom-web'" in text and f"secret: '*** (${PASSWORD_ENV})'" in text
    assert SECRET not in text + repr(config) + json.dumps(config.to_dict(), default=str)
    (tmp_path / "token").write_text("bearer-token-value\n")
    settings = load_config(config_file(tmp_path, {"dicomweb": "http://127.0.0.1:8042/dicom-web",
                                                  "token_file": "token"})).destinations["spine"].dicomweb
    assert settings.endpoint.auth.kind == "bearer" and settings.endpoint.auth.secret == "bearer-token-value"
    assert settings.to_dict()["secret"] == f"*** (file {tmp_path / 'token'})"
    workers = make_forwarders(load_config(config_file(tmp_path, {"dicomweb": "http://pacs/dicom-web"})), None, None)
    dicomweb = [w for w in workers if isinstance(w, DicomwebForwarder)]
    assert len(dicomweb) == 1 and dicomweb[0].routes == sorted(CLASSES)  # one service, one worker


@pytest.mark.parametrize(("destination", "message"), [
    ({"dicomweb": "ftp://pacs"}, r"destinations.spine.dicomweb: expected http\(s\)://"),
    ({"dicomweb": "https://user:pw@pacs"}, r"destinations.spine.dicomweb: no credentials in the URL"),
    ({"dicomweb": "https://pacs", "password": "x"}, r"destinations.spine.password: secrets are not written in the "
                                                    r"configuration file; give password_env or password_file"),
    ({"dicomweb": "https://pacs", "token": "x"}, r"give token_env or token_file"),
    ({"dicomweb": "https://pacs", "pasword_env": "X"}, r"unknown key 'pasword_env' \(did you mean 'password_env'\?\)"),
    ({"dicomweb": "https://pacs", "username": "router"}, r"destinations.spine: username needs a password"),
    ({"dicomweb": "https://pacs", "password_env": PASSWORD_ENV}, r"a password \(password_env\) without username"),
    ({"dicomweb": "https://pacs", "username": "r", "password_env": "ROUTER_TEST_UNSET_VARIABLE"},
     r"destinations.spine.password_env: the environment variable \$ROUTER_TEST_UNSET_VARIABLE is not set"),
    ({"dicomweb": "https://pacs", "username": "r", "password_env": PASSWORD_ENV, "password_file": "pw"},
     r"give password_env or password_file, not both"),
    ({"dicomweb": "https://pacs", "username": "r", "password_file": "missing.pw"},
     r"destinations.spine.password_file: cannot read"),
    ({"dicomweb": "https://pacs", "username": "r", "password_env": PASSWORD_ENV, "token_env": "T"},
     r"not both"),
    ({"dicomweb": "https://pacs", "username": "a:b", "password_env": PASSWORD_ENV}, r"has no ':'"),
    ({"dicomweb": "http://pacs", "tls": {"ca": "ca.pem"}}, r"destinations.spine.tls: TLS settings need an https://"),
    ({"dicomweb": "https://pacs", "tls": {"ca": "missing.pem"}}, r"destinations.spine.tls.ca: .*cannot be read"),
    ({"dicomweb": "https://pacs", "tls": {"cert": "c.pem"}}, r"needs both cert and key"),
    ({"dicomweb": "https://pacs", "tls": {"check_hostname": False}}, r"unknown key 'check_hostname'"),
    ({"dicomweb": "https://pacs", "batch": 0}, r"destinations.spine.batch must be between 1 and 64, got 0"),
    ({"dicomweb": "https://pacs", "timeout_s": 0}, r"destinations.spine.timeout_s must be"),
    ({"dicomweb": "https://pacs", "batch_mb": "big"}, r"destinations.spine.batch_mb: expected int"),
])
def test_a_wrong_dicomweb_destination_is_refused_naming_the_key(tmp_path, monkeypatch, destination, message):
    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    monkeypatch.delenv("ROUTER_TEST_UNSET_VARIABLE", raising=False)
    destinations = {"spine": destination, **{c: {"folder": c} for c in CLASSES if c != "spine"},
                    "uncertain": {"folder": "review"}}
    path = write_config(tmp_path / "router.yaml", port=11112, spool=tmp_path / "spool", model=tmp_path / "m.keras",
                        destinations=destinations)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path)
    assert SECRET not in str(raised.value)


def test_one_service_is_one_set_of_settings_and_bounds_come_from_constants(tmp_path, monkeypatch):
    from utils import constants

    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    same = {"dicomweb": "https://pacs/dicom-web", "username": "router", "password_env": PASSWORD_ENV}
    destinations = {c: same for c in CLASSES} | {"uncertain": {**same, "timeout_s": 5}}
    path = write_config(tmp_path / "router.yaml", port=11112, spool=tmp_path / "spool", model=tmp_path / "m.keras",
                        destinations=destinations)
    with pytest.raises(ConfigError, match=r"same DICOMweb service \(dicomweb:https://pacs/dicom-web\) with different "
                                          r"settings"):
        load_config(path)
    monkeypatch.setattr(constants, "ROUTER_DICOMWEB_BATCH_RANGE", "[1, 4]")
    with pytest.raises(ConfigError, match=r"destinations.spine.batch must be between 1 and 4, got 16"):
        load_config(config_file(tmp_path, same))  # the default is now outside


def test_check_probes_a_dicomweb_destination_with_a_search_and_masks_its_secret(tmp_path, model_file, monkeypatch,
                                                                                capsys, server):
    """router.py --check: one search per service (no C-ECHO in DICOMweb), with the credentials; refused
    credentials, nothing at the path or no service at all is a problem (exit 1), a store-only 403 is not."""
    from utils.dicomweb.http import probe
    from utils.routing.operations.service import check

    monkeypatch.setenv(PASSWORD_ENV, SECRET)
    pacs = {"dicomweb": server.url, "username": "router", "password_env": PASSWORD_ENV}
    config = load_config(write_config(tmp_path / "router.yaml", port=11112, spool=tmp_path / "spool", model=model_file,
                                      destinations={c: pacs for c in (*CLASSES, "uncertain")}))
    assert check(config) == 0
    out = capsys.readouterr().out
    assert (f"spine            -> STOW-RS to {server.url}/studies (basic auth as router, secret from "
            f"${PASSWORD_ENV}): reachable, credentials accepted (HTTP 200 to a search)") in out
    assert f"secret: '*** (${PASSWORD_ENV})'" in out and SECRET not in out
    assert len(server.requests) == 1  # one service, probed once for its six routes
    search = server.requests[0]
    assert (search.method, search.path) == ("GET", "/dicom-web/studies?limit=1") and search.headers["authorization"]
    endpoint = config.destinations["spine"].dicomweb.endpoint
    for status, ok, words in ((401, False, "HTTP 401 Unauthorized (check the credentials)"),
                              (404, False, "no DICOMweb service at this URL?"),
                              (503, False, "HTTP 503"), (403, True, "store-only")):
        server.script = lambda request, status=status: Reply(status, b"", "text/plain")
        reachable, line = probe(endpoint)
        assert reachable is ok and words in line, line
    server.script = lambda request: Reply(401, b"", "text/plain")
    assert check(config) == 1 and "HTTP 401" in capsys.readouterr().out
    gone = load_config(write_config(tmp_path / "gone.yaml", port=11112, spool=tmp_path / "spool", model=model_file,
                                    destinations={c: {**pacs, "dicomweb": "http://127.0.0.1:9/dicom-web"}
                                                  for c in (*CLASSES, "uncertain")}))
    assert check(gone) == 1 and "GET http://127.0.0.1:9/dicom-web/studies" in capsys.readouterr().out


def test_the_json_schema_knows_dicomweb_destinations():
    import jsonschema

    shipped = json.loads((ROOT / "docs" / "router.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(shipped)
    good = {"model": "m", "destinations": {"spine": {"dicomweb": "https://pacs/dicom-web", "username": "r",
                                                     "password_file": "pw", "tls": {"ca": "ca.pem"}, "batch": 4}}}
    validator.validate(good)
    for wrong in ({"dicomweb": "https://pacs", "password": "p"}, {"dicomweb": "https://pacs", "batch": 65}):
        assert list(validator.iter_errors({"model": "m", "destinations": {"spine": wrong}}))
    example = yaml.safe_load((ROOT / "router.example.yaml").read_text())
    validator.validate(example)


# --- a real Orthanc ----------------------------------------------------------------------------------------------


def test_the_router_stores_into_orthanc_by_stow_rs_byte_for_byte(router, samples, processes, tmp_path, monkeypatch):
    from tests.orthanc_server import PASSWORD, USER, Orthanc, dicomweb_plugin, orthanc_binary

    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc or its DICOMweb plugin not installed (apt-get install orthanc orthanc-dicomweb)")
    orthanc = Orthanc(processes, tmp_path / "pacs", "PACS", dicomweb=True, auth=True)
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    pacs = {"dicomweb": orthanc.dicomweb_url, "username": USER, "password_env": PASSWORD_ENV, "batch": 3}
    node = router({**{c: pacs for c in CLASSES}, "uncertain": pacs})
    images = {uid: s for uid, s in samples.items() if s.label != "unreadable"}
    assert send(node.port, [s.path for s in samples.values()]) == [0] * len(samples)
    wait_for(lambda: node.queue.counts().get(q.FORWARDED) == len(images), TIMEOUT, "the images to reach Orthanc")
    stored = orthanc.instances()
    assert set(stored) == set(images) and orthanc.instance_count() == len(images)  # each exactly once
    spooled = {i.sop_instance_uid: i for i in node.queue.items(q.FORWARDED)}
    for uid, instance in stored.items():
        raw = orthanc.raw_file(instance)
        assert (hashlib.sha256(raw).hexdigest(), len(raw)) == (spooled[uid].sha256, spooled[uid].size)
        assert pydicom.dcmread(samples[uid].path).file_meta.TransferSyntaxUID == \
            pydicom.dcmread(pydicom.filebase.DicomBytesIO(raw)).file_meta.TransferSyntaxUID
    lines = [r for r in read_audit(node.config.audit_log) if r["event"] == "forwarded"]
    assert {r["sop_instance_uid"] for r in lines} == set(images)
    assert {r["status"] for r in lines} == {"HTTP 200"} and len(lines) == len(images)
    started, = [r for r in read_audit(node.config.audit_log) if r["event"] == "started"]
    assert started["destinations"]["spine"]["secret"] == f"*** (${PASSWORD_ENV})"
    assert PASSWORD not in node.config.audit_log.read_text()
