"""A DICOMweb archive read as a client: QIDO-RS listing of its instances, WADO-RS retrieval of each, streamed to a file.

    archive = Archive(Endpoint.create("https://pacs.example/dicom-web", auth=auth), page_size=100)
    listing = Listing()
    for ref in archive.list_instances(Query(("CR", "DX"), study_date="20240101-20240131"), listing):
        archive.retrieve(ref, "/tmp/x.dcm")   # the stored bytes (transfer-syntax=*), streamed, never held whole
    archive.close()

Listing goes the way archives answer best: studies (``/studies?ModalitiesInStudy=CR&StudyDate=...``, one query per
modality, since not every server reads a list of values there), then each study's series (``/studies/{s}/series``,
kept when their Modality is one asked for), then each series' instances. Every search is paged with ``limit`` and
``offset`` until a page comes back shorter than ``page_size`` without the standard's "additional results" warning
(299); so ``page_size`` must not exceed the archive's own cap. The studies of a query are listed by a few threads
at once (``threads``), each with its own pooled session; the order of the instances is the archive's.

Everything the archive says is untrusted. A UID goes into a URL or a file name only when it is a valid UID (digits
and dots, at most 64 characters, :func:`utils.untrusted.is_uid`); other values are counted in :class:`Listing`
and logged through :func:`utils.untrusted.log_safe`. An answer is read up to a bound (``MAX_SEARCH_BYTES`` for a
search page, ``max_instance_bytes`` for an instance), a page that repeats the previous one (a server ignoring
``offset``) stops the search with an error, and a multipart answer must hold exactly one ``application/dicom`` part
that ends with its closing boundary (and matches its Content-Length, when it gives one).

Failures are :class:`utils.dicomweb.http.DicomwebError`: no answer, an HTTP error status or a malformed answer.
Requests without an answer, or answered 429 or 5xx, are tried again ``retries`` times, waiting ``retry_wait_s``, then
twice as long each time. A study whose series or instances cannot be listed is recorded in :class:`Listing`
(``failed``) and the listing goes on; a failed search for the studies themselves raises.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, BinaryIO

from utils.dicomweb.http import DicomwebError, Endpoint
from utils.untrusted import is_uid, log_safe

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'  # the bytes as stored, no transcoding
ACCEPT_ANY = 'multipart/related; type="application/dicom"'  # for archives refusing transfer-syntax=* (they transcode)
STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "0020000D", "0020000E", "00080018", "00080060"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
CHUNK_BYTES = 1 << 20  # read from the socket and written to the file in pieces of this size
MAX_SEARCH_BYTES = 64 << 20  # one page of search results: far above any honest page of a few hundred objects
MAX_PART_HEAD_BYTES = 64 << 10  # a part's preamble and headers together
MAX_BOUNDARY_CHARS = 200  # RFC 2046 allows 70; some archives send longer ones
MAX_INSTANCE_BYTES = 2048 << 20
PROGRESS_S = 30.0  # a listing logs how far it is this often
_MODALITY = re.compile(r"[A-Z0-9_ ]{1,16}")  # a CS value
_DATE_RANGE = re.compile(r"(?:[0-9]{8})?(?:-(?:[0-9]{8})?)?")
_INSTANCE_PATH = re.compile(r"/studies/([^/]+)/series/([^/]+)/instances/([^/]+)")


@dataclass(frozen=True)
class InstanceRef:
    """One instance of the archive, by its three UIDs (each checked to be a valid UID)."""

    study: str
    series: str
    instance: str

    def __post_init__(self) -> None:
        for name in ("study", "series", "instance"):
            if not is_uid(getattr(self, name)):
                raise ValueError(f"{name} UID {log_safe(getattr(self, name))!r} is not a valid UID")

    @property
    def path(self) -> str:
        """Its WADO-RS path below the archive's base URL."""
        return f"/studies/{self.study}/series/{self.series}/instances/{self.instance}"

    @classmethod
    def from_path(cls, path: str) -> InstanceRef:
        """The reference of a :attr:`path`; ValueError for anything else."""
        match = _INSTANCE_PATH.fullmatch(path)
        if match is None:
            raise ValueError(f"{log_safe(path)!r} is not /studies/{{uid}}/series/{{uid}}/instances/{{uid}}")
        return cls(*match.groups())


