"""utils.evaluate.plots: each figure is written, non-empty, without warnings or pyplot state."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest

from utils.evaluate import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(autouse=True)
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_import_has_no_side_effects():
    code = "import sys, utils.evaluate.plots; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_confusion_matrix_with_empty_row(tmp_path):
    cm = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])  # class 1 absent: normalized row of zeros
    plots.plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png")
    _assert_png(tmp_path / "cm.png")
    with pytest.raises(ValueError, match="shape"):
        plots.plot_confusion_matrix(cm, ["a", "b"], tmp_path / "bad.png")


def test_roc_curves_with_undefined_class(tmp_path):
    rng = np.random.default_rng(0)
    t = rng.choice([0, 2], size=40)  # class 1 absent: listed as n/a
    probs = rng.dirichlet(np.ones(3), size=40)
    plots.plot_roc_curves(t, probs, ["a", "b", "c"], tmp_path / "sub" / "roc.png")
    _assert_png(tmp_path / "sub" / "roc.png")


def _history(columns, epochs=4):
    rng = np.random.default_rng(0)
    data = {"epoch": np.arange(epochs)}
    data.update({c: rng.random(epochs) for c in columns})
    return pd.DataFrame(data)


def test_training_curves_from_csv(tmp_path):
    cols = ["loss", "accuracy", "val_loss", "val_accuracy", "macro_f1", "val_macro_f1",
            "learning_rate"]
    _history(cols).to_csv(tmp_path / "history.csv", index=False)
    plots.plot_training_curves(tmp_path / "history.csv", tmp_path / "curves.png")
    _assert_png(tmp_path / "curves.png")


@pytest.mark.parametrize("cols", [["loss"], ["val_loss", "lr"], ["accuracy", "val_macro_f1"]])
def test_training_curves_tolerate_missing_columns(tmp_path, cols):
    plots.plot_training_curves(_history(cols), tmp_path / "curves.png")
    _assert_png(tmp_path / "curves.png")


def test_training_curves_without_known_columns_raise(tmp_path):
    with pytest.raises(ValueError, match="no plottable column"):
        plots.plot_training_curves(_history(["foo"]), tmp_path / "curves.png")
