"""The out-of-distribution (OOD) score stored inside every model: is this image like the radiographs the
model was trained on at all?

A body-part classifier gives a confident body part to anything it is shown: a CT slice, an ultrasound
frame, a photo tagged DX. The header guard (utils.infer.decisions.not_projection) catches what is
tagged honestly; this score looks at the image itself. It reads the stage statistics of the backbone
(models/features.py: the mean and standard deviation of every channel of each resolution stage) and
combines two detectors, each thresholded at ``quantile`` of the validation split's scores (images the
fit never saw, so the share of real radiographs flagged is estimated honestly):

- ``mahalanobis``: the Mahalanobis distance of the first stage's statistics to the nearest class
  centre of the training radiographs (class-conditional means, one shared covariance shrunk towards a
  scaled identity by Ledoit-Wolf, in the span of the leading principal components; Lee et al. 2018).
  Unsupervised: it needs nothing but the training images, and generalises to kinds of images nobody
  thought of. The first stage (texture, noise, contrast) separates far better than the pooled
  features the logits read (AUROC 0.99 against 0.81 on the project's evaluation set).
- ``learned`` (when negatives were given): a logistic regression on the log statistics of every stage,
  fitted on the training radiographs against synthetic non-radiographs the project generates
  (utils/evaluate/ood_set.py, with a seed of its own): CT, MR, ultrasound, nuclear medicine,
  documents, photos, photos of screens, colour images, fluoroscopy, masks.

The score is the larger of the two, each as a ratio to its own threshold (distance / threshold, and
exp(logit - threshold)), so the model's OOD threshold is 1: above it an image is ``uncertain`` with
reason ``out_of_distribution``. Chosen by measurement (bench/RESULTS.md, "Out-of-distribution score").

The detector is a JSON object in the model's metadata (key ``ood``, utils.artifacts.model_file), its
arrays as base64 float32, so every artifact format carries it; predictors compute the score from the
model's second output (the stage statistics). Only NumPy is needed to score; fitting uses scikit-learn.
"""

from __future__ import annotations

import base64
import logging
import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils import constants

log = logging.getLogger(__name__)

OUT_OF_DISTRIBUTION = "out_of_distribution"  # the reason of an image whose score is above the threshold
METHOD = "stage-statistics"
FEATURES = "ood_features"  # the model output the score reads (models/features.py)
THRESHOLD = 1.0  # the combined score's threshold: every part is scaled to 1 at its own threshold
LEARNED_C = 0.1  # inverse L2 strength of the learned part's logistic regression (chosen on the measurement)
_MAX_LOG_RATIO = 50.0  # exp() of the learned part's margin is capped (a score, not an overflow)


def _pack(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def _unpack(entry: Any, name: str) -> np.ndarray:
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) \
            or not isinstance(entry.get("float32_base64"), str):
        raise ValueError(f"model metadata: ood.{name} must be {{shape, float32_base64}}")
    shape = entry["shape"]
    if len(shape) > 2 or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 20 for n in shape):
        raise ValueError(f"model metadata: ood.{name} has a bad shape {shape!r}")
    try:
        raw = base64.b64decode(entry["float32_base64"], validate=True)
    except ValueError as error:
        raise ValueError(f"model metadata: ood.{name} is not base64 ({error})") from None
    if len(raw) != 4 * math.prod(shape):
        raise ValueError(f"model metadata: ood.{name} holds {len(raw)} bytes, not 4 x {shape}")
    array = np.frombuffer(raw, dtype="<f4").reshape(shape)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"model metadata: ood.{name} has values that are not finite")
    return array.astype(np.float64)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"model metadata: ood.{name} must be a finite number, not {value!r}")
    return float(value)


def _log_stats(features: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(features, 0.0))


