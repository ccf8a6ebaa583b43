"""Adaptation from corrections, measured: what fine-tuning on N corrected images of a new source buys.

    python -m bench.adaptation              # trains the base model first (~17 min on 2 CPU cores), then 12 fine-tunes
    python -m bench.adaptation --base-run runs/adaptation-cadma/base --draws 5    # reuses a trained base model

The held-out source (--source-repo, default the 132 full-spine scoliosis films of Znarfran/CADMA:
strongly equalised, one patient each, all labelled spine) is every image of the prepared dataset
--data whose source file the manifest (--manifest) attributes to that repository.

1. Base model. A copy of --data without the held-out source (--base-data, default DATA-no-<repo>;
   labels.csv filtered, the cached PNGs copied, the splits otherwise unchanged, nothing re-prepared)
   and a model trained on it with `training.py --recipe RECIPE` (default small-data) into
   OUTPUT/base, unless --base-run names one. The base run's training data is checked to hold no
   held-out image.
2. Split. The held-out images (in path order) are split once, seeded by --seed, into an evaluation
   set of --eval-size images and a pool of the rest. Each draw d is a seeded permutation of the
   pool; N corrected images are its first N (so a draw's sets are nested: its N=25 holds its N=10).
   For N above the pool size, the whole pool plus the first N - pool images of a seeded
   permutation of the evaluation set are fine-tuned on, and that N is evaluated on the rest of the
   evaluation set only: a different, smaller evaluation set per draw (marked in every output). N = 0
   is the base model. An N that leaves no image to evaluate on is skipped with the reason. When
   N equals the pool size every draw fine-tunes on the same images: its draws differ only in the
   training seed (rehearsal sample, augmentation, shuffling).
3. Fine-tune. Each (N, draw) is a dataset in prepare.py's format holding the N images, all in the
   train split (OUTPUT/sets/NAME: the cached PNGs copied, the base dataset's preprocess.json), and
   `training.py --finetune BASE --data SET --seed SEED+d` (utils/train/finetune.py: FINETUNE_EPOCHS,
   rehearsal of the base training images; validation and calibration on the base validation split,
   plus FINETUNE_HOLDOUT of the N images from FINETUNE_HOLDOUT_MIN_PATIENTS up; the OOD detector
   refitted on all base training images and the N)
   into OUTPUT/finetunes/NAME. A finished run (best.keras that records its parent) is reused on a
   re-run; an unfinished one is removed and trained again.
4. Scores. Every model, through the predictor interface and the evaluation engine (the model's
   temperature and out-of-distribution detector applied, as served), on all held-out images and on
   the base dataset's test split (--split). On the evaluation set: accuracy (share labelled as the
   true class), the share routed automatically at the model's own recommended threshold (its
   calibration; confidence >= threshold and not flagged out-of-distribution, the router's rule),
   the accuracy of those routed, the share routed automatically with a wrong label (the errors no one
   reviews), the share flagged out-of-distribution, and the accuracy gain over the base model on the
   same images. On the test split: macro F1 and its change against the base
   model (forgetting). CIs: percentile bootstrap, --resamples, over images on the held-out source (each
   film is its own patient), over patient groups on the test split where groups repeat (test.py's
   rule); the same resamples for every model on the same images, so gains and drops are paired.
5. Per N: the mean over draws, their range (min-max), and the bootstrap CI of that mean (each
   resample averaged over the draws: image sampling, not the spread between draws, which the range
   shows).

Outputs in --output (default runs/adaptation-<repo>): adaptation.json (everything, with the plan and
the machine), adaptation.csv (per N), adaptation_runs.csv (per model), adaptation.md (the tables) and
adaptation.png (held-out accuracy and routed share, and test macro F1, against N with CI bars). The
per-N table is printed. Scores are cached in OUTPUT/scores, so a re-run with fewer --draws or other
--n values only reports.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("bench.adaptation")

COPIED = ("preprocess.json", "pixels.json", "prepare_config.json")  # what a filtered dataset keeps besides labels.csv


@dataclass(frozen=True)
class Draw:
    """One fine-tune of the plan: N images of the held-out source, evaluated on ``evaluate``."""

    n: int
    draw: int
    seed: int  # training.py --seed of the fine-tune
    train: tuple[int, ...]  # indices into the held-out images
    evaluate: tuple[int, ...]
    shared_eval: bool  # evaluated on the fixed evaluation set (False: on what is left of it)

    @property
    def name(self) -> str:
        return "base" if self.n == 0 else f"n{self.n:03d}-d{self.draw}"


# --- the plan (pure) ---------------------------------------------------------------------------------------
def split_pool(count: int, eval_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pool, evaluation set): sorted indices of ``count`` images, ``eval_size`` of them to evaluate on."""
    if not 0 < eval_size < count:
        raise ValueError(f"--eval-size must be between 1 and {count - 1} (the source has {count} images)")
    order = np.random.default_rng([seed, 0]).permutation(count)
    return np.sort(order[eval_size:]), np.sort(order[:eval_size])


