"""Accelerator throughput: mixed-precision training and batch-1 inference latency.

    python -m bench.gpu                                   # mobilenet_v1, 512 px, batch 32
    python -m bench.gpu --models mobilenet_v1 resnet18 --json gpu.json
    KERAS_BACKEND=jax python -m bench.gpu                 # same models, JAX backend

Backend-agnostic Keras 3: it builds the project's own models (``models.build_model``, BN
momentum 0.9, float32 logits) and times them under each ``--policies`` entry (float32,
mixed_float16 as ``training.py`` uses on GPUs, mixed_bfloat16). Per (model, policy):

- training: ``train_on_batch`` on a fixed random batch (forward, backward, Adam with
  clipvalue 0.1 as the recipe; loss scaling comes with mixed_float16), images/s from the
  median step after warm-up steps (the first compiles);
- inference: ``predict_on_batch`` at batch 1 (ms/image, median and p95: the paper reports
  0.0295 s/image for MobileNet-V1) and at the training batch size (images/s).

Inputs are host NumPy arrays each step, so host-to-device copies are part of the time, as
they are when the model serves files. Results print as a Markdown table; ``--json`` keeps the
raw numbers with the device and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


def device_description() -> tuple[str, str]:
    """(accelerator name, framework versions) for whichever Keras backend is active."""
    import keras

    backend = keras.backend.backend()
    name = "CPU"
    versions = f"Keras {keras.__version__} ({backend} backend)"
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        name = getattr(device, "device_kind", str(device))
        versions += f", JAX {jax.__version__}"
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")
        versions += f", TensorFlow {tf.__version__}"
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
        versions += f", PyTorch {torch.__version__}"
    return name, versions


def timed(call, warmup: int, steps: int) -> list[float]:
    """Seconds per call after ``warmup`` untimed calls; each call returns host values (synced)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(name: str, policy: str, args) -> dict:
    import keras
    import numpy as np

    from models import build_model

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(42)
    shape = (args.size, args.size, args.channels)
    model = build_model(name, args.num_classes, shape, weights=None, bn_momentum=0.9)
    model.compile(optimizer=keras.optimizers.Adam(1e-3, clipvalue=0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (args.batch_size, *shape)).astype("float32")
    y = rng.integers(0, args.num_classes, args.batch_size)
    one = x[:1]

    start = time.perf_counter()
    model.train_on_batch(x, y)
    first_step = time.perf_counter() - start
    train = timed(lambda: model.train_on_batch(x, y), args.warmup, args.steps)
    loss = float(np.asarray(model.train_on_batch(x, y)).ravel()[0])
    latency = timed(lambda: model.predict_on_batch(one), args.warmup, args.latency_calls)
    batched = timed(lambda: model.predict_on_batch(x), args.warmup, args.steps)
    train_s = statistics.median(train)
    return {
        "model": name, "policy": policy, "size": args.size, "channels": args.channels,
        "batch": args.batch_size, "params": model.count_params(),
        "first_step_s": first_step, "loss_finite": bool(np.isfinite(loss)),
        "train_s_per_batch": train_s, "train_images_per_s": args.batch_size / train_s,
        "latency_ms_median": 1000 * statistics.median(latency),
        "latency_ms_p95": 1000 * _percentile(latency, 95),
        "infer_images_per_s": args.batch_size / statistics.median(batched),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | policy | train img/s (batch {b}) | x float32 | batch-1 ms/image median | p95 "
             "| infer img/s (batch {b}) | first step s | loss finite |".format(b=rows[0]["batch"]),
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r["model"]: r for r in rows if r.get("policy") == "float32" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['policy']} | error: {r['error']} |" + " |" * 6)
            continue
        ref = base.get(r["model"])
        ratio = f"{r['train_images_per_s'] / ref['train_images_per_s']:.2f}" if ref else "-"
        lines.append(
            f"| {r['model']} | {r['policy']} | {r['train_images_per_s']:.0f} | {ratio} "
            f"| {r['latency_ms_median']:.2f} | {r['latency_ms_p95']:.2f} "
            f"| {r['infer_images_per_s']:.0f} | {r['first_step_s']:.1f} | {r['loss_finite']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v1"], help="backbones (default: %(default)s)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES,
                        help="Keras dtype policies (default: all)")
    parser.add_argument("--size", type=int, default=512, help="square input size (default: %(default)s)")
    parser.add_argument("--channels", type=int, default=1, choices=(1, 3),
                        help="input channels (default: %(default)s, the project's default)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch (default: %(default)s)")
    parser.add_argument("--num-classes", type=int, default=5, help="logits (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed batches (default: %(default)s)")
    parser.add_argument("--latency-calls", type=int, default=100,
                        help="timed batch-1 calls (default: %(default)s)")
    parser.add_argument("--json", help="write the rows, device and versions to this file")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device, versions = device_description()
    print(f"device: {device}; {versions}; Python {platform.python_version()}", flush=True)
    rows = []
    for name in args.models:
        for policy in args.policies:
            start = time.perf_counter()
            try:
                rows.append(measure(name, policy, args))
            except Exception as exc:  # one failing policy must not lose the others' numbers
                rows.append({"model": name, "policy": policy, "batch": args.batch_size,
                             "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            print(f"{name} {policy}: {time.perf_counter() - start:.0f} s {json.dumps(rows[-1])}",
                  file=sys.stderr, flush=True)
    table = markdown_table(rows)
    print(f"\n{device}; {versions}; {datetime.date.today().isoformat()}\n\n{table}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"device": device, "versions": versions, "date": datetime.date.today().isoformat(),
             "settings": {k: v for k, v in vars(args).items() if k != "json"},
             "cpu_count": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
