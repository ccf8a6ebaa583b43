"""The benchmark scripts still run (tiny sizes; they measure, tests never assert times)."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pytest

from bench import gpu, inference


def test_gpu_bench_runs_and_writes_rows(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    try:
        gpu.main(["--size", "32", "--batch-size", "2", "--steps", "1", "--warmup", "1",
                  "--latency-calls", "2", "--policies", "float32", "--json", str(out)])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    saved = json.loads(out.read_text())
    [row] = saved["rows"]
    assert "error" not in row, row
    assert row["model"] == "mobilenet_v1" and row["batch"] == 2 and row["loss_finite"]
    assert row["train_images_per_s"] > 0 and row["latency_ms_median"] > 0
    assert "| mobilenet_v1 | float32 |" in capsys.readouterr().out


def test_gpu_bench_reports_a_failing_policy_as_a_row():
    rows = [{"model": "m", "policy": "float32", "batch": 4, "error": "ValueError: boom"}]
    assert "error: ValueError: boom" in gpu.markdown_table(rows)


def test_int8_roofline_is_measured():
    gops = inference.int8_conv_gops(size=8, channels=32, runs=2)
    assert math.isfinite(gops) and gops > 0


def test_recipes_paired_difference_is_zero_for_equal_predictions_and_positive_for_a_better_recipe():
    import pandas as pd

    from bench.recipes import paired_f1_difference

    rng = np.random.default_rng(0)
    truth = rng.choice(["a", "b", "c"], size=300)
    base = pd.DataFrame({"file": [f"f{i}" for i in range(300)], "group": [f"p{i // 2}" for i in range(300)],
                         "true_label": truth, "predicted_label": truth})
    wrong = rng.random(300) < 0.2
    base.loc[wrong, "predicted_label"] = np.where(truth[wrong] == "a", "b", "a")
    assert paired_f1_difference(base, base) == (0.0, 0.0, 0.0)
    better = base.assign(predicted_label=truth)  # every error fixed
    point, low, high = paired_f1_difference(better, base)
    assert 0 < low < point < high
    assert paired_f1_difference(better.iloc[:-1], base) is None  # not the same images: no paired comparison
    # bench.tta's summary of a view set: the same paired difference, the routed share and its accuracy
    from bench.tta import markdown, summarise

    flags = dict(ood_flagged=False, routed=rng.random(300) < 0.5, correct=base["predicted_label"] == truth)
    plain = base.assign(**flags, true_label=truth)
    fixed = plain.assign(predicted_label=truth, correct=True)
    summary = summarise(fixed, plain, resamples=200, seed=0, confidence=0.95)
    assert summary["paired_difference"]["value"] == pytest.approx(point) and summary["accuracy"] == 1.0
    assert summary["routed_accuracy"] == 1.0 and summary["routed_share"] == pytest.approx(flags["routed"].mean())
    assert summarise(plain, None, resamples=200, seed=0, confidence=0.95)["paired_difference"] is None
    table = markdown([{"run": "cv", "views": "identity+flip", "calls": 2, "seconds": 3.0, **summary}])
    assert "| cv | identity+flip | 2 | 1.000 (1.000-1.000) | +0." in table


def test_j2k_bench_switches_the_decoder_and_times_the_levels(tmp_path):
    import os

    from pydicom.uid import JPEG2000Lossless

    from bench import j2k
    from utils.io.dicom import openjp2
    from utils.io.dicom_writer import write_dicom

    path = write_dicom(tmp_path / "x.dcm", np.arange(96 * 80, dtype=np.uint16).reshape(96, 80) % 4096,
                       bits_stored=12, transfer_syntax=JPEG2000Lossless)
    before = openjp2.available()
    with j2k.library("none"):
        assert not openjp2.available() and os.environ["OPENJP2_LIBRARY"] == "none"
    assert openjp2.available() == before
    if before:
        table = j2k.levels(str(path), runs=1)
        assert "| 1 | 1/4 |" in table and "| 1, thinned | 1/4, level 2: HL only |" in table
        assert table.count("\n") in (7, 8)  # header, 4 levels, thinned without (and with) planes, rewrite
        # HTJ2K code-blocks are not thinned: no such rows
        import pydicom
        from pydicom.encaps import get_frame

        codestream = bytearray(get_frame(pydicom.dcmread(path).PixelData, 0, number_of_frames=1))
        codestream[codestream.index(b"\xff\x52") + 12] |= 0x40
        assert j2k.thinned_rows(str(path), bytes(codestream), 1) == []


def test_ood_bench_candidates_score_and_the_table_prints():
    from bench import ood as ood_bench

    rng = np.random.default_rng(0)
    blocks = [8, 16, 32]
    train = (rng.normal(size=(60, 3)), np.abs(rng.normal(1, 0.2, (60, sum(blocks)))))
    negatives = np.abs(rng.normal(3, 1, (20, sum(blocks))))
    found = ood_bench.candidates(blocks, train, np.repeat([0, 1, 2], 20), negatives, ["ct", "mr"] * 10)
    assert {"energy", "Mahalanobis, first stage", "union: the model's score (without ct)"} <= set(found)
    logits, features = rng.normal(size=(5, 3)), np.abs(rng.normal(1, 0.2, (5, sum(blocks))))
    for name, score in found.items():
        values = score[1].scores(features) if isinstance(score, tuple) else score(logits, features)
        assert values.shape == (5,) and np.all(np.isfinite(values)), name
    table = ood_bench.markdown([{"score": "energy", "AUROC": 0.5, "radiographs flagged": 0.01,
                                 "non-radiographs flagged": 0.2, "real files flagged": None}])
    assert "| energy | 0.500 | 1.0 % | 20.0 % |  |  |" in table


def test_inference_e2e_table_shows_the_ratio_to_decoding_alone():
    rows = [("TFLite int8", "uncompressed", "processes (2)", 10.0, 58.2, 16.1, 16.1 / 58.2),
            ("TFLite int8", "uncompressed", "processes (2)", 10.0, 58.2, 16.1, 16.1 / 58.2, 52.4, 52.4 / 58.2)]
    table = inference.e2e_table(rows, 64)
    assert "x decoding alone" in table[0] and table[-2].endswith("| 58.2 | 16.1 | 0.28 | | |")
    assert table[-1].endswith("| 58.2 | 16.1 | 0.28 | 52.4 | 0.90 |")  # the workers already running


def test_adaptation_plan_keeps_one_evaluation_set_nests_the_draws_and_marks_n_above_the_pool():
    from bench.adaptation import draw_plan, split_pool

    pool, evaluation = split_pool(132, 82, seed=42)
    assert len(pool) == 50 and len(evaluation) == 82 and not set(pool) & set(evaluation)
    assert np.array_equal(split_pool(132, 82, seed=42)[0], pool)  # seeded
    plan, skipped = draw_plan(pool, evaluation, [0, 10, 50, 100, 132], draws=2, seed=42)
    by = {(d.n, d.draw): d for d in plan}
    assert [d.name for d in plan] == ["base", "n010-d0", "n050-d0", "n100-d0", "n010-d1", "n050-d1", "n100-d1"]
    assert 132 in skipped  # nothing left to evaluate on
    for d in plan:
        assert len(d.train) == d.n and not set(d.train) & set(d.evaluate)
        assert d.shared_eval == (d.n <= 50) and (d.evaluate == tuple(evaluation)) == d.shared_eval
    assert set(by[10, 0].train) < set(by[50, 0].train) < set(by[100, 0].train)  # nested within a draw
    assert by[10, 0].train != by[10, 1].train and by[10, 1].seed == by[10, 0].seed + 1
    assert len(by[100, 0].evaluate) == 32 and set(by[100, 0].evaluate) < set(evaluation)


def test_adaptation_routed_accuracy_and_the_mean_over_draws():
    from bench.adaptation import aggregate, source_samples

    correct = np.array([1, 1, 0, 1], bool)
    routed = np.array([1, 0, 1, 0], bool)
    weights = np.array([[1, 1, 1, 1], [2, 2, 0, 0], [0, 1, 0, 3]])  # the last resample routes nothing
    m = source_samples(correct, routed, np.zeros(4, bool), weights)
    assert m["accuracy"][0] == 0.75 and np.allclose(m["accuracy"][1], [0.75, 1.0, 1.0])
    assert m["routed_share"][0] == 0.5 and m["routed_accuracy"][0] == 0.5 and m["routed_wrong"][0] == 0.25
    assert np.allclose(m["routed_accuracy"][1][:2], [0.5, 1.0]) and np.isnan(m["routed_accuracy"][1][2])
    both = aggregate([0.5, 1.0], [np.array([0.4, 0.6, np.nan]), np.array([1.0, 1.0, np.nan])], 0.95)
    assert both["value"] == 0.75 and (both["min"], both["max"], both["draws"]) == (0.5, 1.0, 2)
    assert 0.7 <= both["ci_low"] <= both["ci_high"] <= 0.8  # NaN resamples left out
    assert aggregate([None], [np.full(3, np.nan)], 0.95)["value"] is None


def test_dicomweb_bench_stow_intake_spools_every_file(tmp_path):
    """bench.dicomweb's STOW-RS intake run: a sender process posts the files (2 per request) and every one is in
    the spool queue afterwards (the function checks the count itself)."""
    from bench.dicomweb import stow_intake
    from bench.router import make_files

    files = make_files(tmp_path / "files", 3, 64, "explicit", seed=0)
    rate, cpu_ms = stow_intake(files, tmp_path, per_request=2)
    assert rate > 0 and cpu_ms >= 0
