"""Confidence you can route on: temperature scaling, calibration error, and the routing threshold.

    T = fit_temperature(val_logits, val_labels)           # minimises the NLL of softmax(logits / T)
    probs = softmax(val_logits / T)
    ece, table = expected_calibration_error(probs, val_labels, bins=15)
    curve = risk_coverage(probs, val_labels)              # accuracy of the auto-routed share per threshold
    pick = recommend_threshold(probs, val_labels, 0.995)  # lowest threshold reaching 99.5 % on these data
    entry = calibrate_run("runs/x")                       # all of it on the val split, stored in best.keras

Temperature scaling (Guo et al., 2017) divides the model's logits by one number T > 0 fitted on
held-out data: T > 1 softens an over-confident model, T < 1 sharpens an under-confident one. The
argmax, hence accuracy and every label, is unchanged; only the confidences move, so that "0.97"
means right about 97 % of the time and a confidence threshold becomes a statement about accuracy.

The threshold rule (``recommend_threshold``). An image is routed automatically when its top
probability is >= the threshold (utils.infer.decisions.decide), else to review ("uncertain").
Sorting the images by confidence gives, for each threshold t, the share routed automatically
(coverage) and its accuracy. The recommendation is the LOWEST t (the largest coverage) whose
auto-routed share reaches ``target_accuracy`` on these data; its value is the confidence of the
least confident image it still routes. When no threshold reaches the target (the most confident
images are already wrong too often), the recommendation is ``value = 1.0`` with
``reachable = False``: review everything (only confidences of exactly 1.0 pass, what a float32
softmax gives for a saturated logit gap), since routing below the required accuracy is what the
target forbids; ``best`` then reports the threshold that maximises accuracy, for whoever wants to
choose a number knowingly. The threshold is picked on the data the temperature was fitted on, so
its coverage and accuracy are optimistic; check them on the test split (test.py).

Too few images to show the target (``enough_images``). An accuracy of ``target`` can only be told
apart from a worse one on at least ``min_images(target) = ceil(1 / (1 - target))`` auto-routed
images (200 at 0.995): on fewer, a single error already misses the target, so a clean record says
next to nothing. The recommendation then still reports what the threshold did on these data
(``routed_images`` of ``n_images``) but carries ``enough_images = False``, and the summary,
calibrate.py and ``--threshold auto`` (utils.infer.predictor.resolve_threshold) say that it is not
supported by the data. The typical case is the demo: 30 validation images, all right, the
temperature driven to its lower bound, every confidence exactly 1.0 (float32), so the threshold
1.0 routes all 30; that is what ``>=`` does on those 30 images, and no evidence for 99.5 %.
A target of 1.0 (no error allowed) has no such minimum.

Everything but ``calibrate_run`` / ``calibrate_after_training`` is NumPy (and SciPy's bounded 1-D
minimiser); those two load the model through utils.infer.predictor and read images like
utils.evaluate.evaluation does (TensorFlow is imported only when the model is a Keras one).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from utils import constants

log = logging.getLogger(__name__)

TEMPERATURE_BOUNDS = (0.05, 20.0)  # the search interval of fit_temperature
_EPS = 1e-12  # floor of a probability inside a logarithm


# --- the maths (NumPy / SciPy) ---------------------------------------------------------------


def _labels(labels: Any, n: int, k: int) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} predictions")
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must be class indices in [0, {k}), got {labels.min()}..{labels.max()}")
    return labels


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def nll(probs: Any, labels: Any) -> float:
    """Mean negative log-likelihood of the true classes (natural log; probabilities floored at 1e-12)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = _labels(labels, len(probs), probs.shape[1])
    if not len(probs):
        raise ValueError("nll of no predictions")
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(probs)), labels], _EPS))))