@dataclass(frozen=True)
class Query:
    """What to list. ``modalities``: series kept by their Modality (empty: every series); ``study_date``: a DICOM date
    range (``20240101-20240131``, ``20240101-``, ``-20240131``, one day ``20240101``; empty: any date);
    ``studies``: these studies only, instead of a search (not with ``study_date``)."""

    modalities: tuple[str, ...] = ()
    study_date: str = ""
    studies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for modality in self.modalities:
            if not _MODALITY.fullmatch(modality):
                raise ValueError(f"modality {log_safe(modality)!r}: expected a DICOM code string such as CR or DX")
        if self.study_date and (self.study_date == "-" or not _DATE_RANGE.fullmatch(self.study_date)):
            raise ValueError(f"study date {log_safe(self.study_date)!r}: expected YYYYMMDD, YYYYMMDD-YYYYMMDD, "
                             "YYYYMMDD- or -YYYYMMDD")
        bad = [s for s in self.studies if not is_uid(s)]
        if bad:
            raise ValueError(f"study {log_safe(bad[0])!r} is not a valid UID")
        if self.studies and self.study_date:
            raise ValueError("give studies or a study date range, not both")


@dataclass
class Listing:
    """What a listing met besides the instances it yielded: counts, values that were not UIDs, and the studies or
    series that could not be listed (one line each, safe to log)."""

    studies: int = 0
    series: int = 0
    instances: int = 0
    invalid: int = 0
    failed: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.studies} studies, {self.series} series, {self.instances} instances listed"]
        if self.invalid:
            out.append(f"{self.invalid} values from the archive that are not valid UIDs were left out")
        if self.failed:
            out.append(f"{len(self.failed)} studies or series could not be listed (first: {self.failed[0]})")
        return out


@dataclass
class _StudyResult:
    refs: list[InstanceRef] = field(default_factory=list)
    series: int = 0
    invalid: int = 0
    failed: list[str] = field(default_factory=list)


