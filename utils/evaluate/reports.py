"""Evaluation outputs: results.json, predictions.csv, results.md and figures, plus model tables.

``write_evaluation`` turns one model's predictions into every output; ``comparison_table`` and
``write_comparison`` put several results side by side like the paper's table. No TensorFlow:
everything starts from arrays already predicted.

Every output says what it covers: results.json's ``coverage`` (listed, evaluated, skipped by
reason), a line at the top of results.md, Evaluated / Skipped columns in the tables, and
``skipped.csv`` (file, reason, message) beside results.json whenever a listed file was left out.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.config import to_jsonable
from utils.evaluate import metrics as M
from utils.evaluate import plots

logger = logging.getLogger(__name__)

# Bump when a key of results.json is renamed, removed or changes meaning (adding keys is fine).
RESULTS_SCHEMA_VERSION: int = 1

# An evaluation folder (test.py writes one per model): these names, and no others, are its layout.
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PREDICTIONS_CSV = "predictions.csv"
SKIPPED_FILENAME = "skipped.csv"
CONFIG_FILENAME = "test_config.json"  # the resolved settings of the evaluation (utils.config.save_config)
COMPARISON_MD = "comparison.md"  # several models side by side (+ comparison.csv)
RELIABILITY_PNG = "reliability_diagram.png"
RISK_COVERAGE_PNG = "risk_coverage.png"
OOD_FILES = ("ood.json", "ood.md", "ood.csv")  # the out-of-distribution section (utils.evaluate.ood_eval.write)
# What write_evaluation writes: removed by remove_evaluation_outputs when an evaluation is refused,
# so that no earlier headline result is left beside the new skipped.csv.
EVALUATION_FILES: tuple[str, ...] = (RESULTS_JSON, RESULTS_MD, PREDICTIONS_CSV,
                                     "confusion_matrix.png", "roc_curves.png", RELIABILITY_PNG, RISK_COVERAGE_PNG,
                                     "error_gallery.png",
                                     "error_gallery.csv", *OOD_FILES)

# results.json "metrics" key -> column title, in the paper's column order.
PAPER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("macro_precision", "Precision"),
    ("macro_recall", "Recall"),
    ("macro_f1", "F1"),
    ("accuracy", "Accuracy"),
)


def _md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(metric: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not metric:
        return "n/a"
    return M.format_ci(metric.get("value"), metric.get("ci_low"), metric.get("ci_high"), digits)


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ms_per_image(results: Mapping[str, Any]) -> float | None:
    """Batch-1 median latency if timed, else 1000 / throughput, else None."""
    timing = results.get("timing") or {}
    if timing.get("batch1_ms_median") is not None:
        return float(timing["batch1_ms_median"])
    if timing.get("throughput_images_per_s"):
        return 1000.0 / float(timing["throughput_images_per_s"])
    return None


# --- Coverage: listed = evaluated + skipped ---------------------------------------------------
def full_coverage(n_images: int) -> dict[str, Any]:
    """The coverage of an evaluation that skipped nothing (when the caller gives none)."""
    return {"listed": int(n_images), "evaluated": int(n_images), "skipped": 0, "skipped_share": 0.0,
            "skipped_by_reason": {}, "max_skipped_share": None}


def check_coverage(coverage: Mapping[str, Any], n_images: int) -> dict[str, Any]:
    """``coverage`` as a plain dict, checked against the number of images evaluated."""
    cov = dict(coverage)
    missing = {"listed", "evaluated", "skipped", "skipped_by_reason"} - set(cov)
    if missing:
        raise ValueError(f"coverage lacks {sorted(missing)}")
    if cov["evaluated"] != n_images:
        raise ValueError(f"coverage says {cov['evaluated']} images evaluated, but {n_images} were given")
    if cov["listed"] != cov["evaluated"] + cov["skipped"] or sum(cov["skipped_by_reason"].values()) != cov["skipped"]:
        raise ValueError(f"coverage does not add up: {cov}")
    cov.setdefault("skipped_share", cov["skipped"] / cov["listed"] if cov["listed"] else 0.0)
    cov.setdefault("max_skipped_share", None)
    return cov


def _share(value: float) -> str:
    return "<0.1%" if 0 < value < 0.001 else f"{value:.1%}"


def reasons_text(by_reason: Mapping[str, int]) -> str:
    """``{"no_pixel_data": 1, "truncated_pixel_data": 1}`` -> "no_pixel_data 1, truncated_pixel_data 1"."""
    return ", ".join(f"{reason} {count}" for reason, count in by_reason.items())


def coverage_line(coverage: Mapping[str, Any]) -> str:
    """results.md's first line: what was listed, evaluated and skipped (by reason)."""
    listed, evaluated, skipped = coverage["listed"], coverage["evaluated"], coverage["skipped"]
    if not skipped:
        return f"All {listed} listed images evaluated; none skipped."
    line = (f"Evaluated {evaluated} of {listed} listed images; {skipped} skipped "
            f"({reasons_text(coverage['skipped_by_reason'])}): see {SKIPPED_FILENAME}. "
            f"The metrics cover the evaluated images only ({_share(coverage['skipped_share'])} skipped")
    limit = coverage.get("max_skipped_share")
    return line + (f"; at most {_share(limit)} allowed by `--max-skipped-share`)." if limit is not None else ").")


