"""Model inference speed per artifact format against the machine's rooflines, and DICOM -> label.

    python -m bench.inference                              # mobilenet_v1 at 512 px
    python -m bench.inference --backbones mobilenet_v1 efficientnet_b0 --size 512 --runs 5
    python -m bench.inference --e2e-files 0                # model timings only

Part 1. For each backbone (untrained weights: speed does not depend on them), builds the model
with this project's spec, exports it with export.py's code (TFLite fp32, TFLite int8 calibrated
on --data, ONNX), and times every artifact through the same predictor interface the entry
points use: ms/image at batch 1 and batch 8, median of --runs runs after warm-up. Two rooflines
are measured in the same run: a large fp32 matmul (TensorFlow) and a large int8 1x1 convolution
(TFLite/XNNPACK, the kernel that does ~95 % of MobileNet's arithmetic); "x floor" is an
artifact's time over the model's operations / that peak.

Part 2 (--e2e-files N > 0). End-to-end DICOM -> label with the fastest artifact (int8 if it
was made): N synthetic 2000x2500 12-bit X-rays per transfer syntax (uncompressed, JPEG 2000
lossless) go through ``utils.infer.batch_predict.run``, the code behind predict.py (decoding in the
engine's pool overlapped with the model, CSV written), once per decoding pool (processes and
threads, --e2e-workers each); files/s, median of --runs runs, next to decoding alone (the same
pool, no model) to show which one limits, and their ratio ("x decoding alone": DICOM -> label
files/s over decoding-only files/s of the same pool in the same run; 1.0 would mean the model and
the CSV cost nothing on top of decoding). predict.py starts its decoding workers for each run, which
the rate includes (about half a second of CPU per worker process: numpy, pydicom, OpenCV imports);
decoding alone and the last column do not: there the engine's workers are already running, as in the
router and the back-fill, whose workers live as long as they do (``Engine.classify_batches``, no CSV).
On a machine that decoding already keeps busy, the ratio is bounded by decode CPU / (decode CPU +
model CPU) per file, whatever the overlap.
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


def int8_conv_gops(size: int = 64, channels: int = 512, runs: int = 9) -> float:
    """Measured int8 peak: a (size x size x channels) -> channels 1x1 convolution, quantized like
    export.py's int8 (per-channel weights, int8 activations), run by the TFLite interpreter with
    its XNNPACK delegate on all cores, in GOP/s (2 operations per multiply-accumulate)."""
    import keras
    import tensorflow as tf

    from utils.artifacts.export import quantize_int8, write_saved_model
    from utils.infer.predictor import tflite_interpreter

    shape = (size, size, channels)
    model = keras.Sequential([keras.Input(shape), keras.layers.Conv2D(channels, 1)])
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_saved_model(model, Path(tmp) / "saved_model")
        converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "saved_model"))
        quantize_int8(converter, lambda: ([rng.normal(size=(1, *shape)).astype(np.float32)] for _ in range(4)))
        path = Path(tmp) / "conv.tflite"
        path.write_bytes(converter.convert())
        interpreter = tflite_interpreter(path)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    interpreter.set_tensor(detail["index"], rng.normal(size=detail["shape"]).astype(np.float32))
    for _ in range(3):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return 2 * size * size * channels * channels / statistics.median(times) / 1e9


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


def write_xrays(folder: Path, syntax, count: int, unique: int = 8) -> list[str]:
    """``count`` 2000x2500 12-bit MONOCHROME2 DICOMs: ``unique`` distinct images, then copies
    (decoding cost does not depend on which image it is; JPEG 2000 encoding is slow)."""
    import shutil

    from bench.pipeline import _xray
    from utils.io.dicom_writer import write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.dcm"
        if i < unique:
            write_dicom(path, _xray((2500, 2000), 12, i), bits_stored=12, transfer_syntax=syntax,
                        photometric="MONOCHROME2")
        else:
            shutil.copyfile(paths[i % unique], path)
        paths.append(str(path))
    return paths


def end_to_end(artifact: Path, tmp: Path, count: int, runs: int,
               workers: list[int]) -> list[tuple[str, str, float, float, float, float]]:
    """(case, pool, MB per file, decode-only files/s, DICOM -> label files/s, their ratio) per transfer
    syntax and decoding pool, medians of ``runs`` (the ratio: the median of each run's own ratio, as
    both halves of a run see the same load); the pools take turns within each run, so the machine's
    drift hits them alike. Decoding only: an engine whose workers are already started (steady
    state). DICOM -> label: ``utils.infer.batch_predict.run`` as predict.py calls it, worker start-up
    included."""
    import pydicom.uid

    from utils.constants import THRESHOLD
    from utils.infer.batch_predict import run, scorer
    from utils.infer.engine import Engine
    from utils.infer.predictor import load_predictor
    from utils.io.isolation import PoolSettings

    predictor = load_predictor(artifact)
    pools = [PoolSettings(mode, workers=w) for mode in ("processes", "threads") for w in workers]
    rows = []
    for name, syntax in (("uncompressed", pydicom.uid.ExplicitVRLittleEndian),
                         ("JPEG 2000 lossless", pydicom.uid.JPEG2000Lossless)):
        files = write_xrays(tmp / name.replace(" ", "_"), syntax, count)
        run(predictor, files[:8], output=tmp / "warmup.csv", threshold=THRESHOLD, progress=False)
        decode: dict[PoolSettings, list[float]] = {p: [] for p in pools}
        full: dict[PoolSettings, list[float]] = {p: [] for p in pools}
        steady: dict[PoolSettings, list[float]] = {p: [] for p in pools}
        for _ in range(runs):
            for pool in pools:
                with Engine(predictor.spec, pool=pool) as engine:
                    engine.decode(files[: pool.worker_count])  # start the workers
                    start = time.perf_counter()
                    for _batch in engine.decode_batches(files, 32):
                        pass
                    decode[pool].append(count / (time.perf_counter() - start))
                with Engine(predictor.spec, scorer(predictor), threshold=THRESHOLD, pool=pool) as engine:
                    engine.decode(files[: pool.worker_count])  # the router's and back-fill's workers live on
                    start = time.perf_counter()
                    for _batch in engine.classify_batches(files, 32):
                        pass
                    steady[pool].append(count / (time.perf_counter() - start))
                summary = run(predictor, files, output=tmp / "e2e.csv", threshold=THRESHOLD, pool=pool,
                              progress=False)
                full[pool].append(count / summary.seconds)
        megabytes = Path(files[0]).stat().st_size / 1e6
        for pool in pools:
            rows.append((name, f"{pool.mode} ({pool.worker_count})", megabytes, statistics.median(decode[pool]),
                         statistics.median(full[pool]),
                         statistics.median(f / d for f, d in zip(full[pool], decode[pool])),
                         statistics.median(steady[pool]),
                         statistics.median(f / d for f, d in zip(steady[pool], decode[pool]))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v1"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--data", default="data/radiographs",
                        help="prepared dataset at --size for int8 calibration (int8 is skipped if absent)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="calls per timed run")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--e2e-files", type=int, default=64,
                        help="DICOM files per transfer syntax for the end-to-end part (0: skip it)")
    parser.add_argument("--e2e-workers", type=int, nargs="+", default=[0],
                        help="decoding workers to compare end to end, each in processes and threads (0: default)")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from models import build_model
    from utils.artifacts.export import export_model
    from utils.artifacts.model_file import save_model
    from utils.config import environment
    from utils.data import files
    from utils.infer.predictor import load_predictor
    from utils.preprocessing import PreprocessSpec

    env = environment()
    load_before = os.getloadavg()[0]
    fp32_peak, int8_peak = matmul_gflops(), int8_conv_gops()
    data = args.data if args.data and files.is_prepared(args.data) else None
    rows, e2e = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            spec = PreprocessSpec(image_size=args.size)
            model = build_model(name, spec.num_classes, spec.input_shape, None)
            flops = model_flops(model, spec.input_shape)
            path = save_model(model, Path(tmp) / f"{name}.keras", spec, model_id=f"bench-{name}", backbone=name)
            artifacts = [("Keras fp32", path, fp32_peak)]
            for label, fmt, quant in (("TFLite fp32 (XNNPACK)", "tflite", "none"),
                                      ("TFLite int8 (XNNPACK)", "tflite", "int8"), ("ONNX Runtime fp32", "onnx", "none")):
                if fmt == "onnx" and args.skip_onnx:
                    continue
                if quant == "int8" and data is None:
                    print("skipping int8: no prepared dataset to calibrate on (--data)")
                    continue
                result = export_model(path, fmt, quantize=quant, data=data, check_images=8, calibration_images=100)
                artifacts.append((label, result.path, int8_peak if quant == "int8" else fp32_peak))
            batch1 = {}
            for label, artifact, peak in artifacts:
                predictor = load_predictor(artifact)
                ms1 = time_predictor(predictor, spec.input_shape, 1, args.runs, args.repeats)
                ms8 = time_predictor(predictor, spec.input_shape, 8, args.runs, max(1, args.repeats // 2))
                rows.append((name, label, ms1, ms8, ms1 / (flops / (peak * 1e9) * 1000), flops))
                batch1[label, artifact] = ms1
            if args.e2e_files > 0 and name == args.backbones[0]:
                label, artifact = min(batch1, key=batch1.get)  # the fastest artifact at batch 1
                e2e = [(label, *row) for row in end_to_end(artifact, Path(tmp), args.e2e_files, args.runs,
                                                           args.e2e_workers)]
    print(f"\nMachine: {env['processor']}, {env['cpu_count']} cores; {env['time'][:10]}; 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; fp32 matmul peak {fp32_peak:.0f} GFLOP/s, "
          f"int8 1x1-conv peak {int8_peak:.0f} GOP/s; int8 calibrated on {data or '-'}")
    print(f"\n| backbone @ {args.size} px | artifact | ms/image batch 1 | ms/image batch 8 "
          "| x floor (batch 1) | floor ms |")
    print("|---|---|---|---|---|---|")
    for name, label, ms1, ms8, ratio, flops in rows:
        print(f"| {name} ({flops / 1e9:.2f} GFLOP) | {label} | {ms1:.1f} | {ms8:.1f} | {ratio:.2f} "
              f"| {ms1 / ratio:.1f} |")
    if e2e:
        print("\n" + "\n".join(e2e_table(e2e, args.e2e_files)))


def e2e_table(rows: list[tuple], files: int) -> list[str]:
    """Part 2's Markdown table: one row per (artifact, case, pool, MB/file, decode-only files/s, DICOM -> label
    files/s as predict.py runs (workers started for the run), its ratio[, DICOM -> label with the workers already
    started, as the router and back-fill run, its ratio])."""
    lines = [f"| DICOM -> label, 2000x2500 12-bit, {files} files | decoding pool (workers) | MB/file "
             "| decoding only, files/s | predict.py (workers started in the run), files/s | x decoding alone "
             "| workers already running (router, back-fill), files/s | x decoding alone |",
             "|---|---|---|---|---|---|---|---|"]
    for label, case, pool, megabytes, decode, full, ratio, *warm in rows:
        steady = f" | {warm[0]:.1f} | {warm[1]:.2f} |" if warm else " | | |"
        lines.append(f"| {case} ({label}) | {pool} | {megabytes:.1f} | {decode:.1f} | {full:.1f} | {ratio:.2f}"
                     + steady)
    return lines


if __name__ == "__main__":
    main()
