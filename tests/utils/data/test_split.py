"""Folds for cross-validation: grouped (no patient in two folds), stratified, every image tested once."""

import collections

import numpy as np
import pytest

from utils.data.split import assign_folds, fold_splits


def synthetic(n=600, seed=3):
    rng = np.random.default_rng(seed)
    labels = [str(c) for c in rng.choice(5, size=n, p=[0.05, 0.35, 0.2, 0.2, 0.2])]
    groups = [f"patient{p}" for p in rng.integers(0, n // 3, size=n)]  # about 3 images per patient
    return labels, groups


def test_no_patient_is_in_two_folds_and_classes_are_spread():
    labels, groups = synthetic()
    folds = assign_folds(labels, groups, 5, seed=42)
    by_group = collections.defaultdict(set)
    for g, f in zip(groups, folds):
        by_group[g].add(f)
    assert all(len(f) == 1 for f in by_group.values())
    sizes = collections.Counter(folds)
    assert set(sizes) == set(range(5)) and max(sizes.values()) - min(sizes.values()) <= 0.1 * len(labels) / 5
    for cls in set(labels):  # the rare class (5 %) reaches every fold, each close to a fifth
        per_fold = collections.Counter(f for f, y in zip(folds, labels) if y == cls)
        total = sum(per_fold.values())
        assert set(per_fold) == set(range(5))
        assert all(abs(c - total / 5) <= max(3, 0.25 * total / 5) for c in per_fold.values())


def test_folds_are_seeded():
    labels, groups = synthetic()
    assert assign_folds(labels, groups, 5, seed=1) == assign_folds(labels, groups, 5, seed=1)
    assert assign_folds(labels, groups, 5, seed=1) != assign_folds(labels, groups, 5, seed=2)


def test_each_image_is_tested_once_and_never_trained_on_in_its_own_fold():
    labels, groups = synthetic(200)
    folds = assign_folds(labels, groups, 4, seed=0)
    tested = collections.Counter()
    for k in range(4):
        roles = fold_splits(folds, k, 4, labels, groups, seed=0)
        assert set(roles) == {"train", "val", "test"}
        share = roles.count("val") / (roles.count("val") + roles.count("train"))
        assert 0.12 < share < 0.24  # about 0.15 / 0.85 of the training folds
        tested.update(i for i, r in enumerate(roles) if r == "test")
        train_groups = {g for g, r in zip(groups, roles) if r == "train"}
        assert not train_groups & {g for g, r in zip(groups, roles) if r != "train"}
    assert set(tested.values()) == {1} and len(tested) == len(labels)


def test_impossible_fold_counts_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        assign_folds(["a", "b"], ["x", "y"], 1, seed=0)
    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        assign_folds(["a"] * 6, ["x", "y", "z"] * 2, 5, seed=0)
    with pytest.raises(ValueError, match="not in 0..2"):
        fold_splits([0, 1, 2], 3, 3, ["a"] * 3, ["x", "y", "z"], seed=0)
