"""Steps 1-2: parse a file into a pydicom Dataset, and make sure it holds pixel data.

The file is read through a view that never asks for more bytes than the file has, so an
element that declares a length of 4 GiB costs nothing, and a Deflated Explicit VR file is
refused before pydicom inflates it when it would expand beyond ``MAX_INFLATED_BYTES``.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from .errors import (
    DicomReadError,
    ImageTooLargeError,
    MalformedDicomError,
    NoPixelDataError,
    NotDicomError,
    TruncatedPixelDataError,
    as_read_error,
    exception_label,
    passes_through,
)

logger = logging.getLogger(__name__)

Source = str | os.PathLike | BinaryIO

# A Deflated Explicit VR dataset may not inflate to more than this (pydicom holds it in memory
# twice while parsing); a few kilobytes of deflate can otherwise expand to gigabytes.
MAX_INFLATED_BYTES = 1 << 30
_INFLATE_STEP = 1 << 24  # bytes inflated at a time while measuring

# The start of encapsulated Pixel Data in explicit VR little endian: tag (7FE0,0010),
# VR OB or OW, two reserved bytes, undefined length.
_ENCAPSULATED_PIXEL_DATA_HEADS = (
    b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff",
    b"\xe0\x7f\x10\x00OW\x00\x00\xff\xff\xff\xff",
)
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# A dataset without preamble starts with a group 0002 or 0008 tag, little or big endian.
BARE_DATASET_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
# At least one of these must be present for a forced (preamble-less) parse to count.
_DATASET_EVIDENCE = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "Rows",
    "PixelData",
)


def describe(source: Source) -> str | None:
    """The path errors name: the path itself, a file object's name, or None."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else None


# --- Reading no further than the file goes ---------------------------------------------------


class BoundedView:
    """A read-only view of a binary file from ``start`` to its end.

    ``read(n)`` asks the file for at most the bytes that are left: CPython's buffered
    ``read(n)`` allocates ``n`` bytes before reading, so an element declaring a 4 GiB length
    would otherwise cost 4 GiB. Positions count from ``start``, so a parser that rewinds to 0
    rewinds to where the caller's file object was.
    """

    def __init__(self, raw: BinaryIO, name: str | None) -> None:
        self._raw = raw
        self._start = raw.tell()
        self._size = raw.seek(0, os.SEEK_END) - self._start
        raw.seek(self._start)
        if name is not None:  # pydicom builds messages with getattr(fp, "name", "<no filename>")
            self.name = name

    def read(self, size: int | None = -1) -> bytes:
        left = max(0, self._size - self.tell())
        return self._raw.read(left if size is None or size < 0 else min(size, left))

    def tell(self) -> int:
        return self._raw.tell() - self._start

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            return self._raw.seek(self._start + offset) - self._start
        if whence == os.SEEK_END:
            return self._raw.seek(self._start + self._size + offset) - self._start
        return self._raw.seek(offset, whence) - self._start

    @property
    def size(self) -> int:
        return self._size

    def close(self) -> None:  # the caller's file stays open; open_source closes its own
        pass


@contextmanager
def open_source(source: Source) -> Iterator[BoundedView]:
    """A ``BoundedView`` of a path (opened and closed here) or of a file object from its
    current position. A missing or unreadable file raises its OSError."""
    path = describe(source)
    if hasattr(source, "read"):
        yield BoundedView(source, path)
        return
    with open(source, "rb") as raw:
        yield BoundedView(raw, path)


# --- Step 1: parse ----------------------------------------------------------------------------


def parse(view: BoundedView, path: str | None, *, stop_before_pixels: bool) -> Dataset:
    """dcmread for files with the 'DICM' marker; a forced read for preamble-less files that
    start like a DICOM dataset and hold recognisable elements; anything else is not DICOM."""
    view.seek(0)
    head = view.read(132)
    marked = head[128:132] == b"DICM"
    if not marked and head[:2] not in BARE_DATASET_STARTS:
        raise NotDicomError(
            "not a DICOM file: no 'DICM' marker at byte 128 and it does not start with a DICOM data element",
            path,
        )
    _check_inflated_size(view, 132 if marked else 0, path)
    view.seek(0)
    try:
        ds = dcmread(view, force=not marked, stop_before_pixels=stop_before_pixels)
    except BaseException as exc:
        if passes_through(exc):
            raise
        raise _parse_error(exc, view, path, marked) from exc
    if not marked:
        if not any(keyword in ds for keyword in _DATASET_EVIDENCE):
            raise NotDicomError("not a DICOM file: no 'DICM' marker and no recognisable DICOM elements", path)
        logger.debug("%s: read without DICOM preamble/file meta", path)
    return ds


