"""The shortcut check (utils/evaluate/shortcuts.py): masks, body mask, CAM shares, the group-bootstrapped
location, the source probe on synthetic features, and one end-to-end run on a tiny untrained model."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from utils.evaluate import shortcuts as S


def smooth_image(size: int = 128, seed: int = 0) -> np.ndarray:
    """A soft gradient with mild low-frequency variation: no structure a top-hat keeps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)), (0, 0), size / 8)
    return np.clip(60 + 60 * yy + 20 * xx + 30 * noise / (np.abs(noise).max() + 1e-9), 0, 255).astype(np.uint8)


# --- masks -----------------------------------------------------------------------------------
def test_border_band_covers_each_side():
    band = S.border_band((100, 200), 0.1)
    assert band[:10].all() and band[-10:].all() and band[:, :20].all() and band[:, -20:].all()
    assert not band[10:90, 20:180].any()
    assert band.mean() == pytest.approx(1 - 0.8 * 0.8)
    assert not S.border_band((10, 10), 0.0).any()
    with pytest.raises(ValueError):
        S.border_band((10, 10), 0.5)


def test_mask_border_sets_the_band_to_the_median_and_keeps_the_rest():
    image = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)
    out = S.mask_border(image, 0.15)
    band = S.border_band(image.shape, 0.15)
    assert (out[band] == np.uint8(np.median(image))).all()
    assert (out[~band] == image[~band]).all()
    assert out.dtype == np.uint8 and image is not out


def test_text_mask_finds_a_marker_near_a_corner_but_not_in_the_middle_or_in_texture():
    image = smooth_image()
    assert not S.text_mask(image).any()  # nothing small and bright
    marked = image.copy()
    cv2.putText(marked, "R", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 255, 1)  # a side marker, top left
    found = S.text_mask(marked)
    assert found[2:16, 2:14].mean() > 0.5 and found.mean() < 0.03
    centred = image.copy()
    cv2.putText(centred, "R", (60, 68), cv2.FONT_HERSHEY_SIMPLEX, 0.35, 255, 1)
    assert not S.text_mask(centred).any()  # text in the middle is out of the detector's reach
    textured = image.copy()  # small bright blobs side by side: the texture of an equalised film, not text
    for y in range(2, 40, 4):
        for x in range(2, 126, 4):
            textured[y:y + 2, x:x + 2] = 255
    assert S.text_mask(textured)[:36].mean() < 0.05
    masked = S.mask_text(marked)
    assert (masked[found] == np.uint8(np.median(marked))).all() and (masked[~found] == marked[~found]).all()


def ellipse_image(size: int = 128, centres=((64, 64),), axes=(30, 45), lungs: bool = False) -> np.ndarray:
    image = np.full((size, size), 15, np.uint8)
    for c in centres:
        cv2.ellipse(image, c, axes, 0, 0, 360, 170, -1)
        if lungs:  # dark fields inside the body outline, as a chest's lungs
            cv2.ellipse(image, (c[0] - 12, c[1]), (8, 25), 0, 0, 360, 25, -1)
            cv2.ellipse(image, (c[0] + 12, c[1]), (8, 25), 0, 0, 360, 25, -1)
    return image


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("lungs", [False, True])
def test_body_mask_is_the_outline_with_dark_fields_inside_filled(lungs):
    image = ellipse_image(lungs=lungs)
    truth = cv2.ellipse(np.zeros((128, 128), np.uint8), (64, 64), (30, 45), 0, 0, 360, 1, -1).astype(bool)
    body = S.body_mask(image)
    assert iou(body, truth) > 0.9


def test_body_mask_keeps_two_views_side_by_side_and_drops_specks():
    image = ellipse_image(centres=((32, 64), (96, 64)), axes=(20, 40))
    image[4:7, 60:63] = 200  # a speck: a marker, not a view
    body = S.body_mask(image)
    assert body[64, 32] and body[64, 96] and not body[5, 61] and not body[64, 64]
    assert S.body_mask(np.full((32, 32), 100, np.uint8)).all()  # a flat image: all "body"


def test_cam_shares_count_mass_not_area():
    body = np.zeros((10, 10), bool)
    body[2:8, 2:8] = True
    band = S.border_band((10, 10), 0.1)
    cam = np.zeros((10, 10))
    cam[0, 0] = 3.0  # outside, in the band
    cam[5, 5] = 1.0
    assert S.cam_shares(cam, body, band) == pytest.approx((0.75, 0.75))
    assert all(np.isnan(S.cam_shares(np.zeros((10, 10)), body, band)))


