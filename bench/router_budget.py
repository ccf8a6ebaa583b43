"""Where one routed image's CPU time goes: the router's stages measured one at a time.

    python -m bench.router_budget --model best_int8.tflite                 # 1470 x 1470 12-bit files
    python -m bench.router_budget --model best_int8.tflite --size 2048 --count 40

bench/router.py measures the whole chain; this measures each stage the router runs for an
object, alone, as CPU time (user + system, every thread and child process it starts), so the
numbers hold whatever else the machine is doing (wall time does not on a shared machine):

- receive: dcmtk storescu -> the router's own pynetdicom Storage SCP (its settings: 1 MB PDUs,
  whole-PDU reads, quiet associations; a handler that only takes the bytes), the SCP side alone;
- store: SpoolQueue.store (sha256, write + fsync, rename, folder fsync, SQLite commit);
- rules: the header read the default rules need (Modality, SOP class);
- decode: the model's preprocessing spec in this process (the router runs it in its decoding
  processes: the same work plus a pickled 512 x 512 image back);
- model: the model on batches of ``--batch`` (its runtime's own threads, as the router runs it);
- forward: pynetdicom C-STORE to dcmtk storescp (16 KB PDUs, storescp's default) as the
  forwarder sends it, the sending side alone;
- audit + queue: the other commits and audit lines of one object's life.

The last line divides the machine's cores by the total: the images/s this chain could reach if
the router had every core to itself and kept them all busy. Prints Markdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.router import _free_port, _listening, _wait, make_files


def _cpu(children: bool = True) -> float:
    """CPU seconds of this process (all threads), and with ``children`` of the children it reaped."""
    import resource

    usages = [resource.getrusage(resource.RUSAGE_SELF)]
    if children:
        usages.append(resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


def _per_image(fn, count: int, repeats: int, children: bool = True) -> float:
    """Median over ``repeats`` of the CPU ms per image of ``fn()`` (which handles ``count`` images); without
    ``children``, the processes it starts and reaps (a sender) are not counted."""
    runs = []
    for _ in range(repeats):
        start = _cpu(children)
        fn()
        runs.append(1000 * (_cpu(children) - start) / count)
    return statistics.median(runs)


def receive(files: list[Path], tmp: Path, repeats: int) -> float:
    from pynetdicom import evt

    from utils.routing.intake import scp
    from utils.routing.intake import wakeup
    from utils.routing.delivery.dcmtk import environment, storescu_command, storescu_profile

    ae = scp.build_ae(_Plain())
    taken = []

    def handler(event):
        taken.append(len(event.encoded_dataset()))
        return 0x0000

    port = _free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, handler), (evt.EVT_CONN_OPEN, scp.tune_connection),
                                           (evt.EVT_CONN_CLOSE, wakeup.close)])
    profile = storescu_profile(files[:1], tmp / "storescu.cfg")
    try:
        def send() -> None:
            subprocess.run(storescu_command(files, "127.0.0.1", port, profile, called="ROUTER"), check=True,
                           env=environment(), capture_output=True)

        return _per_image(send, len(files), repeats, children=False)  # storescu's CPU is the sender's
    finally:
        server.shutdown()


class _Plain:
    """The SCP settings build_ae reads, as a router.yaml without TLS would give them."""

    ae_title, max_associations, allowed_callers = "ROUTER", 16, ()


def store(files: list[Path], tmp: Path, repeats: int) -> float:
    from utils.routing.queue import SpoolQueue

    blobs = [f.read_bytes() for f in files]
    queue = SpoolQueue(tmp / "spool")
    try:
        def run():
            for i, data in enumerate(blobs):
                queue.store(data, sop_instance_uid=f"1.2.3.{time.time_ns()}.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                            transfer_syntax="1.2.840.10008.1.2.1", calling_ae="SCU")

        return _per_image(run, len(blobs), repeats)
    finally:
        queue.close()


def rules(files: list[Path], repeats: int) -> float:
    from types import SimpleNamespace

    from utils.routing.decision.rules import RuleSet

    rule_set = RuleSet((), ())
    items = [SimpleNamespace(sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", calling_ae="SCU",
                             transfer_syntax="1.2.840.10008.1.2.1") for _ in files]
    return _per_image(lambda: [rule_set.decide(i, f) for i, f in zip(items, files)], len(files), repeats)


def decode(files: list[Path], spec, repeats: int) -> tuple[float, list[np.ndarray]]:
    from utils.infer.engine import decode_file

    images = []

    def run():
        images[:] = [decode_file(f, spec).image for f in files]

    return _per_image(run, len(files), repeats), images


def model(predictor, images: list[np.ndarray], batch: int, repeats: int) -> float:
    from utils.preprocessing import to_model_input

    x = to_model_input(np.stack([images[i % len(images)] for i in range(batch)]), predictor.spec.channels)
    predictor.predict(x)  # warm-up: the first call with a shape allocates
    return _per_image(lambda: predictor.predict(x), batch, repeats)


def forward(files: list[Path], tmp: Path, repeats: int) -> float:
    import pydicom
    from pynetdicom import AE, build_context, evt

    from utils.routing.intake import wakeup
    from utils.routing.delivery.dcmtk import environment, storescp_command
    from utils.routing.delivery.forwarder import enable_raw_sending
    from utils.routing.intake.scp import set_tcp_nodelay

    enable_raw_sending()
    port = _free_port()
    (tmp / "dest").mkdir()
    scp = subprocess.Popen(storescp_command(tmp / "dest", port, ae_title="DEST"), env=environment(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _listening(port), 30, "storescp")
        pairs = {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID))
                 for h in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
        ae = AE(ae_title="ROUTER")
        assoc = ae.associate("127.0.0.1", port, ae_title="DEST", contexts=[build_context(*p) for p in pairs],
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay), (evt.EVT_CONN_OPEN, wakeup.quiet),
                                           (evt.EVT_CONN_CLOSE, wakeup.close)])
        try:
            def run():
                for f in files:
                    if assoc.send_c_store(f).Status != 0:
                        raise RuntimeError("storescp refused an object")

            return _per_image(run, len(files), repeats)
        finally:
            assoc.release()
    finally:
        scp.kill()
        scp.wait(30)


def bookkeeping(count: int, tmp: Path, repeats: int) -> float:
    """An object's other commits and audit lines: start_classification and set_classified (per batch of 16),
    mark_done with its unlink, and the received / classified / forwarded audit lines."""
    from utils.routing.operations.audit import AuditLog
    from utils.routing.queue import FORWARDED, Classification, SpoolQueue

    queue = SpoolQueue(tmp / "spool-bookkeeping")
    audit = AuditLog(tmp / "audit.jsonl")
    try:
        runs = []
        for _ in range(repeats):
            items = [queue.store(b"x" * 128, sop_instance_uid=f"1.2.{time.time_ns()}.{i}", sop_class_uid="1.2",
                                 transfer_syntax="1.2.840.10008.1.2.1")[0] for i in range(count)]
            start = _cpu()
            for chunk in range(0, count, 16):
                batch = queue.start_classification(items[chunk:chunk + 16])
                queue.set_classified([Classification(i.id, "spine", 0.9, "m", "spine", "", "model:m") for i in batch])
            for item in items:
                audit.write("received", sop_instance_uid=item.sop_instance_uid, item=item.id, size=item.size)
                audit.write("classified", sop_instance_uid=item.sop_instance_uid, item=item.id, label="spine",
                            confidence=0.9, route="spine", decided_by="model:m")
                queue.mark_done(queue.get(item.id), FORWARDED, "0x0000")
                audit.write("forwarded", sop_instance_uid=item.sop_instance_uid, item=item.id, status="0x0000")
            runs.append(1000 * (_cpu() - start) / count)
        return statistics.median(runs)
    finally:
        audit.close()
        queue.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model the router serves (.tflite, .onnx, .keras, run dir)")
    parser.add_argument("--count", type=int, default=30, help="files per stage")
    parser.add_argument("--size", type=int, default=1470,
                        help="image side (1470: the 4.3 MB average of bench/router.py's 512-2048 px mix)")
    parser.add_argument("--batch", type=int, default=16, help="model batch size (the router's batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from utils.config import environment
    from utils.infer.predictor import load_predictor
    from utils.routing.delivery.dcmtk import find_tool

    if not (find_tool("storescu") and find_tool("storescp")):
        raise SystemExit("dcmtk's storescu/storescp are needed: apt-get install dcmtk")
    predictor = load_predictor(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as name:
        tmp = Path(name)
        files = make_files(tmp / "in", args.count, args.size, "explicit", seed=0)
        megabytes = sum(f.stat().st_size for f in files) / 1e6 / len(files)
        rows.append(("receive (pynetdicom SCP, the router's settings)", receive(files, tmp, args.repeats)))
        rows.append(("store (sha256, write + fsync, rename, commit)", store(files, tmp, args.repeats)))
        rows.append(("rules (header read)", rules(files, args.repeats)))
        decode_ms, images = decode(files, predictor.spec, args.repeats)
        rows.append((f"decode ({predictor.spec.image_size} px spec)", decode_ms))
        rows.append((f"model ({type(predictor).__name__}, batch {args.batch})",
                     model(predictor, images, args.batch, args.repeats)))
        rows.append(("forward (pynetdicom C-STORE, 16 KB PDUs)", forward(files, tmp, args.repeats)))
        rows.append(("audit + other queue commits", bookkeeping(max(args.count, 32), tmp, args.repeats)))
    env = environment()
    cores = os.cpu_count() or 1
    total = sum(ms for _, ms in rows)
    print(f"\nMachine: {env['processor']}, {cores} cores; {env['time'][:10]}; load average at the end "
          f"{os.getloadavg()[0]:.1f}. {args.count} files of {args.size} x {args.size} 12-bit ({megabytes:.1f} MB), "
          f"model {args.model}; CPU ms per image, medians of {args.repeats}.\n")
    print("| stage | CPU ms per image | share |")
    print("|---|---|---|")
    for stage, ms in rows:
        print(f"| {stage} | {ms:.1f} | {ms / total:.0%} |")
    print(f"| **total** | **{total:.1f}** | |")
    print(f"\nBound: {cores} cores x 1000 / {total:.1f} ms = **{cores * 1000 / total:.0f} images/s** for the router alone "
          "(senders and destinations on the same machine take their share too).")


if __name__ == "__main__":
    sys.exit(main())
