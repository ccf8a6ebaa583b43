"""The router between real DICOM peers on loopback: dcmtk's storescu sends, storescp processes receive.

Destinations: A (abdominal, adult_chest, pediatric_chest), B (spine, others), C (uncertain and
unreadable, i.e. the quarantine node). Every object must reach the destination of the label the
model gives it, with the same SOP Instance UID, transfer syntax and pixel data bytes, also when a
destination is down at first, and when the router is killed (kill -9) and restarted.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from utils.routing.operations.audit import read_audit

from .conftest import (
    assert_same_object,
    dcmtk_environment,
    expected_labels,
    free_port,
    make_samples,
    needs_dcmtk,
    node,
    received_files,
    start_router,
    start_storescp,
    storescp_command,
    storescu,
    storescu_args,
    wait_for,
    write_config,
)

pytestmark = needs_dcmtk

ROUTE = {**{c: "A" for c in ("abdominal", "adult_chest", "pediatric_chest")}, "spine": "B", "others": "B",
         "uncertain": "C", "unreadable": "C"}
TIMEOUT = 120  # generous: the machine is shared and slow


class Network:
    """One router and destinations A, B, C with their folders, ports and process handles."""

    def __init__(self, tmp_path: Path, start, model: Path) -> None:
        self.tmp, self.start, self.model = tmp_path, start, model
        self.ports = {name: free_port() for name in ("router", "A", "B", "C")}
        self.folders = {name: tmp_path / f"dest_{name}" for name in "ABC"}
        self.spool = tmp_path / "spool"
        self.config = write_config(tmp_path / "router.yaml", port=self.ports["router"], spool=self.spool, model=model,
                                   destinations={label: node(f"DEST_{d}", self.ports[d]) for label, d in ROUTE.items()})
        self.router = None
        self.destinations = {}
        self.router_starts = 0

    def start_destination(self, name: str):
        self.destinations[name] = start_storescp(self.start, self.folders[name], f"DEST_{name}", self.ports[name])

    def start_router(self):
        self.router_starts += 1
        self.router = start_router(self.start, self.config, self.tmp / f"router-{self.router_starts}.log")
        return self.router

    def audit(self) -> list[dict]:
        path = self.spool / "audit.jsonl"
        return read_audit(path) if path.exists() else []

    def arrived(self, name: str) -> dict[str, list[Path]]:
        return received_files(self.folders[name]) if self.folders[name].exists() else {}

    def spool_files(self) -> list[Path]:
        return sorted((self.spool / "files").glob("*.dcm"))


def expected_by_destination(samples) -> dict[str, set[str]]:
    out = {name: set() for name in "ABC"}
    for uid, sample in samples.items():
        out[ROUTE[sample.label]].add(uid)
    return out


def wait_for_arrivals(net: Network, samples, names="ABC", timeout: float = TIMEOUT) -> None:
    """Until each destination confirmed its objects (the router's audit records the confirmation,
    which storescp sends after writing the file, so the files are complete)."""
    expected = expected_by_destination(samples)

    def confirmed(name: str) -> set[str]:
        return {r["sop_instance_uid"] for r in net.audit()
                if r["event"] in ("forwarded", "quarantined") and r.get("status") == "0x0000"
                and r["destination"].startswith(f"DEST_{name}@")}

    for name in names:
        wait_for(lambda name=name: expected[name] <= confirmed(name), timeout,
                 f"destination {name} to confirm {len(expected[name])} objects (router log: {net.router.log})")
        assert expected[name] <= set(net.arrived(name))


def check_exact(net: Network, samples, names="ABC", *, once: bool = True) -> None:
    """Right place, nothing elsewhere, same bytes; with ``once``, no duplicates."""
    expected = expected_by_destination(samples)
    for name in names:
        arrived = net.arrived(name)
        assert set(arrived) == expected[name], f"destination {name}: wrong objects"
        for uid, files in arrived.items():
            if once:
                assert len(files) == 1, f"{uid} arrived {len(files)} times at {name}"
            for path in files:
                assert_same_object(path, samples[uid].path)


@pytest.fixture
def net(tmp_path, processes, model_file) -> Network:
    return Network(tmp_path, processes, model_file)


def test_every_object_reaches_its_destination_exactly_as_sent(net, samples, tmp_path):
    for name in "ABC":
        net.start_destination(name)
    router = net.start_router()
    files = sorted(s.path for s in samples.values())
    # two senders at once: several associations, images arriving together are batched
    senders = [subprocess.Popen(storescu_args(part, net.ports["router"], tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=dcmtk_environment()) for part in (files[::2], files[1::2])]
    for sender in senders:
        output = sender.communicate(timeout=TIMEOUT)[0]
        assert sender.returncode == 0 and "Store Failed" not in output, output
    wait_for_arrivals(net, samples)
    check_exact(net, samples)
    wait_for(lambda: not net.spool_files(), TIMEOUT, "the spool to empty")

    events = net.audit()
    by_uid: dict[str, list[dict]] = {}
    for record in events:
        if "sop_instance_uid" in record:
            by_uid.setdefault(record["sop_instance_uid"], []).append(record)
    for uid, sample in samples.items():
        kinds = [r["event"] for r in by_uid[uid]]
        assert kinds[0] == "received" and "classified" in kinds, kinds
        classified = next(r for r in by_uid[uid] if r["event"] == "classified")
        assert classified["label"] == sample.label
        by_rule = sample.path.name == "report_sr.dcm"  # not projection radiography: the model never sees it
        assert classified["decided_by"] == ("rule:not-projection" if by_rule else "model:test-brightness")
        assert classified["model_id"] == ("" if by_rule else "test-brightness")
        final = by_uid[uid][-1]
        assert final["event"] == ("quarantined" if sample.label == "unreadable" else "forwarded")
        assert final["status"] == "0x0000" and final["destination"].startswith(f"DEST_{ROUTE[sample.label]}@")
    unreadable = [r for r in events if r["event"] == "classified" and r["label"] == "unreadable"]
    assert {r["reason"].split(":")[0] for r in unreadable} == {"not_projection_radiography", "truncated_pixel_data"}

    assert router.kill(signal.SIGTERM, timeout=60) == 0, router.output()  # clean stop
    assert net.audit()[-1]["event"] == "stopped"


def test_a_down_destination_and_kill_9_lose_nothing(net, samples, tmp_path):
    """A is down at first: its objects wait in the queue; the router is killed (-9) and restarted; A
    comes up; everything arrives once, and the spool is emptied only after confirmation."""
    net.start_destination("B")
    net.start_destination("C")
    router = net.start_router()
    storescu(sorted(s.path for s in samples.values()), net.ports["router"], tmp_path)  # all acknowledged
    wait_for_arrivals(net, samples, "BC")
    expected = expected_by_destination(samples)
    done = {"forwarded", "quarantined"}
    wait_for(lambda: {r["sop_instance_uid"] for r in net.audit() if r["event"] in done} >= expected["B"] | expected["C"],
             TIMEOUT, "B and C deliveries to be recorded")
    wait_for(lambda: any(r["event"] == "destination_down" and r["destination"].startswith("DEST_A@")
                         for r in net.audit()), TIMEOUT, "A to be reported down")
    assert len(net.spool_files()) == len(expected["A"])  # A's objects are still spooled

    router.kill(signal.SIGKILL)
    net.start_router()
    net.start_destination("A")
    wait_for_arrivals(net, samples, "A")
    check_exact(net, samples)
    wait_for(lambda: not net.spool_files(), TIMEOUT, "the spool to empty")
    assert any(r["event"] == "recovered" and r["pending"] == len(expected["A"]) for r in net.audit())


@pytest.mark.slow
def test_killed_mid_stream_then_resent(net, model_file, tmp_path):
    """kill -9 while storescu is sending: what was acknowledged is delivered after the restart; the
    sender re-sends the rest (and, harmlessly, some of the rest again); every object arrives."""
    folder = tmp_path / "many"
    make_samples(folder, per_class=20, uncertain=3)
    samples = expected_labels(model_file, sorted(folder.iterdir()))
    for name in "ABC":
        net.start_destination(name)
    router = net.start_router()
    sender = subprocess.Popen(storescu_args(folder, net.ports["router"], tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=dcmtk_environment())
    wait_for(lambda: sum(r["event"] == "received" for r in net.audit()) >= 10 or sender.poll() is not None, TIMEOUT,
             "the first objects to be received", interval=0.02)
    router.kill(signal.SIGKILL)
    output = sender.communicate(timeout=TIMEOUT)[0]
    acknowledged = {r["sop_instance_uid"] for r in net.audit() if r["event"] == "received"}
    assert len(acknowledged) < len(samples), "storescu finished before the kill; nothing was cut off"
    assert "Store Failed" in output or sender.returncode != 0, output

    net.start_router()
    wait_for_arrivals(net, {u: s for u, s in samples.items() if u in acknowledged})  # no re-send needed for these
    storescu(folder, net.ports["router"], tmp_path)  # the sender retries everything
    wait_for_arrivals(net, samples)
    check_exact(net, samples, once=False)
    wait_for(lambda: not net.spool_files(), TIMEOUT, "the spool to empty")


def test_a_refused_transfer_syntax_fails_with_the_reason(net, samples, tmp_path):
    """A destination that accepts only uncompressed syntaxes: compressed objects are not converted;
    they are retried, then marked failed with the reason and kept in the spool."""
    net.start_destination("B")
    net.start_destination("C")
    a_folder = net.folders["A"]
    a_folder.mkdir()
    a = net.start(storescp_command(a_folder, net.ports["A"], ae_title="DEST_A", accept_all=False), tmp_path / "A.log",
                  env=dcmtk_environment())
    net.start_router()
    a_uids = expected_by_destination(samples)["A"]
    compressed = {u for u in a_uids if samples[u].path.read_bytes().find(b"1.2.840.10008.1.2.1\0") < 0}
    assert compressed and compressed != a_uids
    storescu(sorted(s.path for s in samples.values()), net.ports["router"], tmp_path)
    wait_for_arrivals(net, {u: samples[u] for u in a_uids - compressed}, "A")

    def failed():
        return {r["sop_instance_uid"]: r for r in net.audit() if r["event"] == "forwarded" and r["status"] == "failed"}

    wait_for(lambda: set(failed()) == compressed, TIMEOUT, "the compressed objects to be marked failed")
    assert all("refused" in r["detail"] and "never converted" in r["detail"] and r["attempts"] == 3
               for r in failed().values())
    assert len(net.spool_files()) == len(compressed)  # kept for --requeue-failed
    assert set(net.arrived("A")) == a_uids - compressed and a.alive()
