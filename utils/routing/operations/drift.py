"""Drift: are the images arriving still like the ones the model was validated on?

The model file carries its validation set's distribution (``calibration.reference``, written by
utils/evaluate/calibration.py when a model is calibrated: the share of each top label, quantiles of the
confidence, and from the out-of-distribution score the share of validation images it flagged). The router
compares the model's decisions of the last hour and the last day (read from the queue: every object the model
classified keeps its probabilities there, so the windows survive a restart) with that reference:

- **label mix**: the top labels' counts against the reference shares, a chi-square test;
- **confidence**: the confidences against the reference's distribution, a one-sample Kolmogorov-Smirnov test;
- **uncertain share**: the share below the running threshold against what the reference makes expected at that
  threshold, a one-sided binomial test (more uncertain than plausible);
- **out-of-distribution share**: images flagged by the out-of-distribution score against the validation share.

Each test raises its alarm when its p-value is below ``drift_p_value`` (default 0.001) in a window holding at
least ``drift_min_images`` (default 50) model decisions: with fewer, nothing is claimed. A p-value this small
on a real site says the images changed (a new detector, processing, protocol, another department sending), not
that the model is wrong; what to do is in docs/ROUTER.md ("Drift"). The numbers go to /metrics
(``router_drift_*``), to the console's front page, and alert rules in docs/alerts.yml fire on the alarms.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WINDOWS = (("1h", 3600.0), ("24h", 86400.0))  # name, seconds
TESTS = ("label_mix", "confidence", "uncertain", "out_of_distribution")
OOD_REASON = "out_of_distribution"  # utils.infer.decisions: the reason of an image the score flagged
CACHE_S = 30.0  # a scrape or page view more often than this reuses the last reading


@dataclass(frozen=True)
class Reference:
    """The validation set's distribution, as served (after the temperature)."""

    class_names: tuple[str, ...]
    shares: tuple[float, ...]  # top-label share per class
    confidence_quantiles: tuple[float, ...]  # at 0, 1/(Q-1), ..., 1
    n_images: int
    ood_flagged: float | None = None  # the share of validation images the out-of-distribution score flagged

    @classmethod
    def of(cls, metadata) -> Reference | None:
        """From a model's metadata (utils/artifacts/model_file.py); None for a model calibrated before references
        were stored, or not calibrated."""
        entry = (getattr(metadata, "calibration", None) or {}).get("reference")
        if not entry:
            return None
        names = tuple(metadata.spec.class_names)
        shares = tuple(float(s) for s in entry["top_label_shares"])
        if len(shares) != len(names):
            return None
        ood = getattr(metadata, "ood", None) or {}
        return cls(names, shares, tuple(float(q) for q in entry["confidence_quantiles"]), int(entry["n_images"]),
                   float(ood["val_flagged"]) if "val_flagged" in ood else None)

    def confidence_cdf(self, values: np.ndarray) -> np.ndarray:
        """P(confidence <= value) on the validation set (the quantiles interpolated)."""
        q = np.asarray(self.confidence_quantiles)
        levels = np.linspace(0.0, 1.0, len(q))
        return np.interp(values, q, levels, left=0.0, right=1.0)

    def expected_below(self, threshold: float) -> float:
        """The share of validation images whose confidence is below ``threshold`` (uncertain at it)."""
        return float(self.confidence_cdf(np.asarray([threshold - 1e-12]))[0])


