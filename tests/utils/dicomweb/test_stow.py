"""utils/dicomweb/stow.py: the multipart body (exact bytes, standard framing, streamed, a known length), the
answer read per instance (DICOM JSON and XML, hostile answers), request planning, and one request against the
fake server (headers, credentials, Content-Length rather than chunks)."""

from __future__ import annotations

import email.parser
import email.policy
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from tests.fake_stow_server import FakeStowServer, Reply
from utils.dicomweb.http import DicomwebError, Endpoint, HttpAuth
from utils.dicomweb.stow import (MAX_ANSWER_BYTES, Cancelled, MultipartBody, parse_answer, plan, reason_text,
                                 store_instances)
from utils.io.dicom_writer import write_dicom


@pytest.fixture
def files(tmp_path) -> list[Path]:
    image = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    return [write_dicom(tmp_path / "a.dcm", image), write_dicom(tmp_path / "b.dcm", image[::-1],
                                                                  transfer_syntax=RLELossless),
            write_dicom(tmp_path / "c.dcm", image.T, transfer_syntax=ExplicitVRLittleEndian)]


@pytest.fixture
def server():
    made = FakeStowServer()
    yield made
    made.close()


def test_the_body_is_standard_multipart_with_each_files_bytes_and_its_exact_length(files):
    body = MultipartBody(files, chunk_bytes=1000)  # several chunks per file
    data = b"".join(body)
    assert len(data) == len(body)
    assert data == b"".join(body)  # iterable again from the start (a retried send)
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {body.content_type}\r\n\r\n".encode() + data)
    assert message.get_content_type() == "multipart/related" and message.get_param("type") == "application/dicom"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts] == ["application/dicom"] * 3
    assert [p.get_payload(decode=True) for p in parts] == [f.read_bytes() for f in files]
    assert MultipartBody(files).boundary != body.boundary  # random per request


def test_a_cancelled_body_stops_and_a_changed_or_missing_file_is_refused(files, tmp_path):
    asked = []
    body = MultipartBody(files, chunk_bytes=1000, cancelled=lambda: len(asked) > 3 or asked.append(1))
    with pytest.raises(Cancelled):
        b"".join(body)
    body = MultipartBody(files)
    with open(files[1], "ab") as handle:
        handle.write(b"more")
    with pytest.raises(OSError, match="changed size"):
        b"".join(body)
    with pytest.raises(FileNotFoundError):
        MultipartBody([tmp_path / "gone.dcm"])


def test_json_answers_per_instance():
    answer = parse_answer(202, "application/dicom+json; charset=utf-8",
                          Reply.json(202, stored=["1.1", "1.2"], failed={"1.3": 0xA700},
                                     warnings={"1.2": 0xB000}).body)
    assert answer.readable and answer.status == 202
    assert answer.outcome("1.1").stored and not answer.outcome("1.1").warning
    assert answer.outcome("1.2").stored and answer.outcome("1.2").warning
    assert answer.outcome("1.2").reason == "0xB000 (coercion of data elements)"
    assert not answer.outcome("1.3").stored and answer.outcome("1.3").reason == "0xA700 (out of resources)"
    assert not answer.outcome("1.4").stored and not answer.outcome("1.4").listed  # 202: not named, not stored
    assert parse_answer(200, "application/dicom+json", b"").outcome("9.9").stored  # 200: all stored
    # 409: none stored, whatever the answer lists; an array of one data set is read too
    conflict = parse_answer(409, "application/dicom+json",
                            b"[" + Reply.json(409, stored=["1.1"], failed={"1.2": 0x0122}).body + b"]")
    assert not conflict.outcome("1.1").stored and conflict.outcome("1.2").reason == "0x0122 (SOP class not supported)"
    assert reason_text(0xA7FF) == "0xA7FF (out of resources)" and reason_text(0x1234) == "0x1234"


def test_xml_answers_per_instance():
    answer = parse_answer(202, "application/dicom+xml", Reply.xml(202, stored=["1.1"], failed={"1.2": 43264}).body)
    assert answer.readable and answer.outcome("1.1").stored
    assert answer.outcome("1.2").reason == "0xA900 (data set does not match SOP class)"


