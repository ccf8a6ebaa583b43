"""STOW-RS intake (utils/routing/intake/stow.py): POST /studies into the same spool, rules, model and forwarders as C-STORE.

The in-process test drives a running router with raw multipart requests (the bytes must reach the destination
exactly as sent), with dicomweb-client (a well-kept client must understand the answer) and with curl as an
operator would (the snippet of docs/ROUTER.md); the process test kills router.py with SIGKILL while uploads stream
in: every instance acknowledged before the kill is delivered after the restart.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from pathlib import Path

import pydicom
import pytest
import requests

from utils.routing.intake.stow import (
    CANNOT_UNDERSTAND,
    SOP_CLASS_NOT_SUPPORTED,
    STUDY_MISMATCH,
    Outcome,
    response_json,
    response_xml,
)
from utils.routing.operations.audit import read_audit

from .conftest import (
    CLASSES,
    expected_labels,
    free_port,
    make_samples,
    received_files,
    start_router,
    wait_for,
    write_config,
)

TOKEN = "Stow-Token-0123456789-abcdefXYZ"
TIMEOUT = 120
FAILED, STORED, REASON = "00081198", "00081199", "00081197"


def multipart(parts: list[bytes], content_types: list[str] | None = None) -> tuple[bytes, str]:
    """A multipart/related body of ``parts``; (body, Content-Type header)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for index, data in enumerate(parts):
        kind = content_types[index] if content_types else "application/dicom"
        out.write(f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f'multipart/related; type="application/dicom"; boundary={boundary}'


def post(url: str, parts: list[bytes], *, token: str | None = TOKEN, accept: str = "application/dicom+json",
         content_types: list[str] | None = None) -> requests.Response:
    body, content_type = multipart(parts, content_types)
    headers = {"Content-Type": content_type, "Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(url, data=body, headers=headers, timeout=60)


def items(answer: dict, tag: str) -> list[dict]:
    return answer.get(tag, {}).get("Value", [])


def uids(answer: dict, tag: str) -> set[str]:
    return {i["00081155"]["Value"][0] for i in items(answer, tag) if "Value" in i["00081155"]}


def stow_block(port: int = 0, **extra) -> dict:
    return {"host": "127.0.0.1", "port": port, **extra}


def test_stow_rs_intake_end_to_end(router, peers, samples, tmp_path, monkeypatch):
    """Raw requests, dicomweb-client and curl into a running router: every instance reaches the destination of its
    label with the same bytes; each kind of bad part fails alone with its reason; the request-level refusals."""
    monkeypatch.setenv("ROUTER_STOW_TOKEN", TOKEN)
    peer = peers("AI")
    node = router({label: peer.node() for label in (*CLASSES, "uncertain")}, stow=stow_block(max_request_mb=1))
    url = f"http://127.0.0.1:{node.stow.port}/studies"
    files = {uid: s.path for uid, s in samples.items()}
    ordered = sorted(files)

    # 1. Half of the samples by raw multipart: 200, each one in ReferencedSOPSequence
    first = ordered[: len(ordered) // 2]
    answer = post(url, [files[u].read_bytes() for u in first])
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    assert uids(answer.json(), STORED) == set(first) and FAILED not in answer.json()

    # 2. The other half with dicomweb-client (it re-encodes the data sets, so only the pixels are compared below)
    dicomweb_client = pytest.importorskip("dicomweb_client")
    client = dicomweb_client.DICOMwebClient(f"http://127.0.0.1:{node.stow.port}",
                                            headers={"Authorization": f"Bearer {TOKEN}"})
    rest = ordered[len(ordered) // 2:]
    stored = client.store_instances([pydicom.dcmread(files[u]) for u in rest])
    assert {str(i.ReferencedSOPInstanceUID) for i in stored.ReferencedSOPSequence} == set(rest)

    # 3. One request, five parts: good, not DICOM, text/plain, a SOP class the SCP does not take, an empty part
    good = files[first[0]].read_bytes()
    odd_class = pydicom.dcmread(files[first[1]])
    odd_class.SOPClassUID = odd_class.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5.6.7"
    odd_class.SOPInstanceUID = odd_class.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7.8"
    buffer = io.BytesIO()
    odd_class.save_as(buffer, enforce_file_format=True)
    answer = post(url, [good, b"not a dicom file at all", good, buffer.getvalue(), b""],
                  content_types=["application/dicom", "application/dicom", "text/plain", "application/dicom",
                                 "application/dicom"])
    assert answer.status_code == 202, answer.text
    reasons = [i[REASON]["Value"][0] for i in items(answer.json(), FAILED)]
    assert reasons == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND, SOP_CLASS_NOT_SUPPORTED, CANNOT_UNDERSTAND]  # ..., empty
    assert uids(answer.json(), STORED) == {first[0]}  # sent again: still waiting or delivered, success either way

    study = str(pydicom.dcmread(files[first[0]]).StudyInstanceUID)
    answer = post(f"{url}/1.2.3.999", [good], accept="application/dicom+xml")
    assert answer.status_code == 409 and answer.headers["content-type"].startswith("application/dicom+xml")
    assert f'<Value number="1">{STUDY_MISMATCH}</Value>' in answer.text
    assert post(f"{url}/{study}", [good]).status_code == 200

    # 4. Whole-request refusals
    assert post(url, [good], token=None).status_code == 401
    assert post(url, [good], token="wrong-" + TOKEN).status_code == 401
    refused = requests.post(url, data=good, headers={"Content-Type": "application/dicom",
                                                      "Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert refused.status_code == 415
    assert post(url, [b"\0" * (1024 * 1024 + 1)]).status_code == 413
    assert requests.get(url, timeout=30).status_code == 405
    body, content_type = multipart([good])
    assert requests.post(url, data=body[:-20], headers={"Content-Type": content_type,
                                                        "Authorization": f"Bearer {TOKEN}"},
                         timeout=30).status_code == 400

    # 5. curl, as docs/ROUTER.md shows an operator
    if shutil.which("curl"):
        script = (f'b=$(uuidgen 2>/dev/null || echo b0undary42); '
                  f'{{ printf -- "--$b\\r\\nContent-Type: application/dicom\\r\\n\\r\\n"; cat "$1"; '
                  f'printf -- "\\r\\n--$b--\\r\\n"; }} > "$2"; '
                  f'curl -sS -f -X POST "{url}" -H "Authorization: Bearer $3" '
                  f'-H "Content-Type: multipart/related; type=\\"application/dicom\\"; boundary=$b" '
                  f'-H "Accept: application/dicom+json" --data-binary @"$2"')
        done = subprocess.run(["bash", "-c", script, "curl", str(files[first[2]]), str(tmp_path / "body"), TOKEN],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and first[2] in done.stdout, done.stderr

    # Every instance: at the destination of its label (one peer here, checked by the audit), same pixel data
    routable = {u for u, s in samples.items() if s.label != "unreadable"}
    wait_for(lambda: routable <= set(peer.received), TIMEOUT, "every STOW-RS instance to be forwarded")
    for uid in routable:
        sent = pydicom.dcmread(files[uid])
        got = pydicom.dcmread(io.BytesIO(peer.received[uid]), force=True)
        got.file_meta = sent.file_meta
        if "PixelData" in sent:
            assert got.PixelData == sent.PixelData, uid
        if uid in first:  # raw multipart: the data set forwarded byte for byte
            raw = files[uid].read_bytes()
            assert peer.received[uid] in raw, uid
    audit = read_audit(node.config.audit_log)
    received = [r for r in audit if r["event"] == "received" and r.get("transport") == "stow-rs"]
    assert {r["sop_instance_uid"] for r in received} == set(files)
    assert all(r["calling_ae"] == "STOW-RS" and r["user"] == "token" for r in received)
    decided = {r["sop_instance_uid"]: r["label"] for r in audit if r["event"] == "classified"}
    assert all(decided[u] == samples[u].label for u in routable if u in decided)


def test_the_answer_documents_name_each_instance_once():
    outcomes = [Outcome("1.2.840.10008.5.1.4.1.1.1", "1.2.3", None), Outcome("", "", CANNOT_UNDERSTAND),
                Outcome("1.2.4", "1.2.5<&>", SOP_CLASS_NOT_SUPPORTED)]
    document = response_json(outcomes)
    assert uids(document, STORED) == {"1.2.3"} and uids(document, FAILED) == {"1.2.5<&>"}
    assert document[FAILED]["Value"][0]["00081155"] == {"vr": "UI"}  # unknown: present, empty
    xml = response_xml(outcomes)
    assert "1.2.5&lt;&amp;&gt;" in xml and "<&>" not in xml
    # the router's own STOW-RS client (DICOMweb destinations) reads both forms the same way
    from utils.dicomweb.stow import parse_answer

    for media, content in (("application/dicom+json", json.dumps(document).encode()),
                           ("application/dicom+xml", xml.encode())):
        answer = parse_answer(202, media, content)
        assert answer.outcome("1.2.3").stored and not answer.outcome("1.2.5<&>").stored
        assert "SOP class not supported" in answer.outcome("1.2.5<&>").reason


def test_an_unauthenticated_port_must_be_loopback(tmp_path, model_file, monkeypatch):
    from utils.config import ConfigError
    from utils.routing.operations.config import load_config

    monkeypatch.delenv("ROUTER_STOW_TOKEN", raising=False)
    path = write_config(tmp_path / "r.yaml", port=free_port(), spool=tmp_path / "spool", model=model_file,
                        destinations={c: {"folder": str(tmp_path / c)} for c in (*CLASSES, "uncertain")},
                        stow={"host": "0.0.0.0", "port": 8104})
    with pytest.raises(ConfigError, match="loopback"):
        load_config(path)
    monkeypatch.setenv("ROUTER_STOW_TOKEN", "short")
    with pytest.raises(ConfigError, match="too easy to guess"):
        load_config(path)
    monkeypatch.setenv("ROUTER_STOW_TOKEN", TOKEN)
    config = load_config(path)
    assert TOKEN not in repr(config) and TOKEN not in str(config.to_dict())


def test_stow_rs_kill_9_loses_nothing_acknowledged(processes, model_file, tmp_path):
    """router.py is killed (SIGKILL) while two senders stream instances in; every instance acknowledged (HTTP 200)
    before the kill is delivered after the restart; the senders then send everything again: each arrives."""
    folder = tmp_path / "many"
    make_samples(folder, per_class=8, uncertain=2, extra_bad=False)
    samples = expected_labels(model_file, sorted(folder.iterdir()))
    out = tmp_path / "delivered"
    port = free_port()
    config = write_config(tmp_path / "router.yaml", port=free_port(), spool=tmp_path / "spool", model=model_file,
                          destinations={c: {"folder": str(out / c)} for c in (*CLASSES, "uncertain")},
                          stow=stow_block(port))
    router = start_router(processes, config, tmp_path / "router-1.log")
    url = f"http://127.0.0.1:{port}/studies"
    acknowledged: set[str] = set()
    stop = threading.Event()

    def send(paths: list[Path]) -> None:
        for path in paths:
            if stop.is_set():
                return
            try:
                answer = post(url, [path.read_bytes()], token=None)
            except requests.RequestException:
                return  # the router is gone: this one was not acknowledged
            if answer.status_code == 200:
                acknowledged.update(uids(answer.json(), STORED))

    paths = sorted(s.path for s in samples.values())
    senders = [threading.Thread(target=send, args=(paths[i::2],)) for i in range(2)]
    for thread in senders:
        thread.start()
    wait_for(lambda: len(acknowledged) >= 6, TIMEOUT, "the first instances to be acknowledged", interval=0.01)
    router.kill(signal.SIGKILL)
    stop.set()
    for thread in senders:
        thread.join(timeout=60)
    before = set(acknowledged)
    assert len(before) < len(samples), "every upload finished before the kill; nothing was cut off"

    start_router(processes, config, tmp_path / "router-2.log")
    wait_for(lambda: before <= set(received_files(out)), TIMEOUT, "every acknowledged instance to be delivered")
    for path in paths:  # the senders retry everything
        assert post(url, [path.read_bytes()], token=None).status_code == 200
    wait_for(lambda: set(samples) <= set(received_files(out)), TIMEOUT, "every instance to be delivered")
    for uid, copies in received_files(out).items():
        assert samples[uid].label in {p.relative_to(out).parts[0] for p in copies}
        for copy in copies:
            assert copy.read_bytes() == samples[uid].path.read_bytes()


class Free:
    """A stand-in for shutil.disk_usage: ``free`` bytes of a 10 GB filesystem."""

    def __init__(self, free: int) -> None:
        self.free, self.total = free, 10 * 1024 ** 3

    def __call__(self, path: str):
        return self


def test_tls_basic_users_limits_and_the_disk_reserve(tmp_path, samples):
    """The STOW-RS server alone (no model): HTTPS with the site's CA, HTTP basic users (429 after repeated failures),
    max_concurrent (503 + Retry-After while an upload runs), and the free-space reserve (0xA700, nothing spooled)."""
    import time

    from tests.routing.test_tls import CA
    from utils.routing.intake.space import ReceptionGate
    from utils.routing.intake.stow import OUT_OF_RESOURCES, StowReceiver, StowServer, StowSettings
    from utils.routing.operations.audit import AuditLog
    from utils.routing.operations.console import hash_password
    from utils.routing.queue import SpoolQueue

    ca = CA(tmp_path, "site-ca")
    cert, key = ca.issue("router")
    queue, audit = SpoolQueue(tmp_path / "spool"), AuditLog(tmp_path / "spool" / "audit.jsonl")
    free = Free(5 * 1024 ** 3)
    gate = ReceptionGate(tmp_path / "spool", 1000, 0, audit, probe=free)
    settings = StowSettings(host="127.0.0.1", port=0, tls_cert=cert, tls_key=key, max_concurrent=1, max_failures=2,
                            users={"modality": hash_password("right horse battery", time_cost=1, memory_kib=8)})
    server = StowServer(settings, queue, StowReceiver(queue, audit, lambda: None, gate)).serve()
    url = f"https://127.0.0.1:{server.port}/studies"
    # accepted connections get TCP_NODELAY from asyncio only on an IPPROTO_TCP socket (else each answer waits for
    # the sender's delayed ACK: ~40 ms per request)
    assert server.socket.proto == socket.IPPROTO_TCP
    good = samples[sorted(samples)[0]].path.read_bytes()
    body, content_type = multipart([good])
    headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
    try:
        with pytest.raises(requests.exceptions.SSLError):  # a certificate the client's CA did not sign
            requests.post(url, data=body, headers=headers, timeout=30)
        with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP to the TLS port
            requests.post(url.replace("https", "http"), data=body, headers=headers, timeout=30)
        ok = requests.post(url, data=body, headers=headers, auth=("modality", "right horse battery"),
                           verify=str(ca.pem), timeout=30)
        assert ok.status_code == 200 and uids(ok.json(), STORED)
        for _ in range(2):
            wrong = requests.post(url, data=body, headers=headers, auth=("modality", "wrong"), verify=str(ca.pem),
                                  timeout=30)
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Basic")
        throttled = requests.post(url, data=body, headers=headers, auth=("modality", "right horse battery"),
                                  verify=str(ca.pem), timeout=30)
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) > 0

        # max_concurrent: 1 -> a second upload while one is still sending its body is turned away
        server.close()
        settings = StowSettings(host="127.0.0.1", port=0, max_concurrent=1)
        server = StowServer(settings, queue, StowReceiver(queue, audit, lambda: None, gate)).serve()
        url = f"http://127.0.0.1:{server.port}/studies"
        release = threading.Event()

        def slow():
            yield body[:100]
            release.wait(30)
            yield body[100:]

        first: list[requests.Response] = []
        sender = threading.Thread(target=lambda: first.append(requests.post(url, data=slow(), headers=headers,
                                                                             timeout=60)))
        sender.start()
        time.sleep(0.5)
        busy = post(url, [good], token=None)
        release.set()
        sender.join(60)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert first[0].status_code == 200

        # a body that stops arriving does not hold the only slot: 408 after BODY_IDLE_S, then the next one is served
        import utils.routing.intake.stow as stow_module

        stow_module.BODY_IDLE_S, idle = 1.0, stow_module.BODY_IDLE_S
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as trickle:
                trickle.sendall(f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                                f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
                answer = trickle.recv(4096)  # and then nothing more is sent
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert post(url, [good], token=None).status_code == 200
            # a sender that disappears in the middle of a part: what it wrote is deleted, the port serves on
            big, big_type = multipart([good + bytes(3 << 20)])  # cut after 2 MB: a part file is on disk by then
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as gone:
                gone.sendall(f"POST /studies HTTP/1.1\r\nHost: x\r\nContent-Type: {big_type}\r\n"
                             f"Content-Length: {len(big)}\r\n\r\n".encode() + big[:2 << 20])
                wait_for(lambda: list((tmp_path / "spool" / "incoming").iterdir()), 10, "the part file")
            wait_for(lambda: post(url, [good], token=None).status_code == 200, 10, "the cut upload's slot to be freed")
            assert not list((tmp_path / "spool" / "incoming").iterdir())
        finally:
            stow_module.BODY_IDLE_S = idle

        # below the free-space reserve: the instance fails with 0xA700 and nothing is written
        free.free = 500 * 1024 ** 2
        before = sorted((tmp_path / "spool" / "files").iterdir())
        refused = post(url, [good], token=None)
        assert refused.status_code == 409, refused.text
        assert [i[REASON]["Value"][0] for i in items(refused.json(), FAILED)] == [OUT_OF_RESOURCES]
        assert uids(refused.json(), FAILED) == {sorted(samples)[0]}  # named from the part's first bytes
        assert sorted((tmp_path / "spool" / "files").iterdir()) == before
        assert not list((tmp_path / "spool" / "incoming").iterdir())
        assert gate.paused
    finally:
        server.close()
        audit.close()
        queue.close()
