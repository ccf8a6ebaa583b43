"""The router in-process with pynetdicom peers: quarantine folder, non-image objects, refusals,
batching, C-ECHO, calling AE checks, and predict-style decisions. No dcmtk needed."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import EncapsulatedPDFStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from utils.io.dicom_writer import write_non_image
from utils.routing import queue as q
from utils.routing.operations.audit import read_audit
from utils.routing.node import RouterNode
from utils.routing.queue import SpoolLockedError

from .conftest import CLASSES, free_port, send, wait_for, write_config

TIMEOUT = 60


def write_pdf(path: Path) -> Path:
    return write_non_image(path, EncapsulatedPDFStorage, Modality="DOC", PatientID="SYNTHETIC",
                           MIMETypeOfEncapsulatedDocument="application/pdf",
                           EncapsulatedDocument=b"%PDF-1.4\n% synthetic\n")


def test_quarantine_folder_non_images_and_exact_forwarding(router, peers, samples, tmp_path):
    good = peers("GOOD")
    node = router({**{c: good.node() for c in CLASSES}, "uncertain": good.node()})  # unreadable: default folder
    pdf = write_pdf(tmp_path / "doc.dcm")
    statuses = send(node.port, [s.path for s in samples.values()] + [pdf])
    assert statuses == [0] * (len(samples) + 1)  # non-images are accepted, not refused

    images = {u for u, s in samples.items() if s.label != "unreadable"}
    wait_for(lambda: images <= set(good.received), TIMEOUT, "the images to be forwarded")
    for uid in images:  # the dataset bytes as the sender encoded them
        sent = pydicom.dcmread(samples[uid].path)
        assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(good.received[uid]), force=True).PixelData == sent.PixelData
    quarantine = node.config.destinations["unreadable"].folder
    bad = {u for u, s in samples.items() if s.label == "unreadable"} | {str(pydicom.dcmread(pdf).SOPInstanceUID)}
    wait_for(lambda: len(list(quarantine.glob("*.dcm"))) == len(bad), TIMEOUT, "the quarantine folder to fill")
    reasons = {json.loads(p.read_text())["sop_instance_uid"]: json.loads(p.read_text())["reason"]
               for p in quarantine.glob("*.json")}
    assert set(reasons) == bad
    short = {u for u, s in samples.items() if s.path.name == "short_pixels.dcm"}  # a DX image: the model's verdict
    assert all(reasons[u].startswith("truncated_pixel_data") for u in short)
    assert all(reasons[u].startswith("not_projection_radiography") for u in bad - short)  # SR, PDF: by rule
    assert not set(good.received) & bad
    wait_for(lambda: not list((tmp_path / "spool" / "files").iterdir()), TIMEOUT, "the spool to empty")
    assert node.queue.counts() == {q.FORWARDED: len(images), q.QUARANTINED: len(bad)}


def test_a_failure_status_is_retried_then_marked_failed(router, peers, samples):
    refusing, good = peers("REFUSING", status=0xA700), peers("GOOD")
    node = router({**{c: good.node() for c in CLASSES}, "others": refusing.node(), "uncertain": good.node()})
    others = {u: s for u, s in samples.items() if s.label == "others"}
    send(node.port, [s.path for s in others.values()])
    wait_for(lambda: node.queue.counts().get(q.FAILED) == len(others), TIMEOUT, "the items to be marked failed")
    assert refusing.calls == 3 * len(others)  # max_attempts
    failed = node.queue.items(q.FAILED)
    assert all("0xA700" in i.reason and node.queue.path(i).exists() for i in failed)


def test_images_arriving_together_are_classified_together(router, peers, samples):
    good = peers("GOOD")
    images = {u: s for u, s in samples.items() if s.label != "unreadable"}
    # the batch is due when all have arrived, or 60 s after the first: one batch unless the machine stalls
    node = router({**{c: good.node() for c in CLASSES}, "uncertain": good.node()}, batch_size=len(images),
                  batch_wait_ms=60_000, max_associations=len(images))
    results: list = []

    def one(path):
        try:
            results.append(send(node.port, [path]))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            results.append(error)

    threads = [threading.Thread(target=one, args=(s.path,)) for s in images.values()]
    for thread in threads:  # one association each, all at once
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert results == [[0]] * len(images)
    wait_for(lambda: set(images) <= set(good.received), TIMEOUT, "the images to be forwarded")
    assert node.classifier.batches == 1
    classified = [r for r in read_audit(node.config.audit_log) if r["event"] == "classified"]
    assert {r["sop_instance_uid"]: r["label"] for r in classified} == {u: s.label for u, s in images.items()}


def test_echo_calling_ae_check_and_one_router_per_spool(router, peers, model_file, tmp_path):
    good = peers("GOOD")
    node = router({**{c: good.node() for c in CLASSES}, "uncertain": good.node()}, allowed_callers=["MODALITY"])
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="ROUTER")
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    for title in ("STRANGER", "modality"):  # C-ECHO included; compared exactly, case-sensitive (--check says so)
        stranger = AE(ae_title=title)
        stranger.add_requested_context(Verification)
        assert stranger.associate("127.0.0.1", node.port, ae_title="ROUTER").is_rejected
    with pytest.raises(SpoolLockedError):
        RouterNode(node.config).start()


def test_a_model_without_a_route_for_a_class_is_refused(router, peers):
    from utils.config import ConfigError

    good = peers("GOOD")
    with pytest.raises(ConfigError, match="no destination for"):
        router({"spine": good.node(), "uncertain": good.node()})



def test_batches_are_cut_into_warmed_up_shapes():
    import numpy as np

    from utils.routing.decision.classifier import chunk_sizes, predict_in_chunks, warm_up

    assert chunk_sizes(13, 16) == [8, 4, 1] and chunk_sizes(10, 10) == [8, 2] and chunk_sizes(3, 1) == [1, 1, 1]

    class Recorder:
        spec = type("Spec", (), {"input_shape": (2, 2, 1)})()

        def __init__(self):
            self.shapes = []

        def predict(self, x):
            self.shapes.append(len(x))
            return x.reshape(len(x), -1)[:, :1] * 2

    model = Recorder()
    assert warm_up(model, 12) == [1, 2, 4, 8]
    batch = np.arange(11 * 4, dtype=np.float32).reshape(11, 2, 2, 1)
    model.shapes.clear()
    assert np.array_equal(predict_in_chunks(model, batch, 12), batch.reshape(11, -1)[:, :1] * 2)
    assert model.shapes == [8, 2, 1]


def test_router_check_status_and_requeue_commands(peers, model_file, tmp_path, capsys):
    import router as router_script

    good = peers("GOOD")
    down = {"ae_title": "DOWN", "host": "127.0.0.1", "port": free_port()}
    config = write_config(tmp_path / "router.yaml", port=free_port(), spool=tmp_path / "spool", model=model_file,
                          destinations={**{c: good.node() for c in CLASSES}, "uncertain": down})
    assert router_script.main(["--config", str(config), "--check"]) == 1  # one destination does not answer
    out = capsys.readouterr().out
    assert "spine            -> GOOD@127.0.0.1" in out and "echo ok" in out and "uncertain        -> DOWN@" in out
    assert "no association" in out
    assert router_script.main(["--config", str(config), "--status"]) == 2  # no queue yet
    spool = q.SpoolQueue(tmp_path / "spool")
    item, _ = spool.store(b"x", sop_instance_uid="1.2", sop_class_uid="1.2.3", transfer_syntax="1.2.840.10008.1.2.1")
    spool.set_classified([q.Classification(item.id, "spine", 0.9, "m", "spine")])
    spool.defer(spool.get(item.id), "refused by GOOD", delay=0, give_up=True)
    assert router_script.main(["--config", str(config), "--status"]) == 0  # while the spool is locked: fine
    assert "failed 1" in capsys.readouterr().out
    assert router_script.main(["--config", str(config), "--requeue-failed"]) == 0
    assert spool.get(item.id).state == q.CLASSIFIED
