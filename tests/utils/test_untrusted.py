"""utils/untrusted.py: every hostile value a file or a DICOM peer can send becomes a harmless name or log text."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.untrusted import (
    COMPONENT_MAX_BYTES,
    EscapeControlCharacters,
    UnsafePathError,
    contained,
    is_safe_component,
    is_uid,
    log_safe,
    safe_component,
    safe_filename,
    safe_uid,
)

ROOT = Path(__file__).resolve().parents[2]

# Each a value a peer or a file may send; the id says which attack it stands for.
HOSTILE = {
    "climbing": "../../x",
    "absolute": "/etc/passwd",
    "missing_parent": "1.2/../../escaped",
    "dotdot": "..",
    "dot": ".",
    "empty": "",
    "nul": "1.2.3\x00/../x",
    "crlf": "1.2.3\r\nFAKE log line",
    "very_long": "1." + "2" * 300,
    "rtl_override": "1.2\u202egpj.exe",
    "windows_path": "..\\..\\x",
    "windows_reserved": "CON",
    "leading_dash": "-rf",
    "escape_sequence": "\x1b[31mred",
    "lone_surrogate": "a\udcff",
}


@pytest.mark.parametrize("value", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_value_becomes_one_harmless_name(value, tmp_path):
    for name in (safe_uid(value), safe_component(value), safe_filename(value), safe_filename(value + ".dcm")):
        assert is_safe_component(name), name
        assert name not in (".", "..") and "/" not in name and "\\" not in name and "\x00" not in name
        assert len(name.encode()) <= COMPONENT_MAX_BYTES
        assert name.isprintable() and name[0] not in ".- "
        assert contained(tmp_path, name) == tmp_path.resolve() / name
        (tmp_path / name).write_bytes(b"x")  # the filesystem takes it, and it lands in the folder
    assert sorted(p.parent for p in tmp_path.iterdir()) == [tmp_path] * len(list(tmp_path.iterdir()))


def test_a_valid_uid_is_kept_and_anything_else_is_derived():
    for uid in ("1.2.840.10008.5.1.4.1.1.1.1", "0", "1.0.2", "2.25." + "1" * 59):
        assert is_uid(uid) and safe_uid(uid) == uid
    for bad in ("1.2.03", "1..2", ".1", "1.", "1.2.a", " 1.2", "2.25." + "1" * 60, "1.2/3", ""):
        assert not is_uid(bad)
        assert safe_uid(bad).startswith("invalid-uid-"), bad
    assert safe_uid(None) == safe_uid("")
    assert safe_uid("1.2.3\x00") == safe_uid("1.2.3 ") == "1.2.3"  # the padding DICOM allows at the end
    assert safe_uid("../../x").startswith("invalid-uid-x-")  # a readable part, then the digest


def test_derived_names_are_stable_and_distinct():
    values = list(HOSTILE.values()) + ["../x", "..\\x", "/x", "x/", "x\x00", "x\n", "x\r", "1.2/../3", "1.2/../4"]
    for function in (safe_uid, safe_component, safe_filename):
        names = [function(v) for v in values]
        assert names == [function(v) for v in values]  # the same value: the same name
        assert len(set(names)) == len(set(values)), function.__name__  # different values: different names


def test_a_harmless_name_is_kept_as_it_is():
    for name in ("adult_chest", "IMG 0001.dcm", "Thorax-Ärzte", "CT_AI", "spine (lumbar)", "1.2.840.1.dcm"):
        assert safe_component(name) == name and safe_filename(name) == name


def test_safe_filename_keeps_the_suffix_that_decides_how_a_file_is_read():
    assert safe_filename("../../etc/x.png").endswith(".png")
    assert safe_filename("CON.dcm").endswith(".dcm") and not safe_filename("CON.dcm").upper().startswith("CON.")
    assert safe_filename("a\nb.dicom").endswith(".dicom")
    long = safe_filename("x" * 400 + ".dcm")
    assert long.endswith(".dcm") and len(long.encode()) <= COMPONENT_MAX_BYTES
    assert safe_filename("a/b.dcm") != safe_filename("a/b.png")


def test_reserved_windows_names_are_avoided_whatever_their_case_or_suffix():
    for name in ("CON", "nul", "Com1", "LPT9.txt", "aux.tar.gz", "PRN "):
        assert not is_safe_component(name)
        assert safe_component(name).split(".")[0].split("-")[0].upper() not in ("CON", "NUL", "COM1", "LPT9", "AUX")


@pytest.mark.parametrize("name", ["../x", "../../etc/passwd", "/etc/passwd", "a/../../x", "..", ".", "",
                                  "x\x00y"])
def test_contained_refuses_every_path_that_leaves_the_folder(tmp_path, name):
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(UnsafePathError):
        contained(folder, name)


def test_contained_follows_links_inside_the_folder(tmp_path):
    folder, outside = tmp_path / "folder", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "out").symlink_to(outside)  # a folder link pointing out
    (folder / "passwd.dcm").symlink_to(outside / "passwd")  # a file link pointing out (target missing too)
    (folder / "sub").mkdir()
    (folder / "inside.dcm").symlink_to(folder / "sub" / "real.dcm")
    for name in ("out/x.dcm", "passwd.dcm", "out"):
        with pytest.raises(UnsafePathError):
            contained(folder, name)
    assert contained(folder, "inside.dcm") == (folder / "sub" / "real.dcm").resolve()
    assert contained(folder, "sub/new.dcm") == (folder / "sub" / "new.dcm").resolve()
    with pytest.raises(ValueError):  # also a ValueError, and an OSError: callers reporting failed writes catch it
        contained(folder, "../x")
    assert issubclass(UnsafePathError, OSError)


def test_a_folder_given_through_a_link_is_fine(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    assert contained(tmp_path / "alias", "a.dcm") == real.resolve() / "a.dcm"


@pytest.mark.parametrize("value, shown", [
    ("line\r\nFAKE 2024-01-01 INFO forged", "line\\r\\nFAKE 2024-01-01 INFO forged"),
    ("\x1b[2J\x1b[31m", "\\x1b[2J\\x1b[31m"),
    ("a\x00b\tc", "a\\x00b\\tc"),
    ("evil\u202egpj.exe", "evil\\u202egpj.exe"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("para\u2029graph", "para\\u2029graph"),
    ("1.2.840.10008", "1.2.840.10008"),
    ("Ärzte C:\\path", "Ärzte C:\\path"),
    (None, ""),
    (b"A\nB", "A\\nB"),
])
def test_log_safe_escapes_what_could_forge_or_hide_a_line(value, shown):
    assert log_safe(value) == shown
    assert log_safe(log_safe(value)) == log_safe(value)  # escaping twice changes nothing


def test_log_safe_bounds_the_length():
    text = log_safe("A" * 10_000)
    assert text.startswith("A" * 200) and text.endswith("...[9800 more]") and len(text) < 220
    assert log_safe("x" * 50, limit=10) == "x" * 10 + "...[40 more]"


def test_the_log_filter_escapes_whole_records():
    logger = logging.getLogger("tests.untrusted")
    handler = logging.Handler()
    records = []
    handler.emit = records.append
    handler.addFilter(EscapeControlCharacters())
    logger.addHandler(handler)
    try:
        logger.warning("refused %s from %s", "1.2\r\n2024 INFO forged", "AE\x1b[0m")
        logger.warning("plain %d%%", 5)
    finally:
        logger.removeHandler(handler)
    assert records[0].getMessage() == "refused 1.2\\r\\n2024 INFO forged from AE\\x1b[0m"
    assert records[1].getMessage() == "plain 5%" and len(records) == 2
    bad = logging.LogRecord("x", logging.INFO, __file__, 1, "bad format %d", ("text",), None)
    assert EscapeControlCharacters().filter(bad) and bad.args == ("text",)  # logging reports it, the filter is quiet


def test_importable_without_tensorflow():
    code = "import sys, utils.untrusted; assert 'tensorflow' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
