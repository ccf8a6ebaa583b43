"""The out-of-distribution (OOD) score stored inside every model: is this image like the radiographs the
model was trained on at all?

A body-part classifier gives a confident body part to anything it is shown: a CT slice, an ultrasound
frame, a photo tagged DX. The header guard (utils.infer.decisions.not_projection) catches what is
tagged honestly; this score looks at the image itself. It is a Mahalanobis distance on the pooled
features the logits layer reads (models/head.py ``avg_pool``; Lee et al. 2018, "A simple unified
framework for detecting out-of-distribution samples"), with class-conditional means and one shared
covariance, computed in the span of the training features' leading principal components and shrunk
towards a scaled identity (Ledoit-Wolf), so that a few hundred training images give a usable
covariance:

    score(f) = min_k || A (f - mean) - c_k ||^2          A: (d, D) projection and whitening, c_k: class centres

``fit_detector`` fits it on the training split's features (at the end of training, or calibrate.py
for older models) and sets the threshold at a quantile of the scores of the validation split, which
the fit never saw, so that quantile is an honest estimate of the share of real radiographs flagged.
The method was chosen by measurement against the alternatives (the softmax confidence, energy, the
largest logit, k nearest neighbours on normalised features): bench/RESULTS.md, "Out-of-distribution
score". Images scoring above the threshold are ``uncertain`` with reason ``out_of_distribution``.

The detector is a JSON object in the model's metadata (key ``ood``, utils.artifacts.model_file), its
arrays as base64 float32, so every artifact format carries it: a predictor computes the score from
the features output (exports have two outputs, logits and features). Only NumPy is needed here.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils import constants

OUT_OF_DISTRIBUTION = "out_of_distribution"  # the reason of an image whose score is above the threshold
METHOD = "mahalanobis"
FEATURES = "avg_pool"  # the layer whose output the score reads (models/head.py)


def _pack(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array, dtype="<f4")
    return {"shape": list(array.shape), "float32_base64": base64.b64encode(array.tobytes()).decode("ascii")}


def _unpack(entry: Any, name: str) -> np.ndarray:
    if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list) \
            or not isinstance(entry.get("float32_base64"), str):
        raise ValueError(f"model metadata: ood.{name} must be {{shape, float32_base64}}")
    shape = entry["shape"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 20 for n in shape) or len(shape) > 2:
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


class Detector:
    """The unpacked detector: ``mean`` (D,), ``projection`` A (d, D), ``centres`` (K, d), ``threshold``."""

    def __init__(self, entry: dict[str, Any]) -> None:
        if not isinstance(entry, dict):
            raise ValueError("model metadata: 'ood' must be an object")
        if entry.get("method") != METHOD:
            raise ValueError(f"model metadata: ood.method {entry.get('method')!r} is not one this code knows "
                             f"({METHOD!r}); update the code to serve this model's OOD score")
        threshold = entry.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"model metadata: ood.threshold must be a finite number, not {threshold!r}")
        self.threshold = float(threshold)
        self.mean = _unpack(entry.get("mean"), "mean")
        self.projection = _unpack(entry.get("projection"), "projection")
        self.centres = _unpack(entry.get("centres"), "centres")
        if self.mean.ndim != 1 or self.projection.ndim != 2 or self.centres.ndim != 2 \
                or self.projection.shape[1] != self.mean.shape[0] or self.centres.shape[1] != self.projection.shape[0]:
            raise ValueError(f"model metadata: ood arrays do not fit together: mean {self.mean.shape}, projection "
                             f"{self.projection.shape}, centres {self.centres.shape}")

    @property
    def feature_size(self) -> int:
        return int(self.mean.shape[0])

    def scores(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_size:
            raise ValueError(f"features of shape {features.shape} for an OOD detector of {self.feature_size}")
        z = (features - self.mean) @ self.projection.T  # (N, d) whitened
        distances = ((z[:, None, :] - self.centres[None]) ** 2).sum(axis=2)  # (N, K)
        return distances.min(axis=1)


_CACHE: dict[int, tuple[dict, Detector]] = {}


def detector_of(entry: dict[str, Any]) -> Detector:
    """The unpacked detector of a metadata entry (unpacked once per entry object)."""
    cached = _CACHE.get(id(entry))
    if cached is not None and cached[0] is entry:
        return cached[1]
    detector = Detector(entry)
    _CACHE.clear()  # one model at a time in practice; never grows
    _CACHE[id(entry)] = (entry, detector)
    return detector


def check_detector(entry: dict[str, Any]) -> None:
    """ValueError when a metadata ``ood`` entry cannot be used (read_metadata calls it)."""
    Detector(entry)


def ood_score(entry: dict[str, Any], features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
    """The OOD score (N,) of pooled ``features`` (N, D); higher: less like the training radiographs."""
    del logits  # the chosen method reads the features only; kept in the signature for methods that mix both
    return detector_of(entry).scores(features)


def flagged(entry: dict[str, Any] | None, scores: np.ndarray | None) -> np.ndarray | None:
    """Boolean (N,): the scores above the detector's threshold; None without a detector or scores."""
    if entry is None or scores is None:
        return None
    return np.asarray(scores) > detector_of(entry).threshold


