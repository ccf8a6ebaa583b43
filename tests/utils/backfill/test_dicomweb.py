"""utils.backfill.dicomweb: the dicomweb+http(s):// source syntax, credentials, listing into paths, fetching into a
decoding actor's rows (the Decoder class without Ray), against the in-process fake archive."""

from __future__ import annotations

import json

import numpy as np
import pytest

from utils import constants
from utils.backfill import dicomweb
from utils.backfill.dicomweb import Access, ArchivePool, list_source, parse_source, split_path
from utils.backfill.pipeline import Decoder
from utils.backfill.sources import fetched, list_sources
from utils.dicomweb.archive import InstanceRef, Listing, Query
from utils.dicomweb.http import DicomwebError
from utils.infer.decisions import PROJECTION_MODALITIES
from utils.io.dicom_writer import write_dicom
from utils.io.isolation import PoolSettings
from utils.preprocessing import PreprocessSpec

from ..dicomweb.fake_archive import FakeArchive

QUICK = {"retry_wait_s": 0.0, "timeout_s": 10.0}
QUICK_RETRIES = Access().retries


@pytest.mark.parametrize("source, want", [
    ("dicomweb+https://pacs.example/dicom-web/?from=20240101&to=20240131",
     ("https://pacs.example/dicom-web", Query(("CR", "DX", "DR", "RG"), "20240101-20240131"))),
    ("dicomweb+http://pacs:8042/dicom-web?from=20240101", ("http://pacs:8042/dicom-web", Query(("CR", "DX", "DR", "RG"),
                                                                                             "20240101-"))),
    ("dicomweb+https://pacs/dw?to=20231231", ("https://pacs/dw", Query(("CR", "DX", "DR", "RG"), "-20231231"))),
    ("dicomweb+https://pacs/dw?from=20240105&to=20240105", ("https://pacs/dw", Query(("CR", "DX", "DR", "RG"),
                                                                                    "20240105"))),
    ("dicomweb+https://pacs/dw?study=1.2.3,1.2.4&study=1.2.5",
     ("https://pacs/dw", Query(("CR", "DX", "DR", "RG"), studies=("1.2.3", "1.2.4", "1.2.5")))),
    ("DICOMweb+HTTPS://pacs/dw", ("https://pacs/dw", Query(("CR", "DX", "DR", "RG")))),
    ("dicomweb+https://pacs/dw/studies/1.2/series/1.2.3/instances/1.2.3.4",
     ("https://pacs/dw", InstanceRef("1.2", "1.2.3", "1.2.3.4"))),
])
def test_parse_source(source, want):
    assert parse_source(source) == want


@pytest.mark.parametrize("source, match", [
    ("dicomweb+https://user:pw@pacs/dw", "no credentials in the URL"),
    ("dicomweb+https://pacs/dw?password=x", "unknown query key 'password'.*never the URL"),
    ("dicomweb+https://pacs/dw?from=2024-01-01", "not a date YYYYMMDD"),
    ("dicomweb+https://pacs/dw?from=20240230", "not a date"),
    ("dicomweb+https://pacs/dw?from=20240201&to=20240101", "is after"),
    ("dicomweb+https://pacs/dw?from=20240101&from=20240102", "given twice"),
    ("dicomweb+https://pacs/dw?study=1.2&from=20240101", "not both"),
    ("dicomweb+https://pacs/dw?study=../../x", "not a valid UID"),
    ("dicomweb+https://pacs/dw#x", "fragment"),
    ("dicomweb+ftp://pacs/dw", "not a dicomweb"),
    ("dicomweb+https://pacs/dw/studies/01.2/series/1.2.3/instances/1.2.3.4", "not a valid UID"),
])
def test_parse_source_refuses(source, match):
    with pytest.raises(ValueError, match=match):
        parse_source(source)


