"""utils.evaluate.gallery: Grad-CAM finds what the model looked at; the error gallery's files."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from utils.evaluate import gallery

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE, SQUARE = 64, 10


def _png_title(path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return im.text.get("Title", "")


def _read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _squares(n: int, rng: np.random.Generator):
    """Bright noise (150..255); class 1 (odd indices) has a dark 10 x 10 square at a random place.

    Dark on bright on purpose: an untrained ReLU network's activations (and any saliency that
    ignores the gradient) lean towards bright pixels, so finding the DARK square needs the
    class-specific gradient.
    """
    x = rng.uniform(150, 255, (n, SIZE, SIZE, 1)).astype(np.float32)
    y = np.arange(n) % 2
    corners = rng.integers(0, SIZE - SQUARE + 1, (n, 2))
    for i in np.flatnonzero(y == 1):
        r, c = corners[i]
        x[i, r:r + SQUARE, c:c + SQUARE] = 20.0
    return x, y, corners


def _tiny_model(num_classes: int = 2):
    """The registry's shape in small: image -> preprocess -> nested "backbone" -> shared head."""
    import keras

    from models.head import classification_head

    image = keras.Input((SIZE, SIZE, 1), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(image)
    inner = keras.Input((SIZE, SIZE, 1))
    f = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inner)
    f = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(f)
    f = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="features")(f)
    backbone = keras.Model(inner, f, name="backbone")
    return keras.Model(image, classification_head(backbone(x), num_classes, 0.0), name="tiny")


@pytest.fixture(scope="module")
def trained():
    """The tiny model trained (seeded, ~2 s) to tell images with the dark square from those without."""
    import keras

    keras.utils.set_random_seed(0)
    x, y, _ = _squares(512, np.random.default_rng(0))
    model = _tiny_model()
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    return model


def _inside(points: np.ndarray, corners: np.ndarray, margin: int = 0) -> np.ndarray:
    r, c = corners[:, 0], corners[:, 1]
    return ((points[:, 0] >= r - margin) & (points[:, 0] < r + SQUARE + margin)
            & (points[:, 1] >= c - margin) & (points[:, 1] < c + SQUARE + margin))


def _mass_inside(maps: np.ndarray, corners: np.ndarray) -> np.ndarray:
    return np.array([m[r:r + SQUARE, c:c + SQUARE].sum() / max(m.sum(), 1e-12)
                     for m, (r, c) in zip(maps, corners)])


# --------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_localises_the_square(trained):
    x, y, corners = _squares(64, np.random.default_rng(1))
    assert (trained.predict(x, verbose=0).argmax(axis=1) == y).mean() >= 0.9  # it did learn
    pos = np.flatnonzero(y == 1)
    maps = gallery.grad_cam(trained, x[pos], 1)
    assert maps.shape == (pos.size, SIZE, SIZE) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and np.allclose(maps.max(axis=(1, 2)), 1.0)
    peaks = np.array([np.unravel_index(m.argmax(), m.shape) for m in maps])
    assert _inside(peaks, corners[pos], margin=2).mean() >= 0.8
    assert _mass_inside(maps, corners[pos]).mean() > 0.2  # the square is 2.4 % of the image
    # The sign matters: evidence AGAINST class 0 sits in the square, so its map (ReLU) avoids it.
    against = gallery.grad_cam(trained, x[pos], np.zeros(pos.size, dtype=int))
    assert _mass_inside(against, corners[pos]).mean() < 0.05


@pytest.mark.parametrize("name, feature", [
    ("mobilenet_v1", "conv_pw_13_relu"),
    ("resnet18", "stage4_block2_out"),
    ("efficientnet_b0", "top_activation"),
])
def test_grad_cam_on_registry_backbones(name, feature):
    import models

    model = models.build_model(name, 5, (SIZE, SIZE, 1), None)
    path = gallery.feature_layer_path(model)
    assert [layer.name for layer in path] == ["backbone", feature]
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 1)).astype(np.uint8)

    # The tapped model shares the weights: same logits as the model itself.
    features, logits = gallery.grad_cam_model(model)(images.astype(np.float32), training=False)
    assert features.shape[0] == 3 and len(features.shape) == 4
    np.testing.assert_allclose(logits.numpy(), model(images.astype(np.float32), training=False).numpy(),
                               rtol=1e-5, atol=1e-5)

    maps = gallery.grad_cam(model, images, [0, 2, 4])
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    gray = gallery.grad_cam(model, images[..., 0], [0, 2, 4])  # (N, H, W) for a 1-channel model
    np.testing.assert_allclose(gray, maps, atol=1e-6)


