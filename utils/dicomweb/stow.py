"""STOW-RS on the client side (PS3.18 10.5): files sent as they are, the answer read per instance.

    endpoint = Endpoint.create("https://pacs.example/dicom-web", auth=HttpAuth.basic("router", password))
    with endpoint.session() as http:
        answer = store_instances(http, endpoint, [Path("a.dcm"), Path("b.dcm")])
    answer.status                      # 200 all stored, 202 some, 409 none; any other status as it came
    answer.outcome("1.2.3")            # InstanceOutcome(stored, warning, reason) of one SOP instance

The request is ``POST {url}/studies`` with ``multipart/related; type="application/dicom"``: one part per file, each
file's bytes exactly as they are on disk (a DICOM PS3.10 file: preamble, File Meta Information, data set; nothing
parsed, decoded or re-encoded). The body is streamed from the files in chunks of :data:`CHUNK_BYTES` with a
Content-Length known in advance (the sum of the file sizes and the part headers), so a study of any size costs a
chunk of memory, and no server has to support chunked uploads. The boundary is random for each request (a sender
cannot plant it in a file's bytes beforehand).

The answer is the Store Instances Response Module in DICOM JSON (``application/dicom+json``, asked for first) or
the XML of PS3.19 (``application/dicom+xml``): ReferencedSOPSequence (0008,1199) lists the instances stored (with
WarningReason (0008,1196) when the server coerced something), FailedSOPSequence (0008,1198) the ones refused with
their FailureReason (0008,1197). The server's answer is hostile input: at most :data:`MAX_ANSWER_BYTES` are read,
XML with a document type declaration is not parsed, values of the wrong type are ignored, and every text that can
reach a log line goes through :func:`utils.untrusted.log_safe`. What an HTTP status *means* for the objects (retry,
give up, destination down) is the caller's policy (the router's: utils/routing/delivery/dicomweb.py).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from utils.dicomweb.http import Endpoint
from utils.untrusted import log_safe

CHUNK_BYTES = 1 << 20  # read from a file and handed to the socket at a time
MAX_ANSWER_BYTES = 4 << 20  # of an answer read at most (a few hundred bytes per instance; the rest is not STOW-RS)
ACCEPT = "application/dicom+json, application/dicom+xml;q=0.9, application/json;q=0.8"
PART_TYPE = "application/dicom"

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
REFERENCED_SOP_INSTANCE_UID = "00081155"
REFERENCED_SOP_CLASS_UID = "00081150"

# FailureReason / WarningReason values of PS3.18 (Store Instances Response) and PS3.4 (C-STORE statuses); others are
# shown by their number and the class PS3.4 gives its high byte.
REASONS = {0x0110: "processing failure", 0x0122: "SOP class not supported", 0x0124: "not authorized",
           0x0211: "unrecognized operation", 0xA700: "out of resources", 0xA900: "data set does not match SOP class",
           0xC000: "cannot understand", 0xC122: "transfer syntax not supported",
           0xC409: "study instance UID does not match the request",
           0xB000: "coercion of data elements", 0xB006: "elements discarded",
           0xB007: "data set does not match SOP class"}


class Cancelled(Exception):
    """The body's ``cancelled()`` said stop while the request was being sent (nothing is known of the outcome)."""