def test_modalities_flag_and_every_series():
    assert constants.BACKFILL_DICOMWEB_MODALITIES == PROJECTION_MODALITIES  # what the header guard lets through
    assert parse_source("dicomweb+https://pacs/dw", Access(modalities=("cr",)))[1].modalities == ("CR",)
    assert parse_source("dicomweb+https://pacs/dw", Access(modalities=("*",)))[1].modalities == ()
    with pytest.raises(ValueError, match="modality"):
        parse_source("dicomweb+https://pacs/dw", Access(modalities=("C;R",)))


def test_credentials_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("BACKFILL_DICOMWEB_TOKEN", raising=False)
    monkeypatch.setenv("PACS_PW", "from-env")
    assert Access(user="u", password_env="PACS_PW").auth().requests_auth() == ("u", "from-env")
    (tmp_path / "pw").write_text("from-file\n")
    auth = Access(user="u", password_env="PACS_PW", password_file=str(tmp_path / "pw")).auth()
    assert auth.requests_auth() == ("u", "from-file") and "from-file" not in repr(auth) + str(auth.to_dict())
    with pytest.raises(ValueError, match="needs a password"):
        Access(user="u", password_env="NOT_SET_ANYWHERE").auth()
    with pytest.raises(ValueError, match="cannot read"):
        Access(user="u", password_file=str(tmp_path / "missing")).auth()
    assert Access().auth().kind == "none"
    monkeypatch.setenv("BACKFILL_DICOMWEB_TOKEN", "t0ken")
    assert Access().auth().headers() == {"Authorization": "Bearer t0ken"}


def dicom_bytes(tmp_path, name: str, modality: str, study: str, series: str, sop: str) -> bytes:
    image = np.full((64, 64), 100, np.uint16)
    image[:20] = 3000
    return write_dicom(tmp_path / name, image, modality=modality, study_uid=study, series_uid=series, sop_uid=sop,
                       bits_stored=12).read_bytes()


@pytest.fixture
def fake(tmp_path):
    with FakeArchive(user="backfill", password="pw") as archive:
        archive.add("1.2.1", "1.2.1.1", "DX", "1.2.1.1.1", dicom_bytes(tmp_path, "a.dcm", "DX", "1.2.1", "1.2.1.1",
                                                                      "1.2.1.1.1"))
        archive.add("1.2.1", "1.2.1.2", "CT", "1.2.1.2.1", b"a CT, never fetched")
        archive.add("1.2.2", "1.2.2.1", "CR", "1.2.2.1.1", dicom_bytes(tmp_path, "b.dcm", "CR", "1.2.2", "1.2.2.1",
                                                                      "1.2.2.1.1"), date="20240301")
        archive.add("1.2.2", "1.2.2.1", "CR", "1.2.2.1.2", b"fails")
        archive.failures = {"1.2.2.1.2": [503] * 10}
        yield archive


@pytest.fixture
def access(tmp_path) -> Access:
    (tmp_path / "password").write_text("pw")
    return Access(user="backfill", password_file=str(tmp_path / "password"), **QUICK)


def test_list_sources_gives_one_stable_path_per_instance(fake, access):
    source = f"dicomweb+{fake.url}?from=20240101&to=20241231"
    listing = Listing()
    files, skipped = list_sources([source, f"dicomweb+{fake.url}/?study=1.2.2"], access, listing)
    base = f"dicomweb+{fake.url}"
    assert sorted(files) == [f"{base}/studies/1.2.1/series/1.2.1.1/instances/1.2.1.1.1",
                     f"{base}/studies/1.2.2/series/1.2.2.1/instances/1.2.2.1.1",
                     f"{base}/studies/1.2.2/series/1.2.2.1/instances/1.2.2.1.2"]  # the study's instances once
    assert skipped == [] and listing.instances == 5 and listing.failed == []
    files.sort()
    assert sorted(list_source(f"dicomweb+{fake.url}?from=20240201", access)) == files[1:]  # same keys, other query
    asked = len(fake.requests)
    assert list_source(files[0], access) == files[:1] and len(fake.requests) == asked  # an instance's path: itself
    assert all(split_path(f)[0] == fake.url for f in files)
    with pytest.raises(DicomwebError, match="401"):
        list_source(source, Access(**QUICK))  # no credentials


