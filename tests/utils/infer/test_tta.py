"""utils.infer.tta with a stand-in model (no TensorFlow): the views, the averaged logits, the features."""

from __future__ import annotations

import numpy as np
import pytest

from utils.infer import tta
from utils.infer.predictor import softmax
from utils.preprocessing import PreprocessSpec

SPEC = PreprocessSpec(class_names=("a", "b"), image_size=32, channels=1)


class LeftRight:
    """Logits (left half mean, right half mean); features: the image's top-left pixel."""

    spec, model_id, backbone, metadata = SPEC, "stand-in/epoch-1", "mobilenet_v1", None

    def __init__(self):
        self.calls = []

    def outputs(self, batch):
        self.calls.append(batch.copy())
        half = batch.shape[2] // 2
        logits = np.stack([batch[:, :, :half].mean(axis=(1, 2, 3)), batch[:, :, half:].mean(axis=(1, 2, 3))], 1)
        return logits.astype(np.float32), batch[:, 0, 0, :].astype(np.float32)


def test_views_are_parsed_identity_first_and_unknown_or_repeated_names_refused():
    assert tta.parse_views("flip, identity") == ("identity", "flip")
    assert tta.parse_views(["zoom"]) == ("zoom",)
    for bad in ("identity,mirror", "", "flip,flip"):
        with pytest.raises(ValueError, match="view"):
            tta.parse_views(bad)


def test_logits_are_averaged_over_the_views_and_the_features_come_from_the_identity_view():
    batch = np.zeros((2, 8, 8, 1), np.float32)
    batch[0, :, :4] = 200.0  # bright on the left
    batch[1, :, 4:] = 100.0
    batch[:, 0, 0] = [[7.0], [9.0]]
    inner = LeftRight()
    predictor = tta.TTAPredictor(inner, ("flip", "identity"))
    logits, features = predictor.outputs(batch)
    plain, _ = inner.outputs(batch)
    flipped, _ = inner.outputs(batch[:, :, ::-1])
    np.testing.assert_allclose(logits, (plain + flipped) / 2, rtol=1e-6)
    np.testing.assert_allclose(logits[:, 0], logits[:, 1], rtol=1e-6)  # a mirror-symmetric average
    assert features[:, 0].tolist() == [7.0, 9.0]  # identity's top-left, not the flipped view's
    np.testing.assert_array_equal(inner.calls[1], batch[:, :, ::-1])  # the flip view mirrors left-right
    np.testing.assert_allclose(predictor.predict(batch), softmax(logits), rtol=1e-6)
    assert predictor.spec is SPEC and predictor.model_id == "stand-in/epoch-1+tta:identity,flip"


def test_the_zoom_view_keeps_the_centre_at_full_size():
    batch = np.zeros((1, 20, 20, 1), np.float32)
    batch[0, :1] = 255.0  # a line along the top edge: outside the central 90 %
    batch[0, 8:12, 8:12] = 100.0
    zoomed = tta.VIEWS["zoom"](batch)
    assert zoomed.shape == batch.shape and zoomed.dtype == np.float32
    assert zoomed[0, 0].max() < 255.0 and zoomed[0, 10, 10, 0] == pytest.approx(100.0)
