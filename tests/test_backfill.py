"""backfill.py on a local Ray: the same rows as predict.py, error rows, idempotent re-runs, resume.

One Ray start (2 CPUs) for the module; each run starts its actors anew, so the runs are few.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

import backfill
from utils.backfill import pipeline
from utils.backfill.sources import list_sources
from utils.backfill.store import OutputStore
from utils.infer import batch_predict
from utils.infer.predictor import load_predictor

from .routing.conftest import CLASSES, THRESHOLD, brightness_model, make_samples
from .utils.backfill.crashing import crash_on_name

COMPARED = ["SOPInstanceUID", "StudyInstanceUID", "label", "top_label", "confidence",
            *[f"prob_{c}" for c in CLASSES], "BodyPartExamined", "tag_disagrees", "error"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return brightness_model(tmp_path_factory.mktemp("model") / "brightness.keras")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(sources, files, predict.py's rows by file): demo-like DICOMs of every class, an uncertain one,
    an SR, truncated pixels, a non-DICOM .dcm, a listed missing file, a file that kills its decoder,
    and a folder given as a file:// URL."""
    root = tmp_path_factory.mktemp("archive")
    samples = make_samples(root / "local", per_class=1)
    (root / "local" / "fake.dcm").write_bytes(b"not a DICOM file at all")
    shutil.copy(samples[0], root / "local" / "crash_me.dcm")
    make_samples(root / "remote", per_class=1, compressed=False, extra_bad=False, uncertain=0)
    (root / "list.txt").write_text(f"{root / 'gone.dcm'}\n")
    sources = [str(root / "local"), str(root / "list.txt"), f"file://{root / 'remote'}"]
    files, _ = list_sources(sources)
    assert len(files) == 8 + 2 + 1 + 5  # 8 DICOMs (5 classes, uncertain, SR, short), fake + crash, gone, 5 remote
    return sources, files


@pytest.fixture(scope="module")
def expected(archive, model, tmp_path_factory):
    """predict.py's CSV rows for the same files (URLs read at their local path), by file."""
    _, files = archive
    local = [f.removeprefix("file://") for f in files]
    out = tmp_path_factory.mktemp("predict") / "predictions.csv"
    batch_predict.run(load_predictor(model), local, output=out, threshold=THRESHOLD, batch_size=4, progress=False)
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    return {f: row for f, (_, row) in zip(files, frame.set_index("path").loc[local].iterrows())}


def as_csv_text(frame: pd.DataFrame) -> pd.DataFrame:
    """The Parquet rows formatted as predict.py writes its CSV."""
    out = frame.copy()
    for column in ["confidence", *[f"prob_{c}" for c in CLASSES]]:
        out[column] = [f"{v:.6f}" if pd.notna(v) else "" for v in frame[column]]
    out["tag_disagrees"] = [("true" if v else "false") if pd.notna(v) else "" for v in frame["tag_disagrees"]]
    return out.fillna("")


def check_rows(frame: pd.DataFrame, files, expected) -> None:
    assert sorted(frame["path"]) == sorted(files)  # every file exactly once
    rows = as_csv_text(frame).set_index("path")
    for path in files:
        got = rows.loc[path]
        if Path(path).name == "crash_me.dcm":  # killed its decoder: an error row, the run went on
            assert got["label"] == "unreadable" and got["error"].startswith("decoder_crashed:")
            assert got["SOPInstanceUID"] == expected[path]["SOPInstanceUID"]  # its header read afterwards
            continue
        want = expected[path]
        mismatched = {c: (got[c], want[c]) for c in COMPARED if got[c] != want[c]}
        assert not mismatched, (path, mismatched)


def test_rows_equal_predict_and_a_rerun_writes_nothing(local_ray, archive, model, expected, tmp_path, capsys,
                                                       caplog):
    sources, files = archive
    out = tmp_path / "out"
    settings = pipeline.Settings(workers=1, batch_size=4, rows_per_file=8)
    result = pipeline.run(files, model=model, output=out, threshold=THRESHOLD, settings=settings, progress=False,
                          decode=crash_on_name)
    assert (result.written, result.already_done, result.parts) == (len(files), 0, -(-len(files) // 8))
    store = OutputStore(out, CLASSES)
    check_rows(store.read(), files, expected)
    assert {"unreadable", "uncertain", *CLASSES} == set(store.read()["label"])
    parts = {p: p.stat().st_mtime_ns for p in store.parts()}
    # the CLI over the same sources: nothing new to do, nothing written; the report covers the output
    with caplog.at_level(logging.INFO, logger="backfill"):
        assert backfill.main([*sources, "--model", str(model), "--output", str(out), "--threshold", str(THRESHOLD),
                              "--quiet"]) == 0
    assert "out-of-distribution score" in caplog.text  # start-up says whether the OOD score is on
    assert {p: p.stat().st_mtime_ns for p in store.parts()} == parts
    printed = capsys.readouterr().out
    assert f"{len(files)} already in the output; 0 classified" in printed
    report = pd.read_json(out / "report.json", typ="series")
    assert report["files"] == len(files) and report["labels"]["unreadable"] == 5  # SR, short, fake, gone, crash
    assert (out / "report.md").is_file() and (out / "tag_corrections.csv").is_file()


def test_a_run_killed_midway_resumes_and_completes(local_ray, archive, model, expected, tmp_path):
    _, files = archive
    out = tmp_path / "out"
    settings = pipeline.Settings(workers=2, batch_size=2, rows_per_file=4)

    def die_after_two(n: int) -> None:
        if n == 2:
            raise KeyboardInterrupt("killed")  # the driver stops mid-run, as at Ctrl-C or a lost node

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(files, model=model, output=out, threshold=THRESHOLD, settings=settings, progress=False,
                     decode=crash_on_name, on_part=die_after_two)
    done = len(OutputStore(out, CLASSES).done_paths())  # two parts (how full each is, Ray's blocks decide)
    assert 0 < done <= 8 < len(files)
    (out / ".part-killed-000003.parquet.tmp").write_bytes(b"PAR1 half written")  # a kill during a write
    result = pipeline.run(files, model=model, output=out, threshold=THRESHOLD, settings=settings, progress=False,
                          decode=crash_on_name)
    assert (result.already_done, result.written) == (done, len(files) - done)
    check_rows(OutputStore(out, CLASSES).read(), files, expected)


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit):
        backfill.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--output", "--workers", "--inference-workers", "--inference-gpus", "--address",
                 "--decode-timeout-s", "--correction-threshold", "--rows-per-file", "(default:"):
        assert flag in text