def nll_of_logits(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """``nll(softmax(logits / temperature), labels)``, computed stably in log space."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = _labels(labels, len(logits), logits.shape[1])
    if not len(logits):
        raise ValueError("nll of no predictions")
    return float(-np.mean(_log_softmax(logits / temperature)[np.arange(len(logits)), labels]))


def fit_temperature(logits: Any, labels: Any, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The temperature T in ``bounds`` that minimises the NLL of softmax(logits / T) on (logits, labels).

    A bounded 1-D search on log T (scipy.optimize.minimize_scalar): the NLL is convex in 1/T, so
    it has one minimum. ValueError for no data or non-finite logits."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or not len(logits):
        raise ValueError(f"fit_temperature needs logits of shape (N >= 1, K), got {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("fit_temperature: the logits contain NaN or infinity")
    labels = _labels(labels, len(logits), logits.shape[1])
    rows = np.arange(len(logits))

    def objective(log_t: float) -> float:
        return float(-np.mean(_log_softmax(logits / math.exp(log_t))[rows, labels]))

    low, high = math.log(bounds[0]), math.log(bounds[1])
    result = minimize_scalar(objective, bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    best, value = float(math.exp(result.x)), float(result.fun)
    # the bounded search never evaluates the end points themselves; a minimum beyond them is clipped there
    for edge, log_edge in zip(bounds, (low, high)):
        if objective(log_edge) < value:
            best, value = float(edge), objective(log_edge)
    return best


def _confidence_and_correct(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probabilities must have shape (N, K), got {probs.shape}")
    labels = _labels(labels, len(probs), probs.shape[1])
    return probs.max(axis=1), probs.argmax(axis=1) == labels


def expected_calibration_error(probs: Any, labels: Any, bins: int = constants.CALIBRATION_BINS
                               ) -> tuple[float, list[dict[str, Any]]]:
    """Top-label expected calibration error over ``bins`` equal-width confidence bins, and the table.

    Bin i holds confidences in [i/bins, (i+1)/bins) (the last one includes 1.0). ECE is the
    count-weighted mean of |accuracy - mean confidence| over the bins. Each table row:
    ``{"low", "high", "count", "confidence", "accuracy"}``, the last two None for an empty bin.
    ECE of no predictions is NaN."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence, correct = _confidence_and_correct(probs, labels)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    table, ece, n = [], 0.0, len(confidence)
    for i in range(bins):
        inside = index == i
        count = int(inside.sum())
        row = {"low": i / bins, "high": (i + 1) / bins, "count": count, "confidence": None, "accuracy": None}
        if count:
            row["confidence"] = float(confidence[inside].mean())
            row["accuracy"] = float(correct[inside].mean())
            ece += count / n * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return (float(ece) if n else float("nan")), table


class RiskCoverage(NamedTuple):
    """One point per distinct confidence, most confident first: routing automatically every image
    with confidence >= ``threshold[i]`` covers ``coverage[i]`` of the images at ``accuracy[i]``."""

    threshold: np.ndarray  # descending
    coverage: np.ndarray  # ascending, up to 1.0
    accuracy: np.ndarray  # of the auto-routed share


def risk_coverage(probs: Any, labels: Any) -> RiskCoverage:
    """The accuracy / coverage trade-off of a confidence threshold (ties share one point)."""
    confidence, correct = _confidence_and_correct(probs, labels)
    n = len(confidence)
    if not n:
        return RiskCoverage(np.zeros(0), np.zeros(0), np.zeros(0))
    order = np.argsort(-confidence, kind="stable")
    ranked = confidence[order]
    cumulative = np.cumsum(correct[order])
    ends = np.flatnonzero(np.r_[ranked[1:] != ranked[:-1], True])  # last index of each group of equal confidences
    routed = ends + 1
    return RiskCoverage(ranked[ends], routed / n, cumulative[ends] / routed)


def min_images(target_accuracy: float) -> int | None:
    """The fewest auto-routed images on which ``target_accuracy`` can be shown: on fewer than
    ``1 / (1 - target)`` one error already misses it (200 at 0.995, 20 at 0.95). None for a
    target of 1.0, which allows no error at all whatever the number."""
    if target_accuracy >= 1.0:
        return None
    return max(1, math.ceil(1.0 / (1.0 - target_accuracy) - 1e-9))


def recommend_threshold(probs: Any, labels: Any, target_accuracy: float = constants.TARGET_ACCURACY
                        ) -> dict[str, Any]:
    """The lowest confidence threshold whose auto-routed share reaches ``target_accuracy`` on these data.

    Returns ``{"target_accuracy", "value", "coverage", "accuracy", "reachable", "n_images",
    "routed_images", "min_images", "enough_images", "best"}``:
    ``value`` the threshold (the confidence of the least confident image it routes), ``coverage``
    the share of images it routes automatically (``routed_images`` of ``n_images``, by the router's
    rule ``confidence >= value``), ``accuracy`` their accuracy; ``enough_images`` False when
    ``routed_images`` < ``min_images`` (``min_images(target_accuracy)``): too few to show the target,
    see the module docstring. When the target is
    unreachable: ``value`` 1.0 (review everything), ``reachable`` False, coverage and accuracy of
    that 1.0; ``best`` always holds the threshold that maximises accuracy (the largest coverage
    among ties) with its coverage and accuracy. See the module docstring."""
    if not 0.0 < target_accuracy <= 1.0:
        raise ValueError(f"target_accuracy must be in (0, 1], got {target_accuracy}")
    confidence, correct = _confidence_and_correct(probs, labels)
    curve = risk_coverage(probs, labels)
    if not len(curve.threshold):
        raise ValueError("recommend_threshold needs at least one prediction")
    top = float(curve.accuracy.max())
    i_best = int(np.flatnonzero(curve.accuracy >= top)[-1])
    best = {"value": float(curve.threshold[i_best]), "coverage": float(curve.coverage[i_best]),
            "accuracy": float(curve.accuracy[i_best])}
    # tolerance: an accuracy that equals the target up to rounding (e.g. 199/200 vs 0.995) reaches it
    reaching = np.flatnonzero(curve.accuracy >= target_accuracy - 1e-12)
    out: dict[str, Any] = {"target_accuracy": float(target_accuracy), "n_images": len(confidence)}
    if len(reaching):
        i = int(reaching[-1])
        out.update(value=float(curve.threshold[i]), coverage=float(curve.coverage[i]),
                   accuracy=float(curve.accuracy[i]), reachable=True)
    else:
        routed = confidence >= 1.0
        out.update(value=1.0, coverage=float(routed.mean()),
                   accuracy=float(correct[routed].mean()) if routed.any() else None, reachable=False)
    routed_images = int(np.count_nonzero(confidence >= out["value"]))  # decisions.decide's rule
    needed = min_images(target_accuracy)
    out.update(routed_images=routed_images, min_images=needed,
               enough_images=needed is None or routed_images >= needed)
    out["best"] = best
    return out


# --- fitting a model's calibration and storing it with the model --------------------------------


@dataclass
class CalibrationResult:
    """What ``calibrate_run`` / ``calibrate_images`` found: the stored entry and the data behind it."""

    path: Path  # the file whose metadata now holds ``entry``
    entry: dict[str, Any]  # ModelMetadata.calibration, as stored
    labels: np.ndarray  # (N,) class indices of the images used
    logits: np.ndarray  # (N, K)
    probs_before: np.ndarray  # softmax(logits)
    probs_after: np.ndarray  # softmax(logits / T), as every predictor now returns them
    features: np.ndarray | None = None  # (N, D) pooled features (None: the model exposes none)
    ood: dict[str, Any] | None = None  # the out-of-distribution detector stored with it (utils.infer.ood), if fitted

    def summary(self) -> str:
        from utils.infer.ood import describe

        return self._temperature_summary() + "\n" + describe(self.ood)

    def _temperature_summary(self) -> str:
        e, t = self.entry, self.entry["threshold"]
        line = (f"temperature {e['temperature']:.3f} on {e['n_images']} images ({e['fitted_on']}): "
                f"NLL {e['nll_before']:.4f} -> {e['nll_after']:.4f}, ECE {e['ece_before']:.4f} -> {e['ece_after']:.4f}; ")
        if t["reachable"]:
            n = t.get("n_images", e["n_images"])
            routed = t.get("routed_images", round(t["coverage"] * n))
            line += (f"threshold {t['value']:.4f} routes {routed} of {n} images ({100 * t['coverage']:.1f}%) "
                     f"automatically at accuracy {t['accuracy']:.4f} (target {t['target_accuracy']})")
            if t.get("enough_images") is False:
                line += (f", but {routed} routed images are too few to show that accuracy (one error among fewer "
                         f"than {t['min_images']} already misses it): this threshold is not supported by these data; "
                         f"calibrate on a validation split with at least {t['min_images']} images before relying on "
                         f"--threshold auto")
            return line
        b = t["best"]
        return line + (f"target accuracy {t['target_accuracy']} is unreachable on these data: recommended threshold 1.0 "
                       f"(review everything); the best threshold, {b['value']:.4f}, gives accuracy {b['accuracy']:.4f} "
                       f"at coverage {100 * b['coverage']:.1f}%")


def calibration_entry(logits: Any, labels: Any, *, fitted_on: str, target_accuracy: float = constants.TARGET_ACCURACY,
                      bins: int = constants.CALIBRATION_BINS) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Fit T on (logits, labels) and describe it: (the ``calibration`` metadata entry, probabilities
    before, after). The probabilities come from utils.infer.predictor.probabilities, the function every
    predictor uses, so the recommended threshold is computed on exactly what serving will compare."""
    from utils.infer.predictor import probabilities

    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64)
    temperature = fit_temperature(logits, labels)
    if temperature in TEMPERATURE_BOUNDS:
        log.warning("calibration: the temperature reached the end of its search interval (%g): on %s the model is "
                    "%s; its confidences say little", temperature, fitted_on,
                    "right with a margin every time" if temperature == TEMPERATURE_BOUNDS[0]
                    else "no better than chance or confidently wrong")
    before, after = probabilities(logits, 1.0), probabilities(logits, temperature)
    ece_before, _ = expected_calibration_error(before, labels, bins)
    ece_after, _ = expected_calibration_error(after, labels, bins)
    entry = {"temperature": temperature, "fitted_on": fitted_on, "n_images": len(labels),
             "nll_before": nll(before, labels), "nll_after": nll(after, labels),
             "ece_before": ece_before, "ece_after": ece_after, "bins": int(bins),
             "threshold": recommend_threshold(after, labels, target_accuracy), "reference": reference_entry(after)}
    return entry, before, after


def reference_entry(probabilities: Any, *, quantiles: int = 21) -> dict[str, Any]:
    """The validation set's distribution as the model serves it (after the temperature), for the router's drift
    windows (utils/routing/operations/drift.py): the share of each top label, quantiles of the confidence."""
    probs = np.asarray(probabilities, dtype=np.float64)
    top = probs.argmax(axis=1)
    shares = np.bincount(top, minlength=probs.shape[1]) / max(1, len(top))
    confidence = probs.max(axis=1)
    return {"n_images": int(len(probs)), "top_label_shares": [round(float(s), 6) for s in shares],
            "confidence_quantiles": [round(float(v), 6)
                                     for v in np.quantile(confidence, np.linspace(0.0, 1.0, quantiles))]}


def calibrate_images(model_path: str | os.PathLike, files: Sequence[str], labels: Any, *, fitted_on: str,
                     cached: bool = True, target_accuracy: float = constants.TARGET_ACCURACY,
                     bins: int = constants.CALIBRATION_BINS, batch_size: int = 32, predictor=None
                     ) -> CalibrationResult:
    """Calibrate the model at ``model_path`` on these images and store the result in its metadata.

    ``files`` are prepared PNGs at the model's spec (``cached``) or source files (decoded with the
    model's spec in isolated workers); ``labels`` their class indices. Unreadable files are left
    out (logged). The entry replaces any earlier calibration, inside the .keras archive (a run
    directory: its best.keras; rewritten atomically) or an export's metadata (sidecar, and the
    copy embedded in an .onnx file). ValueError when no image could be read."""
    from utils.artifacts.model_file import read_metadata, write_metadata
    from utils.infer.predictor import load_predictor

    predictor = predictor if predictor is not None else load_predictor(model_path)
    labels = np.asarray(labels).astype(np.int64)
    if len(files) != len(labels):
        raise ValueError(f"{len(files)} files for {len(labels)} labels")
    if not len(files):
        raise ValueError(f"no images to calibrate on ({fitted_on})")
    logits, features, kept = model_outputs(predictor, files, cached=cached, batch_size=batch_size, what="calibration")
    labels = labels[kept]
    entry, before, after = calibration_entry(logits, labels, fitted_on=fitted_on, target_accuracy=target_accuracy,
                                             bins=bins)
    metadata = read_metadata(model_path)
    written = write_metadata(model_path, metadata.replace(calibration=entry))
    return CalibrationResult(written, entry, labels, logits, before, after, features)


def model_outputs(predictor, files: Sequence[str], *, cached: bool, batch_size: int = 32, what: str = "calibration"
                  ) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """(logits (M, K), pooled features (M, D) or None, the indices of the M readable files) of ``files``;
    unreadable files are left out (logged); ValueError when none is readable."""
    from utils.evaluate.evaluation import iter_batches

    logits, features, kept, errors = [], [], [], []
    for batch, indices, failed in iter_batches(list(files), predictor.spec, cached=cached, batch_size=batch_size):
        if batch is not None:
            out = predictor.outputs(batch) if hasattr(predictor, "outputs") else (predictor.logits(batch), None)
            logits.append(out[0])
            features.append(out[1])
            kept += indices
        errors += failed
    if errors:
        log.warning("%s: %d of %d images could not be read and were left out (e.g. %s)", what, len(errors),
                    len(files), errors[0][1])
    if not kept:
        raise ValueError(f"no readable image for {what}")
    pooled = None if any(f is None for f in features) else np.concatenate(features)
    return np.concatenate(logits), pooled, kept


NO_FEATURES = ("out-of-distribution score: %s exposes no stage statistics (a model not built by models/registry.py, "
               "or an export made before the score existed: fit it on the .keras file and export again)")
NEGATIVES_SEED = 1_000_003  # the synthetic non-radiographs the OOD score learns from (evaluation sets use seed 0)


def synthetic_negatives(predictor, *, per_kind: int | None = None, batch_size: int = 32
                        ) -> tuple[np.ndarray | None, str]:
    """The model's stage statistics of synthetic images that are not radiographs (utils/evaluate/ood_set.py,
    its synthetic kinds, one copy of each, seed NEGATIVES_SEED), decoded by the model's own reader and
    spec; (features or None, a description)."""
    import tempfile

    from utils.evaluate import ood_set

    per_kind = constants.OOD_NEGATIVES_PER_KIND if per_kind is None else per_kind  # read now: tests lower it
    if per_kind <= 0:
        return None, ""
    with tempfile.TemporaryDirectory(prefix="ood-negatives-") as folder:
        manifest = ood_set.write_ood_set(folder, seed=NEGATIVES_SEED, per_kind=per_kind,
                                         kinds=tuple(ood_set.SYNTHETIC_KINDS), retagged_copies=False)
        files = [str(Path(folder) / p) for p in manifest["path"]]
        _, features, _ = model_outputs(predictor, files, cached=False, batch_size=batch_size,
                                       what="out-of-distribution negatives")
    return features, (f"{len(files)} synthetic non-radiographs ({', '.join(ood_set.SYNTHETIC_KINDS)}; "
                      f"utils/evaluate/ood_set.py seed {NEGATIVES_SEED})")


def feature_blocks(predictor) -> list[int] | None:
    """The widths of the blocks of the predictor's features output: from its Keras model, else from a
    detector its metadata already carries (an export)."""
    model = getattr(predictor, "model", None)
    if model is not None:
        from models.features import stage_sizes

        return stage_sizes(model)
    ood = getattr(getattr(predictor, "metadata", None), "ood", None)
    return list(ood["blocks"]) if isinstance(ood, dict) and isinstance(ood.get("blocks"), list) else None


def _fit_detector_on(predictor, train_files: Sequence[str], train_labels: Any, val_features: np.ndarray, *,
                     cached: bool, blocks: Sequence[int], fitted_on: str, quantile: float, components: int,
                     negatives_per_kind: int | None, batch_size: int) -> dict[str, Any]:
    """The detector entry fitted on ``predictor``'s features of the training images and of the synthetic
    negatives, thresholded on ``val_features`` (fit_ood for a model, refit_ood for an int8 export)."""
    from utils.infer.ood import fit_detector

    train_labels = np.asarray(train_labels).astype(np.int64)
    _, features, kept = model_outputs(predictor, train_files, cached=cached, batch_size=batch_size,
                                      what="out-of-distribution fit")
    if features is None:
        raise ValueError("the model has no features output")
    negatives, described = synthetic_negatives(predictor, per_kind=negatives_per_kind, batch_size=batch_size)
    return fit_detector(features, train_labels[kept], val_features, blocks=blocks, fitted_on=fitted_on,
                        negatives=negatives, negatives_from=described, quantile=quantile, components=components,
                        num_classes=len(predictor.spec.class_names))


def fit_ood(model_path: str | os.PathLike, result: CalibrationResult, train_files: Sequence[str], train_labels: Any,
            *, fitted_on: str, cached: bool = True, quantile: float = constants.OOD_QUANTILE,
            components: int = constants.OOD_COMPONENTS, negatives_per_kind: int | None = None,
            batch_size: int = 32, predictor=None) -> dict[str, Any] | None:
    """Fit the out-of-distribution detector (utils.infer.ood) on the training images' stage statistics and
    synthetic non-radiographs, threshold it on the calibration images' (``result``: the held-out split
    calibrate_images just used), and store it in the model's metadata next to the calibration. None,
    logged, when the model exposes no features (a .keras file from elsewhere, an export made before
    the score existed)."""
    from utils.artifacts.model_file import read_metadata, write_metadata
    from utils.infer.ood import describe
    from utils.infer.predictor import load_predictor

    predictor = predictor if predictor is not None else load_predictor(model_path)
    blocks = feature_blocks(predictor)
    if result.features is None or not blocks:
        log.warning(NO_FEATURES, model_path)
        return None
    entry = _fit_detector_on(predictor, train_files, train_labels, result.features, cached=cached, blocks=blocks,
                             fitted_on=fitted_on, quantile=quantile, components=components,
                             negatives_per_kind=negatives_per_kind, batch_size=batch_size)
    write_metadata(model_path, read_metadata(model_path).replace(ood=entry))
    result.ood = entry
    log.info("%s", describe(entry))
    return entry


def calibrate_run(model_path: str | os.PathLike, data_dir: str | os.PathLike | None = None, split: str = "val", *,
                  target_accuracy: float = constants.TARGET_ACCURACY, bins: int = constants.CALIBRATION_BINS,
                  batch_size: int = 32, ood: bool = True, ood_quantile: float = constants.OOD_QUANTILE,
                  ood_components: int = constants.OOD_COMPONENTS,
                  ood_negatives_per_kind: int | None = None) -> CalibrationResult:
    """Fit the temperature of a model (a run directory -> its best.keras, a .keras file, or an
    export) on one split of a dataset, recommend the threshold for ``target_accuracy``, and store
    both in the model's metadata. ``data_dir``: a prepared dataset (its cached PNGs when they match
    the model's spec), a CSV or a folder per class, as test.py's ``--data``; default: the dataset
    the run was trained on (its config.json). ValueError for an empty or unusable split. With ``ood``, the
    out-of-distribution detector is fitted too: on the dataset's train split, thresholded on ``split``."""
    from utils.artifacts.model_file import artifact_format, resolve_model_path
    from utils.artifacts.run_dir import training_data
    from utils.evaluate.evaluation import eval_set
    from utils.infer.predictor import load_predictor

    if data_dir is None:
        source = resolve_model_path(model_path) if artifact_format(model_path) == "keras" else Path(model_path)
        data_dir = training_data(source)
        if data_dir is None or not Path(data_dir).exists():
            raise ValueError(f"{model_path}: the dataset it was trained on is unknown or gone; pass the data "
                             f"to calibrate on (--data)")
    predictor = load_predictor(model_path)
    subset = eval_set(data_dir, split, predictor.spec)
    for path, reason in subset.skipped:
        log.warning("calibration: %s left out (%s)", path, reason)
    result = calibrate_images(model_path, subset.files, subset.labels, fitted_on=f"{data_dir} split={split}",
                              cached=subset.cached, target_accuracy=target_accuracy, bins=bins,
                              batch_size=batch_size, predictor=predictor)
    if ood:
        _fit_ood_on_splits(model_path, result, data_dir, split, subset, predictor, quantile=ood_quantile,
                           components=ood_components, negatives_per_kind=ood_negatives_per_kind,
                           batch_size=batch_size)
    return result


