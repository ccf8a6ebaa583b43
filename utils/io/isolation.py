"""A worker pool for work that may hang, crash or exhaust memory on hostile input.

    with IsolatedPool(PoolSettings(mode="processes", timeout_s=30)) as pool:
        for results in pool.map_batches(function, items, batch_size=32):
            ...   # each result is function(item), or a Failure("timeout" | "crashed" | "error", message)

``function`` runs on every item, results come back in input order, batch by batch. Nothing an
item does stops the others:

- ``processes`` (the default): every worker is a process started once and reused across
  batches. An item that runs longer than ``timeout_s`` has its worker killed (SIGKILL) and
  replaced and becomes ``Failure("timeout")``; an item whose worker dies (segfault, abort,
  kill, the kernel's OOM killer) becomes ``Failure("crashed")``; each worker caps its address
  space at ``memory_limit_mb``, so a huge allocation fails in that worker alone (a MemoryError
  the function can report). Workers are spawned (fresh interpreters: fork would copy the
  parent's TensorFlow threads and locks) as direct children, which Linux kills when the main
  process dies, even while they are stuck in C code. ``function`` and the items must be
  picklable (a module-level function, or a functools.partial of one); like every spawned
  process, a worker imports the main script, so scripts need an ``if __name__ == "__main__":``
  guard and should keep heavy imports inside it.
- ``threads``: for trusted data; faster where the work releases the GIL and nothing is sent
  between processes, but with no time limit, no memory cap and no crash isolation.

In both modes an exception (any BaseException but KeyboardInterrupt/SystemExit in threads
mode) becomes ``Failure("error")`` instead of leaving the pool. Processes that die on
everything are a broken setup, not bad items: three start-ups failing in a row, or three
items killing their workers before any item has finished, raise :class:`WorkersDied`.

A small pool of our own rather than Pebble's ProcessPool: Pebble marks its whole pool broken
(every pending task fails, the pool refuses new work) when a worker dies while no task is
running, e.g. an idle one the OOM killer picked, which a long-running service would have to
detect and rebuild around; a timed-out Pebble worker gets SIGTERM, handled in Python, which a
decoder stuck in C never returns to, so each timeout also costs Pebble's 3 s grace before
SIGKILL; and Pebble adds three threads per pool. Here each worker has its own pipe, so an item
belongs to exactly one process, and the loop that hands out items also watches the deadlines
and the processes' deaths (about 0.5 ms per item on top of the work itself).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from utils import constants

log = logging.getLogger(__name__)

MODES = ("processes", "threads")
STARTUP_TIMEOUT_S = 120.0  # a worker not ready after this long (imports, initializer) counts as a failed start
SYSTEMIC_FAILURES = 3  # failed start-ups in a row, or crashed items before any success: the setup is broken
_POLL_S = 0.5  # longest wait between checks of close() from another thread


def default_workers(mode: str) -> int:
    """Workers when none are asked for: threads 2 per core (at most 8; most decoding releases
    the GIL), processes one per core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return min(8, 2 * cores) if mode == "threads" else cores


