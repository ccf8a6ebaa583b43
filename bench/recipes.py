"""Compare cross-validated recipes: one Markdown row per cross-validation directory.

Run from the repository root after ``python test.py CV_DIR`` on each (it writes CV_DIR/eval-cv):

    python -m bench.recipes runs/cv5-readme-recipe-128 runs/cv5-small-data-128
    python -m bench.recipes runs/cv5-* --output runs/recipes.md

Columns: the flags that differ from the first directory's settings, pooled out-of-fold macro F1
with its patient-level bootstrap interval, the difference to the first directory's macro F1 on the
same images with a paired patient-level bootstrap interval (the honest way to compare two recipes
whose own intervals overlap), abdominal F1 (the rare class), accuracy, accuracy on the
90 % most confident images, expected calibration error, the share routed automatically (and its
accuracy) at each fold's own recommended threshold, and the training minutes (all folds, with
calibration; from cv.json, or for runs that predate that record from the fold directories' file
times). The machine is printed under the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from utils import config
from utils.artifacts import run_dir as R

IGNORED = {"data", "folds", "quiet", "cache", "xla", "output"}  # settings that do not change the recipe


def _ci(metric: dict) -> str:
    return f"{metric['value']:.3f} ({metric['ci_low']:.3f}-{metric['ci_high']:.3f})"


def train_minutes(cv_dir: Path, folds: list[dict]) -> tuple[float, str]:
    """Training minutes summed over the folds, and where they come from."""
    recorded = [f.get("train_seconds") for f in folds]
    if recorded and all(s is not None for s in recorded):
        return sum(recorded) / 60.0, "recorded"
    total = 0.0
    for index in range(len(folds)):
        fold = R.fold_dir(cv_dir, index)
        total += (fold / R.LAST_MODEL).stat().st_mtime - (fold / R.CONFIG).stat().st_mtime
    return total / 60.0, "file times"


def accuracy_at_coverage(oof: pd.DataFrame, share: float = 0.9) -> float:
    """Accuracy on the ``share`` most confident out-of-fold predictions."""
    confidence = oof[[c for c in oof.columns if c.startswith("prob_")]].max(axis=1).to_numpy()
    keep = np.argsort(-confidence, kind="stable")[: max(1, int(round(share * len(oof))))]
    return float(oof["correct"].to_numpy()[keep].mean())


def paired_f1_difference(oof: pd.DataFrame, baseline: pd.DataFrame, *, resamples: int = 1000, seed: int = 42,
                         confidence: float = 0.95) -> tuple[float, float, float] | None:
    """Macro F1 of ``oof`` minus the baseline's on the same images, with a paired patient-level
    bootstrap interval (each resample draws patients once and scores both recipes on them); None
    when the two did not predict the same images."""
    from utils.evaluate import metrics as M

    merged = oof.merge(baseline, on="file", suffixes=("", "_base"))
    if len(merged) != len(oof) or len(merged) != len(baseline):
        return None
    names = sorted({*merged["true_label"], *merged["predicted_label"], *merged["predicted_label_base"]})
    index = {c: i for i, c in enumerate(names)}
    truth = merged["true_label"].map(index).to_numpy()
    weights = M.draw_bootstrap_weights(len(merged), merged["group"].astype(str).to_numpy(), resamples,
                                       np.random.default_rng(seed))
    scores = [M.bootstrap_metrics_from_weights(truth, merged[column].map(index).to_numpy(), len(names),
                                               weights)["macro_f1"]
              for column in ("predicted_label", "predicted_label_base")]
    point = [M.classification_metrics(truth, merged[column].map(index).to_numpy(), len(names))["macro_f1"]
             for column in ("predicted_label", "predicted_label_base")]
    low, high = M.percentile_interval(scores[0] - scores[1], confidence)
    return float(point[0] - point[1]), low, high


def differences(settings: dict, baseline: dict) -> str:
    changed = [f"--{k.replace('_', '-')} {_flag_value(settings.get(k))}" for k in sorted(set(settings) | set(baseline))
               if k not in IGNORED and settings.get(k) != baseline.get(k)]
    return " ".join(changed) or "(baseline)"


def _flag_value(value) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _difference(oof: pd.DataFrame, baseline_oof: pd.DataFrame | None) -> str:
    if baseline_oof is None:
        return "-"
    difference = paired_f1_difference(oof, baseline_oof)
    return "n/a (other images)" if difference is None else "{:+.3f} ({:+.3f} to {:+.3f})".format(*difference)


def _routed(routed: dict) -> str:
    if not routed:
        return "n/a"
    accuracy = "-" if routed.get("accuracy") is None else f"{routed['accuracy']:.3f}"  # nothing routed
    return f"{routed['coverage']:.1%} ({accuracy})"


def row(cv_dir: Path, baseline: dict, baseline_oof: pd.DataFrame | None = None) -> dict:
    info = R.read_cv(cv_dir)
    results_path = cv_dir / "eval-cv" / "results.json"
    if not results_path.is_file():
        raise SystemExit(f"{results_path} is missing: run `python test.py {cv_dir}` first")
    results = json.loads(results_path.read_text())
    oof = pd.read_csv(cv_dir / R.OOF_PREDICTIONS)
    per_class = {c["class"]: c for c in results["per_class"]}
    routed = (results.get("confidence") or {}).get("at_stored_threshold") or {}
    minutes, source = train_minutes(cv_dir, info["folds"])
    return {
        "run": cv_dir.name, "changes": differences(info["config"], baseline),
        "macro F1 (95 % CI)": _ci(results["metrics"]["macro_f1"]),
        "vs first: paired difference (95 % CI)": _difference(oof, baseline_oof),
        "abdominal F1": f"{per_class['abdominal']['f1']:.2f}" if "abdominal" in per_class else "n/a",
        "accuracy": f"{results['metrics']['accuracy']['value']:.3f}",
        "accuracy, 90 % most confident": f"{accuracy_at_coverage(oof):.3f}",
        "ECE": f"{results['confidence']['ece']:.3f}" if results.get("confidence") else "n/a",
        "routed at fold thresholds (accuracy)": _routed(routed),
        "train minutes": f"{minutes:.0f}" + ("" if source == "recorded" else " *"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv_dirs", nargs="+", type=Path, help="cross-validation directories (training.py --folds K)")
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    for cv_dir in args.cv_dirs:
        if not R.is_cv_dir(cv_dir):
            parser.error(f"{cv_dir} is not a cross-validation directory (no {R.CV_INFO})")
    baseline = R.read_cv(args.cv_dirs[0])["config"]
    first_oof = pd.read_csv(args.cv_dirs[0] / R.OOF_PREDICTIONS)
    rows = [row(cv_dir, baseline, None if i == 0 else first_oof) for i, cv_dir in enumerate(args.cv_dirs)]
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]
    environment = R.read_cv(args.cv_dirs[-1]).get("environment", {})
    lines += ["", f"Machine: {environment.get('processor') or config.cpu_name()}, "
                  f"{environment.get('cpu_count', '?')} CPU cores. * minutes from file times (a run that predates "
                  "the train_seconds record)."]
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
