"""A small STOW-RS server in a thread for tests: records each request and answers what the test scripts.

    server = FakeStowServer()                       # http://127.0.0.1:<port>/dicom-web
    server.script = lambda request: Reply.json(200, stored=request.uids)
    ...
    server.requests[0].parts                        # the bytes of each part, as received
    server.close()

``script(request)`` returns a :class:`Reply` or :data:`DROP` (the connection is closed without an answer). The
default stores everything (HTTP 200, every instance in ReferencedSOPSequence). Answers are DICOM JSON
(:meth:`Reply.json`), PS3.19 XML (:meth:`Reply.xml`) or anything else (:class:`Reply` itself). HTTP/1.1 with
keep-alive, so a client's connection pool shows in ``request.client_port``.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import pydicom

DROP = "drop"


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    chunked: bool
    client_port: int
    parts: list[bytes] = field(default_factory=list)
    part_types: list[str] = field(default_factory=list)

    @property
    def uids(self) -> list[str]:
        """SOP Instance UIDs of the parts (a part that is not DICOM: "")."""
        out = []
        for part in self.parts:
            try:
                out.append(str(pydicom.dcmread(BytesIO(part), stop_before_pixels=True).SOPInstanceUID))
            except Exception:  # noqa: BLE001 - a part that is not DICOM
                out.append("")
        return out


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"

    @classmethod
    def json(cls, status: int, stored=(), failed: dict | None = None, warnings: dict | None = None) -> Reply:
        """A Store Instances Response in DICOM JSON: ``stored`` UIDs (``warnings``: UID -> WarningReason) in
        ReferencedSOPSequence, ``failed`` (UID -> FailureReason) in FailedSOPSequence."""
        warnings = warnings or {}

        def item(uid: str, tag: str | None = None, code: int | None = None) -> dict:
            out = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.1.1"]},
                   "00081155": {"vr": "UI", "Value": [uid]}}
            if tag is not None:
                out[tag] = {"vr": "US", "Value": [code]}
            return out

        document = {"00081190": {"vr": "UR", "Value": ["http://pacs/studies/1"]}}
        if stored:
            document["00081199"] = {"vr": "SQ", "Value": [item(u, "00081196" if u in warnings else None,
                                                                 warnings.get(u)) for u in stored]}
        if failed:
            document["00081198"] = {"vr": "SQ", "Value": [item(u, "00081197", c) for u, c in failed.items()]}
        return cls(status, json.dumps(document).encode(), "application/dicom+json")

    @classmethod
    def xml(cls, status: int, stored=(), failed: dict | None = None) -> Reply:
        """The same in the Native DICOM Model (PS3.19), with its namespace."""
        def item(number: int, uid: str, code: int | None = None) -> str:
            reason = (f'<DicomAttribute tag="00081197" vr="US" keyword="FailureReason"><Value number="1">{code}'
                      f'</Value></DicomAttribute>' if code is not None else "")
            return (f'<Item number="{number}"><DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID">'
                    f'<Value number="1">{uid}</Value></DicomAttribute>{reason}</Item>')

        referenced = "".join(item(n, u) for n, u in enumerate(stored, 1))
        refused = "".join(item(n, u, c) for n, (u, c) in enumerate((failed or {}).items(), 1))
        text = ('<?xml version="1.0" encoding="UTF-8"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/'
                'NativeDICOM">' + (f'<DicomAttribute tag="00081199" vr="SQ">{referenced}</DicomAttribute>'
                                   if stored else "")
                + (f'<DicomAttribute tag="00081198" vr="SQ">{refused}</DicomAttribute>' if failed else "")
                + "</NativeDicomModel>")
        return cls(status, text.encode(), "application/dicom+xml")


def store_everything(request: Received) -> Reply:
    return Reply.json(200, stored=request.uids)


def split_multipart(body: bytes, content_type: str) -> tuple[list[bytes], list[str]]:
    """The parts of a multipart body (bytes between a part's header block and the CRLF before the next delimiter)
    and each part's Content-Type."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    boundary = params["boundary"].strip('"').encode()
    pieces = body.split(b"--" + boundary)
    assert pieces[-1].startswith(b"--"), "no closing delimiter"
    parts, types = [], []
    for piece in pieces[1:-1]:
        assert piece.startswith(b"\r\n") and piece.endswith(b"\r\n"), "a part is not framed by CRLF"
        head, _, data = piece[2:-2].partition(b"\r\n\r\n")
        parts.append(data)
        types.append(next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-type:")), ""))
    return parts, types


class FakeStowServer:
    """``ssl_context``: HTTPS with it (a server context; CERT_REQUIRED asks the client for its certificate)."""

    def __init__(self, ssl_context=None) -> None:
        self.requests: list[Received] = []
        self.script = store_everything
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server's name
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
                body = self._chunked() if chunked else self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Received("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body, chunked,
                                   self.client_address[1])
                if "multipart/related" in self.headers.get("Content-Type", ""):
                    request.parts, request.part_types = split_multipart(body, self.headers["Content-Type"])
                self._answer(request)

            def do_GET(self):  # noqa: N802 - a search (router.py --check's probe): recorded, answered by the script
                self._answer(Received("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, b"", False,
                                      self.client_address[1]))

            def _answer(self, request: Received) -> None:
                with owner._lock:
                    owner.requests.append(request)
                reply = owner.script(request)
                if reply == DROP:
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def _chunked(self) -> bytes:
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if not size:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client that gave up (a timeout test) is no news
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if ssl_context is not None else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def received_uids(self) -> list[str]:
        """Every part's SOP Instance UID over all requests (so a second delivery shows twice)."""
        return [uid for request in self.requests for uid in request.uids]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
