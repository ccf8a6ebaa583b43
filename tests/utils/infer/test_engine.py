"""The inference engine: one reason code per kind of failure, the same pixels and probabilities
in threads and processes, a codec's panic as a row, decisions, and the router's decode settings."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pydicom.uid
import pytest

from fuzz.hostile import write_panicking_rle
from utils.config import ConfigError
from utils.infer.decisions import UNCERTAIN, UNREADABLE
from utils.infer.engine import Decoded, Engine, decode_file, error_reason, failure_reason
from utils.io.dicom_writer import write_dicom
from utils.io.isolation import Failure, PoolSettings
from utils.preprocessing import PreprocessSpec

SPEC = PreprocessSpec(class_names=("dark", "bright"), image_size=32)


def hostile_decode(path: str, spec: PreprocessSpec, projection_only: bool = False) -> Decoded:
    """decode_file, except that files named hang* hang and die* kill their process (as a codec
    stuck in a loop or segfaulting would). Module-level: worker processes import it. Its signature
    is decode_file's: tests also put it in decode_file's place."""
    name = Path(path).name
    if name.startswith("hang"):
        time.sleep(120)
    elif name.startswith("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    return decode_file(path, spec, projection_only=projection_only)


def brightness(batch: np.ndarray) -> np.ndarray:
    """A stand-in model: P(bright) = the mean pixel / 255."""
    p = batch.reshape(len(batch), -1).mean(axis=1) / 255.0
    return np.stack([1 - p, p], axis=1).astype(np.float32)


def settings(mode: str = "processes", **changes) -> PoolSettings:
    return PoolSettings(mode=mode, **{"workers": 2, "timeout_s": 30.0, **changes})


def dicoms(folder: Path, syntax=pydicom.uid.ExplicitVRLittleEndian, count: int = 3) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = (np.arange(64 * 64).reshape(64, 64) * (i + 1) % 4096).astype(np.uint16)
        paths.append(str(write_dicom(folder / f"{i}.dcm", image, bits_stored=12, transfer_syntax=syntax,
                                     photometric="MONOCHROME2")))
    return paths


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, str]:
    """One file per kind of failure, and a good one; name -> path."""
    folder = tmp_path_factory.mktemp("hostile")
    good = dicoms(folder / "good", count=1)[0]
    data = Path(good).read_bytes()
    files = {"good": good, "missing": str(folder / "missing.dcm"),
             "panic": str(write_panicking_rle(folder / "panic.dcm"))}
    for name, content in {"text": b"not a DICOM file\n", "empty": b"", "truncated": data[: len(data) - 4000],
                          "hang": data, "die": data}.items():
        files[name] = str(folder / f"{name}.dcm")
        Path(files[name]).write_bytes(content)
    (folder / "directory.dcm").mkdir()
    files["directory"] = str(folder / "directory.dcm")
    return files


def test_one_reason_code_per_kind_of_failure(hostile):
    names = list(hostile)
    with Engine(SPEC, pool=settings(timeout_s=1.5), decode=hostile_decode) as engine:
        decoded = dict(zip(names, engine.decode([hostile[n] for n in names])))
    reasons = {name: d.reason for name, d in decoded.items()}
    assert reasons.pop("good") == "" and decoded["good"].image.shape == (32, 32)
    assert reasons == {"panic": "codec_panic", "missing": "file_not_found", "text": "not_dicom", "empty": "not_dicom",
                       "truncated": "truncated_pixel_data", "hang": "decode_timeout", "die": "decoder_crashed",
                       "directory": "os_error"}
    assert "1.5 s" in decoded["hang"].message and "SIGKILL" in decoded["die"].message
    assert decoded["die"].header["SOPInstanceUID"]  # read again, in a worker, for the row
    assert decoded["truncated"].header["SOPInstanceUID"]


def test_a_panic_in_threads_mode_is_a_row_not_a_dead_thread(hostile):
    with Engine(SPEC, brightness, pool=settings("threads")) as engine:
        first, again = (engine.classify([hostile["panic"], hostile["good"]]) for _ in range(2))
    for predictions in (first, again):
        assert predictions[0].label == UNREADABLE and predictions[0].reason == "codec_panic"
        assert predictions[1].readable and predictions[1].label in SPEC.class_names


def test_reason_codes_of_exceptions(tmp_path):
    existing = tmp_path / "a.dcm"
    existing.write_bytes(b"x")

    class Coded(ValueError):
        reason = "no_pixel_data"

    assert error_reason(str(tmp_path / "gone.dcm"), ValueError("wrapped"))[0] == "file_not_found"
    assert error_reason(str(existing), MemoryError())[0] == "out_of_memory"
    assert error_reason(str(existing), Coded("sr"))[0] == "no_pixel_data"
    # a remote file is not "not found" because no local file has its URL as name
    assert error_reason("s3://bucket/x.dcm", Coded("sr"))[0] == "no_pixel_data"
    assert error_reason("s3://bucket/x.dcm", FileNotFoundError("gone"))[0] == "file_not_found"
    assert error_reason(str(existing), PermissionError("no"))[0] == "os_error"
    wrapped = Coded("could not read")
    wrapped.__cause__ = IsADirectoryError(21, "a folder")
    assert error_reason(str(existing), wrapped)[0] == "os_error"
    wrapped.__cause__ = OSError("a parser's complaint, no errno")
    assert error_reason(str(existing), wrapped)[0] == "no_pixel_data"
    assert error_reason(str(existing), KeyError("k")) == ("unexpected_error", "KeyError: 'k'")
    assert failure_reason(Failure("timeout", ""), 30)[0] == "decode_timeout"
    assert failure_reason(Failure("crashed", "killed by SIGSEGV"), 30)[0] == "decoder_crashed"
    assert failure_reason(Failure("error", "PanicException: boom"), 30) == ("unexpected_error", "PanicException: boom")


def test_threads_and_processes_give_identical_images_and_probabilities(tmp_path):
    files = (dicoms(tmp_path / "j2k", pydicom.uid.JPEG2000Lossless, 2) + dicoms(tmp_path / "plain")
             + [str(tmp_path / "missing.dcm")])
    results = {}
    for mode in ("threads", "processes"):
        with Engine(SPEC, brightness, threshold=0.0, pool=settings(mode)) as engine:
            results[mode] = (sum(engine.decode_batches(files, 2), []), sum(engine.classify_batches(files, 2), []))
    (decoded_t, predicted_t), (decoded_p, predicted_p) = results["threads"], results["processes"]
    assert [d.path for d in decoded_p] == [p.path for p in predicted_p] == files
    for a, b in zip(decoded_t, decoded_p):
        assert a.reason == b.reason and a.header == b.header
        assert (a.image is None and b.image is None) or np.array_equal(a.image, b.image)
    for a, b in zip(predicted_t, predicted_p):
        assert a.label == b.label and a.error == b.error
        assert (a.probs is None and b.probs is None) or np.array_equal(a.probs, b.probs)
    assert predicted_p[-1].reason == "file_not_found" and predicted_p[-1].label == UNREADABLE


def test_decisions_threshold_and_the_same_workers_call_after_call(tmp_path):
    files = dicoms(tmp_path, count=2)
    with Engine(SPEC, brightness, threshold=0.99, pool=settings(workers=1)) as engine:
        first = engine.classify(files)
        pids = {w.process.pid for w in engine._pool._procs}
        second = engine.classify(files[:1])
        assert {w.process.pid for w in engine._pool._procs} == pids  # started once, reused
    assert [p.label for p in first] == [UNCERTAIN, UNCERTAIN] and second[0].top_label in SPEC.class_names
    assert first[0].confidence == pytest.approx(float(first[0].probs.max()))
    assert first[0].header["SOPInstanceUID"] and first[0].error == ""
    with pytest.raises(ValueError, match="predict"):
        Engine(SPEC, pool=settings("threads")).classify(files)


def test_router_decode_settings_are_validated(tmp_path):
    from utils.routing.operations.config import from_dict

    base = {"model": "m.keras", "destinations": {c: {"folder": "out"} for c in (*SPEC.class_names, UNCERTAIN)}}
    config = from_dict(base, base=tmp_path)
    assert (config.decode_pool, config.decode_timeout_s, config.decode_memory_limit_mb) == ("processes", 30.0, 4096)
    config = from_dict({**base, "decode_pool": "threads", "decode_timeout_s": 5, "decode_memory_limit_mb": 0},
                       base=tmp_path)
    assert (config.decode_pool, config.decode_timeout_s, config.decode_memory_limit_mb) == ("threads", 5.0, 0)
    for bad in ({"decode_pool": "auto"}, {"decode_timeout_s": 0}, {"decode_memory_limit_mb": -1},
                {"decode_workers": -1}, {"decode_pool": 3}):
        with pytest.raises(ConfigError, match="decode_"):
            from_dict({**base, **bad}, base=tmp_path)


def test_an_image_above_the_ood_threshold_is_uncertain_with_its_reason(tmp_path):
    """A Scored from the model: the images whose OOD score is above the threshold become uncertain with reason
    out_of_distribution, keeping their probabilities and top label; the others are decided as usual."""
    from utils.infer.ood import OUT_OF_DISTRIBUTION
    from utils.infer.predictor import Scored

    files = dicoms(tmp_path, count=3)

    def scored(batch):
        probs = np.tile(np.array([[0.02, 0.98]], np.float32), (len(batch), 1))
        return Scored(probs, np.array([1.0, 7.5, 5.0])[: len(batch)], 5.0)

    with Engine(SPEC, scored, threshold=0.5, pool=settings("threads")) as engine:
        first, second, third = engine.classify(files)
    assert (first.label, first.reason, first.ood_score) == ("bright", "", 1.0)
    assert second.label == UNCERTAIN and second.reason == OUT_OF_DISTRIBUTION and second.top_label == "bright"
    assert second.readable and second.confidence == pytest.approx(0.98) and "7.5 > 5" in second.message
    assert second.error.startswith("out_of_distribution: ")
    assert third.label == "bright" and third.ood_score == 5.0  # at the threshold: not above it


def test_the_header_guard_wins_over_decoding_and_its_failures(tmp_path, monkeypatch):
    """A CT is not_projection_radiography whether its pixels decode, are truncated or crash the decoder; with
    the built-in decode its pixels are never decoded, and a custom decode function is checked after it ran."""
    import utils.infer.engine as engine_module

    ct = tmp_path / "ct.dcm"
    write_dicom(ct, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), bits_stored=12, modality="CT")
    data = ct.read_bytes()
    (tmp_path / "truncated-ct.dcm").write_bytes(data[: len(data) - 4000])
    (tmp_path / "die-ct.dcm").write_bytes(data)
    dx = dicoms(tmp_path / "dx", count=1)[0]
    files = [str(ct), str(tmp_path / "truncated-ct.dcm"), str(tmp_path / "die-ct.dcm"), dx]

    decoded_pixels = []
    real = engine_module.preprocess_file
    monkeypatch.setattr(engine_module, "preprocess_file", lambda p, s: decoded_pixels.append(p) or real(p, s))
    with Engine(SPEC, pool=settings("threads"), projection_only=True) as engine:
        reasons = [d.reason for d in engine.decode(files[:2] + files[3:])]
    assert reasons == ["not_projection_radiography", "not_projection_radiography", ""]
    assert decoded_pixels == [dx]  # the CTs' headers were enough

    with Engine(SPEC, pool=settings(timeout_s=20), decode=hostile_decode, projection_only=True) as engine:
        decoded = engine.decode(files)
    assert [d.reason for d in decoded] == ["not_projection_radiography"] * 3 + [""]
    assert all("Modality CT" in d.message and d.header["SOPInstanceUID"] for d in decoded[:3])
    with Engine(SPEC, pool=settings(timeout_s=20), decode=hostile_decode) as engine:  # the guard off
        assert [d.reason for d in engine.decode(files)] == ["", "truncated_pixel_data", "decoder_crashed", ""]


def test_a_colour_image_is_out_of_distribution_whatever_its_header_says(tmp_path):
    """A DX-tagged colour photo is uncertain (out_of_distribution); a gray image stored as RGB and one with a
    small coloured marker are not; the reader's share of coloured pixels says why."""
    from utils.infer.engine import COLOUR_SHARE_KEY
    from utils.infer.ood import OUT_OF_DISTRIBUTION
    from utils.io.dicom.colour import COLOUR_SHARE_KEY as READER_KEY

    assert COLOUR_SHARE_KEY == READER_KEY
    rng = np.random.default_rng(0)
    gray = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    photo = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    marked = np.stack([gray] * 3, axis=-1)
    marked[2:6, 2:6] = (255, 0, 0)  # a small red marker: 16 of 4096 pixels
    files = [str(write_dicom(tmp_path / f"{name}.dcm", image, photometric="RGB", modality="DX"))
             for name, image in (("photo", photo), ("gray", np.stack([gray] * 3, axis=-1)), ("marked", marked))]
    with Engine(SPEC, brightness, threshold=0.0, pool=settings("threads")) as engine:
        photo_p, gray_p, marked_p = engine.classify(files)
    assert photo_p.label == UNCERTAIN and photo_p.reason == OUT_OF_DISTRIBUTION and "colour image" in photo_p.message
    assert float(photo_p.header[COLOUR_SHARE_KEY]) > 0.5
    assert gray_p.reason == "" and float(gray_p.header[COLOUR_SHARE_KEY]) == 0.0
    assert marked_p.reason == "" and 0 < float(marked_p.header[COLOUR_SHARE_KEY]) < 0.02
    with Engine(SPEC, brightness, threshold=0.0, pool=settings("threads"), colour_limit=1.0) as engine:
        assert engine.classify(files[:1])[0].reason == ""  # the check off


def test_classify_batches_feeds_the_model_in_chunks_and_yields_whole_batches():
    """The model starts on the first few decoded files instead of a whole batch (chunk n+1 decodes
    while it runs on chunk n), and the caller still gets batch_size predictions at a time, in order."""
    calls = []

    def model(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return brightness(batch)

    def constant(path: str, spec: PreprocessSpec) -> Decoded:
        return Decoded(path, np.full((SPEC.image_size,) * 2, int(Path(path).stem) % 256, np.uint8))

    paths = [f"/nowhere/{i}.dcm" for i in range(45)]
    with Engine(SPEC, model, pool=settings("threads"), decode=constant) as engine:
        chunk = engine.chunk_size(32)
        batches = list(engine.classify_batches(paths, 32))
    assert 1 < chunk < 32 and chunk == max(8, 2 * 2)
    assert [len(b) for b in batches] == [32, 13]
    assert [p.path for b in batches for p in b] == paths
    assert max(calls) == chunk and sum(calls) == 45
    with Engine(SPEC, model, pool=settings("threads"), decode=constant) as engine:
        assert engine.chunk_size(4) == 4 and [len(b) for b in engine.classify_batches(paths[:9], 4)] == [4, 4, 1]
