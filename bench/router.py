"""End-to-end router throughput and latency: dcmtk storescu -> router.py -> two dcmtk storescp.

    python -m bench.router                                  # 120 files of 1536 x 1536, 12 bit
    python -m bench.router --count 300 --size 2048 --batch-sizes 1 8 32
    python -m bench.router --model runs/demo                # a trained model instead of an untrained one
    python -m bench.router --model best_int8.tflite --count 200 --min-size 512 --size 2048 \
        --senders 1 8 --batch-sizes 16 --repeats 3          # the issue's setting: medians of 3 runs
    python -m bench.router ... --py-spy 30                  # also sample the router with py-spy for 30 s

Synthetic X-rays (utils.data.demo drawings, mixed classes) are written as uncompressed DICOM (or
--syntax rle / j2k). A router process is started per batch size with a model at the paper's
512 px (an untrained MobileNet-V1 unless --model: speed does not depend on the weights); one
storescu association sends every file (``--senders N``: N storescu processes at once, each with
its share of the files); the router forwards each to one of two storescp destinations. With
``--min-size`` the image sides are drawn between --min-size and --size. Reported: images/s from the first byte sent to the last destination confirmation
(the router's audit log), the rate at which the router acknowledged (spooled and fsynced) the
files, per-image latency from received to confirmed under that load (p50 / p95), and the latency
of a single image sent to an idle router. The same files sent straight from storescu to storescp
give the network-and-disk baseline, measured in the same run with the same senders (the ratio
column divides by it). ``--repeats`` runs everything that often and reports medians. Prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)
    return value


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def make_files(folder: Path, count: int, size: int, syntax: str, seed: int, min_size: int | None = None) -> list[Path]:
    import cv2
    import pydicom

    from utils.data.demo import draw
    from utils.io.dicom_writer import write_dicom

    uid = {"explicit": pydicom.uid.ExplicitVRLittleEndian, "rle": pydicom.uid.RLELossless,
           "j2k": pydicom.uid.JPEG2000Lossless}[syntax]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        label = CLASSES[i % len(CLASSES)]
        side = int(rng.integers(min_size, size + 1)) if min_size else size
        image = cv2.resize(draw(label, rng), (side, side), interpolation=cv2.INTER_LINEAR)
        pixels = np.rint(image * 4095).astype(np.uint16)
        paths.append(write_dicom(folder / f"{i:05d}.dcm", pixels, bits_stored=12, transfer_syntax=uid))
    return paths


def untrained_model(path: Path, backbone: str, image_size: int) -> Path:
    from models import build_model
    from utils import constants
    from utils.artifacts.model_file import save_model
    from utils.preprocessing import PreprocessSpec

    spec = PreprocessSpec(class_names=CLASSES, image_size=image_size, channels=constants.CHANNELS)
    model = build_model(backbone, len(CLASSES), spec.input_shape, None)
    return save_model(model, path, spec, model_id=f"untrained-{backbone}-{image_size}", backbone=backbone)


class Peers:
    """Processes started by the bench; all killed on exit."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.procs = tmp, []

    def start(self, args: list[str], name: str, **kwargs) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen([str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, **kwargs)
        self.procs.append(proc)
        return proc

    def storescp(self, folder: Path, ae_title: str) -> int:
        from utils.routing.delivery.dcmtk import environment, storescp_command

        folder.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        self.start(storescp_command(folder, port, ae_title=ae_title), ae_title, env=environment())
        _wait(lambda: _listening(port), 30, f"storescp {ae_title}")
        return port

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> float:
        """Stop ``proc`` with ``sig`` and reap it: the CPU seconds (user + system) it and the children it
        reaped used."""
        proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return usage.ru_utime + usage.ru_stime
            if time.monotonic() > deadline:
                proc.kill()
                deadline += timeout
            time.sleep(0.05)


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``, its living descendants and the children they
    reaped (from /proc; 0.0 where /proc is missing)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(entry.name)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:  # utime, stime, cutime, cstime: fields 14-17 of stat, 11-14 after the name
            total += sum(int(v) for v in stats[current][11:15]) / tick
        todo += children.get(current, [])
    return total


def storescu(files: list[Path], port: int, profile: Path, called: str, senders: int = 1) -> float:
    """Send ``files`` with ``senders`` storescu processes at once (files dealt round-robin); the start time."""
    from utils.routing.delivery.dcmtk import environment, storescu_command

    start = time.time()
    procs = [subprocess.Popen(storescu_command(files[i::senders], "127.0.0.1", port, profile, called=called),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment())
             for i in range(min(senders, len(files)))]
    errors = [p.communicate()[1] for p in procs]
    for proc, err in zip(procs, errors):
        if proc.returncode != 0 or "Store Failed" in err:
            raise RuntimeError(f"storescu failed: {err[-2000:]}")
    return start


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def baseline(files: list[Path], tmp: Path, profile: Path, senders: int = 1) -> tuple[float, float]:
    """(images/s, CPU ms per image of storescu + storescp) storescu -> storescp directly (same files, same disk,
    same number of senders)."""
    peers = Peers(tmp)
    try:
        folder = tmp / f"direct-{time.monotonic_ns()}"
        port = peers.storescp(folder, "DIRECT")
        scp_before, scu_before = tree_cpu(peers.procs[0].pid), _children_cpu()
        start = storescu(files, port, profile, "DIRECT", senders)
        rate = len(files) / (time.time() - start)
        cpu = tree_cpu(peers.procs[0].pid) - scp_before + _children_cpu() - scu_before
        return rate, 1000 * cpu / len(files)
    finally:
        peers.close()


def _times(audit: Path) -> dict[str, dict[str, float]]:
    from utils.routing.operations.audit import read_audit

    out: dict[str, dict[str, float]] = {}
    for r in read_audit(audit) if audit.exists() else []:
        if "sop_instance_uid" in r and r["event"] in ("received", "forwarded", "quarantined"):
            if r["event"] != "received" and r.get("status") != "0x0000":
                continue
            when = _dt.datetime.fromisoformat(r["time"]).timestamp()
            out.setdefault(r["sop_instance_uid"], {}).setdefault("done" if r["event"] != "received" else "received",
                                                                 when)
    return out


def through_router(files: list[Path], singles: list[Path], model: Path, batch: int, wait_ms: int, tmp: Path,
                   profile: Path, senders: int = 1, py_spy: float = 0.0) -> dict:
    import pydicom
    import yaml

    run = tmp / f"router-b{batch}-s{senders}-{time.monotonic_ns()}"
    run.mkdir()
    peers = Peers(run)
    try:
        a, b = peers.storescp(run / "A", "DEST_A"), peers.storescp(run / "B", "DEST_B")
        node = lambda ae, port: {"ae_title": ae, "host": "127.0.0.1", "port": port}
        routes = {c: node("DEST_A", a) if i < 3 else node("DEST_B", b) for i, c in enumerate(CLASSES)}
        port = _free_port()
        config = {"ae_title": "ROUTER", "host": "127.0.0.1", "port": port, "model": str(model), "threshold": 0.5,
                  "spool_dir": str(run / "spool"), "batch_size": batch, "batch_wait_ms": wait_ms,
                  "destinations": {**routes, "uncertain": node("DEST_B", b), "unreadable": node("DEST_B", b)}}
        (run / "router.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        router = peers.start([sys.executable, ROOT / "router.py", "--config", run / "router.yaml",
                              "--log-level", "WARNING"], "router", cwd=ROOT, env=env)
        _wait(lambda: _listening(port) or router.poll() is not None, 300, "the router")
        if router.poll() is not None:
            raise RuntimeError((run / "router.log").read_text()[-3000:])
        audit = run / "spool" / "audit.jsonl"  # the model loads after the router listens: measure once it is ready
        _wait(lambda: audit.exists() and '"model_loaded"' in audit.read_text() or router.poll() is not None, 600,
              "the model to load")
        if router.poll() is not None:
            raise RuntimeError((run / "router.log").read_text()[-3000:])
        uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}

        spy = None
        if py_spy:  # samples every thread of the router (and its decoding processes) while the files go through
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(router.pid), "--duration", str(int(py_spy)),
                                    "--subprocesses", "--threads", "--format", "raw", "--output",
                                    str(Path(tempfile.gettempdir()) / f"py-spy-b{batch}-s{senders}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            time.sleep(1.0)
        scps = [p.pid for p in peers.procs[:2]]
        cpu_before = (tree_cpu(router.pid), sum(tree_cpu(p) for p in scps), _children_cpu())
        start = storescu(files, port, profile, "ROUTER", senders)
        sent = time.time()
        times = _wait(lambda: (t := _times(audit)) and all("done" in t.get(u, {}) for u in uids) and t, 1800,
                      "every image to be confirmed", interval=0.2)
        cpu_after = (tree_cpu(router.pid), sum(tree_cpu(p) for p in scps), _children_cpu())
        cpu_ms = [1000 * (b - a) / len(uids) for a, b in zip(cpu_before, cpu_after)]
        done_last = max(times[u]["done"] for u in uids)
        if spy is not None:
            spy.wait()
        latencies = [1000 * (times[u]["done"] - times[u]["received"]) for u in uids]

        idle = []
        for path in singles:  # one at a time, the router idle in between
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            t0 = storescu([path], port, profile, "ROUTER")
            when = _wait(lambda uid=uid: _times(audit).get(uid, {}).get("done"), 120, "a single image",
                         interval=0.005)
            idle.append(1000 * (when - t0))
        peers.stop(router)
        return {"batch": batch, "wait_ms": wait_ms, "senders": senders, "images_per_s": len(uids) / (done_last - start),
                "router_cpu_ms": cpu_ms[0], "storescp_cpu_ms": cpu_ms[1], "storescu_cpu_ms": cpu_ms[2],
                "ack_per_s": len(uids) / (sent - start),
                "p50_ms": statistics.median(latencies), "p95_ms": float(np.percentile(latencies, 95)),
                "idle_ms": statistics.median(idle)}
    finally:
        peers.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=120, help="files sent in the throughput run")
    parser.add_argument("--size", type=int, default=1536, help="image side in pixels (12-bit, square)")
    parser.add_argument("--syntax", default="explicit", choices=("explicit", "rle", "j2k"))
    parser.add_argument("--model", default=None, help="run dir or .keras (default: untrained backbone)")
    parser.add_argument("--backbone", default="mobilenet_v1")
    parser.add_argument("--image-size", type=int, default=512, help="model input size for the untrained model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--batch-wait-ms", type=int, default=200)
    parser.add_argument("--singles", type=int, default=5, help="single images sent to the idle router")
    parser.add_argument("--min-size", type=int, default=None, help="draw each image's side in [min-size, size]")
    parser.add_argument("--senders", type=int, nargs="+", default=[1], help="concurrent storescu associations")
    parser.add_argument("--repeats", type=int, default=1, help="runs of everything; medians are reported")
    parser.add_argument("--py-spy", type=float, default=0.0, metavar="S",
                        help="sample the router with py-spy for S seconds in the first run of each row "
                             "(raw stacks in the temp folder, py-spy-b<batch>-s<senders>.txt)")
    args = parser.parse_args(argv)

    from utils.config import environment
    from utils.routing.delivery.dcmtk import find_tool, storescu_profile

    if not (find_tool("storescu") and find_tool("storescp")):
        raise SystemExit("dcmtk's storescu/storescp are needed: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="bench-router-") as name:
        tmp = Path(name)
        files = make_files(tmp / "in", args.count, args.size, args.syntax, seed=0, min_size=args.min_size)
        singles = make_files(tmp / "single", args.singles, args.size, args.syntax, seed=1)
        profile = storescu_profile(files[:1], tmp / "storescu.cfg")
        model = Path(args.model) if args.model else untrained_model(tmp / "model.keras", args.backbone,
                                                                     args.image_size)
        megabytes = sum(f.stat().st_size for f in files) / 1e6 / len(files)
        runs: dict[tuple[int, int], list[dict]] = {}
        for repeat in range(args.repeats):
            for senders in args.senders:  # the baseline right before the router, same senders, same load
                direct, direct_cpu = baseline(files, tmp, profile, senders)
                for b in args.batch_sizes:
                    row = through_router(files, singles, model, b, args.batch_wait_ms, tmp, profile, senders,
                                         args.py_spy if repeat == 0 else 0.0)
                    row["direct"], row["direct_cpu_ms"] = direct, direct_cpu
                    row["ratio"] = row["images_per_s"] / direct
                    runs.setdefault((senders, b), []).append(row)
                    print(f"run {repeat + 1}: {senders} senders, batch {b}: {row['images_per_s']:.1f} images/s "
                          f"(direct {direct:.1f})", file=sys.stderr, flush=True)
    env = environment()
    sides = f"{args.min_size}-{args.size}" if args.min_size else f"{args.size}x{args.size}"
    print(f"\nMachine: {env['processor']}, {env['cpu_count']} cores; {env['time'][:10]}. {args.count} files of "
          f"{sides} px 12-bit ({megabytes:.1f} MB on average, {args.syntax}); model: "
          f"{args.model or 'untrained ' + args.backbone} at {args.image_size} px; medians of {args.repeats}.\n")
    print("| senders | batch size | images/s end to end | storescu -> storescp directly | ratio | acknowledged/s "
          "| latency p50 (ms) | latency p95 (ms) | single image, idle (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    medians = {}
    for (senders, b), rows in runs.items():
        m = medians[senders, b] = {k: statistics.median(r[k] for r in rows) for k in rows[0]
                                   if isinstance(rows[0][k], float)}
        print(f"| {senders} | {b} | {m['images_per_s']:.1f} | {m['direct']:.1f} | {m['ratio']:.2f} "
              f"| {m['ack_per_s']:.1f} | {m['p50_ms']:.0f} | {m['p95_ms']:.0f} | {m['idle_ms']:.0f} |")
    cores = os.cpu_count() or 1
    print(f"\nCPU time per image (ms, user + system, medians): what each image costs whatever else the machine is "
          f"doing; 'bound' = {cores} cores x 1000 / the total, the images/s these processes could reach with the "
          "cores to themselves.\n")
    print("| senders | batch size | router (incl. its decoding processes) | storescu | storescp | total "
          "| bound (images/s) | directly: storescu + storescp | bound directly |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (senders, b), m in medians.items():
        total = m["router_cpu_ms"] + m["storescu_cpu_ms"] + m["storescp_cpu_ms"]
        print(f"| {senders} | {b} | {m['router_cpu_ms']:.1f} | {m['storescu_cpu_ms']:.1f} | {m['storescp_cpu_ms']:.1f} "
              f"| {total:.1f} | {cores * 1000 / total:.0f} | {m['direct_cpu_ms']:.1f} "
              f"| {cores * 1000 / m['direct_cpu_ms']:.0f} |")


if __name__ == "__main__":
    main()