def draw_plan(pool: np.ndarray, evaluation: np.ndarray, ns: list[int], draws: int, seed: int
              ) -> tuple[list[Draw], dict[int, str]]:
    """The fine-tunes of every N and draw (module docstring, step 2), draw by draw (a plan cut short keeps
    whole curves), and the N skipped with the reason. N = 0 is the base model: one Draw, no training."""
    plan, skipped = [], {}
    if 0 in ns:
        plan.append(Draw(0, 0, seed, (), tuple(int(i) for i in evaluation), True))
    for d in range(draws):
        from_pool = np.random.default_rng([seed, 1, d]).permutation(pool)
        from_eval = np.random.default_rng([seed, 2, d]).permutation(evaluation)
        for n in sorted(set(ns) - {0}):
            if n <= len(pool):
                train, evaluate, shared = from_pool[:n], evaluation, True
            elif n < len(pool) + len(evaluation):
                extra = n - len(pool)
                train, evaluate, shared = np.concatenate([from_pool, from_eval[:extra]]), from_eval[extra:], False
            else:
                skipped[n] = f"N={n} leaves none of the {len(pool) + len(evaluation)} images to evaluate on"
                continue
            plan.append(Draw(n, d, seed + d, tuple(sorted(int(i) for i in train)),
                             tuple(sorted(int(i) for i in evaluate)), shared))
    return plan, skipped


def held_out_mask(labels: pd.DataFrame, manifest: pd.DataFrame, source_repo: str, shared_root: Path) -> np.ndarray:
    """Which rows of a prepared dataset's labels.csv come from ``source_repo`` (manifest's ``file``,
    relative to ``shared_root``, against labels.csv's ``source_file``)."""
    files = set(manifest.loc[manifest["source_repo"] == source_repo, "file"].astype(str))
    if not files:
        raise ValueError(f"the manifest has no image of source_repo {source_repo!r}")
    root = Path(shared_root).resolve()

    def relative(path: str) -> str:
        try:
            return Path(path).resolve().relative_to(root).as_posix()
        except ValueError:
            return ""

    return labels["source_file"].astype(str).map(relative).isin(files).to_numpy()


# --- metrics (pure) ----------------------------------------------------------------------------------------
def _interval_cell(value, samples: np.ndarray | None, confidence: float) -> dict:
    from utils.evaluate.metrics import interval_cell

    return interval_cell(value, samples, confidence)


def source_samples(correct: np.ndarray, routed: np.ndarray, flagged: np.ndarray, weights: np.ndarray
                   ) -> dict[str, tuple[float | None, np.ndarray]]:
    """Point value and per-resample values ((B,), NaN where undefined) of each held-out-source metric,
    from per-image booleans and bootstrap multiplicities (B, N)."""
    correct, routed, flagged = (np.asarray(a, dtype=np.float64) for a in (correct, routed, flagged))
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        routed_accuracy = (w @ (routed * correct)) / (w @ routed)
    n_routed = routed.sum()
    return {"accuracy": (float(correct.mean()), w @ correct / total),
            "routed_share": (float(routed.mean()), w @ routed / total),
            "routed_accuracy": (float((routed * correct).sum() / n_routed) if n_routed else None, routed_accuracy),
            "routed_wrong": (float((routed * (1 - correct)).mean()), w @ (routed * (1 - correct)) / total),
            "ood_flagged": (float(flagged.mean()), w @ flagged / total)}


