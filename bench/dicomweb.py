"""STOW-RS next to C-STORE on the same files: the router's intake, and forwarding to a real archive.

    python -m bench.dicomweb                                 # 60 files of 1024 x 1024, 12 bit, 3 repeats
    python -m bench.dicomweb --count 120 --size 2048 --per-request 1 10 --repeats 5
    python -m bench.dicomweb --skip-forwarding               # intake only (no Orthanc needed)

Intake. The router's two ways in, each in this process with only its receiving part running (a spool queue and an
audit log, no model): the Storage SCP (utils/routing/intake/scp.py) fed by dcmtk's storescu over one association,
and the STOW-RS server (utils/routing/intake/stow.py) fed by a sender process posting ``--per-request`` instances per
request over one keep-alive connection (requests). Both acknowledge only what is on disk (fsync, rename, queue row).
Reported: instances/s from the first byte to the last answer, and the CPU milliseconds per instance of the
receiving process (this one: the sender's CPU is its own process's and not counted).

Forwarding (skipped when Debian's orthanc and orthanc-dicomweb are missing). The same files, already in a spool and
routed, sent by the router's forwarder to one Orthanc: by C-STORE to its DICOM port and by STOW-RS to its DICOMweb
root (utils/routing/delivery/). Reported: instances/s until the last confirmation, and the forwarder's CPU ms per
instance (this process).

Medians of ``--repeats`` runs, each kind interleaved in every run. Prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.router import _free_port, _listening, _wait, make_files

ROOT = Path(__file__).resolve().parents[1]

SENDER = r"""
import sys, time, uuid, requests
url, per = sys.argv[1], int(sys.argv[2])
files = [open(p, "rb").read() for p in sys.argv[3:]]
http = requests.Session()
for start in range(0, len(files), per):
    boundary = uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
                    for f in files[start:start + per]) + b"--" + boundary.encode() + b"--\r\n"
    answer = http.post(url, data=body, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"}, timeout=120)
    if answer.status_code != 200:
        sys.exit(f"STOW-RS answered {answer.status_code}: {answer.text[:300]}")
"""


def _cpu() -> float:
    return time.process_time()


class Intake:
    """A spool queue and audit log in ``folder`` (what the router's intake writes to), and nothing else."""

    def __init__(self, folder: Path) -> None:
        from utils.routing.operations.audit import AuditLog
        from utils.routing.queue import SpoolQueue

        self.queue = SpoolQueue(folder / "spool")
        self.audit = AuditLog(folder / "spool" / "audit.jsonl")

    def close(self) -> None:
        self.audit.close()
        self.queue.close()


def cstore_intake(files: list[Path], tmp: Path) -> tuple[float, float]:
    """(instances/s, CPU ms per instance of this process) storescu -> the router's Storage SCP."""
    from bench.router import storescu
    from utils.routing.delivery.dcmtk import storescu_profile
    from utils.routing.intake.scp import StoreHandler, close_scp, start_scp
    from utils.routing.operations.config import load_config

    folder = Path(tempfile.mkdtemp(dir=tmp))
    intake = Intake(folder)
    port = _free_port()
    config = folder / "router.yaml"
    config.write_text(f"model: unused\nport: {port}\nhost: 127.0.0.1\nae_title: ROUTER\n"
                      f"destinations: {{others: {{folder: {folder / 'out'}}}}}\n")
    handler = StoreHandler(intake.queue, intake.audit, lambda: None)
    ae, server = start_scp(load_config(config), handler)
    try:
        _wait(lambda: _listening(port), 30, "the Storage SCP to listen")
        cpu = _cpu()
        start = storescu(files, port, storescu_profile(files[:1], folder / "storescu.cfg"), "ROUTER")
        seconds = time.time() - start
        cpu = _cpu() - cpu
    finally:
        close_scp(server, handler, 5)
        ae.shutdown()
        intake.close()
    assert intake_count(folder) == len(files)
    return len(files) / seconds, 1000 * cpu / len(files)


def stow_intake(files: list[Path], tmp: Path, per_request: int) -> tuple[float, float]:
    """(instances/s, CPU ms per instance of this process) a requests sender -> the router's STOW-RS server."""
    from utils.routing.intake.stow import StowReceiver, StowServer, StowSettings

    folder = Path(tempfile.mkdtemp(dir=tmp))
    intake = Intake(folder)
    server = StowServer(StowSettings(host="127.0.0.1", port=0), intake.queue,
                        StowReceiver(intake.queue, intake.audit, lambda: None)).serve()
    try:
        url = f"http://127.0.0.1:{server.port}/studies"
        cpu = _cpu()
        start = time.time()
        subprocess.run([sys.executable, "-c", SENDER, url, str(per_request), *map(str, files)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        seconds = time.time() - start
        cpu = _cpu() - cpu
    finally:
        server.close()
        intake.close()
    assert intake_count(folder) == len(files)
    return len(files) / seconds, 1000 * cpu / len(files)


def intake_count(folder: Path) -> int:
    import sqlite3

    db = sqlite3.connect(folder / "spool" / "queue.sqlite3")
    try:
        return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    finally:
        db.close()


def forwarding(files: list[Path], tmp: Path, how: str) -> tuple[float, float] | None:
    """(instances/s, CPU ms per instance of this process) the router's forwarder -> one Orthanc, by ``how``
    ("cstore" or "stow"); None without Orthanc or its DICOMweb plugin (or outside a checkout with tests/)."""
    try:
        from tests.orthanc_server import Orthanc, dicomweb_plugin, orthanc_binary
        from tests.routing.conftest import Process
    except ImportError:
        return None
    if orthanc_binary() is None or dicomweb_plugin() is None:
        return None
    from utils.routing.delivery.workers import make_forwarders
    from utils.routing.operations.config import load_config
    from utils.routing.queue import Classification

    folder = Path(tempfile.mkdtemp(dir=tmp))
    procs: list[Process] = []

    def start(args, log, **kwargs):
        procs.append(Process([str(a) for a in args], log, **kwargs))
        return procs[-1]

    import pydicom
    import yaml

    intake = None
    workers: list = []
    try:
        orthanc = Orthanc(start, folder / "orthanc", "ARCHIVE", dicomweb=True, check_called_aet=False)
        intake = Intake(folder)
        destination = ({"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": orthanc.dicom_port} if how == "cstore"
                       else {"dicomweb": orthanc.dicomweb_url})
        config = folder / "router.yaml"
        config.write_text(yaml.safe_dump({"model": "unused", "port": _free_port(), "spool_dir": str(folder / "spool"),
                                          "destinations": {"others": destination}, "min_free_mb": 1}))
        for path in files:  # spooled and routed, as the classifier leaves them
            meta = pydicom.filereader.read_file_meta_info(path)
            item, _ = intake.queue.store(path.read_bytes(), sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
                                         sop_class_uid=str(meta.MediaStorageSOPClassUID),
                                         transfer_syntax=str(meta.TransferSyntaxUID))
            intake.queue.start_classification([item])
            intake.queue.set_classified([Classification(item.id, "others", 1.0, "bench", "others",
                                                        decided_by="rule:bench")])
        workers = make_forwarders(load_config(config), intake.queue, intake.audit)
        cpu = _cpu()
        start_time = time.time()
        for worker in workers:
            worker.start()
        _wait(lambda: intake.queue.counts().get("forwarded", 0) >= len(files), 600, "every instance to be forwarded",
              interval=0.01)
        seconds = time.time() - start_time
        cpu = _cpu() - cpu
    finally:
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(timeout=10)
        if intake is not None:
            intake.close()
        for proc in procs:
            proc.kill()
    return len(files) / seconds, 1000 * cpu / len(files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=60, help="files per run")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (12-bit, square, uncompressed)")
    parser.add_argument("--per-request", type=int, nargs="+", default=[1, 10],
                        help="instances per STOW-RS request (one row each)")
    parser.add_argument("--repeats", type=int, default=3, help="runs; medians are reported")
    parser.add_argument("--skip-forwarding", action="store_true", help="intake only")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = make_files(tmp / "files", args.count, args.size, "explicit", seed=0)
        kinds = {"C-STORE (storescu, one association)": lambda: cstore_intake(files, tmp)}
        for per in args.per_request:
            kinds[f"STOW-RS ({per} per request)"] = lambda per=per: stow_intake(files, tmp, per)
        forward = {} if args.skip_forwarding else {
            "C-STORE to Orthanc's DICOM port": lambda: forwarding(files, tmp, "cstore"),
            "STOW-RS to Orthanc's DICOMweb root": lambda: forwarding(files, tmp, "stow")}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in {**kinds, **forward}}
        for _ in range(args.repeats):
            for name, run in {**kinds, **forward}.items():
                outcome = run()
                if outcome is not None:
                    results[name].append(outcome)

    print(f"\n{args.count} files of {args.size} x {args.size}, 12 bit, uncompressed; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{_dt.date.today().isoformat()}; medians of {args.repeats} runs\n")
    print("| Path | Instances/s | CPU ms per instance (receiving / forwarding process) | x C-STORE (rate) |")
    print("|---|---:|---:|---:|")
    for group in (kinds, forward):
        base = None
        for name in group:
            runs = results[name]
            if not runs:
                print(f"| {name} | n/a | n/a | |")
                continue
            rate = statistics.median(r for r, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            base = base or rate
            print(f"| {name} | {rate:.1f} | {cpu:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
