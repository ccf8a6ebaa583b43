"""The site shifts of test.py --shift (utils.evaluate.shifts) and their report (utils.evaluate.shift_eval):
pure numpy / OpenCV, no model, no TensorFlow."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest

from utils.evaluate import shift_eval, shifts


def radiograph(seed: int, size: int = 96) -> np.ndarray:
    """A radiograph-like 8-bit image: a smooth body on a dark background, bright bones, texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = 150 * np.exp(-(((x - 0.5) / 0.32) ** 2 + ((y - 0.5) / 0.42) ** 2))
    image = 20 + body + 10 * np.sin(14 * x + seed) * np.cos(9 * y)
    for _ in range(4):
        centre = tuple(int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        axes = tuple(int(v) for v in rng.integers(size // 16, size // 6, 2))
        bone = np.zeros((size, size), np.uint8)
        cv2.ellipse(bone, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        image = image + 60 * bone
    image = image + rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


IMAGES = [radiograph(seed) for seed in range(4)]
CONDITIONS = [(name, severity) for name, shift in shifts.REGISTRY.items() for severity in shift.severities]


def test_the_registry_covers_the_sites_differences():
    assert set(shifts.REGISTRY) == {"gamma", "equalise", "unsharp", "noise", "downsample", "jpeg", "border",
                                    "letterbox", "stretch", "text", "rotate", "crop", "invert", "bits", "window"}
    for shift in shifts.REGISTRY.values():
        assert shift.severities == ((1,) if shift.name == "invert" else shifts.SEVERITIES)
        assert shift.description


@pytest.mark.parametrize("name, severity", CONDITIONS)
def test_each_shift_changes_the_image_and_keeps_its_shape_and_dtype(name, severity):
    for key, image in enumerate(IMAGES):
        before = image.copy()
        out = shifts.apply(image, name, severity, key=str(key))
        assert out.dtype == np.uint8 and out.shape == image.shape
        assert np.array_equal(image, before)  # the input is left alone
        assert np.abs(out.astype(int) - image).mean() > 0.1, (name, severity)
    wide = radiograph(9, size=64)[:, :48].copy()  # not square
    assert shifts.apply(wide, name, severity).shape == wide.shape


@pytest.mark.parametrize("name", [n for n, s in shifts.REGISTRY.items() if len(s.severities) > 1])
def test_a_higher_severity_changes_the_image_more(name):
    def change(severity: int) -> float:
        return float(np.mean([np.abs(shifts.apply(image, name, severity, key=str(k)).astype(float) - image).mean()
                              for k, image in enumerate(IMAGES)]))

    changes = [change(severity) for severity in shifts.SEVERITIES]
    assert changes[0] < changes[1] < changes[2], changes


@pytest.mark.parametrize("name, severity", CONDITIONS)
def test_shifts_are_deterministic_per_seed_and_image(name, severity):
    image = IMAGES[0]
    first = shifts.apply(image, name, severity, key="a.png", seed=3)
    assert np.array_equal(first, shifts.apply(image.copy(), name, severity, key="a.png", seed=3))


def test_random_choices_depend_on_the_seed_and_the_image_not_the_severity():
    image = IMAGES[1]
    # noise: another seed or another file gives other draws
    base = shifts.apply(image, "noise", 2, key="a.png", seed=0)
    assert not np.array_equal(base, shifts.apply(image, "noise", 2, key="a.png", seed=1))
    assert not np.array_equal(base, shifts.apply(image, "noise", 2, key="b.png", seed=0))
    # the gamma's direction (darker or lighter) is the image's, whatever the severity
    for key in ("a.png", "b.png", "c.png", "d.png"):
        signs = {np.sign(shifts.apply(image, "gamma", s, key=key).astype(int).sum() - image.astype(int).sum())
                 for s in shifts.SEVERITIES}
        assert len(signs) == 1
    directions = {np.sign(shifts.apply(image, "gamma", 1, key=f"{k}.png").astype(int).sum()
                          - image.astype(int).sum()) for k in range(16)}
    assert directions == {-1, 1}  # both directions occur over a set of images


def test_what_the_shifts_do():
    image = IMAGES[2]
    assert np.array_equal(shifts.apply(image, "invert", 1), 255 - image)
    # borders: constant black or white bands on each side
    out = shifts.apply(image, "border", 3, key="x")
    assert len({int(out[0, 0]), int(out[-1, -1]), int(out[0, -1]), int(out[-1, 0])}) == 1
    assert int(out[0, 0]) in (0, 255)
    # letterbox: black bars on two opposite sides, the content squeezed in between
    out = shifts.apply(image, "letterbox", 3, key="x")
    bars = (out[:, :20] == 0).all() and (out[:, -20:] == 0).all() or (out[:20] == 0).all() and (out[-20:] == 0).all()
    assert bars
    # bits: the image fills only a fifth of the gray scale at severity 3
    out = shifts.apply(image, "bits", 3, key="x")
    assert int(out.max()) - int(out.min()) <= 0.2 * 255 + 1
    # window: the tails are clipped to black and white
    out = shifts.apply(image, "window", 3)
    assert (out == 0).mean() >= 0.1 and (out == 255).mean() >= 0.1
    # text: white pixels drawn, the rest untouched
    out = shifts.apply(image, "text", 3, key="x")
    changed = out != image
    assert 0 < changed.mean() < 0.2 and (out[changed] > image[changed]).mean() > 0.9
    # downsample / jpeg keep the mean brightness
    for name in ("downsample", "jpeg"):
        assert abs(float(shifts.apply(image, name, 3).mean()) - float(image.mean())) < 3


def test_only_gray_8_bit_images_are_shifted():
    with pytest.raises(ValueError, match="8-bit gray"):
        shifts.apply(IMAGES[0].astype(np.uint16), "gamma", 1)
    with pytest.raises(ValueError, match="8-bit gray"):
        shifts.apply(np.dstack([IMAGES[0]] * 3), "gamma", 1)


def test_parse_names_and_severities():
    assert shifts.parse(["gamma:2", "invert", "gamma:2"]) == [("gamma", 2), ("invert", 1)]
    assert shifts.parse(["jpeg"]) == [("jpeg", 1), ("jpeg", 2), ("jpeg", 3)]
    assert shifts.parse(["noise:1,crop:3"]) == [("noise", 1), ("crop", 3)]
    everything = shifts.parse(["all"])
    assert len(everything) == 3 * (len(shifts.REGISTRY) - 1) + 1 and ("invert", 1) in everything
    assert ("invert", 1) not in shifts.parse(["all:2"]) and len(shifts.parse(["all:2"])) == len(shifts.REGISTRY) - 1
    assert shifts.parse([]) == []
    with pytest.raises(ValueError, match="unknown shift 'gama'"):
        shifts.parse(["gama"])
    with pytest.raises(ValueError, match="severities \\[1\\], not 2"):
        shifts.parse(["invert:2"])
    with pytest.raises(ValueError, match="must be a number"):
        shifts.parse(["gamma:high"])


# --- The report -----------------------------------------------------------------------------
def outcome(name, severity, predicted, confidence, flagged=None, k=3):
    probs = np.full((len(predicted), k), (1 - np.asarray(confidence))[:, None] / (k - 1))
    probs[np.arange(len(predicted)), predicted] = confidence
    flagged = np.zeros(len(predicted), bool) if flagged is None else np.asarray(flagged)
    return shift_eval.Outcome(name, severity, probs, flagged)


def test_summary_rows_verdicts_and_routing():
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    confident = np.full(12, 0.99)
    wrong = y.copy()
    wrong[:6] = (y[:6] + 1) % 3  # half wrong, confidently
    outcomes = [outcome("clean", 0, y, confident),
                outcome("noise", 1, y, np.full(12, 0.5)),  # same classes, too unsure to route
                outcome("invert", 1, wrong, confident, flagged=[True] * 3 + [False] * 9)]
    groups = [f"p{i // 2}" for i in range(12)]
    summary = shift_eval.summarise(y, outcomes, 3, groups=groups, threshold=0.9, n_resamples=200, seed=1)
    clean, noise, invert = summary["rows"]
    assert clean["macro_f1"]["value"] == 1.0 and clean["f1_drop"]["value"] == 0 and not clean["breaks"]
    assert clean["routed_share"] == 1.0 and clean["routed_errors"] == 0
    assert noise["f1_drop"]["value"] == 0 and not noise["breaks"] and noise["routed_share"] == 0.0
    assert noise["routed_accuracy"] is None and noise["level"] == 5.0
    assert invert["breaks"] and invert["drop_significant"] and invert["f1_drop"]["ci_low"] > 0
    assert invert["ood_flagged"] == 0.25 and invert["routed_share"] == 0.75
    assert invert["routed_errors"] == 3 and invert["routed_accuracy"] == pytest.approx(6 / 9)
    assert summary["bootstrap"]["unit"] == "group" and summary["n_groups"] == 6
    assert summary["breaking"] == ["invert"] and summary["holding"] == ["noise"]
    assert summary["verdicts"]["invert"] == {"severities": [1], "breaks_from": 1}
    # without a threshold (no calibration) and without a bootstrap
    bare = shift_eval.summarise(y, outcomes, 3, threshold=None, n_resamples=0)
    assert bare["rows"][2]["routed_share"] is None and bare["rows"][2]["macro_f1"]["ci_low"] is None
    assert bare["rows"][2]["breaks"] and not bare["rows"][2]["drop_significant"]
    assert "no auto threshold" in shift_eval.markdown(bare)


def test_outputs(tmp_path):
    y = np.array([0, 1, 2] * 4)
    shifted = y.copy()
    shifted[:2] = 2
    outcomes = [outcome("clean", 0, y, np.full(12, 0.95))] + [
        outcome("gamma", s, shifted if s == 3 else y, np.full(12, 0.95)) for s in (1, 2, 3)]
    summary = shift_eval.summarise(y, outcomes, 3, threshold=0.9, n_resamples=100)
    summary.update(model_id="m", split="test", source="somewhere", shift_seed=42)
    shift_eval.write(tmp_path, summary)
    assert json.loads((tmp_path / shift_eval.SHIFTS_JSON).read_text())["breaking"] == ["gamma"]
    with open(tmp_path / shift_eval.SHIFTS_CSV, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["shift"], r["severity"]) for r in rows] == [("clean", "0"), ("gamma", "1"), ("gamma", "2"),
                                                           ("gamma", "3")]
    assert rows[3]["breaks"] == "True" and float(rows[3]["f1_drop"]) > 0.03
    text = (tmp_path / shift_eval.SHIFTS_MD).read_text()
    assert "| gamma | 3 | 0.9 |" in text and "- breaks the model from severity 3: gamma" in text
    assert "- holds at every severity evaluated: none" in text
    assert "- wrong classes routed without review (clean: 0): gamma:3 2" in text
    assert "| gamma | another detector's gamma curve" in text
    assert (tmp_path / shift_eval.SHIFTS_PNG).stat().st_size > 0
    shift_eval.plot_examples(IMAGES[0], "a.png", [("gamma", 1), ("invert", 1)], tmp_path / "examples.png")
    assert (tmp_path / "examples.png").stat().st_size > 0


def test_test_py_names_a_mistyped_shift(capsys):
    import test as test_script

    with pytest.raises(SystemExit):
        test_script.parse_args(["model.keras", "--shift", "gama:2"])
    assert "--shift: unknown shift 'gama'" in capsys.readouterr().err
    assert test_script.parse_args(["model.keras", "--shift", "invert", "--shift", "jpeg:3"]).shift == [
        ("invert", 1), ("jpeg", 3)]
    assert test_script.parse_args(["model.keras"]).shift == []


def test_test_py_help_explains_the_shifts_without_tensorflow():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "test.py", "--help"], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps the lines
    assert "--shift NAME[:SEVERITY]" in text
    for name in shifts.REGISTRY:
        assert f"{name} (" in text
    check = subprocess.run([sys.executable, "-c", "import sys, test; test.parse_args(['m', '--shift', 'all']); "
                            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"],
                           cwd=root, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.strip() == "[]", check.stderr
