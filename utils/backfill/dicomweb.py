"""DICOMweb sources of backfill.py: ``dicomweb+https://host/dicom-web?from=YYYYMMDD&to=YYYYMMDD``.

    access = Access(user="backfill", password_file="/run/secrets/pacs")     # backfill.py's --dicomweb-* flags
    listing = Listing()
    paths = list_source("dicomweb+https://pacs/dicom-web?from=20240101&to=20240131", access, listing)
    pool = ArchivePool(access)
    pool.retrieve(paths[0], "/tmp/x.dcm")                                   # WADO-RS, the stored bytes

A source names the archive's base URL (the part before ``/studies``) behind ``dicomweb+``, and what to list in its
query: ``from`` / ``to`` (study dates, YYYYMMDD, either or both), or ``study`` (StudyInstanceUIDs, comma-separated
or repeated). The series kept are those whose Modality is in ``access.modalities`` (``*``: every series). Each
instance becomes one path, ``dicomweb+<base>/studies/<study>/series/<series>/instances/<sop>``: the row's key, the
same whatever query found it, so a run over a later or wider range skips what an earlier run did, and a path can
also be given on its own (or in a manifest) to classify that instance. Credentials never sit in the URL: they come
from a file or an environment variable (:class:`Access`), read where the request is made, so a Ray cluster's
nodes read them from their own file or environment and no secret travels with the tasks.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, fields

from utils import constants
from utils.dicomweb.archive import Archive, InstanceRef, Listing, Query
from utils.dicomweb.http import DicomwebError, Endpoint, HttpAuth, check_url, read_secret
from utils.untrusted import log_safe

log = logging.getLogger(__name__)

SCHEME = "dicomweb+"
QUERY_KEYS = ("from", "to", "study")
EVERY_MODALITY = "*"
FETCH_FAILED = "fetch_failed"  # reason of an instance the archive did not deliver (after the retries)
_INSTANCE = re.compile(r"(https?://.+?)(/studies/[0-9.]+/series/[0-9.]+/instances/[0-9.]+)")


def is_dicomweb(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().startswith((SCHEME + "http://", SCHEME + "https://"))


@dataclass(frozen=True)
class Access:
    """How to reach DICOMweb archives: backfill.py's ``--dicomweb-*`` flags (``BACKFILL_DICOMWEB_*``). Holds where
    the secrets are, never the secrets."""

    user: str = constants.BACKFILL_DICOMWEB_USER
    password_env: str = constants.BACKFILL_DICOMWEB_PASSWORD_ENV
    password_file: str = constants.BACKFILL_DICOMWEB_PASSWORD_FILE
    token_env: str = constants.BACKFILL_DICOMWEB_TOKEN_ENV
    token_file: str = constants.BACKFILL_DICOMWEB_TOKEN_FILE
    ca: str = constants.BACKFILL_DICOMWEB_CA
    cert: str = constants.BACKFILL_DICOMWEB_CERT
    key: str = constants.BACKFILL_DICOMWEB_KEY
    timeout_s: float = constants.BACKFILL_DICOMWEB_TIMEOUT_S
    retries: int = constants.BACKFILL_DICOMWEB_RETRIES
    retry_wait_s: float = 1.0
    page_size: int = constants.BACKFILL_DICOMWEB_PAGE_SIZE
    list_threads: int = constants.BACKFILL_DICOMWEB_LIST_THREADS
    max_instance_mb: int = constants.BACKFILL_DICOMWEB_MAX_INSTANCE_MB
    modalities: tuple[str, ...] = constants.BACKFILL_DICOMWEB_MODALITIES

    @classmethod
    def from_args(cls, args) -> Access:
        """From backfill.py's parsed flags (``args.dicomweb_user``...)."""
        values = {f.name: getattr(args, f"dicomweb_{f.name}") for f in fields(cls)
                  if hasattr(args, f"dicomweb_{f.name}")}
        if "modalities" in values:
            values["modalities"] = tuple(values["modalities"])
        return cls(**values)

    def auth(self) -> HttpAuth:
        """HTTP basic with ``user`` (its password from the file, else the variable), else a bearer token (file, else
        variable), else none. ValueError (SecretError) when a user has no password or a named file cannot be read."""
        if self.user:
            password, source = read_secret(self.password_file, self.password_env, "--dicomweb-password-file")
            if not password:
                raise ValueError(f"--dicomweb-user {log_safe(self.user)!r} needs a password: "
                                 f"--dicomweb-password-file, or the environment variable ${self.password_env}")
            return HttpAuth.basic(self.user, password, source)
        token, source = read_secret(self.token_file, self.token_env, "--dicomweb-token-file")
        return HttpAuth.bearer(token, source) if token else HttpAuth()

    def archive(self, base_url: str) -> Archive:
        endpoint = Endpoint.create(base_url, "DICOMweb source", auth=self.auth(), ca=self.ca or None,
                                   cert=self.cert or None, key=self.key or None, timeout_s=self.timeout_s)
        return Archive(endpoint, page_size=self.page_size, retries=self.retries, retry_wait_s=self.retry_wait_s,
                       max_instance_bytes=self.max_instance_mb << 20, threads=self.list_threads)

    def series_modalities(self) -> tuple[str, ...]:
        return () if EVERY_MODALITY in self.modalities else tuple(m.upper() for m in self.modalities)


