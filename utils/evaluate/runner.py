"""The evaluation behind test.py: one model on a dataset, or a cross-validation's pooled
out-of-fold predictions, into every output (utils.evaluate.reports), the error gallery and the
refusal when too much of the data cannot be read (``CoverageError``)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from utils import config, constants
from utils.evaluate import evaluation, gallery, reports
from utils.io.isolation import PoolSettings

log = logging.getLogger(__name__)
GALLERY_LIMIT = 24  # most confident errors drawn in error_gallery.png


class CoverageError(Exception):
    """Too large a share of the listed files could not be read (or none could): no result is written."""


def evaluate_model(model_arg: str, data: str | None, settings: dict, output_dir: Path, *, progress: bool = True,
                   timing_runs: int = 50, ood_set: str | None = None) -> dict:
    """One model (run directory or artifact) on ``data`` (default: the data it was trained on):
    every output of test.py for it, or CoverageError when too much of the data cannot be read."""
    from utils.artifacts.run_dir import training_data
    from utils.infer.predictor import load_predictor

    info = load_predictor(model_arg)
    data = data or training_data(model_arg) or constants.DATA_DIR
    subset = evaluation.eval_set(data, settings["split"], info.spec)
    log.info("%s (%s): %d images from %s", model_arg, info.model_id, len(subset.files), subset.description)
    probs, ood_scores, ood_flags, kept, errors = evaluation.predict_with_ood(
        info, subset.files, cached=subset.cached, batch_size=settings["batch_size"], progress=progress,
        pool=PoolSettings.from_flags(settings), projection_only=settings.get("projection_only", True))
    for path, reason in subset.skipped + errors:
        log.warning("left out %s: %s", path, reason)
    coverage = evaluation.Coverage.of(subset, len(kept), errors, settings["max_skipped_share"])
    skipped_csv = reports.write_skipped_csv(output_dir, coverage.skipped)
    if coverage.too_many_skipped:
        for stale in reports.remove_evaluation_outputs(output_dir):
            log.warning("removed %s of an earlier evaluation", stale)
        raise CoverageError(coverage_error(coverage, data, skipped_csv))
    if coverage.skipped:
        log.warning("%d of %d listed images skipped (%s); the metrics cover the other %d: see %s",
                    len(coverage.skipped), coverage.listed, reports.reasons_text(coverage.by_reason),
                    coverage.evaluated, skipped_csv)
    timing = evaluation.time_inference(info, runs=timing_runs) if timing_runs else None
    groups = [subset.groups[i] for i in kept] if subset.groups is not None else None
    results = reports.write_evaluation(
        output_dir, y_true=subset.labels[kept], probs=probs, class_names=info.spec.class_names,
        files=[subset.files[i] for i in kept], groups=groups, n_resamples=settings["bootstrap_resamples"],
        confidence=settings["confidence_level"], seed=settings["seed"], unit=settings["bootstrap_unit"],
        model_id=info.model_id, split=subset.split, timing=timing,
        extra={"data": str(data), "source": subset.description, "backbone": info.backbone,
               "left_out": [{"file": f, "reason": r} for f, r in subset.skipped + errors]},
        coverage=coverage.to_dict(), stored_calibration=getattr(getattr(info, "metadata", None), "calibration", None),
        target_accuracy=settings["target_accuracy"], calibration_bins=settings["calibration_bins"])
    write_gallery(info, [subset.files[i] for i in kept], subset.cached, subset.labels[kept], probs, output_dir)
    results["ood"] = report_ood(info, ood_scores, ood_flags, subset.labels[kept], probs, settings, output_dir,
                                progress=progress, ood_set=ood_set)
    config.save_config({**settings, "model": model_arg, "data": str(data), "ood_set": ood_set},
                       output_dir / reports.CONFIG_FILENAME)
    return results


def report_ood(info, real_scores, real_flags, y_true, probs, settings: dict, output_dir: Path, *, progress: bool,
               ood_set: str | None) -> dict:
    """The out-of-distribution section (utils.evaluate.ood_eval): written to ood.json / ood.md (appended to
    results.md) / ood.csv, added to results.json, and returned."""
    import json

    from utils.evaluate import ood_eval

    metadata = getattr(info, "metadata", None)
    entry = getattr(metadata, "ood", None)
    recommended = getattr(metadata, "recommended_threshold", None)
    set_scores, set_flags, rows, reasons = None, None, [], []
    if ood_set and entry is not None and real_scores is not None:
        set_scores, set_flags, rows, reasons = ood_eval.evaluate_set(
            info, ood_set, batch_size=settings["batch_size"], pool=PoolSettings.from_flags(settings), progress=progress)
    elif ood_set:
        log.warning("--ood-set %s: the model has no out-of-distribution score to evaluate", ood_set)
    summary = ood_eval.summarise(entry, real_scores, y_true, probs, recommended["value"] if recommended else None,
                                 real_flags=real_flags, set_scores=set_scores, set_flags=set_flags, set_rows=rows,
                                 guard_reasons=reasons)
    ood_eval.write(output_dir, summary, rows)
    results_md = output_dir / reports.RESULTS_MD
    if results_md.is_file():
        results_md.write_text(results_md.read_text().rstrip("\n") + "\n\n" + ood_eval.markdown(summary))
    results_json = output_dir / reports.RESULTS_JSON
    if results_json.is_file():
        stored = json.loads(results_json.read_text())
        stored["ood"] = summary
        temporary = results_json.with_name(results_json.name + ".tmp")
        temporary.write_text(json.dumps(stored, indent=2, allow_nan=False) + "\n")
        temporary.replace(results_json)
    return summary


def write_gallery(predictor, files: list[str], cached: bool, y_true, probs, output_dir: Path) -> None:
    """error_gallery.png/.csv: the most confident errors with Grad-CAM (Keras models); the images are
    read again through the model's own preprocessing, only for the errors shown."""
    import cv2
    import numpy as np

    from utils.preprocessing import preprocess_file, to_model_input

    shown = gallery.select_errors(y_true, probs, GALLERY_LIMIT)
    if not len(shown):
        _remove_gallery(output_dir)
        return
    spec = predictor.spec
    images = [cv2.imread(files[i], cv2.IMREAD_GRAYSCALE) if cached else preprocess_file(files[i], spec)[0]
              for i in shown]
    path = gallery.error_gallery(predictor, [files[i] for i in shown], to_model_input(np.stack(images), spec.channels),
                                 np.asarray(y_true)[shown], np.asarray(probs)[shown], spec.class_names, output_dir,
                                 limit=GALLERY_LIMIT, positions=shown, totals=_totals(y_true, probs))
    if path is not None:
        log.info("wrote %s (%d errors shown)", path, len(shown))


