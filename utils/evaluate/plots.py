"""Evaluation and training figures, written to PNG files.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot, no global state, no
GUI); saving a bare Figure renders with the Agg canvas. matplotlib is imported inside the
functions, so importing this module has no side effects and costs nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from utils import constants

logger = logging.getLogger(__name__)

# (panel title, train column, val column); the first present alias of each name is used.
_TRAINING_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("accuracy", ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy")),
    ("macro F1", ("macro_f1", "f1", "f1_score")),
    ("learning rate", ("learning_rate", "lr")),
)


def _figure(ncols: int, width_per_panel: float = 5.0, height: float = 4.2) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_per_panel * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Any, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    logger.info("wrote %s", path)


def _matrix_panel(ax: Any, data: np.ndarray, labels: Sequence[str], title: str, fmt: str) -> None:
    k = len(labels)
    vmax = float(data.max()) if data.size and data.max() > 0 else 1.0
    im = ax.imshow(data, cmap="Blues", vmin=0.0, vmax=vmax)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            v = data[i, j]
            ax.text(
                j, i, format(v, fmt), ha="center", va="center", fontsize=8,
                color="white" if v > 0.5 * vmax else "black",
            )


def plot_confusion_matrix(cm: Any, class_names: Sequence[str], path: str | os.PathLike) -> None:
    """Counts and row-normalized (recall per true class) matrices side by side.

    Rows of classes with no true image are all zeros in the normalized panel.
    """
    counts = np.asarray(cm)
    k = len(class_names)
    if counts.shape != (k, k):
        raise ValueError(f"cm must have shape ({k}, {k}), got {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True).astype(np.float64)
    normalized = np.divide(counts, rows, out=np.zeros((k, k)), where=rows > 0)
    fig, (ax_counts, ax_norm) = _figure(2, width_per_panel=0.9 * k + 2.6, height=0.8 * k + 2.2)
    count_fmt = "d" if np.issubdtype(counts.dtype, np.integer) else ".0f"
    _matrix_panel(ax_counts, counts, list(class_names), "counts", count_fmt)
    _matrix_panel(ax_norm, normalized, list(class_names), "row-normalized (recall)", ".2f")
    _save(fig, path)


def plot_roc_curves(
    y_true: Any, probs: Any, class_names: Sequence[str], path: str | os.PathLike
) -> None:
    """One-vs-rest ROC curve per class, AUC in the legend; undefined classes are listed as n/a."""
    from sklearn.metrics import roc_curve  # lazy: sklearn is slow to import

    from utils.evaluate.metrics import roc_auc_per_class

    k = len(class_names)
    t = np.asarray(y_true).astype(np.int64)
    s = np.asarray(probs, dtype=np.float64)
    aucs = roc_auc_per_class(t, s, k)
    fig, (ax,) = _figure(1, width_per_panel=6.0, height=5.5)
    for c, (name, auc) in enumerate(zip(class_names, aucs)):
        if auc is None:
            ax.plot([], [], " ", label=f"{name} (AUC n/a)")
            continue
        fpr, tpr, _ = roc_curve(t == c, s[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate",
           ylabel="true positive rate", title="ROC curves (one-vs-rest)")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_training_curves(history: Any, path: str | os.PathLike) -> None:
    """Loss, accuracy, macro-F1 and learning rate per epoch from a Keras CSVLogger history.

    ``history`` is the CSV path or a DataFrame with columns like ``epoch, loss, accuracy,
    val_loss, val_accuracy, macro_f1, val_macro_f1, learning_rate``. Panels whose columns are
    missing are left out; train and val share a panel where both exist. The learning rate is on
    a log axis when positive. Raises ValueError when no known column is present.
    """
    import pandas as pd

    df = history if isinstance(history, pd.DataFrame) else pd.read_csv(history)
    epochs = df["epoch"].to_numpy() + 1 if "epoch" in df else np.arange(1, len(df) + 1)
    panels = []
    for title, aliases in _TRAINING_PANELS:
        lines = []
        for prefix, label in (("", "train"), ("val_", "val")):
            col = next((prefix + a for a in aliases if prefix + a in df), None)
            if col is not None:
                lines.append((label, df[col].to_numpy(dtype=np.float64)))
        if lines:
            panels.append((title, lines))
    if not panels:
        raise ValueError(f"no plottable column in history; columns: {list(df.columns)}")
    fig, axes = _figure(len(panels), width_per_panel=4.2, height=3.6)
    for ax, (title, lines) in zip(axes, panels):
        for label, values in lines:
            ax.plot(epochs, values, marker="o", ms=2.5, lw=1.3, label=label)
        if title == "learning rate":
            vals = np.concatenate([v for _, v in lines])
            vals = vals[np.isfinite(vals)]
            if vals.size and np.all(vals > 0):
                ax.set_yscale("log")
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    _save(fig, path)


def _named(probs: Any) -> list[tuple[str, np.ndarray]]:
    """An array -> [("", probs)]; a mapping name -> probs -> its items, in order."""
    if isinstance(probs, dict):
        return [(str(name), np.asarray(p, dtype=np.float64)) for name, p in probs.items()]
    return [("", np.asarray(probs, dtype=np.float64))]


def plot_reliability_diagram(y_true: Any, probs: Any, path: str | os.PathLike, *,
                             bins: int = constants.CALIBRATION_BINS) -> None:
    """Reliability diagram: per equal-width confidence bin, the accuracy (bars) against the mean
    confidence (the diagonal is perfect calibration), with the share of images per bin below.

    ``probs`` is (N, K) probabilities, or a mapping name -> probabilities (e.g. ``{"T = 1": before,
    "T = 1.8": after}``): one panel each, its ECE in the title (utils.evaluate.calibration).
    """
    from matplotlib.figure import Figure

    from utils.evaluate.calibration import expected_calibration_error

    named = _named(probs)
    fig = Figure(figsize=(4.6 * len(named), 5.2), layout="constrained")
    grid = fig.subplots(2, len(named), squeeze=False, sharex="col", gridspec_kw={"height_ratios": (3, 1)})
    for column, (name, p) in enumerate(named):
        ece, table = expected_calibration_error(p, y_true, bins)
        ax, ax_count = grid[0, column], grid[1, column]
        lows = np.array([row["low"] for row in table])
        width = 1.0 / bins
        counts = np.array([row["count"] for row in table], dtype=np.float64)
        filled = counts > 0
        accuracy = np.array([row["accuracy"] if row["count"] else 0.0 for row in table])
        confidence = np.array([row["confidence"] if row["count"] else 0.0 for row in table])
        ax.bar(lows[filled], accuracy[filled], width=width, align="edge", color="tab:blue", alpha=0.8,
               edgecolor="white", label="accuracy")
        ax.bar(lows[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=width, align="edge",
               color="tab:red", alpha=0.25, edgecolor="tab:red", hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey", label="perfect calibration")
        title = f"ECE {ece:.4f}" if np.isfinite(ece) else "ECE n/a"
        ax.set(xlim=(0, 1), ylim=(0, 1.01), ylabel="accuracy", title=f"{name}: {title}" if name else title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        total = counts.sum()
        ax_count.bar(lows, counts / total if total else counts, width=width, align="edge", color="grey",
                     edgecolor="white")
        ax_count.set(xlim=(0, 1), xlabel="confidence (top probability)", ylabel="share of images")
        ax_count.grid(alpha=0.3)
    _save(fig, path)


def plot_risk_coverage(y_true: Any, probs: Any, path: str | os.PathLike, *, target_accuracy: float | None = None,
                       threshold: float | None = None) -> None:
    """Accuracy of the automatically routed images against their share (coverage), as the
    confidence threshold goes down from 1: one curve per entry of ``probs`` (an (N, K) array, or a
    mapping name -> probabilities). ``target_accuracy`` draws the target as a horizontal line;
    ``threshold`` marks where that threshold lands on each curve (e.g. the recommended one).
    """
    from utils.evaluate.calibration import risk_coverage

    fig, (ax,) = _figure(1, width_per_panel=6.0, height=4.8)
    for name, p in _named(probs):
        curve = risk_coverage(p, y_true)
        if not len(curve.coverage):
            continue
        line = ax.plot(np.r_[0.0, curve.coverage], np.r_[curve.accuracy[0], curve.accuracy], lw=1.5,
                       drawstyle="steps-pre", label=name or "accuracy of the routed share")[0]
        if threshold is not None:
            routed = np.flatnonzero(curve.threshold >= threshold)
            if len(routed):
                i = int(routed[-1])
                ax.plot(curve.coverage[i], curve.accuracy[i], "o", color=line.get_color(),
                        label=f"threshold {threshold:.3f}: coverage {curve.coverage[i]:.1%}, "
                              f"accuracy {curve.accuracy[i]:.2%}")
    if target_accuracy is not None:
        ax.axhline(target_accuracy, ls="--", lw=0.9, color="tab:red", label=f"target accuracy {target_accuracy:g}")
    ax.set(xlim=(0, 1.01), xlabel="coverage (share routed automatically)",
           ylabel="accuracy of the routed share", title="risk-coverage (lower threshold -> more coverage)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)
