"""Coverage-guided fuzzing of the DICOM reader with atheris (libFuzzer for Python).

Each input is read with ``fuzz.probe.exercise``: ``read_dicom`` with a small target shape (the
reduced JPEG 2000 path), ``read_dicom`` at full resolution, ``read_dicom_header``, all on
``io.BytesIO(data)``. A ``DicomReadError`` with a reason is the only expected failure; any
other exception, a hang past ``-timeout`` or memory past the cap is a finding.

    pip install atheris
    python -m fuzz.reader_target --make-seeds fuzz-seeds           # small valid files, every syntax
    python -m fuzz.reader_target -max_total_time=600 fuzz-work fuzz-seeds
    python -m fuzz.reader_target --keep-going findings --campaign 3600 fuzz-work fuzz-seeds

libFuzzer writes new interesting inputs to the first directory (``fuzz-work``) and reads the
others as seeds. Defaults added unless given: ``-max_len=65536 -rss_limit_mb=4096 -timeout=20
-print_final_stats=1``, and this process's address space is capped at 4 GiB
(``--address-space-gb``), so a reader that allocates too much raises MemoryError, a finding.

Counting. libFuzzer prints a status line (``#<executions> ... exec/s: N``) on every new
coverage and at every power of two, ``Done N runs in T second(s)`` at the end and
``stat::number_of_executed_units`` with ``-print_final_stats=1``. By default it stops at the
first finding: the traceback is printed, the input saved as ``crash-<sha1>`` (exit code 77 for
an uncaught Python exception, 70 for a timeout; ``-artifact_prefix=DIR/`` puts the files in
DIR); replay one with ``python -m fuzz.reader_target crash-<sha1>``. To count findings instead:

- ``--keep-going DIR`` catches every escape inside the target, counts it by signature (type and
  innermost frame), saves the first input of each signature to ``DIR/escape-<sha1>.dcm``, prints
  one ``NEW ESCAPE`` line per new signature and keeps ``DIR/summary.json`` up to date (also when
  libFuzzer exits; a later run in the same DIR adds to the counts). ``--summary DIR`` prints it.
- Hangs, running out of memory and native crashes still stop libFuzzer. ``--campaign SECONDS``
  (with ``--keep-going DIR``) runs the target again after each such stop until the time is
  spent, keeps the ``timeout-*``/``oom-*``/``crash-*`` inputs in DIR and counts them under
  "stops" in the summary. (libFuzzer's own ``-fork=1 -ignore_crashes=1`` does not work here: it
  re-executes ``argv[0]``, which under ``python -m`` is not an executable.)
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from fuzz.isolated import DEFAULT_PROBE, load_probe

DEFAULT_LIBFUZZER_ARGS = ("-max_len=65536", "-rss_limit_mb=4096", "-timeout=20", "-print_final_stats=1")
INSTRUMENTED_PACKAGES = ("pydicom", "utils", "fuzz")  # numpy, Pillow, codecs: native, not instrumented
# Data tables, not logic: instrumenting them only slows the start.
NOT_INSTRUMENTED = ("pydicom._dicom_dict", "pydicom._private_dict", "pydicom._uid_dict", "pydicom._version")


class _Findings:
    """Escapes counted by signature, for ``--keep-going``."""

    def __init__(self, directory: Path) -> None:
        """Continue the counts in ``directory/summary.json`` if a previous run left one."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        previous = _load_summary(directory)
        self.counts: Counter[str] = Counter({e["signature"]: e["count"] for e in previous["signatures"]})
        self.first: dict[str, dict] = {
            e["signature"]: {k: v for k, v in e.items() if k not in ("signature", "count")}
            for e in previous["signatures"]
        }
        self.executions = previous["executions"]
        self.stops: dict[str, int] = previous["stops"]
        self.previous_seconds = previous["seconds"]
        self.started = time.monotonic()
        self._written = 0.0

    def record(self, data: bytes, exc: BaseException, stage: str | None) -> None:
        from fuzz.probe import describe

        info = describe(exc)
        signature = f"{info['exception_type']} at {info['where']}"
        self.counts[signature] += 1
        if signature not in self.first:
            example = self.directory / f"escape-{hashlib.sha1(data).hexdigest()}.dcm"
            example.write_bytes(data)
            self.first[signature] = {**info, "stage": stage or "", "example": str(example)}
            print(f"NEW ESCAPE #{len(self.first)}: {signature} in {stage}: {info['message']} -> {example}",
                  file=sys.stderr, flush=True)
            self.write()
        elif time.monotonic() - self._written > 1.0:
            self.write()

    def write(self) -> None:
        summary = {
            "executions": self.executions,
            "seconds": round(self.previous_seconds + time.monotonic() - self.started, 1),
            "escapes": sum(self.counts.values()),
            "stops": self.stops,
            "signatures": [{"signature": s, "count": n, **self.first[s]} for s, n in self.counts.most_common()],
        }
        _save_summary(self.directory, summary)
        self._written = time.monotonic()