def _remove_gallery(output_dir: Path) -> None:
    """No error: no gallery, and none left from an earlier evaluation."""
    for name in (gallery.GALLERY_PNG, gallery.GALLERY_CSV):
        (output_dir / name).unlink(missing_ok=True)


def _totals(y_true, probs) -> tuple[int, int]:
    """(errors, images) of a whole evaluation, for the gallery's title."""
    return len(gallery.select_errors(y_true, probs, None)), len(y_true)


def evaluate_cv(cv_dir: str, settings: dict, output_dir: Path) -> dict:
    """The pooled out-of-fold predictions of a cross-validation (training.py --folds K)."""
    from utils.artifacts import run_dir
    from utils.artifacts.model_file import read_metadata
    from utils.train.cross_validation import fold_spread, read_out_of_fold

    oof, skipped, cv = read_out_of_fold(cv_dir)
    names = list(read_metadata(run_dir.fold_dir(cv_dir, 0)).spec.class_names)
    y_true = oof["true_label"].map({c: i for i, c in enumerate(names)}).to_numpy()
    probs = oof[[f"prob_{c}" for c in names]].to_numpy(dtype=float)
    coverage = evaluation.Coverage(len(oof) + len(skipped), len(oof),
                                   [(str(f), *evaluation.split_reason(str(r))) for f, r in
                                    zip(skipped["file"], skipped["reason"])], settings["max_skipped_share"])
    skipped_csv = reports.write_skipped_csv(output_dir, coverage.skipped)
    if coverage.too_many_skipped:
        reports.remove_evaluation_outputs(output_dir)
        raise CoverageError(coverage_error(coverage, cv["config"]["data"], skipped_csv))
    folds = cv["folds"]
    log.info("%s: %d out-of-fold predictions from %d folds", cv_dir, len(oof), len(folds))
    results = reports.write_evaluation(
        output_dir, y_true=y_true, probs=probs, class_names=names, files=oof["file"].tolist(),
        groups=oof["group"].tolist(), n_resamples=settings["bootstrap_resamples"],
        confidence=settings["confidence_level"], seed=settings["seed"], unit=settings["bootstrap_unit"],
        model_id=f"{Path(cv_dir).name} ({len(folds)}-fold CV)", split="out-of-fold", timing=None,
        extra={"data": cv["config"]["data"], "source": f"{cv_dir} (pooled out-of-fold predictions)",
               "backbone": cv["config"]["backbone"],
               "cross_validation": {"folds": len(folds), "per_fold": folds,
                                    "macro_f1_spread": fold_spread(folds, "macro_f1"),
                                    "accuracy_spread": fold_spread(folds, "accuracy")}},
        coverage=coverage.to_dict(), target_accuracy=settings["target_accuracy"],
        calibration_bins=settings["calibration_bins"], stored_calibration=fold_calibration(oof, folds))
    write_cv_gallery(cv_dir, oof, y_true, probs, names, output_dir)
    config.save_config({**settings, "model": cv_dir}, output_dir / reports.CONFIG_FILENAME)
    return results


