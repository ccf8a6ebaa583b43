"""test.py ``--shift``: the model on its test split as other sites would render it (utils.evaluate.shifts).

The split is decoded once, with the model's own preprocessing (the prepared cache's PNGs, or raw
files through ``preprocess_file``); each requested shift and severity re-renders those 8-bit
images in memory and the same engine as test.py's (utils.infer.engine) scores them, the model's
temperature and out-of-distribution score included. Every condition covers the same images, so
one set of patient-level bootstrap resamples (the seed, resamples and unit of test.py) serves them
all: each F1 has its CI, and each drop against the clean images a paired CI.

Per shift and severity: macro F1 and accuracy (argmax) with CIs, the F1 drop against clean, and
at the model's auto threshold (its calibration's recommendation): the share routed automatically
(confident and not flagged out-of-distribution), the accuracy of that share and its errors (the
images routed wrongly without review), and the share flagged out-of-distribution. A shift
*breaks* the model at a severity where macro F1 falls more than ``BREAK_DROP`` below clean.
Written to shifts.json / shifts.csv / shifts.md, shifts.png (F1 and routed share against
severity, a panel per shift) and shift_examples.png (one test image under every shift).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from utils.config import to_jsonable
from utils.evaluate import metrics as M
from utils.evaluate import shifts

log = logging.getLogger(__name__)

SHIFTS_JSON, SHIFTS_CSV, SHIFTS_MD = "shifts.json", "shifts.csv", "shifts.md"
SHIFTS_PNG, EXAMPLES_PNG = "shifts.png", "shift_examples.png"
BREAK_DROP = 0.03  # a macro F1 drop larger than this against clean: the shift breaks the model
CLEAN = "clean"


def evaluate(model_arg: str, data: str | None, settings: dict, output_dir: Path,
             requested: Sequence[tuple[str, int]], *, progress: bool = True) -> dict:
    """Clean and every (shift, severity) of ``requested`` on ``settings["split"]`` of ``data``
    (default: the model's training data); writes the outputs into ``output_dir``, returns the summary."""
    from utils import constants
    from utils.artifacts.run_dir import training_data
    from utils.evaluate import evaluation
    from utils.infer.predictor import load_predictor

    info = load_predictor(model_arg)
    data = data or training_data(model_arg) or constants.DATA_DIR
    subset = evaluation.eval_set(data, settings["split"], info.spec)
    images, kept = decode(info, subset, settings, progress=progress)
    if not kept:
        raise ValueError(f"{data}: none of the {len(subset.files)} images of split {subset.split} could be read")
    y_true = subset.labels[kept]
    groups = [subset.groups[i] for i in kept] if subset.groups is not None else None
    keys = [Path(subset.files[i]).name for i in kept]
    conditions = [(CLEAN, 0)] + list(requested)
    outcomes = score_conditions(info, images, keys, conditions, settings, progress=progress)
    metadata = getattr(info, "metadata", None)
    recommended = getattr(metadata, "recommended_threshold", None)
    threshold = float(recommended["value"]) if recommended else None
    summary = summarise(y_true, outcomes, len(info.spec.class_names), groups=groups, threshold=threshold,
                        n_resamples=settings["bootstrap_resamples"], confidence=settings["confidence_level"],
                        seed=settings["seed"], unit=settings["bootstrap_unit"])
    summary.update({"model_id": info.model_id, "data": str(data), "split": subset.split,
                    "source": subset.description, "listed": len(subset.files), "shift_seed": int(settings["seed"])})
    write(output_dir, summary)
    plot_examples(images[0], keys[0], conditions[1:], output_dir / EXAMPLES_PNG, seed=settings["seed"])
    return summary


def evaluate_cv(cv_dir: str | Path, settings: dict, output_dir: Path, requested: Sequence[tuple[str, int]], *,
                progress: bool = True) -> dict:
    """:func:`evaluate` for a cross-validation (training.py --folds K): each fold's model on the fold it never
    saw, under every condition, pooled, so that every labelled image is scored once per condition by a model
    that was not trained on its patient (as test.py CV_DIR's clean metrics). Routed: at or above each fold's
    own recommended threshold and not flagged. Writes the outputs into ``output_dir``, returns the summary."""
    import types

    from utils.artifacts import run_dir as R
    from utils.train.cross_validation import held_out_folds

    cv = R.read_cv(cv_dir)["config"]
    conditions = [(CLEAN, 0)] + list(requested)
    y_true, groups, keys, thresholds, fold_thresholds, parts, example = [], [], [], [], [], [], None
    folds = int(cv["folds"])
    for index, info, frame in held_out_folds(cv_dir, cv):
        images, kept = decode(info, types.SimpleNamespace(files=frame["abs_path"].tolist(), cached=True), settings,
                              progress=False)
        rows = frame.iloc[kept]
        fold_keys = [Path(f).name for f in rows["abs_path"]]
        parts.append(score_conditions(info, images, fold_keys, conditions, settings, progress=False))
        recommended = getattr(getattr(info, "metadata", None), "recommended_threshold", None)
        fold_thresholds.append(float(recommended["value"]) if recommended else np.nan)
        thresholds += [fold_thresholds[-1]] * len(rows)
        y_true += rows["y"].tolist()
        groups += rows["group"].astype(str).tolist()
        keys += fold_keys
        if example is None and images:
            example = (images[0], fold_keys[0])
        log.info("shifts: fold %d of %d scored (%d images, %d conditions)", index + 1, folds, len(rows),
                 len(conditions))
    if not y_true:
        raise ValueError(f"{cv_dir}: none of the folds' images could be read")
    outcomes = [Outcome(name, severity, np.concatenate([p[i].probs for p in parts]),
                        np.concatenate([p[i].flagged for p in parts])) for i, (name, severity) in enumerate(conditions)]
    per_image = np.asarray(thresholds, dtype=np.float64)
    summary = summarise(y_true, outcomes, len(info.spec.class_names), groups=groups,
                        threshold=None if np.isnan(per_image).any() else per_image,
                        n_resamples=settings["bootstrap_resamples"], confidence=settings["confidence_level"],
                        seed=settings["seed"], unit=settings["bootstrap_unit"])
    summary.update({"threshold": None, "model_id": f"{Path(cv_dir).name} ({folds} folds, out of fold)",
                    "fold_thresholds": None if np.isnan(per_image).any() else fold_thresholds,
                    "data": str(cv["data"]), "split": "out-of-fold", "source": f"{cv['data']} (every labelled image)",
                    "listed": len(y_true), "shift_seed": int(settings["seed"])})
    write(output_dir, summary)
    plot_examples(example[0], example[1], conditions[1:], output_dir / EXAMPLES_PNG, seed=settings["seed"])
    return summary


def decode(info, subset, settings: dict, *, progress: bool) -> tuple[list[np.ndarray], list[int]]:
    """The split's 8-bit images as the model's preprocessing makes them (once), and their indices."""
    from tqdm import tqdm

    from utils.evaluate.evaluation import decode_cached
    from utils.infer.engine import Engine
    from utils.io.isolation import PoolSettings

    pool = PoolSettings.from_flags(settings)
    if subset.cached:
        engine = Engine(info.spec, pool=dataclasses.replace(pool, mode="threads"), decode=decode_cached)
    else:
        engine = Engine(info.spec, pool=pool, projection_only=settings.get("projection_only", True))
    images, kept = [], []
    bar = tqdm(total=len(subset.files), desc="decoding", unit="img", disable=not progress)
    with engine:
        index = 0
        for batch in engine.decode_batches(subset.files, settings["batch_size"]):
            for decoded in batch:
                if decoded.image is not None:
                    images.append(decoded.image)
                    kept.append(index)
                else:
                    log.warning("shift evaluation leaves out %s: %s", decoded.path, decoded.reason)
                index += 1
            bar.update(len(batch))
    bar.close()
    return images, kept


@dataclasses.dataclass
class Outcome:
    """One condition's model output on the kept images."""

    name: str
    severity: int
    probs: np.ndarray  # (N, K), as served (the model's temperature applied)
    flagged: np.ndarray  # (N,) bool: out_of_distribution


def score_conditions(info, images: Sequence[np.ndarray], keys: Sequence[str], conditions, settings: dict, *,
                     progress: bool) -> list[Outcome]:
    """The model's probabilities and OOD flags on the images under each (shift, severity)."""
    from tqdm import tqdm

    from utils.infer.engine import Decoded, Engine
    from utils.infer.ood import OUT_OF_DISTRIBUTION
    from utils.infer.predictor import scorer

    batch_size = max(1, int(settings["batch_size"]))
    outcomes = []
    engine = Engine(info.spec, scorer(info))  # the pool is never started: the images are decoded already
    for name, severity in tqdm(conditions, desc="shifts", unit="shift", disable=not progress):
        shifted = images if name == CLEAN else [shifts.apply(image, name, severity, key=key, seed=settings["seed"])
                                               for image, key in zip(images, keys)]
        predictions = []
        for start in range(0, len(shifted), batch_size):
            predictions += engine.predict_decoded([Decoded(key, image) for key, image in
                                                   zip(keys[start : start + batch_size],
                                                       shifted[start : start + batch_size])])
        outcomes.append(Outcome(name, severity, np.stack([p.probs for p in predictions]).astype(np.float64),
                                np.array([p.reason == OUT_OF_DISTRIBUTION for p in predictions])))
    engine.close()
    return outcomes


# --- Metrics --------------------------------------------------------------------------------
def summarise(y_true, outcomes: Sequence[Outcome], num_classes: int, *, groups=None, threshold: float | None,
              n_resamples: int = 1000, confidence: float = 0.95, seed: int = 42, unit: str = "auto") -> dict:
    """The rows of the report; ``outcomes[0]`` is the clean condition. The same resamples (of
    patients where ``groups`` says so, as test.py's results) serve every condition."""
    t = np.asarray(y_true, dtype=np.int64)
    resolved = M.resolve_bootstrap_unit(groups, unit)
    weights = (M.draw_bootstrap_weights(t.size, groups if resolved == "group" else None, n_resamples,
                                        np.random.default_rng(seed)) if n_resamples else None)
    rows, clean_f1, clean_samples = [], None, None
    for outcome in outcomes:
        predicted = outcome.probs.argmax(axis=1)
        point = M.classification_metrics(t, predicted, num_classes)
        samples = (M.bootstrap_metrics_from_weights(t, predicted, num_classes, weights)
                   if weights is not None else None)
        f1_samples = samples["macro_f1"] if samples is not None else None
        if clean_f1 is None:
            clean_f1, clean_samples = point["macro_f1"], f1_samples
        drop_samples = clean_samples - f1_samples if f1_samples is not None else None
        drop = clean_f1 - point["macro_f1"]
        correct = predicted == t
        row = {"shift": outcome.name, "severity": int(outcome.severity),
               "level": None if outcome.name == CLEAN else shifts.get(outcome.name).level(outcome.severity),
               "macro_f1": M.interval_cell(point["macro_f1"], f1_samples, confidence),
               "accuracy": M.interval_cell(point["accuracy"], samples["accuracy"] if samples is not None else None,
                                     confidence),
               "f1_drop": M.interval_cell(drop, drop_samples, confidence),
               "ood_flagged": float(outcome.flagged.mean()),
               "breaks": bool(outcome.name != CLEAN and drop > BREAK_DROP),
               # the paired CI of the drop excludes zero: not a resampling accident
               "drop_significant": bool(outcome.name != CLEAN and drop_samples is not None
                                        and M.percentile_interval(drop_samples, confidence)[0] > 0)}
        if threshold is not None:
            routed = (outcome.probs.max(axis=1) >= threshold) & ~outcome.flagged
            row.update({"routed_share": float(routed.mean()),
                        "routed_accuracy": float(correct[routed].mean()) if routed.any() else None,
                        "routed_errors": int((routed & ~correct).sum())})
        else:
            row.update({"routed_share": None, "routed_accuracy": None, "routed_errors": None})
        rows.append(row)
    shifted = [r for r in rows if r["shift"] != CLEAN]
    verdicts = {}
    for name in dict.fromkeys(r["shift"] for r in shifted):
        broken = [r["severity"] for r in shifted if r["shift"] == name and r["breaks"]]
        verdicts[name] = {"severities": [r["severity"] for r in shifted if r["shift"] == name],
                          "breaks_from": min(broken) if broken else None}
    return to_jsonable({
        "n_images": int(t.size), "n_groups": None if groups is None else int(np.unique(np.asarray(groups)).size),
        "threshold": threshold, "break_drop": BREAK_DROP,
        "bootstrap": {"method": "percentile", "resamples": int(n_resamples), "confidence": float(confidence),
                      "unit": resolved, "unit_requested": unit, "seed": int(seed),
                      "note": "the same resamples for every condition; f1_drop is paired (clean - shifted)"},
        "rows": rows, "verdicts": verdicts,
        "breaking": [n for n, v in verdicts.items() if v["breaks_from"] is not None],
        "holding": [n for n, v in verdicts.items() if v["breaks_from"] is None],
        "shifts": {n: {"description": shifts.get(n).description, "unit": shifts.get(n).unit,
                       "levels": list(shifts.get(n).levels)} for n in verdicts}})


# --- Outputs --------------------------------------------------------------------------------
def _ci(cell: dict, digits: int = 3, sign: bool = False) -> str:
    fmt = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    if cell["ci_low"] is None:
        return fmt.format(cell["value"])
    return f"{fmt.format(cell['value'])} ({fmt.format(cell['ci_low'])} to {fmt.format(cell['ci_high'])})"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def table(summary: dict) -> str:
    """The markdown table: one row per condition."""
    header = ["Shift", "Sev.", "Level", "Macro F1 (CI)", "F1 change vs clean (paired CI)", "Accuracy",
              "Auto-routed", "Acc. routed", "Errors routed", "OOD flagged", "Verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 7 + ["---"]) + "|"]
    for row in summary["rows"]:
        clean = row["shift"] == CLEAN
        drop = row["f1_drop"]  # clean - shifted; shown as shifted - clean (negative: worse)
        change = {"value": -drop["value"], "ci_low": None if drop["ci_high"] is None else -drop["ci_high"],
                  "ci_high": None if drop["ci_low"] is None else -drop["ci_low"]}
        verdict = "" if clean else ("holds" if not row["breaks"] else
                                    "**breaks**" if row["drop_significant"] else "breaks (CI includes 0)")
        cells = [row["shift"], "" if clean else row["severity"], "" if row["level"] is None else row["level"],
                 _ci(row["macro_f1"]), "" if clean else _ci(change, sign=True),
                 f"{row['accuracy']['value']:.3f}", _share(row["routed_share"]), _share(row["routed_accuracy"]),
                 "n/a" if row["routed_errors"] is None else row["routed_errors"], _share(row["ood_flagged"]), verdict]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    boot = summary["bootstrap"]
    unit = "patients" if boot["unit"] == "group" else "images"
    out = [f"# Robustness to site shifts: {summary.get('model_id', '')} on the {summary.get('split', '')} split", "",
           f"{summary['n_images']} images" + (f" of {summary['n_groups']} patients" if summary["n_groups"] else "") +
           f" from {summary.get('source', summary.get('data', ''))}, each re-rendered as another site would send it "
           f"(utils/evaluate/shifts.py, seed {summary.get('shift_seed', '')}) and scored with the model's own "
           "preprocessing and temperature.", ""]
    out.append(table(summary))
    out += ["", f"CIs: {boot['confidence']:.0%} percentile bootstrap over {boot['resamples']} resamples of {unit}, "
            "the same resamples for every row; the F1 change is shifted minus clean, paired on those resamples. "
            f"A shift **breaks** the model where macro F1 falls more than {summary['break_drop']:g} below clean "
            "(*breaks (CI includes 0)*: by more than that, but the paired CI of the change still includes 0).",
            "", (f"Auto-routed: confidence at or above {_threshold_words(summary)} and not flagged "
                 "out-of-distribution; Acc. routed: the accuracy of that share; Errors routed: wrong classes that "
                 "would go out without review." if summary["rows"][0]["routed_share"] is not None else
                 "The model has no auto threshold (no calibration): no routed share.")]
    out += [""] + [f"- {line}" for line in verdict_lines(summary)]
    out += ["", "| Shift | What a site does | Levels (severity 1, 2, 3) |", "|---|---|---|"]
    out += [f"| {n} | {s['description']} | {', '.join(str(x) for x in s['levels'])} {s['unit']} |"
            for n, s in summary["shifts"].items()]
    out += ["", f"Figures: {SHIFTS_PNG} (macro F1 and auto-routed share against severity), {EXAMPLES_PNG} "
            "(one test image under every shift)."]
    return "\n".join(out) + "\n"


def _threshold_words(summary: dict) -> str:
    if summary.get("fold_thresholds"):
        values = summary["fold_thresholds"]
        return f"each fold's own auto threshold ({min(values):.4g} to {max(values):.4g})"
    return f"the model's auto threshold {summary['threshold']:.4g}"


def verdict_lines(summary: dict) -> list[str]:
    """Which shifts break the model from which severity, which hold, and where wrong classes would be
    routed without review (more than on the clean images)."""
    by_severity: dict[int, list[str]] = {}
    for name, verdict in summary["verdicts"].items():
        if verdict["breaks_from"] is not None:
            by_severity.setdefault(verdict["breaks_from"], []).append(name)
    lines = [f"breaks the model from severity {s}: {', '.join(names)}" for s, names in sorted(by_severity.items())]
    lines.append("holds at every severity evaluated: " + (", ".join(summary["holding"]) or "none"))
    clean = summary["rows"][0]
    if clean["routed_errors"] is not None:
        worse = sorted((r for r in summary["rows"][1:] if r["routed_errors"] > clean["routed_errors"]),
                       key=lambda r: -r["routed_errors"])
        lines.append(f"wrong classes routed without review (clean: {clean['routed_errors']}): " +
                     (", ".join(f"{shifts.label(r['shift'], r['severity'])} {r['routed_errors']}" for r in worse)
                      or "no more than clean"))
    return lines


CSV_FIELDS = ("shift", "severity", "level", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "f1_drop",
              "f1_drop_ci_low", "f1_drop_ci_high", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
              "routed_share", "routed_accuracy", "routed_errors", "ood_flagged", "breaks", "drop_significant")


def write(output_dir: Path, summary: dict) -> None:
    """shifts.json, shifts.csv, shifts.md and shifts.png into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SHIFTS_JSON).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    with open(output_dir / SHIFTS_CSV, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in summary["rows"]:
            flat = {k: row[k] for k in ("shift", "severity", "level", "routed_share", "routed_accuracy",
                                        "routed_errors", "ood_flagged", "breaks", "drop_significant")}
            for metric in ("macro_f1", "f1_drop", "accuracy"):
                flat[metric] = row[metric]["value"]
                flat[f"{metric}_ci_low"], flat[f"{metric}_ci_high"] = row[metric]["ci_low"], row[metric]["ci_high"]
            writer.writerow(flat)
    (output_dir / SHIFTS_MD).write_text(markdown(summary))
    plot(summary, output_dir / SHIFTS_PNG)
    log.info("wrote %s, %s, %s and %s to %s", SHIFTS_JSON, SHIFTS_CSV, SHIFTS_MD, SHIFTS_PNG, output_dir)


def plot(summary: dict, path: Path) -> None:
    """A panel per shift: macro F1 (with its CI) and the auto-routed share against severity, clean at 0."""
    from matplotlib.figure import Figure

    names = list(summary["verdicts"])
    if not names:
        return
    clean = summary["rows"][0]
    columns = min(5, len(names))
    rows = -(-len(names) // columns)
    fig = Figure(figsize=(3.2 * columns, 2.7 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False, sharey=True).ravel())
    for ax, name in zip(axes, names):
        entries = [clean] + [r for r in summary["rows"] if r["shift"] == name]
        x = [r["severity"] for r in entries]
        f1 = np.array([r["macro_f1"]["value"] for r in entries])
        low = np.array([r["macro_f1"]["ci_low"] if r["macro_f1"]["ci_low"] is not None else r["macro_f1"]["value"]
                        for r in entries])
        high = np.array([r["macro_f1"]["ci_high"] if r["macro_f1"]["ci_high"] is not None
                         else r["macro_f1"]["value"] for r in entries])
        ax.fill_between(x, low, high, color="tab:blue", alpha=0.15, lw=0)
        ax.plot(x, f1, "o-", color="tab:blue", label="macro F1")
        if clean["routed_share"] is not None:
            ax.plot(x, [r["routed_share"] for r in entries], "s--", color="tab:green", label="auto-routed share")
        ax.axhline(clean["macro_f1"]["value"] - summary["break_drop"], ls=":", color="tab:red", lw=1,
                   label=f"clean F1 - {summary['break_drop']:g}")
        broken = summary["verdicts"][name]["breaks_from"]
        ax.set_title(f"{name}" + (f" (breaks from {broken})" if broken else ""), fontsize=10,
                     color="tab:red" if broken else "black")
        ax.set_xticks(x, ["clean"] + [str(s) for s in x[1:]])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{summary.get('model_id', '')}: macro F1 ({summary['bootstrap']['confidence']:.0%} CI) "
                 "against shift severity")
    fig.savefig(path, dpi=100)


def plot_examples(image: np.ndarray, key: str, conditions: Sequence[tuple[str, int]], path: Path, *,
                  seed: int = 0) -> None:
    """One image, clean and under every requested shift and severity (a row per shift)."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(name for name, _ in conditions))
    if not names:
        return
    columns = 1 + max(len([s for n, s in conditions if n == name]) for name in names)
    fig = Figure(figsize=(1.6 * columns, 1.7 * len(names)), layout="constrained")
    axes = fig.subplots(len(names), columns, squeeze=False)
    for row, name in enumerate(names):
        panels = [("clean", image)] + [(f"{name}:{s}", shifts.apply(image, name, s, key=key, seed=seed))
                                       for n, s in conditions if n == name]
        for col in range(columns):
            ax = axes[row, col]
            ax.set_axis_off()
            if col < len(panels):
                ax.imshow(panels[col][1], cmap="gray", vmin=0, vmax=255)
                ax.set_title(panels[col][0], fontsize=8)
    fig.savefig(path, dpi=100)
