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
