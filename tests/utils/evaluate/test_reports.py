"""utils.evaluate.reports: results.json schema, predictions.csv, results.md, figures, comparison table."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest

from utils.evaluate import metrics as M
from utils.evaluate import reports

CLASSES = ["abdominal", "adult_chest", "pediatric_chest", "spine", "others"]
TIMING = {"device": "cpu", "batch1_ms_median": 12.5, "batch1_ms_p95": 14.0,
          "throughput_images_per_s": np.float64(250.0), "batch_size": 32}


def _reject_constant(name):
    raise ValueError(f"non-JSON constant {name} in results.json")


def _load_json(path):
    return json.loads(path.read_text(), parse_constant=_reject_constant)


def _data(n=200, k=5, seed=0, absent=None):
    rng = np.random.default_rng(seed)
    classes = [c for c in range(k) if c != absent]
    t = rng.choice(classes, size=n)
    logits = rng.normal(size=(n, k)) + 2.5 * np.eye(k)[t]
    probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    groups = np.array([f"patient{i:03d}" for i in rng.integers(0, n // 3, n)])
    files = [f"images/{i:05d}.png" for i in range(n)]
    return t, probs, groups, files


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    t, probs, groups, files = _data(absent=4)  # "others" absent from the ground truth
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = reports.write_evaluation(
            out, y_true=t, probs=probs, class_names=CLASSES, files=files, groups=groups,
            n_resamples=300, model_id="mobilenet_v1", timing=TIMING, extra={"note": np.nan})
    return out, results, (t, probs, groups, files)


def test_results_json_schema(evaluation):
    out, results, (t, probs, groups, _) = evaluation
    data = _load_json(out / "results.json")  # raises on NaN / Infinity
    assert data == results
    assert data["schema_version"] == reports.RESULTS_SCHEMA_VERSION
    for key in ("model_id", "split", "class_names", "n_images", "coverage", "n_groups", "metrics",
                "macro_average", "per_class", "confusion_matrix", "roc_auc", "bootstrap",
                "timing", "extra"):
        assert key in data, key
    # no coverage given: every listed image counts as evaluated
    assert data["coverage"] == {"listed": len(t), "evaluated": len(t), "skipped": 0, "skipped_share": 0.0,
                                "skipped_by_reason": {}, "max_skipped_share": None}
    assert data["class_names"] == CLASSES and data["split"] == "test"
    assert data["n_images"] == len(t) and data["n_groups"] == len(set(groups))
    assert data["bootstrap"] == {"method": "percentile", "resamples": 300, "confidence": 0.95,
                                 "unit": "group", "unit_requested": "auto", "seed": 42}
    assert data["timing"] == {**TIMING, "throughput_images_per_s": 250.0}
    assert data["extra"] == {"note": None}

    pred = probs.argmax(axis=1)
    point = M.classification_metrics(t, pred, 5)
    assert set(data["metrics"]) == set(M.METRIC_NAMES)
    for name, m in data["metrics"].items():
        assert set(m) == {"value", "ci_low", "ci_high"}
        assert m["value"] == pytest.approx(point[name], abs=1e-12)
        assert 0.0 <= m["ci_low"] <= m["ci_high"] <= 1.0
        # Not guaranteed by the percentile method in general; holds for this well-behaved data.
        assert m["ci_low"] <= m["value"] <= m["ci_high"]

    assert [r["class"] for r in data["per_class"]] == CLASSES
    assert [r["support"] for r in data["per_class"]] == np.bincount(t, minlength=5).tolist()
    assert data["per_class"][4]["roc_auc"] is None
    assert data["roc_auc"]["per_class"]["others"] is None
    assert data["confusion_matrix"]["counts"] == M.confusion_matrix(t, pred, 5).tolist()
    assert data["roc_auc"]["macro"] == pytest.approx(
        np.mean([r["roc_auc"] for r in data["per_class"][:4]]))


def test_predictions_csv(evaluation):
    out, _, (t, probs, groups, files) = evaluation
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["file", "group", "true_label", "predicted_label", "correct"] + [
        f"prob_{c}" for c in CLASSES]
    assert len(rows) == len(t)
    assert [r["file"] for r in rows] == files and [r["group"] for r in rows] == list(groups)
    assert [r["true_label"] for r in rows] == [CLASSES[i] for i in t]
    assert [r["correct"] == "True" for r in rows] == list(t == probs.argmax(axis=1))
    got = np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(got, probs)  # round-trips exactly


def test_results_markdown(evaluation):
    out, results, _ = evaluation
    md = (out / "results.md").read_text()
    assert "| Model | Precision | Recall | F1 | Accuracy |" in md
    m = results["metrics"]
    row = " | ".join(M.format_ci(m[k]["value"], m[k]["ci_low"], m[k]["ci_high"])
                     for k in ("macro_precision", "macro_recall", "macro_f1", "accuracy"))
    assert f"| mobilenet_v1 | {row} |" in md
    for section in ("## Per class", "## Confusion matrix", "## ROC AUC", "## Bootstrap",
                    "## Timing"):
        assert section in md
    assert "300 resamples of patients" in md and "batch1_ms_median" in md
    assert "All 200 listed images evaluated; none skipped." in md.splitlines()[:4]
    assert "skipped.csv" not in md


COVERAGE = {"listed": 33, "evaluated": 30, "skipped": 3, "skipped_share": 3 / 33,
            "skipped_by_reason": {"no_pixel_data": 2, "file_not_found": 1}, "max_skipped_share": 0.1}


def test_coverage_in_results_json_and_markdown(tmp_path):
    t, probs, _, files = _data(n=30, seed=2)
    res = reports.write_evaluation(tmp_path, y_true=t, probs=probs, class_names=CLASSES, files=files,
                                   n_resamples=0, coverage=COVERAGE)
    data = _load_json(tmp_path / "results.json")
    assert data["coverage"] == res["coverage"] == COVERAGE
    assert data["n_images"] == 30  # still the number evaluated
    md = (tmp_path / "results.md").read_text().splitlines()
    line = next(x for x in md[:4] if x.startswith("Evaluated"))
    assert line.startswith("Evaluated 30 of 33 listed images; 3 skipped (no_pixel_data 2, file_not_found 1): "
                           "see skipped.csv.")
    assert "9.1% skipped" in line and "10.0% allowed by `--max-skipped-share`" in line
    # coverage that does not match what was evaluated is refused
    for bad in ({**COVERAGE, "evaluated": 29}, {**COVERAGE, "listed": 34},
                {**COVERAGE, "skipped_by_reason": {"no_pixel_data": 2}}):
        with pytest.raises(ValueError, match="coverage"):
            reports.compute_results(y_true=t, probs=probs, class_names=CLASSES, n_resamples=0, coverage=bad)


def test_skipped_csv(tmp_path):
    rows = [("a/1.dcm", "no_pixel_data", "no Pixel Data element"), ("b/2.png", "file_not_found", "b/2.png: gone")]
    path = reports.write_skipped_csv(tmp_path / "out", rows)
    assert path == tmp_path / "out" / "skipped.csv"
    with open(path, newline="") as fh:
        assert list(csv.reader(fh)) == [["file", "reason", "message"], *map(list, rows)]
    # nothing skipped: no skipped.csv, and an earlier run's is not left behind
    assert reports.write_skipped_csv(tmp_path / "out", []) is None and not path.exists()
    # a refused evaluation removes an earlier run's headline results
    (tmp_path / "out" / "results.json").write_text("{}")
    (tmp_path / "out" / "results.md").write_text("#")
    for name in ("ood.json", "ood.md", "ood.csv"):  # the out-of-distribution section too
        (tmp_path / "out" / name).write_text("x")
    assert {p.name for p in reports.remove_evaluation_outputs(tmp_path / "out")} == {
        "results.json", "results.md", "ood.json", "ood.md", "ood.csv"}
    assert not any((tmp_path / "out").iterdir())


def test_figures_written(evaluation):
    out, _, _ = evaluation
    for name in ("confusion_matrix.png", "roc_curves.png"):
        assert (out / name).stat().st_size > 1000
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_without_groups_or_bootstrap(tmp_path):
    t, probs, _, files = _data(n=30, seed=1)
    res = reports.write_evaluation(tmp_path, y_true=t, probs=probs, class_names=CLASSES,
                                   files=files, n_resamples=0)
    assert res["n_groups"] is None and res["timing"] is None
    assert res["bootstrap"]["unit"] == "image"
    assert all(m["ci_low"] is None and m["ci_high"] is None for m in res["metrics"].values())
    with open(tmp_path / "predictions.csv", newline="") as fh:
        assert "group" not in next(csv.reader(fh))
    assert "No bootstrap" in (tmp_path / "results.md").read_text()


def test_input_checks(tmp_path):
    t, probs, groups, files = _data(n=20)
    with pytest.raises(ValueError, match="files"):
        reports.write_evaluation(tmp_path, y_true=t, probs=probs, class_names=CLASSES,
                                 files=files[:-1])
    with pytest.raises(ValueError, match="probs"):
        reports.write_evaluation(tmp_path, y_true=t, probs=probs, class_names=CLASSES[:4],
                                 files=files)
    with pytest.raises(ValueError, match="groups"):
        reports.write_evaluation(tmp_path, y_true=t, probs=probs, class_names=CLASSES,
                                 files=files, groups=groups[:-1])


def test_to_jsonable():
    assert reports.to_jsonable({"a": np.int64(3), "b": (np.float32(0.5), float("inf")),
                                "c": np.array([[1, 2]]), "d": np.bool_(True)}) == {
        "a": 3, "b": [0.5, None], "c": [[1, 2]], "d": True}
    with pytest.raises(TypeError):
        reports.to_jsonable({"x": object()})


def test_comparison_table_and_files(tmp_path):
    def result(value, ms):
        metric = {"value": value, "ci_low": value - 0.01, "ci_high": value + 0.005}
        timing = None if ms is None else {"batch1_ms_median": ms}
        return {"metrics": {k: metric for k in M.METRIC_NAMES}, "timing": timing,
                "n_images": 10, "split": "test", "model_id": "m",
                "coverage": {**reports.full_coverage(10), "max_skipped_share": 0.01}}

    skipping = {"listed": 12, "evaluated": 10, "skipped": 2, "skipped_share": 2 / 12,
                "skipped_by_reason": {"no_pixel_data": 1, "truncated_pixel_data": 1}, "max_skipped_share": 0.2}
    results = [result(0.982, 3.456), {**result(0.9, None), "coverage": skipping},
               {**result(0.8, None), "timing": {"throughput_images_per_s": 500.0}}]
    names = ["MobileNet", "ResNet50", "VGG16"]
    table = reports.comparison_table(results, names)
    lines = table.strip().splitlines()
    assert lines[0] == "| Model | Precision | Recall | F1 | Accuracy | ms/image | Evaluated | Skipped |"
    assert lines[2] == ("| MobileNet | " + " | ".join(["0.982 (0.972-0.987)"] * 4) + " | 3.46 | 10 of 10 | 0 |")
    assert lines[3].endswith("| n/a | 10 of 12 | 2 (16.7%: no_pixel_data 1, truncated_pixel_data 1) |")
    assert lines[4].endswith("| 2.00 | 10 of 10 | 0 |")
    # a results.json from before coverage was recorded
    old = {k: v for k, v in result(0.7, None).items() if k != "coverage"}
    assert reports.comparison_table([old], ["old"]).strip().splitlines()[2].endswith("| n/a | 10 | n/a |")
    with pytest.raises(ValueError):
        reports.comparison_table(results, names[:2])

    reports.write_comparison(tmp_path / "cmp" / "models.md", results, names)
    assert (tmp_path / "cmp" / "models.md").read_text() == table
    with open(tmp_path / "cmp" / "models.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == names
    assert float(rows[0]["macro_f1_ci_low"]) == pytest.approx(0.972)
    assert rows[1]["ms_per_image"] == ""
    assert [(r["listed"], r["evaluated"], r["skipped"]) for r in rows] == [("10", "10", "0"), ("12", "10", "2"),
                                                                            ("10", "10", "0")]
    assert float(rows[1]["skipped_share"]) == pytest.approx(2 / 12)
    assert rows[1]["skipped_by_reason"] == "no_pixel_data=1;truncated_pixel_data=1"
    assert rows[0]["skipped_by_reason"] == ""


def test_confidence_summary_judges_the_stored_threshold_on_held_out_images():
    from utils.evaluate.reports import _confidence_markdown, confidence_summary

    y = np.array([0, 0, 1, 1, 1, 0])
    probs = np.array([[0.99, 0.01], [0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.55, 0.45], [0.3, 0.7]])
    stored = {"temperature": 1.5, "threshold": {"value": 0.8, "target_accuracy": 0.995}}
    summary = confidence_summary(y, probs, stored=stored, target_accuracy=0.99, bins=5)
    # >= 0.8: images 0, 1, 2 routed automatically, all correct; the other three to review
    assert summary["at_stored_threshold"] == {"coverage": 0.5, "accuracy": 1.0, "to_review": 3}
    assert summary["temperature"] == 1.5 and summary["stored_threshold"] == 0.8
    assert summary["recommended_here"]["value"] == pytest.approx(0.8) and summary["recommended_here"]["reachable"]
    assert 0 < summary["ece"] < 1 and len(summary["reliability"]) == 5
    text = "\n".join(_confidence_markdown(summary))
    assert "50.0% of these images are routed automatically, with accuracy 1.000; 3 go to review" in text
    assert "without" not in text and confidence_summary(y, probs)["recommended_here"]["coverage"] == 0.5
