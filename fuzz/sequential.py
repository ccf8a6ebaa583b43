"""Read files one after another in this one process, as a batch tool does, and report each.

    python -m fuzz.sequential DIR_OR_FILE... [--timeout 10] [--memory-gb 4]

Unlike ``fuzz.isolated`` nothing is forked: the files share one interpreter, so state a bad
file leaves behind (memory, a codec's globals) meets the files after it. Each file runs
``fuzz.probe.exercise`` under a SIGALRM deadline, which turns a Python-level hang into a
``hang`` line (a hang inside native code is only reported once the native call returns), and
the whole process is capped at ``--memory-gb`` of address space.

One JSON object per line on stdout, printed as soon as the file is done:
``{"file", "outcome": "decoded" | "typed_error" | "other_exception" | "hang" |
"out_of_memory", "reason" | "exception_type", "message", "where", "stage", "seconds"}``.
A ``{"start": file}`` line comes before each file, so when the process itself dies (a
segfault, an abort on a failed native allocation) the last such line names the culprit.

``check_files_sequentially`` runs this in a subprocess and reads those lines: a file that
kills the process becomes a ``crash`` result, one stuck in native code past the deadline plus
a grace period a ``hang`` (the process is killed), and a new process goes on with the files
after it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from fuzz.isolated import DEFAULT_PROBE, collect, load_probe


class FileTimeout(BaseException):
    """Raised by the alarm; a BaseException so that no ``except Exception`` swallows it."""


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise FileTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_one(path: Path, timeout: float, exercise=None) -> dict:
    from fuzz.probe import describe

    if exercise is None:
        from fuzz.probe import exercise
    state: dict = {}
    started = time.monotonic()
    result: dict = {"file": str(path)}
    try:
        with time_limit(timeout):
            outcome = exercise(lambda: path, state)
        result.update(outcome=outcome["outcome"], reason=outcome["reason"])
    except FileTimeout:
        result.update(outcome="hang", message=f"still running after {timeout:g} s", stage=state.get("stage", ""))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - codec panics are BaseExceptions; all count
        outcome = "out_of_memory" if isinstance(exc, MemoryError) else "other_exception"
        result.update(outcome=outcome, stage=state.get("stage", ""), **describe(exc))
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def check_files_sequentially(
    paths: Sequence[str | os.PathLike],
    *,
    timeout: float = 10.0,
    memory_gb: float = 4.0,
    native_grace: float = 20.0,
    probe: str = DEFAULT_PROBE,
) -> list[dict]:
    """Run ``python -m fuzz.sequential`` on ``paths`` and return one result per path, in order.

    A file during which the process dies gets ``outcome="crash"``; a file that produces no
    result within ``timeout + native_grace`` seconds (a hang the alarm cannot interrupt,
    inside native code) gets ``outcome="hang"`` and the process is killed. Either way a fresh
    process continues with the next file.
    """
    remaining = [os.fspath(p) for p in paths]
    results: dict[str, dict] = {}
    repo = Path(__file__).resolve().parents[1]
    while remaining:
        command = [sys.executable, "-m", "fuzz.sequential", "--timeout", str(timeout),
                   "--memory-gb", str(memory_gb), "--probe", probe, *remaining]
        env = {**os.environ, "RUST_BACKTRACE": "0"}
        with tempfile.TemporaryFile() as errors, subprocess.Popen(
            command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=errors
        ) as process:
            current, last_seen, finished = _follow(process, results, timeout + native_grace)
            if current is not None and not finished:  # stuck in native code: give up on this file
                process.kill()
            process.wait()
            errors.seek(0)
            stderr = errors.read().decode("utf-8", "replace")
        if current is None:
            break  # every file answered
        if finished:
            code = process.returncode
            what = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            results[current] = {"file": current, "outcome": "crash", "message": f"the process {what}",
                                "stderr": " ".join(stderr.split())[-400:], "seconds": round(last_seen, 3)}
        else:
            results[current] = {"file": current, "outcome": "hang", "seconds": round(last_seen, 3),
                                "message": f"no answer after {timeout + native_grace:g} s (native code); "
                                           "process killed"}
        remaining = remaining[remaining.index(current) + 1:]
    return [results.get(p, {"file": p, "outcome": "crash", "message": "never read"}) for p in map(os.fspath, paths)]


def _follow(process: subprocess.Popen, results: dict[str, dict], deadline: float) -> tuple[str | None, float, bool]:
    """Read result lines until the process ends or a file overruns ``deadline``.

    Returns (file started but unanswered or None, seconds spent on it, whether the process ended).
    """
    current, started, buffer = None, time.monotonic(), b""
    stdout = process.stdout
    while True:
        wait = deadline - (time.monotonic() - started) if current is not None else None
        if wait is not None and wait <= 0:
            return current, time.monotonic() - started, False
        ready, _, _ = select.select([stdout], [], [], wait)
        if not ready:
            continue
        chunk = os.read(stdout.fileno(), 1 << 16)
        if not chunk:
            return current, time.monotonic() - started, True
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in filter(None, lines):
            record = json.loads(line)
            if "start" in record:
                current, started = record["start"], time.monotonic()
            else:
                results[record["file"]] = record
                current = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Read files one after another in one process; "
                                     "one JSON line per file.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="files or directories (read recursively)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per file (SIGALRM)")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="address-space cap of the process; 0 = none")
    parser.add_argument("--probe", default=DEFAULT_PROBE, help="module:function that reads one file")
    args = parser.parse_args(argv)

    from utils.io.isolation import cap_address_space

    cap_address_space(int(args.memory_gb * 2**30))
    warnings.simplefilter("ignore")  # malformed files make pydicom warn on almost every file
    exercise = load_probe(args.probe)
    kept = 0
    paths = collect(args.inputs)
    for path in paths:
        print(json.dumps({"start": str(path)}), flush=True)
        result = read_one(path, args.timeout, exercise)
        kept += result["outcome"] in ("decoded", "typed_error")
        print(json.dumps(result), flush=True)
    return 0 if kept == len(paths) else 1


if __name__ == "__main__":
    sys.exit(main())