def write_skipped_csv(output_dir: str | os.PathLike, skipped: Sequence[Sequence[Any]]) -> Path | None:
    """skipped.csv (file, reason, message) in ``output_dir`` when ``skipped`` has rows; else remove
    an earlier run's skipped.csv there and return None."""
    path = Path(output_dir) / SKIPPED_FILENAME
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "reason", "message"])
        for file, reason, message in skipped:
            writer.writerow([os.fspath(file), reason, message])
    return path


def remove_evaluation_outputs(output_dir: str | os.PathLike) -> list[Path]:
    """Delete an earlier run's results.json, results.md, predictions.csv, figures and ood.* files in
    ``output_dir`` (used when an evaluation is refused); return what was removed."""
    removed = []
    for name in EVALUATION_FILES:
        path = Path(output_dir) / name
        if path.is_file():
            path.unlink()
            removed.append(path)
    return removed


# --- One model ------------------------------------------------------------------------------
def compute_results(
    *,
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    groups: Any = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 42,
    unit: str = "auto",
    model_id: str = "",
    split: str = "test",
    timing: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    coverage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json dict (already JSON-safe); predictions are argmax of ``probs``.

    ``coverage`` (listed, evaluated, skipped, skipped_share, skipped_by_reason, max_skipped_share;
    see utils.evaluate.evaluation.Coverage) says which part of the listed data the metrics cover; without
    it every listed image is taken as evaluated."""
    names = [str(c) for c in class_names]
    k = len(names)
    t = np.asarray(y_true)
    p_arr = np.asarray(probs)
    if p_arr.ndim != 2 or p_arr.shape != (t.shape[0], k):
        raise ValueError(f"probs must have shape ({t.shape[0]}, {k}), got {p_arr.shape}")
    y_pred = p_arr.argmax(axis=1)
    point = M.classification_metrics(t, y_pred, k)
    resolved = M.resolve_bootstrap_unit(groups, unit)
    ci = M.bootstrap_metrics(t, y_pred, k, groups=groups, n_resamples=n_resamples,
                             confidence=confidence, seed=seed, unit=unit)
    aucs = M.roc_auc_per_class(t, p_arr, k)
    per_class = [
        {"class": names[c], "precision": point["precision"][c], "recall": point["recall"][c],
         "f1": point["f1"][c], "support": point["support"][c], "roc_auc": aucs[c]}
        for c in range(k)
    ]
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "model_id": model_id,
        "split": split,
        "class_names": names,
        "n_images": int(t.shape[0]),  # evaluated; coverage has listed and skipped
        "coverage": (full_coverage(t.shape[0]) if coverage is None
                     else check_coverage(coverage, int(t.shape[0]))),
        "n_groups": None if groups is None else int(np.unique(np.asarray(groups)).size),
        "metrics": {name: ci[name] for name in M.METRIC_NAMES},
        "macro_average": {
            "labels": [names[c] for c in point["macro_labels"]],
            "note": "sklearn average='macro', zero_division=0, over labels in y_true or y_pred",
        },
        "per_class": per_class,
        "confusion_matrix": {"rows": "true", "columns": "predicted", "labels": names,
                             "counts": point["confusion_matrix"]},
        "roc_auc": {"per_class": dict(zip(names, aucs)), "macro": M.macro_auc(aucs)},
        "bootstrap": {"method": "percentile", "resamples": int(n_resamples),
                      "confidence": float(confidence), "unit": resolved,
                      "unit_requested": unit, "seed": int(seed)},
        "timing": dict(timing) if timing is not None else None,
        "extra": dict(extra) if extra is not None else None,
    }
    return to_jsonable(results)


def write_predictions_csv(
    path: str | os.PathLike, *, files: Sequence[Any], y_true: Any, probs: Any,
    class_names: Sequence[str], groups: Any = None,
) -> None:
    """file, [group], true_label, predicted_label, correct, prob_<class>... (labels as names)."""
    names = [str(c) for c in class_names]
    t = np.asarray(y_true).astype(np.int64)
    p_arr = np.asarray(probs)
    if len(files) != t.shape[0]:
        raise ValueError(f"files has {len(files)} entries for {t.shape[0]} labels")
    pred = p_arr.argmax(axis=1)
    header = ["file"] + (["group"] if groups is not None else [])
    header += ["true_label", "predicted_label", "correct"] + [f"prob_{c}" for c in names]
    group_list = None if groups is None else list(np.asarray(groups).tolist())
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in range(t.shape[0]):
            row: list[Any] = [os.fspath(files[i]) if isinstance(files[i], os.PathLike)
                              else files[i]]
            if group_list is not None:
                row.append(group_list[i])
            row += [names[t[i]], names[pred[i]], bool(t[i] == pred[i])]
            row += [str(v) for v in p_arr[i]]  # shortest round-trip repr of the array's dtype
            writer.writerow(row)


def results_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the paper-format table, then per class, confusion matrix, AUC, notes."""
    names = results["class_names"]
    model = results.get("model_id") or "model"
    boot = results["bootstrap"]
    groups = results.get("n_groups")
    out = [f"# Evaluation of {model} on the {results.get('split', '')} split", ""]
    out += [coverage_line(results.get("coverage") or full_coverage(results["n_images"])), ""]
    out.append(f"{results['n_images']} images evaluated" +
               (f" from {groups} groups (patients)." if groups is not None else "."))
    out += ["", _md_table(["Model"] + [title for _, title in PAPER_COLUMNS],
                          [[model] + [_cell(results["metrics"][k]) for k, _ in PAPER_COLUMNS]])]
    macro_labels = results.get("macro_average", {}).get("labels", names)
    out += ["", f"Macro averages run over the {len(macro_labels)} classes present in the true or "
            "predicted labels (scikit-learn `average=\"macro\"`, `zero_division=0`)."]

    out += ["", "## Per class", ""]
    out.append(_md_table(
        ["Class", "Precision", "Recall", "F1", "Support", "ROC AUC"],
        [[r["class"], _num(r["precision"]), _num(r["recall"]), _num(r["f1"]), r["support"],
          _num(r["roc_auc"])] for r in results["per_class"]]))
    out += ["", "Undefined ratios are 0.000 (zero_division=0); support 0 marks an absent class."]

    out += ["", "## Confusion matrix", "", "Rows: true class; columns: predicted class.", ""]
    counts = results["confusion_matrix"]["counts"]
    out.append(_md_table(["true \\ predicted"] + list(names),
                         [[names[i]] + list(row) for i, row in enumerate(counts)]))

    out += ["", "## ROC AUC (one-vs-rest)", ""]
    auc = results["roc_auc"]
    out.append(_md_table(["Class", "AUC"], [[c, _num(a)] for c, a in auc["per_class"].items()]
                         + [["macro (defined classes)", _num(auc["macro"])]]))
    out += ["", "n/a: the class is absent from the true labels or is the only one."]

    if results.get("confidence"):
        out += _confidence_markdown(results["confidence"])
    cv = (results.get("extra") or {}).get("cross_validation")
    if cv:
        out += ["", "## Cross-validation", "",
                f"Pooled out-of-fold predictions of a {cv['folds']}-fold cross-validation grouped by patient and "
                "stratified by label: each image was predicted once, by the fold's model that never saw it "
                "(its best epoch chosen on another fold). The table above pools them; per fold:", ""]
        out.append(_md_table(["Fold", "Test images", "Skipped", "Patients", "Macro F1", "Accuracy", "Model"],
                             [[f["fold"], f["evaluated"], f["skipped"], f["groups"], _num(f["macro_f1"]),
                               _num(f["accuracy"]), f["model_id"]] for f in cv["per_fold"]]))
        spread = cv["macro_f1_spread"]
        if spread["mean"] is not None:
            out += ["", f"Macro F1 over the folds: mean {spread['mean']:.3f}, SD {spread['sd']:.3f}, "
                    f"range {spread['min']:.3f}-{spread['max']:.3f}."]

    out += ["", "## Bootstrap", ""]
    if boot["resamples"] > 0:
        unit = ("patients (groups: each drawn group brings all its images)"
                if boot["unit"] == "group" else "images")
        out.append(f"{boot['confidence']:.0%} confidence intervals: percentile bootstrap over "
                   f"{boot['resamples']} resamples of {unit}, seed {boot['seed']} "
                   f"(requested unit: {boot['unit_requested']}).")
    else:
        out.append("No bootstrap (0 resamples): point estimates only.")

    out += ["", "## Timing", ""]
    timing = results.get("timing")
    if timing:
        out.append(_md_table(["Measure", "Value"], [[k, v] for k, v in timing.items()]))
    else:
        out.append("Not measured.")
    return "\n".join(out) + "\n"


def write_evaluation(
    output_dir: str | os.PathLike,
    *,
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    files: Sequence[Any],
    groups: Any = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 42,
    unit: str = "auto",
    model_id: str = "",
    split: str = "test",
    timing: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    coverage: Mapping[str, Any] | None = None,
    stored_calibration: Mapping[str, Any] | None = None,
    target_accuracy: float = 0.995,
    calibration_bins: int = 15,
) -> dict[str, Any]:
    """Compute every metric and write results.json, predictions.csv, results.md,
    confusion_matrix.png and roc_curves.png into ``output_dir``; return the results dict.

    Predictions are ``argmax(probs)``. ``groups`` (e.g. patient ids, one per image) enables the
    patient-level bootstrap (``unit="auto"``; see ``utils.evaluate.metrics.resolve_bootstrap_unit``).
    ``timing`` and ``extra`` are stored as given (made JSON-safe); ``coverage`` as in
    ``compute_results`` (skipped.csv itself is ``write_skipped_csv``'s). ``confidence`` in
    results.json, a "Confidence and review" section, reliability_diagram.png and risk_coverage.png
    come from ``confidence_summary`` (``stored_calibration``: the model's calibration entry).
    """
    if len(files) != np.asarray(y_true).shape[0]:
        raise ValueError(f"files has {len(files)} entries for {np.asarray(y_true).shape[0]} labels")
    if groups is not None and np.asarray(groups).shape != np.asarray(y_true).shape:
        raise ValueError("groups must have one entry per image")
    results = compute_results(
        y_true=y_true, probs=probs, class_names=class_names, groups=groups,
        n_resamples=n_resamples, confidence=confidence, seed=seed, unit=unit,
        model_id=model_id, split=split, timing=timing, extra=extra, coverage=coverage)
    results["confidence"] = to_jsonable(confidence_summary(y_true, probs, stored=stored_calibration,
                                                           target_accuracy=target_accuracy, bins=calibration_bins))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / RESULTS_JSON, "w", encoding="utf-8") as fh:
        json.dump(results, fh, indent=2, allow_nan=False)
        fh.write("\n")
    write_predictions_csv(out / PREDICTIONS_CSV, files=files, y_true=y_true, probs=probs,
                          class_names=class_names, groups=groups)
    (out / RESULTS_MD).write_text(results_markdown(results), encoding="utf-8")
    plots.plot_confusion_matrix(np.asarray(results["confusion_matrix"]["counts"]),
                                results["class_names"], out / "confusion_matrix.png")
    plots.plot_roc_curves(y_true, probs, results["class_names"], out / "roc_curves.png")
    plots.plot_reliability_diagram(y_true, probs, out / RELIABILITY_PNG, bins=calibration_bins)
    stored = results["confidence"].get("stored_threshold")
    plots.plot_risk_coverage(y_true, probs, out / RISK_COVERAGE_PNG, target_accuracy=target_accuracy,
                             threshold=stored if isinstance(stored, (int, float)) else None)  # not "per fold"
    logger.info("wrote results.json, predictions.csv, results.md and figures to %s", out)
    return results


