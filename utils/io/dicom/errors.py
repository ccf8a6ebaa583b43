"""The reader's errors: one ``ValueError`` subclass whose ``reason`` says what was wrong.

``REASONS`` lists every reason the reader gives, with what it means. ``contained`` turns
anything else a parser or codec raises into one of them, so nothing about a file's content
escapes as a bare pydicom, NumPy, struct or Rust exception.
"""

from __future__ import annotations

import io
import sys
from typing import Self

# reason -> what it means, for reports and for people reading them.
REASONS: dict[str, str] = {
    "not_dicom": "not a DICOM file at all (PNG, text, empty...)",
    "malformed_dicom": "DICOM, but its structure or an element's value cannot be parsed",
    "no_pixel_data": "a DICOM object without an image (SR, RT plan, PDF, parametric map...)",
    "invalid_pixel_module": "Rows, Columns, Bits, Samples per Pixel or Number of Frames unusable",
    "image_too_large": "the declared image is above the pixel budget (max_pixels)",
    "implausible_compression": "a large frame from a codestream too small to hold a real image",
    "truncated_pixel_data": "less pixel data than the header declares (often a cut-off copy)",
    "unsupported_transfer_syntax": "no decoder installed or known for the compression",
    "unsupported_photometric": "a Photometric Interpretation the reader does not convert",
    "decode_failed": "the decoder rejected the compressed data, or it disagrees with the header",
    "codec_panic": "a compiled decoder panicked on the data (caught in-process; the file alone is lost)",
    "out_of_memory": "decoding needed more memory than the process may use",
    "invalid_palette": "the Palette Color lookup tables cannot be applied",
    "invalid_modality_lut": "the Modality LUT or Rescale Slope/Intercept cannot be applied",
    "empty_image": "zero rows/columns, or every pixel displays the same",
}


class DicomReadError(ValueError):
    """A file that cannot be turned into an image; ``reason`` says why, ``path`` where."""

    reason: str = "unreadable"

    def __init__(self, message: str, path: str | None = None, reason: str | None = None) -> None:
        # Every argument goes to args, so the error pickles across worker processes.
        super().__init__(message, path, reason)
        self.message = message
        self.path = path
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        where = self.path if self.path is not None else "<DICOM stream>"
        return f"{where}: {self.message}"


class NotDicomError(DicomReadError):
    reason = "not_dicom"


class MalformedDicomError(DicomReadError):
    reason = "malformed_dicom"


class NoPixelDataError(DicomReadError):
    reason = "no_pixel_data"


class InvalidPixelModuleError(DicomReadError):
    reason = "invalid_pixel_module"


class ImageTooLargeError(DicomReadError):
    reason = "image_too_large"


class TruncatedPixelDataError(DicomReadError):
    reason = "truncated_pixel_data"


class UnsupportedTransferSyntaxError(DicomReadError):
    reason = "unsupported_transfer_syntax"


class UnsupportedPhotometricError(DicomReadError):
    reason = "unsupported_photometric"


class CodecPanicError(DicomReadError):
    reason = "codec_panic"


class EmptyImageError(DicomReadError):
    reason = "empty_image"


_CLASS_BY_REASON: dict[str, type[DicomReadError]] = {
    kind.reason: kind
    for kind in (NotDicomError, MalformedDicomError, NoPixelDataError, InvalidPixelModuleError, ImageTooLargeError,
                 TruncatedPixelDataError, UnsupportedTransferSyntaxError, UnsupportedPhotometricError,
                 CodecPanicError, EmptyImageError)
}

# --- Containing whatever a parser or codec raises --------------------------------------------

_PROPAGATE = (KeyboardInterrupt, SystemExit, GeneratorExit)


def exception_label(exc: BaseException) -> str:
    """``module.Type: text`` (builtins without module), shortened; for messages."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{name}: {text}" if text else name


def is_real_io_error(exc: BaseException) -> bool:
    """An OSError from the operating system (it has an errno), not one a parser made up."""
    return isinstance(exc, OSError) and exc.errno is not None


def passes_through(exc: BaseException) -> bool:
    """What the reader never converts: its own errors, interrupts, exits, cancellations, real
    I/O failures (missing file, permission, disk errors) and file objects that cannot seek."""
    if isinstance(exc, (DicomReadError, *_PROPAGATE, io.UnsupportedOperation)) or is_real_io_error(exc):
        return True
    asyncio = sys.modules.get("asyncio")  # only loaded if someone uses it
    return asyncio is not None and isinstance(exc, asyncio.CancelledError)


def make_error(reason: str, message: str, path: str | None) -> DicomReadError:
    """The error for ``reason``: its own subclass where there is one, else ``DicomReadError``."""
    kind = _CLASS_BY_REASON.get(reason, DicomReadError)
    return kind(message, path) if kind is not DicomReadError else DicomReadError(message, path, reason=reason)


def as_read_error(exc: BaseException, path: str | None, what: str, reason: str = "malformed_dicom") -> DicomReadError:
    """The typed error for ``exc``, raised trying to ``what`` (e.g. "parse the file").

    Memory and crashing compiled code get their own reasons; everything else gets ``reason``,
    with ``what`` and the original exception in the message.
    """
    label = exception_label(exc)
    if isinstance(exc, MemoryError):
        return make_error("out_of_memory", f"ran out of memory trying to {what} [{label}]", path)
    if not isinstance(exc, Exception):  # e.g. pyo3_runtime.PanicException from a Rust plugin
        return make_error("codec_panic", f"a compiled decoder panicked trying to {what} [{label}]", path)
    if isinstance(exc, RecursionError):
        return make_error("malformed_dicom", f"could not {what}: the data is nested too deeply [{label}]", path)
    return make_error(reason, f"could not {what} [{label}]", path)


class contained:
    """``with contained(path, "parse the file"):`` - any exception but those that
    ``passes_through`` leaves the block as a ``DicomReadError`` (with ``reason`` unless it is
    memory or a crash, see ``as_read_error``)."""

    def __init__(self, path: str | None, what: str, reason: str = "malformed_dicom") -> None:
        self.path, self.what, self.reason = path, what, reason

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is None or passes_through(exc):
            return False
        raise as_read_error(exc, self.path, self.what, self.reason) from exc
