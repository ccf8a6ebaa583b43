"""Training and inference throughput, and peak memory, of every backbone.

Run from the repository root: ``python -m bench.train_throughput`` (``--help`` lists the
options). Each (backbone, image size) runs in a fresh child process, so its peak resident
memory (``ru_maxrss``) is its own: the child first times inference, reads its peak, then times
training and reads the peak again (ru_maxrss only grows). Times are medians over ``--steps``
batches after ``--warmup`` batches (the first one traces the tf.function). Random images,
from-scratch weights, Adam and sparse cross-entropy on logits, as training does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SECTION = "## Training throughput per backbone"
RESULT_PREFIX = "RESULT "
ALL_MODELS = ["mobilenet_v1", "mobilenet_v2", "resnet18", "resnet34",
              "efficientnet_b0", "efficientnet_b1", "efficientnet_b2"]  # models.list_models()


LEGEND = (
    "Training: `train_on_batch` (forward, backward, Adam update); inference: "
    "`predict_on_batch`; ms/img = median step time / batch size; x mnv1 = step time relative "
    "to mobilenet_v1 at the same size (lower is faster). Peak RSS = `ru_maxrss` of the child "
    "process that measured that row (includes Python + TensorFlow, about 0.7 GiB after "
    "import), read after the inference timing and again after the training timing."
)


def _rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_seconds(step, warmup: int, steps: int) -> float:
    from bench.gpu import timed

    return statistics.median(timed(step, warmup, steps))


def measure(name: str, size: int, batch: int, channels: int, warmup: int, steps: int,
            num_classes: int) -> dict:
    """Build one model and time it (runs inside the child process)."""
    import keras
    import numpy as np

    from models import build_model

    baseline = _rss_mib()
    model = build_model(name, num_classes, (size, size, channels))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch, size, size, channels)).astype("float32")
    y = rng.integers(0, num_classes, batch)

    infer = _median_seconds(lambda: model.predict_on_batch(x), warmup, steps)
    infer_peak = _rss_mib()
    train = _median_seconds(lambda: model.train_on_batch(x, y), warmup, steps)
    return {
        "model": name, "size": size, "batch": batch, "channels": channels,
        "params": model.count_params(),
        "train_s_per_batch": train, "infer_s_per_batch": infer,
        "rss_import_mib": baseline, "rss_infer_mib": infer_peak, "rss_train_mib": _rss_mib(),
    }


def run_child(name: str, size: int, args) -> dict:
    """Measure one configuration in a fresh interpreter; a failure becomes an 'error' row."""
    command = [sys.executable, "-m", "bench.train_throughput", "--child", "--models", name,
               "--sizes", str(size), "--batch-size", str(args.batch_size),
               "--channels", str(args.channels), "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--num-classes", str(args.num_classes)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                              env=env, cwd=Path(__file__).resolve().parent.parent, check=False)
    except subprocess.TimeoutExpired:
        return {"model": name, "size": size, "error": f"timeout after {args.timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"model": name, "size": size, "error": f"exit {done.returncode}: {tail[0][:200]}"}


def machine_description() -> str:
    import tensorflow as tf

    cpu = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu} (lscpu model name), {cores} cores available to the process; "
            f"Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"{datetime.date.today().isoformat()}")


def markdown_table(rows: list[dict]) -> str:
    """One row per (backbone, size); ratios are against mobilenet_v1 at the same size."""
    reference = {r["size"]: r for r in rows if r["model"] == "mobilenet_v1" and "error" not in r}
    lines = [
        ("| backbone | size | params | train img/s | train ms/img | train x mnv1 "
         "| infer img/s | infer ms/img | infer x mnv1 | peak RSS infer MiB | peak RSS train MiB |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size']} | {r['error']} |" + " |" * 8)
            continue
        train_ms = 1000 * r["train_s_per_batch"] / r["batch"]
        infer_ms = 1000 * r["infer_s_per_batch"] / r["batch"]
        ref = reference.get(r["size"])
        train_x = f"{r['train_s_per_batch'] / ref['train_s_per_batch']:.2f}" if ref else "-"
        infer_x = f"{r['infer_s_per_batch'] / ref['infer_s_per_batch']:.2f}" if ref else "-"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['params'] / 1e6:.2f}M | {1000 / train_ms:.2f} "
            f"| {train_ms:.0f} | {train_x} | {1000 / infer_ms:.2f} | {infer_ms:.0f} | {infer_x} "
            f"| {r['rss_infer_mib']:.0f} | {r['rss_train_mib']:.0f} |")
    return "\n".join(lines)


def replace_section(path: Path, body: str) -> None:
    """Write ``SECTION`` + body into ``path``, replacing only that section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{SECTION}\n\n{body.strip()}\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        following = text.find("\n## ", start + len(SECTION))
        rest = text[following + 1:] if following >= 0 else ""
        text = text[:start] + section + ("\n" + rest if rest else "")
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=ALL_MODELS, help="backbones to measure")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256],
                        help="square image sizes")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help="input channels")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first traces)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the median is kept")
    parser.add_argument("--num-classes", type=int, default=5, help="size of the logits")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    parser.add_argument("--json", help="also write the raw rows to this JSON file")
    parser.add_argument("--results", help="replace the section '" + SECTION.lstrip("# ")
                        + "' of this Markdown file (e.g. bench/RESULTS.md)")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="measure nothing: render rows saved by earlier --json runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one configuration, measured in this fresh process
        row = measure(args.models[0], args.sizes[0], args.batch_size, args.channels,
                      args.warmup, args.steps, args.num_classes)
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        return

    if args.from_json:
        saved = [json.loads(Path(f).read_text()) for f in args.from_json]
        rows = [row for run in saved for row in run["rows"]]
        description = "; ".join(dict.fromkeys(run["machine"] for run in saved))
        settings = "; ".join(dict.fromkeys(run["settings"] for run in saved))
    else:
        load_before = os.getloadavg()[0]
        rows = measure_all(args)
        description = (f"{machine_description()}; 1-min load average {load_before:.1f} before, "
                       f"{os.getloadavg()[0]:.1f} after")
        settings = (f"batch {args.batch_size}, {args.channels} channel(s), median of "
                    f"{args.steps} steps after {args.warmup} warm-up steps")
    table = markdown_table(rows)
    print(f"\n{description}\n{settings}\n\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": description, "settings": settings, "rows": rows}, indent=1))
    if args.results:
        replace_section(Path(args.results), f"`python -m bench.train_throughput` "
                        f"({settings}).\nMachine: {description}.\n\n{table}\n\n{LEGEND}")


def measure_all(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        for name in args.models:
            start = time.perf_counter()
            rows.append(run_child(name, size, args))
            print(f"{name} @ {size}: {time.perf_counter() - start:.0f} s "
                  f"{rows[-1].get('error', '')}", file=sys.stderr, flush=True)
    return rows

if __name__ == "__main__":
    main()
