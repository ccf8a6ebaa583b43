"""Read every file in its own memory-capped, time-limited child process and classify the outcome.

    python -m fuzz.isolated DIR_OR_FILE... [--timeout 20] [--memory-gb 4] [--workers N]
                                          [--report out.json]

Each file goes through ``fuzz.probe.exercise`` (read_dicom with and without a target shape,
then read_dicom_header) in a child with ``RLIMIT_AS`` set to ``--memory-gb`` and killed after
``--timeout`` seconds. Outcomes:

    decoded          read_dicom returned an image that keeps the contract
    typed_error      DicomReadError with a reason (counted by reason)
    other_exception  any other exception, BaseExceptions (codec panics) and OSError included
    hang             still running at the timeout
    out_of_memory    MemoryError, or an allocation failure that aborted the process
    crash            killed by a signal (segfault, abort...) or exited without an answer

The first three are decided inside the child; the last three are what the parent sees. Only
``decoded`` and ``typed_error`` keep the reader's promise.

Speed: ``--workers`` long-lived worker processes import the reader once; for every file a
worker forks a child (a copy-on-write copy, a few milliseconds) that applies the limits, reads
the file, sends back one JSON line and exits. A hang or crash kills only that child, so nothing
needs restarting and a few hundred files take seconds.

``--report out.json`` writes the per-file results and the counts as JSON, and the same as
Markdown in ``out.md``. The exit status is 1 when any file broke the promise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

OUTCOMES = ("decoded", "typed_error", "other_exception", "hang", "out_of_memory", "crash")
KEPT_PROMISE = frozenset({"decoded", "typed_error"})
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_MEMORY_GB = 4.0
DEFAULT_PROBE = "fuzz.probe:exercise"
_STDERR_TAIL = 400  # characters of a crashed child's stderr kept in the report
_OOM_MARKERS = ("memory allocation of", "MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory")


# --- Public API -----------------------------------------------------------------------------


def collect(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given directly, and every file under given directories (sorted; manifest.csv skipped)."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.name != "manifest.csv")
        else:
            paths.append(item)
    return paths


def check_files(
    paths: Sequence[str | os.PathLike],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_gb: float = DEFAULT_MEMORY_GB,
    workers: int | None = None,
    progress: bool = False,
    probe: str = DEFAULT_PROBE,
) -> list[dict]:
    """One result dict per path, in the order given (see the module docstring for outcomes).

    ``probe`` ("module:function") is what each child runs, ``function(open_source, state)``
    as ``fuzz.probe.exercise``; tests replace it to check the classification itself.
    """
    import multiprocessing

    paths = [os.fspath(p) for p in paths]
    if not paths:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(paths)))
    jobs = [(path, float(timeout), float(memory_gb), probe) for path in paths]
    results: dict[str, dict] = {}
    started = time.monotonic()
    # spawn: workers start clean (no inherited threads or state from the caller, e.g. pytest).
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(probe,)) as pool:
        for done, result in enumerate(pool.imap_unordered(_check_in_child, jobs), 1):
            results[result["file"]] = result
            if progress and (done % 25 == 0 or done == len(jobs) or result["outcome"] not in KEPT_PROMISE):
                mark = "" if result["outcome"] in KEPT_PROMISE else f"  {result['outcome']}: {result['file']}"
                print(f"[{done}/{len(jobs)} {time.monotonic() - started:.0f}s]{mark}", file=sys.stderr, flush=True)
    return [results[path] for path in paths]


def summarize(results: Sequence[dict]) -> dict:
    """Counts by outcome, by reason, by escaping exception type, and by kind x outcome."""
    by_kind: dict[str, Counter] = {}
    for result in results:
        by_kind.setdefault(_kind(result["file"]), Counter())[result["outcome"]] += 1
    escapes = [r for r in results if r["outcome"] not in KEPT_PROMISE]
    return {
        "files": len(results),
        "outcomes": {outcome: sum(r["outcome"] == outcome for r in results) for outcome in OUTCOMES},
        "reasons": dict(Counter(r["reason"] for r in results if r["outcome"] == "typed_error").most_common()),
        "exception_types": dict(Counter(r.get("exception_type", "") for r in results
                                        if r["outcome"] == "other_exception").most_common()),
        "by_kind": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
        "escapes": len(escapes),
    }


def format_table(results: Sequence[dict]) -> str:
    """Kind x outcome counts, then one line per file that broke the promise."""
    summary = summarize(results)
    width = max([len("kind")] + [len(kind) for kind in summary["by_kind"]])
    header = f"{'kind':<{width}} " + " ".join(f"{o:>{len(o)}}" for o in OUTCOMES)
    lines = [header, "-" * len(header)]
    for kind, counts in summary["by_kind"].items():
        lines.append(f"{kind:<{width}} " + " ".join(f"{counts.get(o, 0):>{len(o)}}" for o in OUTCOMES))
    lines.append(f"{'total':<{width}} " + " ".join(f"{summary['outcomes'][o]:>{len(o)}}" for o in OUTCOMES))
    if summary["reasons"]:
        lines.append("")
        lines.append("typed errors by reason: " + ", ".join(f"{r} {n}" for r, n in summary["reasons"].items()))
    escapes = [r for r in results if r["outcome"] not in KEPT_PROMISE]
    if escapes:
        lines.append("")
        lines.append(f"{len(escapes)} file(s) broke the promise:")
        for result in escapes:
            lines.append(f"  {_describe_escape(result)}")
    return "\n".join(lines)


def write_reports(results: Sequence[dict], json_path: str | os.PathLike) -> tuple[Path, Path]:
    """``json_path`` (summary + per-file results) and the same as Markdown beside it (.md)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    json_path.write_text(json.dumps({"summary": summary, "results": list(results)}, indent=1) + "\n")
    md_path = json_path.with_suffix(".md")
    md_path.write_text(_markdown(results, summary))
    return json_path, md_path


