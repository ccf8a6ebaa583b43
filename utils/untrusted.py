"""Values from a file or a DICOM peer, made safe before they become a file name, a path or a log line.

A DICOM peer chooses its UIDs, its tags and its AE title; a model file chooses its class names; a manifest,
a CSV list or Orthanc's answers choose names too. None of them may choose where something is written or what
a log line says. So:

- :func:`safe_uid`: a SOP Instance UID as a file name stem. A valid UID (digits and dots, no leading zeros,
  at most 64 characters) is kept as it is; anything else (``../../x``, ``/etc/passwd``, empty, a NUL byte...)
  becomes ``invalid-uid-<readable part>-<16 hex digits of its SHA-256>``: the same value always gets the same
  name, and two different values get different names.
- :func:`safe_component` / :func:`safe_filename`: any other value that becomes one path component (a label, an
  AE title, a file name from a manifest). A name that is already harmless is kept as it is; otherwise the
  unsafe characters are replaced and the SHA-256 prefix of the original is appended, as above. The result has
  no separator, is not ``.``/``..``, has no control or invisible formatting character (NUL, CR/LF, ESC, RTL
  override), does not start with a dot, a dash or a space, is not a reserved Windows name (CON, NUL, COM1...)
  and fits a bounded number of UTF-8 bytes.
- :func:`contained`: the path ``folder/name`` resolved (symbolic links followed) and checked to be inside
  ``folder``; :class:`UnsafePathError` otherwise. The last check before writing, whatever made the name.
- :func:`log_safe`: a value for a log line: control and invisible characters escaped (``\\n``, ``\\x1b``,
  ``\\u202e``), length bounded. :class:`EscapeControlCharacters` does the same to whole log records (installed
  by the router on its log handlers, so a peer's value cannot forge a log line even where no call escaped it).

A derived name can, in principle, equal a harmless name another value keeps as it is (someone sends the literal
text ``invalid-uid-...``); the writers here never overwrite an existing file, so the worst outcome is a ``_1``
suffix. Only the standard library is used (importable without TensorFlow).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

UID_MAX = 64  # characters in a UID (PS3.5 9.1)
COMPONENT_MAX_BYTES = 120  # a path component, in UTF-8 bytes: room for "_<n>", a suffix, ".json" under 255
LOG_VALUE_MAX = 200  # characters of one value in a log line
LOG_MESSAGE_MAX = 8000  # characters of one whole log message (EscapeControlCharacters)
DIGEST_CHARS = 16  # hex digits of SHA-256 in a derived name: 64 bits, no collision in practice

_UID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
_FORBIDDEN = frozenset('/\\:*?"<>|')  # separators on POSIX and Windows, and what Windows refuses in a name
_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
                       *(f"COM{i}" for i in "123456789¹²³"), *(f"LPT{i}" for i in "123456789¹²³")})
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}\Z")  # a file name's suffix kept by safe_filename (.dcm, .png, .dicom)
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class UnsafePathError(OSError, ValueError):
    """A path built from an untrusted value would leave its folder (or cannot be a path at all).

    An OSError, so code that reports a failed write per object (the forwarders, ``predict.py --sort-into``)
    reports this one the same way; and a ValueError, as the value is what is wrong."""


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value if isinstance(value, str) else str(value)


def digest(value: object) -> str:
    """The first :data:`DIGEST_CHARS` hex digits of the SHA-256 of ``value`` (as UTF-8; lone surrogates kept)."""
    return hashlib.sha256(_text(value).encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_CHARS]


def is_uid(value: object) -> bool:
    """A valid DICOM UID: components of digits separated by dots, no leading zero (but "0"), 1..64 characters."""
    text = _text(value)
    return 0 < len(text) <= UID_MAX and _UID.fullmatch(text) is not None


def safe_uid(value: object) -> str:
    """``value`` itself when it is a valid UID (without the NUL or space padding DICOM allows at the end), else
    ``invalid-uid-[<readable part>-]<digest>`` (see the module)."""
    text = _text(value)
    if is_uid(text.rstrip("\x00 ")):
        return text.rstrip("\x00 ")
    readable = re.sub(r"\.{2,}", ".", re.sub(r"[^0-9A-Za-z.]+", "_", text)).strip("._")[:32].strip("._")
    return f"invalid-uid-{readable}-{digest(text)}" if readable else f"invalid-uid-{digest(text)}"


def _allowed(char: str) -> bool:
    return (char == " " or char.isprintable()) and char not in _FORBIDDEN


def _reserved(name: str) -> bool:
    """A name Windows gives to a device, with or without a suffix (``NUL``, ``com1.dcm``)."""
    return name.split(".", 1)[0].rstrip(" ").upper() in _RESERVED


def is_safe_component(text: str, max_bytes: int = COMPONENT_MAX_BYTES) -> bool:
    """``text`` can be used as one path component as it is (see the module for the rules)."""
    if not text or text in (".", "..") or text[0] in ".- " or text[-1] in ". ":
        return False
    if not all(_allowed(c) for c in text) or _reserved(text):
        return False
    try:
        return len(text.encode("utf-8")) <= max_bytes
    except UnicodeEncodeError:  # a lone surrogate (an undecodable byte of a file name)
        return False


def _truncate_bytes(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max(0, max_bytes)].decode("utf-8", "ignore")


def _derived(text: str, key: str, max_bytes: int) -> str:
    """A harmless readable version of ``text`` plus the digest of ``key``, within ``max_bytes``."""
    readable = "".join(c if _allowed(c) else "_" for c in text)
    readable = re.sub(r"\.{2,}", ".", re.sub(r"_{2,}", "_", readable)).lstrip("._- ")
    if _reserved(readable):
        readable = "_" + readable
    readable = _truncate_bytes(readable, max_bytes - DIGEST_CHARS - 1).rstrip(". ")
    return f"{readable}-{digest(key)}" if readable else f"unnamed-{digest(key)}"


def safe_component(value: object, max_bytes: int = COMPONENT_MAX_BYTES) -> str:
    """One path component for ``value``: itself when harmless, else a sanitised prefix plus its digest.
    ``max_bytes`` is at least 24 (``unnamed-<digest>``)."""
    text = _text(value)
    if is_safe_component(text, max_bytes):
        return text
    return _derived(text, text, max(max_bytes, 24))


def safe_filename(value: object, max_bytes: int = COMPONENT_MAX_BYTES) -> str:
    """:func:`safe_component` that keeps a short alphanumeric suffix (``.dcm``, ``.png``): it may decide how the
    file is read. The digest is the whole name's, so two names that differ only in their suffix stay apart."""
    text = _text(value)
    if is_safe_component(text, max_bytes):
        return text
    suffix = _SUFFIX.search(text)
    if suffix is None or suffix.start() == 0:
        return safe_component(text, max_bytes)
    stem, suffix = text[:suffix.start()], suffix.group()
    return _derived(stem, text, max(max_bytes - len(suffix), 24)) + suffix


