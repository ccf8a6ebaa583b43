"""A small in-process DICOMweb archive for tests: QIDO-RS (studies, series, instances; limit/offset, a result cap with
or without the standard's 299 warning) and WADO-RS (one instance as multipart/related), on 127.0.0.1 in a thread.

    with FakeArchive() as archive:
        archive.add("1.2.3", "1.2.3.1", "DX", "1.2.3.1.1", b"DICM bytes", date="20240115")
        archive.url          # http://127.0.0.1:<port>/dicom-web
        archive.requests     # every request: (path, query dict, headers)

Hooks for the misbehaviours a client must survive: ``failures`` (instance UID -> statuses answered before the
bytes), ``answers`` (instance UID -> raw (content type, body) sent instead), ``junk`` (search path -> extra objects
appended to its results: hostile UIDs), ``cap`` (the most results one page holds whatever the limit),
``statuses`` (search or instance path -> an error status always answered there), ``ignore_offset``,
``user``/``password`` (HTTP basic required when set), ``refuse_any_syntax`` (406 for
transfer-syntax=*).
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BOUNDARY = "fake-archive-boundary-0123456789"


@dataclass
class Instance:
    study: str
    series: str
    modality: str
    sop: str
    data: bytes
    date: str = "20240115"


@dataclass
class FakeArchive:
    cap: int | None = None
    warn_when_capped: bool = True
    ignore_offset: bool = False
    user: str = ""
    password: str = ""
    refuse_any_syntax: bool = False
    instances: list[Instance] = field(default_factory=list)
    failures: dict[str, list[int]] = field(default_factory=dict)
    answers: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    junk: dict[str, list[dict]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str], dict[str, str]]] = field(default_factory=list)

    def add(self, study: str, series: str, modality: str, sop: str, data: bytes, date: str = "20240115") -> str:
        self.instances.append(Instance(study, series, modality, sop, data, date))
        return f"/studies/{study}/series/{series}/instances/{sop}"

    def __enter__(self) -> FakeArchive:
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                archive._answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def paths(self) -> list[str]:
        """The paths asked for, without their query."""
        return [path for path, _, _ in self.requests]

    # --- the server side ---------------------------------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urllib.parse.urlsplit(handler.path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        self.requests.append((parts.path, query, dict(handler.headers)))
        if self.user and handler.headers.get("Authorization") != "Basic " + base64.b64encode(
                f"{self.user}:{self.password}".encode()).decode():
            return self._send(handler, 401, "text/plain", b"who are you")
        if parts.path.removeprefix("/dicom-web") in self.statuses:
            return self._send(handler, self.statuses[parts.path.removeprefix("/dicom-web")], "text/plain", b"no")
        steps = parts.path.removeprefix("/dicom-web").strip("/").split("/")
        if steps[:1] != ["studies"] or len(steps) not in (1, 3, 5, 6):
            return self._send(handler, 404, "text/plain", b"no such resource")
        if len(steps) == 6:
            return self._instance(handler, steps[5])
        if len(steps) == 1:
            found = {i.study: i for i in self.instances
                     if (not query.get("ModalitiesInStudy") or query["ModalitiesInStudy"] in self._modalities(i.study))
                     and _in_range(i.date, query.get("StudyDate", ""))}
            results = [{"0020000D": {"vr": "UI", "Value": [i.study]}, "00080020": {"vr": "DA", "Value": [i.date]}}
                       for i in found.values()]
        elif len(steps) == 3:
            found = {i.series: i for i in self.instances if i.study == steps[1]}
            results = [{"0020000E": {"vr": "UI", "Value": [i.series]}, "00080060": {"vr": "CS", "Value": [i.modality]}}
                       for i in found.values()]
        else:
            results = [{"00080018": {"vr": "UI", "Value": [i.sop]}} for i in self.instances
                       if i.study == steps[1] and i.series == steps[3]]
        results += self.junk.get(parts.path.removeprefix("/dicom-web"), [])
        offset = 0 if self.ignore_offset else int(query.get("offset", 0))
        limit = int(query.get("limit", len(results) or 1))
        size = min(limit, self.cap) if self.cap else limit
        page = results[offset:offset + size]
        headers = {}
        if self.cap and self.warn_when_capped and limit > self.cap and len(results) > offset + size:
            headers["Warning"] = '299 fake: The number of results exceeded the maximum supported by the server. ' \
                                 'Additional results can be requested.'
        self._send(handler, 200, "application/dicom+json", json.dumps(page).encode(), headers)

    def _modalities(self, study: str) -> set[str]:
        return {i.modality for i in self.instances if i.study == study}

    def _instance(self, handler: BaseHTTPRequestHandler, sop: str) -> None:
        failures = self.failures.get(sop)
        if failures:
            return self._send(handler, failures.pop(0), "text/plain", b"not now")
        if sop in self.answers:
            content_type, body = self.answers[sop]
            return self._send(handler, 200, content_type, body)
        accept = handler.headers.get("Accept", "")
        if self.refuse_any_syntax and "transfer-syntax=*" in accept:
            return self._send(handler, 406, "text/plain", b"transfer-syntax=* not supported")
        match = [i for i in self.instances if i.sop == sop]
        if not match:
            return self._send(handler, 404, "text/plain", b"no such instance")
        self._send(handler, 200, f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                   multipart(match[0].data))

    @staticmethod
    def _send(handler, status: int, content_type: str, body: bytes, headers: dict | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)


def multipart(*bodies: bytes, boundary: str = BOUNDARY, part_type: str = "application/dicom",
              length: bool = True, close: bool = True) -> bytes:
    """A multipart/related body with one part per body."""
    out = b""
    for body in bodies:
        head = f"Content-Type: {part_type}\r\n" + (f"Content-Length: {len(body)}\r\n" if length else "")
        out += f"--{boundary}\r\n{head}\r\n".encode() + body + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def _in_range(date: str, wanted: str) -> bool:
    if not wanted:
        return True
    low, dash, high = wanted.partition("-")
    if not dash:
        return date == low
    return (not low or date >= low) and (not high or date <= high)
