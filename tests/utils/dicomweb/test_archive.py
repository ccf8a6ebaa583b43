"""utils.dicomweb.archive against a small in-process archive: paging, filters, hostile UIDs, retries, multipart."""

from __future__ import annotations

import io
import logging

import pytest

from utils.dicomweb.archive import (
    ACCEPT_ANY,
    ACCEPT_STORED,
    Archive,
    InstanceRef,
    Listing,
    MultipartError,
    Query,
    write_single_part,
)
from utils.dicomweb.http import DicomwebError, Endpoint, HttpAuth

from .fake_archive import FakeArchive, multipart


def archive_of(fake: FakeArchive, **settings) -> Archive:
    auth = HttpAuth.basic(fake.user, fake.password) if fake.user else HttpAuth()
    return Archive(Endpoint.create(fake.url, auth=auth, timeout_s=10), **{"retry_wait_s": 0.0, **settings})


def refs(archive: Archive, query: Query, listing: Listing | None = None) -> set[tuple[str, str, str]]:
    return {(r.study, r.series, r.instance) for r in archive.list_instances(query, listing)}


@pytest.fixture
def fake():
    with FakeArchive() as archive:
        for s in range(5):  # five studies: DX (2 instances), a CT series beside it in study 0, CR in study 1
            archive.add(f"1.2.{s}", f"1.2.{s}.1", "DX", f"1.2.{s}.1.1", b"a", date=f"2024011{s}")
            archive.add(f"1.2.{s}", f"1.2.{s}.1", "DX", f"1.2.{s}.1.2", b"b", date=f"2024011{s}")
        archive.add("1.2.0", "1.2.0.2", "CT", "1.2.0.2.1", b"ct", date="20240110")
        archive.add("1.2.1", "1.2.1.3", "CR", "1.2.1.3.1", b"cr", date="20240111")
        archive.add("1.3.9", "1.3.9.1", "CT", "1.3.9.1.1", b"ct only", date="20240112")
        yield archive


def test_paging_lists_every_projection_instance_once(fake):
    listing = Listing()
    with archive_of(fake, page_size=2, threads=3) as archive:
        found = refs(archive, Query(("CR", "DX")), listing)
    want = {(f"1.2.{s}", f"1.2.{s}.1", f"1.2.{s}.1.{i}") for s in range(5) for i in (1, 2)} | {("1.2.1", "1.2.1.3",
                                                                                                 "1.2.1.3.1")}
    assert found == want  # CT series and the CT-only study left out; study 1 (CR and DX) once
    assert (listing.studies, listing.series, listing.instances, listing.invalid, listing.failed) == (5, 6, 11, 0, [])
    searches = [(q.get("ModalitiesInStudy"), q["offset"], q["limit"]) for p, q, _ in fake.requests
                if p == "/dicom-web/studies"]
    assert searches == [("CR", "0", "2"), ("DX", "0", "2"), ("DX", "2", "2"), ("DX", "4", "2")]  # until a short page
    assert all(not p.endswith("/instances/1.2.0.2.1") and "/series/1.2.0.2/" not in p for p in fake.paths())


def test_a_capped_archive_is_paged_on_by_its_warning_and_a_date_range_is_passed_on(fake):
    fake.cap = 2  # answers 2 results at most, whatever the limit, with the standard's 299 warning
    with archive_of(fake, page_size=100) as archive:
        assert len(refs(archive, Query(("DX",)))) == 10
        assert {s for s, _, _ in refs(archive, Query(("DX", "CR"), "20240111-20240113"))} == {"1.2.1", "1.2.2", "1.2.3"}
        assert {s for s, _, _ in refs(archive, Query((), "20240112"))} == {"1.2.2", "1.3.9"}  # every modality
    dates = {q.get("StudyDate") for p, q, _ in fake.requests if p == "/dicom-web/studies"}
    assert dates == {None, "20240111-20240113", "20240112"}
    fake.warn_when_capped = False  # a cap without the warning: only page_size at or below it finds everything
    with archive_of(fake, page_size=100) as archive:
        assert len(refs(archive, Query(("DX",)))) == 4
    with archive_of(fake, page_size=2) as archive:
        assert len(refs(archive, Query(("DX",)))) == 10


def test_given_studies_are_listed_without_a_search(fake):
    with archive_of(fake) as archive:
        assert refs(archive, Query(("CR",), studies=("1.2.1", "1.2.1"))) == {("1.2.1", "1.2.1.3", "1.2.1.3.1")}
        listing = Listing()
        assert refs(archive, Query(("DX",), studies=("1.2.0", "9.9.9")), listing) == {
            ("1.2.0", "1.2.0.1", "1.2.0.1.1"), ("1.2.0", "1.2.0.1", "1.2.0.1.2")}
    assert "/dicom-web/studies" not in fake.paths()
    assert listing.failed == [] and listing.studies == 2  # an unknown study has no series (this archive says [])


HOSTILE = ["../../etc/passwd", "1.2.3/../../4", "1." + "2" * 70, "1.2.\r\nFORGED 1.2.3", "1.02.3", "", 1.5, None]