def test_grad_cam_layer_choice_and_errors(trained):
    path = gallery.feature_layer_path(trained, "features")
    assert [layer.name for layer in path] == ["backbone", "features"]
    assert gallery.feature_layer_path(trained, "backbone")[-1].name == "features"
    first_conv = trained.get_layer("backbone").layers[1]
    assert gallery.feature_layer_path(trained, first_conv)[-1] is first_conv
    x, _, _ = _squares(4, np.random.default_rng(2))
    fine = gallery.grad_cam(trained, x, 1, layer=first_conv)  # a 32 x 32 map, resized to 64 x 64
    assert fine.shape == (4, SIZE, SIZE) and fine.max() <= 1.0
    with pytest.raises(ValueError, match="no layer 'nope'"):
        gallery.grad_cam(trained, x, 1, layer="nope")
    with pytest.raises(ValueError, match="4-D"):
        gallery.grad_cam(trained, x, 1, layer="logits")
    with pytest.raises(ValueError, match="class_indices"):
        gallery.grad_cam(trained, x, 2)
    with pytest.raises(ValueError, match="do not fit"):
        gallery.grad_cam(trained, x[:, :32, :32], 1)


def test_grad_cam_is_float32_under_mixed_precision():
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _tiny_model(3)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert gallery.feature_layer_path(model)[-1].compute_dtype == "float16"
    x, _, _ = _squares(4, np.random.default_rng(3))
    maps = gallery.grad_cam(model, x.astype(np.uint8), [0, 1, 2, 1])
    assert maps.dtype == np.float32 and np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_import_has_no_side_effects():
    code = ("import sys, utils.evaluate.gallery; "
            "print(any(m in sys.modules for m in ('matplotlib', 'tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- selection


def test_select_errors_orders_by_confidence_and_skips_correct_ones():
    y_true = np.array([0, 1, 2, 0, 1, -1, 2])
    probs = np.array([
        [0.9, 0.05, 0.05],  # 0 correct
        [0.6, 0.3, 0.1],    # 1 error, 0.6
        [0.1, 0.85, 0.05],  # 2 error, 0.85
        [0.2, 0.7, 0.1],    # 3 error, 0.7
        [0.1, 0.8, 0.1],    # 4 correct
        [0.99, 0.0, 0.01],  # 5 unlabelled: never an error
        [0.1, 0.2, 0.7],    # 6 correct
    ])
    assert gallery.select_errors(y_true, probs).tolist() == [2, 3, 1]
    assert gallery.select_errors(y_true, probs, limit=2).tolist() == [2, 3]
    assert gallery.select_errors(y_true, probs, limit=None).dtype == np.int64
    ties = np.array([[0.2, 0.8], [0.2, 0.8], [0.2, 0.8]])
    assert gallery.select_errors([0, 0, 0], ties).tolist() == [0, 1, 2]  # ties: input order
    assert gallery.select_errors([0, 1], np.eye(2)).size == 0
    assert gallery.select_errors([], np.zeros((0, 3))).size == 0
    with pytest.raises(ValueError, match="probs"):
        gallery.select_errors([0, 1], np.eye(3))


# --------------------------------------------------------------------------- gallery files


@pytest.fixture
def predictions():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (9, 32, 32, 1), dtype=np.uint8)
    y_true = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    probs = np.tile(np.eye(3)[y_true] * 0.9 + 0.05, (1, 1))
    probs[1] = [0.7, 0.2, 0.1]   # error 0.70
    probs[5] = [0.05, 0.9, 0.05]  # error 0.90
    probs[6] = [0.3, 0.2, 0.5]   # error 0.50
    files = [f"/data/set/img_{i}.png" for i in range(9)]
    return images, y_true, probs, files