class Archive:
    """QIDO-RS and WADO-RS against one :class:`Endpoint`. Safe to use from several threads (a session per thread);
    :meth:`close` closes every session."""

    def __init__(self, endpoint: Endpoint, *, page_size: int = 100, retries: int = 2, retry_wait_s: float = 1.0,
                 max_instance_bytes: int = MAX_INSTANCE_BYTES, threads: int = 4) -> None:
        if page_size < 1 or retries < 0 or max_instance_bytes < 1 or threads < 1:
            raise ValueError("page_size, max_instance_bytes and threads must be positive, retries not negative")
        self.endpoint = endpoint
        self.page_size, self.retries, self.retry_wait_s = page_size, retries, retry_wait_s
        self.max_instance_bytes, self.threads = max_instance_bytes, threads
        self.accept = ACCEPT_STORED
        self._local = threading.local()
        self._sessions: list[Any] = []
        self._lock = threading.Lock()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for http in sessions:
            http.close()
        self._local = threading.local()

    def _session(self):
        http = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = self.endpoint.session()
            with self._lock:
                self._sessions.append(http)
        return http

    def _request(self, path: str, *, what: Callable[[Any], Any], **kwargs):
        """GET ``path`` and hand the answer to ``what``, which reads it; what ``what`` returns. Retried as the module
        says (``what`` included: a body that breaks off is asked for again); the answer is closed afterwards."""
        for attempt in range(self.retries + 1):
            try:
                answer = self.endpoint.request(self._session(), "GET", path, **kwargs)
                try:
                    return what(answer)
                finally:
                    answer.close()
            except DicomwebError as error:
                if attempt == self.retries or not (error.status is None or error.status in RETRY_STATUSES):
                    raise
                wait = self.retry_wait_s * 2 ** attempt
                log.info("%s; trying again in %.3g s", error, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    # --- QIDO-RS -----------------------------------------------------------------------------------------------------

    def search(self, path: str, params: dict[str, str] | None = None) -> Iterator[dict]:
        """The objects of a QIDO-RS search (``/studies``, ``/studies/{s}/series``...), page after page."""
        offset, previous = 0, None
        while True:
            page, more = self._request(path, params={**(params or {}), "limit": str(self.page_size),
                                                     "offset": str(offset)},
                                       headers={"Accept": DICOM_JSON}, stream=True, what=_search_page)
            if page and page == previous:
                raise DicomwebError(f"GET {log_safe(self.endpoint.url + path)}: the same results at offset {offset} "
                                    "as on the page before (the archive ignores offset)")
            yield from page
            if not page or (len(page) < self.page_size and not more):
                return
            offset, previous = offset + len(page), page

    def studies(self, query: Query, listing: Listing) -> Iterator[str]:
        """The UIDs of the studies ``query`` asks for, each once."""
        if query.studies:
            yield from dict.fromkeys(query.studies)
            return
        seen: set[str] = set()
        for modality in query.modalities or (None,):
            params = {"StudyDate": query.study_date} if query.study_date else {}
            if modality:
                params["ModalitiesInStudy"] = modality
            for found in self.search("/studies", params):
                study = _uid(found, STUDY_UID, "StudyInstanceUID")
                if study is None:
                    listing.invalid += 1
                elif study not in seen:
                    seen.add(study)
                    yield study

    def series(self, study: str, modalities: Iterable[str] = ()) -> tuple[list[str], int]:
        """(UIDs of the study's series whose Modality is one of ``modalities`` (all without), values that were not
        UIDs)."""
        wanted = {m.upper() for m in modalities}
        found: dict[str, None] = {}  # in the archive's order, each once
        invalid = 0
        for item in self.search(f"/studies/{_checked(study)}/series"):
            series = _uid(item, SERIES_UID, "SeriesInstanceUID")
            if series is None:
                invalid += 1
            elif not wanted or _text(item, MODALITY).upper() in wanted:
                found[series] = None
        return list(found), invalid

    def instances(self, study: str, series: str) -> tuple[list[InstanceRef], int]:
        """(the series' instances, values that were not UIDs)."""
        refs, invalid, seen = [], 0, set()
        for item in self.search(f"/studies/{_checked(study)}/series/{_checked(series)}/instances"):
            sop = _uid(item, SOP_UID, "SOPInstanceUID")
            if sop is None:
                invalid += 1
            elif sop not in seen:
                seen.add(sop)
                refs.append(InstanceRef(study, series, sop))
        return refs, invalid

    def _study(self, study: str, modalities: tuple[str, ...]) -> _StudyResult:
        result = _StudyResult()
        try:
            series, result.invalid = self.series(study, modalities)
        except DicomwebError as error:
            log.warning("study %s: its series could not be listed: %s", study, error)
            result.failed.append(f"study {study}: {error}")
            return result
        result.series = len(series)
        for one in series:
            try:
                refs, invalid = self.instances(study, one)
            except DicomwebError as error:
                log.warning("series %s of study %s: its instances could not be listed: %s", one, study, error)
                result.failed.append(f"series {one} of study {study}: {error}")
                continue
            result.refs += refs
            result.invalid += invalid
        return result

    def list_instances(self, query: Query, listing: Listing | None = None) -> Iterator[InstanceRef]:
        """Every instance ``query`` asks for, study by study (``threads`` studies at once), counted in ``listing``."""
        listing = listing if listing is not None else Listing()
        last_report = time.monotonic()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="qido") as pool:
            window: deque = deque()

            def drain(result: _StudyResult) -> Iterator[InstanceRef]:
                nonlocal last_report
                listing.series += result.series
                listing.instances += len(result.refs)
                listing.invalid += result.invalid
                listing.failed += result.failed
                if time.monotonic() - last_report >= PROGRESS_S:
                    log.info("%s: %s so far", self.endpoint.url, listing.lines()[0])
                    last_report = time.monotonic()
                yield from result.refs

            try:
                for study in self.studies(query, listing):
                    listing.studies += 1
                    window.append(pool.submit(self._study, study, query.modalities))
                    while len(window) > 2 * self.threads:  # a bounded look-ahead: the order stays the archive's
                        yield from drain(window.popleft().result())
                while window:
                    yield from drain(window.popleft().result())
            finally:
                for future in window:
                    future.cancel()

    # --- WADO-RS -----------------------------------------------------------------------------------------------------

    def retrieve(self, ref: InstanceRef, target: str | os.PathLike) -> int:
        """Write the instance's DICOM bytes to ``target``; their size. The bytes the archive stores
        (``transfer-syntax=*``); an archive that refuses that (400, 406) is asked once more without it, and if that
        works, from then on (it transcodes). DicomwebError when the instance cannot be had; ``target`` is removed."""
        try:
            try:
                return self._retrieve(ref, target, self.accept)
            except DicomwebError as error:
                if self.accept != ACCEPT_STORED or error.status not in (400, 406):
                    raise
                size = self._retrieve(ref, target, ACCEPT_ANY)
                log.warning("%s refuses transfer-syntax=* (%s): instances are fetched in the transfer syntax it "
                            "chooses", self.endpoint.url, error)
                self.accept = ACCEPT_ANY
                return size
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(target)
            raise

    def _retrieve(self, ref: InstanceRef, target: str | os.PathLike, accept: str) -> int:
        url = self.endpoint.url + ref.path

        def write(answer) -> int:
            with open(target, "wb") as sink:
                return write_instance(answer, sink, self.max_instance_bytes, url)

        return self._request(ref.path, headers={"Accept": accept}, stream=True, what=write)


