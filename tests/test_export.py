"""Export to TFLite (fp32, fp16, int8) and SavedModel: metadata travels, predictions match Keras."""

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from utils.preprocessing import PreprocessSpec

SIZE = 64
CLASSES = ("a", "b", "c", "d", "e")
SPEC = PreprocessSpec(class_names=CLASSES, image_size=SIZE, channels=1)


def pattern(label: int, rng: np.random.Generator) -> np.ndarray:
    """Class k: a bright horizontal band in the k-th fifth of the image, on a noisy background."""
    image = rng.integers(0, 60, (SIZE, SIZE)).astype(np.uint8)
    band = SIZE // len(CLASSES)
    image[label * band:(label + 1) * band] = rng.integers(180, 255)
    return image


def small_cnn():
    """The layer types of the backbones (rescaling, conv, batch norm, ReLU6, depthwise conv, dense) in a
    model small enough to learn the patterns in a second; a from-scratch MobileNet needs minutes. Built as
    models/registry.py builds models (a nested 'backbone', then avg_pool, head_dropout, logits), so its
    exports carry the stage statistics the OOD score reads."""
    import keras

    layers = keras.layers
    image = keras.Input((SIZE, SIZE, 1))
    x = layers.Conv2D(8, 3, strides=2, use_bias=False)(image)
    x = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.5)(x))
    x = layers.DepthwiseConv2D(3, strides=2)(x)
    x = layers.Conv2D(16, 1, activation="relu")(x)
    x = layers.Flatten()(layers.AveragePooling2D(4)(x))  # where the band is: kept through the head's pooling
    backbone = keras.Model(image, layers.Reshape((1, 1, -1))(x), name="backbone")
    inputs = keras.Input((SIZE, SIZE, 1))
    x = backbone(layers.Rescaling(1 / 127.5, offset=-1, name="preprocess")(inputs))
    x = layers.Dropout(0.0, name="head_dropout")(layers.GlobalAveragePooling2D(name="avg_pool")(x))
    return keras.Model(inputs, layers.Dense(len(CLASSES), name="logits")(x))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A prepared dataset (train/val) and a run directory whose model learnt it a little."""
    import keras

    from utils.artifacts.model_file import save_model

    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    rng = np.random.default_rng(0)
    rows, images, labels = [], [], []
    for i in range(60):
        label = i % len(CLASSES)
        path = f"images/{CLASSES[label]}/{i}.png"
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        image = pattern(label, rng)
        cv2.imwrite(str(data / path), image)
        rows.append({"path": path, "label": CLASSES[label], "split": "train" if i < 40 else "val", "group": str(i)})
        images.append(image)
        labels.append(label)
    pd.DataFrame(rows).to_csv(data / "labels.csv", index=False)
    SPEC.save(data)

    keras.utils.set_random_seed(0)
    model = small_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.stack(images)[..., None].astype(np.float32)
    model.fit(x[:40], np.array(labels[:40]), batch_size=8, epochs=6, verbose=0)

    run_dir = root / "run"
    run_dir.mkdir()
    save_model(model, run_dir / "best.keras", SPEC, model_id="t", backbone="small_cnn", extra={"epoch": 6})
    (run_dir / "config.json").write_text(json.dumps({"config": {"data": str(data)}}))
    from utils.evaluate.calibration import calibrate_run

    # temperature and OOD detector, as training does (fewer synthetic negatives: 2 per kind)
    assert calibrate_run(run_dir, ood_quantile=0.9, ood_negatives_per_kind=2).ood is not None
    return run_dir


def assert_same_ood(run, predictor, check, agreement=1.0, tolerance=1e-3):
    """The export computes the model's OOD score from its own features output, as the Keras model does."""
    from utils.infer.predictor import load_predictor

    assert check["ood_available"] is True and check["ood_flag_agreement"] >= agreement
    images = val_images(run)
    reference = load_predictor(run).score(images)
    got = predictor.score(images)
    assert got.ood is not None and got.ood_threshold == reference.ood_threshold
    assert np.abs(got.ood - reference.ood).max() <= tolerance * reference.ood_threshold


