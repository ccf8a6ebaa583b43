"""Shortcut check: how much a model relies on source artefacts (the archive an image came from) rather
than on anatomy. Three measures on a held-out split, each with a bootstrap CI over patient groups:

1. **Source probe.** A logistic regression (standardised inputs, L2, balanced class weights) predicts
   the source repository of each image from the model's own features, cross-validated by patient
   group (StratifiedGroupKFold), out-of-fold macro F1 against the majority-source baseline. Two
   feature sets: ``head`` (the pooled features the classifier reads: the spatial mean of the
   backbone's last stage, the avg_pool output) and ``stages`` (the mean and SD of every stage's
   channels, models/features.py: early stages are texture, noise and contrast). Overall the source
   is mostly the label, so the overall probe is compared with the *label's* majority source too;
   the telling rows are **within each class that has more than one source**: features that tell
   UNIFESP spines from scoliosis films of another archive encode the archive beyond the label.
   Caveat: two sources of one class can differ in anatomy too (cervical/lumbar views against
   full-spine films; knee crops against other extremities), so a high within-class F1 is an upper
   bound on the artefact part, not a proof of it.

2. **Masked F1.** Macro F1 of the model's argmax on the same images with a border band masked
   (``fraction`` of each side set to the image's median: 8 % and 15 %), with text-like regions
   masked (``text_mask``) and with both, against the unmasked F1; the drop has a paired CI (the
   same resamples for every condition). A drop says the model read something there: burned-in
   text, collimation edges, the frame of a 224 px square, but also anatomy near the edge, which a
   15 % band does cut (a knee crop fills its frame), so the drop is an upper bound on the
   artefact part.

3. **Grad-CAM mass outside the body.** Grad-CAM (utils/evaluate/gallery.py: the backbone's last
   spatial layer, conv_pw_13_relu for MobileNet-V1) for the predicted class; the share of the
   map's mass outside the body mask (``body_mask``) and inside the 8 % border band, beside the
   share of the image's *area* there (what a map spread evenly would put there). Median, mean
   and per class. Limits: the map's resolution is the input / 32 (4 x 4 cells at 128 px,
   upsampled bilinearly), so a border band of 8 % is finer than a cell and mass leaks across it
   both ways; Grad-CAM shows where positive evidence for the class lies, not all that the model
   reads.

``text_mask`` is a simple detector, documented with its limits there; so is ``body_mask``. The
numpy / OpenCV parts take 8-bit (H, W) images and are tested directly; TensorFlow, Keras and
scikit-learn are imported inside the functions that need them.

    summary = run("runs/small128", "data/radiographs128", "../shared/radiographs/manifest.csv")
    print(markdown(summary)); write(summary, "runs/small128/shortcuts")
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.evaluate import metrics as M

log = logging.getLogger(__name__)

SHORTCUTS_JSON, SHORTCUTS_MD = "shortcuts.json", "shortcuts.md"
BORDER_FRACTIONS = (0.08, 0.15)  # masked border bands, share of each side
CAM_BORDER_FRACTION = 0.08  # the band the Grad-CAM border share counts
CLEAN = "unmasked"


# --- Masks (numpy / OpenCV on 8-bit (H, W) images) --------------------------------------------
def _gray(image: Any) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] in (1, 3):
        img = img[..., 0] if img.shape[-1] == 1 else img.mean(axis=-1)
    if img.ndim != 2:
        raise ValueError(f"expected an (H, W) image, got shape {np.asarray(image).shape}")
    return np.clip(img, 0, 255).astype(np.uint8) if img.dtype != np.uint8 else img


def border_band(shape: tuple[int, int], fraction: float) -> np.ndarray:
    """bool (H, W): True within ``fraction`` of the height (top, bottom) and width (left, right) of
    each side; at least one pixel for a fraction > 0."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"fraction must be in [0, 0.5), got {fraction}")
    h, w = int(shape[0]), int(shape[1])
    band = np.zeros((h, w), dtype=bool)
    if fraction == 0:
        return band
    dy, dx = max(1, int(round(h * fraction))), max(1, int(round(w * fraction)))
    band[:dy], band[h - dy:], band[:, :dx], band[:, w - dx:] = True, True, True, True
    return band


def fill(image: Any, mask: np.ndarray) -> np.ndarray:
    """``image`` (uint8 (H, W)) with the pixels of ``mask`` set to the median of the image (a grey the
    image already has: neither black, which reads as collimation or air, nor white)."""
    img = _gray(image).copy()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != img.shape:
        raise ValueError(f"mask {mask.shape} does not fit the image {img.shape}")
    img[mask] = np.uint8(np.median(img))
    return img