@dataclass
class WindowReading:
    window: str
    n: int
    shares: dict[str, float] = field(default_factory=dict)
    uncertain_share: float | None = None
    expected_uncertain: float | None = None
    median_confidence: float | None = None
    reference_median: float | None = None
    ood_share: float | None = None
    expected_ood: float | None = None
    p_values: dict[str, float] = field(default_factory=dict)
    alarms: dict[str, bool] = field(default_factory=dict)
    enough: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def read_window(reference: Reference, decisions: Sequence[tuple[np.ndarray, str]], threshold: float, *,
                window: str, min_images: int, p_value: float) -> WindowReading:
    """The tests of one window's model decisions ``(probabilities in the reference's class order, reason)``."""
    from scipy import stats

    reading = WindowReading(window, len(decisions), expected_uncertain=reference.expected_below(threshold),
                            reference_median=float(np.interp(0.5, np.linspace(0, 1, len(reference.confidence_quantiles)),
                                                             reference.confidence_quantiles)),
                            expected_ood=reference.ood_flagged)
    if not decisions:
        return reading
    probs = np.stack([p for p, _ in decisions])
    top = probs.argmax(axis=1)
    counts = np.bincount(top, minlength=len(reference.class_names))
    confidence = probs.max(axis=1)
    n = len(top)
    reading.shares = {name: float(c / n) for name, c in zip(reference.class_names, counts)}
    below = int((confidence < threshold).sum())
    reading.uncertain_share = below / n
    reading.median_confidence = float(np.median(confidence))
    flagged = sum(reason == OOD_REASON for _, reason in decisions)
    reading.ood_share = flagged / n
    reading.enough = n >= min_images
    # label mix: chi-square against the reference shares (a class the validation set never predicted gets a
    # small floor, so that seeing it is surprising rather than impossible)
    expected = np.maximum(np.asarray(reference.shares), 0.5 / max(reference.n_images, 1))
    expected = expected / expected.sum() * n
    reading.p_values["label_mix"] = float(stats.chisquare(counts, expected).pvalue)
    reading.p_values["confidence"] = float(stats.kstest(confidence, reference.confidence_cdf).pvalue)
    reading.p_values["uncertain"] = float(stats.binomtest(below, n, min(max(reading.expected_uncertain, 1e-6), 1 - 1e-6),
                                                          alternative="greater").pvalue)
    if reference.ood_flagged is not None:
        reading.p_values["out_of_distribution"] = float(stats.binomtest(
            flagged, n, min(max(reference.ood_flagged, 1e-3), 1 - 1e-6), alternative="greater").pvalue)
    reading.p_values = {k: (v if math.isfinite(v) else 1.0) for k, v in reading.p_values.items()}
    reading.alarms = {test: reading.enough and p < p_value for test, p in reading.p_values.items()}
    return reading


class DriftMonitor:
    """The drift readings of a running router, for /metrics and the console (cached for CACHE_S).

    ``decisions(since)``: the model's decisions classified since then, ``(probs as a {class: p} mapping or its
    JSON, reason)`` (utils/routing/queue.py ``SpoolQueue.model_decisions``); ``metadata()``: the metadata of the
    model classifying now (a reload changes it); ``settings()``: (threshold, min_images, p_value) now."""

    def __init__(self, decisions: Callable[[float], list[tuple[Any, str]]], metadata: Callable[[], Any],
                 settings: Callable[[], tuple[float, int, float]], clock: Callable[[], float] = time.time) -> None:
        self._decisions, self._metadata, self._settings, self._clock = decisions, metadata, settings, clock
        self._lock = threading.Lock()
        self._cached: tuple[float, Any, list[WindowReading] | None] | None = None

    def readings(self) -> tuple[Reference | None, list[WindowReading]]:
        """(the reference, one reading per window); no reference: (None, [])."""
        reference = Reference.of(self._metadata())
        if reference is None:
            return None, []
        with self._lock:
            now = self._clock()
            if self._cached is not None and now - self._cached[0] < CACHE_S and self._cached[1] == reference:
                return reference, self._cached[2]
            threshold, min_images, p_value = self._settings()
            rows = self._decisions(now - max(seconds for _, seconds in WINDOWS))
            decoded = [(t, _vector(probs, reference.class_names), reason) for t, probs, reason in rows]
            decoded = [(t, v, r) for t, v, r in decoded if v is not None]
            readings = [read_window(reference, [(v, r) for t, v, r in decoded if t >= now - seconds], threshold,
                                    window=name, min_images=min_images, p_value=p_value)
                        for name, seconds in WINDOWS]
            self._cached = (now, reference, readings)
            return reference, readings


def _vector(probs: Any, class_names: Sequence[str]) -> np.ndarray | None:
    """A decision's probabilities in the reference's class order; None when they are not the model's classes (an
    object classified by another model before a reload, a damaged row)."""
    try:
        mapping = json.loads(probs) if isinstance(probs, str) else probs
        if not isinstance(mapping, dict) or set(mapping) != set(class_names):
            return None
        vector = np.asarray([float(mapping[name]) for name in class_names])
    except (ValueError, TypeError):
        return None
    return vector if np.all(np.isfinite(vector)) else None
