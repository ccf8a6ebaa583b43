"""utils.evaluate.calibration: temperature fit, ECE, risk-coverage, the recommended threshold, and
calibrate_run storing it all in the model's metadata."""

from __future__ import annotations

import json
import logging
import zipfile

import cv2
import numpy as np
import pandas as pd
import pytest

from utils.evaluate import calibration as C
from utils.preprocessing import PreprocessSpec


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def calibrated():
    """Logits of a known classifier and labels drawn from its own softmax: calibrated by construction."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(logits)])
    return logits, labels


# --- temperature ---------------------------------------------------------------------------------


def test_temperature_undoes_an_over_confident_model(calibrated):
    logits, labels = calibrated
    over = 5.0 * logits  # the same classifier, five times too sure of itself
    t = C.fit_temperature(over, labels)
    assert t == pytest.approx(5.0, rel=0.1)
    before, after = C.nll_of_logits(over, labels), C.nll_of_logits(over, labels, t)
    assert after < before - 0.5
    assert after == pytest.approx(C.nll_of_logits(logits, labels), abs=0.01)  # as good as the known classifier
    assert C.nll(softmax(over / t), labels) == pytest.approx(after, abs=1e-6)
    assert np.array_equal(softmax(over / t).argmax(1), over.argmax(1))  # labels never change


def test_temperature_sharpens_an_under_confident_model(calibrated):
    logits, labels = calibrated
    under = logits / 3.0
    t = C.fit_temperature(under, labels)
    assert t == pytest.approx(1 / 3.0, rel=0.1)
    assert C.nll_of_logits(under, labels, t) < C.nll_of_logits(under, labels)
    assert C.fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)  # calibrated: T stays near 1


def test_temperature_stays_inside_its_bounds_and_refuses_bad_input():
    separable = np.array([[3.0, 0.0], [0.0, 3.0]] * 20)
    labels = np.array([0, 1] * 20)
    assert C.fit_temperature(separable, labels) == pytest.approx(C.TEMPERATURE_BOUNDS[0])  # sharper is always better
    assert C.fit_temperature(separable, 1 - labels) == pytest.approx(C.TEMPERATURE_BOUNDS[1])  # always wrong: flatten
    with pytest.raises(ValueError, match="shape"):
        C.fit_temperature(np.zeros((0, 3)), [])
    with pytest.raises(ValueError, match="NaN"):
        C.fit_temperature(np.array([[np.nan, 0.0]]), [0])
    with pytest.raises(ValueError, match="labels"):
        C.fit_temperature(np.zeros((2, 3)), [0, 3])


# --- calibration error ---------------------------------------------------------------------------


def test_ece_is_zero_for_perfectly_calibrated_and_large_for_over_confident_predictions():
    probs, labels = [], []
    for confidence in (0.55, 0.65, 0.75, 0.85, 0.95):  # in each bin, exactly that share is right
        right = round(confidence * 100)
        probs += [[confidence, 1 - confidence]] * 100
        labels += [0] * right + [1] * (100 - right)
    ece, table = C.expected_calibration_error(probs, labels, bins=15)
    assert ece == pytest.approx(0.0, abs=1e-9)
    assert len(table) == 15 and sum(row["count"] for row in table) == 500
    row = next(r for r in table if r["count"])
    assert set(row) == {"low", "high", "count", "confidence", "accuracy"}
    assert row["low"] == pytest.approx(8 / 15) and row["confidence"] == pytest.approx(0.55)
    assert row["accuracy"] == pytest.approx(0.55)
    empty = table[0]
    assert empty["count"] == 0 and empty["confidence"] is None and empty["accuracy"] is None

    over = [[0.99, 0.01]] * 100  # sure every time, right 60 % of the time
    ece, _ = C.expected_calibration_error(over, [0] * 60 + [1] * 40, bins=15)
    assert ece == pytest.approx(0.39)
    assert C.expected_calibration_error([[1.0, 0.0]], [0], bins=15)[1][-1]["count"] == 1  # 1.0 is in the last bin


def test_ece_falls_after_temperature_scaling(calibrated):
    logits, labels = calibrated
    over = 4.0 * logits
    t = C.fit_temperature(over, labels)
    before, _ = C.expected_calibration_error(softmax(over), labels)
    after, _ = C.expected_calibration_error(softmax(over / t), labels)
    assert before > 0.1 and after < 0.03


# --- risk-coverage and the recommended threshold --------------------------------------------------

# confidences, most confident first, and whether the top label is right
CONFIDENCES = [0.99, 0.95, 0.90, 0.80, 0.80, 0.70, 0.60]
RIGHT = [1, 1, 1, 0, 1, 1, 0]


def two_class(confidences, right):
    probs = np.array([[c, 1 - c] for c in confidences])
    labels = np.array([0 if r else 1 for r in right])
    return probs, labels


def test_risk_coverage_sorted_by_confidence_with_ties_together():
    probs, labels = two_class(CONFIDENCES[::-1], RIGHT[::-1])  # input order does not matter
    curve = C.risk_coverage(probs, labels)
    assert curve.threshold.tolist() == pytest.approx([0.99, 0.95, 0.90, 0.80, 0.70, 0.60])
    assert curve.coverage.tolist() == pytest.approx([1 / 7, 2 / 7, 3 / 7, 5 / 7, 6 / 7, 1.0])
    assert curve.accuracy.tolist() == pytest.approx([1, 1, 1, 4 / 5, 5 / 6, 5 / 7])
    empty = C.risk_coverage(np.zeros((0, 2)), [])
    assert len(empty.threshold) == len(empty.coverage) == 0


@pytest.mark.parametrize("target, value, coverage, accuracy", [
    (1.0, 0.90, 3 / 7, 1.0),  # the tie at 0.80 holds a mistake: it cannot be routed at 100 %
    (0.8, 0.70, 6 / 7, 5 / 6),  # the lowest threshold reaching 0.8 (not 0.80, the first to reach it)
    (0.7, 0.60, 1.0, 5 / 7),  # everything
])
def test_recommend_threshold_returns_the_lowest_threshold_reaching_the_target(target, value, coverage, accuracy):
    probs, labels = two_class(CONFIDENCES, RIGHT)
    pick = C.recommend_threshold(probs, labels, target)
    assert pick["reachable"] is True and pick["target_accuracy"] == target and pick["n_images"] == 7
    assert (pick["value"], pick["coverage"], pick["accuracy"]) == pytest.approx((value, coverage, accuracy))
    # the rule the router applies (utils.infer.decisions: confidence >= threshold is routed) gives that share
    routed = probs.max(1) >= pick["value"]
    assert routed.mean() == pytest.approx(coverage) and (probs.argmax(1) == labels)[routed].mean() >= target
    json.dumps(pick)  # stored in the model's metadata as it is


def test_an_unreachable_target_means_review_everything():
    probs, labels = two_class(CONFIDENCES, [0, 1, 1, 0, 1, 1, 0])  # the most confident image is wrong
    pick = C.recommend_threshold(probs, labels, 0.995)
    assert pick["reachable"] is False and pick["value"] == 1.0
    assert pick["coverage"] == 0.0 and pick["accuracy"] is None  # nothing has confidence 1.0 here
    assert pick["best"] == pytest.approx({"value": 0.70, "coverage": 6 / 7, "accuracy": 4 / 6})
    with pytest.raises(ValueError, match="target_accuracy"):
        C.recommend_threshold(probs, labels, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        C.recommend_threshold(np.zeros((0, 2)), [], 0.9)


def test_min_images_is_where_one_error_still_meets_the_target():
    assert C.min_images(0.995) == 200 and C.min_images(0.95) == 20 and C.min_images(0.9) == 10
    assert C.min_images(0.5) == 2 and C.min_images(1.0) is None


def test_a_clean_record_on_too_few_images_is_not_sold_as_routing_everything():
    """The demo's case (issue 23): 30 validation images, all right, the temperature at its lower bound,
    every confidence exactly 1.0. Threshold 1.0 does route all 30 (>=, as the router compares), but 30
    images cannot show 99.5 % accuracy: the recommendation says so, and so does the summary."""
    labels = np.arange(30) % 3
    logits = np.zeros((30, 3), np.float32)
    logits[np.arange(30), labels] = np.linspace(2.0, 4.0, 30)  # right with a margin every time
    entry, _, after = C.calibration_entry(logits, labels, fitted_on="demo split=val", target_accuracy=0.995)
    assert entry["temperature"] == C.TEMPERATURE_BOUNDS[0] and (after.max(axis=1) == 1.0).all()
    pick = entry["threshold"]
    assert pick["reachable"] is True and pick["value"] == 1.0 and pick["coverage"] == 1.0
    assert (pick["n_images"], pick["routed_images"], pick["min_images"]) == (30, 30, 200)
    assert pick["enough_images"] is False
    result = C.CalibrationResult(path=None, entry=entry, labels=labels, logits=logits, probs_before=after,
                                 probs_after=after)
    text = result._temperature_summary()
    assert "routes 30 of 30 images (100.0%)" in text and "too few" in text and "not supported" in text
    assert "at least 200 images" in text
    json.dumps(pick)


def test_enough_images_once_the_routed_share_can_show_the_target():
    rng = np.random.default_rng(1)
    confidences = np.sort(rng.uniform(0.6, 1.0, 400))[::-1]
    right = np.ones(400, bool)
    right[-20:] = False  # the 20 least confident are wrong
    probs, labels = two_class(confidences, right)
    pick = C.recommend_threshold(probs, labels, 0.995)
    assert pick["reachable"] and pick["enough_images"] is True
    assert pick["routed_images"] == int((probs.max(1) >= pick["value"]).sum()) >= 200
    small = C.recommend_threshold(probs[:50], labels[:50], 0.995)  # all right, but only 50
    assert small["reachable"] and small["routed_images"] == 50 and small["enough_images"] is False
    # a target of 1.0 allows no error whatever the count: no minimum to miss
    assert C.recommend_threshold(probs[:5], labels[:5], 1.0)["enough_images"] is True


# --- calibrate_run: fit on a prepared split, store in best.keras ----------------------------------

SIZE = 32
CLASSES = ("a", "b", "c", "d", "e")
CENTRES = 255.0 * (np.arange(5) + 0.5) / 5
TRUE_SCALE, MODEL_SCALE = 0.002, 0.01  # labels follow the first; the model is 5x too sure


def brightness_model(scale: float):
    """logit_k = scale * (2 c_k m - c_k^2), m the mean pixel: the nearest brightness centre wins."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 1))
    dense = keras.layers.Dense(5)
    model = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(inputs)))
    dense.set_weights([(scale * 2 * CENTRES)[None].astype(np.float32), (-scale * CENTRES**2).astype(np.float32)])
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A prepared dataset (flat gray images, labels drawn from the true softmax) and a run directory
    whose over-confident model has no calibration yet."""
    from utils.artifacts.model_file import save_model

    root = tmp_path_factory.mktemp("calibrate")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(300):
        value = int(rng.integers(0, 256))
        logits = TRUE_SCALE * (2 * CENTRES * value - CENTRES**2)
        label = CLASSES[rng.choice(5, p=softmax(logits[None])[0])]
        cv2.imwrite(str(data / "images" / f"{i}.png"), np.full((SIZE, SIZE), value, np.uint8))
        rows.append({"path": f"images/{i}.png", "label": label, "split": "train" if i < 20 else "val",
                     "group": str(i)})
    pd.DataFrame(rows).to_csv(data / "labels.csv", index=False)
    spec = PreprocessSpec(class_names=CLASSES, image_size=SIZE, channels=1)
    spec.save(data)
    run_dir = root / "run"
    run_dir.mkdir()
    save_model(brightness_model(MODEL_SCALE), run_dir / "best.keras", spec, model_id="over", backbone="test",
               extra={"epoch": 3})
    (run_dir / "config.json").write_text(json.dumps({"config": {"data": str(data)}}))
    return run_dir


def test_a_model_without_calibration_reads_as_temperature_one(run, tmp_path):
    from utils.artifacts.model_file import read_metadata, save_model
    from utils.infer.predictor import load_predictor
    from utils.infer.predictor import softmax as predictor_softmax

    spec = PreprocessSpec(class_names=CLASSES, image_size=SIZE, channels=1)
    path = save_model(brightness_model(MODEL_SCALE), tmp_path / "plain.keras", spec, model_id="p", backbone="test")
    metadata = read_metadata(path)
    assert metadata.calibration is None and metadata.temperature == 1.0 and metadata.recommended_threshold is None
    assert "calibration" not in metadata.to_dict()
    predictor = load_predictor(path)
    batch = np.full((3, SIZE, SIZE, 1), 100.0, np.float32) + np.arange(3)[:, None, None, None] * 60
    assert np.allclose(predictor.predict(batch), predictor_softmax(predictor.logits(batch)), atol=1e-6)


def test_calibrate_run_writes_the_calibration_into_best_keras(run):
    from utils.artifacts.model_file import KERAS_PAYLOAD, read_metadata
    from utils.infer.predictor import load_predictor

    result = C.calibrate_run(run, target_accuracy=0.97)  # the data: the run's config.json
    entry = result.entry
    assert result.path == run / "best.keras"
    assert entry["temperature"] == pytest.approx(MODEL_SCALE / TRUE_SCALE, rel=0.3)
    assert entry["n_images"] == 280 and entry["fitted_on"].endswith("split=val") and entry["bins"] == 15
    assert entry["nll_after"] < entry["nll_before"] and entry["ece_after"] < entry["ece_before"]
    threshold = entry["threshold"]
    assert threshold["target_accuracy"] == 0.97 and threshold["reachable"] is True and threshold["accuracy"] >= 0.97
    assert 0 < threshold["coverage"] < 1 and 0 < threshold["value"] < 1

    metadata = read_metadata(run)
    assert metadata.calibration == json.loads(json.dumps(entry))
    assert metadata.temperature == entry["temperature"] and metadata.recommended_threshold == entry["threshold"]
    assert (metadata.model_id, metadata.backbone, metadata.extra) == ("over", "test", {"epoch": 3})  # kept
    with zipfile.ZipFile(run / "best.keras") as archive:
        assert archive.namelist().count(KERAS_PAYLOAD) == 1  # replaced, not appended
        assert archive.testzip() is None

    # the model still loads, and predicts softmax(logits / T): the probabilities the threshold was picked on
    predictor = load_predictor(run)
    batch = np.stack([np.full((SIZE, SIZE, 1), v, np.float32) for v in (10, 90, 130, 250)])
    logits = predictor.logits(batch)
    assert np.allclose(predictor.predict(batch), softmax(logits / entry["temperature"]), atol=1e-6)
    assert np.allclose(result.probs_after, softmax(result.logits / entry["temperature"]), atol=1e-6)

    # calibrating again (another target) replaces the entry; still one metadata entry in the archive
    again = C.calibrate_run(run, target_accuracy=0.99)
    assert read_metadata(run).calibration["threshold"]["target_accuracy"] == 0.99
    assert again.entry["temperature"] == pytest.approx(entry["temperature"])
    with zipfile.ZipFile(run / "best.keras") as archive:
        assert archive.namelist().count(KERAS_PAYLOAD) == 1


def test_an_empty_split_is_refused_and_training_goes_on_without_calibration(run, caplog):
    data = json.loads((run / "config.json").read_text())["config"]["data"]
    with pytest.raises(ValueError, match="split 'test' is empty"):
        C.calibrate_run(run, data, "test")
    with caplog.at_level(logging.WARNING):
        assert C.calibrate_after_training(run, data, pd.DataFrame({"abs_path": [], "y": []})) is None
    assert "calibration skipped" in caplog.text and "calibrate.py" in caplog.text


def test_calibrate_after_training_uses_the_runs_validation_rows(run, tmp_path):
    import shutil

    from utils.artifacts.model_file import read_metadata

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = json.loads((run / "config.json").read_text())["config"]["data"]
    frame = pd.read_csv(f"{data}/labels.csv")
    frame = frame[frame["split"] == "val"].head(100)
    rows = pd.DataFrame({"abs_path": [f"{data}/{p}" for p in frame["path"]],
                         "y": [CLASSES.index(x) for x in frame["label"]]})
    result = C.calibrate_after_training(copy, data, rows)
    assert result is not None and result.entry["n_images"] == 100
    assert read_metadata(copy).calibration["n_images"] == 100


# --- figures -------------------------------------------------------------------------------------


def test_reliability_diagram_and_risk_coverage_figures(calibrated, tmp_path):
    import warnings

    from utils.evaluate import plots

    logits, labels = calibrated
    before, after = softmax(3 * logits), softmax(logits)
    pick = C.recommend_threshold(after, labels, 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.plot_reliability_diagram(labels, {"T = 1": before, "T = 3": after}, tmp_path / "a" / "reliability.png")
        plots.plot_reliability_diagram(labels, after, tmp_path / "single.png", bins=10)
        plots.plot_risk_coverage(labels, {"T = 1": before, "T = 3": after}, tmp_path / "risk.png",
                                 target_accuracy=0.9, threshold=pick["value"])
        plots.plot_risk_coverage(labels, after, tmp_path / "risk_plain.png")
    for name in ("a/reliability.png", "single.png", "risk.png", "risk_plain.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name


# --- calibrate.py --------------------------------------------------------------------------------


def test_calibrate_script(run, tmp_path, capsys):
    import shutil

    import calibrate
    from utils.artifacts.model_file import read_metadata

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    data = json.loads((run / "config.json").read_text())["config"]["data"]
    assert calibrate.main([str(copy / "best.keras"), "--data", data, "--target-accuracy", "0.97",
                           "--plots", str(tmp_path / "figures")]) == 0
    out = capsys.readouterr().out
    assert "temperature" in out and "routes" in out and str(copy / "best.keras") in out
    stored = read_metadata(copy).calibration
    assert stored["threshold"]["target_accuracy"] == 0.97 and stored["fitted_on"] == f"{data} split=val"
    assert (tmp_path / "figures" / "reliability_diagram.png").is_file()
    assert (tmp_path / "figures" / "risk_coverage.png").is_file()

    assert calibrate.main([str(tmp_path / "missing.keras")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # validated against TARGET_ACCURACY_RANGE by the scripts' common start
        calibrate.main([str(copy), "--target-accuracy", "0"])
    assert "--target-accuracy must be in (0, 1]" in capsys.readouterr().err
    args = calibrate.parse_args([str(copy)])
    assert (args.split, args.target_accuracy, args.calibration_bins) == ("val", 0.995, 15)
