"""Decoding pools: threads and processes give the same results in order; a dying process
costs only its item; processes that die on everything stop the work with a clear error."""

from __future__ import annotations

import os

import numpy as np
import pydicom.uid
import pytest

from utils import evaluation
from utils.dicom_writer import write_dicom
from utils.evaluation import DecodingProcessesDied, map_in_batches, use_processes


def square(x: int) -> int:
    return x * x


def die_on_three(x: int) -> int:
    if x == 3:
        os._exit(1)  # what a segfaulting codec looks like to the pool
    return x * x


def always_die(x: int) -> int:
    os._exit(1)


@pytest.mark.parametrize("processes", [False, True])
def test_results_in_input_order_batch_by_batch(processes):
    batches = list(map_in_batches(list(range(10)), square, batch_size=4, workers=2, processes=processes))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sum(batches, []) == [x * x for x in range(10)]


def test_a_dying_process_costs_only_its_item():
    batches = list(map_in_batches(list(range(10)), die_on_three, batch_size=4, workers=2, processes=True,
                                  on_crash=lambda x: f"crashed {x}"))
    assert sum(batches, []) == [0, 1, 4, "crashed 3", 16, 25, 36, 49, 64, 81]


def test_a_dying_process_without_on_crash_raises():
    from concurrent.futures.process import BrokenProcessPool

    with pytest.raises(BrokenProcessPool):
        list(map_in_batches(list(range(4)), die_on_three, batch_size=4, workers=2, processes=True))


def test_processes_dying_on_everything_stop_the_work():
    with pytest.raises(DecodingProcessesDied, match="decode-pool threads"):
        list(map_in_batches(list(range(8)), always_die, batch_size=8, workers=2, processes=True,
                            on_crash=lambda x: None))


def _dicoms(folder, syntax, count):
    image = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    paths = []
    for i in range(count):
        path = folder / f"{i}.dcm"
        write_dicom(path, image, bits_stored=12, transfer_syntax=syntax, photometric="MONOCHROME2")
        paths.append(str(path))
    return paths


def test_auto_picks_processes_for_jpeg2000_only(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    (tmp_path / "j2k").mkdir()
    (tmp_path / "plain").mkdir()
    j2k = _dicoms(tmp_path / "j2k", pydicom.uid.JPEG2000Lossless, 2) * 8
    plain = _dicoms(tmp_path / "plain", pydicom.uid.ExplicitVRLittleEndian, 2) * 8
    assert use_processes("auto", j2k) and not use_processes("auto", plain)
    assert not use_processes("auto", j2k[: evaluation.PROCESS_POOL_MIN_ITEMS - 1])  # too few to pay
    assert use_processes("processes", plain[:1]) and not use_processes("threads", j2k)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert not use_processes("auto", j2k)
    with pytest.raises(ValueError):
        use_processes("fork", j2k)


def test_decoded_files_are_identical_in_threads_and_processes(tmp_path):
    from utils.batch_predict import iter_decoded
    from utils.preprocessing import PreprocessSpec

    files = _dicoms(tmp_path, pydicom.uid.JPEG2000Lossless, 3) + [str(tmp_path / "missing.dcm")]
    spec = PreprocessSpec(image_size=32)
    threads = sum(iter_decoded(files, spec, batch_size=2, pool="threads"), [])
    processes = sum(iter_decoded(files, spec, batch_size=2, pool="processes"), [])
    assert [d.path for d in processes] == files
    for a, b in zip(threads, processes):
        assert a.reason == b.reason and a.header == b.header
        assert (a.image is None and b.image is None) or np.array_equal(a.image, b.image)
    assert processes[-1].reason == "file_not_found"