@pytest.mark.parametrize(("content_type", "body", "problem"), [
    ("application/dicom+xml", b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>',
     "document type declaration"),
    ("application/dicom+json", b"[" * 100_000, "cannot be read"),
    ("application/dicom+json", b'"just a string"', "cannot be read"),
    ("text/html", b"<html><body>Welcome to the PACS</body></html>", "not DICOM JSON or XML"),
    ("application/dicom+json", b"", "empty"),
])
def test_hostile_or_foreign_answers_are_not_read(content_type, body, problem):
    answer = parse_answer(200, content_type, body)
    assert not answer.readable and problem in answer.problem


def test_answers_with_wrong_types_yield_nothing_false_and_text_is_log_safe():
    body = json.dumps({"00081199": {"vr": "SQ", "Value": [{"00081155": {"Value": [7]}}, "x", None]},
                       "00081198": {"Value": [{"00081155": {"Value": ["1.9"]}, "00081197": {"Value": [True, "a"]}}]},
                       "00081196": 5}).encode()
    answer = parse_answer(202, "application/dicom+json", body)
    assert answer.readable and answer.stored == {} and answer.failed == {"1.9": "FailureReason missing"}
    hostile = parse_answer(400, "text/plain", b"bad\r\n\x1b[31m2024 forged line\xe2\x80\xae", "Bad\nRequest")
    assert "\n" not in hostile.describe() and "\x1b" not in hostile.describe() and "\u202e" not in hostile.describe()
    too_long = parse_answer(200, "application/dicom+json", None)
    assert not too_long.readable and str(MAX_ANSWER_BYTES) in too_long.problem and not too_long.empty


def test_plan_bounds_count_and_bytes_and_keeps_uids_apart():
    assert plan([10] * 5, max_instances=2, max_bytes=100) == [[0, 1], [2, 3], [4]]
    assert plan([60, 60, 500, 10], max_instances=10, max_bytes=100) == [[0], [1], [2], [3]]  # a large one alone
    assert plan([1, 1, 1], ["u1", "u2", "u1"], max_instances=10, max_bytes=100) == [[0, 1], [2]]
    assert plan([], max_instances=1, max_bytes=1) == []


def test_one_request_against_a_server(files, server):
    server.script = lambda request: Reply.json(200, stored=request.uids)
    endpoint = Endpoint.create(server.url + "/", auth=HttpAuth.basic("router", "pw"), timeout_s=10)
    with endpoint.session() as http:
        answer = store_instances(http, endpoint, files)
        assert answer.status == 200 and answer.readable and len(answer.stored) == 3
        bearer = Endpoint.create(server.url, auth=HttpAuth.bearer("t0ken"), timeout_s=10)
        store_instances(bearer.session(), bearer, files[:1], study="1.2.3")
    first, second = server.requests
    assert first.path == "/dicom-web/studies" and second.path == "/dicom-web/studies/1.2.3"
    assert first.parts == [f.read_bytes() for f in files] and first.part_types == ["application/dicom"] * 3
    assert not first.chunked and int(first.headers["content-length"]) == len(first.body)
    assert first.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert first.headers["accept"].startswith("application/dicom+json")
    assert first.headers["authorization"] == "Basic cm91dGVyOnB3"  # router:pw
    assert second.headers["authorization"] == "Bearer t0ken"


def test_no_answer_is_a_dicomweb_error_and_a_cancelled_upload_comes_through_requests(files, server):
    server.script = lambda request: "drop"
    endpoint = Endpoint.create(server.url, timeout_s=10)
    with pytest.raises(DicomwebError) as raised:
        store_instances(endpoint.session(), endpoint, files)
    assert raised.value.status is None and "POST" in str(raised.value)
    stop = iter([False, False, True])
    with pytest.raises(Cancelled):  # the router's forwarder stopping mid-upload: nothing recorded, sent again later
        store_instances(endpoint.session(), endpoint, files, cancelled=lambda: next(stop))
    assert len(server.requests) == 1  # the cancelled upload never became a request
