"""Test-time augmentation, cross-validated: does averaging over views of each image pay for its cost?

    python -m bench.tta runs/cv5-site-robust-128
    python -m bench.tta runs/cv5-site-robust-128 --views identity identity,flip identity,flip,zoom

For each cross-validation directory (training.py --folds K), every fold's best model predicts the
fold it never saw once per view set (utils/infer/tta.py: logits averaged over the views, the
model's temperature and out-of-distribution detector applied as served), so every image gets one
honest prediction per view set, exactly as CV_DIR/oof_predictions.csv has for the plain model.
Per view set: pooled macro F1 with a patient-level bootstrap CI, the paired difference to the
first view set on the same images (the same patient resamples for both), abdominal F1, accuracy,
the share routed automatically at each fold's own recommended threshold (confidence >= threshold
and not flagged out-of-distribution, the router's rule) with the accuracy of those routed, and the
model calls per image (the cost: the router's inference time grows with it).

Writes CV_DIR/tta/<views>.csv (oof_predictions.csv's columns) and tta.md / tta.json in --output
(default CV_DIR/tta) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("bench.tta")


def fold_predictions(cv_dir: Path, views: tuple[str, ...], batch_size: int) -> pd.DataFrame:
    """Every fold's held-out images predicted by that fold's model with ``views``: oof_predictions.csv's
    columns plus ``routed`` (the router's rule at the fold's recommended threshold)."""
    from utils.evaluate.evaluation import predict_with_ood
    from utils.infer.tta import TTAPredictor
    from utils.train.cross_validation import held_out_folds

    rows = []
    for index, plain, frame in held_out_folds(cv_dir):
        predictor = plain if views == ("identity",) else TTAPredictor(plain, views)
        names = list(plain.spec.class_names)
        probs, _, flagged, kept, errors = predict_with_ood(predictor, frame["abs_path"].tolist(), cached=True,
                                                           batch_size=batch_size, progress=False)
        if errors:
            log.warning("fold %d: %d image(s) unreadable, left out", index + 1, len(errors))
        calibration = getattr(plain.metadata, "calibration", None) or {}
        threshold = (calibration.get("threshold") or {}).get("value")
        part = frame.iloc[kept]
        for (_, row), p, out in zip(part.iterrows(), probs, flagged):
            label = names[int(np.argmax(p))]
            rows.append({"file": row["abs_path"], "group": row["group"], "fold": index + 1,
                         "true_label": row["label"], "predicted_label": label, "correct": label == row["label"],
                         "threshold": threshold, "ood_flagged": bool(out),
                         "routed": bool(threshold is not None and float(np.max(p)) >= threshold and not out),
                         **{f"prob_{c}": float(v) for c, v in zip(names, p)}})
    return pd.DataFrame(rows)


def summarise(oof: pd.DataFrame, baseline: pd.DataFrame | None, *, resamples: int, seed: int,
              confidence: float) -> dict:
    from bench.recipes import paired_f1_difference
    from utils.evaluate import metrics as M

    names = sorted({*oof["true_label"], *oof["predicted_label"]})
    index = {c: i for i, c in enumerate(names)}
    truth, guess = oof["true_label"].map(index).to_numpy(), oof["predicted_label"].map(index).to_numpy()
    point = M.classification_metrics(truth, guess, len(names))
    weights = M.draw_bootstrap_weights(len(oof), oof["group"].astype(str).to_numpy(), resamples,
                                       np.random.default_rng(seed))
    samples = M.bootstrap_metrics_from_weights(truth, guess, len(names), weights)["macro_f1"]
    per_class = {c: float(point["f1"][i]) for c, i in index.items()}
    routed = oof["routed"].to_numpy(bool)
    difference = None if baseline is None else paired_f1_difference(oof, baseline, resamples=resamples, seed=seed,
                                                                      confidence=confidence)
    return {"images": len(oof), "macro_f1": M.interval_cell(float(point["macro_f1"]), samples, confidence),
            "paired_difference": None if difference is None else dict(zip(("value", "ci_low", "ci_high"), difference)),
            "abdominal_f1": per_class.get("abdominal"), "accuracy": float(point["accuracy"]),
            "routed_share": float(routed.mean()) if len(routed) else None,
            "routed_accuracy": float(oof.loc[routed, "correct"].mean()) if routed.any() else None,
            "ood_flagged_share": float(oof["ood_flagged"].mean()) if len(oof) else None}


def markdown(results: list[dict]) -> str:
    lines = ["| run | views | model calls / image | macro F1 (95 % CI) | vs first views: paired difference | "
             "abdominal F1 | accuracy | routed at fold thresholds (accuracy) | flagged OOD | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        f1, diff = r["macro_f1"], r["paired_difference"]
        routed = "n/a" if r["routed_share"] is None else (
            f"{r['routed_share']:.1%} ({'-' if r['routed_accuracy'] is None else format(r['routed_accuracy'], '.3f')})")
        lines.append(" | ".join([
            f"| {r['run']}", r["views"], str(r["calls"]), f"{f1['value']:.3f} ({f1['ci_low']:.3f}-{f1['ci_high']:.3f})",
            "-" if diff is None else f"{diff['value']:+.3f} ({diff['ci_low']:+.3f} to {diff['ci_high']:+.3f})",
            "n/a" if r["abdominal_f1"] is None else f"{r['abdominal_f1']:.2f}", f"{r['accuracy']:.3f}", routed,
            f"{r['ood_flagged_share']:.1%}", f"{r['seconds']:.0f} |"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv_dirs", nargs="+", type=Path, help="cross-validation directories (training.py --folds K)")
    parser.add_argument("--views", nargs="+", default=["identity", "identity,flip", "identity,flip,zoom"],
                        help="view sets to compare, each comma-separated (utils/infer/tta.py: identity, flip, "
                             "zoom); the first is the baseline of the paired difference")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="level of the intervals (0.95)")
    parser.add_argument("--seed", type=int, default=42, help="seeds the bootstrap (42)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size when predicting (32)")
    parser.add_argument("--output", type=Path, default=None, help="where tta.md/.json go (default: CV_DIR/tta)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from utils.artifacts import run_dir as R
    from utils.config import environment
    from utils.infer.tta import parse_views

    try:
        view_sets = [parse_views(v) for v in args.views]
    except ValueError as error:
        parser.error(str(error))
    results = []
    for cv_dir in args.cv_dirs:
        if not R.is_cv_dir(cv_dir):
            parser.error(f"{cv_dir} is not a cross-validation directory (no {R.CV_INFO})")
        folder = cv_dir / "tta"
        folder.mkdir(parents=True, exist_ok=True)
        baseline = None
        for views in view_sets:
            start = time.perf_counter()
            oof = fold_predictions(cv_dir, views, args.batch_size)
            seconds = time.perf_counter() - start
            oof.to_csv(folder / f"{'+'.join(views)}.csv", index=False)
            summary = summarise(oof, baseline, resamples=args.resamples, seed=args.seed, confidence=args.confidence)
            results.append({"run": cv_dir.name, "views": "+".join(views), "calls": len(views), "seconds": seconds,
                            **summary})
            log.info("%s %s: macro F1 %.3f", cv_dir.name, "+".join(views), summary["macro_f1"]["value"])
            baseline = oof if baseline is None else baseline
    table = markdown(results)
    print(table)
    output = args.output or args.cv_dirs[0] / "tta"
    output.mkdir(parents=True, exist_ok=True)
    (output / "tta.md").write_text(table + "\n")
    (output / "tta.json").write_text(json.dumps({"results": results, "environment": environment()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