@dataclass(frozen=True)
class PoolSettings:
    """How items are isolated; the defaults and the flags come from utils/constants.py (DECODE_*)."""

    mode: str = constants.DECODE_POOL  # "processes" or "threads"
    workers: int = constants.DECODE_WORKERS  # 0: default_workers(mode)
    timeout_s: float = constants.DECODE_TIMEOUT_S  # per item, processes only
    memory_limit_mb: int = constants.DECODE_MEMORY_LIMIT_MB  # address space per worker process; 0: none
    threads: int = constants.DECODE_THREADS  # codec threads per item (JPEG 2000); 0: thread_count's rule

    def __post_init__(self) -> None:
        """Named like the flags and router keys (decode_pool...) so a refusal says what to change;
        the bounds are constants.py's (DECODE_*_RANGE), checked by the one checker, utils.config."""
        from utils.config import check_value

        for key, value, integer in (("decode_pool", self.mode, False), ("decode_workers", self.workers, True),
                                    ("decode_timeout_s", self.timeout_s, False),
                                    ("decode_memory_limit_mb", self.memory_limit_mb, True),
                                    ("decode_threads", self.threads, True)):
            if integer and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{key} must be an integer, got {value!r}")
            check_value(key, value, label=key)

    @classmethod
    def from_flags(cls, values: Mapping[str, Any]) -> PoolSettings:
        """From flag or config values named like the constants: decode_pool, decode_workers,
        decode_timeout_s, decode_memory_limit_mb, decode_threads (missing ones keep their defaults)."""
        keys = {"mode": "decode_pool", "workers": "decode_workers", "timeout_s": "decode_timeout_s",
                "memory_limit_mb": "decode_memory_limit_mb", "threads": "decode_threads"}
        return cls(**{field: values[key] for field, key in keys.items() if values.get(key) is not None})

    @classmethod
    def from_args(cls, parser, args) -> PoolSettings:
        """From parsed flags; a bad value ends in ``parser.error`` (status 2, the flag named)."""
        try:
            return cls.from_flags(vars(args))
        except ValueError as error:
            key, _, rest = str(error).partition(" ")
            parser.error(f"--{key.replace('_', '-')} {rest}")

    @property
    def worker_count(self) -> int:
        return self.workers or default_workers(self.mode)

    @property
    def thread_count(self) -> int:
        """Codec threads per item: ``threads``, or by default the cores each worker process
        would leave idle (cores // processes, at least 1); 1 in threads mode, where the pool's
        own threads already fill the cores."""
        if self.threads:
            return self.threads
        if self.mode == "threads":
            return 1
        return max(1, default_workers("processes") // self.worker_count)


@dataclass(frozen=True)
class Failure:
    """An item that produced no result: ``kind`` is "timeout", "crashed" or "error"."""

    kind: str
    message: str


class WorkersDied(RuntimeError):
    """The worker processes die whatever they run: the cause is the setup, not an item."""


class PoolClosed(RuntimeError):
    """The pool was closed while a batch was running."""


class IsolatedPool:
    """See the module docstring. Workers start on first use; close() (or ``with``) stops them."""

    def __init__(self, settings: PoolSettings | None = None, *, initializer: str | Callable[[], Any] | None = None):
        """``initializer`` runs once in each worker process after its memory cap is set: a
        picklable callable, or "module:function" (imported in the worker, so the imports it
        makes fall under the cap too). Threads mode does not run it."""
        self.settings = settings or PoolSettings()
        self.workers = self.settings.worker_count
        self._initializer = initializer
        self._lock = threading.Lock()
        self._closed = False
        self._threads: ThreadPoolExecutor | None = None
        self._procs: list[_Worker] = []
        # spawn, not forkserver: the forkserver would be the workers' parent, and it outlives a killed
        # main process for as long as a worker lives; a stuck worker would then never end.
        self._context = multiprocessing.get_context("spawn")
        # Workers are started from this one thread: Linux's parent-death signal follows the thread
        # that started a process, and the threads calling map() come and go (prefetch threads).
        self._spawner: ThreadPoolExecutor | None = None
        self._failed_starts = 0  # in a row
        self._last_start_error = ""
        self._succeeded = False  # any item finished in a worker process (its result or its exception)
        self._early_crashes = 0  # items whose worker died before any item succeeded

    @property
    def isolated(self) -> bool:
        return self.settings.mode == "processes"

    def __enter__(self) -> IsolatedPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def map(self, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``function(item)`` for every item, in input order; a Failure where there is no result."""
        items = list(items)
        if self._closed:
            raise PoolClosed("the pool is closed")
        with self._lock:
            if not items:
                return []
            if not self.isolated:
                return self._map_threads(function, items)
            try:
                return self._map_processes(function, items)
            except BaseException:
                self._stop_workers()  # a later call starts fresh ones
                raise

    def map_batches(self, function: Callable[[Any], Any], items: Sequence[Any], batch_size: int) -> Iterator[list[Any]]:
        """:meth:`map` over ``items``, ``batch_size`` at a time."""
        for start in range(0, len(items), max(1, batch_size)):
            yield self.map(function, items[start : start + batch_size])

    def close(self) -> None:
        """Stop the workers (a batch running in another thread ends with PoolClosed). Idempotent."""
        self._closed = True
        with self._lock:
            if self._threads is not None:
                self._threads.shutdown(wait=True, cancel_futures=True)
                self._threads = None
            self._stop_workers()
            if self._spawner is not None:
                self._spawner.shutdown(wait=True)
                self._spawner = None

    # --- threads ------------------------------------------------------------------------------

    def _map_threads(self, function: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="isolated")
        futures = [self._threads.submit(function, item) for item in items]
        results = []
        for future in futures:
            try:
                results.append(future.result())
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # noqa: BLE001 - e.g. a Rust panic: a row, not a dead run
                results.append(Failure("error", f"{type(error).__name__}: {error}"))
        return results

    # --- processes ----------------------------------------------------------------------------

    def _map_processes(self, function: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        results: list[Any] = [_PENDING] * len(items)
        todo = deque(range(len(items)))
        while todo or any(w.index is not None for w in self._procs):
            if self._closed:
                raise PoolClosed("the pool was closed during a batch")
            busy = sum(w.index is not None for w in self._procs)
            while len(self._procs) < min(self.workers, busy + len(todo)):
                self._procs.append(self._start_worker())
            for worker in self._procs:
                if worker.state == "idle" and todo:
                    index = todo.popleft()
                    if not worker.assign(function, items[index], index):
                        todo.appendleft(index)  # it died before taking the item: the item never ran
            waitables = [w.process.sentinel for w in self._procs] + [w.conn for w in self._procs if not w.eof]
            wait(waitables, timeout=self._seconds_to_next_deadline())
            for worker in list(self._procs):
                self._service(worker, results)
            self._enforce_deadlines(results)
        return results

    def _start_worker(self) -> _Worker:
        if self._spawner is None:
            self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isolated-spawner")
        return self._spawner.submit(_Worker, self._context, self.settings.memory_limit_mb, self._initializer).result()

    def _seconds_to_next_deadline(self) -> float:
        now = time.monotonic()
        deadlines = [w.since + self._limit(w) for w in self._procs if w.state == "busy"]
        deadlines += [w.since + STARTUP_TIMEOUT_S for w in self._procs if w.state == "starting"]
        return max(0.0, min([_POLL_S, *(d - now for d in deadlines)]))

    def _limit(self, worker: _Worker) -> float:
        """The item's time limit runs from when its worker has unpickled it (and imported the
        function's module: seconds on a busy machine, which are not the item's doing)."""
        return self.settings.timeout_s if worker.running else STARTUP_TIMEOUT_S

    def _service(self, worker: _Worker, results: list[Any]) -> None:
        """Read what ``worker`` sent; handle its death."""
        try:
            while not worker.eof and worker.conn.poll():
                self._on_message(worker, worker.conn.recv(), results)
        except (EOFError, OSError):
            worker.eof = True  # its end of the pipe closed: the process is gone or going
        if worker in self._procs and (worker.eof or not worker.process.is_alive()):
            if worker.process.is_alive():
                return  # exiting; its sentinel fires shortly
            self._on_death(worker, results)

    def _on_message(self, worker: _Worker, message: tuple, results: list[Any]) -> None:
        kind, payload = message
        if kind == "ready":
            worker.state, self._failed_starts = "idle", 0
        elif kind == "running":
            worker.running, worker.since = True, time.monotonic()
        elif kind == "start_failed":
            self._last_start_error = payload
            self._remove(worker)
            self._start_failed()
        else:  # "ok" or "error": the item finished
            results[worker.index] = payload if kind == "ok" else Failure("error", payload)
            worker.state, worker.index = "idle", None
            self._succeeded = True

    def _on_death(self, worker: _Worker, results: list[Any]) -> None:
        state, index = worker.state, worker.index
        self._remove(worker)
        code = worker.process.exitcode
        if state == "busy":
            results[index] = Failure("crashed", _describe_exit(code))
            log.warning("a worker process died (%s) on item %d of its batch", _describe_exit(code), index)
            if not self._succeeded:
                self._early_crashes += 1
                if self._early_crashes >= SYSTEMIC_FAILURES:
                    count, self._early_crashes = self._early_crashes, 0  # a later call is judged afresh
                    raise WorkersDied(
                        f"worker processes died on the first {count} items and finished none: "
                        "the cause is more likely the setup than the files. Run with threads instead "
                        "(--decode-pool threads), and check the script has an `if __name__ == \"__main__\":` guard")
        elif state == "starting":
            self._last_start_error = self._last_start_error or _describe_exit(code)
            self._start_failed()

    def _start_failed(self) -> None:
        self._failed_starts += 1
        if self._failed_starts >= SYSTEMIC_FAILURES:
            count, self._failed_starts = self._failed_starts, 0
            raise WorkersDied(
                f"{count} worker processes in a row failed to start ({self._last_start_error}). "
                "Check the script has an `if __name__ == \"__main__\":` guard (the workers import the main "
                "module), that the memory limit (--decode-memory-limit-mb) leaves room for the imports, or "
                "run with --decode-pool threads")

    def _enforce_deadlines(self, results: list[Any]) -> None:
        now = time.monotonic()
        for worker in list(self._procs):
            if worker.state == "busy" and now - worker.since > self._limit(worker):
                self._service(worker, results)  # the result may have arrived just now
                if worker.state != "busy" or worker not in self._procs:
                    continue
                results[worker.index] = Failure("timeout", f"no result after {self.settings.timeout_s:g} s; "
                                                           "its worker process was killed")
                log.warning("item %d of its batch ran past %g s: worker killed", worker.index, self.settings.timeout_s)
                self._remove(worker)
            elif worker.state == "starting" and now - worker.since > STARTUP_TIMEOUT_S:
                self._last_start_error = f"not ready after {STARTUP_TIMEOUT_S:g} s"
                self._remove(worker)
                self._start_failed()

    def _remove(self, worker: _Worker) -> None:
        if worker in self._procs:
            self._procs.remove(worker)
        worker.stop()

    def _stop_workers(self) -> None:
        for worker in self._procs:
            worker.stop()
        self._procs = []


_PENDING = object()


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, context, memory_limit_mb: int, initializer) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, memory_limit_mb, initializer),
                                       name="isolated-worker", daemon=True)
        self.process.start()
        child.close()  # only the child holds the other end now: its death reads as EOF here
        self.state = "starting"  # -> "idle" <-> "busy"
        self.since = time.monotonic()  # when the current state began
        self.index: int | None = None  # the item being worked on
        self.running = False  # the worker has unpickled that item and is running the function
        self.eof = False

    def assign(self, function, item, index: int) -> bool:
        payload = pickle.dumps((function, item), protocol=pickle.HIGHEST_PROTOCOL)  # unpicklable: the caller's bug
        try:
            self.conn.send_bytes(payload)
        except OSError:
            self.eof = True
            return False
        self.state, self.index, self.since, self.running = "busy", index, time.monotonic(), False
        return True

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()  # SIGKILL: a decoder looping in C would ignore SIGTERM's handler
        self.process.join()
        self.conn.close()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the thread that started it (the pool's spawner thread in
    the main process) ends, so a worker stuck in a decoder does not outlive a killed main process."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a stuck worker ends with its item's time limit only
        pass


def cap_address_space(limit_bytes: int) -> None:
    """Cap this process's address space (RLIMIT_AS) at ``limit_bytes`` (0: leave it), never above
    a hard limit already set: an allocation past it then fails as a MemoryError in this process."""
    if limit_bytes <= 0:
        return
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _worker_main(conn, memory_limit_mb: int, initializer) -> None:
    """A worker process: cap memory, initialise, then run (function, item) messages until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    _die_with_parent()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"  # one thread per worker: the processes fill the cores
    try:
        cap_address_space(memory_limit_mb * 1024 * 1024)
        if isinstance(initializer, str):
            module, _, name = initializer.partition(":")
            getattr(importlib.import_module(module), name)()
        elif initializer is not None:
            initializer()
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which counts failed starts
        conn.send(("start_failed", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent closed the pipe or is gone
        try:
            function, item = pickle.loads(payload)
            conn.send(("running", None))
            reply = ("ok", function(item))
        except BaseException as error:  # noqa: BLE001 - the item failed; the worker goes on
            reply = ("error", f"{type(error).__name__}: {error}")
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except BaseException as error:  # noqa: BLE001 - an unpicklable or too-large result
            conn.send(("error", f"the result could not be sent back: {type(error).__name__}: {error}"))
