"""utils.evaluate.metrics: sklearn semantics, vectorized bootstrap vs a slow reference, edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

from utils.evaluate import metrics as M


def _random_preds(rng, n, k, accuracy=0.8, true_classes=None):
    true_classes = np.arange(k) if true_classes is None else np.asarray(true_classes)
    t = rng.choice(true_classes, size=n)
    p = np.where(rng.random(n) < accuracy, t, rng.integers(0, k, n))
    return t, p


def _reference_metrics(t, p):
    """The obvious computation: sklearn on explicit labels."""
    prec, rec, f1, _ = precision_recall_fscore_support(t, p, average="macro", zero_division=0)
    return {"accuracy": accuracy_score(t, p), "macro_precision": prec, "macro_recall": rec,
            "macro_f1": f1}


def _reference_bootstrap(t, p, weights):
    """Slow reference: one sklearn call per resample, images repeated by their multiplicity."""
    out = {name: [] for name in M.METRIC_NAMES}
    for w in weights:
        idx = np.repeat(np.arange(t.size), w)
        for name, value in _reference_metrics(t[idx], p[idx]).items():
            out[name].append(value)
    return {name: np.array(v) for name, v in out.items()}


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- Point estimates ------------------------------------------------------------------------
def test_confusion_matrix_rows_are_true():
    cm = M.confusion_matrix([0, 0, 1, 2], [0, 1, 1, 1], 4)
    assert cm.dtype.kind == "i"
    np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 6  # class 5 never true; some draws predict it, some classes may be absent entirely
    t, p = _random_preds(rng, 60, 5, accuracy=0.6, true_classes=[0, 1, 2, 4])
    p[:3] = 5
    got = M.classification_metrics(t, p, k)
    for name, value in _reference_metrics(t, p).items():
        assert got[name] == pytest.approx(value, abs=1e-12)
    prec, rec, f1, support = precision_recall_fscore_support(
        t, p, labels=range(k), zero_division=0)
    np.testing.assert_allclose(got["precision"], prec, atol=1e-12)
    np.testing.assert_allclose(got["recall"], rec, atol=1e-12)
    np.testing.assert_allclose(got["f1"], f1, atol=1e-12)
    np.testing.assert_array_equal(got["support"], support)
    np.testing.assert_array_equal(got["macro_labels"], np.union1d(t, p))


def test_absent_class_is_zero_with_zero_support_and_not_in_macro(no_warnings):
    got = M.classification_metrics([0, 0, 1, 1], [0, 0, 1, 1], 5)
    assert got["macro_f1"] == 1.0  # classes 2-4 absent: not averaged in
    assert got["support"].tolist() == [2, 2, 0, 0, 0]
    assert got["precision"][2:].tolist() == got["recall"][2:].tolist() == [0.0, 0.0, 0.0]
    assert got["f1"][2:].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [
    dict(y_true=[0, 1], y_pred=[0], num_classes=2),
    dict(y_true=[0, 2], y_pred=[0, 1], num_classes=2),
    dict(y_true=[-1], y_pred=[0], num_classes=2),
    dict(y_true=[], y_pred=[], num_classes=2),
    dict(y_true=[0.5], y_pred=[0], num_classes=2),
    dict(y_true=[[0]], y_pred=[[0]], num_classes=2),
])
def test_invalid_labels_raise(bad):
    with pytest.raises(ValueError):
        M.classification_metrics(**bad)


# --- Bootstrap: vectorized vs reference -----------------------------------------------------
@pytest.mark.parametrize("use_groups", [False, True])
def test_vectorized_bootstrap_equals_slow_reference(use_groups):
    rng = np.random.default_rng(7)
    n, k, b = 150, 5, 200
    t, p = _random_preds(rng, n, k, accuracy=0.7, true_classes=[0, 1, 2, 3])  # 4 never true
    groups = rng.integers(0, 40, n) if use_groups else None
    weights = M.draw_bootstrap_weights(n, groups, b, np.random.default_rng(3))
    fast = M.bootstrap_metrics_from_weights(t, p, k, weights)
    slow = _reference_bootstrap(t, p, weights)
    for name in M.METRIC_NAMES:
        np.testing.assert_allclose(fast[name], slow[name], rtol=0, atol=1e-12)

    # bootstrap_metrics draws exactly these resamples from the same seed
    got = M.bootstrap_metrics(t, p, k, groups=groups, n_resamples=b, seed=3,
                              unit="group" if use_groups else "image")
    point = _reference_metrics(t, p)
    for name in M.METRIC_NAMES:
        low, high = np.percentile(slow[name], [2.5, 97.5])
        assert got[name]["value"] == pytest.approx(point[name], abs=1e-12)
        assert got[name]["ci_low"] == pytest.approx(low, abs=1e-12)
        assert got[name]["ci_high"] == pytest.approx(high, abs=1e-12)


def test_image_weights_are_a_bootstrap_of_n_draws():
    w = M.draw_bootstrap_weights(30, None, 50, np.random.default_rng(0))
    assert w.shape == (50, 30)
    np.testing.assert_array_equal(w.sum(axis=1), 30)
    assert (w >= 0).all()


def test_group_weights_keep_each_group_together():
    rng = np.random.default_rng(0)
    groups = np.array([f"p{i}" for i in rng.integers(0, 12, 80)])
    w = M.draw_bootstrap_weights(80, groups, 300, np.random.default_rng(1))
    assert w.shape == (300, 80)
    uniq, first = np.unique(groups, return_index=True)
    for g, i in zip(uniq, first):
        members = groups == g
        np.testing.assert_array_equal(w[:, members], np.repeat(w[:, [i]], members.sum(), axis=1))
    # G groups drawn per resample, so group multiplicities sum to G
    np.testing.assert_array_equal(w[:, first].sum(axis=1), uniq.size)
    assert len(set(w.sum(axis=1).tolist())) > 1  # image counts vary between resamples


def test_group_ci_is_wider_with_correlated_groups():
    # 40 patients x 25 images; a patient's images are all right or all wrong
    n_groups, per = 40, 25
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(n_groups), per)
    t = np.repeat(rng.integers(0, 3, n_groups), per)
    wrong = np.repeat(rng.random(n_groups) < 0.25, per)
    p = np.where(wrong, (t + 1) % 3, t)
    image = M.bootstrap_metrics(t, p, 3, groups=groups, unit="image", seed=0)
    group = M.bootstrap_metrics(t, p, 3, groups=groups, unit="group", seed=0)
    auto = M.bootstrap_metrics(t, p, 3, groups=groups, seed=0)
    assert auto == group
    for name in M.METRIC_NAMES:
        w_image = image[name]["ci_high"] - image[name]["ci_low"]
        w_group = group[name]["ci_high"] - group[name]["ci_low"]
        assert w_group > 2.5 * w_image, name  # ~sqrt(25) = 5x in theory


def test_resolve_bootstrap_unit():
    assert M.resolve_bootstrap_unit(None, "auto") == "image"
    assert M.resolve_bootstrap_unit([1, 2, 3], "auto") == "image"  # all unique: same thing
    assert M.resolve_bootstrap_unit([1, 1, 3], "auto") == "group"
    assert M.resolve_bootstrap_unit([1, 1, 3], "image") == "image"
    assert M.resolve_bootstrap_unit([1, 2, 3], "group") == "group"
    with pytest.raises(ValueError, match="needs groups"):
        M.resolve_bootstrap_unit(None, "group")
    with pytest.raises(ValueError, match="unit must be"):
        M.resolve_bootstrap_unit(None, "patient")


def test_bootstrap_input_checks():
    with pytest.raises(ValueError, match="confidence"):
        M.bootstrap_metrics([0], [0], 2, confidence=1.0)
    with pytest.raises(ValueError, match="groups"):
        M.draw_bootstrap_weights(3, [1, 2], 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="weights"):
        M.bootstrap_metrics_from_weights([0, 1], [0, 1], 2, np.ones((3, 5)))


# --- Bootstrap: degenerate cases, no warnings -----------------------------------------------
def test_all_correct_gives_unit_interval(no_warnings):
    t = np.array([0, 1, 2, 3, 4] * 10)
    got = M.bootstrap_metrics(t, t, 5, n_resamples=200)
    for name in M.METRIC_NAMES:
        assert got[name] == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}


def test_class_absent_from_y_true(no_warnings):
    rng = np.random.default_rng(1)
    t, p = _random_preds(rng, 100, 5, true_classes=[0, 1, 2])
    got = M.bootstrap_metrics(t, p, 5, n_resamples=200)
    for name in M.METRIC_NAMES:
        v = got[name]
        assert all(np.isfinite([v["value"], v["ci_low"], v["ci_high"]]))
        assert v["ci_low"] <= v["ci_high"]


def test_single_class_in_y_true(no_warnings):
    t = np.zeros(20, dtype=int)
    p = t.copy()
    p[:4] = 1
    got = M.bootstrap_metrics(t, p, 3, n_resamples=200)
    ref = _reference_metrics(t, p)
    for name in M.METRIC_NAMES:
        assert got[name]["value"] == pytest.approx(ref[name], abs=1e-12)
        assert got[name]["ci_low"] <= got[name]["ci_high"]
    assert M.roc_auc_per_class(t, np.full((20, 3), 1 / 3), 3) == [None, None, None]


@pytest.mark.parametrize("pred", [0, 1])
def test_single_image(no_warnings, pred):
    got = M.bootstrap_metrics([0], [pred], 3, n_resamples=50)
    ref = _reference_metrics(np.array([0]), np.array([pred]))
    for name in M.METRIC_NAMES:
        assert got[name]["value"] == got[name]["ci_low"] == got[name]["ci_high"] == ref[name]
    assert M.roc_auc_per_class([0], [[0.5, 0.3, 0.2]], 3) == [None, None, None]


def test_zero_resamples_gives_point_estimates_only():
    got = M.bootstrap_metrics([0, 1, 1], [0, 1, 0], 2, n_resamples=0)
    assert got["accuracy"] == {"value": pytest.approx(2 / 3), "ci_low": None, "ci_high": None}


# --- Bootstrap: seeds -----------------------------------------------------------------------
def test_seed_reproducible_and_seeds_differ():
    rng = np.random.default_rng(5)
    t, p = _random_preds(rng, 300, 5)
    groups = rng.integers(0, 100, 300)
    for g in (None, groups):
        a = M.bootstrap_metrics(t, p, 5, groups=g, n_resamples=300, seed=1)
        assert a == M.bootstrap_metrics(t, p, 5, groups=g, n_resamples=300, seed=1)
        b = M.bootstrap_metrics(t, p, 5, groups=g, n_resamples=300, seed=2)
        assert a != b
        assert all(a[m]["value"] == b[m]["value"] for m in M.METRIC_NAMES)


# --- ROC AUC and formatting -----------------------------------------------------------------
def test_roc_auc_per_class_matches_sklearn_and_skips_undefined(no_warnings):
    rng = np.random.default_rng(2)
    t = rng.choice([0, 1, 3], size=80)  # class 2 absent
    logits = rng.normal(size=(80, 4)) + 2.0 * np.eye(4)[t]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = M.roc_auc_per_class(t, probs, 4)
    assert got[2] is None
    for c in (0, 1, 3):
        assert got[c] == pytest.approx(roc_auc_score(t == c, probs[:, c]), abs=1e-12)
    assert M.macro_auc(got) == pytest.approx(np.mean([got[0], got[1], got[3]]))
    assert M.macro_auc([None, None]) is None
    with pytest.raises(ValueError, match="probs"):
        M.roc_auc_per_class(t, probs[:, :3], 4)


def test_format_ci():
    assert M.format_ci(0.98213, 0.97461, 0.98749) == "0.982 (0.975-0.987)"
    assert M.format_ci(0.5, 0.25, 0.75, digits=1) == "0.5 (0.2-0.8)"
    assert M.format_ci(0.98213, None, None) == "0.982"
    assert M.format_ci(None, None, None) == "n/a"
