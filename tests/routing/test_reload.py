"""router.py reloads its configuration, its model and its audit log on SIGHUP while images stream in.

One router process, two in-process destinations, a sender thread storing images one association each; halfway,
the configuration moves every class to the other destination and names another model, logrotate moves the
audit log away, and SIGHUP is sent. Nothing may be lost or delivered twice, what is classified after the reload
goes to the new destination with the new model's id, the running one stays when a broken configuration or a model
that does not load is sent next, and the log of the reload names what changed.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pydicom
import yaml

from utils.io.dicom_writer import write_dicom
from utils.routing.operations.audit import read_audit

from .conftest import (ROWS_BY_CLASS, bright_rows_image, brightness_model, everywhere, free_port, send,
                       start_router, wait_for, write_config)

TIMEOUT = 120


def images(folder: Path, count: int) -> list[Path]:
    labels = list(ROWS_BY_CLASS)
    return [write_dicom(folder / f"{i:03d}.dcm", bright_rows_image(ROWS_BY_CLASS[labels[i % len(labels)]]),
                        body_part="CHEST") for i in range(count)]


def uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_sighup_reloads_configuration_model_and_audit_log_while_images_stream_in(processes, peers, model_file,
                                                                                 tmp_path):
    old, new = peers("OLD_DEST"), peers("NEW_DEST")
    second_model = brightness_model(tmp_path / "second.keras", model_id="test-brightness-2")
    port, spool = free_port(), tmp_path / "spool"
    config = write_config(tmp_path / "router.yaml", port=port, spool=spool, model=model_file,
                          destinations=everywhere(old))
    router = start_router(processes, config, tmp_path / "router.log")
    files = images(tmp_path / "in", 36)
    statuses: list[int] = []

    def stream(paths: list[Path]) -> None:
        for path in paths:
            statuses.extend(send(port, [path]))
            time.sleep(0.05)

    sender = threading.Thread(target=stream, args=(files[:24],))
    sender.start()
    wait_for(lambda: len(old.received) >= 6, TIMEOUT, "the first images to be forwarded")
    # logrotate's way: move the log, then SIGHUP (postrotate); the new configuration in place first
    audit = spool / "audit.jsonl"
    audit.rename(spool / "audit.jsonl.1")
    document = yaml.safe_load(config.read_text())
    document.update(destinations=everywhere(new), model=str(second_model))
    config.write_text(yaml.safe_dump(document))
    router.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: audit.exists() and any(r["event"] == "reloaded" for r in read_audit(audit)), TIMEOUT,
             "the reload")
    sender.join(TIMEOUT)
    stream(files[24:])  # after the reload: the new destination only
    wait_for(lambda: len(old.received) + len(new.received) >= len(files), TIMEOUT, "every image to be forwarded")
    time.sleep(1)  # a second delivery would show up now

    assert statuses == [0] * len(files)
    sent = {uid(p) for p in files}
    assert set(old.received) | set(new.received) == sent
    assert not set(old.received) & set(new.received), "an image was delivered twice"
    assert old.calls + new.calls == len(files)
    assert {uid(p) for p in files[24:]} <= set(new.received)
    assert len(new.received) >= 12 and len(old.received) >= 6

    reloaded = [r for r in read_audit(audit) if r["event"] == "reloaded"]
    assert len(reloaded) == 1 and reloaded[0]["source"] == "SIGHUP"
    assert set(reloaded[0]["changed"]) == {"destinations", "model"} and reloaded[0]["restart_needed"] == []
    assert reloaded[0]["model_id"] == "test-brightness-2"
    records = read_audit(audit, with_rotated=True)  # both files, the rotated one first
    assert sorted(r["sop_instance_uid"] for r in records if r["event"] == "received") == sorted(sent)
    by_model = {}
    for r in records:
        if r["event"] == "classified":
            by_model.setdefault(r["sop_instance_uid"], []).append(r["model_id"])
    assert sorted(by_model) == sorted(sent) and all(len(v) == 1 for v in by_model.values()), "classified twice"
    assert {by_model[uid(p)][0] for p in files[24:]} == {"test-brightness-2"}
    assert "test-brightness" in {v[0] for v in by_model.values()}  # the first ones, before the reload

    # A configuration with mistakes and a model that does not load are refused; the running one stays.
    document_ok = dict(document)
    config.write_text(yaml.safe_dump({**document, "batch_size": 0, "prot": 1}))
    router.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(r["event"] == "reload_refused" for r in read_audit(audit)), TIMEOUT, "a refusal")
    refused = [r for r in read_audit(audit) if r["event"] == "reload_refused"]
    assert "batch_size must be >= 1, got 0" in refused[0]["problem"] and "unknown key 'prot'" in refused[0]["problem"]
    (tmp_path / "not-a-model.keras").write_bytes(b"not a zip archive")
    config.write_text(yaml.safe_dump({**document_ok, "model": str(tmp_path / "not-a-model.keras"),
                                      "destinations": everywhere(old)}))
    router.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len([r for r in read_audit(audit) if r["event"] == "reload_refused"]) == 2, TIMEOUT,
             "the second refusal")
    assert router.alive(), router.output()
    extra = images(tmp_path / "extra", 1)
    assert send(port, extra) == [0]
    wait_for(lambda: uid(extra[0]) in new.received, TIMEOUT, "an image after the refusals")  # still the new set-up
    assert uid(extra[0]) not in old.received
    assert "reload (SIGHUP) refused" in router.output()
    assert router.kill(signal.SIGTERM, timeout=60) == 0, router.output()