def test_fetched_and_a_decoding_actor_make_a_row_of_every_instance(fake, access, tmp_path):
    base = f"dicomweb+{fake.url}"
    paths = [f"{base}/studies/1.2.1/series/1.2.1.1/instances/1.2.1.1.1",  # fetched
             f"{base}/studies/1.2.2/series/1.2.2.1/instances/1.2.2.1.2",  # 503 after the retries
             f"{base}/studies/1.2.2/series/1.2.2.1/instances/1.2.2.1.9",  # 404
             f"{base}/studies/1.2.2/series/1.2.2.1/instances/1.2.2.1.1"]  # fetched after a failing one
    with fetched(paths, ArchivePool(access)) as (local, errors):
        assert local[0].endswith(".dcm") and local[1] is None and local[2] is None
        assert open(local[0], "rb").read() == fake.instances[0].data
        assert sorted(errors) == [1, 2]
    decoder = Decoder(PreprocessSpec(image_size=32), PoolSettings(mode="threads", workers=1), dicomweb=access)
    try:
        out = decoder({"path": np.array(paths + ["dicomweb+https://x/dw/studies/1/series/2"], dtype=object)})
    finally:
        decoder.engine.close()
    headers = [json.loads(h) for h in out["header"]]
    assert list(out["reason"]) == ["", "fetch_failed", "file_not_found", "", "fetch_failed"]
    assert "HTTP 503" in out["message"][1] and "HTTP 404" in out["message"][2]
    assert [h.get("SOPInstanceUID") for h in headers] == ["1.2.1.1.1", "1.2.2.1.2", "1.2.2.1.9", "1.2.2.1.1", None]
    assert headers[1]["StudyInstanceUID"] == "1.2.2" and headers[0]["Modality"] == "DX"
    assert out["image"][0].max() > 0 and out["image"][1].max() == 0
    assert "pw" not in " ".join(out["message"])
    wado = [p for p in fake.paths() if "/instances/" in p]
    assert wado.count("/dicom-web/studies/1.2.2/series/1.2.2.1/instances/1.2.2.1.2") == 2 * (1 + QUICK_RETRIES)
    assert not any(p.endswith("/instances/1.2.1.2.1") for p in fake.paths())



def test_fetch_error_reasons():
    path = "dicomweb+https://pacs/dw/studies/1.2/series/1.2.3/instances/1.2.3.4"
    assert dicomweb.fetch_error(path, DicomwebError("x", 410))[0] == "file_not_found"
    assert dicomweb.fetch_error(path, DicomwebError("x", None))[0] == "fetch_failed"
    assert dicomweb.fetch_error(path, OSError(28, "No space left on device"))[0] == "os_error"
    assert dicomweb.fetch_error("s3://bucket/x.dcm", DicomwebError("x")) is None
    assert dicomweb.header_of(path) == {"SOPInstanceUID": "1.2.3.4", "StudyInstanceUID": "1.2"}
    assert dicomweb.header_of("/local/1.2.3.dcm") == {}


def test_backfill_flags_make_the_access(capsys):
    import backfill

    common = ["dicomweb+https://pacs/dw", "--model", "m.onnx", "--output", "out"]
    args = backfill.parse_args([*common, "--dicomweb-user", "u", "--dicomweb-password-file", "/run/pw",
                                "--dicomweb-modalities", "CR", "DX", "--dicomweb-page-size", "50"])
    assert Access.from_args(args) == Access(user="u", password_file="/run/pw", modalities=("CR", "DX"), page_size=50)
    assert Access.from_args(backfill.parse_args(common)) == Access()  # the constants' defaults
    with pytest.raises(SystemExit):
        backfill.parse_args([*common, "--dicomweb-page-size", "0"])
    assert "--dicomweb-page-size" in capsys.readouterr().err