def test_hostile_uids_are_left_out_counted_and_logged_escaped(fake, caplog):
    fake.junk = {"/studies": [{"0020000D": {"vr": "UI", "Value": [v]}} for v in HOSTILE] + [{"0020000D": "x"}, {}],
                 "/studies/1.2.0/series": [{"0020000E": {"vr": "UI", "Value": ["1.2/../x"]},
                                            "00080060": {"vr": "CS", "Value": ["DX"]}}],
                 "/studies/1.2.0/series/1.2.0.1/instances": [{"00080018": {"vr": "UI", "Value": ["..%2f..%2fx"]}},
                                                             {"00080018": {"vr": "UI", "Value": [["1.2"]]}}]}
    listing = Listing()
    with caplog.at_level(logging.WARNING, logger="utils.dicomweb.archive"), archive_of(fake) as archive:
        found = refs(archive, Query(("DX",)), listing)
    assert len(found) == 10 and all(InstanceRef(*r) for r in found)
    assert listing.invalid == len(HOSTILE) + 2 + 1 + 2
    assert all(set(p.removeprefix("/dicom-web")) <= set("/studiernacs0123456789.") for p in fake.paths())
    assert all("\n" not in r.getMessage() and "\r" not in r.getMessage() for r in caplog.records)
    assert any("FORGED" in r.getMessage() and "\\r\\n" in r.getMessage() for r in caplog.records)
    for bad in HOSTILE[:6]:
        with pytest.raises(ValueError):
            InstanceRef("1.2", "1.2.3", bad)
    with pytest.raises(ValueError):
        Query(studies=("1.2/..",))


def test_a_series_that_cannot_be_listed_is_recorded_and_the_listing_goes_on(fake):
    fake.statuses = {"/studies/1.2.3/series/1.2.3.1/instances": 503}
    fake.junk = {"/studies/1.2.0/series": [{"0020000E": {"vr": "UI", "Value": ["1.2.0.1"]},  # listed twice
                                            "00080060": {"vr": "CS", "Value": ["DX"]}}]}
    listing = Listing()
    with archive_of(fake, retries=1) as archive:
        found = refs(archive, Query(("DX",)), listing)
    assert len(found) == 8 and not any(s == "1.2.3" for s, _, _ in found)
    assert len(listing.failed) == 1 and "1.2.3.1" in listing.failed[0] and "503" in listing.failed[0]
    assert fake.paths().count("/dicom-web/studies/1.2.3/series/1.2.3.1/instances") == 2  # tried, then once more
    assert fake.paths().count("/dicom-web/studies/1.2.0/series/1.2.0.1/instances") == 1
    fake.statuses = {"/studies": 500}
    with archive_of(fake, retries=0) as archive, pytest.raises(DicomwebError, match="HTTP 500"):
        refs(archive, Query(("DX",)))  # the search for studies itself fails: the listing cannot be trusted


def test_an_archive_that_ignores_offset_stops_the_search(fake):
    fake.ignore_offset = True
    with archive_of(fake, page_size=2) as archive, pytest.raises(DicomwebError, match="ignores offset"):
        refs(archive, Query(("DX",)))


def test_retrieve_streams_the_stored_bytes_with_credentials(fake, tmp_path):
    data = bytes(range(256)) * (3 * 4096 + 7)  # about 3 MB: several chunks, boundaries between them
    path = fake.add("1.5", "1.5.1", "DX", "1.5.1.1", data)
    fake.user, fake.password = "backfill", "pw"
    with archive_of(fake) as archive:
        assert archive.retrieve(InstanceRef.from_path(path), tmp_path / "x.dcm") == len(data)
    assert (tmp_path / "x.dcm").read_bytes() == data
    headers = fake.requests[-1][2]
    assert headers["Accept"] == ACCEPT_STORED and headers["Authorization"].startswith("Basic ")
    with Archive(Endpoint.create(fake.url, timeout_s=10), retries=0) as archive:  # no credentials: 401, said so
        with pytest.raises(DicomwebError, match="401.*credentials"):
            archive.retrieve(InstanceRef.from_path(path), tmp_path / "y.dcm")
    assert not (tmp_path / "y.dcm").exists()


def test_retrieve_retries_server_errors_not_missing_instances(fake, tmp_path):
    path = fake.add("1.5", "1.5.1", "DX", "1.5.1.1", b"DICM data")
    fake.failures = {"1.5.1.1": [503, 502]}
    ref = InstanceRef.from_path(path)
    with archive_of(fake, retries=2) as archive:
        assert archive.retrieve(ref, tmp_path / "x.dcm") == 9
        fake.failures = {"1.5.1.1": [503, 503, 503]}
        with pytest.raises(DicomwebError, match="HTTP 503") as error:
            archive.retrieve(ref, tmp_path / "x.dcm")
        assert error.value.status == 503 and not (tmp_path / "x.dcm").exists()
        before = len(fake.requests)
        with pytest.raises(DicomwebError, match="HTTP 404") as error:
            archive.retrieve(InstanceRef("1.5", "1.5.1", "1.5.1.9"), tmp_path / "x.dcm")
        assert error.value.status == 404 and len(fake.requests) == before + 1  # not retried


