"""The isolated pool: order kept; a hang, a dying worker or a huge allocation costs only its
item; threads mode; processes that die on everything stop the work with a clear error."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from utils.io.isolation import Failure, IsolatedPool, PoolSettings, WorkersDied, default_workers


def square(x: int) -> int:
    return x * x


def hang_on_three(x: int) -> int:
    if x == 3:
        time.sleep(60)  # what a decoder stuck in a loop looks like to the pool
    return x * x


def die_on_three(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGSEGV)  # what a crashing codec looks like
    return x * x


def exit_on_three(x: int) -> int:
    if x == 3:
        os._exit(1)
    return x * x


def always_die(x: int) -> int:
    os._exit(1)


def raise_on_three(x: int) -> int:
    if x == 3:
        raise KeyError("three")
    return x * x


class Panic(BaseException):
    """Like pyo3's PanicException: not an Exception."""


def panic_on_three(x: int) -> int:
    if x == 3:
        raise Panic("index out of bounds")
    return x * x


def allocate_mb(megabytes: int) -> int:
    import numpy as np

    return int(np.ones(megabytes << 20, np.uint8).sum() >> 20)


def broken_start() -> None:
    raise ImportError("no module named cv9")


def settings(**changes) -> PoolSettings:
    return PoolSettings(**{"mode": "processes", "workers": 2, "timeout_s": 30.0, "memory_limit_mb": 0, **changes})


@pytest.fixture(scope="module")
def pool():
    """Two worker processes shared by the tests that leave them healthy (start-up costs ~1 s)."""
    with IsolatedPool(settings()) as shared:
        yield shared


def test_results_in_input_order_batch_by_batch(pool):
    batches = list(pool.map_batches(square, list(range(10)), batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum(batches, []) == [x * x for x in range(10)]
    pids = {p.process.pid for p in pool._procs}
    assert pool.map(square, [5]) == [25] and {p.process.pid for p in pool._procs} <= pids  # workers reused


def test_a_hang_costs_only_its_item_and_the_pool_goes_on():
    with IsolatedPool(settings(timeout_s=1.0)) as pool:
        results = pool.map(hang_on_three, list(range(6)))
        assert results[:3] == [0, 1, 4] and results[4:] == [16, 25]
        assert isinstance(results[3], Failure) and results[3].kind == "timeout"
        assert pool.map(square, [7, 8]) == [49, 64]


@pytest.mark.parametrize("function, signal_name", [(die_on_three, "SIGSEGV"), (exit_on_three, "exit code 1")])
def test_a_dying_worker_costs_only_its_item(pool, function, signal_name):
    results = pool.map(function, list(range(8)))
    assert [r for i, r in enumerate(results) if i != 3] == [x * x for x in range(8) if x != 3]
    assert results[3].kind == "crashed" and signal_name in results[3].message
    assert pool.map(square, [2]) == [4]  # replaced


@pytest.mark.parametrize("function", [raise_on_three, panic_on_three])
def test_exceptions_become_failures_in_both_modes(pool, function):
    with IsolatedPool(settings(mode="threads")) as threads:
        for results in (pool.map(function, range(5)), threads.map(function, range(5))):
            assert results[:3] == [0, 1, 4] and results[4] == 16
            assert results[3].kind == "error" and ("KeyError: 'three'" in results[3].message
                                                   or "Panic: index out of bounds" in results[3].message)


def test_the_memory_cap_fails_a_huge_allocation_alone():
    with IsolatedPool(settings(memory_limit_mb=1024, workers=1)) as pool:
        small, huge, again = pool.map(allocate_mb, [8, 4096, 8])
    assert small == again == 8
    assert huge.kind == "error" and "MemoryError" in huge.message


def test_threads_mode_keeps_order_and_has_no_isolation():
    with IsolatedPool(settings(mode="threads", workers=3)) as pool:
        assert not pool.isolated and pool.workers == 3
        assert pool.map(square, range(20)) == [x * x for x in range(20)]


def test_processes_dying_on_everything_stop_the_work():
    with IsolatedPool(settings()) as pool:
        with pytest.raises(WorkersDied, match="died on the first 3 items.*decode-pool threads"):
            pool.map(always_die, list(range(8)))
        assert pool.map(square, [3]) == [9]  # a later batch starts fresh workers


def test_workers_that_cannot_start_stop_the_work():
    with IsolatedPool(settings(), initializer=broken_start) as pool:
        with pytest.raises(WorkersDied, match=r"3 worker processes in a row failed to start \(ImportError: no module"):
            pool.map(square, [1, 2])


def test_one_crash_before_any_success_is_still_one_row():
    with IsolatedPool(settings(workers=1)) as pool:
        assert pool.map(die_on_three, [3])[0].kind == "crashed"


def test_settings_are_checked_and_read_from_flags():
    assert PoolSettings().mode == "processes"
    assert PoolSettings.from_flags({"decode_pool": "threads", "decode_workers": 3, "decode_timeout_s": 5,
                                    "decode_memory_limit_mb": 0}) == PoolSettings("threads", 3, 5, 0)
    for bad in ({"mode": "auto"}, {"workers": -1}, {"timeout_s": 0}, {"memory_limit_mb": -5}):
        with pytest.raises(ValueError):
            PoolSettings(**bad)
    assert default_workers("threads") >= default_workers("processes") >= 1


def test_a_closed_pool_refuses_work():
    pool = IsolatedPool(settings(mode="threads"))
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError):
        pool.map(square, [1])


def hang_and_report(path: str) -> None:
    with open(path, "w") as handle:
        handle.write(str(os.getpid()))
    time.sleep(120)


def test_a_worker_stuck_in_an_item_dies_with_a_killed_main_process(tmp_path):
    """kill -9 of the main process (nothing in it runs) must not leave a worker spinning forever."""
    import subprocess
    import sys

    pid_file = tmp_path / "worker.pid"
    script = ("from utils.io.isolation import IsolatedPool, PoolSettings\n"
              "from tests.utils.io.test_isolation import hang_and_report\n"
              "if __name__ == '__main__':\n"
              f"    IsolatedPool(PoolSettings(workers=1, timeout_s=300)).map(hang_and_report, [{str(pid_file)!r}])\n")
    main = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[3])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = int(pid_file.read_text())
    finally:
        main.kill()
        main.wait()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("settings, message", [
    ({"timeout_s": 0}, "decode_timeout_s must be > 0, got 0"),
    ({"workers": -1}, "decode_workers must be >= 0, got -1"),
    ({"mode": "fork"}, "decode_pool must be one of ('processes', 'threads')"),
    ({"memory_limit_mb": 1.5}, "decode_memory_limit_mb must be an integer"),
])
def test_pool_settings_are_checked_against_the_ranges_in_constants(settings, message):
    with pytest.raises(ValueError) as error:
        PoolSettings(**settings)
    assert message in str(error.value)
