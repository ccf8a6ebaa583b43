"""Classification metrics and bootstrap confidence intervals, as pure functions on numpy arrays.

Semantics follow scikit-learn, which the paper's evaluation code used:

* Macro precision / recall / F1 are ``precision_recall_fscore_support(y_true, y_pred,
  average="macro", zero_division=0)``: the average runs over the labels present in ``y_true``
  OR ``y_pred`` (sklearn's default ``labels``), not over all ``num_classes``. A class that is
  neither in the ground truth nor predicted does not pull the macro average down.
* Per-class values are reported for all ``num_classes`` classes. Where a ratio is undefined
  (no prediction of the class for precision, no true image for recall, neither for F1) it is
  ``0.0``, exactly sklearn's ``zero_division=0``; ``support == 0`` tells an absent class apart.
  0.0 rather than NaN keeps the per-class table consistent with the macro average (the macro
  value is the mean of the per-class values over the present labels) and keeps JSON free of NaN.
* F1 is ``2 tp / (2 tp + fp + fn)``, which equals the harmonic mean wherever that is defined.

Bootstrap CIs use the percentile method on ``n_resamples`` resamples. All resamples are built at
once: a ``(B, N)`` matrix of multiplicities (how often each image is drawn) times a one-hot
``(N, K*K)`` matrix of (true, pred) codes gives the ``B`` confusion matrices, and the metrics are
computed from the ``(B, K, K)`` stack with array operations, with the same label-presence rule
per resample as ``classification_metrics``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

METRIC_NAMES: tuple[str, ...] = ("accuracy", "macro_precision", "macro_recall", "macro_f1")
BOOTSTRAP_UNITS: tuple[str, ...] = ("auto", "group", "image")

# Rows of resamples turned into confusion matrices per step; bounds temporary memory
# (about _CHUNK * N * 8 bytes) without costing speed.
_CHUNK = 1024


# --- Validation -----------------------------------------------------------------------------
def _labels(y: Any, num_classes: int, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} holds labels outside [0, {num_classes}): {np.unique(arr)}")
    return arr


def _pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    t = _labels(y_true, num_classes, "y_true")
    p = _labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if t.size == 0:
        raise ValueError("no samples: y_true is empty")
    return t, p


# --- Point estimates ------------------------------------------------------------------------
def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts; rows are true classes, columns predicted classes."""
    t, p = _pair(y_true, y_pred, num_classes)
    k = int(num_classes)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0.0 where den == 0 (sklearn's zero_division=0), without warnings."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _metrics_from_confusion(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics of a (B, K, K) stack of confusion matrices, each of shape (B,) or (B, K).

    Shared by ``classification_metrics`` (B = 1) and the bootstrap, so both have one semantics.
    """
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=1, axis2=2)  # (B, K)
    true_count = cms.sum(axis=2)  # row sums: support
    pred_count = cms.sum(axis=1)  # column sums
    precision = _safe_div(tp, pred_count)
    recall = _safe_div(tp, true_count)
    f1 = _safe_div(2.0 * tp, true_count + pred_count)  # 2tp / (2tp + fp + fn)
    present = (true_count + pred_count) > 0  # label in y_true or y_pred
    n_present = present.sum(axis=1)  # >= 1 for any non-empty resample

    def macro(x: np.ndarray) -> np.ndarray:
        return _safe_div(np.where(present, x, 0.0).sum(axis=1), n_present)

    return {
        "accuracy": _safe_div(tp.sum(axis=1), true_count.sum(axis=1)),
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": true_count,
        "present": present,
    }


def classification_metrics(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and a per-class table.

    Macro averages are sklearn's ``precision_recall_fscore_support(average="macro",
    zero_division=0)``: the mean over the labels present in ``y_true`` or ``y_pred`` (the paper's
    sklearn code computed exactly this). Per-class entries cover all ``num_classes`` classes;
    an undefined ratio is 0.0 (zero_division=0) and an absent class has ``support`` 0.

    Returns a dict with floats ``accuracy``, ``macro_precision``, ``macro_recall``,
    ``macro_f1``; arrays of length K ``precision``, ``recall``, ``f1`` (float) and ``support``
    (int); ``macro_labels`` (the class indices the macro average ran over) and
    ``confusion_matrix`` (K, K).
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    m = _metrics_from_confusion(cm[None])
    out: dict[str, Any] = {name: float(m[name][0]) for name in METRIC_NAMES}
    for name in ("precision", "recall", "f1"):
        out[name] = m[name][0]
    out["support"] = m["support"][0].astype(np.int64)
    out["macro_labels"] = np.flatnonzero(m["present"][0])
    out["confusion_matrix"] = cm
    return out


# --- Bootstrap ------------------------------------------------------------------------------
def resolve_bootstrap_unit(groups: Any, unit: str = "auto") -> str:
    """Resolve ``unit`` ("auto" | "group" | "image") to "group" or "image".

    "auto" resamples groups (patients) when ``groups`` is given and at least two images share a
    group, because images of one patient are correlated and an image bootstrap then gives CIs
    that are too narrow; otherwise "image" (with all-unique groups both are the same thing).
    "group" without ``groups`` is an error.
    """
    if unit not in BOOTSTRAP_UNITS:
        raise ValueError(f"unit must be one of {BOOTSTRAP_UNITS}, got {unit!r}")
    if unit == "image":
        return "image"
    if groups is None:
        if unit == "group":
            raise ValueError('unit="group" needs groups (e.g. one patient id per image)')
        return "image"
    if unit == "group":
        return "group"
    g = np.asarray(groups)
    return "group" if np.unique(g).size < g.size else "image"


def draw_bootstrap_weights(
    n: int, groups: Any, n_resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """(n_resamples, n) int32 multiplicities: how often each image is in each resample.

    Without ``groups`` each row is an ordinary bootstrap of the n images (n draws with
    replacement). With ``groups`` (one label per image) it is the cluster bootstrap: the G
    distinct groups are drawn G times with replacement and every drawn group brings all of its
    images, so images of one group always share a multiplicity and a resample holds a varying
    number of images. The caller decides the unit: pass ``groups=None`` for an image bootstrap.
    """
    n, b = int(n), int(n_resamples)
    if n < 1 or b < 0:
        raise ValueError(f"need n >= 1 and n_resamples >= 0, got n={n}, n_resamples={b}")
    if groups is None:
        inverse, units = None, n
    else:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"groups must have one entry per image ({n}), got shape {g.shape}")
        _, inverse = np.unique(g, return_inverse=True)
        inverse = inverse.reshape(-1)
        units = int(inverse.max()) + 1
    draws = rng.integers(0, units, size=(b, units), dtype=np.int32)
    counts = np.empty((b, units), dtype=np.int32)
    for s in range(0, b, _CHUNK):  # per-row bincount via offsets, in bounded-memory chunks
        rows = draws[s : s + _CHUNK]
        offsets = rows + (np.arange(rows.shape[0], dtype=np.int64)[:, None] * units)
        counts[s : s + _CHUNK] = np.bincount(offsets.ravel(), minlength=rows.size).reshape(
            rows.shape
        )
    return counts if inverse is None else counts[:, inverse]


def bootstrap_confusion_matrices(
    y_true: Any, y_pred: Any, num_classes: int, weights: np.ndarray
) -> np.ndarray:
    """(B, K, K) float64 confusion matrices of the resamples given by ``weights`` (B, N)."""
    t, p = _pair(y_true, y_pred, num_classes)
    k = int(num_classes)
    w = np.asarray(weights)
    if w.ndim != 2 or w.shape[1] != t.size:
        raise ValueError(f"weights must have shape (B, {t.size}), got {w.shape}")
    onehot = np.zeros((t.size, k * k))
    onehot[np.arange(t.size), t * k + p] = 1.0
    cms = np.empty((w.shape[0], k * k))
    for s in range(0, w.shape[0], _CHUNK):  # counts are small integers: float64 BLAS is exact
        cms[s : s + _CHUNK] = w[s : s + _CHUNK].astype(np.float64) @ onehot
    return cms.reshape(-1, k, k)


def bootstrap_metrics_from_weights(
    y_true: Any, y_pred: Any, num_classes: int, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Each metric of ``METRIC_NAMES`` on every resample: name -> (B,) array."""
    m = _metrics_from_confusion(bootstrap_confusion_matrices(y_true, y_pred, num_classes, weights))
    return {name: m[name] for name in METRIC_NAMES}


def percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile-method interval: the (1-c)/2 and (1+c)/2 quantiles (numpy "linear")."""
    alpha = 1.0 - confidence
    low, high = np.percentile(samples, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return float(low), float(high)


def interval_cell(value: float | None, samples: np.ndarray | None, confidence: float) -> dict[str, float | None]:
    """``{"value", "ci_low", "ci_high"}`` for a report: the percentile interval of the finite bootstrap ``samples``;
    no interval when there is no value, no samples or none finite (a metric undefined in every resample)."""
    if value is None or samples is None or not np.isfinite(samples).any():
        return {"value": value, "ci_low": None, "ci_high": None}
    low, high = percentile_interval(samples[np.isfinite(samples)], confidence)
    return {"value": float(value), "ci_low": low, "ci_high": high}


def bootstrap_metrics(
    y_true: Any,
    y_pred: Any,
    num_classes: int,
    *,
    groups: Any = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 42,
    unit: str = "auto",
) -> dict[str, dict[str, float | None]]:
    """Point estimate and percentile bootstrap CI of each metric in ``METRIC_NAMES``.

    Returns ``{metric: {"value", "ci_low", "ci_high"}}``. ``value`` is the estimate on the full
    data (``classification_metrics``), not a bootstrap mean; a percentile CI usually contains it
    but is not guaranteed to (e.g. when a rare class drops in and out of the macro average).
    ``n_resamples=0`` skips the bootstrap and gives ``None`` bounds.

    ``unit`` ("auto" | "group" | "image", see ``resolve_bootstrap_unit``): "auto" resamples
    groups (patients, the cluster bootstrap) when ``groups`` is given and not all unique, else
    images. Resamples come from ``draw_bootstrap_weights(n, groups_or_None, n_resamples,
    np.random.default_rng(seed))``, so the same seed gives the same resamples.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    t, p = _pair(y_true, y_pred, num_classes)
    point = classification_metrics(t, p, num_classes)
    resolved = resolve_bootstrap_unit(groups, unit)
    if n_resamples == 0:
        return {m: {"value": point[m], "ci_low": None, "ci_high": None} for m in METRIC_NAMES}
    rng = np.random.default_rng(seed)
    weights = draw_bootstrap_weights(
        t.size, groups if resolved == "group" else None, n_resamples, rng
    )
    samples = bootstrap_metrics_from_weights(t, p, num_classes, weights)
    out: dict[str, dict[str, float | None]] = {}
    for name in METRIC_NAMES:
        low, high = percentile_interval(samples[name], confidence)
        out[name] = {"value": point[name], "ci_low": low, "ci_high": high}
    return out


# --- ROC AUC --------------------------------------------------------------------------------
def roc_auc_per_class(y_true: Any, probs: Any, num_classes: int) -> list[float | None]:
    """One-vs-rest ROC AUC of each class from the (N, K) scores ``probs``.

    ``None`` (JSON null) where the AUC is undefined: the class is absent from ``y_true`` or is
    the only class in it. Such classes are skipped before calling sklearn, so no warning fires.
    """
    from sklearn.metrics import roc_auc_score  # lazy: sklearn is slow to import

    k = int(num_classes)
    t = _labels(y_true, k, "y_true")
    s = np.asarray(probs, dtype=np.float64)
    if s.shape != (t.size, k):
        raise ValueError(f"probs must have shape ({t.size}, {k}), got {s.shape}")
    out: list[float | None] = []
    for c in range(k):
        positive = t == c
        if positive.all() or not positive.any():
            out.append(None)
        else:
            out.append(float(roc_auc_score(positive, s[:, c])))
    return out


def macro_auc(per_class: Sequence[float | None]) -> float | None:
    """Mean of the defined per-class AUCs; ``None`` when none is defined."""
    defined = [a for a in per_class if a is not None]
    return float(np.mean(defined)) if defined else None


# --- Formatting -----------------------------------------------------------------------------
def format_ci(value: float | None, low: float | None, high: float | None, digits: int = 3) -> str:
    """``0.982 (0.975-0.987)``, the paper's cell format; ``0.982`` without bounds; ``n/a``."""
    if value is None:
        return "n/a"
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"
