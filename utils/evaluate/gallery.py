"""Error gallery: the misclassified images in one figure, with a Grad-CAM saliency map.

    idx = select_errors(y_true, probs)                         # most confident errors first
    maps = grad_cam(model, images[idx], probs[idx].argmax(1))  # (n, H, W) in [0, 1]
    error_gallery(predictor, files, images, y_true, probs, class_names, "runs/x/eval")
        # -> error_gallery.png (grid of panels) + error_gallery.csv (one row per panel)

Grad-CAM (Selvaraju et al. 2017): for an image and a class c, take a spatial feature map A
(h, w, K) and the class logit y_c; weight each channel by the spatial mean of dy_c / dA_k, sum
the weighted channels, ReLU, resize bilinearly to the input size and divide by the image's
maximum. The map shows where evidence FOR class c lies (for a misclassified image: for the
wrong, predicted class), at the feature map's resolution (input / 32 for the registry's
backbones: 2 x 2 cells at 64 px, 16 x 16 at 512 px).

Which feature map: ``layer=None`` walks the layers of the nested model named "backbone" (the
model itself when it has none) from the last to the first and takes the first whose output is
4-D (B, h, w, K); when that layer is itself a nested model, the walk goes on inside it. For
every backbone of the registry this is the backbone's final activation (mobilenet_v1
``conv_pw_13_relu``, mobilenet_v2 ``out_relu``, resnet ``stage4_block2_out``, efficientnet
``top_activation``), the standard Grad-CAM choice: the last, most semantic, spatial features
right before the head's global average pooling. ``layer`` may also name any layer (searched in
the backbone first, then the whole model, at any depth) or be the layer object itself.

How the feature map is reached: a functional keras.Model cannot take a tensor from inside a
nested model as an output (it belongs to the nested model's own graph, not to the outer
input). So the model is rebuilt around a "tap", sharing every layer and weight: the innermost
model containing the layer and then each enclosing model is re-traced with
``keras.models.clone_model(clone_function=identity, call_function=...)`` (a Sequential: layer by
layer), where the call of the layer (innermost) or of the tapped inner model (enclosing levels)
hands the feature map out as an extra output. The result maps the outer input to
[feature map, logits]; no layer or weight is copied.

Mixed precision: the tapped model runs the layers with the dtype policies they were built
with; the feature map, its gradient and the logits are cast to float32 before any arithmetic,
and the maps come back as float32.

Figures follow utils/evaluate/plots.py: a bare ``matplotlib.figure.Figure`` (Agg canvas, no
pyplot); matplotlib, TensorFlow and Keras are imported inside the functions, so importing this
module costs nothing.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BACKBONE_LAYER = "backbone"
GALLERY_PNG = "error_gallery.png"
GALLERY_CSV = "error_gallery.csv"
CSV_COLUMNS = ("rank", "index", "file", "true", "predicted", "confidence", "p_true")
DEFAULT_LIMIT = 24
OVERLAY_CMAP = "jet"
OVERLAY_ALPHA = 0.4
_MAX_COLUMNS = 6


# --------------------------------------------------------------------------- Grad-CAM


def _is_model(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.Model)


def _is_spatial(layer: Any) -> bool:
    import keras

    if isinstance(layer, keras.layers.InputLayer):
        return False
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # never called, or called more than once
        return False
    return len(shape) == 4


def _last_spatial_path(container: Any) -> list:
    """[layer] or [nested model, ..., layer]: the last layer with a 4-D output, per the module doc."""
    for layer in reversed(container.layers):
        if _is_spatial(layer):
            return [layer, *_last_spatial_path(layer)] if _is_model(layer) else [layer]
    raise ValueError(f"no layer with a 4-D (spatial) output in {container.name!r}")


def _path_to(container: Any, target: Any) -> list | None:
    """The chain of nested layers from ``container`` down to ``target`` (a layer or a name)."""
    for layer in container.layers:
        if layer is target or (isinstance(target, str) and layer.name == target):
            return [layer]
        if _is_model(layer):
            inner = _path_to(layer, target)
            if inner is not None:
                return [layer, *inner]
    return None


def feature_layer_path(model: Any, layer: Any = None) -> list:
    """The nested layers from ``model`` down to the Grad-CAM feature layer (the last is the layer).

    ``layer``: None (automatic, see the module doc), a layer name or a layer object.
    """
    backbone = next((l for l in model.layers if l.name == BACKBONE_LAYER and _is_model(l)), None)
    if layer is None:
        return ([backbone, *_last_spatial_path(backbone)] if backbone is not None
                else _last_spatial_path(model))
    path = None
    if backbone is not None:
        inner = _path_to(backbone, layer)
        path = [backbone, *inner] if inner is not None else None
    path = path or _path_to(model, layer)
    if path is None:
        name = layer if isinstance(layer, str) else getattr(layer, "name", layer)
        raise ValueError(f"no layer {name!r} in model {model.name!r}")
    if _is_model(path[-1]):  # a nested model stands for its own last spatial layer
        path = [*path, *_last_spatial_path(path[-1])]
    if not _is_spatial(path[-1]):
        raise ValueError(f"layer {path[-1].name!r} has output shape {tuple(path[-1].output.shape)}; "
                         "Grad-CAM needs a 4-D (B, h, w, K) feature map")
    return path


def _retrace(container: Any, call_function: Any) -> Any:
    """container re-traced on a fresh input with the same layers, each call going through
    ``call_function(layer, *args, **kwargs)``."""
    import keras

    if isinstance(container, keras.Sequential):  # clone_model has no call_function for these
        inputs = keras.Input(batch_shape=tuple(container.inputs[0].shape),
                             dtype=container.inputs[0].dtype)
        x = inputs
        for layer in container.layers:
            x = call_function(layer, x)
        return keras.Model(inputs, x)
    return keras.models.clone_model(container, clone_function=lambda layer: layer,
                                    call_function=call_function)


def _tapped(container: Any, path: list) -> Any:
    """keras.Model: container's inputs -> [output of path[-1], *container's outputs], same layers.

    The container is re-traced (rather than Model(container.inputs, [layer.output, ...])) because
    a layer may belong to several graphs: keras clones the graph of a functional model whose
    input is not an Input (the efficientnet backbone), so ``layer.output`` can be a tensor of
    another graph.
    """
    import keras

    head, rest = path[0], path[1:]
    inner = _tapped(head, rest) if rest else None
    captured = []

    def call_function(layer, *args, **kwargs):
        if layer is not head:
            return layer(*args, **kwargs)
        if inner is None:
            outputs = layer(*args, **kwargs)
            captured.append(outputs)
            return outputs
        feature, *outputs = inner(*args, **kwargs)
        captured.append(feature)
        return outputs[0] if len(outputs) == 1 else outputs

    rebuilt = _retrace(container, call_function)
    if len(captured) != 1:
        raise ValueError(f"{head.name!r} is called {len(captured)} times in {container.name!r}; "
                         "Grad-CAM needs a layer used once")
    return keras.Model(rebuilt.input, [captured[0], *rebuilt.outputs],  # .input: the same nesting
                       name=f"{container.name}_tapped")


def grad_cam_model(model: Any, layer: Any = None) -> Any:
    """keras.Model: the model's input -> [feature map (B, h, w, K), logits (B, K')], sharing weights."""
    tapped = _tapped(model, feature_layer_path(model, layer))
    if len(tapped.outputs) != 2:
        raise ValueError(f"Grad-CAM needs a model with one output, {model.name!r} has "
                         f"{len(tapped.outputs) - 1}")
    return tapped


def _as_batch(images: Any, input_shape: tuple) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3 and len(input_shape) == 4 and input_shape[-1] == 1:
        x = x[..., None]  # (N, H, W) gray -> (N, H, W, 1)
    expected = tuple(input_shape[1:])
    if x.ndim != len(input_shape) or any(e is not None and e != d for e, d in zip(expected, x.shape[1:])):
        raise ValueError(f"images of shape {x.shape[1:]} do not fit the model's input {expected}")
    return x


def grad_cam(model: Any, images: Any, class_indices: Any, layer: Any = None, *,
             batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heat maps float32 (N, H, W) in [0, 1], at the input's size.

    Args:
        model: a keras.Model giving logits (as models.build_model does; softmax outputs work
            too, with less contrast). Dropout and BatchNormalization run in inference mode.
        images: (N, H, W, C) (or (N, H, W) for a 1-channel model), the model's input: values
            0..255, any dtype (cast to float32).
        class_indices: the class explained per image, (N,) ints or one int for all.
        layer: the feature layer, None for automatic (see the module doc), a name or a layer.
        batch_size: images per forward/backward pass.

    An image whose map is zero everywhere (no positive evidence for the class) gets zeros.
    """
    import tensorflow as tf

    tapped = grad_cam_model(model, layer)
    x = _as_batch(images, tuple(model.inputs[0].shape))
    n = x.shape[0]
    classes = np.broadcast_to(np.asarray(class_indices, dtype=np.int64), (n,))
    num_classes = int(tapped.outputs[1].shape[-1])
    if n and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"class_indices must be in [0, {num_classes}), got "
                         f"{classes.min()}..{classes.max()}")
    height, width = x.shape[1:3]
    maps = np.zeros((n, height, width), dtype=np.float32)
    for start in range(0, n, max(1, int(batch_size))):
        batch = tf.convert_to_tensor(x[start:start + batch_size])
        chosen = tf.convert_to_tensor(classes[start:start + batch_size])
        with tf.GradientTape() as tape:
            feature, logits = tapped(batch, training=False)
            score = tf.gather(tf.cast(logits, tf.float32), chosen, axis=1, batch_dims=1)
            total = tf.reduce_sum(score)  # images are independent: d total / d A_i = d y_i / d A_i
        grads = tape.gradient(total, feature)
        if grads is None:
            raise ValueError("the logits do not depend on the chosen feature map")
        feature = tf.cast(feature, tf.float32)
        weights = tf.reduce_mean(tf.cast(grads, tf.float32), axis=(1, 2), keepdims=True)  # (b, 1, 1, K)
        cam = tf.nn.relu(tf.reduce_sum(weights * feature, axis=-1, keepdims=True))  # (b, h, w, 1)
        cam = tf.image.resize(cam, (height, width), method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)  # all-zero maps stay zero
        maps[start:start + batch_size] = np.clip(cam.numpy(), 0.0, 1.0)
    return maps


