"""The files a backfill classifies: local folders and lists, CSV manifests, fsspec URLs.

    files, skipped = list_sources(["/archive", "more.txt", "manifest.csv", "s3://bucket/xrays/"])
    with fetched(paths) as (local, errors): ...   # remote files copied to a temporary folder

Local folders, files and list files (``*.txt``/``*.lst``/``*.list``) are expanded exactly as
predict.py does it (:func:`utils.infer.batch_predict.collect_inputs`). A ``*.csv`` file, local or
remote, is a manifest: one file per row, in its ``path`` column (else its first column),
relative entries taken relative to the manifest's folder. A URL (``scheme://...``) is opened
with fsspec (``s3://`` needs ``s3fs``, ``gs://`` ``gcsfs``; ``file://`` and ``memory://`` need
nothing): a folder is listed recursively, keeping images, files named as DICOM and files without
a suffix (archives often name DICOMs by their UID only, ``1.2.840...`` whose last part is a
number counting as no suffix; one that is not DICOM becomes a ``not_dicom`` row); content is not sniffed there, since that would read every object twice. Remote files keep
their URL as ``path``; decoding copies them to a local temporary file first (:func:`fetched`).
A ``dicomweb+https://`` (or ``dicomweb+http://``) source is a DICOMweb archive, listed by QIDO-RS and fetched by
WADO-RS (:mod:`utils.backfill.dicomweb`): each instance is a path of its own.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence

from utils.backfill import dicomweb
from utils.dicomweb.archive import Listing
from utils.infer.batch_predict import DICOM_SUFFIXES, LIST_SUFFIXES, collect_inputs
from utils.preprocessing import is_raster
from utils.untrusted import safe_filename

MANIFEST_SUFFIX = ".csv"
MANIFEST_PATH_COLUMN = "path"  # else the manifest's first column
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(path: str | os.PathLike) -> bool:
    return bool(_URL.match(os.fspath(path)))


def list_sources(sources: Iterable[str | os.PathLike], dicomweb_access: dicomweb.Access | None = None,
                 listing: Listing | None = None) -> tuple[list[str], list[str]]:
    """(files, skipped files) for SOURCE arguments, in order, each file once.
    FileNotFoundError for a source that does not exist. DICOMweb sources are listed with ``dicomweb_access``
    (ValueError, DicomwebError: see :func:`utils.backfill.dicomweb.list_source`), counted in ``listing``."""
    files: list[str] = []
    skipped: list[str] = []
    for source in sources:
        source = os.fspath(source)
        if dicomweb.is_dicomweb(source):
            files += dicomweb.list_source(source, dicomweb_access, listing)
        elif source.lower().endswith(MANIFEST_SUFFIX):
            files += read_manifest(source)
        elif is_url(source):
            found, left = list_url(source)
            files += found
            skipped += left
        else:
            found, left = collect_inputs([source])
            files += found
            skipped += left
    seen: set[str] = set()
    return [f for f in files if not (_key(f) in seen or seen.add(_key(f)))], skipped


def _key(path: str) -> str:
    return path if is_url(path) else os.path.abspath(path)


def _wanted(name: str) -> bool:
    suffix = posixpath.splitext(name)[1][1:]
    return is_raster(name) or name.lower().endswith(DICOM_SUFFIXES) or not suffix or suffix.isdigit()


def list_url(url: str) -> tuple[list[str], list[str]]:
    """(files, skipped) under an fsspec URL: a folder (recursive, hidden entries left out), a list
    file, or one file."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if fs.isdir(root):
        files, skipped = [], []
        root = root.rstrip("/")
        for path in sorted(fs.find(root)):
            relative = path[len(root):].lstrip("/")
            if any(part.startswith(".") for part in relative.split("/")):
                continue
            (files if _wanted(posixpath.basename(path)) else skipped).append(fs.unstrip_protocol(path))
        return files, skipped
    if not fs.exists(root):
        raise FileNotFoundError(f"{url}: no such file or folder")
    if root.lower().endswith(LIST_SUFFIXES):
        with fs.open(root, "r") as handle:
            lines = [line.strip() for line in handle.read().splitlines()]
        return [_resolve(url, line) for line in lines if line and not line.startswith("#")], []
    return [url], []


def read_manifest(manifest: str | os.PathLike) -> list[str]:
    """The paths of a CSV manifest (column ``path``, else the first), relative ones taken relative
    to the manifest's folder; blank entries ignored. Missing files are kept (they become
    ``file_not_found`` rows)."""
    import fsspec

    manifest = os.fspath(manifest)
    if not is_url(manifest) and not os.path.isfile(manifest):
        raise FileNotFoundError(f"{manifest}: no such manifest")
    with fsspec.open(manifest, "r", newline="") as handle:
        reader = csv.reader(io.StringIO(handle.read()))
        header = next(reader, None)
        if header is None:
            return []
        column = header.index(MANIFEST_PATH_COLUMN) if MANIFEST_PATH_COLUMN in header else 0
        entries = [row[column].strip() for row in reader if len(row) > column and row[column].strip()]
    return [_resolve(manifest, entry) for entry in entries]


def _resolve(listing: str, entry: str) -> str:
    """``entry`` of a list or manifest at ``listing``: absolute paths and URLs as they are, relative
    ones joined to the listing's folder."""
    if is_url(entry) or os.path.isabs(entry):
        return entry
    if is_url(listing):
        return posixpath.join(posixpath.dirname(listing), entry)
    return os.path.join(os.path.dirname(os.path.abspath(listing)), entry)


@contextlib.contextmanager
def fetched(paths: Sequence[str], archives: dicomweb.ArchivePool | None = None
            ) -> Iterator[tuple[list[str | None], dict[int, BaseException]]]:
    """Local paths for ``paths``: local ones as they are, URLs copied into a temporary folder
    (kept until the block ends; the file name keeps its suffix, which decides how rasters are
    read), DICOMweb instances fetched by ``archives`` (a pool with the default access if None).
    A URL that cannot be copied has ``None`` and its exception in ``errors`` by index."""
    local: list[str | None] = []
    errors: dict[int, BaseException] = {}
    with tempfile.TemporaryDirectory(prefix="backfill-") as tmp:
        for i, path in enumerate(paths):
            if not is_url(path):
                local.append(path)
                continue
            if dicomweb.is_dicomweb(path):
                archives = archives or dicomweb.ArchivePool()
                target = os.path.join(tmp, f"{i}.dcm")
                try:
                    archives.retrieve(path, target)
                    local.append(target)
                except Exception as error:  # noqa: BLE001 - its row says why (dicomweb.fetch_error); the batch goes on
                    local.append(None)
                    errors[i] = error
                continue
            name = safe_filename(posixpath.basename(path.rstrip("/")) or "file")  # a manifest's name: one component
            target = os.path.join(tmp, f"{i}_{name}")
            try:
                import fsspec

                with fsspec.open(path, "rb") as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                local.append(target)
            except Exception as error:  # noqa: BLE001 - a missing or unreadable object becomes its row
                local.append(None)
                errors[i] = error
        yield local, errors