def parse_source(source: str, access: Access | None = None) -> tuple[str, Query | InstanceRef]:
    """(the archive's base URL, what to list, or the one instance a path names). ValueError for anything else."""
    access = access or Access()
    if not is_dicomweb(source):
        raise ValueError(f"{log_safe(source)!r} is not a dicomweb+http(s):// source")
    parts = urllib.parse.urlsplit(source[len(SCHEME):])
    if parts.fragment:
        raise ValueError(f"{log_safe(source)!r}: no #fragment in a DICOMweb source")
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    instance = _INSTANCE.fullmatch(base)
    if instance:
        if parts.query:
            raise ValueError(f"{log_safe(source)!r}: an instance's path takes no query")
        return check_url(instance.group(1), "DICOMweb source"), InstanceRef.from_path(instance.group(2))
    base = check_url(base, "DICOMweb source")
    try:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as error:
        raise ValueError(f"{log_safe(source)!r}: a malformed query ({error})") from error
    unknown = sorted({k for k, _ in pairs} - set(QUERY_KEYS))
    if unknown:
        raise ValueError(f"{log_safe(source)!r}: unknown query key {log_safe(unknown[0])!r} (known: "
                         f"{', '.join(QUERY_KEYS)}; credentials go in the --dicomweb-* flags, never the URL)")
    single = {}
    for key in ("from", "to"):
        values = [v for k, v in pairs if k == key]
        if len(values) > 1:
            raise ValueError(f"{log_safe(source)!r}: {key} given twice")
        single[key] = _date(values[0], key, source) if values else ""
    if single["from"] and single["to"] and single["from"] > single["to"]:
        raise ValueError(f"{log_safe(source)!r}: from {single['from']} is after to {single['to']}")
    studies = tuple(s.strip() for k, v in pairs if k == "study" for s in v.split(",") if s.strip())
    date_range = f"{single['from']}-{single['to']}" if single["from"] or single["to"] else ""
    if single["from"] and single["from"] == single["to"]:
        date_range = single["from"]
    return base, Query(access.series_modalities(), date_range, studies)


def _date(text: str, key: str, source: str) -> str:
    try:
        datetime.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        raise ValueError(f"{log_safe(source)!r}: {key}={log_safe(text)!r} is not a date YYYYMMDD") from None
    return text


def instance_path(base_url: str, ref: InstanceRef) -> str:
    """The backfill's path (the row key) of one instance."""
    return f"{SCHEME}{base_url}{ref.path}"


def split_path(path: str) -> tuple[str, InstanceRef]:
    """(base URL, instance) of a path made by :func:`instance_path`; ValueError for anything else."""
    base, what = parse_source(path)
    if not isinstance(what, InstanceRef):
        raise ValueError(f"{log_safe(path)!r} names an archive, not one instance")
    return base, what


def list_source(source: str, access: Access | None = None, listing: Listing | None = None) -> list[str]:
    """The instance paths of one DICOMweb source (see the module). ValueError for a malformed source or unreadable
    credentials; DicomwebError when the archive cannot be searched for studies (a study or series that cannot be
    listed is recorded in ``listing`` instead)."""
    access = access or Access()
    listing = listing if listing is not None else Listing()
    base, what = parse_source(source, access)
    if isinstance(what, InstanceRef):
        listing.instances += 1
        return [instance_path(base, what)]
    with access.archive(base) as archive:
        log.info("listing %s (%s)", base, _describe(what))
        paths = [instance_path(base, ref) for ref in archive.list_instances(what, listing)]
    log.info("%s: %s", base, "; ".join(listing.lines()))
    return paths


def _describe(query: Query) -> str:
    what = [f"studies {', '.join(query.studies)}" if query.studies else
            f"study dates {query.study_date}" if query.study_date else "every study date"]
    what.append(f"series of modality {'/'.join(query.modalities)}" if query.modalities else "every series")
    return "; ".join(what)


class ArchivePool:
    """One :class:`Archive` (with its pooled sessions) per base URL, for a decoding actor's life."""

    def __init__(self, access: Access | None = None) -> None:
        self.access = access or Access()
        self._archives: dict[str, Archive] = {}

    def retrieve(self, path: str, target: str | os.PathLike) -> int:
        """Fetch the instance a path names into ``target``; its size. DicomwebError or ValueError when it cannot."""
        base, ref = split_path(path)
        if base not in self._archives:
            self._archives[base] = self.access.archive(base)
        return self._archives[base].retrieve(ref, target)

    def close(self) -> None:
        for archive in self._archives.values():
            archive.close()
        self._archives.clear()


def header_of(path: str) -> dict[str, str]:
    """The UIDs a DICOMweb path names (for the row of an instance that could not be fetched); {} for other paths."""
    try:
        _, ref = split_path(path)
    except ValueError:
        return {}
    return {"SOPInstanceUID": ref.instance, "StudyInstanceUID": ref.study}


def fetch_error(path: str, error: BaseException) -> tuple[str, str] | None:
    """(reason, message) of a failed fetch of a DICOMweb ``path``: ``file_not_found`` when the archive says the
    instance is not there (404, 410), ``os_error`` when the temporary file could not be written, ``fetch_failed``
    otherwise (no answer, an error status, a malformed answer, a malformed path, unreadable credentials). None for
    any other path (the engine's error_reason decides then)."""
    from utils.infer.engine import FILE_NOT_FOUND, OS_ERROR

    if not is_dicomweb(path):
        return None
    if isinstance(error, DicomwebError):
        return (FILE_NOT_FOUND if error.status in (404, 410) else FETCH_FAILED), str(error)
    if isinstance(error, OSError) and not isinstance(error, ValueError):
        return OS_ERROR, str(error)
    return FETCH_FAILED, f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