def confidence_summary(y_true: Any, probs: Any, *, stored: Mapping[str, Any] | None = None,
                       target_accuracy: float = 0.995, bins: int = 15) -> dict[str, Any]:
    """How far the probabilities can be trusted for routing, on these (held-out) images.

    ``ece`` / ``nll`` of the probabilities as served (with the model's temperature, if any);
    ``stored``: the model's calibration entry (temperature and the threshold recommended on its
    validation split), and what that threshold gives here: the share routed automatically and
    its accuracy (a cross-validation passes one threshold per image, its fold model's, and the
    temperatures of its folds as a list); ``recommended_here``: the threshold these images would recommend (optimistic:
    chosen on the data it is scored on; for comparison only)."""
    from utils.evaluate import calibration as C

    labels = np.asarray(y_true)
    p = np.asarray(probs, dtype=float)
    ece, table = C.expected_calibration_error(p, labels, bins)
    confidence, correct = p.max(axis=1), p.argmax(axis=1) == labels
    summary: dict[str, Any] = {"ece": ece, "nll": C.nll(p, labels), "bins": int(bins), "reliability": table,
                               "target_accuracy": float(target_accuracy),
                               "recommended_here": C.recommend_threshold(p, labels, target_accuracy)}
    if stored:
        threshold = (stored.get("threshold") or {}).get("value")
        summary["temperature"] = stored.get("temperature")
        per_image = threshold is not None and np.ndim(threshold) > 0
        if per_image and np.isnan(np.asarray(threshold, dtype=float)).any():
            threshold = None  # a fold without a recommendation: no honest figure to give
        summary["stored_threshold"] = "per fold" if per_image else threshold
        if threshold is not None:
            routed = confidence >= np.asarray(threshold, dtype=float)
            summary["at_stored_threshold"] = {
                "coverage": float(routed.mean()) if len(routed) else None,
                "accuracy": float(correct[routed].mean()) if routed.any() else None,
                "to_review": int((~routed).sum())}
    return summary


