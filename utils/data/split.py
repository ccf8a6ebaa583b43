"""Who goes where: grouped, stratified, seeded assignment of images to splits and to folds.

Both answer the same question, "put whole groups (patients) into parts so that every class is
close to each part's share", with one greedy rule (``distribute_groups``):

- ``assign_splits``: train / val / test by ``SPLIT_RATIOS``, keeping splits a source preset;
- ``assign_folds``: K equal folds for cross-validation, and ``fold_splits`` the train / val / test
  roles of one fold's run (test: the fold itself; val: a grouped, stratified share of the other
  folds, as large relative to train as SPLIT_RATIOS makes it; train: the rest).

A group never straddles two parts. No I/O here: prepare.py and the tf.data pipeline call it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from utils import constants
from utils.data.files import SPLITS

# A fold's validation share of its training folds: as SPLIT_RATIOS relates val to train (0.15 / 0.85).
VAL_SHARE = constants.SPLIT_RATIOS[1] / (constants.SPLIT_RATIOS[0] + constants.SPLIT_RATIOS[1])
# PatientID values that identify nobody: grouping on them would lump unrelated images together.
PLACEHOLDER_IDS = {"", "ANONYMOUS", "ANON", "ANONYMIZED", "UNKNOWN", "NONE", "NULL", "0", "NA", "N/A"}


def group_key(patient_id: str, study_uid: str, group: str, source: str) -> str:
    """Who an image belongs to: PatientID, else StudyInstanceUID, else the group column, else itself."""
    if patient_id and patient_id.strip().upper() not in PLACEHOLDER_IDS:
        return f"patient:{patient_id.strip()}"
    if study_uid:
        return f"study:{study_uid}"
    if group:
        return f"group:{group}"
    return f"file:{source}"


def _members(groups: Sequence[str]) -> dict[str, list[int]]:
    members: dict[str, list[int]] = collections.defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return members


def distribute_groups(labels: Sequence[str], groups: Sequence[str], ratios: Sequence[float], seed: int,
                      only: Sequence[str] | None = None, balance_ties: bool = False) -> dict[str, int]:
    """Part index (into ``ratios``) for each group of ``only`` (default: every group).

    Groups are placed one at a time (shuffled with ``seed``, larger groups first) into the part
    whose per-class target (``ratios`` x the class's images among these groups) is least filled,
    relative to its size: every class stays close to the ratios and even small classes reach
    every part. Parts with ratio 0 get nothing. A tie goes to the first part, or, with
    ``balance_ties``, to the part least filled overall (equal folds need it: with groups of
    two images and three per class, "first" would give fold 0 two thirds of every class).
    assign_splits keeps "first" so that re-preparing a dataset keeps its splits.
    """
    labels, groups = list(labels), list(groups)
    classes = sorted(set(labels))
    cls_index = {c: i for i, c in enumerate(classes)}
    members = _members(groups)
    chosen = list(members) if only is None else list(only)
    ratios = np.asarray(ratios, dtype=float)
    totals = np.zeros(len(classes))
    for g in chosen:
        for i in members[g]:
            totals[cls_index[labels[i]]] += 1
    targets = ratios[:, None] * totals[None, :]
    current = np.zeros_like(targets)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(chosen))
    chosen = [chosen[k] for k in order]
    chosen.sort(key=lambda g: -len(members[g]))  # stable: ties keep the seeded order
    placed = {}
    for g in chosen:
        counts = np.zeros(len(classes))
        for i in members[g]:
            counts[cls_index[labels[i]]] += 1
        # Unfilled share of each part's per-class target: small classes still reach every part.
        unfilled = (targets - current) / np.maximum(targets, 1e-9)
        deficit = (unfilled * counts[None, :]).sum(axis=1)
        if balance_ties:
            filled = current.sum(axis=1) / np.maximum(targets.sum(axis=1), 1e-9)
            deficit = deficit + 1e-6 * (1.0 - filled)
        deficit[ratios <= 0] = -np.inf
        choice = int(np.argmax(deficit))
        current[choice] += counts
        placed[g] = choice
    return placed


def assign_splits(labels: Sequence[str], groups: Sequence[str], preset: Sequence[str],
                  ratios: Sequence[float], seed: int) -> list[str]:
    """Stratified, grouped, seeded split into train/val/test.

    Groups never straddle two splits. Preset splits are kept; a group with any preset member goes
    whole to that split (the first one seen). The remaining groups are distributed by
    ``distribute_groups`` with ``ratios``. When the preset holds only train/test (the
    VinDr release), val is drawn from the unassigned pool, i.e. from train, with ratio
    val / (train + val).
    """
    labels, groups = list(labels), list(groups)
    members = _members(groups)
    result = [""] * len(labels)
    free_groups = []
    for g, idx in members.items():
        fixed = next((preset[i] for i in idx if preset[i]), "")
        if fixed:
            for i in idx:
                result[i] = fixed
        else:
            free_groups.append(g)

    preset_used = {s for s in result if s}
    ratios = np.asarray(ratios, dtype=float)
    if preset_used and "val" not in preset_used:
        # e.g. official train/test: the unassigned images share train and val only
        ratios = np.array([ratios[0], ratios[1], 0.0]) / max(ratios[0] + ratios[1], 1e-12)
    for g, part in distribute_groups(labels, groups, ratios, seed, only=free_groups).items():
        for i in members[g]:
            result[i] = SPLITS[part]
    return result


@dataclass(frozen=True)
class Fold:
    """One run of a cross-validation: fold ``index`` (0-based) of ``count``, folds drawn with ``seed``;
    ``val_share`` of the other folds' images (by group) validate it."""

    index: int
    count: int
    seed: int
    val_share: float = VAL_SHARE

    def splits(self, labels: Sequence[str], groups: Sequence[str]) -> list[str]:
        """The train / val / test role of every image in this fold's run."""
        folds = assign_folds(labels, groups, self.count, self.seed)
        return fold_splits(folds, self.index, self.count, labels, groups, self.seed, self.val_share)


def assign_folds(labels: Sequence[str], groups: Sequence[str], folds: int, seed: int) -> list[int]:
    """Fold index 0..folds-1 of every image: ``folds`` equal parts, grouped and stratified."""
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    if len(set(groups)) < folds:
        raise ValueError(f"{len(set(groups))} groups (patients) cannot fill {folds} folds")
    members = _members(groups)
    result = [0] * len(labels)
    for g, part in distribute_groups(labels, groups, [1.0 / folds] * folds, seed, balance_ties=True).items():
        for i in members[g]:
            result[i] = part
    return result


def fold_splits(folds: Sequence[int], fold: int, count: int, labels: Sequence[str], groups: Sequence[str],
                seed: int, val_share: float = VAL_SHARE) -> list[str]:
    """The split of every image in the run of fold ``fold`` (0-based) of ``count``: the fold itself
    is the test split; of the other folds, ``val_share`` (grouped, stratified) is the validation
    split (best epoch, calibration) and the rest the training split."""
    if not 0 <= fold < count:
        raise ValueError(f"fold {fold} is not in 0..{count - 1}")
    rest = sorted({g for g, f in zip(groups, folds) if f != fold})
    parts = distribute_groups(labels, groups, (1.0 - val_share, val_share), seed + 1 + fold, only=rest,
                              balance_ties=True)
    if len(rest) > 1 and 1 not in parts.values():  # tiny data: still validate on one group, the smallest
        sizes = collections.Counter(g for g in groups if g in parts)
        parts[min(rest, key=lambda g: (sizes[g], g))] = 1
    return ["test" if f == fold else ("train", "val")[parts[g]] for f, g in zip(folds, groups)]
