"""test.py's out-of-distribution report: how many real radiographs the model's OOD score flags, and, with
``--ood-set DIR`` (a folder written by ``python -m utils.evaluate.ood_set``), how many images that are not
projection radiographs it flags, as sent and re-tagged as DX (so by the image itself).

    summary = ood_eval.summarise(model_ood_entry, real_scores, y_true, probs, auto_threshold, ood_set=...)
    ood_eval.write(output_dir, summary, rows)        # ood.json, ood.csv (per image of the set), ood.md

Numbers: AUROC of the score between the evaluated real radiographs (negatives) and the set's images
(positives); the share flagged at the model's threshold, overall, as sent, re-tagged and per kind; the
share the header guard alone would catch as sent; and at ``--threshold auto`` the share of real
radiographs routed automatically with and without the OOD score, and their accuracy.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

OOD_JSON, OOD_CSV, OOD_MD = "ood.json", "ood.csv", "ood.md"


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting half; None when a side is empty."""
    negatives, positives = np.asarray(negatives, np.float64), np.asarray(positives, np.float64)
    if not len(negatives) or not len(positives):
        return None
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([negatives, positives]))
    return float((ranks[len(negatives):].sum() - len(positives) * (len(positives) + 1) / 2)
                 / (len(negatives) * len(positives)))


def routing(y_true: np.ndarray, probs: np.ndarray, flagged: np.ndarray | None, threshold: float) -> dict[str, Any]:
    """Share of images routed automatically at ``threshold`` (confidence >= threshold and, when given,
    not flagged) and the accuracy of those."""
    probs = np.asarray(probs)
    confident = probs.max(axis=1) >= threshold
    routed = confident if flagged is None else confident & ~np.asarray(flagged, bool)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    n = int(routed.sum())
    return {"routed_share": float(routed.mean()) if len(routed) else None, "routed": n,
            "accuracy": float(correct[routed].mean()) if n else None}


def summarise(entry: Mapping[str, Any] | None, real_scores: np.ndarray | None, y_true: np.ndarray, probs: np.ndarray,
              auto_threshold: float | None, *, real_flags: np.ndarray | None = None,
              set_scores: np.ndarray | None = None, set_flags: np.ndarray | None = None,
              set_rows: Sequence[Mapping[str, Any]] = (), guard_reasons: Sequence[str] = ()) -> dict[str, Any]:
    """The OOD section of test.py's results (see the module docstring). ``*_flags``: what the engine made
    out_of_distribution (the score above its threshold, or a colour image); default: the score alone."""
    if entry is None or real_scores is None:
        return {"available": False, "why": "the model has no out-of-distribution score (calibrate.py fits one; "
                                           "exports made before it have no features output)"}
    threshold = float(entry["threshold"])
    real_flagged = (np.asarray(real_scores) > threshold) if real_flags is None else np.asarray(real_flags, bool)
    out: dict[str, Any] = {"available": True, "threshold": threshold, "quantile": entry.get("quantile"),
                           "fitted_on": entry.get("fitted_on"), "real_images": int(len(real_scores)),
                           "real_flagged": int(real_flagged.sum()),
                           "real_flagged_share": float(real_flagged.mean()) if len(real_flagged) else None}
    if auto_threshold is not None:
        out["auto_threshold"] = float(auto_threshold)
        out["auto_without_ood"] = routing(y_true, probs, None, auto_threshold)
        out["auto_with_ood"] = routing(y_true, probs, real_flagged, auto_threshold)
    if set_scores is not None and len(set_rows):
        scores = np.asarray(set_scores, np.float64)
        flagged = (scores > threshold) if set_flags is None else np.asarray(set_flags, bool)
        retagged = np.array([bool(r.get("retagged")) for r in set_rows])
        kinds = np.array([str(r.get("kind", "")) for r in set_rows])
        guarded = np.array([bool(g) for g in guard_reasons]) if len(guard_reasons) else np.zeros(len(scores), bool)
        out["set"] = {
            "images": int(len(scores)), "auroc": auroc(np.asarray(real_scores), scores),
            "auroc_retagged": auroc(np.asarray(real_scores), scores[retagged]),
            "flagged_share": float(flagged.mean()),
            "flagged_share_as_sent": float(flagged[~retagged].mean()) if (~retagged).any() else None,
            "flagged_share_retagged": float(flagged[retagged].mean()) if retagged.any() else None,
            "header_guard_share_as_sent": float(guarded[~retagged].mean()) if (~retagged).any() else None,
            "caught_as_sent": float((flagged | guarded)[~retagged].mean()) if (~retagged).any() else None,
            "per_kind": {k: {"images": int((kinds == k).sum()), "flagged_share": float(flagged[kinds == k].mean())}
                         for k in sorted(set(kinds))},
        }
    return out