def _confidence_markdown(cal: Mapping[str, Any]) -> list[str]:
    out = ["", "## Confidence and review", ""]
    temperature = cal.get("temperature")
    if isinstance(temperature, list):
        known = [t for t in temperature if t is not None]
        with_t = (f", each fold's model with its own temperature ({min(known):.3g}-{max(known):.3g})."
                  if known else " (the fold models carry no temperature).")
    else:
        with_t = (f", with the model's temperature {temperature:.3g}." if temperature else
                  " (the model carries no temperature: calibrate.py fits one).")
    out.append(f"Expected calibration error {cal['ece']:.3f} ({cal['bins']} bins), negative log-likelihood "
               f"{cal['nll']:.3f}" + with_t)
    at = cal.get("at_stored_threshold")
    if at and at["coverage"] is not None:
        accuracy = "n/a" if at["accuracy"] is None else f"{at['accuracy']:.3f}"
        stored = cal["stored_threshold"]
        which = "each fold's own" if stored == "per fold" else f"{stored:.4g}"
        out += ["", f"At the threshold recommended on the validation split ({which}, for "
                f"{cal['target_accuracy']:.1%} accuracy): {at['coverage']:.1%} of these images are routed "
                f"automatically, with accuracy {accuracy}; {at['to_review']} go to review."]
    here = cal["recommended_here"]
    if here.get("reachable"):
        out += ["", f"On these images, {here['target_accuracy']:.1%} accuracy is reached by routing "
                f"{here['coverage']:.1%} automatically (confidence >= {here['value']:.4g}; chosen on the data it "
                "is scored on, so optimistic)."]
        if here.get("enough_images") is False:
            out[-1] += (f" That share is {here['routed_images']} images, too few to show "
                        f"{here['target_accuracy']:.1%} accuracy ({here['min_images']} or more needed).")
    else:
        best = here["best"]
        out += ["", f"On these images no threshold reaches {here['target_accuracy']:.1%}: the best is "
                f"{best['accuracy']:.3f} at {best['coverage']:.1%} routed (confidence >= {best['value']:.4g})."]
    out += ["", "Figures: reliability_diagram.png (accuracy against confidence), risk_coverage.png (accuracy "
            "of the routed share against its size)."]
    return out


