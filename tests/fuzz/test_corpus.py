"""The reader's promise on the malformed-file corpus: an image or a DicomReadError, nothing else.

Every file of ``fuzz.corpus`` is read one after another in one process (``fuzz.sequential``:
a per-file alarm turns a Python-level hang into a failure, the process is capped at 4 GiB of
address space, and a file that kills the process is reported, not fatal to this session), and
the isolated runner is checked on a subset and on a stand-in reader that misbehaves on purpose.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from fuzz import corpus, isolated
from fuzz.sequential import check_files_sequentially
from utils.io.dicom import fallback

PER_FILE_TIMEOUT_S = 10  # a file takes well under a second; this only turns hangs into failures
MEMORY_GB = 4  # the address-space cap the reader must live within
REPO = Path(__file__).resolve().parents[2]

# The kinds of escape the reader was found to have, and the generic mutations.
NAMED_KINDS = ("codec_panic", "j2k_box", "voi_lut", "modality_lut", "palette", "pixel_module",
               "lazy_value", "sequence", "huge")
GENERIC_KINDS = ("truncated", "byte_flip", "overwrite", "transfer_syntax", "encapsulation",
                 "element_length", "not_dicom")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz_corpus")
    corpus.generate(out)
    return out


@pytest.fixture(scope="module")
def in_process(corpus_dir) -> dict[str, str]:
    """file name -> "decoded" | "typed_error:<reason>" | what escaped; every file read in turn."""
    paths = sorted(corpus_dir.glob("*.dcm"))
    results = check_files_sequentially(paths, timeout=PER_FILE_TIMEOUT_S, memory_gb=MEMORY_GB)
    return {Path(r["file"]).name: _outcome(r) for r in results}


def _outcome(result: dict) -> str:
    if result["outcome"] == "decoded":
        return "decoded"
    if result["outcome"] == "typed_error":
        return f"typed_error:{result['reason']}"
    if result.get("exception_type"):
        return (f"{result['outcome']}: {result['exception_type']} in {result.get('stage')}: "
                f"{result.get('message')} [{result.get('where')}]")
    return f"{result['outcome']}: {result.get('message')} {result.get('stderr', '')}".strip()


# --- The corpus itself ----------------------------------------------------------------------


def test_manifest_covers_every_kind(corpus_dir):
    rows = corpus.read_manifest(corpus_dir)
    counts = Counter(row["kind"] for row in rows)
    assert list(counts) == list(corpus.KINDS)
    assert set(NAMED_KINDS + GENERIC_KINDS) <= set(counts)
    for kind, count in counts.items():
        assert count >= 20 if kind == "valid" else count == corpus.DEFAULT_PER_KIND, kind
    on_disk = sorted(path.name for path in corpus_dir.glob("*.dcm"))
    assert on_disk == sorted(row["file"] for row in rows)
    assert all(row["file"].startswith(row["kind"] + "-") and row["description"] for row in rows)
    assert 200 <= len(rows) <= 600
    assert sum(path.stat().st_size for path in corpus_dir.glob("*.dcm")) < 10e6


def test_corpus_is_deterministic(corpus_dir, tmp_path):
    again = corpus.generate(tmp_path, per_kind=2)  # the first two of each kind, as in the fixture
    assert again
    for path in again:
        assert path.read_bytes() == (corpus_dir / path.name).read_bytes(), path.name


def test_seeds_are_small_valid_files(tmp_path):
    seeds = corpus.write_seeds(tmp_path, max_bytes=64 * 1024)
    names = {path.name for path in seeds}
    assert {"seed-ele_mono2_window.dcm", "seed-rle_mono2.dcm", "seed-j2k_lossless_mono1.dcm",
            "seed-deflate_voi_lut.dcm", "seed-ile_mono1_rescale.dcm", "seed-jpegls_lossless.dcm"} <= names
    assert all(path.stat().st_size <= 64 * 1024 for path in seeds)


# --- The reader's promise -------------------------------------------------------------------


def test_every_file_decodes_or_raises_a_typed_error(in_process):
    offenders = {name: outcome for name, outcome in in_process.items()
                 if outcome != "decoded" and not outcome.startswith("typed_error:")}
    assert not offenders, f"{len(offenders)} of {len(in_process)} files broke the promise:\n" + "\n".join(
        f"  {name}: {outcome}" for name, outcome in offenders.items())


def test_valid_files_decode(in_process, corpus_dir):
    valid = {name: outcome for name, outcome in in_process.items() if name.startswith("valid-")}
    assert valid
    # The Se = 0 12-bit JPEG needs the optional GDCM fallback; without it, a clear decode_failed.
    expected = {row["file"]: "typed_error:decode_failed" for row in corpus.read_manifest(corpus_dir)
                if row["description"].startswith("jpeg_extended_se0:") and not fallback.available()}
    failed = {name: outcome for name, outcome in valid.items() if outcome != expected.get(name, "decoded")}
    assert not failed, "\n".join(f"  {name}: {outcome}" for name, outcome in failed.items())


def test_not_dicom_files_are_reported_as_typed_errors(in_process):
    outcomes = {name: outcome for name, outcome in in_process.items() if name.startswith("not_dicom-")}
    assert outcomes and all(outcome.startswith("typed_error:") for outcome in outcomes.values()), outcomes


# --- The isolated runner --------------------------------------------------------------------


def _subset(corpus_dir: Path, size: int = 20) -> list[Path]:
    """The first file of every kind, then the second ones, up to ``size``."""
    by_kind: dict[str, list[str]] = {}
    for row in corpus.read_manifest(corpus_dir):
        by_kind.setdefault(row["kind"], []).append(row["file"])
    picked = [files[0] for files in by_kind.values()] + [files[1] for files in by_kind.values()]
    return [corpus_dir / name for name in picked[:size]]


def test_isolated_runner_on_a_subset(corpus_dir, tmp_path):
    files = _subset(corpus_dir)
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "fuzz.isolated", *map(str, files), "--workers", "2", "--timeout", "20",
         "--memory-gb", "4", "--report", str(report)],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=300,
    )
    assert report.exists(), run.stdout + run.stderr
    data = json.loads(report.read_text())
    summary, results = data["summary"], data["results"]
    assert [r["file"] for r in results] == [str(f) for f in files]
    assert summary["files"] == len(files) == sum(summary["outcomes"].values())
    assert sum(summary["reasons"].values()) == summary["outcomes"]["typed_error"]
    assert sum(sum(counts.values()) for counts in summary["by_kind"].values()) == len(files)
    assert report.with_suffix(".md").read_text().startswith("# Reader outcomes")
    broken = {o: n for o, n in summary["outcomes"].items() if o not in isolated.KEPT_PROMISE and n}
    assert not broken, f"{broken}\n{run.stdout}"
    assert run.returncode == 0, run.stdout + run.stderr


def misbehaving_reader(open_source, state):
    """A stand-in for ``fuzz.probe.exercise`` that does what the file's content says."""
    command = Path(open_source()).read_bytes().strip()
    state["stage"] = "read_dicom"
    if command == b"hang":
        while True:
            pass
    if command == b"native-hang":  # an alarm cannot interrupt it, as with a stuck codec
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        while True:
            pass
    if command == b"crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if command == b"oom":
        return {"outcome": "decoded", "size": len(bytearray(8 * 2**30))}
    if command == b"raise":
        raise KeyError("escaped")
    if command == b"typed":
        return {"outcome": "typed_error", "reason": "not_dicom", "stages": {}}
    return {"outcome": "decoded", "reason": "", "stages": {}}