def keras_probs(run, images):
    from utils.infer.predictor import load_predictor

    return load_predictor(run).predict(images)


def val_images(run):
    from utils.artifacts.export import images_from_split

    data = json.loads((run / "config.json").read_text())["config"]["data"]
    return images_from_split(data, "val", SPEC, 20)


def test_tflite_fp32_matches_keras_and_carries_its_spec(run, tmp_path):
    from utils.artifacts.export import export_model
    from utils.artifacts.model_file import read_metadata
    from utils.infer.predictor import TFLitePredictor, load_predictor

    result = export_model(run, "tflite", output=tmp_path / "m.tflite", check_images=20)
    assert result.path == tmp_path / "m.tflite" and result.path.is_file()
    assert result.check["max_abs_prob_diff"] < 1e-4 and result.check["top1_agreement"] == 1.0
    assert "split val" in result.check["source"] and result.check["images"] == 20
    sidecar = json.loads((tmp_path / "m.tflite.json").read_text())
    assert sidecar["model_id"] == "t" and sidecar["backbone"] == "small_cnn"
    assert sidecar["quantization"] == "none" and sidecar["check"] == result.check
    assert json.loads((tmp_path / "m.tflite.check.json").read_text()) == result.check
    # the one schema: the .keras metadata (training facts included) plus the export's fields
    assert sidecar == result.metadata.to_dict()
    assert sidecar["schema_version"] == 1 and sidecar["format"] == "tflite" and sidecar["extra"] == {"epoch": 6}
    assert sidecar["source"] == str(run / "best.keras") and sidecar["spec"] == SPEC.to_dict()

    predictor = load_predictor(tmp_path / "m.tflite")
    assert isinstance(predictor, TFLitePredictor)
    assert predictor.spec == SPEC and predictor.model_id == "t"
    assert predictor.metadata == read_metadata(tmp_path / "m.tflite") == result.metadata

    # a sidecar in the layout export.py wrote before the one schema (no schema_version, no extra) still loads
    legacy = {key: sidecar[key] for key in ("spec", "model_id", "backbone", "source", "format", "quantization",
                                            "io", "check")}
    (tmp_path / "m.tflite.json").write_text(json.dumps(legacy, indent=2) + "\n")
    assert load_predictor(tmp_path / "m.tflite").metadata == result.metadata.replace(extra={}, calibration=None, ood=None)
    images = val_images(run)
    reference = keras_probs(run, images)
    for batch in (images, images[:3], images[:1]):  # the batch size may change between calls
        assert np.abs(predictor.predict(batch) - reference[:len(batch)]).max() < 1e-4
    with pytest.raises(ValueError, match="differs"):
        predictor.predict(np.zeros((1, 32, 32, 1), np.float32))
    assert_same_ood(run, predictor, result.check)

    # without its metadata the artifact is refused, with a message that says what is missing
    shutil.copy(tmp_path / "m.tflite", tmp_path / "bare.tflite")
    with pytest.raises(ValueError, match="no preprocessing spec.*bare.tflite.json"):
        load_predictor(tmp_path / "bare.tflite")


def tensor_types(predictor):
    return {np.dtype(t["dtype"]).type for t in predictor._interpreter.get_tensor_details()}