class Detector:
    """The unpacked detector of a metadata entry; :meth:`scores` gives the combined score (N,)."""

    def __init__(self, entry: dict[str, Any]) -> None:
        if not isinstance(entry, dict):
            raise ValueError("model metadata: 'ood' must be an object")
        if entry.get("method") != METHOD:
            raise ValueError(f"model metadata: ood.method {entry.get('method')!r} is not one this code knows "
                             f"({METHOD!r}); update the code, or run calibrate.py again to refit it")
        blocks = entry.get("blocks")
        if not isinstance(blocks, list) or not blocks or not all(
                isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in blocks):
            raise ValueError(f"model metadata: ood.blocks must be a list of positive widths, not {blocks!r}")
        self.blocks = [int(b) for b in blocks]
        self.feature_size = sum(self.blocks)
        parts = entry.get("parts")
        if not isinstance(parts, dict) or "mahalanobis" not in parts:
            raise ValueError("model metadata: ood.parts must hold at least 'mahalanobis'")
        m = parts["mahalanobis"]
        if not isinstance(m, dict):
            raise ValueError("model metadata: ood.parts.mahalanobis must be an object")
        self.block = m.get("block", 0)
        if isinstance(self.block, bool) or not isinstance(self.block, int) or not 0 <= self.block < len(self.blocks):
            raise ValueError(f"model metadata: ood.parts.mahalanobis.block {self.block!r} is not a block index")
        self.mean = _unpack(m.get("mean"), "parts.mahalanobis.mean")
        self.projection = _unpack(m.get("projection"), "parts.mahalanobis.projection")
        self.centres = _unpack(m.get("centres"), "parts.mahalanobis.centres")
        self.distance_threshold = _number(m.get("threshold"), "parts.mahalanobis.threshold")
        width = self.blocks[self.block]
        if self.mean.shape != (width,) or self.projection.ndim != 2 or self.projection.shape[1] != width \
                or self.centres.ndim != 2 or self.centres.shape[1] != self.projection.shape[0]:
            raise ValueError(f"model metadata: ood.parts.mahalanobis arrays do not fit block {self.block} of width "
                             f"{width}: mean {self.mean.shape}, projection {self.projection.shape}, centres "
                             f"{self.centres.shape}")
        if self.distance_threshold <= 0:
            raise ValueError("model metadata: ood.parts.mahalanobis.threshold must be positive")
        self.learned = None
        if parts.get("learned") is not None:
            g = parts["learned"]
            if not isinstance(g, dict):
                raise ValueError("model metadata: ood.parts.learned must be an object")
            centre = _unpack(g.get("centre"), "parts.learned.centre")
            scale = _unpack(g.get("scale"), "parts.learned.scale")
            weights = _unpack(g.get("weights"), "parts.learned.weights")
            if not centre.shape == scale.shape == weights.shape == (self.feature_size,) or np.any(scale <= 0):
                raise ValueError(f"model metadata: ood.parts.learned arrays must be ({self.feature_size},) with a "
                                 f"positive scale")
            self.learned = (centre, scale, weights, _number(g.get("bias"), "parts.learned.bias"),
                            _number(g.get("threshold"), "parts.learned.threshold"))
        self.threshold = _number(entry.get("threshold", THRESHOLD), "threshold")

    def _block(self, features: np.ndarray, index: int) -> np.ndarray:
        start = sum(self.blocks[:index])
        return features[:, start:start + self.blocks[index]]

    def part_scores(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Each part's raw score (N,): the squared distance, the logistic regression's logit."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_size:
            raise ValueError(f"features of shape {features.shape} for an OOD detector of {self.feature_size}")
        z = (self._block(features, self.block) - self.mean) @ self.projection.T
        out = {"mahalanobis": ((z[:, None, :] - self.centres[None]) ** 2).sum(axis=2).min(axis=1)}
        if self.learned is not None:
            centre, scale, weights, bias, _ = self.learned
            out["learned"] = ((_log_stats(features) - centre) / scale) @ weights + bias
        return out

    def scores(self, features: np.ndarray) -> np.ndarray:
        parts = self.part_scores(features)
        score = parts["mahalanobis"] / self.distance_threshold
        if "learned" in parts:
            margin = np.minimum(parts["learned"] - self.learned[4], _MAX_LOG_RATIO)
            score = np.maximum(score, np.exp(margin))
        return score


_CACHE: dict[int, tuple[dict, Detector]] = {}
_CACHE_LOCK = threading.Lock()


def detector_of(entry: dict[str, Any]) -> Detector:
    """The unpacked detector of a metadata entry (unpacked once per entry object)."""
    with _CACHE_LOCK:
        cached = _CACHE.get(id(entry))
        if cached is not None and cached[0] is entry:
            return cached[1]
    detector = Detector(entry)
    with _CACHE_LOCK:
        if len(_CACHE) >= 4:  # a few models at a time at most (a reload, an export check)
            _CACHE.clear()
        _CACHE[id(entry)] = (entry, detector)
    return detector


def check_detector(entry: dict[str, Any]) -> None:
    """ValueError when a metadata ``ood`` entry cannot be used (read_metadata calls it)."""
    Detector(entry)


def ood_score(entry: dict[str, Any], features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
    """The OOD score (N,) of the stage statistics ``features`` (N, D); above 1 (the entry's ``threshold``):
    unlike the training radiographs."""
    del logits  # the score reads the features only; kept in the signature for methods that mix both
    return detector_of(entry).scores(features)


def flagged(entry: dict[str, Any] | None, scores: np.ndarray | None) -> np.ndarray | None:
    """Boolean (N,): the scores above the detector's threshold; None without a detector or scores."""
    if entry is None or scores is None:
        return None
    return np.asarray(scores) > detector_of(entry).threshold


# --- Fitting ------------------------------------------------------------------------------------------


def _mahalanobis_part(x: np.ndarray, y: np.ndarray, components: int) -> dict[str, Any]:
    """mean, projection (whitening in the leading principal components), class centres: unthresholded."""
    from sklearn.covariance import ledoit_wolf

    classes = np.unique(y)
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    useful = int((singular > singular[0] * 1e-6).sum()) if singular[0] > 0 else 0
    keep = max(1, min(components, len(x) - len(classes), useful))
    basis = vt[:keep]
    z = (x - mean) @ basis.T
    centres = np.stack([z[y == k].mean(axis=0) for k in classes])
    within = z - centres[np.searchsorted(classes, y)]
    covariance, _ = ledoit_wolf(within, assume_centered=True)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    floor = max(float(np.trace(covariance)) / keep * 1e-6, 1e-12)
    eigenvalues = np.maximum(eigenvalues, floor)
    whitening = (eigenvectors / np.sqrt(eigenvalues)).T
    return {"block": 0, "components": keep, "mean": _pack(mean), "projection": _pack(whitening @ basis),
            "centres": _pack(centres @ whitening.T), "threshold": 1.0}


def _learned_part(x: np.ndarray, negatives: np.ndarray) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    data = _log_stats(np.concatenate([x, negatives]))
    target = np.r_[np.zeros(len(x)), np.ones(len(negatives))]
    centre = data.mean(axis=0)
    scale = data.std(axis=0)
    scale = np.where(scale > 1e-6, scale, 1.0)
    model = LogisticRegression(C=LEARNED_C, max_iter=5000, class_weight="balanced")
    model.fit((data - centre) / scale, target)
    return {"centre": _pack(centre), "scale": _pack(scale), "weights": _pack(model.coef_[0]),
            "bias": float(model.intercept_[0]), "threshold": 0.0, "n_negatives": int(len(negatives))}


def fit_detector(train_features: np.ndarray, train_labels: Sequence[int], val_features: np.ndarray, *,
                 blocks: Sequence[int], fitted_on: str, negatives: np.ndarray | None = None,
                 negatives_from: str = "", quantile: float = constants.OOD_QUANTILE,
                 components: int = constants.OOD_COMPONENTS, num_classes: int | None = None) -> dict[str, Any]:
    """The metadata entry of a detector fitted on the training split's stage statistics and labels (class
    indices), and on ``negatives`` (stage statistics of images that are not radiographs) when given, each
    part thresholded at ``quantile`` of the validation split's scores. ValueError for data it cannot fit."""
    x = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels, dtype=np.int64)
    v = np.asarray(val_features, dtype=np.float64)
    blocks = [int(b) for b in blocks]
    if x.ndim != 2 or len(x) != len(y) or x.shape[1] != sum(blocks):
        raise ValueError(f"need (N, {sum(blocks)}) training features with N labels; got {x.shape} and {y.shape}")
    if v.ndim != 2 or v.shape[1] != x.shape[1] or len(v) == 0:
        raise ValueError(f"need (M, {x.shape[1]}) validation features, got {v.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(v))):
        raise ValueError("the features hold values that are not finite (a diverged model?)")
    classes = np.unique(y)
    if len(x) - len(classes) < 2:
        raise ValueError(f"{len(x)} training images in {len(classes)} classes are too few to fit a covariance")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    if num_classes is not None and len(classes) < num_classes:
        log.warning("out-of-distribution score: the training split has images of %d of the %d classes; images of "
                    "the others will look out of distribution", len(classes), num_classes)
    first = x[:, :blocks[0]]
    parts = {"mahalanobis": _mahalanobis_part(first, y, components)}
    if negatives is not None and len(negatives):
        n = np.asarray(negatives, dtype=np.float64)
        if n.ndim != 2 or n.shape[1] != x.shape[1] or not np.all(np.isfinite(n)):
            raise ValueError(f"need finite (K, {x.shape[1]}) negative features, got {n.shape}")
        parts["learned"] = {**_learned_part(x, n), "negatives_from": negatives_from}
    entry = {"method": METHOD, "features": FEATURES, "blocks": blocks, "threshold": THRESHOLD, "parts": parts}
    raw = Detector(entry).part_scores(v)  # the float32 arrays every predictor will use
    parts["mahalanobis"]["threshold"] = max(float(np.quantile(raw["mahalanobis"], quantile)), 1e-12)
    if "learned" in raw:
        parts["learned"]["threshold"] = float(np.quantile(raw["learned"], quantile))
    detector = Detector(entry)
    val_scores, train_scores = detector.scores(v), detector.scores(x)
    entry.update(quantile=quantile, fitted_on=fitted_on, n_train=int(len(x)), n_val=int(len(v)),
                 classes_fitted=[int(k) for k in classes],
                 val_flagged=float(np.mean(val_scores > THRESHOLD)),
                 train_flagged=float(np.mean(train_scores > THRESHOLD)),
                 val_scores={"median": float(np.median(val_scores)), "p90": float(np.quantile(val_scores, 0.9)),
                             "p99": float(np.quantile(val_scores, 0.99)), "max": float(val_scores.max())})
    if "learned" in raw:
        entry["negatives_flagged"] = float(np.mean(detector.scores(np.asarray(negatives)) > THRESHOLD))
    if entry["train_flagged"] > 3 * (1 - quantile) + 0.02:
        log.warning("out-of-distribution score: %.1f%% of the training images score above the threshold (expected "
                    "about %.1f%%): too few images for the features?", 100 * entry["train_flagged"],
                    100 * (1 - quantile))
    return entry


def describe(entry: dict[str, Any] | None) -> str:
    """One line for logs and reports."""
    if not entry:
        return "no out-of-distribution score (calibrate.py fits one; an export made before it needs re-exporting)"
    parts = entry.get("parts", {})
    learned = parts.get("learned")
    what = "Mahalanobis on the first stage" + (f" + a logistic regression against {learned.get('n_negatives')} "
                                               f"synthetic non-radiographs" if learned else "")
    return (f"out-of-distribution score: {what}; each part thresholded at the {100 * entry.get('quantile', 0):.1f}th "
            f"percentile of {entry.get('n_val', '?')} validation images ({100 * entry.get('val_flagged', 0):.1f}% "
            f"flagged there); fitted on {entry.get('fitted_on', '?')}")