def _fit_ood_on_splits(model_path, result: CalibrationResult, data_dir, split: str, subset, predictor, *,
                       quantile: float, components: int, negatives_per_kind: int | None, batch_size: int) -> None:
    """calibrate.py's OOD fit: on the train split, thresholded on ``split``; skipped (logged, the calibration
    stays) when the data have no separate train split or it cannot be fitted."""
    from utils.evaluate.evaluation import eval_set

    if result.features is None:
        log.warning(NO_FEATURES, model_path)
        return
    if split == "train" or subset.split == "all":
        log.warning("out-of-distribution score not fitted: %s has no training images apart from the %s images "
                    "its threshold is set on (a prepared dataset with train and val splits is needed); the "
                    "calibration is stored", data_dir, "train" if split == "train" else "listed")
        return
    try:
        train = eval_set(data_dir, "train", predictor.spec)
        fit_ood(model_path, result, train.files, train.labels, fitted_on=f"{data_dir} split=train",
                cached=train.cached, quantile=quantile, components=components,
                negatives_per_kind=negatives_per_kind, batch_size=batch_size, predictor=predictor)
    except ValueError as error:
        log.warning("out-of-distribution score not fitted (%s); the calibration is stored", error)


def refit_ood(predictor, data_dir: str | os.PathLike, source: dict[str, Any], *, batch_size: int = 32
              ) -> dict[str, Any]:
    """The OOD detector ``source`` (a model's entry) fitted again on ``predictor``'s own features, with the
    same settings, on the dataset's train split and thresholded on its val split: for an int8 export,
    whose quantised stage statistics differ from the float model's (export.py)."""
    from utils.evaluate.evaluation import eval_set

    spec = predictor.spec
    train, val = eval_set(data_dir, "train", spec), eval_set(data_dir, "val", spec)
    if train.split == "all":
        raise ValueError(f"{data_dir} has no train and val splits to fit the OOD score on")
    _, val_features, _ = model_outputs(predictor, val.files, cached=val.cached, batch_size=batch_size,
                                       what="out-of-distribution threshold")
    if val_features is None:
        raise ValueError("the artifact has no features output")
    learned = source.get("parts", {}).get("learned") or {}
    return _fit_detector_on(
        predictor, train.files, train.labels, val_features, cached=train.cached, blocks=source["blocks"],
        fitted_on=f"{data_dir} split=train ({getattr(predictor, 'quantization', '') or 'export'} features)",
        quantile=float(source.get("quantile", constants.OOD_QUANTILE)),
        components=int(source["parts"]["mahalanobis"].get("components", constants.OOD_COMPONENTS)),
        negatives_per_kind=-(-int(learned.get("n_negatives", 0)) // 10),  # the 10 synthetic kinds, rounded up
        batch_size=batch_size)


def calibrate_after_training(run_dir: str | os.PathLike, data_dir: str | os.PathLike, val_rows: Any,
                             target_accuracy: float = constants.TARGET_ACCURACY, train_rows: Any = None,
                             ood_quantile: float = constants.OOD_QUANTILE,
                             ood_components: int = constants.OOD_COMPONENTS) -> CalibrationResult | None:
    """The last step of a completed training run: calibrate its best.keras on the validation images
    the run used (``val_rows``: the run's rows with ``abs_path`` and ``y``) and, given ``train_rows``, fit
    its out-of-distribution detector on them. Never fails the run: a missing or unusable validation
    split is a logged warning, and calibrate.py can do it later."""
    try:
        if val_rows is None or len(val_rows) == 0:
            raise ValueError("the validation split is empty")
        result = calibrate_images(run_dir, list(val_rows["abs_path"]), np.asarray(val_rows["y"]),
                                  fitted_on=f"{data_dir} split=val", cached=True, target_accuracy=target_accuracy)
    except Exception as error:  # noqa: BLE001 - the run is complete and saved; calibration must not fail it
        log.warning("calibration skipped (%s); run `python calibrate.py %s --data DIR` to calibrate it later",
                    error, run_dir)
        return None
    if train_rows is not None and len(train_rows):
        try:
            fit_ood(run_dir, result, list(train_rows["abs_path"]), np.asarray(train_rows["y"]),
                    fitted_on=f"{data_dir} split=train", cached=True, quantile=ood_quantile,
                    components=ood_components)
        except Exception as error:  # noqa: BLE001 - as above: the calibration is stored, the run complete
            log.warning("out-of-distribution score not fitted (%s); the calibration is stored; run `python "
                        "calibrate.py %s` to try again", error, run_dir)
    log.info("calibration: %s", result.summary())
    return result