# --- Answers -------------------------------------------------------------------------------------------------------


def _chunks(answer, url: str) -> Iterator[bytes]:
    """The answer's body in pieces; a connection that breaks mid-body is a DicomwebError without a status (retried)."""
    import requests

    try:
        yield from answer.iter_content(CHUNK_BYTES)
    except requests.RequestException as error:
        raise DicomwebError(f"GET {log_safe(url)}: the answer broke off: {log_safe(str(error)[:200])}") from error


def _search_page(answer) -> tuple[list[dict], bool]:
    """(the objects of one search answer, whether the archive says more results can be asked for)."""
    import json

    url = answer.url
    warning = answer.headers.get("Warning", "")
    more = "299" in warning and "additional results" in warning.lower()
    body = bytearray()
    for chunk in _chunks(answer, url):
        body += chunk
        if len(body) > MAX_SEARCH_BYTES:
            raise DicomwebError(f"GET {log_safe(url)}: a search answer over {MAX_SEARCH_BYTES >> 20} MB", 200)
    if answer.status_code == 204 or not body.strip():
        return [], more
    try:
        page = json.loads(bytes(body))
    except ValueError as error:
        raise DicomwebError(f"GET {log_safe(url)}: the answer is not JSON ({log_safe(str(error))})",
                            answer.status_code) from error
    if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
        raise DicomwebError(f"GET {log_safe(url)}: the answer is not a list of DICOM JSON objects", answer.status_code)
    return page, more