def mask_border(image: Any, fraction: float) -> np.ndarray:
    """The image with a border band of ``fraction`` of each side set to its median."""
    img = _gray(image)
    return fill(img, border_band(img.shape, fraction))


def _odd(n: float) -> int:
    n = max(3, int(round(n)))
    return n if n % 2 else n + 1


def text_mask(image: Any, *, kernel_fraction: float = 1 / 12, min_contrast: int = 100, dark: bool = False,
              max_area_fraction: float = 0.01, edge_fraction: float = 0.25, max_surround: float = 0.25,
              grow_fraction: float = 1 / 32) -> np.ndarray:
    """bool (H, W): text-like regions (burned-in labels, side markers, arrows, figure lettering).

    Detector: the white morphological top-hat (a square of ``kernel_fraction`` of the shorter side;
    with ``dark`` the black top-hat too, for dark lettering on a light box) keeps bright structures
    smaller than the square; pixels at least ``min_contrast`` (of 255) above their surround are
    candidates; an 8-connected component is kept when it fits in the square, covers at most
    ``max_area_fraction`` of the image, has its centre within ``edge_fraction`` of a side (the
    corners and edges where text and markers sit) and stands alone: the mean top-hat in a ring of
    half a square around it is at most ``max_surround`` x ``min_contrast`` (lettering lies on a flat
    background; rib edges and the texture of an equalised film lie among others like them). Kept
    components are grown by ``grow_fraction`` so that letters merge into words and their halo is
    covered.

    Limits: text larger than the square, faint text, or text in the middle of the image (paper
    arrows pointing at a lesion) is missed; small bright anatomy or hardware near the edge (a
    phalanx, a clip, an ECG lead, a bone edge cut by the collimator) is taken for text. At 128 px a
    line of lettering is a few pixels and blurred into the background by the downscale, so the
    detector finds mostly side markers ("R", "L"), arrows and small lead squares; white label boxes
    wider than the square ("A", "B" panels of a figure) are missed. It is a probe of "what if the corners' small
    high-contrast marks were gone", not an OCR.
    """
    import cv2

    img = _gray(image)
    h, w = img.shape
    k = _odd(min(h, w) * kernel_fraction)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
    tophat = cv2.morphologyEx(img, cv2.MORPH_TOPHAT, kernel)
    if dark:
        tophat = np.maximum(tophat, cv2.morphologyEx(img, cv2.MORPH_BLACKHAT, kernel))
    candidates = (tophat >= min_contrast).astype(np.uint8)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(candidates, connectivity=8)
    keep = np.zeros(count, dtype=bool)
    inner_y = (h * edge_fraction, h * (1 - edge_fraction))
    inner_x = (w * edge_fraction, w * (1 - edge_fraction))
    for i in range(1, count):
        cx, cy = centroids[i]
        near_edge = not (inner_x[0] <= cx <= inner_x[1] and inner_y[0] <= cy <= inner_y[1])
        x, y0, bw, bh, area = stats[i]
        if not (near_edge and max(bw, bh) <= k and area <= max_area_fraction * h * w):
            continue
        r = max(2, k // 2)  # the ring around it: text stands alone on a flat surround, texture does not
        ys, xs = slice(max(0, y0 - r), min(h, y0 + bh + r)), slice(max(0, x - r), min(w, x + bw + r))
        ring = labels[ys, xs] != i
        keep[i] = ring.any() and float(tophat[ys, xs][ring].mean()) <= max_surround * min_contrast
    found = keep[labels].astype(np.uint8)
    if found.any() and grow_fraction > 0:
        g = _odd(min(h, w) * grow_fraction)
        found = cv2.dilate(found, cv2.getStructuringElement(cv2.MORPH_RECT, (g, g)))
    return found.astype(bool)


def mask_text(image: Any, **kwargs) -> np.ndarray:
    """The image with ``text_mask``'s regions set to its median."""
    img = _gray(image)
    return fill(img, text_mask(img, **kwargs))


def body_mask(image: Any, *, blur_fraction: float = 1 / 32, close_fraction: float = 0.05,
              keep_fraction: float = 0.2, max_components: int = 2) -> np.ndarray:
    """bool (H, W): the body (or the exposed anatomy) of a radiograph.

    Otsu's threshold on the blurred image separates tissue (bright) from air and background (dark);
    a closing (``close_fraction`` of the shorter side) bridges thin gaps, the largest connected
    components are kept (up to ``max_components``, each at least ``keep_fraction`` of the largest:
    two views side by side) and each is replaced by its convex hull, which fills the lungs, the gaps
    between ribs and whatever dark lies inside the outline.

    The mask errs towards the body (the hull takes in the air between arm and trunk), so the share
    "outside the body" is a lower bound. Limits: an inverted image (MONOCHROME1 shown as stored),
    a bright collimator or a white film border, or burned-in white labels touching the body are
    counted as body; an image filled with anatomy to its edges (a chest, a knee crop) gives a mask
    of almost the whole image, where "outside" means little.
    """
    import cv2

    img = _gray(image)
    h, w = img.shape
    blurred = cv2.GaussianBlur(img, (_odd(min(h, w) * blur_fraction),) * 2, 0)
    _, binary = cv2.threshold(blurred, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    c = _odd(min(h, w) * close_fraction)
    binary = cv2.morphologyEx(binary.astype(np.uint8), cv2.MORPH_CLOSE,
                              cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (c, c)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return np.ones((h, w), dtype=bool)  # nothing above the threshold: a flat image is all "body"
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas)[:max(1, int(max_components))]
    out = np.zeros((h, w), dtype=np.uint8)
    for i in order:
        if areas[i] < keep_fraction * areas[order[0]]:
            continue
        points = cv2.findNonZero((labels == i + 1).astype(np.uint8))
        cv2.fillConvexPoly(out, cv2.convexHull(points), 1)
    return out.astype(bool)


def cam_shares(cam: Any, body: np.ndarray, band: np.ndarray) -> tuple[float, float]:
    """(share of the map's mass outside ``body``, share inside ``band``) of a non-negative map; NaN,
    NaN for a map with no mass."""
    c = np.clip(np.asarray(cam, dtype=np.float64), 0.0, None)
    total = c.sum()
    if not total > 0:
        return float("nan"), float("nan")
    return float(c[~np.asarray(body, bool)].sum() / total), float(c[np.asarray(band, bool)].sum() / total)


# --- Bootstrap helpers ------------------------------------------------------------------------
def _weights(n: int, groups: Sequence | None, n_resamples: int, seed: int, unit: str = "auto"
             ) -> tuple[np.ndarray | None, str]:
    resolved = M.resolve_bootstrap_unit(groups, unit)
    if not n_resamples:
        return None, resolved
    return M.draw_bootstrap_weights(n, groups if resolved == "group" else None, n_resamples,
                                    np.random.default_rng(seed)), resolved


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The median of ``values`` each repeated ``weights`` times (integer multiplicities); NaN when empty."""
    v, wt = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    keep = wt > 0
    if not keep.any():
        return float("nan")
    v, wt = v[keep], wt[keep]
    order = np.argsort(v, kind="stable")
    v, cum = v[order], np.cumsum(wt[order])
    total = int(cum[-1])
    lo = v[np.searchsorted(cum, (total - 1) // 2 + 1, side="left")]  # 0-based ranks (T-1)//2 and T//2
    hi = v[np.searchsorted(cum, total // 2 + 1, side="left")]
    return float((lo + hi) / 2.0)


def bootstrap_location(values: Any, groups: Sequence | None = None, *, n_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 42) -> dict[str, Any]:
    """Median and mean of ``values`` (NaN left out), each with a percentile CI from a bootstrap of the
    patient groups (metrics.draw_bootstrap_weights; of the images without groups)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    v = v[ok]
    g = None if groups is None else np.asarray(groups)[ok]
    if v.size == 0:
        return {"n": 0, "median": M.interval_cell(None, None, confidence), "mean": M.interval_cell(None, None, confidence)}
    weights, unit = _weights(v.size, g, n_resamples, seed)
    medians = means = None
    if weights is not None:
        medians = np.array([weighted_median(v, row) for row in weights])
        totals = weights.sum(axis=1).astype(np.float64)
        means = np.divide(weights @ v, totals, out=np.full(totals.shape, np.nan), where=totals > 0)
    return {"n": int(v.size), "unit": unit, "median": M.interval_cell(float(np.median(v)), medians, confidence),
            "mean": M.interval_cell(float(v.mean()), means, confidence)}


# --- Source probe -----------------------------------------------------------------------------
def probe_predictions(features: Any, targets: Sequence, groups: Sequence, *, n_splits: int = 5,
                      C: float = 1.0, seed: int = 42) -> tuple[np.ndarray, int]:
    """Out-of-fold predictions (indices into the sorted distinct ``targets``) of a logistic regression
    on ``features``, folds by group (StratifiedGroupKFold, at most ``n_splits`` and at most the fewest
    groups any target has); (predictions, folds used). ValueError when a target has fewer than two
    groups (no fold could hold it out and also train on it)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, dtype=np.float64)
    names, y = np.unique(np.asarray(targets).astype(str), return_inverse=True)
    g = np.asarray(groups).astype(str)
    if names.size < 2:
        raise ValueError("one target only: nothing to predict")
    fewest = min(np.unique(g[y == c]).size for c in range(names.size))
    folds = min(int(n_splits), fewest)
    if folds < 2:
        raise ValueError(f"a target has {fewest} group(s): too few to cross-validate by group")
    out = np.full(y.size, -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, g):
        if np.unique(y[train]).size < 2:  # a fold without the other target: predict the one it has
            out[test] = y[train][0]
            continue
        model = make_pipeline(StandardScaler(),
                              LogisticRegression(C=C, max_iter=5000, class_weight="balanced"))
        model.fit(x[train], y[train])
        out[test] = model.predict(x[test])
    return out, folds


def probe(features: Any, targets: Sequence, groups: Sequence, *, baseline: Sequence | None = None,
          n_splits: int = 5, C: float = 1.0, seed: int = 42, n_resamples: int = 1000,
          confidence: float = 0.95) -> dict[str, Any]:
    """The source probe on one set of images: out-of-fold macro F1 and accuracy with a group bootstrap CI,
    and the same for the majority target (or ``baseline``: a prediction per image, e.g. the label's
    majority source), on the same resamples, and the paired gain of the probe over it."""
    t = np.asarray(targets).astype(str)
    names, y = np.unique(t, return_inverse=True)
    counts = np.bincount(y, minlength=names.size)
    row: dict[str, Any] = {"n": int(t.size), "n_groups": int(np.unique(np.asarray(groups).astype(str)).size),
                           "sources": {str(n): int(c) for n, c in zip(names, counts)}}
    try:
        predicted, folds = probe_predictions(features, t, groups, n_splits=n_splits, C=C, seed=seed)
    except ValueError as error:
        row["skipped"] = str(error)
        return row
    if baseline is None:
        base = np.full(y.size, int(counts.argmax()))
        row["baseline"] = f"majority ({names[counts.argmax()]})"
    else:
        index = {n: i for i, n in enumerate(names)}
        base = np.array([index.get(str(b), -1) for b in baseline])
        if (base < 0).any():
            raise ValueError("the baseline predicts a target that is not among the targets")
        row["baseline"] = "the label's majority source"
    k = names.size
    weights, unit = _weights(y.size, list(groups), n_resamples, seed)
    point, point_base = M.classification_metrics(y, predicted, k), M.classification_metrics(y, base, k)
    s = M.bootstrap_metrics_from_weights(y, predicted, k, weights) if weights is not None else None
    sb = M.bootstrap_metrics_from_weights(y, base, k, weights) if weights is not None else None
    for name, key in (("macro_f1", "macro_f1"), ("accuracy", "accuracy")):
        row[name] = M.interval_cell(point[key], None if s is None else s[key], confidence)
        row[f"baseline_{name}"] = M.interval_cell(point_base[key], None if sb is None else sb[key], confidence)
    row["gain_macro_f1"] = M.interval_cell(point["macro_f1"] - point_base["macro_f1"],
                                     None if s is None else s["macro_f1"] - sb["macro_f1"], confidence)
    row.update({"folds": folds, "unit": unit,
                "confusion": {"order": [str(n) for n in names],
                              "matrix": point["confusion_matrix"].tolist()}})
    return row


def majority_source_of_label(labels: Sequence, sources: Sequence) -> list[str]:
    """Per image, the most frequent source of its label (ties: the first in sorted order)."""
    lab, src = np.asarray(labels).astype(str), np.asarray(sources).astype(str)
    best = {}
    for value in np.unique(lab):
        names, counts = np.unique(src[lab == value], return_counts=True)
        best[value] = str(names[counts.argmax()])
    return [best[v] for v in lab]


def source_probes(feature_sets: dict[str, np.ndarray], sources: Sequence, labels: Sequence, groups: Sequence,
                  class_names: Sequence[str], *, min_per_source: int = 3, **kwargs) -> list[dict[str, Any]]:
    """One row per feature set and scope: "all" (every image, against the label's majority source and
    against the overall majority) and each class with more than one source having at least
    ``min_per_source`` patient groups (a source with fewer cannot be held out by group: it is left out
    of that row, and counted in its ``left_out``)."""
    src = np.asarray(sources).astype(str)
    lab = np.asarray(labels)
    lab_names = np.array([class_names[int(i)] for i in lab]) if np.issubdtype(lab.dtype, np.integer) \
        else lab.astype(str)
    g = np.asarray(groups).astype(str)
    def enough(inside: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        """The images of ``inside`` whose source has ``min_per_source`` groups there; the others' counts."""
        names = np.unique(src[inside])
        kept = [n for n in names if np.unique(g[inside & (src == n)]).size >= min_per_source]
        left = {str(n): int((inside & (src == n)).sum()) for n in names if n not in kept}
        return inside & np.isin(src, kept), left

    rows = []
    every, left_all = enough(np.ones(src.size, bool))
    for feature_name, x in feature_sets.items():
        x = np.asarray(x)
        for baseline in ("label", "majority"):
            base = majority_source_of_label(lab_names[every], src[every]) if baseline == "label" else None
            rows.append({"features": feature_name, "scope": "all", "left_out": left_all,
                         **probe(x[every], src[every], g[every], baseline=base, **kwargs)})
        for name in class_names:
            sel, left = enough(lab_names == name)
            if np.unique(src[sel]).size < 2:
                continue
            rows.append({"features": feature_name, "scope": name, "left_out": left,
                         **probe(x[sel], src[sel], g[sel], **kwargs)})
    return rows


def head_features(features: np.ndarray, blocks: Sequence[int]) -> np.ndarray:
    """The pooled features the head reads (the mean half of the last stage's block of the stage
    statistics, models/features.py: the last stage is the backbone's output)."""
    blocks = [int(b) for b in blocks]
    if sum(blocks) != features.shape[1]:
        raise ValueError(f"blocks {blocks} do not add up to the features' width {features.shape[1]}")
    start = sum(blocks[:-1])
    return features[:, start:start + blocks[-1] // 2]


# --- Masked F1 --------------------------------------------------------------------------------
def masking_conditions(fractions: Sequence[float] = BORDER_FRACTIONS) -> list[tuple[str, Callable]]:
    """(name, image -> masked image) of each masked condition: each border band, text, text + the
    narrowest band."""
    out: list[tuple[str, Callable]] = [(f"border {f:.0%}", lambda im, f=f: mask_border(im, f)) for f in fractions]
    out.append(("text", mask_text))
    if fractions:
        f0 = min(fractions)
        out.append((f"text + border {f0:.0%}",
                    lambda im, f=f0: fill(im, text_mask(im) | border_band(_gray(im).shape, f))))
    return out


def masked_f1(y_true: Any, predictions: dict[str, np.ndarray], num_classes: int, *, groups=None,
              n_resamples: int = 1000, confidence: float = 0.95, seed: int = 42) -> list[dict[str, Any]]:
    """Per condition (the first is the unmasked one): macro F1 and accuracy with CIs, and the paired
    drop of macro F1 against the first, the same resamples for every condition."""
    t = np.asarray(y_true, dtype=np.int64)
    weights, unit = _weights(t.size, groups, n_resamples, seed)
    rows, base, base_s = [], None, None
    for name, predicted in predictions.items():
        point = M.classification_metrics(t, predicted, num_classes)
        s = M.bootstrap_metrics_from_weights(t, predicted, num_classes, weights) if weights is not None else None
        if base is None:
            base, base_s = point["macro_f1"], (None if s is None else s["macro_f1"])
        rows.append({"condition": name, "unit": unit,
                     "macro_f1": M.interval_cell(point["macro_f1"], None if s is None else s["macro_f1"], confidence),
                     "accuracy": M.interval_cell(point["accuracy"], None if s is None else s["accuracy"], confidence),
                     "f1_drop": M.interval_cell(base - point["macro_f1"],
                                          None if s is None else base_s - s["macro_f1"], confidence),
                     "changed": int((np.asarray(predicted) != np.asarray(next(iter(predictions.values())))).sum()),
                     "f1_per_class": [float(v) for v in point["f1"]]})
    return rows


# --- Model parts (TensorFlow, lazily) ---------------------------------------------------------
def model_outputs(predictor, images: Sequence[np.ndarray], batch_size: int = 32
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """(logits (N, K), stage statistics (N, D) or None) of 8-bit (S, S) images at the model's spec."""
    from utils.preprocessing import to_model_input

    logits, features = [], []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(np.stack(images[start:start + batch_size]), predictor.spec.channels)
        out = predictor.outputs(batch) if hasattr(predictor, "outputs") else (predictor.logits(batch), None)
        logits.append(np.asarray(out[0], np.float64))
        features.append(out[1])
    stats = None if any(f is None for f in features) else np.concatenate(features).astype(np.float64)
    return np.concatenate(logits), stats


def cam_measures(model, images: Sequence[np.ndarray], classes: Any, *, channels: int,
                 band_fraction: float = CAM_BORDER_FRACTION, layer=None, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per image: Grad-CAM's mass outside the body and in the border band, and those regions' area."""
    from utils.evaluate.gallery import grad_cam
    from utils.preprocessing import to_model_input

    maps = grad_cam(model, to_model_input(np.stack(images), channels), classes, layer, batch_size=batch_size)
    out = {k: np.full(len(images), np.nan) for k in ("outside_body", "border", "area_outside_body", "area_border")}
    for i, (image, cam) in enumerate(zip(images, maps)):
        body, band = body_mask(image), border_band(np.shape(image), band_fraction)
        out["outside_body"][i], out["border"][i] = cam_shares(cam, body, band)
        out["area_outside_body"][i], out["area_border"][i] = float((~body).mean()), float(band.mean())
    return out


def read_sources(manifest: str | os.PathLike, source_files: Sequence[str]) -> list[str | None]:
    """The source repository of each prepared image, from the radiographs' manifest.csv (file, relative
    to the manifest's folder, and source_repo), matched on the resolved path and else on the file name."""
    import pandas as pd

    manifest = Path(manifest)
    frame = pd.read_csv(manifest)
    if not {"file", "source_repo"} <= set(frame.columns):
        raise ValueError(f"{manifest}: needs columns file and source_repo")
    root = manifest.parent.resolve()
    by_path = {os.path.normpath(str(root / f)): s for f, s in zip(frame["file"], frame["source_repo"])}
    by_name: dict[str, str | None] = {}
    for f, s in zip(frame["file"], frame["source_repo"]):
        name = Path(f).name
        by_name[name] = s if by_name.get(name, s) == s else None  # ambiguous names match nothing
    out = []
    for f in source_files:
        found = by_path.get(os.path.normpath(str(Path(f).resolve())))
        out.append(found if found is not None else by_name.get(Path(str(f)).name))
    return out


def run(model: str | os.PathLike, data: str | os.PathLike | None, sources_csv: str | os.PathLike, *,
        split: str = "test", probe_split: str | None = None, fractions: Sequence[float] = BORDER_FRACTIONS,
        n_resamples: int = 1000, confidence: float = 0.95, seed: int = 42, batch_size: int = 32,
        cam: bool = True, cam_layer: str | None = None) -> dict[str, Any]:
    """Every measure of the module doc on ``split`` of ``data`` (a prepared dataset; default: the one the
    run was trained on). ``probe_split``: the split(s) the probe runs on ("test", "all" = every split),
    default ``split``."""
    from utils.artifacts.run_dir import training_data
    from utils.data import files as F
    from utils.evaluate.evaluation import decode_cached
    from utils.infer.predictor import load_predictor

    predictor = load_predictor(model)
    spec = predictor.spec
    data = Path(data or training_data(model) or "")
    if not (data / F.LABELS).is_file():
        raise ValueError(f"{data}: not a prepared dataset (no {F.LABELS})")
    if not F.read_spec(data).same_pixels(spec):
        raise ValueError(f"{data} was prepared with other settings than the model's spec: prepare it with "
                         f"`python prepare.py --model {model}`")
    frame = F.read_labels(data)
    frame = frame.assign(source=read_sources(sources_csv, frame["source_file"].tolist()))
    missing = int(frame["source"].isna().sum())
    if missing:
        log.warning("%d images have no source in %s and are left out", missing, sources_csv)
        frame = frame[frame["source"].notna()]
    probe_split = probe_split or split
    wanted = frame if probe_split == "all" else frame[frame["split"].isin({split, probe_split})]
    images, kept = [], []
    for i, path in enumerate(wanted["path"]):
        decoded = decode_cached(str(data / path), spec)
        if decoded.image is None:
            log.warning("left out %s: %s", path, decoded.reason)
            continue
        images.append(decoded.image)
        kept.append(i)
    wanted = wanted.iloc[kept].reset_index(drop=True)
    class_names = list(spec.class_names)
    index = {c: i for i, c in enumerate(class_names)}
    y_all = np.array([index[c] for c in wanted["label"]], dtype=np.int64)
    logits, stats = model_outputs(predictor, images, batch_size)
    held = (wanted["split"] == split).to_numpy()
    if not held.any():
        raise ValueError(f"{data}: split {split!r} is empty")
    groups_all = wanted["group"].astype(str).to_numpy()
    kwargs = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    summary: dict[str, Any] = {
        "model": str(model), "model_id": getattr(predictor, "model_id", ""), "data": str(data), "split": split,
        "probe_split": probe_split, "sources": str(sources_csv), "n_images": int(held.sum()),
        "n_groups": int(np.unique(groups_all[held]).size), "class_names": class_names,
        "bootstrap": {"method": "percentile", "resamples": int(n_resamples), "confidence": float(confidence),
                      "seed": int(seed), "unit": M.resolve_bootstrap_unit(list(groups_all[held]))},
        "sources_per_class": {c: {str(k): int(v) for k, v in
                                  wanted[held & (wanted["label"] == c).to_numpy()]["source"].value_counts().items()}
                              for c in class_names}}
    # 1. the source probe
    on = np.ones(len(wanted), bool) if probe_split == "all" else (wanted["split"] == probe_split).to_numpy()
    if stats is None:
        summary["probe"] = []
        summary["probe_note"] = "the model exposes no features (not a models/registry.py model)"
    else:
        from models.features import stage_sizes

        blocks = stage_sizes(getattr(predictor, "model", None)) or [stats.shape[1]]
        sets = {"head": head_features(stats, blocks), "stages": stats}
        summary["probe"] = source_probes({k: v[on] for k, v in sets.items()}, wanted["source"].to_numpy()[on],
                                         y_all[on], groups_all[on], class_names, **kwargs)
        summary["probe_images"] = int(on.sum())
    # 2. masked F1 on the held-out split
    held_images = [im for im, h in zip(images, held) if h]
    y, groups = y_all[held], list(groups_all[held])
    predictions = {CLEAN: logits[held].argmax(axis=1)}
    masked_area = {}
    for name, function in masking_conditions(fractions):
        masked = [function(im) for im in held_images]
        predictions[name] = model_outputs(predictor, masked, batch_size)[0].argmax(axis=1)
        masked_area[name] = float(np.mean([np.mean(m != im) for m, im in zip(masked, held_images)]))
    summary["masked"] = masked_f1(y, predictions, len(class_names), groups=groups, **kwargs)
    for row in summary["masked"]:
        row["changed_pixels"] = masked_area.get(row["condition"], 0.0)
    found = np.array([text_mask(im).any() for im in held_images])
    summary["text_found"] = {c: float(found[y == i].mean()) if (y == i).any() else None
                             for i, c in enumerate(class_names)}
    # 3. Grad-CAM
    keras_model = getattr(predictor, "model", None)
    if cam and keras_model is not None and hasattr(keras_model, "layers"):
        measures = cam_measures(keras_model, held_images, predictions[CLEAN], channels=spec.channels,
                                layer=cam_layer, batch_size=batch_size)
        summary["cam"] = cam_summary(measures, y, groups, class_names, **kwargs)
        summary["cam"]["layer"] = cam_layer or "the backbone's last spatial layer"
        summary["cam"]["band_fraction"] = CAM_BORDER_FRACTION
    else:
        summary["cam"] = None
    from utils.config import to_jsonable

    return to_jsonable(summary)


def cam_summary(measures: dict[str, np.ndarray], y: np.ndarray, groups: Sequence, class_names: Sequence[str],
                **kwargs) -> dict[str, Any]:
    """Median and mean (with CIs) of each CAM measure, over all images and per class."""
    g = np.asarray(groups)
    out: dict[str, Any] = {"all": {k: bootstrap_location(v, g, **kwargs) for k, v in measures.items()},
                           "per_class": {}}
    for i, c in enumerate(class_names):
        sel = np.asarray(y) == i
        if sel.any():
            out["per_class"][c] = {k: bootstrap_location(v[sel], g[sel], **kwargs) for k, v in measures.items()}
    return out


# --- Report -----------------------------------------------------------------------------------
def _cell(entry: dict | None, digits: int = 3) -> str:
    if not entry:
        return "n/a"
    return M.format_ci(entry.get("value"), entry.get("ci_low"), entry.get("ci_high"), digits)


def _short(source: str) -> str:
    return str(source).split("/")[0]


def markdown(summary: dict[str, Any]) -> str:
    """The three tables (probe, masked F1, Grad-CAM) as Markdown."""
    b = summary["bootstrap"]
    lines = [f"# Shortcut check: {summary.get('model_id') or summary['model']}", "",
             f"{summary['n_images']} images of split `{summary['split']}` of `{summary['data']}` "
             f"({summary['n_groups']} groups); 95 % CIs: percentile bootstrap, {b['resamples']} resamples of "
             f"{'patient groups' if b['unit'] == 'group' else 'images'}.", "",
             f"## Source probe (split `{summary['probe_split']}`, {summary.get('probe_images', 0)} images)", "",
             "Logistic regression on the model's features, cross-validated by group; out-of-fold macro F1 over "
             "the sources against the baseline.", "",
             "| features | images | sources (images) | probe F1 | baseline F1 | gain | probe accuracy | folds |",
             "|---|---|---|---|---|---|---|---|"]
    rows = summary.get("probe", [])
    majority = {r["features"]: r for r in rows if r["scope"] == "all" and r.get("baseline", "").startswith("majority")}
    for row in rows:
        if row["scope"] == "all" and row.get("baseline", "").startswith("majority"):
            continue  # its baseline is shown in the label-baseline row of the same features
        scope = "all classes" if row["scope"] == "all" else row["scope"]
        sources = ", ".join(f"{_short(k)} {v}" for k, v in row["sources"].items())
        if "skipped" in row:
            lines.append(f"| {row['features']}: {scope} | {row['n']} | {sources} | skipped: {row['skipped']} "
                         "| | | | |")
            continue
        base = f"{_cell(row['baseline_macro_f1'])} (majority)"
        if row["baseline"].startswith("the label"):
            base = f"{_cell(row['baseline_macro_f1'])} (label's source)"
            other = majority.get(row["features"])
            if other and "baseline_macro_f1" in other:
                base += f"; {_cell(other['baseline_macro_f1'])} (majority)"
        lines.append(f"| {row['features']}: {scope} | {row['n']} | {sources} | {_cell(row['macro_f1'])} | "
                     f"{base} | {_cell(row['gain_macro_f1'])} | "
                     f"{_cell(row['accuracy'])} | {row['folds']} |")
    if summary.get("probe_note"):
        lines.append(f"\n{summary['probe_note']}")
    names = summary["class_names"]
    lines += ["", "## Macro F1 with borders and text masked", "",
              "| condition | pixels changed | macro F1 | F1 drop (paired) | accuracy | predictions changed | "
              + " | ".join(f"F1 {c}" for c in names) + " |",
              "|---|---|---|---|---|---|" + "---|" * len(names)]
    for row in summary["masked"]:
        lines.append(f"| {row['condition']} | {row.get('changed_pixels', 0.0):.1%} | {_cell(row['macro_f1'])} | "
                     f"{_cell(row['f1_drop'])} | {_cell(row['accuracy'])} | {row['changed']} | "
                     + " | ".join(f"{v:.3f}" for v in row["f1_per_class"]) + " |")
    lines.append("\nImages where the text detector found something: " + ", ".join(
        f"{c} {v:.0%}" for c, v in summary["text_found"].items() if v is not None) + ".")
    cam = summary.get("cam")
    if cam:
        lines += ["", f"## Grad-CAM mass outside the body ({cam['layer']}, predicted class)", "",
                  "Share of each map's positive mass outside the body mask and in the "
                  f"{cam['band_fraction']:.0%} border band, beside the share of the image's area there; "
                  "median (95 % CI) over images.", "",
                  "| class | images | CAM outside body | area outside body | CAM in border band | area of band |",
                  "|---|---|---|---|---|---|"]
        for name, block in [("all", cam["all"]), *cam["per_class"].items()]:
            lines.append(f"| {name} | {block['outside_body']['n']} | {_cell(block['outside_body']['median'])} | "
                         f"{_cell(block['area_outside_body']['median'])} | {_cell(block['border']['median'])} | "
                         f"{block['area_border']['median']['value']:.3f} |")
        a = cam["all"]
        lines.append(f"\nMeans over all images: CAM outside body {_cell(a['outside_body']['mean'])}, area "
                     f"{_cell(a['area_outside_body']['mean'])}; CAM in the band {_cell(a['border']['mean'])}.")
    return "\n".join(lines) + "\n"


def write(summary: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """shortcuts.json and shortcuts.md in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SHORTCUTS_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    (out / SHORTCUTS_MD).write_text(markdown(summary))
    return out / SHORTCUTS_JSON, out / SHORTCUTS_MD