class MultipartBody:
    """A ``multipart/related; type="application/dicom"`` body read from files as it is sent.

    ``len(body)`` is its exact size; iterating it yields the bytes (again from the start at each iteration). A file
    that is gone raises FileNotFoundError at construction; one that changed size since raises OSError while it is
    sent (the Content-Length would lie). ``cancelled``: asked before every chunk; True raises :class:`Cancelled`.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], *, boundary: str | None = None,
                 cancelled: Callable[[], bool] | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.paths = [Path(p) for p in paths]
        self.boundary = boundary or f"stow-{secrets.token_hex(16)}"
        self.cancelled = cancelled
        self.chunk_bytes = chunk_bytes
        self.sizes = [p.stat().st_size for p in self.paths]
        self._head = f"--{self.boundary}\r\nContent-Type: {PART_TYPE}\r\n\r\n".encode("ascii")
        self._tail = f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="{PART_TYPE}"; boundary={self.boundary}'

    def __len__(self) -> int:
        return sum(len(self._head) + size + 2 for size in self.sizes) + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        for path, size in zip(self.paths, self.sizes):
            self._check()
            yield self._head
            sent = 0
            with open(path, "rb") as handle:
                while True:
                    self._check()
                    chunk = handle.read(min(self.chunk_bytes, size - sent + 1))
                    if not chunk:
                        break
                    sent += len(chunk)
                    if sent > size:
                        break
                    yield chunk
            if sent != size:
                raise OSError(f"{path} changed size while being sent ({size} bytes announced)")
            yield b"\r\n"
        yield self._tail

    def _check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise Cancelled("cancelled while sending")


@dataclass(frozen=True)
class InstanceOutcome:
    """What the answer says of one SOP instance. ``listed``: named in either sequence of the answer."""
    stored: bool
    warning: bool = False
    reason: str = ""  # FailureReason or WarningReason in words (log-safe), or why nothing is known
    listed: bool = False


@dataclass
class StowAnswer:
    """One STOW-RS answer: the HTTP status, what its body says per SOP Instance UID, and a log-safe excerpt.

    ``stored``: UID -> the WarningReason text ("" for none) of the ReferencedSOPSequence; ``failed``: UID -> the
    FailureReason text of the FailedSOPSequence. ``readable``: the body was a Store Instances Response (DICOM JSON or
    XML; an empty body is not); ``problem``: why it could not be read, when it could not."""
    status: int
    reason: str = ""  # the HTTP reason phrase (log-safe)
    content_type: str = ""
    stored: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    readable: bool = False
    problem: str = ""
    excerpt: str = ""  # the start of the body, one line, log-safe (for an error status's reason)
    empty: bool = True

    def outcome(self, sop_instance_uid: str) -> InstanceOutcome:
        """The instance's outcome by the answer's sequences; one it does not name is stored only under HTTP 200
        (PS3.18: "200 OK: all instances stored")."""
        if sop_instance_uid in self.failed:
            return InstanceOutcome(False, reason=self.failed[sop_instance_uid], listed=True)
        if sop_instance_uid in self.stored and self.status != 409:  # 409: none stored, whatever a list says
            warning = self.stored[sop_instance_uid]
            return InstanceOutcome(True, warning=bool(warning), reason=warning, listed=True)
        if self.status == 200:
            return InstanceOutcome(True)
        return InstanceOutcome(False, reason="not listed in the answer's ReferencedSOPSequence (0008,1199)")

    def describe(self) -> str:
        """``HTTP 400 Bad Request: <the start of the body>`` (log-safe)."""
        text = f"HTTP {self.status}" + (f" {self.reason}" if self.reason else "")
        return text + (f": {self.excerpt}" if self.excerpt else "")


def store_instances(http, endpoint: Endpoint, paths: Sequence[str | os.PathLike], *, study: str | None = None,
                    cancelled: Callable[[], bool] | None = None, boundary: str | None = None) -> StowAnswer:
    """POST the files to ``{endpoint.url}/studies[/{study}]`` in one multipart request; the answer, whatever its
    status. DicomwebError when no answer came (refused, unreachable, TLS, timeout; utils/dicomweb/http.py);
    FileNotFoundError when a file is gone before sending; :class:`Cancelled` when ``cancelled()`` said stop."""
    import urllib.parse

    body = MultipartBody(paths, boundary=boundary, cancelled=cancelled)
    path = "/studies" + (f"/{urllib.parse.quote(study, safe='')}" if study else "")
    answer = endpoint.request(http, "POST", path, data=body, stream=True, allow_redirects=False,
                              ok=range(300, 600),  # every status: the caller decides what it means
                              headers={"Content-Type": body.content_type, "Accept": ACCEPT})
    try:
        content = _read_limited(answer, MAX_ANSWER_BYTES)
    finally:
        answer.close()
    return parse_answer(answer.status_code, answer.headers.get("Content-Type", ""), content, answer.reason or "")


def _read_limited(answer, limit: int) -> bytes | None:
    """The body, or None when it is longer than ``limit`` (what was read is dropped)."""
    parts, total = [], 0
    for chunk in answer.iter_content(64 << 10):
        total += len(chunk)
        if total > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def parse_answer(status: int, content_type: str, content: bytes | None, reason: str = "") -> StowAnswer:
    """A STOW-RS answer from its parts (``content`` None: longer than MAX_ANSWER_BYTES)."""
    media = content_type.split(";", 1)[0].strip().lower()
    answer = StowAnswer(status, log_safe(reason, 60), log_safe(media, 80))
    if content is None:
        answer.problem, answer.empty = f"the answer is longer than {MAX_ANSWER_BYTES} bytes", False
        return answer
    answer.empty = not content.strip()
    answer.excerpt = _excerpt(content)
    if answer.empty:
        answer.problem = "the answer is empty"
        return answer
    try:
        if media.endswith("xml"):
            referenced, failed = _from_xml(content)
        elif media.endswith("json"):
            referenced, failed = _from_json(content)
        else:
            answer.problem = f"the answer is {answer.content_type or 'untyped'}, not DICOM JSON or XML"
            return answer
    except (ValueError, RecursionError) as error:  # json / ElementTree errors are ValueErrors
        answer.problem = f"the answer cannot be read as {media}: {log_safe(str(error), 120)}"
        return answer
    answer.stored = {uid: _reason(item, WARNING_REASON) for uid, item in referenced}
    answer.failed = {uid: _reason(item, FAILURE_REASON) or "FailureReason missing" for uid, item in failed}
    answer.readable = True
    return answer


def _excerpt(content: bytes) -> str:
    text = content[:400].decode("utf-8", "replace")
    return log_safe(" ".join(text.split()), 200)


def reason_text(code: int) -> str:
    """``0xA700 (out of resources)``; an unknown code by its number and PS3.4's class of its high byte."""
    words = REASONS.get(code)
    if words is None:
        high = code >> 8
        words = ("out of resources" if high == 0xA7 else "data set does not match SOP class" if high == 0xA9 else
                 "cannot understand" if high >> 4 == 0xC else "warning" if high >> 4 == 0xB else "")
    return f"0x{code:04X}" + (f" ({words})" if words else "")