def test_tflite_fp16_and_int8_stay_close(run, tmp_path):
    from utils.artifacts.export import export_model
    from utils.infer.predictor import load_predictor

    images = val_images(run)
    reference = keras_probs(run, images)
    assert (reference.argmax(1) == np.arange(40, 60) % len(CLASSES)).mean() >= 0.9  # it learnt the patterns

    fp16 = export_model(run, "tflite", quantize="fp16", output=tmp_path / "h.tflite", check_images=20)
    assert fp16.check["max_abs_prob_diff"] < 1e-2 and fp16.check["top1_agreement"] == 1.0
    int8 = export_model(run, "tflite", quantize="int8", output=tmp_path / "q.tflite", check_images=20,
                        calibration_images=40)
    assert int8.check["top1_agreement"] >= 0.9 and int8.check["max_abs_prob_diff"] < 0.2
    predictor = load_predictor(tmp_path / "q.tflite")
    assert tensor_types(load_predictor(tmp_path / "h.tflite")) >= {np.float16, np.float32}
    assert np.int8 in tensor_types(predictor)  # weights and activations really are int8
    # the features' std stays in XNNPACK (models/features.py): no single-threaded SQUARED_DIFFERENCE
    assert "SQUARED_DIFFERENCE" not in {op["op_name"] for op in predictor._interpreter._get_ops_details()}
    assert predictor._input["dtype"] == np.float32  # float input, as every artifact
    assert predictor.quantization == "int8" and predictor.spec == SPEC
    assert (predictor.predict(images).argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert_same_ood(run, load_predictor(tmp_path / "h.tflite"), fp16.check, tolerance=0.05)
    # the int8 artifact's detector is fitted again on its own quantised features: it flags what the float one does
    assert int8.metadata.ood is not None and "int8 features" in int8.metadata.ood["fitted_on"]
    assert int8.check["ood_available"] and int8.check["ood_flag_agreement"] >= 0.85

def test_saved_model_export_loads_and_matches(run, tmp_path):
    from utils.artifacts.export import export_model
    from utils.infer.predictor import SavedModelPredictor, load_predictor

    result = export_model(run, "saved_model", output=tmp_path / "sm", check_images=10)
    assert result.check["max_abs_prob_diff"] < 1e-5 and result.check["top1_agreement"] == 1.0
    assert (tmp_path / "sm" / "artifact.json").is_file() and (tmp_path / "sm" / "check.json").is_file()
    predictor = load_predictor(tmp_path / "sm")
    assert isinstance(predictor, SavedModelPredictor) and predictor.spec == SPEC
    assert predictor.metadata == result.metadata and predictor.metadata.format == "saved_model"
    images = val_images(run)
    assert np.abs(predictor.predict(images) - keras_probs(run, images)).max() < 1e-5
    assert_same_ood(run, predictor, result.check)


def test_onnx_matches_keras_and_describes_itself(run, tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from utils.artifacts.export import export_model
    from utils.infer.predictor import ONNXPredictor, load_predictor

    result = export_model(run, "onnx", output=tmp_path / "m.onnx", check_images=20)
    assert result.check["max_abs_prob_diff"] < 1e-4 and result.check["top1_agreement"] == 1.0
    assert json.loads((tmp_path / "m.onnx.json").read_text())["check"] == result.check
    images = val_images(run)
    reference = keras_probs(run, images)
    (tmp_path / "m.onnx.json").unlink()  # the spec is embedded in the file as well
    predictor = load_predictor(tmp_path / "m.onnx")
    assert isinstance(predictor, ONNXPredictor) and predictor.spec == SPEC and predictor.model_id == "t"
    assert predictor.metadata == result.metadata.replace(check=None)  # embedded before the check ran
    assert np.abs(predictor.predict(images) - reference).max() < 1e-4
    assert np.abs(predictor.predict(images[:2]) - reference[:2]).max() < 1e-4
    assert_same_ood(run, predictor, result.check)
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        load_predictor(tmp_path / "broken.onnx")


def test_cli_exports_beside_the_run_and_refuses_bad_flags(run, capsys):
    import export

    assert export.main([str(run), "--format", "tflite", "--check-images", "5"]) == 0
    assert "top-1 agreement 1.0000" in capsys.readouterr().out
    assert (run / "best.tflite").is_file() and (run / "best.tflite.json").is_file()
    with pytest.raises(SystemExit):
        export.main([str(run), "--format", "saved_model", "--quantize", "int8"])
    assert export.main([str(run / "nothing.keras"), "--format", "tflite"]) == 2


def test_unsupported_suffix_is_refused(tmp_path):
    from utils.infer.predictor import load_predictor

    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported model format"):
        load_predictor(tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError):
        load_predictor(tmp_path / "missing.tflite")
