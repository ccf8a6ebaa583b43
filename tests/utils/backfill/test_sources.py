"""utils.backfill.sources: local folders and lists as predict.py, CSV manifests, fsspec URLs."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest

from utils.backfill.sources import fetched, list_sources, list_url, read_manifest


def test_memory_url_folder_and_list():
    fs = fsspec.filesystem("memory")
    root = "/backfill-test"
    for name in ("a/1.2.3.dcm", "a/b/4.5.6", "a/notes.pdf", "a/.hidden/x.dcm", "a/scan.png"):
        fs.pipe(f"{root}/{name}", b"data")
    files, skipped = list_url(f"memory://{root}/a")
    assert files == [f"memory://{root}/a/1.2.3.dcm", f"memory://{root}/a/b/4.5.6", f"memory://{root}/a/scan.png"]
    assert skipped == [f"memory://{root}/a/notes.pdf"]
    fs.pipe(f"{root}/list.txt", b"# chosen\na/1.2.3.dcm\n\ns3://elsewhere/x.dcm\n")
    assert list_url(f"memory://{root}/list.txt")[0] == [f"memory://{root}/a/1.2.3.dcm", "s3://elsewhere/x.dcm"]
    with pytest.raises(FileNotFoundError):
        list_url(f"memory://{root}/nowhere")
    with fetched([f"memory://{root}/a/b/4.5.6", f"memory://{root}/gone.dcm", "/local/path.dcm"]) as (local, errors):
        assert Path(local[0]).read_bytes() == b"data" and local[1] is None and local[2] == "/local/path.dcm"
        assert list(errors) == [1] and isinstance(errors[1], FileNotFoundError)
    assert not os.path.exists(local[0])  # the temporary copies go with the block


@pytest.mark.parametrize("name", ["..", "x" * 300 + ".png", "a\r\nb.dcm", "\u202egpj.dcm", "..\\..\\x.dcm"])
def test_a_fetched_copy_stays_in_the_temporary_folder_under_a_harmless_name(name):
    fs = fsspec.filesystem("memory")
    url = f"memory:///backfill-hostile/{name}"
    fs.pipe(url[len("memory://"):], b"data")
    with fetched([url]) as (local, errors):
        assert not errors and Path(local[0]).read_bytes() == b"data"
        assert Path(local[0]).parent.name.startswith("backfill-") and len(Path(local[0]).name.encode()) < 255
        assert Path(local[0]).name.isprintable() and Path(local[0]).suffix == Path(name).suffix


def test_local_folder_manifest_file_url_and_duplicates(tmp_path):
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "x.dcm").write_bytes(b"not dicom")
    (tmp_path / "scans" / "README.txt").write_text("hi")
    (tmp_path / "manifest.csv").write_text("StudyInstanceUID,path\n1.2,scans/x.dcm\n1.3,missing.dcm\n")
    assert read_manifest(tmp_path / "manifest.csv") == [str(tmp_path / "scans/x.dcm"), str(tmp_path / "missing.dcm")]
    files, skipped = list_sources([tmp_path / "scans", tmp_path / "manifest.csv", f"file://{tmp_path}/scans"])
    # the folder and the manifest name x.dcm twice: kept once; the file:// URL stays a URL
    assert files == [str(tmp_path / "scans/x.dcm"), str(tmp_path / "missing.dcm"), f"file://{tmp_path}/scans/x.dcm"]
    assert skipped == [str(tmp_path / "scans/README.txt"), f"file://{tmp_path}/scans/README.txt"]
    with pytest.raises(FileNotFoundError):
        list_sources([tmp_path / "nothing.csv"])