def load_probe(probe: str):
    """``"module:function"`` -> the function."""
    import importlib

    module, _, function = probe.partition(":")
    return getattr(importlib.import_module(module), function)


# --- Worker and child -----------------------------------------------------------------------


def _init_worker(probe: str) -> None:
    # One thread per child process: children are many and short, and forking is safer.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    os.environ["RUST_BACKTRACE"] = "0"  # a panic's message is enough; its backtrace is noise
    import warnings

    warnings.simplefilter("ignore")  # malformed files make pydicom warn a lot
    import fuzz.probe  # noqa: F401 - import the reader once; every child inherits it

    load_probe(probe)


def _check_in_child(job: tuple[str, float, float, str]) -> dict:
    """Fork a child that reads ``path`` under the limits; wait for its answer or kill it."""
    import select
    import signal
    import tempfile

    path, timeout, memory_gb, probe = job
    started = time.monotonic()
    with tempfile.TemporaryFile() as stderr_file:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_end)
            os.dup2(stderr_file.fileno(), 2)
            _child(path, memory_gb, probe, write_end)
        os.close(write_end)
        chunks, deadline, timed_out = [], started + timeout, False
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    os.kill(pid, signal.SIGKILL)
                    break
                ready, _, _ = select.select([read_end], [], [], remaining)
                if ready:
                    chunk = os.read(read_end, 1 << 16)
                    if not chunk:
                        break
                    chunks.append(chunk)
        finally:
            os.close(read_end)
        _, status = os.waitpid(pid, 0)
        seconds = round(time.monotonic() - started, 3)
        stderr_file.seek(0)
        stderr = stderr_file.read().decode("utf-8", "replace")[-_STDERR_TAIL:]
    result = {"file": path, "seconds": seconds}
    if timed_out:
        return {**result, "outcome": "hang", "message": f"still running after {timeout:g} s"}
    answer = b"".join(chunks)
    if answer:
        return {**result, **json.loads(answer)}
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        message = f"killed by {name}"
    else:
        message = f"exited with status {os.WEXITSTATUS(status)} without an answer"
    outcome = "out_of_memory" if any(marker in stderr for marker in _OOM_MARKERS) else "crash"
    return {**result, "outcome": outcome, "message": message, "stderr": " ".join(stderr.split())}


