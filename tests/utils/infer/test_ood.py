"""The out-of-distribution detector: fitting both parts, the stored entry, scoring, refusing a broken entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from utils.artifacts.model_file import ModelMetadata
from utils.infer import ood
from utils.infer.predictor import Scored, scored
from utils.preprocessing import PreprocessSpec

BLOCKS = [16, 32]  # two "stages": the Mahalanobis part reads the first, the learned part both


def radiographs(rng, n_per_class=60, classes=3, centres=None):
    """Stage statistics of in-distribution images: positive (means and std are), clustered per class."""
    centres = rng.uniform(1.0, 3.0, (classes, sum(BLOCKS))) if centres is None else centres
    x = np.concatenate([c + rng.normal(0, 0.15, (n_per_class, sum(BLOCKS))) for c in centres])
    return np.abs(x), np.repeat(np.arange(classes), n_per_class), centres


def test_fit_flags_what_is_far_and_about_the_chosen_share_of_held_out_images():
    rng = np.random.default_rng(0)
    x, y, centres = radiographs(rng)
    val, _, _ = radiographs(rng, n_per_class=150, centres=centres)
    negatives = np.abs(rng.uniform(0, 6, (200, sum(BLOCKS))))  # another place in feature space
    entry = ood.fit_detector(x, y, val, blocks=BLOCKS, fitted_on="synthetic", negatives=negatives,
                             negatives_from="uniform", quantile=0.98, components=8)
    assert entry["method"] == ood.METHOD and entry["blocks"] == BLOCKS and entry["threshold"] == 1.0
    assert set(entry["parts"]) == {"mahalanobis", "learned"} and entry["parts"]["mahalanobis"]["components"] == 8
    assert entry["val_flagged"] <= 0.05 and entry["negatives_flagged"] > 0.95
    fresh, _, _ = radiographs(rng, n_per_class=200, centres=centres)
    far = np.abs(rng.normal(8, 1, (100, sum(BLOCKS))))
    first_stage_only = fresh.copy()
    first_stage_only[:, :BLOCKS[0]] += 2.0  # only the texture stage differs: the Mahalanobis part sees it
    assert ood.flagged(entry, ood.ood_score(entry, fresh)).mean() < 0.08
    assert ood.flagged(entry, ood.ood_score(entry, far)).mean() == 1.0
    assert ood.flagged(entry, ood.ood_score(entry, first_stage_only)).mean() > 0.95
    # a JSON round trip through the model's metadata keeps the very same scores
    meta = ModelMetadata(PreprocessSpec(class_names=("a", "b", "c")), ood=entry)
    again = ModelMetadata.from_json(meta.to_json()).ood
    assert np.array_equal(ood.ood_score(again, far), ood.ood_score(entry, far))
    assert len(json.dumps(entry)) < 20_000


def test_without_negatives_only_the_mahalanobis_part_is_fitted():
    rng = np.random.default_rng(1)
    x, y, centres = radiographs(rng, n_per_class=20)
    entry = ood.fit_detector(x, y, radiographs(rng, 30, centres=centres)[0], blocks=BLOCKS, fitted_on="x",
                             components=500)
    assert set(entry["parts"]) == {"mahalanobis"} and "negatives_flagged" not in entry
    assert entry["parts"]["mahalanobis"]["components"] <= min(BLOCKS[0], len(x) - 3)
    assert np.all(np.isfinite(ood.ood_score(entry, x)))


@pytest.mark.parametrize("case, message", [
    ("one image per class", "too few"),
    ("not finite", "not finite"),
    ("wrong width", "training features"),
])
def test_data_it_cannot_fit_is_refused_with_a_reason(case, message):
    rng = np.random.default_rng(2)
    x, y, _ = radiographs(rng, n_per_class=10)
    if case == "one image per class":
        x, y = x[[0, 10, 20]], y[[0, 10, 20]]
    elif case == "not finite":
        x[3, 4] = np.nan
    else:
        x = x[:, :-1]
    with pytest.raises(ValueError, match=message):
        ood.fit_detector(x, y, x[:5] if x.shape[1] == sum(BLOCKS) else x[:5], blocks=BLOCKS, fitted_on="x")


def test_identical_features_give_a_finite_detector():
    x = np.ones((12, sum(BLOCKS)))
    entry = ood.fit_detector(x, np.repeat([0, 1], 6), x[:4], blocks=BLOCKS, fitted_on="degenerate")
    assert np.all(np.isfinite(ood.ood_score(entry, x + 0.5)))


def test_a_missing_class_is_warned_about(caplog):
    rng = np.random.default_rng(3)
    x, y, _ = radiographs(rng, n_per_class=10, classes=2)
    ood.fit_detector(x, y, x[:5], blocks=BLOCKS, fitted_on="x", num_classes=3)
    assert "2 of the 3 classes" in caplog.text


def fitted(seed=4):
    rng = np.random.default_rng(seed)
    x, y, _ = radiographs(rng, n_per_class=10)
    return json.loads(json.dumps(ood.fit_detector(x, y, x, blocks=BLOCKS, fitted_on="x", components=4,
                                                  negatives=np.abs(rng.normal(5, 1, (30, sum(BLOCKS))))))), x


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(blocks=[16, 0]), "ood.blocks"),
    (lambda e: e.update(threshold=float("nan")), "ood.threshold"),
    (lambda e: e["parts"]["mahalanobis"].update(threshold=True), "threshold"),
    (lambda e: e["parts"]["mahalanobis"]["mean"].update(float32_base64="!!"), "base64"),
    (lambda e: e["parts"]["mahalanobis"]["mean"].update(shape=[3]), "bytes"),
    (lambda e: e["parts"]["mahalanobis"]["projection"].update(shape=[1, 1, 1]), "shape"),
    (lambda e: e["parts"]["mahalanobis"].pop("centres"), "centres"),
    (lambda e: e["parts"]["learned"]["weights"].update(shape=[3]), "bytes"),
    (lambda e: e["parts"].pop("mahalanobis"), "at least 'mahalanobis'"),
])
def test_a_broken_entry_is_refused_when_the_metadata_is_read(change, message):
    entry, _ = fitted()
    change(entry)
    with pytest.raises(ValueError, match=message):
        ModelMetadata.from_dict({"spec": PreprocessSpec().to_dict(), "ood": entry})


def test_a_detector_of_another_method_is_kept_but_not_used(caplog):
    meta = ModelMetadata.from_dict({"spec": PreprocessSpec().to_dict(), "ood": {"method": "from-the-future"}})
    assert meta.ood is None and meta.other["ood"] == {"method": "from-the-future"}
    assert meta.to_dict()["ood"] == {"method": "from-the-future"}  # written back as it was
    assert "served without an OOD score" in caplog.text


def test_scored_adds_the_score_only_with_both_a_detector_and_features():
    entry, x = fitted()
    meta = ModelMetadata(PreprocessSpec(class_names=("a", "b", "c")), ood=entry)
    logits = np.random.default_rng(5).normal(size=(5, 3)).astype(np.float32)
    with_score = scored((logits, x[:5]), meta)
    assert isinstance(with_score, Scored) and with_score.ood.shape == (5,) and with_score.ood_threshold == 1.0
    assert scored((logits, None), meta).ood is None
    assert scored((logits, x[:5]), meta.replace(ood=None)).ood is None
    with pytest.raises(ValueError, match="features of shape"):
        scored((logits, x[:5, :3]), meta)
