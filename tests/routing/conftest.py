"""Fixtures for the router tests: a deterministic model, a folder of DICOMs, real peers on loopback.

The model is a tiny Keras graph (global average, then a dense layer set by hand) whose class
depends only on the image's mean brightness, so test images can be drawn to land in each class,
or on a boundary (``uncertain``). Expected labels are computed in-process with the same
predictor and preprocessing the router uses. dcmtk's ``storescp`` / ``storescu`` are found by
content (pynetdicom installs Python apps with the same names, which may come first on PATH; see
utils/routing/delivery/dcmtk.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from utils.io.dicom_writer import write_dicom, write_non_image
from utils.routing.operations.config import load_config
from utils.routing.delivery.dcmtk import dicom_files, find_tool, storescp_command, storescu_command, storescu_profile
from utils.routing.delivery.dcmtk import environment as dcmtk_environment
from utils.routing.node import RouterNode
from utils.routing.intake.scp import TRANSFER_SYNTAXES

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")
SIZE = 32  # model input; files are 64 x 64
THRESHOLD = 0.6


# --- helpers --------------------------------------------------------------------------------


def everywhere(peer) -> dict:
    """Destinations sending every class and ``uncertain`` to ``peer``."""
    return {label: peer.node() for label in (*CLASSES, "uncertain")}


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll until ``condition()`` is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def dcmtk(tool: str) -> str | None:
    return find_tool(tool)


needs_dcmtk = pytest.mark.skipif(not (dcmtk("storescu") and dcmtk("storescp")),
                                 reason="dcmtk's storescu/storescp not installed (apt-get install dcmtk)")


def brightness_model(path: Path, *, channels: int = 1, scale: float = 0.002, model_id: str = "test-brightness") -> Path:
    """A .keras file whose class is the nearest of 5 brightness centres (mean pixel 25.5, 76.5, ...)."""
    import keras

    from utils.artifacts.model_file import save_model
    from utils.preprocessing import PreprocessSpec

    centres = 255.0 * (np.arange(5) + 0.5) / 5
    inputs = keras.Input((SIZE, SIZE, channels))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(5)
    model = keras.Model(inputs, dense(pooled))
    # logit_k = s (2 c_k m - c_k^2) = s (m^2 - (m - c_k)^2): the argmax is the nearest centre
    dense.set_weights([np.tile(scale * 2 * centres / channels, (channels, 1)).astype(np.float32),
                       (-scale * centres**2).astype(np.float32)])
    spec = PreprocessSpec(class_names=CLASSES, image_size=SIZE, channels=channels)
    return save_model(model, path, spec, model_id=model_id, backbone="test")


def bright_rows_image(rows: int) -> np.ndarray:
    """64 x 64 16-bit image whose first ``rows`` rows are bright: mean display value 255 * rows / 64."""
    image = np.full((64, 64), 100, np.uint16)
    image[:rows] = 3000
    return image


# rows -> nearest centre: 6 -> abdominal, 19 -> adult_chest, 32 -> pediatric_chest, 45 -> spine,
# 58 -> others; 13 rows sits on the abdominal/adult_chest boundary -> uncertain at THRESHOLD.
ROWS_BY_CLASS = {"abdominal": 6, "adult_chest": 19, "pediatric_chest": 32, "spine": 45, "others": 58}
UNCERTAIN_ROWS = 13


def write_sr(path: Path) -> Path:
    """A Basic Text SR: a storage object without pixels (must be accepted, then quarantined)."""
    return write_non_image(path, pydicom.uid.BasicTextSRStorage, Modality="SR", PatientID="SYNTHETIC",
                           PatientName="SYNTHETIC")


def write_short_pixels(path: Path) -> Path:
    """A DX image whose Rows promise more pixel data than it has (reason truncated_pixel_data)."""
    write_dicom(path, bright_rows_image(20), body_part="CHEST")
    ds = pydicom.dcmread(path)
    ds.Rows = 80
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Sample:
    path: Path
    sop_instance_uid: str
    label: str  # what the router must decide: a class, "uncertain" or "unreadable"


def make_samples(folder: Path, per_class: int = 2, *, compressed: bool = True, extra_bad: bool = True,
                 uncertain: int = 1) -> list[Path]:
    """Images in every class (some RLE / JPEG 2000), uncertain ones, an SR and a broken image."""
    paths = []
    syntaxes = [ExplicitVRLittleEndian] + ([RLELossless, JPEG2000Lossless] if compressed else [])
    for label, rows in ROWS_BY_CLASS.items():
        for i in range(per_class):
            paths.append(write_dicom(folder / f"{label}_{i}.dcm", bright_rows_image(rows),
                                     transfer_syntax=syntaxes[(i + rows) % len(syntaxes)],
                                     body_part={"abdominal": "ABDOMEN", "spine": "LSPINE"}.get(label, "CHEST"),
                                     bits_stored=12))
    for i in range(uncertain):
        paths.append(write_dicom(folder / f"boundary_{i}.dcm", bright_rows_image(UNCERTAIN_ROWS), bits_stored=12))
    if extra_bad:
        paths.append(write_sr(folder / "report_sr.dcm"))
        paths.append(write_short_pixels(folder / "short_pixels.dcm"))
    return paths


def expected_labels(model_path: Path, files: list[Path]) -> dict[str, Sample]:
    """SOP Instance UID -> Sample, labels decided in-process exactly as the router decides them."""
    from utils.infer.decisions import UNREADABLE, decide
    from utils.infer.engine import decode_file
    from utils.infer.predictor import load_predictor
    from utils.preprocessing import to_model_input

    predictor = load_predictor(model_path)
    out = {}
    for path in files:
        d = decode_file(path, predictor.spec)
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        if d.image is None:
            label = UNREADABLE
        else:
            probs = predictor.predict(to_model_input(d.image[None], predictor.spec.channels))
            label = decide(probs, predictor.spec.class_names, THRESHOLD)[0][0]
        out[uid] = Sample(Path(path), uid, label)
    return out


def received_files(folder: Path) -> dict[str, list[Path]]:
    """SOP Instance UID -> files a storescp wrote into ``folder``."""
    out: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001, S112 - a file still being written
            continue
        out.setdefault(str(ds.SOPInstanceUID), []).append(path)
    return out


def assert_same_object(received: Path, original: Path) -> None:
    """Same SOP instance, transfer syntax and pixel data bytes (an SR: same content items)."""
    a, b = pydicom.dcmread(received), pydicom.dcmread(original)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID, received
    if "PixelData" in b:
        assert a.PixelData == b.PixelData, f"{received}: pixel data differs from {original}"
    else:
        assert "PixelData" not in a and a.SOPClassUID == b.SOPClassUID


# --- processes ------------------------------------------------------------------------------


class Process:
    """A child process with its output in a log file; killed at teardown whatever happens."""

    def __init__(self, args: list[str], log: Path, **kwargs) -> None:
        self.args, self.log = args, log
        self._log_handle = open(log, "ab")  # noqa: SIM115 - closed by kill()
        self.proc = subprocess.Popen(args, stdout=self._log_handle, stderr=subprocess.STDOUT,
                                     start_new_session=True, **kwargs)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int | None:
        if self.alive():
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._log_handle.close()
        return self.proc.returncode


@pytest.fixture
def processes():
    """``start(args, log) -> Process``; every process started is killed at teardown."""
    started: list[Process] = []

    def start(args: list[str], log: Path, **kwargs) -> Process:
        started.append(Process([str(a) for a in args], log, **kwargs))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def start_storescp(start, folder: Path, ae_title: str, port: int) -> Process:
    folder.mkdir(parents=True, exist_ok=True)
    process = start(storescp_command(folder, port, ae_title=ae_title), folder.parent / f"{ae_title}.log",
                    env=dcmtk_environment())
    wait_for(lambda: listening(port) or not process.alive(), 30, f"storescp {ae_title} to listen")
    assert process.alive(), process.output()
    return process


def start_router(start, config_file: Path, log: Path, timeout: float = 180) -> Process:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    process = start([sys.executable, ROOT / "router.py", "--config", config_file], log, cwd=ROOT, env=env)
    wait_for(lambda: "listening on port" in process.output() or not process.alive(), timeout, "the router to start")
    assert process.alive(), process.output()
    return process


def storescu_args(targets: list[Path] | Path, port: int, config_dir: Path, *, called: str = "ROUTER") -> list[str]:
    """dcmtk storescu sending files or folders (recursively), each file in its own transfer syntax."""
    targets = targets if isinstance(targets, list) else [targets]
    profile = storescu_profile(dicom_files(targets), config_dir / f"storescu-{time.monotonic_ns()}.cfg")
    return storescu_command(targets, "127.0.0.1", port, profile, called=called, calling="SENDER")


def storescu(targets: list[Path] | Path, port: int, config_dir: Path, *, timeout: float = 180,
             check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(storescu_args(targets, port, config_dir), capture_output=True, text=True,
                            timeout=timeout, check=False, env=dcmtk_environment())
    if check:
        assert result.returncode == 0 and "Store Failed" not in result.stderr, result.stdout + result.stderr
    return result


def write_config(path: Path, *, port: int, spool: Path, model: Path, destinations: dict, **extra) -> Path:
    config = {"ae_title": "ROUTER", "host": "127.0.0.1", "port": port, "model": str(model), "threshold": THRESHOLD,
              "spool_dir": str(spool), "batch_size": 8, "batch_wait_ms": 100, "retry_initial_s": 0.2,
              "retry_max_s": 1.0, "max_attempts": 3, "destinations": destinations,
              "min_free_mb": 1,  # the default reserve (500 MB) would refuse everything on a small CI disk
              **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def node(ae: str, port: int) -> dict:
    return {"ae_title": ae, "host": "127.0.0.1", "port": port}


# --- shared fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    return brightness_model(tmp_path_factory.mktemp("model") / "brightness.keras")


@pytest.fixture(scope="session")
def samples(tmp_path_factory, model_file) -> dict[str, Sample]:
    folder = tmp_path_factory.mktemp("samples")
    files = make_samples(folder)
    expected = expected_labels(model_file, files)
    labels = {s.label for s in expected.values()}
    assert labels == {*CLASSES, "uncertain", "unreadable"}, labels  # the model spreads the samples as designed
    return expected


# --- in-process peers and routers (pynetdicom only, no dcmtk) ----------------------------------


class Peer:
    """An in-process Storage SCP that keeps what it receives and answers ``status``."""

    def __init__(self, ae_title: str, status: int = 0x0000) -> None:
        self.ae_title, self.status, self.port = ae_title, status, free_port()
        self.received: dict[str, bytes] = {}
        self.calls = 0
        ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.ae = ae

    def _store(self, event):
        self.calls += 1
        if self.status == 0x0000:
            self.received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        return self.status

    def node(self) -> dict:
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}

    def close(self) -> None:
        self.ae.shutdown()


def send(port: int, paths: list[Path], *, calling: str = "SENDER", called: str = "ROUTER") -> list[int]:
    """C-STORE files with pynetdicom, each in its own transfer syntax; the status of each."""
    ae = AE(ae_title=calling)
    metas = [pydicom.filereader.read_file_meta_info(p) for p in paths]
    for sop, ts in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas}):
        ae.add_requested_context(sop, [ts])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(ae_title: str, status: int = 0x0000) -> Peer:
        made.append(Peer(ae_title, status))
        return made[-1]

    yield make
    for peer in made:
        peer.close()


@pytest.fixture
def router(tmp_path, model_file):
    """``router(destinations, **settings) -> RouterNode`` started in-process; stopped at teardown."""
    nodes: list[RouterNode] = []

    def start(destinations: dict, **settings) -> RouterNode:
        config = load_config(write_config(tmp_path / "router.yaml", port=free_port(), spool=tmp_path / "spool",
                                          model=model_file, destinations=destinations, **settings))
        nodes.append(RouterNode(config).start())
        assert nodes[-1].model_ready(120), "the model did not load"  # tests below start from a ready classifier
        return nodes[-1]

    yield start
    for node in nodes:
        node.stop()
