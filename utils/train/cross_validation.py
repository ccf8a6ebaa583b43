"""K-fold cross-validation behind ``training.py --folds K``: one run per fold, pooled predictions.

Every labelled image of the prepared dataset (all its splits) is assigned to one of K folds,
grouped by patient and stratified by label (utils.data.split). The run of fold k trains on the
other folds but one, picks its best epoch (and fits its calibration) on that one (the next fold,
cyclically) and predicts fold k, which it has never seen. Pooled, these out-of-fold predictions
give every image one honest prediction: ``test.py CV_DIR`` reports metrics over all of them with
patient-level bootstrap CIs, and the spread between folds. The layout is utils.artifacts.run_dir's.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils import config
from utils.artifacts import run_dir as R
from utils.data import files as dataset_files
from utils.evaluate.metrics import classification_metrics

log = logging.getLogger(__name__)


class CrossValidationError(ValueError):
    """The cross-validation cannot start or continue as asked."""


def new_cv_dir(args, settings: dict[str, Any]) -> Path:
    if args.output:
        parent = Path(args.output)
        if R.is_cv_dir(parent) or R.is_run_dir(parent):
            raise CrossValidationError(f"{parent} already holds a run; use --resume {parent} or another --output")
    else:
        parent = R.default_dir(f"{settings['backbone']}-cv{settings['folds']}")
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def run(args, settings: dict[str, Any], train) -> Path:
    """Train every fold (``train(args, settings) -> run dir`` is utils.train.runner.train), then pool
    the out-of-fold predictions. ``args.resume`` naming a CV directory continues it: finished
    folds are kept, a stopped one is resumed, missing ones are trained with the saved settings."""
    if args.resume:
        parent = Path(args.resume)
        payload = R.read_cv(parent)
        saved = payload["config"]
        epochs = settings["epochs"] if "--epochs" in getattr(args, "given_flags", set()) else saved["epochs"]
        settings = {**saved, "epochs": max(epochs, saved["epochs"])}
    else:
        if not dataset_files.is_prepared(args.data):
            raise CrossValidationError(f"{args.data} is not a prepared dataset: run prepare.py first")
        parent = new_cv_dir(args, settings)
        settings = {**settings, "data": str(args.data)}
        payload = {"config": config.to_jsonable(settings), "command": list(sys.argv),
                   "environment": config.environment(), "folds": []}
        R.write_cv(parent, payload)
    count = int(settings["folds"])
    log.info("%d-fold cross-validation of %s into %s", count, settings["data"], parent)
    for index in range(count):
        fold_args = copy.copy(args)
        fold_args.output = str(R.fold_dir(parent, index))
        fold_args.data = settings["data"]
        fold_settings = {**settings, "fold": index}
        started = (R.fold_dir(parent, index) / R.LAST_MODEL).is_file()
        fold_args.resume = fold_args.output if started else None
        if started:  # continue it with its own saved settings (a longer --epochs only)
            fold_args.given_flags = {"--epochs"} if "--epochs" in getattr(args, "given_flags", set()) else set()
        log.info("fold %d of %d", index + 1, count)
        train(fold_args, fold_settings)
    summary = pool_predictions(parent, settings, progress=not getattr(args, "quiet", False))
    payload["config"] = config.to_jsonable(settings)
    payload["folds"] = summary
    R.write_cv(parent, payload)
    return parent


def held_out_folds(parent: str | Path, settings: dict[str, Any] | None = None):
    """Each fold's (index, its best model's predictor, the rows of the fold it never saw), in fold order.
    ``settings``: the cross-validation's (default: read from ``parent``'s cv.json)."""
    from utils.data.dataset import split_frame
    from utils.infer.predictor import load_predictor
    from utils.train.runner import run_fold

    settings = settings if settings is not None else R.read_cv(parent)["config"]
    for index in range(int(settings["folds"])):
        predictor = load_predictor(R.fold_dir(parent, index))
        frame = split_frame(settings["data"], "test", list(predictor.spec.class_names),
                            run_fold({**settings, "fold": index}))
        yield index, predictor, frame


def pool_predictions(parent: Path, settings: dict[str, Any], *, progress: bool = True) -> list[dict[str, Any]]:
    """Predict each fold's test part with that fold's best model; write oof_predictions.csv and
    oof_skipped.csv; return per-fold counts and metrics."""
    from utils.evaluate.evaluation import predict

    rows, skipped, summary = [], [], []
    for index, predictor, frame in held_out_folds(parent, settings):
        names = list(predictor.spec.class_names)
        probs, kept, errors = predict(predictor, frame["abs_path"].tolist(), cached=True,
                                      batch_size=int(settings["batch_size"]), progress=progress)
        part = frame.iloc[kept]
        predicted = probs.argmax(axis=1)
        calibration = getattr(predictor.metadata, "calibration", None) or {}
        temperature = calibration.get("temperature")
        threshold = (calibration.get("threshold") or {}).get("value")
        for (_, row), p, y_hat in zip(part.iterrows(), probs, predicted):
            rows.append({"file": row["abs_path"], "source_file": row.get("source_file", ""), "group": row["group"],
                         "fold": index + 1, "true_label": row["label"], "predicted_label": names[int(y_hat)],
                         "correct": row["label"] == names[int(y_hat)], "temperature": temperature,
                         "threshold": threshold, **{f"prob_{c}": float(v) for c, v in zip(names, p)}})
        skipped += [{"file": path, "fold": index + 1, "reason": reason} for path, reason in errors]
        point = classification_metrics(part["y"].to_numpy(), predicted, len(names)) if len(part) else None
        summary.append({"fold": index + 1, "listed": int(len(frame)), "evaluated": int(len(part)),
                        "skipped": len(errors), "groups": int(part["group"].nunique()),
                        "macro_f1": None if point is None else float(point["macro_f1"]),
                        "accuracy": None if point is None else float(point["accuracy"]),
                        "model_id": predictor.model_id, "temperature": temperature, "threshold": threshold,
                        "train_seconds": R.read_config(R.fold_dir(parent, index)).get("train_seconds")})
        log.info("fold %d: %d images predicted, %d skipped, macro F1 %s", index + 1, len(part), len(errors),
                 "n/a" if point is None else f"{point['macro_f1']:.3f}")
    dataset_files.write_csv(pd.DataFrame(rows), parent / R.OOF_PREDICTIONS)
    dataset_files.write_csv(pd.DataFrame(skipped, columns=["file", "fold", "reason"]), parent / R.OOF_SKIPPED)
    return summary


def read_out_of_fold(parent: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(out-of-fold predictions, skipped files, cv.json) of a finished cross-validation."""
    parent = Path(parent)
    if not (parent / R.OOF_PREDICTIONS).is_file():
        raise FileNotFoundError(f"{parent} has no {R.OOF_PREDICTIONS}: the cross-validation has not finished "
                                f"(continue it with python training.py --resume {parent})")
    predictions = pd.read_csv(parent / R.OOF_PREDICTIONS, dtype={"group": str, "true_label": str})
    skipped_path = parent / R.OOF_SKIPPED
    skipped = pd.read_csv(skipped_path) if skipped_path.is_file() else pd.DataFrame(columns=["file", "fold", "reason"])
    return predictions, skipped, R.read_cv(parent)


def fold_spread(per_fold: list[dict[str, Any]], key: str = "macro_f1") -> dict[str, float | None]:
    """Mean, standard deviation (ddof 1), min and max of one metric over the folds."""
    values = np.array([f[key] for f in per_fold if f.get(key) is not None], dtype=float)
    if not len(values):
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max())}