def test_write_error_gallery_writes_png_and_csv(tmp_path, predictions):
    images, y_true, probs, files = predictions
    heat = {5: np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)}  # maps may be coarser
    out = gallery.write_error_gallery(tmp_path / "eval" / "error_gallery.png", images, y_true,
                                      probs, ["abd", "chest", "spine"], heatmaps=heat, files=files)
    assert out == tmp_path / "eval" / "error_gallery.png"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 1000
    assert "3 errors (9 images)" in _png_title(out)
    rows = _read_csv(tmp_path / "eval" / "error_gallery.csv")
    assert list(rows[0]) == list(gallery.CSV_COLUMNS)
    assert [(r["rank"], r["index"], r["true"], r["predicted"], r["confidence"]) for r in rows] == [
        ("1", "5", "spine", "chest", "0.9000"),
        ("2", "1", "chest", "abd", "0.7000"),
        ("3", "6", "abd", "spine", "0.5000"),
    ]
    assert rows[0]["file"] == "/data/set/img_5.png" and rows[0]["p_true"] == "0.0500"

    # Aligned heat maps, 2-D images, no files, a limit.
    limited = gallery.write_error_gallery(tmp_path / "g2.png", images[..., 0], y_true, probs,
                                          ["abd", "chest", "spine"],
                                          heatmaps=np.zeros((9, 32, 32)), limit=2)
    assert limited is not None and "2 most confident of 3 errors" in _png_title(limited)
    rows = _read_csv(tmp_path / "g2.csv")
    assert [r["index"] for r in rows] == ["5", "1"] and rows[0]["file"] == ""


def test_write_error_gallery_without_errors_writes_nothing(tmp_path, predictions):
    images, y_true, _, files = predictions
    out = gallery.write_error_gallery(tmp_path / "error_gallery.png", images, y_true,
                                      np.eye(3)[y_true], ["a", "b", "c"], files=files)
    assert out is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="class names"):
        gallery.write_error_gallery(tmp_path / "x.png", images, y_true, np.eye(3)[y_true], ["a", "b"])


class _Keras:
    """Stands in for KerasPredictor: the keras model as ``.model``."""

    def __init__(self, model):
        self.model = model


class _TFLite:
    """Stands in for a TFLite / ONNX predictor: no keras model."""

    def predict(self, batch):
        raise AssertionError("the gallery does not predict")


def test_error_gallery_with_and_without_a_keras_model(tmp_path, trained):
    x, y, _ = _squares(8, np.random.default_rng(5))
    images = x.astype(np.uint8)
    probs = np.eye(2)[1 - y] * 0.8 + 0.1  # every image misclassified
    files = [f"f{i}.png" for i in range(8)]

    out = gallery.error_gallery(_Keras(trained), files, images, y, probs, ["none", "square"],
                                tmp_path / "keras", limit=4)
    assert out == tmp_path / "keras" / gallery.GALLERY_PNG
    assert "Grad-CAM" in _png_title(out) and "no saliency" not in _png_title(out)
    assert len(_read_csv(tmp_path / "keras" / gallery.GALLERY_CSV)) == 4

    out = gallery.error_gallery(_TFLite(), files, images, y, probs, ["none", "square"],
                                tmp_path / "tflite")
    assert "no saliency" in _png_title(out) and "_TFLite" in _png_title(out)
    assert len(_read_csv(tmp_path / "tflite" / gallery.GALLERY_CSV)) == 8

    assert gallery.error_gallery(trained, files, images, y, np.eye(2)[y], ["none", "square"],
                                 tmp_path / "none") is None
    assert not (tmp_path / "none").exists()


def test_a_gallery_of_errors_picked_from_a_larger_evaluation_names_their_positions_and_totals(tmp_path):
    images = np.full((2, 16, 16), 90, np.uint8)
    y_true, probs = np.array([0, 1]), np.array([[0.2, 0.8], [0.9, 0.1]])
    path = gallery.write_error_gallery(tmp_path / "g.png", images, y_true, probs, ["a", "b"], positions=[41, 7],
                                       totals=(5, 300))
    assert "2 most confident of 5 errors (300 images)" in _png_title(path)
    assert [r["index"] for r in _read_csv(tmp_path / "g.csv")] == ["7", "41"]  # most confident error first