# --------------------------------------------------------------------------- selection


def select_errors(y_true: Any, probs: Any, limit: int | None = DEFAULT_LIMIT) -> np.ndarray:
    """Indices (int64) of the misclassified images, the most confident error first.

    Predicted = argmax of ``probs`` (N, K); confidence = its probability. Images whose label is
    outside 0..K-1 (e.g. -1, unlabelled) are never errors. Ties keep the input order.
    ``limit`` None keeps every error.
    """
    t = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != t.shape[0]:
        raise ValueError(f"probs must be (N, K) with N = len(y_true) = {t.shape[0]}, got {p.shape}")
    if t.size == 0:
        return np.zeros(0, dtype=np.int64)
    predicted = p.argmax(axis=1)
    confidence = p[np.arange(t.size), predicted]
    wrong = np.flatnonzero((t >= 0) & (t < p.shape[1]) & (predicted != t))
    order = wrong[np.argsort(-confidence[wrong], kind="stable")]
    return (order if limit is None else order[:max(0, int(limit))]).astype(np.int64)


# --------------------------------------------------------------------------- gallery


def _gray(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., 0] if img.shape[-1] == 1 else img[..., :3].mean(axis=-1)
    return img


def _heatmap_for(heatmaps: Any, index: int) -> np.ndarray | None:
    if heatmaps is None:
        return None
    if isinstance(heatmaps, Mapping):
        found = heatmaps.get(int(index))
        return None if found is None else np.asarray(found, dtype=np.float32)
    return np.asarray(heatmaps[index], dtype=np.float32)


