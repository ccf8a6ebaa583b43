"""utils.artifacts.model_file: the one metadata schema (ModelMetadata) and its one reader (read_metadata) over
every artifact format, files written in the older layouts, and a checkpoint written before the
registered Keras objects moved to utils.artifacts.keras_objects."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from utils.artifacts.model_file import (
    METADATA_VERSION,
    ModelMetadata,
    artifact_format,
    read_metadata,
    read_model_info,
    sidecar_path,
)
from utils.preprocessing import PreprocessSpec

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data"
FIXTURE = DATA / "checkpoint_before_keras_objects.keras"
RECORD = json.loads((DATA / "checkpoint_before_keras_objects.json").read_text())
SPEC = PreprocessSpec(class_names=("a", "b", "c"), image_size=32, channels=1)
CHECK = {"max_abs_prob_diff": 1e-6, "top1_agreement": 1.0, "agreed": 5, "images": 5, "source": "random images"}
IO = "input float32 (B, S, S, C) 0..255; output logits float32 (B, K), softmax applied by the predictor"


def legacy_export_sidecar(fmt: str, quantization: str = "none") -> dict:
    """An export sidecar exactly as utils/artifacts/export.py wrote it before the one schema (no schema_version,
    no extra)."""
    return {"spec": SPEC.to_dict(), "model_id": "run/epoch-3", "backbone": "mobilenet_v1",
            "source": "runs/x/best.keras", "format": fmt, "quantization": quantization, "io": IO, "check": CHECK}


def legacy_keras_payload() -> dict:
    """preprocess.json inside a .keras, as save_model wrote it before the one schema."""
    return {"spec": SPEC.to_dict(), "model_id": "run/epoch-3", "backbone": "mobilenet_v1", "extra": {"epoch": 3}}


def fake_keras(path: Path, payload: dict | None) -> Path:
    """A zip shaped like a .keras archive (read_metadata reads only its preprocess.json)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", "{}")
        if payload is not None:
            archive.writestr("preprocess.json", json.dumps(payload))
    return path


# --- the schema -------------------------------------------------------------------------------------


def test_metadata_round_trips_with_its_version_and_unknown_keys():
    metadata = ModelMetadata(SPEC, "m", "resnet50", {"epoch": 2}, format="tflite", quantization="int8",
                             source="best.keras", io=IO, check=CHECK, other={"future_key": [1, 2]})
    data = metadata.to_dict()
    assert data["schema_version"] == METADATA_VERSION == 1
    assert data["future_key"] == [1, 2] and data["spec"] == SPEC.to_dict()
    assert ModelMetadata.from_dict(json.loads(json.dumps(data))) == metadata
    assert ModelMetadata.from_json(metadata.to_json()) == metadata


def test_a_keras_payload_leaves_out_the_export_fields():
    data = ModelMetadata(SPEC, "m", "b", {"epoch": 1}, format="keras").to_dict()
    assert data == {"schema_version": 1, "spec": SPEC.to_dict(), "model_id": "m", "backbone": "b",
                    "extra": {"epoch": 1}, "format": "keras"}


@pytest.mark.parametrize("data, message", [
    ({"schema_version": 99, "spec": SPEC.to_dict()}, "newer than this code"),
    ({"schema_version": "1", "spec": SPEC.to_dict()}, "bad schema_version"),
    ({"model_id": "m"}, "no 'spec'"),
    ({"spec": {"class_names": ["a"]}}, "malformed spec"),
    ({"spec": {**SPEC.to_dict(), "colour": "red"}}, "unknown preprocessing spec keys"),
    ({"spec": SPEC.to_dict(), "extra": [1]}, "'extra' must be an object"),
    ({"spec": SPEC.to_dict(), "model_id": 3}, "'model_id' must be a string"),
    ([1, 2], "JSON object"),
])
def test_what_is_not_metadata_is_refused(data, message):
    with pytest.raises(ValueError, match=message):
        ModelMetadata.from_dict(data)


# --- the reader, every format, old layouts --------------------------------------------------------------