# --- bootstrap helpers -----------------------------------------------------------------------
def test_weighted_median_equals_the_median_of_the_repeated_values():
    rng = np.random.default_rng(3)
    for _ in range(200):
        values = rng.normal(size=rng.integers(1, 9))
        weights = rng.integers(0, 4, values.size)
        if weights.sum() == 0:
            assert np.isnan(S.weighted_median(values, weights))
            continue
        assert S.weighted_median(values, weights) == pytest.approx(np.median(np.repeat(values, weights)))


def test_bootstrap_location_by_group_brackets_the_estimate():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0, 1, 60), [np.nan]])
    groups = [f"p{i // 3}" for i in range(61)]
    out = S.bootstrap_location(values, groups, n_resamples=300)
    assert out["n"] == 60 and out["unit"] == "group"
    for key in ("median", "mean"):
        entry = out[key]
        assert entry["ci_low"] <= entry["value"] <= entry["ci_high"] and entry["ci_high"] - entry["ci_low"] < 0.4
    assert S.bootstrap_location([np.nan])["n"] == 0


# --- source probe ----------------------------------------------------------------------------
def synthetic(n: int = 120, signal: float = 3.0, seed: int = 0):
    """Features (n, 20) of two classes x two sources; ``signal`` shifts dimension 0 by source."""
    rng = np.random.default_rng(seed)
    label = np.repeat(["chest", "spine"], n // 2)
    source = np.where(rng.random(n) < 0.5, "archive_a", "archive_b")
    source[label == "chest"] = "archive_c"  # chests: one source
    x = rng.normal(size=(n, 20))
    x[:, 1] += 4.0 * (label == "spine")
    x[:, 0] += signal * (source == "archive_b")
    groups = np.array([f"g{i // 2}" for i in range(n)])  # pairs of images share a patient
    return x, source, label, groups


def test_probe_recovers_a_source_that_is_in_the_features():
    x, source, label, groups = synthetic(signal=4.0)
    spine = label == "spine"
    row = S.probe(x[spine], source[spine], groups[spine], n_resamples=200)
    assert row["macro_f1"]["value"] > 0.9 and row["gain_macro_f1"]["ci_low"] > 0.2
    assert row["folds"] == 5 and row["baseline"].startswith("majority")


def test_probe_stays_at_chance_when_the_source_is_not_in_the_features():
    x, source, label, groups = synthetic(signal=0.0)
    spine = label == "spine"
    row = S.probe(x[spine], source[spine], groups[spine], n_resamples=200)
    assert row["macro_f1"]["value"] < 0.75 and row["gain_macro_f1"]["ci_low"] < 0.1


def test_source_probes_rows_per_class_with_several_sources_and_rare_sources_left_out():
    x, source, label, groups = synthetic(signal=4.0)
    source[0] = "lonely"  # one chest from a source with a single patient: cannot be held out by group
    rows = S.source_probes({"head": x}, source, label, groups, ["chest", "spine"], n_resamples=50)
    assert [(r["scope"], r["baseline"].split(" ")[0]) for r in rows] == [("all", "the"), ("all", "majority"),
                                                                       ("spine", "majority")]
    assert rows[0]["left_out"] == {"lonely": 1} and "lonely" not in rows[0]["sources"]
    # Overall the label gives the source away: the label's majority source is the fair baseline.
    assert rows[0]["baseline_macro_f1"]["value"] > rows[1]["baseline_macro_f1"]["value"]
    assert rows[2]["macro_f1"]["value"] > 0.9
    assert S.probe(x[:10], ["a"] * 9 + ["b"], [f"g{i}" for i in range(10)])["skipped"]


def test_majority_source_of_label():
    assert S.majority_source_of_label(["a", "a", "a", "b"], ["x", "y", "x", "z"]) == ["x", "x", "x", "z"]


def test_masked_f1_drop_is_paired_and_zero_for_unchanged_predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    worse = np.where(rng.random(90) < 0.3, (y + 1) % 3, y)
    rows = S.masked_f1(y, {S.CLEAN: y, "same": y.copy(), "worse": worse}, 3, groups=[f"g{i // 3}" for i in range(90)],
                       n_resamples=200)
    assert rows[1]["f1_drop"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0} and rows[1]["changed"] == 0
    assert rows[2]["f1_drop"]["ci_low"] > 0 and rows[2]["changed"] == int((worse != y).sum())


def test_read_sources_matches_paths_then_names(tmp_path):
    root = tmp_path / "radiographs"
    (root / "spine").mkdir(parents=True)
    pd.DataFrame({"file": ["spine/a.png", "spine/b.png"], "source_repo": ["org/one", "org/two"]}).to_csv(
        root / "manifest.csv", index=False)
    found = S.read_sources(root / "manifest.csv", [str(root / "spine" / "a.png"), "elsewhere/b.png", "c.png"])
    assert found == ["org/one", "org/two", None]


# --- the model parts and one end-to-end run (tiny untrained MobileNet-V1) --------------------
SIZE = 64
CLASSES = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import models
    from utils.artifacts.model_file import save_model
    from utils.preprocessing import PreprocessSpec

    root = tmp_path_factory.mktemp("shortcuts")
    spec = PreprocessSpec(class_names=CLASSES, image_size=SIZE, channels=1)
    run_dir = root / "run"
    run_dir.mkdir()
    model = models.build_model("mobilenet_v1", len(CLASSES), (SIZE, SIZE, 1), None)
    save_model(model, run_dir / "best.keras", spec, model_id="tiny", backbone="mobilenet_v1")
    data, shared = root / "data", root / "shared"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, manifest = [], []
    for i in range(40):
        label = CLASSES[i % 5]
        source = "org/b" if label == "spine" and i % 2 else f"org/{label}"
        image = ellipse_image(SIZE, ((32, 32),), (12 + i % 7, 20))
        image = np.clip(image.astype(int) + rng.integers(0, 20, image.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(data / "images" / f"{i}.png"), image)
        (shared / label).mkdir(parents=True, exist_ok=True)
        rows.append({"path": f"images/{i}.png", "label": label, "split": "test" if i < 30 else "train",
                     "group": f"group:{i // 2}", "source_file": str(shared / label / f"{i}.png")})
        manifest.append({"file": f"{label}/{i}.png", "source_repo": source})
    pd.DataFrame(rows).to_csv(data / "labels.csv", index=False)
    pd.DataFrame(manifest).to_csv(shared / "manifest.csv", index=False)
    spec.save(data)
    return model, run_dir, data, shared / "manifest.csv"


def test_head_features_are_the_pooled_features_the_head_reads(tiny):
    import keras

    from models.features import stage_sizes
    from utils.infer.predictor import with_features

    model = tiny[0]
    x = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 1)).astype(np.float32)
    _, stats = with_features(model)(x, training=False)
    pooled = keras.Model(model.inputs, model.get_layer("avg_pool").output)(x, training=False)
    np.testing.assert_allclose(S.head_features(np.asarray(stats), stage_sizes(model)), np.asarray(pooled),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        S.head_features(np.zeros((2, 7)), [4, 4])


def test_cam_measures_give_shares_in_range(tiny):
    images = [ellipse_image(SIZE, ((32, 32),), (12, 20)) for _ in range(3)]
    out = S.cam_measures(tiny[0], images, [0, 1, 2], channels=1)
    for key, values in out.items():
        finite = values[np.isfinite(values)]
        assert ((finite >= 0) & (finite <= 1)).all(), key
    assert out["area_border"] == pytest.approx(np.full(3, S.border_band((SIZE, SIZE), S.CAM_BORDER_FRACTION).mean()))


def test_bench_shortcuts_end_to_end(tiny, tmp_path, capsys):
    from bench import shortcuts as bench

    _, run_dir, data, manifest = tiny
    assert bench.main(["--model", str(run_dir), "--data", str(data), "--sources", str(manifest),
                       "--resamples", "20", "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / S.SHORTCUTS_JSON).read_text())
    assert summary["n_images"] == 30 and summary["split"] == "test"
    assert [r["condition"] for r in summary["masked"]] == [S.CLEAN, "border 8%", "border 15%", "text",
                                                          "text + border 8%"]
    scopes = {(r["features"], r["scope"]) for r in summary["probe"]}
    assert ("head", "spine") in scopes and ("stages", "all") in scopes
    assert summary["cam"]["all"]["outside_body"]["n"] > 0
    printed = capsys.readouterr().out
    assert "## Source probe" in printed and "| head: spine |" in printed and "## Grad-CAM" in printed
    assert (tmp_path / S.SHORTCUTS_MD).read_text() in printed
