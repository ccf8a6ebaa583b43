"""The benchmark scripts still run (tiny sizes; they measure, tests never assert times)."""

from __future__ import annotations

import json
import math

import keras
import numpy as np

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
    rows = [("TFLite int8", "uncompressed", "processes (2)", 10.0, 58.2, 16.1, 16.1 / 58.2)]
    table = inference.e2e_table(rows, 64)
    assert "x decoding alone" in table[0] and table[-1].endswith("| 58.2 | 16.1 | 0.28 |")
