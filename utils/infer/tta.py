"""Test-time augmentation: a predictor that averages a model's logits over a few views of each image.

A view is a deterministic re-rendering of the preprocessed batch (float32 (B, S, S, C), 0..255) that
training's augmentation makes the model indifferent to, so that averaging over views smooths the
model's answer instead of changing the question:

* ``identity``: the image as it is;
* ``flip``: mirrored left-right (training flips with HORIZONTAL_FLIP; a body part is the same body
  part mirrored);
* ``zoom``: the central 90 % scaled back to the full size (training zooms by AUGMENT_SCALE).

The logits are averaged (not the probabilities: the calibration temperature then applies to the
average as to one model's logits). The out-of-distribution score reads the first view's features
(``identity`` whenever it is named: the detector was fitted on un-augmented images) with the
averaged logits. A predictor with
views costs one model call per view. ``bench/tta.py`` measures whether it pays, by cross-validation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from utils.infer.predictor import FromOutputs

ZOOM_KEEP = 0.9  # the zoom view's central share of each side


def _flip(batch: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(batch[:, :, ::-1, :])


def _zoom(batch: np.ndarray) -> np.ndarray:
    import cv2

    size = batch.shape[1]
    keep = max(1, int(round(size * ZOOM_KEEP)))
    start = (size - keep) // 2
    out = np.empty_like(batch)
    for i, image in enumerate(batch):
        crop = np.ascontiguousarray(image[start:start + keep, start:start + keep])
        resized = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR)
        out[i] = resized.reshape(out[i].shape)
    return out


VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"identity": lambda batch: batch, "flip": _flip, "zoom": _zoom}


def parse_views(text: str | Sequence[str]) -> tuple[str, ...]:
    """"identity,flip" (or a sequence) -> ("identity", "flip"); identity first, each view once, known names."""
    names = [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]
    unknown = sorted(set(names) - set(VIEWS))
    if unknown or not names:
        raise ValueError(f"unknown test-time views {unknown or names}; known: {', '.join(VIEWS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a test-time view is named twice in {names}")
    return tuple(["identity"] + [n for n in names if n != "identity"]) if "identity" in names else tuple(names)


@dataclass
class TTAPredictor(FromOutputs):
    """``inner`` (any utils.infer.predictor.Predictor) with its logits averaged over ``views``."""

    inner: object
    views: tuple[str, ...] = ("identity", "flip")
    _calls: list[Callable[[np.ndarray], np.ndarray]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.views = parse_views(self.views)
        self._calls = [VIEWS[name] for name in self.views]

    @property
    def spec(self):
        return self.inner.spec

    @property
    def model_id(self) -> str:
        return f"{self.inner.model_id}+tta:{','.join(self.views)}"

    @property
    def backbone(self) -> str:
        return self.inner.backbone

    @property
    def metadata(self):
        return self.inner.metadata

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        batch = np.asarray(batch, dtype=np.float32)
        total, features = None, None
        for index, view in enumerate(self._calls):
            logits, view_features = self.inner.outputs(view(batch))
            total = logits.astype(np.float64) if total is None else total + logits
            if index == 0:  # identity when it is among the views (parse_views puts it first)
                features = view_features
        return (total / len(self._calls)).astype(np.float32), features
