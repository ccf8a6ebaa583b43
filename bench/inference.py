"""Model inference speed per artifact format, against the machine's fp32 roofline.

    python -m bench.inference                              # mobilenet_v1 at 512 px
    python -m bench.inference --backbones mobilenet_v1 efficientnet_b0 --size 512 --runs 5

For each backbone (untrained weights: speed does not depend on them), builds the model with this
project's spec, exports it with export.py's code (TFLite fp32, TFLite int8 calibrated on
--data, ONNX), and times every artifact through the same predictor interface the entry points
use: ms/image at batch 1 and batch 8, median of --runs runs after warm-up. The roofline row is a
measured large fp32 matmul; "x floor" is the model's time over FLOPs / peak GFLOP/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def matmul_gflops(n: int = 2048, runs: int = 5) -> float:
    import tensorflow as tf

    a = tf.random.uniform((n, n))
    b = tf.random.uniform((n, n))
    matmul = tf.function(lambda x, y: tf.matmul(x, y))
    matmul(a, b).numpy()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        matmul(a, b).numpy()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def model_flops(model, input_shape: tuple[int, int, int]) -> float:
    """Floating-point operations of one forward pass at batch 1 (TensorFlow's graph profiler)."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec((1, *input_shape), tf.float32))
    frozen = convert_variables_to_constants_v2(concrete)
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph=frozen.graph, options=options).total_float_ops)


def time_predictor(predictor, shape: tuple[int, int, int], batch: int, runs: int, repeats: int) -> float:
    """Median over ``runs`` of the mean ms/image of ``repeats`` calls at ``batch``."""
    x = np.random.default_rng(0).uniform(0, 255, (batch, *shape)).astype(np.float32)
    for _ in range(3):
        predictor.predict(x)
    results = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(repeats):
            predictor.predict(x)
        results.append((time.perf_counter() - start) / (repeats * batch) * 1000)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v1"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--data", default="data/radiographs",
                        help="prepared dataset at --size for int8 calibration (synthetic noise if absent)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="calls per timed run")
    parser.add_argument("--skip-onnx", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from models import build_model
    from utils.artifacts import save_model
    from utils.config import environment
    from utils.export import export_model
    from utils.predictor import load_predictor
    from utils.preprocessing import PreprocessSpec

    env = environment()
    peak = matmul_gflops()
    data = args.data if args.data and (Path(args.data) / "labels.csv").is_file() else None
    print(f"Machine: {env['processor']}, {env['cpu_count']} cores; {env['time'][:10]}; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s; int8 calibration on {data or 'nothing (no --data)'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            spec = PreprocessSpec(image_size=args.size)
            model = build_model(name, spec.num_classes, spec.input_shape, None)
            flops = model_flops(model, spec.input_shape)
            path = save_model(model, Path(tmp) / f"{name}.keras", spec, model_id=f"bench-{name}", backbone=name)
            artifacts = [("Keras fp32", path)]
            for label, fmt, quant in (("TFLite fp32 (XNNPACK)", "tflite", "none"),
                                      ("TFLite int8", "tflite", "int8"), ("ONNX Runtime fp32", "onnx", "none")):
                if fmt == "onnx" and args.skip_onnx:
                    continue
                if quant == "int8" and data is None:
                    print("skipping int8: no prepared dataset to calibrate on")
                    continue
                result = export_model(path, fmt, quantize=quant, data=data, check_images=8, calibration_images=100)
                artifacts.append((label, result.path))
            floor_ms = flops / (peak * 1e9) * 1000
            for label, artifact in artifacts:
                predictor = load_predictor(artifact)
                ms1 = time_predictor(predictor, spec.input_shape, 1, args.runs, args.repeats)
                ms8 = time_predictor(predictor, spec.input_shape, 8, args.runs, max(1, args.repeats // 2))
                rows.append((name, label, ms1, ms8, ms1 / floor_ms, flops))
    print(f"\n| backbone @ {args.size} px | artifact | ms/image batch 1 | ms/image batch 8 | x fp32 floor (batch 1) |")
    print("|---|---|---|---|---|")
    for name, label, ms1, ms8, ratio, flops in rows:
        print(f"| {name} ({flops / 1e9:.2f} GFLOP) | {label} | {ms1:.1f} | {ms8:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