def _load_summary(directory: Path) -> dict:
    empty = {"executions": 0, "seconds": 0.0, "escapes": 0, "stops": {}, "signatures": []}
    path = directory / "summary.json"
    return {**empty, **json.loads(path.read_text())} if path.exists() else empty


def _save_summary(directory: Path, summary: dict) -> None:
    tmp = directory / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(directory / "summary.json")


def make_test_one_input(findings: _Findings | None, exercise):
    """libFuzzer's entry point around ``exercise`` (``fuzz.probe.exercise`` or a stand-in)."""

    def test_one_input(data: bytes) -> None:
        state: dict = {}
        if findings is None:
            exercise(lambda: io.BytesIO(data), state)  # an escape propagates: a libFuzzer crash
            return
        findings.executions += 1
        try:
            exercise(lambda: io.BytesIO(data), state)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - counting every escape is the point
            findings.record(data, exc, state.get("stage"))
        if findings.executions % 1000 == 0:
            findings.write()

    return test_one_input


def print_summary(directory: Path) -> int:
    summary = _load_summary(directory)
    print(f"{summary['executions']} executions in {summary['seconds']} s, {summary['escapes']} escapes, "
          f"{len(summary['signatures'])} distinct")
    if summary["stops"]:
        print("campaign stops: " + ", ".join(f"{kind} {n}" for kind, n in sorted(summary["stops"].items())))
    for entry in summary["signatures"]:
        print(f"{entry['count']:>8}  {entry['signature']} ({entry['stage']}): {entry['message'][:120]}")
        print(f"{'':>8}  e.g. {entry['example']}")
    return 0


def run_campaign(
    seconds: float, findings: Path, libfuzzer_args: list[str], address_space_gb: float, probe: str = DEFAULT_PROBE
) -> int:
    """Fuzz with ``--keep-going`` for ``seconds`` in all, starting again whenever libFuzzer stops
    on a hang (``timeout-*``), running out of memory (``oom-*``) or a native crash (``crash-*``);
    those inputs are kept in ``findings`` and counted in ``summary.json`` under "stops"."""
    import subprocess

    findings.mkdir(parents=True, exist_ok=True)
    passed = [a for a in libfuzzer_args if not a.startswith(("-max_total_time=", "-artifact_prefix="))]
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 5:
        before = {p.name for p in findings.iterdir()}
        code = subprocess.call([
            sys.executable, "-m", "fuzz.reader_target", "--keep-going", str(findings), "--probe", probe,
            "--address-space-gb", str(address_space_gb), f"-max_total_time={int(remaining)}",
            f"-artifact_prefix={findings}{os.sep}", *passed,
        ])
        new = [name for name in os.listdir(findings)
               if name not in before and not name.startswith(("escape-", "summary"))]
        summary = _load_summary(findings)
        for name in new:
            kind = name.split("-", 1)[0]
            summary["stops"][kind] = summary["stops"].get(kind, 0) + 1
        _save_summary(findings, summary)
        if code == 0 or not new:  # time is up (or -runs reached), or it failed without leaving an input
            break
        print(f"campaign: libFuzzer stopped on {', '.join(new)}; starting again", file=sys.stderr, flush=True)
    return print_summary(findings)


