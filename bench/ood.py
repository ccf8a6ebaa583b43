"""Out-of-distribution scores compared on one model: which one tells a radiograph from anything else.

    python -m utils.evaluate.ood_set --output data/ood
    python -m bench.ood --model runs/<run> --data data/radiographs128 --ood-set data/ood

Every candidate is fitted on the prepared dataset's train split, thresholded at --quantile of its
val split's scores, and counted on the test split's radiographs (flagged: false alarms) and on the
OOD set's images (flagged: caught), with the AUROC between the two. Candidates: scores of the
logits (softmax confidence, energy, largest logit), Mahalanobis distances on the pooled features
(what the logits read) and on the first stage's statistics, a logistic regression on every stage's
statistics against synthetic non-radiographs (utils/evaluate/ood_set.py, another seed than the set),
and the union of the last two, the model's score (utils/infer/ood.py). The OOD set's "real" kind
(pydicom and pydicom-data files) is reported apart: no candidate learns from it. --leave-out adds
one row per synthetic kind, the learned part fitted without that kind's negatives.
Prints a Markdown table; --output also writes it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("bench.ood")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory or .keras file (a model of models/registry.py)")
    parser.add_argument("--data", required=True, help="prepared dataset with train, val and test splits")
    parser.add_argument("--ood-set", required=True, help="folder written by python -m utils.evaluate.ood_set")
    parser.add_argument("--quantile", type=float, default=0.995, help="threshold quantile of val scores (0.995)")
    parser.add_argument("--negatives-per-kind", type=int, default=40, help="synthetic negatives per kind (40)")
    parser.add_argument("--leave-out", action="store_true", help="also the union with each kind left out")
    parser.add_argument("--output", default=None, help="also write the table to this Markdown file")
    return parser.parse_args(argv)


def _features(predictor, files, cached):
    from utils.evaluate.calibration import model_outputs

    logits, features, kept = model_outputs(predictor, files, cached=cached, what="bench")
    return logits.astype(np.float64), features.astype(np.float64), kept


def _auroc(negatives, positives):
    from utils.evaluate.ood_eval import auroc

    return auroc(negatives, positives)


def candidates(blocks, train, labels, negatives, negative_kinds):
    """name -> score function of (logits, features); each higher = less like the training radiographs."""
    from utils.infer import ood

    def lse(logits):
        top = logits.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]

    def softmax_max(logits):
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).max(axis=1)

    last = sum(blocks[:-1])
    pooled = slice(last, last + blocks[-1] // 2)  # the last stage's channel means: the pooled features
    maha_pooled = ood._mahalanobis_part(train[1][:, pooled], labels, 64)
    maha_pooled = ood.Detector({"method": ood.METHOD, "blocks": [blocks[-1] // 2], "threshold": 1.0,
                                "parts": {"mahalanobis": maha_pooled}})
    first_stage = ood._mahalanobis_part(train[1][:, :blocks[0]], labels, 128)  # fitted once, used by every union
    first = ood.Detector({"method": ood.METHOD, "blocks": blocks, "threshold": 1.0,
                          "parts": {"mahalanobis": first_stage}})
    out = {
        "softmax confidence": lambda lg, f: -softmax_max(lg),
        "energy": lambda lg, f: -lse(lg),
        "largest logit": lambda lg, f: -lg.max(axis=1),
        "Mahalanobis, pooled features": lambda lg, f: maha_pooled.part_scores(f[:, pooled])["mahalanobis"],
        "Mahalanobis, first stage": lambda lg, f: first.part_scores(f)["mahalanobis"],
    }
    kinds = [None] + sorted(set(negative_kinds))
    for left_out in kinds:
        keep = np.array([k != left_out for k in negative_kinds])
        learned = ood.Detector({"method": ood.METHOD, "blocks": blocks, "threshold": 1.0, "parts": {
            "mahalanobis": first_stage,
            "learned": ood._learned_part(train[1], negatives[keep])}})
        suffix = "" if left_out is None else f" (without {left_out})"
        out[f"logistic regression, every stage{suffix}"] = (
            lambda lg, f, d=learned: d.part_scores(f)["learned"])
        out[f"union: the model's score{suffix}"] = ("union", learned)
    return out


def run(args) -> list[dict]:
    import pandas as pd

    from utils.evaluate import ood_set
    from utils.evaluate.calibration import feature_blocks, synthetic_negatives
    from utils.evaluate.evaluation import eval_set
    from utils.infer.predictor import load_predictor

    predictor = load_predictor(args.model)
    blocks = feature_blocks(predictor)
    if not blocks:
        raise SystemExit(f"{args.model}: not a model of models/registry.py (no stage statistics)")
    spec = predictor.spec
    splits = {s: eval_set(args.data, s, spec) for s in ("train", "val", "test")}
    data = {s: _features(predictor, e.files, e.cached) for s, e in splits.items()}
    labels = np.asarray(splits["train"].labels)[data["train"][2]]
    manifest = pd.read_csv(Path(args.ood_set) / ood_set.MANIFEST, dtype=str, keep_default_na=False)
    paths = [str(Path(args.ood_set) / p) for p in manifest["path"]]
    lg, ft, kept = _features(predictor, paths, cached=False)
    kinds = manifest["kind"].to_numpy()[kept]
    negatives, _ = synthetic_negatives(predictor, per_kind=args.negatives_per_kind)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # the kinds of the negatives, in the order they were written
        sent = ood_set.write_ood_set(folder, seed=_negatives_seed(), per_kind=args.negatives_per_kind,
                                     kinds=tuple(ood_set.SYNTHETIC_KINDS), retagged_copies=False)
        negative_kinds = sent["kind"].tolist()
    rows = []
    for name, score in candidates(blocks, data["train"], labels, negatives, negative_kinds).items():
        if isinstance(score, tuple):  # the union: each part at its own quantile, flagged when either is above
            parts = {s: score[1].part_scores(data[s][1]) for s in ("val", "test")}
            parts["ood"] = score[1].part_scores(ft)
            limits = {k: np.quantile(v, args.quantile) for k, v in parts["val"].items()}
            t_score, o_score = (np.max([parts[s][k] - limits[k] for k in limits], axis=0) for s in ("test", "ood"))
            t_flag, o_flag = t_score > 0, o_score > 0
        else:
            limit = np.quantile(score(*data["val"][:2]), args.quantile)
            t_score, o_score = score(*data["test"][:2]), score(lg, ft)
            t_flag, o_flag = t_score > limit, o_score > limit
        left_out = name.split("(without ")[-1].rstrip(")") if "(without " in name else None
        if left_out is not None and not args.leave_out:
            continue
        row = {"score": name, "AUROC": _auroc(t_score, o_score), "radiographs flagged": float(t_flag.mean()),
               "non-radiographs flagged": float(o_flag.mean()),
               "real files flagged": float(o_flag[kinds == "real"].mean()) if (kinds == "real").any() else None}
        if left_out is not None:
            row["left-out kind flagged"] = float(o_flag[kinds == left_out].mean())
        rows.append(row)
    return rows


def _negatives_seed() -> int:
    from utils.evaluate.calibration import NEGATIVES_SEED

    return NEGATIVES_SEED


def markdown(rows: list[dict]) -> str:
    columns = ["score", "AUROC", "radiographs flagged", "non-radiographs flagged", "real files flagged",
               "left-out kind flagged"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        cells = [row["score"]] + [("" if row.get(c) is None else (f"{row[c]:.3f}" if c == "AUROC"
                                                                  else f"{100 * row[c]:.1f} %"))
                                  for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    table = markdown(run(args))
    print(table)
    if args.output:
        Path(args.output).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