def test_isolated_runner_classifies_every_outcome(tmp_path):
    expected = {"hang": "hang", "crash": "crash", "oom": "out_of_memory", "raise": "other_exception",
                "typed": "typed_error", "fine": "decoded"}
    paths = []
    for command in expected:
        path = tmp_path / f"{command}-000.dcm"
        path.write_bytes(command.encode())
        paths.append(path)
    results = isolated.check_files(paths, timeout=3, memory_gb=2, workers=2,
                                   probe="tests.fuzz.test_corpus:misbehaving_reader")
    got = {Path(r["file"]).stem.split("-")[0]: r["outcome"] for r in results}
    assert got == expected
    raised = next(r for r in results if r["outcome"] == "other_exception")
    assert raised["exception_type"] == "KeyError" and raised["stage"] == "read_dicom"
    summary = isolated.summarize(results)
    assert summary["escapes"] == 4 and summary["outcomes"]["typed_error"] == 1
    assert "4 file(s) broke the promise" in isolated.format_table(results)


def test_sequential_runner_survives_crashes_and_native_hangs(tmp_path):
    commands = ["fine", "raise", "crash", "typed", "native-hang", "hang", "fine"]
    paths = []
    for index, command in enumerate(commands):
        path = tmp_path / f"{command}-{index:03d}.dcm"
        path.write_bytes(command.encode())
        paths.append(path)
    results = check_files_sequentially(paths, timeout=1, memory_gb=2, native_grace=2,
                                       probe="tests.fuzz.test_corpus:misbehaving_reader")
    assert [r["file"] for r in results] == [str(p) for p in paths]
    assert [r["outcome"] for r in results] == ["decoded", "other_exception", "crash", "typed_error", "hang",
                                               "hang", "decoded"]
    assert "SIGSEGV" in results[2]["message"]