def _reason(item: dict[str, list], tag: str) -> str:
    codes = [v for v in item.get(tag, []) if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFF]
    return ", ".join(reason_text(c) for c in codes[:3])


def _uid(item: dict[str, list]) -> str | None:
    values = [v for v in item.get(REFERENCED_SOP_INSTANCE_UID, []) if isinstance(v, str)]
    return values[0].strip().rstrip("\x00") if values else None


def _from_json(content: bytes) -> tuple[list, list]:
    document = json.loads(content)
    if isinstance(document, list) and len(document) == 1:  # some servers answer an array of one data set
        document = document[0]
    if not isinstance(document, dict):
        raise ValueError("not a DICOM JSON data set")
    document = {str(k).upper(): v for k, v in document.items()}

    def items(tag: str) -> list[tuple[str, dict]]:
        element = document.get(tag)
        values = element.get("Value", []) if isinstance(element, dict) else []
        out = []
        for value in values if isinstance(values, list) else []:
            if isinstance(value, dict):
                flat = {}
                for key, attribute in value.items():
                    raw = attribute.get("Value", []) if isinstance(attribute, dict) else []
                    flat[str(key).upper()] = raw if isinstance(raw, list) else []
                uid = _uid(flat)
                if uid:
                    out.append((uid, flat))
        return out

    return items(REFERENCED_SOP_SEQUENCE), items(FAILED_SOP_SEQUENCE)


def _from_xml(content: bytes) -> tuple[list, list]:
    import xml.etree.ElementTree as ElementTree

    if b"<!DOCTYPE" in content.upper() or b"<!ENTITY" in content.upper():
        raise ValueError("a document type declaration is not accepted")
    root = ElementTree.fromstring(content)

    def name(element) -> str:
        return element.tag.rsplit("}", 1)[-1]

    def attributes(parent) -> dict[str, object]:
        return {(child.get("tag") or "").upper(): child for child in parent if name(child) == "DicomAttribute"}

    def values(attribute) -> list:
        out = []
        for value in attribute:
            if name(value) != "Value" or value.text is None:
                continue
            text = value.text.strip()
            out.append(int(text) if attribute.get("vr") in ("US", "UL", "SS", "SL") and text.isdigit() else text)
        return out

    def items(tag: str) -> list[tuple[str, dict]]:
        sequence = attributes(root).get(tag)
        out = []
        for item in sequence if sequence is not None else []:
            if name(item) != "Item":
                continue
            flat = {key: values(attribute) for key, attribute in attributes(item).items()}
            uid = _uid(flat)
            if uid:
                out.append((uid, flat))
        return out

    return items(REFERENCED_SOP_SEQUENCE), items(FAILED_SOP_SEQUENCE)


def plan(sizes: Sequence[int], keys: Sequence[str] | None = None, *, max_instances: int,
         max_bytes: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped, in order, into requests of at most ``max_instances`` files and ``max_bytes``
    bytes (a larger file goes alone). ``keys`` (SOP Instance UIDs): never two equal ones in one request, since the
    answer names instances by UID."""
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    seen: set[str] = set()
    for index, size in enumerate(sizes):
        key = keys[index] if keys is not None else None
        if current and (len(current) >= max_instances or total + size > max_bytes or key in seen):
            batches.append(current)
            current, total, seen = [], 0, set()
        current.append(index)
        total += size
        if key is not None:
            seen.add(key)
    if current:
        batches.append(current)
    return batches
