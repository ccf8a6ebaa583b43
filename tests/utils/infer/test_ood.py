"""The out-of-distribution detector: fitting, the stored entry, scoring, and refusing a broken entry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from utils.artifacts.model_file import ModelMetadata
from utils.infer import ood
from utils.infer.predictor import Scored, scored
from utils.preprocessing import PreprocessSpec


def clusters(rng, n_per_class=80, dims=48, classes=3, spread=1.0):
    centres = rng.normal(0, 4, (classes, dims))
    x = np.concatenate([c + rng.normal(0, spread, (n_per_class, dims)) for c in centres])
    return x, np.repeat(np.arange(classes), n_per_class), centres


def test_fit_flags_what_is_far_and_about_the_chosen_share_of_held_out_images():
    rng = np.random.default_rng(0)
    x, y, centres = clusters(rng)
    val = np.concatenate([c + rng.normal(0, 1.0, (200, 48)) for c in centres])
    entry = ood.fit_detector(x, y, val, fitted_on="synthetic", quantile=0.95, components=16)
    assert entry["method"] == "mahalanobis" and entry["components"] == 16 and entry["n_val"] == 600
    assert entry["val_flagged"] == pytest.approx(0.05, abs=0.01)
    fresh = np.concatenate([c + rng.normal(0, 1.0, (300, 48)) for c in centres])
    far = rng.normal(0, 4, (300, 48)) + 12.0  # another place in feature space
    mixed = (centres[0] + centres[1]) / 2 + rng.normal(0, 1.0, (300, 48))  # between two classes
    flagged_fresh = ood.flagged(entry, ood.ood_score(entry, fresh)).mean()
    assert 0.0 < flagged_fresh < 0.12
    assert ood.flagged(entry, ood.ood_score(entry, far)).mean() == 1.0
    assert ood.flagged(entry, ood.ood_score(entry, mixed)).mean() > 0.9
    # a JSON round trip through the model's metadata keeps the very same scores
    meta = ModelMetadata(PreprocessSpec(class_names=("a", "b", "c")), ood=entry)
    again = ModelMetadata.from_json(meta.to_json()).ood
    assert np.array_equal(ood.ood_score(again, far), ood.ood_score(entry, far))
    assert len(json.dumps(entry)) < 200_000


def test_components_are_capped_by_the_training_images():
    rng = np.random.default_rng(1)
    x, y, _ = clusters(rng, n_per_class=4, dims=64)
    entry = ood.fit_detector(x, y, x[:5], fitted_on="tiny", components=64)
    assert entry["components"] <= len(x) - 1
    assert np.all(np.isfinite(ood.ood_score(entry, x)))


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(method="energy"), "ood.method"),
    (lambda e: e.update(threshold=float("nan")), "ood.threshold"),
    (lambda e: e.update(threshold=True), "ood.threshold"),
    (lambda e: e["mean"].update(float32_base64="!!"), "base64"),
    (lambda e: e["mean"].update(shape=[3]), "bytes"),
    (lambda e: e["projection"].update(shape=[1, 1, 1]), "shape"),
    (lambda e: e.pop("centres"), "ood.centres"),
])
def test_a_broken_entry_is_refused_when_the_metadata_is_read(change, message):
    rng = np.random.default_rng(2)
    x, y, _ = clusters(rng, n_per_class=10, dims=8)
    entry = json.loads(json.dumps(ood.fit_detector(x, y, x, fitted_on="x", components=4)))
    change(entry)
    data = {"spec": PreprocessSpec().to_dict(), "ood": entry}
    with pytest.raises(ValueError, match=message):
        ModelMetadata.from_dict(data)


def test_scored_adds_the_score_only_with_both_a_detector_and_features():
    rng = np.random.default_rng(3)
    x, y, _ = clusters(rng, n_per_class=10, dims=8, classes=2)
    entry = ood.fit_detector(x, y, x, fitted_on="x", components=4)
    meta = ModelMetadata(PreprocessSpec(class_names=("a", "b")), ood=entry)
    logits = rng.normal(size=(5, 2)).astype(np.float32)
    with_score = scored((logits, x[:5]), meta)
    assert isinstance(with_score, Scored) and with_score.ood.shape == (5,)
    assert with_score.ood_threshold == entry["threshold"]
    assert scored((logits, None), meta).ood is None
    assert scored((logits, x[:5]), meta.replace(ood=None)).ood is None
    with pytest.raises(ValueError, match="features of shape"):
        scored((logits, x[:5, :3]), meta)