def _short(name: str, width: int = 34) -> str:
    """A file name cut in the middle to fit under a panel (the CSV keeps the full path)."""
    return name if len(name) <= width else name[: width // 2 - 1] + "..." + name[-(width // 2 - 2):]


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %s", path)


def write_error_gallery(path_png: str | os.PathLike, images_uint8: Any, y_true: Any, probs: Any,
                        class_names: Sequence[str], heatmaps: Any = None,
                        files: Sequence[str] | None = None, limit: int | None = DEFAULT_LIMIT, *,
                        note: str | None = None, positions: Sequence[int] | None = None,
                        totals: tuple[int, int] | None = None) -> Path | None:
    """A grid of the most confident errors (see select_errors) as a PNG, and a CSV beside it.

    Each panel: the image in gray, the Grad-CAM map over it (``OVERLAY_CMAP``, alpha
    ``OVERLAY_ALPHA``) when there is one, titled "true X / pred Y (0.93)", the file's basename
    below. The figure's title says how many errors are shown of how many images (plus ``note``);
    it is also stored as the PNG's "Title" text field.

    Args:
        images_uint8: (N, H, W), (N, H, W, 1) or (N, H, W, 3) 0..255, aligned with y_true/probs
            (3 channels are shown as their mean).
        heatmaps: None, an array (N, h, w) aligned with the images, or a mapping
            image index -> (h, w) map holding at least the shown errors (others draw plain).
            Maps are stretched over the image, so h, w may differ from H, W.
        files: N paths (only the basename is shown; the CSV keeps the full path), or None.

    The CSV (``path_png`` with suffix ".csv"; error_gallery.csv for the default name) has one row
    per panel, in panel order: rank (1 = most confident error), index (into the inputs), file,
    true, predicted (class names), confidence (probability of the predicted class, 4 decimals),
    p_true (probability of the true class).

    When the inputs are only the errors picked from a larger evaluation (so that not every image is
    held in memory), ``positions`` gives each input's index in that evaluation (the CSV's index
    column) and ``totals`` its (errors, images) counts for the title.

    Returns the PNG's path, or None, writing nothing, when there is no error.
    """
    t = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if len(class_names) != p.shape[-1]:
        raise ValueError(f"{len(class_names)} class names for {p.shape[-1]} probability columns")
    if len(images_uint8) != t.size or (files is not None and len(files) != t.size):
        raise ValueError("images, files, y_true and probs must have the same length")
    chosen = select_errors(t, p, limit)
    n_errors, n_images = totals if totals is not None else (select_errors(t, p, None).size, t.size)
    if chosen.size == 0:
        logger.info("no misclassified image: no error gallery")
        return None

    from matplotlib.figure import Figure

    path = Path(path_png)
    n = chosen.size
    ncols = min(_MAX_COLUMNS, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(2.6 * ncols, 2.9 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    rows = []
    for rank, (ax, i) in enumerate(zip(axes, chosen), start=1):
        i = int(i)
        pred = int(p[i].argmax())
        conf = float(p[i, pred])
        img = _gray(images_uint8[i])
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        heat = _heatmap_for(heatmaps, i)
        if heat is not None:
            h, w = img.shape[:2]
            ax.imshow(heat, cmap=OVERLAY_CMAP, alpha=OVERLAY_ALPHA, vmin=0.0, vmax=1.0,
                      extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
        ax.set_title(f"true {class_names[t[i]]} / pred {class_names[pred]} ({conf:.2f})", fontsize=8)
        name = _short(os.path.basename(os.fspath(files[i]))) if files is not None else f"#{i}"
        ax.set_xlabel(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        rows.append({
            "rank": rank, "index": int(positions[i]) if positions is not None else i, "file": os.fspath(files[i]) if files is not None else "",
            "true": class_names[t[i]], "predicted": class_names[pred],
            "confidence": f"{conf:.4f}", "p_true": f"{float(p[i, t[i]]):.4f}",
        })
    for ax in axes[n:]:
        ax.set_axis_off()
    title = (f"{n} most confident of {n_errors} errors ({n_images} images)" if n < n_errors
             else f"{n_errors} errors ({n_images} images), most confident first")
    if heatmaps is not None:
        title += f"; Grad-CAM for the predicted class ({OVERLAY_CMAP})"
    if note:
        title += f"\n{note}"
    fig.suptitle(title, fontsize=10)
    os.makedirs(path.parent, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Title": title})
    logger.info("wrote %s", path)
    _write_csv(path.with_suffix(".csv"), rows)
    return path


def keras_model_of(model_or_predictor: Any) -> Any:
    """The keras.Model behind a model or a predictor (KerasPredictor.model), else None."""
    import keras

    if isinstance(model_or_predictor, keras.Model):
        return model_or_predictor
    inner = getattr(model_or_predictor, "model", None)
    return inner if isinstance(inner, keras.Model) else None


def error_gallery(model_or_predictor: Any, files: Sequence[str] | None, images_uint8: Any,
                  y_true: Any, probs: Any, class_names: Sequence[str],
                  out_dir: str | os.PathLike, limit: int | None = DEFAULT_LIMIT, *,
                  positions: Sequence[int] | None = None, totals: tuple[int, int] | None = None) -> Path | None:
    """Write ``out_dir``/error_gallery.png and error_gallery.csv for the most confident errors.

    ``images_uint8`` are the model's inputs (N, S, S, C) 0..255. Grad-CAM (for the predicted
    class) is computed only for the shown errors, and only when there is a keras.Model (a
    keras.Model or a predictor with one as ``.model``); otherwise (TFLite, ONNX, SavedModel)
    the gallery is drawn without saliency and its title says so. A Grad-CAM failure is logged
    and likewise leaves the saliency out. Returns the PNG's path, or None when there is no error.
    """
    p = np.asarray(probs, dtype=np.float64)
    chosen = select_errors(y_true, p, limit)
    if chosen.size == 0:
        logger.info("no misclassified image: no error gallery")
        return None
    heatmaps, note = None, None
    model = keras_model_of(model_or_predictor)
    if model is None:
        note = f"no saliency: Grad-CAM needs the Keras model ({type(model_or_predictor).__name__})"
    else:
        try:
            batch = np.stack([np.asarray(images_uint8[int(i)]) for i in chosen])
            maps = grad_cam(model, batch, p[chosen].argmax(axis=1))
            heatmaps = {int(i): m for i, m in zip(chosen, maps)}
        except Exception as exc:  # noqa: BLE001 - the gallery is worth having without the maps
            logger.warning("Grad-CAM failed (%s): error gallery without saliency", exc)
            note = f"no saliency: Grad-CAM failed ({type(exc).__name__})"
    return write_error_gallery(Path(out_dir) / GALLERY_PNG, images_uint8, y_true, p, class_names,
                               heatmaps=heatmaps, files=files, limit=limit, note=note, positions=positions,
                               totals=totals)


__all__ = [
    "CSV_COLUMNS",
    "GALLERY_CSV",
    "GALLERY_PNG",
    "error_gallery",
    "feature_layer_path",
    "grad_cam",
    "grad_cam_model",
    "keras_model_of",
    "select_errors",
    "write_error_gallery",
]