def write_cv_gallery(cv_dir: str, oof, y_true, probs, class_names, output_dir: Path) -> Path | None:
    """error_gallery.png/.csv of a cross-validation: the most confident out-of-fold errors, each with
    the Grad-CAM of the fold model that predicted it (the one that never saw its patient). The
    images are the prepared PNGs the fold models were fed; a fold whose model or images cannot be
    read leaves its panels without saliency (logged), never the evaluation."""
    import cv2
    import numpy as np

    from utils.artifacts import run_dir
    from utils.infer.predictor import load_predictor
    from utils.preprocessing import to_model_input

    shown = gallery.select_errors(y_true, probs, GALLERY_LIMIT)
    if not len(shown):
        _remove_gallery(output_dir)
        return None
    files = [str(oof["file"].iloc[i]) for i in shown]
    images = [cv2.imread(f, cv2.IMREAD_GRAYSCALE) for f in files]
    if any(image is None for image in images):
        missing = next(f for f, image in zip(files, images) if image is None)
        log.warning("no error gallery: cannot read %s (run test.py where the cross-validation's data is)", missing)
        return None
    probs_shown = np.asarray(probs)[shown]
    heatmaps, failed = {}, []
    folds = oof["fold"].to_numpy()[shown]
    for fold in sorted(set(folds.tolist())):
        positions = np.flatnonzero(folds == fold)
        try:
            predictor = load_predictor(str(run_dir.fold_dir(cv_dir, int(fold) - 1)))
            spec = predictor.spec
            batch = to_model_input(np.stack([images[i] for i in positions]), spec.channels)
            maps = gallery.grad_cam(gallery.keras_model_of(predictor), batch, probs_shown[positions].argmax(axis=1))
            heatmaps.update({int(i): m for i, m in zip(positions, maps)})
        except Exception as error:  # noqa: BLE001 - the gallery is worth having without a fold's maps
            log.warning("fold %s: no Grad-CAM in the error gallery (%s)", fold, error)
            failed.append(str(fold))
    note = f"no saliency for fold {', '.join(failed)}" if failed else None
    path = gallery.write_error_gallery(output_dir / gallery.GALLERY_PNG, np.stack(images), np.asarray(y_true)[shown],
                                       probs_shown, class_names, heatmaps=heatmaps, files=files, limit=GALLERY_LIMIT,
                                       note=note, positions=shown, totals=_totals(y_true, probs))
    if path is not None:
        log.info("wrote %s (%d out-of-fold errors shown, each with its fold model's Grad-CAM)", path, len(shown))
    return path


def fold_calibration(oof, folds: list[dict]) -> dict | None:
    """The calibration the fold models served with: their temperatures, and each image's own fold
    threshold (recommended on that fold's validation part), to judge it on held-out images."""
    if "threshold" not in oof:  # pooled before thresholds were recorded
        return None
    return {"temperature": [f.get("temperature") for f in folds],
            "threshold": {"value": oof["threshold"].to_numpy(dtype=float)}}


def coverage_error(coverage, data, skipped_csv: Path | None) -> str:
    """Why an evaluation is refused: counts, reasons, the threshold and how to allow it."""
    reasons = reports.reasons_text(coverage.by_reason)
    share, limit = coverage.skipped_share, coverage.max_skipped_share
    if coverage.evaluated == 0:
        head = f"none of the {coverage.listed} listed images in {data} could be read ({reasons})"
    else:
        head = (f"{len(coverage.skipped)} of {coverage.listed} listed images in {data} ({share:.1%}) could not "
                f"be read ({reasons}): more than the {limit:.1%} that --max-skipped-share {limit:g} allows, "
                f"so the metrics would cover only the other {coverage.evaluated}")
    tail = f"Each file and its reason: {skipped_csv}. " if skipped_csv else ""
    tail += "No results written. Fix or remove those files"
    if coverage.evaluated:
        allow = min(1.0, math.ceil(share * 1000) / 1000)
        tail += f", or accept metrics on part of the data with --max-skipped-share {allow:g}"
    return f"{head}. {tail}."