# --- Several models -------------------------------------------------------------------------
def _coverage_cells(res: Mapping[str, Any]) -> list[str]:
    """Evaluated ("40 of 42") and Skipped ("2 (4.8%: no_pixel_data 1, ...)") cells."""
    cov = res.get("coverage")
    if not cov:  # a results.json written before coverage was recorded
        return ["n/a" if res.get("n_images") is None else str(res["n_images"]), "n/a"]
    skipped = cov["skipped"]
    detail = f"{skipped} ({_share(cov['skipped_share'])}: {reasons_text(cov['skipped_by_reason'])})"
    return [f"{cov['evaluated']} of {cov['listed']}", detail if skipped else "0"]


def comparison_table(results: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """Markdown table, one row per model:
    Model | Precision | Recall | F1 | Accuracy | ms/image | Evaluated | Skipped.

    ms/image is ``timing.batch1_ms_median`` (else 1000 / throughput), n/a if not timed.
    Evaluated is "evaluated of listed"; Skipped the count, share and reasons.
    """
    if len(results) != len(names):
        raise ValueError(f"{len(results)} results for {len(names)} names")
    rows = []
    for name, res in zip(names, results):
        ms = ms_per_image(res)
        rows.append([name] + [_cell(res["metrics"].get(k)) for k, _ in PAPER_COLUMNS]
                    + ["n/a" if ms is None else f"{ms:.2f}"] + _coverage_cells(res))
    header = ["Model"] + [t for _, t in PAPER_COLUMNS] + ["ms/image", "Evaluated", "Skipped"]
    return _md_table(header, rows) + "\n"


def write_comparison(
    output_path_md: str | os.PathLike,
    results: Sequence[Mapping[str, Any]],
    names: Sequence[str],
) -> None:
    """Write ``comparison_table`` to ``output_path_md`` and the raw numbers to a .csv beside it."""
    md_path = Path(output_path_md)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(comparison_table(results, names), encoding="utf-8")
    header = ["model"]
    for key, _ in PAPER_COLUMNS:
        header += [key, f"{key}_ci_low", f"{key}_ci_high"]
    header += ["ms_per_image", "n_images", "split", "model_id",
               "listed", "evaluated", "skipped", "skipped_share", "skipped_by_reason"]
    with open(md_path.with_suffix(".csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for name, res in zip(names, results):
            row: list[Any] = [name]
            for key, _ in PAPER_COLUMNS:
                m = res["metrics"].get(key) or {}
                row += [m.get("value"), m.get("ci_low"), m.get("ci_high")]
            row += [ms_per_image(res), res.get("n_images"), res.get("split"), res.get("model_id")]
            cov = res.get("coverage") or {}
            by_reason = cov.get("skipped_by_reason")
            row += [cov.get("listed"), cov.get("evaluated"), cov.get("skipped"), cov.get("skipped_share"),
                    None if by_reason is None else ";".join(f"{r}={n}" for r, n in by_reason.items())]
            writer.writerow(["" if v is None else v for v in row])
    logger.info("wrote %s and %s", md_path, md_path.with_suffix(".csv"))
