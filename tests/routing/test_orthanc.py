"""Orthanc in the loop: storescu -> upstream Orthanc -> router (pulling Orthanc's change feed) -> downstream Orthancs.

Real processes on loopback: Debian's ``Orthanc`` (three instances, each with its own configuration,
storage and index folders, HTTP and DICOM ports, remote access off), dcmtk's storescu, and router.py.
The router follows the upstream Orthanc's ``/changes`` feed (``orthanc_source``, HTTP basic
authentication), classifies and forwards each image to the AE title of its label on one of two
downstream Orthancs, which record the called AE title of each instance (``CalledAET``). The first
router process dies handing over the 5th instance (tests/routing/orthanc_crash_router.py: spool file
written, row and cursor not committed); the second is killed with SIGKILL while the hand-off is in
flight (some images forwarded, others waiting in its queue, more arriving at the upstream Orthanc
while it is down); the third finishes;
every image must then be, exactly once, at the downstream Orthanc and AE title its label says, with
the same transfer syntax and pixel data bytes; a CT stays where it is (not a projection modality).
From Orthanc's side, ``/modalities/router/echo`` succeeds from the allowed AE title, and a C-ECHO
or C-STORE from an AE title the router does not allow is refused.

Skips when Orthanc (``apt-get install orthanc``) or dcmtk is not installed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from utils.io.dicom_writer import write_dicom
from utils.routing.operations.audit import read_audit
from utils.routing.operations.config import load_config
from utils.routing.operations.service import check, print_status

from .conftest import (
    ROOT,
    bright_rows_image,
    dcmtk_environment,
    expected_labels,
    free_port,
    make_samples,
    needs_dcmtk,
    start_router,
    storescu_args,
    wait_for,
    write_config,
)
from tests.orthanc_server import PASSWORD, USER, Orthanc, orthanc_binary

from .orthanc_crash_router import KILL_STATUS


pytestmark = [needs_dcmtk, pytest.mark.skipif(orthanc_binary() is None,
                                              reason="Orthanc not installed (apt-get install orthanc)")]

TIMEOUT = 120  # generous: the machine is shared and slow
# label -> (downstream Orthanc, called AE title): one AE title per label, two labels' nodes per Orthanc
ROUTES = {"abdominal": ("DOWN_1", "ABDOMEN_AI"), "adult_chest": ("DOWN_1", "CHEST_AI"),
          "pediatric_chest": ("DOWN_1", "PEDS_AI"), "spine": ("DOWN_2", "SPINE_AI"),
          "others": ("DOWN_2", "OTHERS_AI"), "uncertain": ("DOWN_2", "REVIEW")}


def send(orthanc: Orthanc, files: list[Path], config_dir: Path, *, wait: bool = True):
    """dcmtk storescu -> an Orthanc (called by its AE title), each file in its own transfer syntax."""
    args = storescu_args(files, orthanc.dicom_port, config_dir, called=orthanc.aet)
    sender = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_environment())
    if wait:
        check_sent(sender)
    return sender


def check_sent(sender: subprocess.Popen) -> None:
    output = sender.communicate(timeout=TIMEOUT)[0]
    assert sender.returncode == 0 and "Store Failed" not in output, output


def queue_rows(spool: Path) -> dict[str, int]:
    """SOP Instance UID -> rows in the router's queue."""
    db = sqlite3.connect(f"file:{spool / 'queue.sqlite3'}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT sop_instance_uid, COUNT(*) FROM items GROUP BY sop_instance_uid").fetchall())
    finally:
        db.close()


