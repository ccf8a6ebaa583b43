"""backfill.py killed with SIGKILL mid-run, then run again: every file exactly once in the output.

A real kill of the command-line driver (no exception handler, no atexit, a part possibly half
written), unlike test_backfill.py's interrupted run inside the test process. Its own module: the
driver starts its own Ray, which must not meet the Ray that test_backfill.py starts in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from utils.backfill.store import OutputStore
from utils.io.dicom_writer import write_dicom

from .routing.conftest import CLASSES, THRESHOLD, bright_rows_image, brightness_model

ROOT = Path(__file__).resolve().parents[1]
FILES = 400


def backfill(archive: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, "backfill.py", str(archive), "--model", str(model), "--output", str(out),
            "--threshold", str(THRESHOLD), "--workers", "1", "--num-cpus", "2", "--batch-size", "8",
            "--rows-per-file", "16", "--quiet"]


@pytest.mark.slow
def test_a_driver_killed_with_sigkill_resumes_and_completes(tmp_path):
    archive = tmp_path / "archive"
    files = sorted(str(write_dicom(archive / f"{i:04d}.dcm", bright_rows_image(1 + i % 62), bits_stored=12))
                   for i in range(FILES))
    model = brightness_model(tmp_path / "brightness.keras")
    out = tmp_path / "out"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "RAY_ADDRESS": ""}

    driver = subprocess.Popen(backfill(archive, model, out), cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("part-*.parquet")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]  # still running: killed mid-run
        assert list(out.glob("part-*.parquet")), "no part written in time"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        with_group_gone(driver.pid)  # Ray's processes of that run, should any outlive their driver
    done = OutputStore(out, CLASSES).done_paths()
    assert 0 < len(done) < FILES, len(done)

    again = subprocess.run(backfill(archive, model, out), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{FILES} files listed, {len(done)} already in the output; {FILES - len(done)} classified" in again.stdout
    frame = OutputStore(out, CLASSES).read()
    assert len(frame) == FILES and sorted(frame["path"]) == files  # every file exactly once
    assert frame["error"].fillna("").eq("").all()


def with_group_gone(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