def test_an_archive_refusing_transfer_syntax_any_is_asked_without_it(fake, tmp_path):
    path = fake.add("1.5", "1.5.1", "DX", "1.5.1.1", b"DICM data")
    fake.refuse_any_syntax = True
    with archive_of(fake) as archive:
        assert archive.retrieve(InstanceRef.from_path(path), tmp_path / "x.dcm") == 9
        assert archive.accept == ACCEPT_ANY
        archive.retrieve(InstanceRef.from_path(path), tmp_path / "x.dcm")
    assert [r[2]["Accept"] for r in fake.requests] == [ACCEPT_STORED, ACCEPT_ANY, ACCEPT_ANY]


@pytest.mark.parametrize("content_type, body, match", [
    ("application/dicom+json", b"[]", "not multipart/related"),
    ("multipart/related; type=\"application/dicom\"", multipart(b"x"), "not multipart/related with a boundary"),
    ("multipart/related; boundary=fake-archive-boundary-0123456789", multipart(b"x", close=False)[:-2],
     "closing boundary"),
    ("multipart/related; boundary=fake-archive-boundary-0123456789", multipart(b"x", b"y"), "more than one part"),
    ("multipart/related; boundary=fake-archive-boundary-0123456789", multipart(b"x", part_type="text/html"),
     "text/html"),
], ids=["json", "no-boundary", "cut-off", "two-parts", "html-part"])
def test_malformed_answers_fail_without_retries(fake, tmp_path, content_type, body, match):
    path = fake.add("1.5", "1.5.1", "DX", "1.5.1.1", b"unused")
    fake.answers = {"1.5.1.1": (content_type, body)}
    with archive_of(fake, retries=2) as archive, pytest.raises(DicomwebError, match=match):
        archive.retrieve(InstanceRef.from_path(path), tmp_path / "x.dcm")
    assert len(fake.requests) == 1 and not (tmp_path / "x.dcm").exists()


def test_a_single_part_answer_and_the_size_limit(fake, tmp_path):
    path = fake.add("1.5", "1.5.1", "DX", "1.5.1.1", b"unused")
    fake.answers = {"1.5.1.1": ("application/dicom", b"D" * 5000)}
    with archive_of(fake) as archive:
        assert archive.retrieve(InstanceRef.from_path(path), tmp_path / "x.dcm") == 5000
    with archive_of(fake, max_instance_bytes=4999) as archive, pytest.raises(DicomwebError, match="limit"):
        archive.retrieve(InstanceRef.from_path(path), tmp_path / "x.dcm")
    fake.answers = {}
    with archive_of(fake, max_instance_bytes=5) as archive, pytest.raises(DicomwebError, match="limit"):
        archive.retrieve(InstanceRef.from_path(path), tmp_path / "x.dcm")


# --- the multipart parser on its own -------------------------------------------------------------------------------

B = b"b0undary"
DATA = b"\r\n--b0undar\r\n-" + bytes(range(256)) * 3 + b"\n--b0undary"  # almost-delimiters inside the data


def pieces(body: bytes, size: int) -> list[bytes]:
    return [body[i:i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [1, 2, 7, 13, 4096])
@pytest.mark.parametrize("body", [
    b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + DATA + b"\r\n--b0undary--\r\n",
    b"a preamble\r\n--b0undary  \r\ncontent-type: Application/DICOM; transfer-syntax=1.2.840.10008.1.2.1\r\n"
    b"Content-Length: 793\r\n\r\n" + DATA + b"\r\n--b0undary--",
    b"--b0undary\r\n\r\n" + DATA + b"\r\n--b0undary--\r\nan epilogue",  # no part headers at all
], ids=["plain", "preamble-padding-parameters-length", "no-headers-epilogue"])
def test_write_single_part_in_any_chunking(body, size):
    sink = io.BytesIO()
    assert write_single_part(pieces(body, size), B, sink, 10_000) == len(DATA)
    assert sink.getvalue() == DATA


@pytest.mark.parametrize("body, match", [
    (b"", "ended before the first boundary"),
    (b"--b0undary--\r\n", "no part"),
    (b"--b0undary\r\nContent-Type: application/dicom\r\n\r\nabc", "closing boundary"),
    (b"--b0undary\r\nContent-Type: application/dicom\r\nContent-Length: 4\r\n\r\nabc\r\n--b0undary--",
     "says Content-Length 4"),
    (b"--b0undary\r\nbroken header\r\n\r\nabc\r\n--b0undary--", "without a colon"),
    (b"--b0undary\r\n\r\n" + b"x" * 101 + b"\r\n--b0undary--", "larger than the limit"),
    (b"--b0undary trailing\r\n\r\nabc\r\n--b0undary--", "followed by other text"),
])
def test_write_single_part_refuses(body, match):
    with pytest.raises(MultipartError, match=match):
        write_single_part(pieces(body, 3), B, io.BytesIO(), 100)