def test_export_sidecars_in_the_older_layout_are_read(tmp_path):
    tflite = tmp_path / "m_int8.tflite"
    tflite.write_bytes(b"not read")
    sidecar_path(tflite).write_text(json.dumps(legacy_export_sidecar("tflite", "int8")))
    metadata = read_metadata(tflite)
    assert metadata == ModelMetadata(SPEC, "run/epoch-3", "mobilenet_v1", {}, format="tflite", quantization="int8",
                                     source="runs/x/best.keras", io=IO, check=CHECK)

    saved = tmp_path / "sm"
    saved.mkdir()
    (saved / "saved_model.pb").write_bytes(b"")
    (saved / "artifact.json").write_text(json.dumps({**legacy_export_sidecar("saved_model"), "model_id": None}))
    metadata = read_metadata(saved)
    assert metadata.format == "saved_model" and metadata.spec == SPEC and metadata.model_id == "sm"  # default id

    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not read when the sidecar is there")
    sidecar_path(onnx_file).write_text(json.dumps(legacy_export_sidecar("onnx")))
    assert read_metadata(onnx_file).check == CHECK


def test_keras_payload_in_the_older_layout_and_run_directories_are_read(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    fake_keras(run / "best.keras", legacy_keras_payload())
    for path in (run, run / "best.keras"):
        metadata = read_metadata(path)
        assert metadata == ModelMetadata(SPEC, "run/epoch-3", "mobilenet_v1", {"epoch": 3}, format="keras")
        info = read_model_info(path)  # the older name, for its callers
        assert (info.spec, info.model_id, info.backbone, info.extra) == (SPEC, "run/epoch-3", "mobilenet_v1",
                                                                         {"epoch": 3})
    fake_keras(tmp_path / "no_id.keras", {"spec": SPEC.to_dict()})
    assert read_metadata(tmp_path / "no_id.keras").model_id == "no_id"


def test_a_plain_keras_file_reads_the_spec_beside_it(tmp_path):
    plain = fake_keras(tmp_path / "someone_elses.keras", None)
    with pytest.raises(ValueError, match="carries no preprocessing spec.*preprocess.json beside it"):
        read_metadata(plain)
    SPEC.save(tmp_path)  # a bare spec file, as a prepared dataset has
    assert read_metadata(plain) == ModelMetadata(SPEC, "someone_elses", "", {}, format="keras")
    (tmp_path / "preprocess.json").write_text(json.dumps(legacy_keras_payload()))  # or the whole metadata
    assert read_metadata(plain).backbone == "mobilenet_v1"
    (tmp_path / "preprocess.json").write_text("{broken")
    with pytest.raises(ValueError, match="unreadable preprocessing spec"):
        read_metadata(plain)


def test_onnx_without_sidecar_reads_the_embedded_metadata(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    proto = helper.make_model(graph)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "artifact", json.dumps(legacy_export_sidecar("onnx"))  # as export.py embedded it
    onnx.save(proto, str(tmp_path / "m.onnx"))
    assert read_metadata(tmp_path / "m.onnx").spec == SPEC
    assert read_metadata(tmp_path / "m.onnx", embedded=json.dumps({"spec": SPEC.to_dict()})).model_id == "m"
    onnx.save(helper.make_model(graph), str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="no preprocessing spec.*bare.onnx.json"):
        read_metadata(tmp_path / "bare.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a loadable ONNX model"):
        read_metadata(tmp_path / "broken.onnx")


def test_missing_unknown_and_unreadable_artifacts_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_metadata(tmp_path / "missing.tflite")
    with pytest.raises(FileNotFoundError, match="no best.keras"):
        read_metadata(tmp_path)
    (tmp_path / "m.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported model format '.pt'"):
        read_metadata(tmp_path / "m.pt")
    (tmp_path / "m.tflite").write_bytes(b"")
    with pytest.raises(ValueError, match="no preprocessing spec: expected .*m.tflite.json"):
        read_metadata(tmp_path / "m.tflite")
    sidecar_path(tmp_path / "m.tflite").write_text(json.dumps({"schema_version": 2, "spec": SPEC.to_dict()}))
    with pytest.raises(ValueError, match="m.tflite.json: unreadable artifact metadata .*newer"):
        read_metadata(tmp_path / "m.tflite")
    assert [artifact_format(p) for p in (tmp_path, tmp_path / "m.tflite")] == ["keras", "tflite"]


def test_save_model_embeds_the_schema_and_load_model_returns_it(tmp_path):
    import keras

    from utils.artifacts.model_file import load_model, save_model

    inputs = keras.Input((32, 32, 1))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(inputs)))
    path = save_model(model, tmp_path / "m.keras", SPEC, model_id="r/epoch-1", backbone="tiny", extra={"epoch": 1})
    with zipfile.ZipFile(path) as archive:
        payload = json.loads(archive.read("preprocess.json"))
    assert payload == {"schema_version": 1, "spec": SPEC.to_dict(), "model_id": "r/epoch-1", "backbone": "tiny",
                       "extra": {"epoch": 1}, "format": "keras"}
    assert not list(tmp_path.glob("*.tmp*"))
    loaded, metadata = load_model(path)
    assert metadata == read_metadata(path) and metadata.model_id == "r/epoch-1"
    np.testing.assert_allclose(loaded.predict(np.ones((1, 32, 32, 1)), verbose=0),
                               model.predict(np.ones((1, 32, 32, 1)), verbose=0), rtol=1e-6)