def markdown(summary: Mapping[str, Any]) -> str:
    lines = ["## Out-of-distribution score", ""]
    if not summary.get("available"):
        return "\n".join(lines + [summary.get("why", "not available"), ""])
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    lines.append(f"Threshold {summary['threshold']:.4g}: each part of the score at the {pct(summary.get('quantile'))} "
                 f"quantile of the validation images' scores (fitted on {summary.get('fitted_on')}).")
    lines.append("")
    lines.append(f"- images of the evaluated split flagged (false alarms): {summary['real_flagged']} of {summary['real_images']} "
                 f"({pct(summary['real_flagged_share'])})")
    if "auto_threshold" in summary:
        a, b = summary["auto_without_ood"], summary["auto_with_ood"]
        lines.append(f"- at the auto threshold {summary['auto_threshold']:.4g}: routed automatically "
                     f"{pct(a['routed_share'])} (accuracy {pct(a['accuracy'])}) without the score, "
                     f"{pct(b['routed_share'])} (accuracy {pct(b['accuracy'])}) with it")
    s = summary.get("set")
    if s:
        auroc = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines += [f"- images that are not projection radiographs: {s['images']}; AUROC {auroc(s['auroc'])} "
                  f"(re-tagged DX: {auroc(s['auroc_retagged'])})",
                  f"- flagged out_of_distribution (the score, or a colour image): {pct(s['flagged_share'])} "
                  f"(as sent {pct(s['flagged_share_as_sent'])}, re-tagged DX {pct(s['flagged_share_retagged'])}); as sent, the header guard alone catches "
                  f"{pct(s['header_guard_share_as_sent'])}, guard or score {pct(s['caught_as_sent'])}",
                  "", "| kind | images | flagged |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['images']} | {pct(v['flagged_share'])} |" for k, v in s["per_kind"].items()]
    return "\n".join(lines) + "\n"


def write(output_dir: str | os.PathLike, summary: Mapping[str, Any],
          rows: Sequence[Mapping[str, Any]] = ()) -> list[Path]:
    """ood.json, ood.md and (with a set) ood.csv, one row per image of the set."""
    import pandas as pd

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / OOD_JSON, folder / OOD_MD]
    written[0].write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    written[1].write_text(markdown(summary))
    if rows:
        pd.DataFrame(list(rows)).to_csv(folder / OOD_CSV, index=False)
        written.append(folder / OOD_CSV)
    else:
        (folder / OOD_CSV).unlink(missing_ok=True)  # an earlier run's, with a set this run did not score
    return written


def evaluate_set(predictor, ood_set: str | os.PathLike, *, batch_size: int, pool, progress: bool
                 ) -> tuple[np.ndarray | None, np.ndarray, list[dict[str, Any]], list[str]]:
    """The model's OOD scores on every readable image of an OOD set folder (its manifest.csv), the header
    guard left off so that every image reaches the model: (scores or None, flagged by the engine, rows, the
    guard's reasons)."""
    import pandas as pd

    from utils.evaluate.evaluation import predict_with_ood
    from utils.infer.decisions import not_projection

    folder = Path(ood_set)
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{folder}: no manifest.csv (write a set with python -m utils.evaluate.ood_set "
                                f"--output {folder})")
    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    paths = [str(p if Path(p).is_absolute() else folder / p) for p in frame["path"]]
    probs, scores, flags, kept, errors = predict_with_ood(predictor, paths, cached=False, batch_size=batch_size,
                                                   progress=progress, pool=pool, projection_only=False)
    for path, error in errors:
        log.info("OOD set: %s not read (%s)", path, error)
    rows, reasons = [], []
    if len(kept):
        from utils.io.dicom import read_dicom_header

    for j, i in enumerate(kept):
        row = frame.iloc[int(i)].to_dict()
        row["retagged"] = str(row.get("retagged", "")).lower() in ("true", "1")
        try:
            header = dict(read_dicom_header(paths[int(i)]))
        except Exception:  # noqa: BLE001 - the image was read; a header error only leaves the guard's column empty
            header = {}
        reasons.append(not_projection(header) if header else "")
        row.update(ood_score=None if scores is None else float(scores[j]),
                   top_label=predictor.spec.class_names[int(np.argmax(probs[j]))],
                   confidence=float(np.max(probs[j])), flagged=bool(flags[j]),
                   header_guard_catches=bool(reasons[-1]))
        rows.append(row)
    return scores, flags, rows, reasons