def _register_exit_hook(findings: _Findings) -> None:
    """libFuzzer ends the process with C ``exit()``, which skips Python's atexit; a C-level
    atexit handler writes the final counts."""
    import ctypes

    callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda _: findings.write())
    _register_exit_hook.keep = callback  # the C library holds a pointer to it until exit
    try:
        ctypes.CDLL(None).__cxa_atexit(callback, None, None)  # glibc's atexit() underneath
    except AttributeError:  # not glibc: the summary is still written every second and per new escape
        pass


def _with_defaults(libfuzzer_args: list[str]) -> list[str]:
    given = {arg.split("=", 1)[0] for arg in libfuzzer_args if arg.startswith("-")}
    return [arg for arg in DEFAULT_LIBFUZZER_ARGS if arg.split("=", 1)[0] not in given] + libfuzzer_args


def _instrumented_setup(warm_up: list[Path], probe: str):
    """Import the reader under atheris's instrumentation, then read a few files so modules
    pydicom imports lazily (decoders, encapsulation, LUT processing) are instrumented too.
    Returns the ``probe`` function."""
    import warnings

    import atheris

    with atheris.instrument_imports(include=list(INSTRUMENTED_PACKAGES), exclude=list(NOT_INSTRUMENTED)):
        for name in ("pydicom", "pydicom.encaps", "pydicom.pixels", "pydicom.pixels.processing"):
            importlib.import_module(name)
        exercise = load_probe(probe)  # fuzz.probe imports the reader: instrumented here

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for path in warm_up:
                data = path.read_bytes()
                try:
                    exercise(lambda data=data: io.BytesIO(data))
                except BaseException as exc:  # noqa: BLE001 - warm-up only; the campaign reports findings
                    print(f"warm-up: {path.name}: {type(exc).__name__}", file=sys.stderr)
    return exercise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        description="Fuzz utils.io.dicom.read_dicom / read_dicom_header with atheris; "
        "arguments not listed here go to libFuzzer (e.g. -runs=N -max_total_time=S CORPUS_DIR...).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--make-seeds", type=Path, metavar="DIR",
                        help="write small valid files in every transfer syntax to DIR and exit")
    parser.add_argument("--keep-going", type=Path, metavar="DIR",
                        help="count escapes by signature in DIR/summary.json instead of stopping at the first")
    parser.add_argument("--summary", type=Path, metavar="DIR", help="print DIR/summary.json and exit")
    parser.add_argument("--campaign", type=float, metavar="SECONDS",
                        help="with --keep-going: fuzz this long in all, restarting after hangs, OOMs and crashes")
    parser.add_argument("--address-space-gb", type=float, default=4.0,
                        help="RLIMIT_AS of the fuzzing process (0 = none)")
    parser.add_argument("--probe", default=DEFAULT_PROBE,
                        help="module:function that reads one input, as fuzz.probe.exercise")
    args, libfuzzer_args = parser.parse_known_args(argv)

    if args.make_seeds:
        from fuzz.corpus import write_seeds

        paths = write_seeds(args.make_seeds)
        print(f"{len(paths)} seed files in {args.make_seeds}")
        return 0
    if args.summary:
        return print_summary(args.summary)
    if args.campaign:
        if not args.keep_going:
            parser.error("--campaign needs --keep-going DIR")
        return run_campaign(args.campaign, args.keep_going, libfuzzer_args, args.address_space_gb, args.probe)

    import atheris

    os.environ.setdefault("RUST_BACKTRACE", "0")  # a codec panic's message is enough
    inputs = [Path(arg) for arg in libfuzzer_args if not arg.startswith("-")]
    warm_up = sorted(p for d in inputs if d.is_dir() for p in d.iterdir() if p.is_file())[:40]
    warm_up += [p for p in inputs if p.is_file()]
    exercise = _instrumented_setup(warm_up, args.probe)
    from utils.io.isolation import cap_address_space  # after _instrumented_setup, which imports utils first

    cap_address_space(int(args.address_space_gb * 2**30))

    import warnings

    warnings.simplefilter("ignore")  # pydicom warns on most malformed inputs; warnings are not findings
    findings = _Findings(args.keep_going) if args.keep_going else None
    if findings is not None:
        _register_exit_hook(findings)
    atheris.Setup([sys.argv[0], *_with_defaults(libfuzzer_args)], make_test_one_input(findings, exercise))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