def contained(folder: str | os.PathLike, name: str | os.PathLike) -> Path:
    """``folder / name`` resolved (symbolic links followed), checked to lie strictly inside ``folder`` (itself
    resolved); :class:`UnsafePathError` when it does not (``..``, an absolute ``name``, a link pointing out, a
    NUL byte). Returns the resolved path."""
    base = Path(folder).resolve()
    try:
        target = (base / name).resolve()
    except (ValueError, OSError) as error:  # a NUL byte; a loop of links
        raise UnsafePathError(f"{log_safe(os.fspath(name))!r} cannot be a path in {base}: {error}") from error
    if target == base or not target.is_relative_to(base):
        raise UnsafePathError(f"{log_safe(os.fspath(name))!r} would leave {base} (it resolves to "
                              f"{log_safe(str(target))})")
    return target


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def log_safe(value: object, limit: int = LOG_VALUE_MAX) -> str:
    """``value`` for a log or audit line: every character that is not printable (CR, LF, tab, ESC, NUL, bidi
    overrides, zero-width characters, line separators...) written as its escape; at most ``limit`` characters,
    then ``...[N more]``. Backslashes are left alone, so escaping twice changes nothing."""
    text = _text(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if len(text) > limit:
        text = f"{text[:limit]}...[{len(text) - limit} more]"
    return text


class EscapeControlCharacters(logging.Filter):
    """A handler filter: each record's message escaped with :func:`log_safe` (at most :data:`LOG_MESSAGE_MAX`
    characters). Tracebacks are left as they are. Install with ``handler.addFilter(EscapeControlCharacters())``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is logging's to report, not ours
            return True
        safe = log_safe(message, LOG_MESSAGE_MAX)
        if safe != message:
            record.msg, record.args = safe, None
        return True
