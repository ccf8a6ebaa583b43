"""backfill.py's DICOMweb source against a real Orthanc with its DICOMweb plugin (QIDO-RS, WADO-RS, HTTP basic).

One Orthanc for the module holds three studies: A (2024-01-15: two DX instances, one JPEG 2000, one CR in RLE,
and a CT series), B (2024-01-20: one DX) and C (2023-12-01: one DX). The listing and fetching test needs no Ray:
the January range lists exactly A's and B's CR/DX instances, and each one fetched is byte for byte the file
uploaded (transfer-syntax=*: no transcoding). The backfill test (skips without Ray) runs backfill.py over study A
alone, then over December and January: the second run classifies only B and C, and the output holds every CR/DX
instance exactly once, with the label its image says.

Skips without Orthanc and its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb).
"""

from __future__ import annotations

import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from tests.orthanc_server import PASSWORD, USER, Orthanc, dicomweb_plugin, orthanc_binary
from utils.backfill.dicomweb import Access, ArchivePool, list_source
from utils.dicomweb.archive import Listing
from utils.io.dicom_writer import write_dicom

from .routing.conftest import CLASSES, ROWS_BY_CLASS, THRESHOLD, Process, bright_rows_image, brightness_model

pytestmark = pytest.mark.skipif(orthanc_binary() is None or dicomweb_plugin() is None,
                                reason="Orthanc or its DICOMweb plugin not installed "
                                       "(apt-get install orthanc orthanc-dicomweb)")

# (study, date, series, modality, label its image shows, transfer syntax) per instance; the CT is never listed
INSTANCES = [("A", "20240115", 1, "DX", "adult_chest", JPEG2000Lossless),
             ("A", "20240115", 1, "DX", "spine", None),
             ("A", "20240115", 2, "CR", "abdominal", RLELossless),
             ("A", "20240115", 3, "CT", "others", None),
             ("B", "20240120", 1, "DX", "pediatric_chest", None),
             ("C", "20231201", 1, "DX", "others", None)]
STUDY = {"A": "1.2.826.0.1.3680043.10.1", "B": "1.2.826.0.1.3680043.10.2", "C": "1.2.826.0.1.3680043.10.3"}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """(Orthanc, {SOP Instance UID: (uploaded file, study letter, modality, label)}, password file)."""
    root = tmp_path_factory.mktemp("dicomweb")
    started: list[Process] = []

    def start(args, log, **kwargs) -> Process:
        started.append(Process([str(a) for a in args], log, **kwargs))
        return started[-1]

    try:
        orthanc = Orthanc(start, root / "pacs", "PACS", dicomweb=True, auth=True)
        uploaded = {}
        for n, (study, date, series, modality, label, syntax) in enumerate(INSTANCES):
            sop = f"{STUDY[study]}.{series}.{n + 1}"
            path = write_dicom(root / "files" / f"{n}.dcm", bright_rows_image(ROWS_BY_CLASS[label]), bits_stored=12,
                               modality=modality, study_uid=STUDY[study], series_uid=f"{STUDY[study]}.{series}",
                               sop_uid=sop, extra={"StudyDate": date},
                               **({"transfer_syntax": syntax} if syntax else {}))
            orthanc.upload(path)
            uploaded[sop] = (path, study, modality, label)
        (root / "password").write_text(PASSWORD + "\n")
        yield orthanc, uploaded, root / "password"
    finally:
        for process in started:
            process.kill()


def source(orthanc: Orthanc, query: str) -> str:
    return f"dicomweb+{orthanc.dicomweb_url}?{query}"


def test_listing_and_fetching_from_orthanc(pacs, tmp_path):
    orthanc, uploaded, password = pacs
    access = Access(user=USER, password_file=str(password), retry_wait_s=0.0)
    listing = Listing()
    paths = list_source(source(orthanc, "from=20240101&to=20240131"), access, listing)
    sops = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert sops == sorted(s for s, (_, study, modality, _) in uploaded.items() if study in "AB" and modality != "CT")
    assert (listing.studies, listing.series, listing.invalid, listing.failed) == (2, 3, 0, [])
    assert all(p.startswith(f"dicomweb+{orthanc.dicomweb_url}/studies/") for p in paths)
    pool = ArchivePool(access)
    try:
        for path in paths:
            target = tmp_path / "x.dcm"
            pool.retrieve(path, target)
            assert target.read_bytes() == uploaded[path.rsplit("/", 1)[1]][0].read_bytes()  # the stored bytes
    finally:
        pool.close()
    assert list_source(source(orthanc, f"study={STUDY['C']}"), access)[0].endswith(f"{STUDY['C']}.1.6")
    with pytest.raises(Exception, match="401"):
        list_source(source(orthanc, "from=20240101"), Access(retries=0))  # no credentials


def test_backfill_of_a_dicomweb_archive_resumes_by_instance(pacs, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    import backfill
    from utils.backfill.store import OutputStore

    orthanc, uploaded, password = pacs
    model = brightness_model(tmp_path / "brightness.keras")
    out = tmp_path / "out"

    def run(query: str) -> str:
        code = backfill.main([source(orthanc, query), "--model", str(model), "--output", str(out), "--threshold",
                              str(THRESHOLD), "--workers", "1", "--num-cpus", "2", "--batch-size", "4", "--quiet",
                              "--dicomweb-user", USER, "--dicomweb-password-file", str(password)])
        printed = capsys.readouterr().out
        assert code == 0, printed
        return printed

    try:
        assert "3 files listed, 0 already in the output; 3 classified" in run(f"study={STUDY['A']}")
        assert "5 files listed, 3 already in the output; 2 classified" in run("from=20231101&to=20240131")
    finally:
        ray.shutdown()
    frame = OutputStore(out, CLASSES).read()
    wanted = {s: v for s, v in uploaded.items() if v[2] != "CT"}
    assert sorted(frame["SOPInstanceUID"]) == sorted(wanted) and frame["path"].is_unique  # each once, no CT
    for row in frame.itertuples():
        _, study, _, label = wanted[row.SOPInstanceUID]
        assert row.path.endswith(f"/studies/{STUDY[study]}/series/{row.SOPInstanceUID.rsplit('.', 1)[0]}"
                                 f"/instances/{row.SOPInstanceUID}")
        assert row.label == label and not row.error and row.StudyInstanceUID == STUDY[study], row