def test_orthanc_to_router_to_orthancs_survives_kill_9(tmp_path, processes, model_file, capsys, monkeypatch):
    started = time.monotonic()
    router_port = free_port()
    upstream = Orthanc(processes, tmp_path / "upstream", "UPSTREAM", router_port=router_port, auth=True)
    downstream = {name: Orthanc(processes, tmp_path / name.lower(), name, router_port=router_port,
                                check_called_aet=False) for name in ("DOWN_1", "DOWN_2")}

    folder = tmp_path / "images"
    files = make_samples(folder, per_class=4, extra_bad=False, uncertain=2)  # 22 images, some RLE / JPEG 2000
    samples = expected_labels(model_file, files)
    assert {s.label for s in samples.values()} == set(ROUTES)
    ct = write_dicom(folder / "ct.dcm", bright_rows_image(19), modality="CT")  # not fetched: not a projection
    ct_uid = str(pydicom.dcmread(ct, stop_before_pixels=True).SOPInstanceUID)

    spool = tmp_path / "spool"
    monkeypatch.setenv("TEST_ORTHANC_PASSWORD", PASSWORD)  # the Orthanc password: from the environment, never the YAML
    config = write_config(
        tmp_path / "router.yaml", port=router_port, spool=spool, model=model_file,
        destinations={label: {"ae_title": ae, "host": "127.0.0.1", "port": downstream[name].dicom_port}
                      for label, (name, ae) in ROUTES.items()},
        allowed_callers=["UPSTREAM"],
        orthanc_source={"url": upstream.client.url, "username": USER, "password_env": "TEST_ORTHANC_PASSWORD",
                        "poll_s": 0.2,
                        "batch": 5, "start_from": "beginning"})
    logs = iter(tmp_path / f"router-{i}.log" for i in range(1, 10))
    # Run 1 dies handing over the 5th instance: its spool file written, its row and the cursor not committed.
    env = {**os.environ, "KILL_AT_ORTHANC_STORE": "5", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONUNBUFFERED": "1"}
    router = processes([sys.executable, "-m", "tests.routing.orthanc_crash_router", "--config", config], next(logs),
                       cwd=ROOT, env=env)
    wait_for(lambda: "listening on port" in router.output() or not router.alive(), TIMEOUT, "the router to listen")

    # From Orthanc's side: C-ECHO from the allowed AE title works; from another one (DOWN_1) it is refused.
    assert upstream.post("/modalities/router/echo", {}) == (200, {})
    status, answer = downstream["DOWN_1"].post("/modalities/router/echo", {})
    assert status != 200 and "Rejected" in answer.get("Details", ""), answer

    ordered = sorted(files)
    first, second = ordered[:12], ordered[12:] + [ct]
    send(upstream, first, tmp_path)
    wait_for(lambda: not router.alive(), TIMEOUT, "the router to die handing over the 5th instance")
    assert router.proc.returncode == KILL_STATUS, router.output()
    assert len(list((spool / "files").glob("*.dcm"))) == sum(queue_rows(spool).values()) + 1 == 5

    def audit() -> list[dict]:
        path = spool / "audit.jsonl"
        return read_audit(path) if path.exists() else []

    def forwarded() -> set[str]:
        return {r["sop_instance_uid"] for r in audit() if r["event"] == "forwarded" and r["status"] == "0x0000"}

    # Run 2: the file is registered from the spool, the source fetches it again (a duplicate, not stored twice).
    router = start_router(processes, config, next(logs))

    # A C-STORE to the router with an AE title it does not allow (Orthanc's LocalAet) is refused.
    some = upstream.instances()[str(pydicom.dcmread(first[0], stop_before_pixels=True).SOPInstanceUID)]
    status, answer = upstream.post("/modalities/router/store", {"Resources": [some], "LocalAet": "INTRUDER",
                                                               "Synchronous": True})
    assert status != 200 and "Rejected" in answer.get("Details", ""), answer

    # Run 2 is killed (kill -9) once the first images are forwarded, while the second part is being stored in Orthanc
    wait_for(forwarded, TIMEOUT, f"the first image to be forwarded (router log: {router.log})", interval=0.05)
    sender = send(upstream, second, tmp_path, wait=False)
    router.kill(signal.SIGKILL)
    before = audit()
    fetched_before = {r["sop_instance_uid"] for r in before if r["event"] == "received"}
    forwarded_before = forwarded()
    assert 0 < len(forwarded_before) < len(samples), "the kill came too late to cut the hand-off short"
    check_sent(sender)  # Orthanc took everything while the router was down
    assert set(upstream.instances()) == set(samples) | {ct_uid}
    assert any(r["event"] == "recovered" and r["orphans_registered"] == 1 for r in before)
    assert any(r["event"] == "received" and r.get("source") == "orthanc" and r["duplicate"] for r in before)

    router = start_router(processes, config, next(logs))  # run 3

    def arrived() -> int:
        return sum(o.instance_count() for o in downstream.values())

    wait_for(lambda: arrived() >= len(samples), TIMEOUT, f"{len(samples)} images at the downstream Orthancs "
             f"(router log: {router.log})", interval=0.5)
    wait_for(lambda: forwarded() >= set(samples), TIMEOUT, "every delivery to be recorded")

    # Each image exactly once, at the Orthanc and AE title of its label, same transfer syntax and pixel data.
    where: dict[str, list[tuple[str, str]]] = {}
    for name, orthanc in downstream.items():
        for uid, instance in orthanc.instances().items():
            where.setdefault(uid, []).append((name, orthanc.called_aet(instance)))
            received, original = orthanc.file(instance), pydicom.dcmread(samples[uid].path)
            assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID, uid
            assert received.PixelData == original.PixelData, f"{uid}: pixel data differs"
    assert set(where) == set(samples), "an image is missing downstream, or one arrived that should not (the CT)"
    for uid, sample in samples.items():
        assert where[uid] == [ROUTES[sample.label]], f"{uid} ({sample.label}) is at {where[uid]}"

    # The hand-off from Orthanc is exactly once: one queue row per image, whatever the kill cut short;
    # the CT was never fetched and nothing came in from the refused AE title.
    rows = queue_rows(spool)
    assert rows == {uid: 1 for uid in samples}, rows
    records = audit()
    assert not [r for r in records if r.get("calling_ae") == "INTRUDER"]
    assert {r["sop_instance_uid"] for r in records if r["event"] == "received"} == set(samples)
    assert all(r.get("source") == "orthanc" for r in records if r["event"] == "received" and not r.get("reconciled"))
    deliveries = [r["sop_instance_uid"] for r in records if r["event"] == "forwarded" and r["status"] == "0x0000"]

    # --status shows the cursor caught up with Orthanc's last change
    assert print_status(load_config(config)) == 0
    status_text = capsys.readouterr().out
    assert "orthanc source http://127.0.0.1" in status_text and " 0 changes behind" in status_text, status_text
    # --check reaches the upstream Orthanc with the configured credentials and C-ECHOes the downstream AE titles
    assert check(load_config(config)) == 0
    check_text = capsys.readouterr().out
    assert "Orthanc 1." in check_text and "(AET UPSTREAM)" in check_text and "0 changes to look at" in check_text, \
        check_text

    assert router.kill(signal.SIGTERM, timeout=60) == 0, router.output()
    with capsys.disabled():
        print(f"\n[orthanc] {len(samples)} images; before the kill {len(fetched_before)} fetched, "
              f"{len(forwarded_before)} forwarded; {len(deliveries) - len(set(deliveries))} sent twice "
              f"(at least once; Orthanc keeps one); {time.monotonic() - started:.1f} s")