# --- a checkpoint written before utils.artifacts.keras_objects -------------------------------------------------------


def test_checkpoint_from_before_keras_objects_loads_compiled(tmp_path):
    """In a fresh interpreter (so nothing imported utils.train.components first): load_model(compile=True)
    restores the optimizer (class, schedule, state), the loss and the MacroF1 metric, gives the
    recorded predictions, and goes on training."""
    script = textwrap.dedent("""
        import json, sys
        import numpy as np
        sys.path.insert(0, "tests/data")
        import make_checkpoint_fixture as F
        from utils.artifacts.model_file import load_model
        model, metadata = load_model(F.CHECKPOINT, compile=True)
        optimizer = model.optimizer
        schedule = optimizer._learning_rate
        report = {
            "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            "schedule": f"{type(schedule).__module__}.{type(schedule).__name__}",
            "schedule_config": schedule.get_config(), "l2": optimizer.l2, "clipvalue": optimizer.clipvalue,
            "iterations": int(optimizer.iterations.numpy()), "abs_sum": F.optimizer_abs_sum(optimizer),
            "logits": model.predict(F.inputs(4), verbose=0).tolist(),
            "metadata": metadata.to_dict(),
            "training_loaded": "utils.train.components" in sys.modules,
        }
        results = model.evaluate(F.inputs(4), np.arange(4) % 3, return_dict=True, verbose=0)
        metrics = {m.name: f"{type(m).__module__}.{type(m).__name__}" for m in model._compile_metrics.metrics}
        model.fit(F.inputs(4), np.arange(4) % 3, epochs=1, verbose=0)
        report.update(metrics=metrics, results=sorted(results), iterations_after=int(optimizer.iterations.numpy()))
        print(json.dumps(report))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["optimizer"] == "utils.artifacts.keras_objects.AdamL2"
    assert report["schedule"] == "utils.artifacts.keras_objects.OneCycle"
    assert report["schedule_config"] == RECORD["schedule"]
    assert report["l2"] == pytest.approx(RECORD["l2"]) and report["clipvalue"] == pytest.approx(RECORD["clipvalue"])
    assert report["iterations"] == RECORD["optimizer_iterations"] == 1
    assert report["abs_sum"] == pytest.approx(RECORD["optimizer_abs_sum"], rel=1e-6) and report["abs_sum"] > 0
    np.testing.assert_allclose(report["logits"], RECORD["logits"], rtol=1e-5, atol=1e-6)
    assert report["metrics"] == {"accuracy": "keras.src.metrics.accuracy_metrics.SparseCategoricalAccuracy",
                                 "macro_f1": "utils.artifacts.keras_objects.MacroF1"}
    assert report["results"] == ["accuracy", "loss", "macro_f1"] and report["iterations_after"] == 2
    assert report["training_loaded"] is False
    metadata = report["metadata"]
    assert (metadata["model_id"], metadata["backbone"], metadata["extra"], metadata["format"]) == (
        RECORD["model_id"], RECORD["backbone"], RECORD["extra"], "keras")
    assert metadata["spec"]["class_names"] == RECORD["class_names"]


def test_the_fixture_was_written_before_the_move():
    """Its config names the old module: it really tests loading by registered name."""
    with zipfile.ZipFile(FIXTURE) as archive:
        config = archive.read("config.json").decode()
        payload = json.loads(archive.read("preprocess.json"))
    assert config.count('"module": "utils.training"') == 3 and "utils.keras_objects" not in config
    for name in ("router>OneCycle", "router>AdamL2", "router>MacroF1"):
        assert f'"registered_name": "{name}"' in config
    assert "schema_version" not in payload and FIXTURE.stat().st_size < 300_000