def _parse_error(exc: BaseException, view: BoundedView, path: str | None, marked: bool) -> DicomReadError:
    ran_out = view.tell() >= view.size  # the parser stopped at the end of the file
    # With warnings turned into errors, pydicom's "End of file reached before delimiter"
    # warning for cut-off encapsulated pixel data arrives here as an exception.
    if unterminated_encapsulated_pixel_data(view):
        return truncated_encapsulated_error(path)
    if not isinstance(exc, Exception) or isinstance(exc, (MemoryError, RecursionError)):
        return as_read_error(exc, path, "parse the file")
    if not marked:  # a forced parse of something that only started like DICOM
        return NotDicomError(f"not a readable DICOM file [{exception_label(exc)}]", path)
    if ran_out and _image_storage_in_meta(view):
        return TruncatedPixelDataError(
            f"the file ends inside its header, before the pixel data: it is cut off [{exception_label(exc)}]", path
        )
    return MalformedDicomError(
        "the DICOM file is malformed: its data elements cannot be parsed (a corrupt sequence, "
        f"length or value{', or the file is cut off' if ran_out else ''}) [{exception_label(exc)}]",
        path,
    )


def _image_storage_in_meta(view: BoundedView) -> bool:
    view.seek(132)
    try:
        uid = _read_file_meta_info(view).get("MediaStorageSOPClassUID")
        return bool(uid) and "Image Storage" in UID(str(uid)).name
    except Exception:  # noqa: BLE001 - unreadable meta: nothing to go on
        return False


def _check_inflated_size(view: BoundedView, meta_start: int, path: str | None) -> None:
    """Refuse a Deflated Explicit VR dataset that inflates beyond ``MAX_INFLATED_BYTES``.

    Reads the file meta the way pydicom will; any problem there is left for dcmread to report.
    """
    view.seek(meta_start)
    try:
        syntax = _read_file_meta_info(view).get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - reported by the real parse
        return
    if syntax != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while not inflater.eof and (data := view.read(_INFLATE_STEP)):
            while data:
                total += len(inflater.decompress(data, _INFLATE_STEP))
                if total > MAX_INFLATED_BYTES:
                    raise ImageTooLargeError(
                        f"the deflate-compressed dataset expands to more than {MAX_INFLATED_BYTES >> 20} MiB",
                        path,
                    )
                data = inflater.unconsumed_tail
    except zlib.error:
        return  # corrupt deflate data: dcmread reports it


# --- Truncated encapsulated pixel data -------------------------------------------------------


def unterminated_encapsulated_pixel_data(view: BoundedView) -> bool:
    """Whether the file holds the start of encapsulated Pixel Data but no sequence delimiter
    after it: the file ends inside the compressed pixel data."""
    view.seek(0)
    data = view.read()
    start = max(data.rfind(head) for head in _ENCAPSULATED_PIXEL_DATA_HEADS)
    return start >= 0 and data.find(_SEQUENCE_DELIMITER, start) < 0


def truncated_encapsulated_error(path: str | None) -> TruncatedPixelDataError:
    return TruncatedPixelDataError(
        "the encapsulated (compressed) pixel data ends before its sequence delimiter: "
        "the file is truncated",
        path,
    )


# --- Step 2: is there pixel data at all ------------------------------------------------------


def require_pixel_data(ds: Dataset, view: BoundedView, path: str | None) -> None:
    if "PixelData" in ds:
        return
    sop = sop_class(ds)
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise NoPixelDataError(
            f"{sop} holds Float/Double Float Pixel Data (parametric map), which this reader does not handle",
            path,
        )
    # When the file ends inside encapsulated pixel data, pydicom warns and drops the element
    # (often the whole dataset): the start of the element in the raw bytes gives it away.
    if unterminated_encapsulated_pixel_data(view):
        raise truncated_encapsulated_error(path)
    if all(keyword in ds for keyword in ("Rows", "Columns", "BitsAllocated")):
        # An Image Pixel module without its pixels: the parse stopped early (a cut-off file,
        # or a corrupt element that pydicom took for the end of the data).
        raise TruncatedPixelDataError(
            f"this {sop} file describes an image (Rows, Columns, Bits Allocated) but has no Pixel Data: "
            "the file is cut off, or a corrupt element before the pixels hides them",
            path,
        )
    if len(ds) == 0:
        raise NoPixelDataError(
            f"the {sop} file holds no data elements after its file meta information (the file may be truncated)",
            path,
        )
    raise NoPixelDataError(f"no pixel data: the file is a {sop} object", path)


def sop_class(ds: Dataset) -> str:
    try:
        uid = ds.get("SOPClassUID") or file_meta(ds).get("MediaStorageSOPClassUID")
    except Exception:  # noqa: BLE001 - only used in a message
        uid = None
    if not uid:
        return "DICOM object without SOP Class UID"
    uid = UID(str(uid))
    return f"{uid.name} ({uid})" if uid.name != str(uid) else f"SOP Class {uid}"


def file_meta(ds: Dataset) -> Dataset:
    return getattr(ds, "file_meta", None) or FileMetaDataset()


def transfer_syntax(ds: Dataset) -> UID:
    """The file's transfer syntax, inferred from how it was parsed when there's no meta."""
    uid = file_meta(ds).get("TransferSyntaxUID")
    if uid:
        return UID(str(uid))
    implicit, little = ds.original_encoding
    if implicit is not False:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