def _text(item: dict, tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object, as a string ("" when absent or not a string)."""
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    value = values[0] if isinstance(values, list) and values else ""
    return value.strip() if isinstance(value, str) else ""


def _uid(item: dict, tag: str, name: str) -> str | None:
    """The UID in ``tag``, or None (logged) when it is missing or not a valid UID."""
    value = _text(item, tag).rstrip("\x00")
    if is_uid(value):
        return value
    raw = item.get(tag)
    log.warning("the archive gave a %s that is not a valid UID: %s", name, log_safe(repr(raw), 120))
    return None


def _checked(uid: str) -> str:
    if not is_uid(uid):
        raise ValueError(f"{log_safe(uid)!r} is not a valid UID")
    return uid


def write_instance(answer, sink: BinaryIO, max_bytes: int, url: str) -> int:
    """Write the DICOM bytes of a WADO-RS answer for one instance to ``sink``; their size. A
    ``multipart/related`` answer must hold exactly one part, of type ``application/dicom``; an answer of type
    ``application/dicom`` is taken as it is. DicomwebError (with the answer's status: not retried) otherwise."""
    message = Message()
    message["Content-Type"] = answer.headers.get("Content-Type", "")
    kind = message.get_content_type()
    chunks = _chunks(answer, url)
    if kind == "application/dicom":
        size = 0
        for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise DicomwebError(f"GET {log_safe(url)}: the instance is larger than the limit ({max_bytes} bytes)",
                                    answer.status_code)
            sink.write(chunk)
        return size
    boundary = message.get_param("boundary") if kind == "multipart/related" else None
    if not isinstance(boundary, str) or not 0 < len(boundary) <= MAX_BOUNDARY_CHARS:
        raise DicomwebError(f"GET {log_safe(url)}: answered {log_safe(answer.headers.get('Content-Type', '(none)'))}"
                            ", not multipart/related with a boundary", answer.status_code)
    try:
        return write_single_part(chunks, boundary.encode("latin-1"), sink, max_bytes)
    except MultipartError as error:
        raise DicomwebError(f"GET {log_safe(url)}: {error}", answer.status_code) from error
    except UnicodeEncodeError as error:
        raise DicomwebError(f"GET {log_safe(url)}: a boundary that is not ASCII", answer.status_code) from error


class MultipartError(ValueError):
    """A multipart body that is not one whole application/dicom part."""


def write_single_part(chunks: Iterable[bytes], boundary: bytes, sink: BinaryIO, max_bytes: int) -> int:
    """Stream the body of the only part of a multipart body (RFC 2046) to ``sink``, holding at most a chunk and the
    part's headers in memory; the body's size. MultipartError when there is no part or more than one, the part is
    not ``application/dicom`` (when it says), is larger than ``max_bytes``, disagrees with its Content-Length, or
    the body ends before its closing boundary."""
    stream = iter(chunks)
    buf = bytearray(b"\r\n")  # a delimiter is CRLF "--" boundary; the first one may open the body without its CRLF
    dash = b"\r\n--" + boundary

    def more() -> bool:
        for chunk in stream:
            if chunk:
                buf.extend(chunk)
                return True
        return False

    def find(needle: bytes, limit: int, what: str) -> int:
        while (at := buf.find(needle)) < 0:
            if len(buf) > limit:
                raise MultipartError(f"no {what} in the first {limit} bytes")
            if not more():
                raise MultipartError(f"the body ended before {what}")
        return at

    at = find(dash, MAX_PART_HEAD_BYTES, "the first boundary")
    del buf[:at + len(dash)]
    end = find(b"\r\n", MAX_PART_HEAD_BYTES, "the end of the first boundary line")
    if buf[:2] == b"--":
        raise MultipartError("no part (the body closes at once)")
    if buf[:end].strip(b" \t"):
        raise MultipartError("a boundary line followed by other text")
    del buf[:end]  # keep the CRLF: an empty header block is then CRLF CRLF too
    end = find(b"\r\n\r\n", MAX_PART_HEAD_BYTES, "the end of the part's headers")
    headers = _part_headers(bytes(buf[2:end]))
    del buf[:end + 4]
    media = headers.get("content-type", "application/dicom").split(";", 1)[0].strip().lower()
    if media != "application/dicom":
        raise MultipartError(f"a part of type {log_safe(media, 80)}, not application/dicom")
    length = headers.get("content-length")
    size, tail = 0, len(dash) - 1
    while (at := buf.find(dash)) < 0:
        keep = max(0, len(buf) - tail)  # the last bytes might begin the delimiter
        size += keep
        if size > max_bytes:
            raise MultipartError(f"the instance is larger than the limit ({max_bytes} bytes)")
        sink.write(buf[:keep])
        del buf[:keep]
        if not more():
            raise MultipartError("the body ended before its closing boundary (cut off?)")
    size += at
    if size > max_bytes:
        raise MultipartError(f"the instance is larger than the limit ({max_bytes} bytes)")
    sink.write(buf[:at])
    del buf[:at + len(dash)]
    while len(buf) < 2 and more():
        pass
    if buf[:2] != b"--":
        raise MultipartError("more than one part for one instance")
    if length is not None and length.strip().isdigit() and int(length) != size:
        raise MultipartError(f"a part of {size} bytes that says Content-Length {int(length)}")
    return size


def _part_headers(block: bytes) -> dict[str, str]:
    headers = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
        elif line.strip():
            raise MultipartError(f"a part header line without a colon: {log_safe(line, 80)!r}")
    return headers