def _child(path: str, memory_gb: float, probe: str, write_end: int) -> None:
    status = 0
    try:
        from utils.io.isolation import cap_address_space

        cap_address_space(int(memory_gb * 2**30))
        answer = json.dumps(_classify(path, load_probe(probe))).encode()
        view = memoryview(answer)
        while view:
            view = view[os.write(write_end, view):]
    except BaseException:  # noqa: BLE001 - the parent reports a child that could not answer
        status = 70
    finally:
        os._exit(status)


def _classify(path: str, exercise) -> dict:
    from fuzz.probe import describe

    state: dict = {}
    try:
        return exercise(lambda: path, state)
    except MemoryError as exc:
        return {"outcome": "out_of_memory", "stage": state.get("stage", ""), **describe(exc)}
    except BaseException as exc:  # noqa: BLE001 - every escape is a result here, panics included
        return {"outcome": "other_exception", "stage": state.get("stage", ""), **describe(exc)}


# --- Reports --------------------------------------------------------------------------------


def _kind(path: str) -> str:
    """``voi_lut-003.dcm`` -> ``voi_lut``; other names -> ``(other)``."""
    stem = Path(path).stem
    return stem.rsplit("-", 1)[0] if "-" in stem else "(other)"


def _describe_escape(result: dict) -> str:
    name = Path(result["file"]).name
    if result["outcome"] == "other_exception":
        return (f"{name}: {result.get('exception_type')} in {result.get('stage')}: {result.get('message')} "
                f"[{result.get('where')}]")
    detail = result.get("message", "")
    if result.get("exception_type"):
        detail = f"{result['exception_type']} in {result.get('stage')}: {detail}"
    if result.get("stderr"):
        detail += f" (stderr: ...{result['stderr'][-160:]})"
    return f"{name}: {result['outcome']}: {detail} ({result['seconds']} s)"


def _markdown(results: Sequence[dict], summary: dict) -> str:
    lines = ["# Reader outcomes", "", f"{summary['files']} files; {summary['escapes']} broke the promise.", ""]
    lines.append("| kind | " + " | ".join(OUTCOMES) + " |")
    lines.append("|---|" + "---:|" * len(OUTCOMES))
    for kind, counts in summary["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(o, 0)) for o in OUTCOMES) + " |")
    lines.append("| **total** | " + " | ".join(str(summary["outcomes"][o]) for o in OUTCOMES) + " |")
    if summary["reasons"]:
        lines += ["", "Typed errors by reason: " + ", ".join(f"`{r}` {n}" for r, n in summary["reasons"].items())]
    escapes = [r for r in results if r["outcome"] not in KEPT_PROMISE]
    if escapes:
        lines += ["", "## Escapes", "", "| file | outcome | what | where |", "|---|---|---|---|"]
        for result in escapes:
            what = result.get("message", "")
            if result.get("exception_type"):
                what = f"`{result['exception_type']}` in {result.get('stage')}: {what}"
            cell = what.replace("|", "\\|")
            lines.append(f"| {Path(result['file']).name} | {result['outcome']} | {cell} | {result.get('where', '')} |")
    return "\n".join(lines) + "\n"


# --- Command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Read each DICOM file in its own memory-capped, time-limited child process "
        "and classify the outcome.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", help="files or directories (read recursively)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per file")
    parser.add_argument("--memory-gb", type=float, default=DEFAULT_MEMORY_GB,
                        help="address-space cap of each child (RLIMIT_AS); 0 = none")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="files read at once")
    parser.add_argument("--report", type=Path, help="write results here as JSON, and as Markdown (.md)")
    args = parser.parse_args(argv)

    paths = collect(args.inputs)
    if not paths:
        parser.error("no files found")
    started = time.monotonic()
    results = check_files(paths, timeout=args.timeout, memory_gb=args.memory_gb,
                          workers=args.workers, progress=True)
    print(format_table(results))
    print(f"\n{len(results)} files in {time.monotonic() - started:.1f} s")
    if args.report:
        json_path, md_path = write_reports(results, args.report)
        print(f"reports: {json_path}, {md_path}")
    return 0 if all(r["outcome"] in KEPT_PROMISE for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