def aggregate(values: list[float | None], samples: list[np.ndarray], confidence: float) -> dict:
    """Mean over draws, their min and max, and the CI of the mean (each resample averaged over draws)."""
    defined = [v for v in values if v is not None]
    if not defined:
        return {"value": None, "ci_low": None, "ci_high": None, "min": None, "max": None, "draws": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample where no draw routed anything: NaN
        mean_samples = np.nanmean(np.vstack(samples), axis=0)
    out = _interval_cell(float(np.mean(defined)), mean_samples, confidence)
    return {**out, "min": float(min(defined)), "max": float(max(defined)), "draws": len(defined)}


# --- steps with side effects -------------------------------------------------------------------------------
def write_subset(source: Path, target: Path, rows: pd.DataFrame) -> Path:
    """A prepared dataset at ``target`` holding ``rows`` of ``source``'s labels.csv (their PNGs copied)."""
    from utils.data import files as F

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in COPIED:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    for relative in rows["path"]:
        (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, tmp / relative)
    F.write_csv(rows, tmp / F.LABELS)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def base_dataset(data: Path, target: Path, keep: pd.DataFrame) -> Path:
    """--base-data: reused when it holds exactly ``keep``'s images, else (re)written."""
    from utils.data import files as F

    if F.is_prepared(target) and sorted(F.read_labels(target)["path"]) == sorted(keep["path"]):
        log.info("reusing %s (%d images, the held-out source left out)", target, len(keep))
        return target
    log.info("writing %s: %d images of %s without the held-out source", target, len(keep), data)
    return write_subset(data, target, keep)


def _finished(run_dir: Path, finetune: bool) -> bool:
    from utils.artifacts import run_dir as R
    from utils.artifacts.model_file import read_metadata

    best = run_dir / R.BEST_MODEL
    if not best.is_file() or "train_seconds" not in (R.read_config(run_dir) if (run_dir / R.CONFIG).is_file() else {}):
        return False
    return not finetune or "finetuned_from" in read_metadata(best).extra


def train(command: list[str], run_dir: Path, log_path: Path, finetune: bool) -> float:
    """Run training.py (a fresh process per run), unless ``run_dir`` already holds the finished run;
    returns the wall-clock seconds it took (0 when reused)."""
    if _finished(run_dir, finetune):
        log.info("reusing %s", run_dir)
        return 0.0
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run of ours: trained again
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("training %s (log: %s)", run_dir, log_path)
    start = time.perf_counter()
    with open(log_path, "w") as fh:
        result = subprocess.run([sys.executable, "training.py", *command, "--output", str(run_dir), "--quiet"],
                                stdout=fh, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0 or not _finished(run_dir, finetune):
        raise SystemExit(f"training {run_dir} failed (exit {result.returncode}); see {log_path}")
    return time.perf_counter() - start


def check_no_leak(run_dir: Path, held_files: set[str]) -> None:
    """Refuse a base run whose training data holds an image of the held-out source."""
    from utils.artifacts import run_dir as R
    from utils.data import files as F

    data = R.training_data(run_dir)
    if data is None or not F.is_prepared(data):
        raise SystemExit(f"{run_dir}: its training data ({data}) is not available to check for held-out images")
    leaked = set(F.read_labels(data)["source_file"].map(lambda p: str(Path(p).resolve()))) & held_files
    if leaked:
        raise SystemExit(f"{run_dir} was trained on {data}, which holds {len(leaked)} image(s) of the held-out "
                         "source: it cannot measure adaptation to it")


def score(run_dir: Path, cache: Path, held_paths: list[str], test, batch_size: int) -> dict:
    """The model's served probabilities and out-of-distribution flags on the held-out images and the test
    split, and its recommended threshold (cached in ``cache``)."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            return {k: saved[k] for k in saved.files}
    from utils.evaluate.evaluation import predict_with_ood
    from utils.infer.predictor import load_predictor

    predictor = load_predictor(run_dir)
    out = {}
    for key, files in (("held", held_paths), ("test", test.files)):
        probs, _, flagged, kept, errors = predict_with_ood(predictor, files, cached=True, batch_size=batch_size,
                                                           progress=False)
        if errors:
            raise SystemExit(f"{run_dir}: {len(errors)} image(s) could not be read, e.g. {errors[0]}")
        out[f"{key}_probs"], out[f"{key}_flagged"] = probs, flagged
    recommended = predictor.metadata.recommended_threshold if predictor.metadata is not None else None
    out["threshold"] = np.float64(recommended["value"] if recommended else np.nan)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    import keras

    keras.backend.clear_session()
    return out


# --- the report --------------------------------------------------------------------------------------------
def evaluate_runs(plan: list[Draw], scores: dict[str, dict], held_y: np.ndarray, test, num_classes: int, *,
                  resamples: int, seed: int, confidence: float) -> tuple[list[dict], list[dict]]:
    """(one row per model, one row per N): module docstring, steps 4 and 5."""
    from utils.evaluate import metrics as M

    unit = M.resolve_bootstrap_unit(test.groups, "auto")
    test_weights = M.draw_bootstrap_weights(len(test.labels), test.groups if unit == "group" else None, resamples,
                                            np.random.default_rng([seed, 3]))

    def test_f1(probs):
        predicted = probs.argmax(axis=1)
        point = M.classification_metrics(test.labels, predicted, num_classes)["macro_f1"]
        return point, M.bootstrap_metrics_from_weights(test.labels, predicted, num_classes, test_weights)["macro_f1"]

    base = scores["base"]
    base_f1, base_f1_samples = test_f1(base["test_probs"])
    rows, samples = [], {}
    for draw in plan:
        s = scores[draw.name]
        idx = np.asarray(draw.evaluate)
        weights = M.draw_bootstrap_weights(len(idx), None, resamples, np.random.default_rng([seed, 4, len(idx)]))

        def correct_of(probs):
            return probs[idx].argmax(axis=1) == held_y[idx]

        threshold = float(s["threshold"])
        probs, flagged = s["held_probs"], s["held_flagged"]
        routed = (probs[idx].max(axis=1) >= threshold) & ~flagged[idx] if np.isfinite(threshold) else \
            np.zeros(len(idx), bool)
        metrics = source_samples(correct_of(probs), routed, flagged[idx], weights)
        base_accuracy = source_samples(correct_of(base["held_probs"]), routed, flagged[idx], weights)["accuracy"]
        metrics["gain"] = (metrics["accuracy"][0] - base_accuracy[0], metrics["accuracy"][1] - base_accuracy[1])
        f1, f1_samples = test_f1(s["test_probs"])
        metrics["test_macro_f1"] = (f1, f1_samples)
        metrics["test_f1_change"] = (f1 - base_f1, f1_samples - base_f1_samples)
        samples[draw.name] = metrics
        rows.append({"model": draw.name, "n": draw.n, "draw": draw.draw, "seed": draw.seed,
                     "eval_images": len(idx), "shared_eval": draw.shared_eval, "threshold": threshold,
                     **{k: _interval_cell(v, a, confidence) for k, (v, a) in metrics.items()}})
    per_n = []
    for n in sorted({d.n for d in plan}):
        group = [d for d in plan if d.n == n]
        entry = {"n": n, "draws": len(group), "eval_images": sorted({len(d.evaluate) for d in group}),
                 "shared_eval": all(d.shared_eval for d in group)}
        for key in samples[group[0].name]:
            entry[key] = aggregate([samples[d.name][key][0] for d in group],
                                   [samples[d.name][key][1] for d in group], confidence)
        per_n.append(entry)
    return rows, per_n


def _cell(m: dict, pct: bool = False, sign: bool = False, spread: bool = False) -> str:
    if m.get("value") is None:
        return "n/a"
    scale, digits = (100.0, 1) if pct else (1.0, 3)
    fmt = (f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}") + ("%" if pct else "")
    text = fmt.format(m["value"] * scale)
    if m.get("ci_low") is not None:
        text += f" ({fmt.format(m['ci_low'] * scale)} to {fmt.format(m['ci_high'] * scale)})"
    if spread and m.get("draws", 0) > 1:
        text += f" [{fmt.format(m['min'] * scale)} to {fmt.format(m['max'] * scale)}]"
    return text


def markdown(per_n: list[dict], rows: list[dict]) -> str:
    """The per-N table (mean over draws, 95 % CI, [min to max of the draws]), then one row per model."""
    head = ("| N | draws | eval films | accuracy on the source | gain vs N=0 | auto-routed | accuracy of routed "
            "| routed wrongly | flagged OOD | test macro F1 | F1 change vs N=0 |")
    lines = [head, "|" + "---|" * 11]
    for e in per_n:
        films = "/".join(str(x) for x in e["eval_images"]) + ("" if e["shared_eval"] else " (rest)")
        lines.append(f"| {e['n']} | {e['draws']} | {films} | {_cell(e['accuracy'], True, spread=True)} "
                     f"| {_cell(e['gain'], True, True)} | {_cell(e['routed_share'], True, spread=True)} "
                     f"| {_cell(e['routed_accuracy'], True)} | {_cell(e['routed_wrong'], True)} "
                     f"| {_cell(e['ood_flagged'], True)} "
                     f"| {_cell(e['test_macro_f1'], spread=True)} | {_cell(e['test_f1_change'], sign=True)} |")
    lines += ["", "| model | N | eval films | threshold | accuracy on the source | auto-routed | accuracy of routed "
                  "| routed wrongly | flagged OOD | test macro F1 |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n']} | {r['eval_images']}{'' if r['shared_eval'] else ' (rest)'} "
                     f"| {r['threshold']:.4f} | {_cell(r['accuracy'], True)} | {_cell(r['routed_share'], True)} "
                     f"| {_cell(r['routed_accuracy'], True)} | {_cell(r['routed_wrong'], True)} "
                     f"| {_cell(r['ood_flagged'], True)} | {_cell(r['test_macro_f1'])} |")
    return "\n".join(lines) + "\n"


def plot(per_n: list[dict], rows: list[dict], path: Path, source: str) -> None:
    """Held-out accuracy, routed share and routed errors (left), test macro F1 (right) against N, 95 % CI bars,
    single draws as dots; an N evaluated on the rest of the evaluation set drawn hollow."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    offset = {"routed_share": 1.0, "routed_wrong": 2.0}  # side by side with the accuracy
    for ax, keys in ((left, (("accuracy", "accuracy", "tab:blue"), ("routed_share", "auto-routed", "tab:green"),
                             ("routed_wrong", "auto-routed with a wrong label", "tab:red"))),
                     (right, (("test_macro_f1", "test macro F1", "tab:purple"),))):
        for key, label, colour in keys:
            on_source = key != "test_macro_f1"  # the test split is the same for every N
            for shared in (True, False) if on_source else (True,):
                entries = [e for e in per_n if (e["shared_eval"] == shared or not on_source)
                           and e[key]["value"] is not None]
                if not entries:
                    continue
                x = np.array([e["n"] for e in entries], dtype=float)
                y = np.array([e[key]["value"] for e in entries])
                low = np.array([e[key]["ci_low"] if e[key]["ci_low"] is not None else e[key]["value"] for e in entries])
                high = np.array([e[key]["ci_high"] if e[key]["ci_high"] is not None else e[key]["value"]
                                 for e in entries])
                x = x + offset.get(key, 0.0)
                ax.errorbar(x, y, yerr=[y - low, high - y], fmt="o-" if shared else "o", color=colour, capsize=3,
                            mfc=colour if shared else "white",
                            label=label if shared else None)
            dots = [(r["n"] + offset.get(key, 0.0), r[key]["value"]) for r in rows
                    if r["n"] > 0 and r[key]["value"] is not None]
            if dots:
                ax.scatter(*zip(*dots), s=10, color=colour, alpha=0.4)
        ax.set_xlabel("N corrected images fine-tuned on")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    left.set_ylim(0, 1.02)
    left.set_title(f"{source}: held-out evaluation films (hollow: N > pool, the rest of them)", fontsize=10)
    right.set_title("regular test split (without the source)", fontsize=10)
    fig.suptitle("Fine-tuning on corrections: mean over draws, 95 % bootstrap CI; dots: single draws")
    fig.savefig(path, dpi=100)


def write(output: Path, summary: dict) -> None:
    flat_keys = ("accuracy", "gain", "routed_share", "routed_accuracy", "routed_wrong", "ood_flagged", "test_macro_f1",
                 "test_f1_change")
    (output / "adaptation.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    for name, entries, fixed in (("adaptation.csv", summary["per_n"], ("n", "draws", "shared_eval")),
                                 ("adaptation_runs.csv", summary["runs"],
                                  ("model", "n", "draw", "seed", "eval_images", "shared_eval", "threshold"))):
        with open(output / name, "w", newline="") as fh:
            writer = csv.writer(fh)
            extra = ("value", "ci_low", "ci_high") + (("min", "max") if name == "adaptation.csv" else ())
            writer.writerow([*fixed, *(f"{k}_{x}" for k in flat_keys for x in extra)])
            for e in entries:
                writer.writerow([e[f] for f in fixed] + [e[k].get(x) for k in flat_keys for x in extra])
    (output / "adaptation.md").write_text(markdown(summary["per_n"], summary["runs"]))
    plot(summary["per_n"], summary["runs"], output / "adaptation.png", summary["source_repo"])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/radiographs128",
                        help="prepared dataset holding every image, the held-out source included (data/radiographs128)")
    parser.add_argument("--manifest", default="../shared/radiographs/manifest.csv",
                        help="manifest.csv with file (relative to its folder) and source_repo columns "
                             "(../shared/radiographs/manifest.csv)")
    parser.add_argument("--source-repo", default="Znarfran/CADMA",
                        help="the manifest's source_repo to hold out and adapt to (Znarfran/CADMA)")
    parser.add_argument("--base-data", default=None,
                        help="where the copy of --data without the source goes (default: DATA-no-<repo name>)")
    parser.add_argument("--base-run", default=None,
                        help="a trained base run to reuse (trained on --base-data or another set without the "
                             "source); default: train one into OUTPUT/base, or reuse it if finished there")
    parser.add_argument("--recipe", default="small-data", help="training.py --recipe of the base model (small-data)")
    parser.add_argument("--n", type=int, nargs="+", default=[0, 10, 25, 50, 100],
                        help="numbers of corrected images to fine-tune on; 0 is the base model (0 10 25 50 100)")
    parser.add_argument("--draws", type=int, default=3, help="draws (fine-tunes) per N > 0 (3)")
    parser.add_argument("--eval-size", type=int, default=82,
                        help="held-out images in the fixed evaluation set; the rest is the pool (82)")
    parser.add_argument("--seed", type=int, default=42,
                        help="seeds the split, the draws (draw d: its own stream) and the fine-tunes "
                             "(training.py --seed SEED + d) (42)")
    parser.add_argument("--finetune-args", default="",
                        help="extra training.py flags for every fine-tune, one string (e.g. '--epochs 10')")
    parser.add_argument("--split", default="test", help="split of the base dataset that shows forgetting (test)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (1000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="level of the intervals (0.95)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size when scoring (32)")
    parser.add_argument("--output", default=None, help="output folder (default: runs/adaptation-<repo name>)")
    args = parser.parse_args(argv)
    if args.draws < 1 or any(n < 0 for n in args.n):
        parser.error("--draws must be >= 1 and every --n >= 0")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = parse_args(argv)
    from utils import config
    from utils.data import files as F
    from utils.evaluate.evaluation import eval_set

    started = time.perf_counter()
    slug = args.source_repo.split("/")[-1].lower()
    data = Path(args.data)
    output = Path(args.output or f"runs/adaptation-{slug}")
    output.mkdir(parents=True, exist_ok=True)
    labels = F.read_labels(data)
    manifest = pd.read_csv(args.manifest, dtype=str, keep_default_na=False)
    mask = held_out_mask(labels, manifest, args.source_repo, Path(args.manifest).parent)
    held = labels[mask].sort_values("path").reset_index(drop=True)
    spec = F.read_spec(data)
    log.info("%s: %d images held out (%s)", args.source_repo, len(held), held["label"].value_counts().to_dict())
    base_data = base_dataset(data, Path(args.base_data or f"{data}-no-{slug}"),
                             labels[~mask].reset_index(drop=True))

    seconds = {}
    base_run = Path(args.base_run) if args.base_run else output / "base"
    if not args.base_run:
        seconds["base"] = train(["--data", str(base_data), "--recipe", args.recipe], base_run,
                                output / "logs" / "base.log", finetune=False)
    check_no_leak(base_run, {str(Path(p).resolve()) for p in held["source_file"]})

    pool, evaluation = split_pool(len(held), args.eval_size, args.seed)
    plan, skipped = draw_plan(pool, evaluation, args.n, args.draws, args.seed)
    for n, reason in skipped.items():
        log.warning("skipped: %s", reason)
    held_paths = [str(data / p) for p in held["path"]]
    test = eval_set(base_data, args.split, spec)
    runs = {"base": base_run}
    scores = {"base": score(base_run, output / "scores" / "base.npz", held_paths, test, args.batch_size)}
    for draw in plan:
        if draw.n == 0:
            continue
        subset = write_subset(data, output / "sets" / draw.name, held.iloc[list(draw.train)].assign(split="train"))
        runs[draw.name] = output / "finetunes" / draw.name
        seconds[draw.name] = train(["--finetune", str(base_run), "--data", str(subset), "--seed", str(draw.seed),
                                    *args.finetune_args.split()], runs[draw.name],
                                   output / "logs" / f"{draw.name}.log", finetune=True)
        scores[draw.name] = score(runs[draw.name], output / "scores" / f"{draw.name}.npz", held_paths, test,
                                  args.batch_size)
    if 0 not in args.n:  # the gains are against the base model all the same
        plan = [Draw(0, 0, args.seed, (), tuple(int(i) for i in evaluation), True), *plan]
    held_y = held["label"].map({c: i for i, c in enumerate(spec.class_names)}).to_numpy()
    rows, per_n = evaluate_runs(plan, scores, held_y, test, len(spec.class_names), resamples=args.resamples,
                                seed=args.seed, confidence=args.confidence)
    for row in rows:
        recorded = train_seconds_of(runs[row["model"]])
        row["train_seconds"] = recorded
    summary = config.to_jsonable({
        "source_repo": args.source_repo, "held_out_images": len(held), "labels": held["label"].value_counts().to_dict(),
        "pool": len(pool), "eval_size": len(evaluation), "base_run": str(base_run), "base_data": str(base_data),
        "test_split": {"split": args.split, "images": len(test.labels)}, "skipped": skipped,
        "plan": [{**asdict(d), "name": d.name, "train_files": [held["path"][i] for i in d.train]} for d in plan],
        "runs": rows, "per_n": per_n, "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
        "train_wall_seconds_this_invocation": {k: round(v, 1) for k, v in seconds.items()},
        "bootstrap": {"method": "percentile", "resamples": args.resamples, "confidence": args.confidence,
                      "held_out_unit": "image", "test_unit": "group where groups repeat, else image",
                      "aggregate": "each resample averaged over the draws of an N (the range shows the draws)"},
        "command": " ".join(["python -m bench.adaptation", *(argv if argv is not None else sys.argv[1:])]),
        "environment": config.environment(), "settings": vars(args)})
    write(output, summary)
    print(markdown(per_n, rows))
    print(f"wrote adaptation.json/.csv/.md/.png to {output} ({summary['wall_seconds_this_invocation']:.0f} s)")
    return 0


def train_seconds_of(run_dir: Path) -> float | None:
    """config.json's train_seconds of a run (training and calibration, as training.py records them)."""
    from utils.artifacts import run_dir as R

    return R.read_config(run_dir).get("train_seconds") if (run_dir / R.CONFIG).is_file() else None


if __name__ == "__main__":
    sys.exit(main())