# --- Fitting ------------------------------------------------------------------------------------------


def _ledoit_wolf(centred: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf shrunk covariance of rows already centred (N, d)."""
    from sklearn.covariance import ledoit_wolf

    covariance, _ = ledoit_wolf(centred, assume_centered=True)
    return covariance


def fit_detector(train_features: np.ndarray, train_labels: Sequence[int], val_features: np.ndarray, *,
                 fitted_on: str, quantile: float = constants.OOD_QUANTILE,
                 components: int = constants.OOD_COMPONENTS) -> dict[str, Any]:
    """The metadata entry of a detector fitted on the training split's pooled features and labels
    (class indices), with its threshold at ``quantile`` of the validation split's scores."""
    x = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels, dtype=np.int64)
    v = np.asarray(val_features, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need (N, D) training features with N labels, N >= 2; got {x.shape} and {y.shape}")
    if v.ndim != 2 or v.shape[1] != x.shape[1] or len(v) == 0:
        raise ValueError(f"need (M, {x.shape[1]}) validation features, got {v.shape}")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    classes = np.unique(y)
    mean = x.mean(axis=0)
    # the leading principal components of the training features (at most N - 1 carry anything)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    keep = int(max(1, min(components, len(x) - 1, int((singular > singular[0] * 1e-6).sum()))))
    basis = vt[:keep]  # (d, D)
    z = (x - mean) @ basis.T
    centres = np.stack([z[y == k].mean(axis=0) for k in classes])
    within = z - centres[np.searchsorted(classes, y)]
    covariance = _ledoit_wolf(within)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-9)
    whitening = (eigenvectors / np.sqrt(eigenvalues)).T  # W with W^T W = covariance^-1
    projection = whitening @ basis
    entry = {"method": METHOD, "features": FEATURES, "threshold": 0.0, "components": keep,
             "mean": _pack(mean), "projection": _pack(projection), "centres": _pack(centres @ whitening.T)}
    detector = Detector(entry)  # the scores below use the float32 arrays every predictor will use
    val_scores = detector.scores(v)
    train_scores = detector.scores(x)
    threshold = float(np.quantile(val_scores, quantile))
    entry.update(threshold=threshold, quantile=quantile, fitted_on=fitted_on, n_train=int(len(x)),
                 n_val=int(len(v)), classes_fitted=[int(k) for k in classes],
                 val_flagged=float(np.mean(val_scores > threshold)),
                 train_flagged=float(np.mean(train_scores > threshold)),
                 val_scores={"median": float(np.median(val_scores)), "p90": float(np.quantile(val_scores, 0.9)),
                             "p99": float(np.quantile(val_scores, 0.99)), "max": float(val_scores.max())})
    return entry


def describe(entry: dict[str, Any] | None) -> str:
    """One line for logs and reports."""
    if not entry:
        return "no out-of-distribution score (run calibrate.py to fit one)"
    return (f"out-of-distribution score: {entry.get('method')} on {entry.get('components')} components of the pooled "
            f"features, threshold {entry.get('threshold', float('nan')):.4g} (the {100 * entry.get('quantile', 0):.1f}th "
            f"percentile of {entry.get('n_val', '?')} validation images; fitted on {entry.get('fitted_on', '?')})")
