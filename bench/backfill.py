"""Files/s of predict.py against backfill.py (Ray Data) with 1 and 2 decoding workers, on this machine.

    python -m bench.backfill                                  # 40 files per class (~200 + broken ones)
    python -m bench.backfill --per-class 200 --runs 3 --format onnx --size 224
    python -m bench.backfill --archive uncompressed j2k --files 256 --model best_int8.tflite

The archive (--archive) is the synthetic demo set (utils/data/demo.py: DICOMs of every class plus
its broken files), or --files 2000x2500 12-bit X-rays uncompressed or JPEG 2000 lossless
(bench.inference.write_xrays: 8 distinct images, then copies); the model --model, or else an
untrained mobilenet_v1 at --size (speed does not depend on the weights), saved as .keras and
exported by export.py's code to --format (onnx: ONNX Runtime on the CPU, the backfill's CPU case). Each timed run classifies every file from scratch into a fresh output:
predict.py is ``utils.infer.batch_predict.run`` (its default decoding pool, one process per core);
backfill.py is ``utils.backfill.pipeline.run`` with --workers 1 and 2 (1 inference actor),
actor start-up (model load in the actor, decoding process start) included, Ray started once
beforehand (its start-up is timed separately). Medians of --runs runs, the three taking turns in
each run so that the machine's drift hits them alike. Also measured: a re-run over a finished
output (listing and resume bookkeeping only) and a run over 2 files (what every run pays before
its first file: actors, model load, decoding process). Prints a Markdown table and the machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def build_model(folder: Path, size: int, fmt: str) -> Path:
    from models import build_model as build
    from utils.artifacts.export import export_model
    from utils.artifacts.model_file import save_model
    from utils.data.demo import DEMO_CLASSES
    from utils.preprocessing import PreprocessSpec

    spec = PreprocessSpec(class_names=DEMO_CLASSES, image_size=size, channels=3)
    path = save_model(build("mobilenet_v1", len(DEMO_CLASSES), spec.input_shape, weights=None), folder / "bench.keras",
                      spec, model_id="bench-backfill", backbone="mobilenet_v1")
    if fmt == "keras":
        return path
    return Path(export_model(path, fmt, output=folder / f"bench.{fmt}", check_images=4).path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=40, help="synthetic DICOMs per class")
    parser.add_argument("--size", type=int, default=224, help="model input size")
    parser.add_argument("--format", choices=("onnx", "keras"), default="onnx")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--archive", nargs="+", choices=("demo", "uncompressed", "j2k"), default=["demo"])
    parser.add_argument("--files", type=int, default=256, help="files per X-ray archive (uncompressed, j2k)")
    parser.add_argument("--model", help="an artifact to use instead of building one (--size, --format ignored)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import ray

    from utils.config import cpu_name
    from utils.infer.predictor import load_predictor
    from utils.io.isolation import default_workers

    cores = default_workers("processes")
    load_before = os.getloadavg()[0]
    tables = []
    with tempfile.TemporaryDirectory(prefix="bench-backfill-") as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else build_model(tmp, args.size, args.format)
        predictor = load_predictor(model)
        start = time.perf_counter()
        ray.init(num_cpus=max(cores, 3), include_dashboard=False, log_to_driver=False)  # room for 2 + 1 actors
        ray_start = time.perf_counter() - start
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        try:
            for archive in args.archive:
                files = archive_files(tmp / archive, archive, args)
                tables.append((archive, files, *measure(files, model, predictor, tmp, args)))
        finally:
            ray.shutdown()
    print(f"\nmachine: {cpu_name()}, {cores} cores; load average before: {load_before:.1f}, after: "
          f"{os.getloadavg()[0]:.1f}; model {model.name}, batch {args.batch_size}, median of {args.runs} runs; "
          f"Ray start-up (ray.init, once): {ray_start:.1f} s")
    for archive, files, rates, resume_s, fixed_s in tables:
        base = statistics.median(rates["predict.py"])
        print(f"\n{ARCHIVES[archive]}: {len(files)} files\n")
        print("| pipeline | files/s | vs predict.py |")
        print("|---|---:|---:|")
        for name, values in rates.items():
            rate = statistics.median(values)
            print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")
        print(f"\nbackfill.py over 2 files (a run's fixed cost: actors, model load, decoding process): "
              f"{fixed_s:.1f} s; re-run over a finished output (list, read done paths, nothing to do): "
              f"{resume_s:.2f} s")


ARCHIVES = {"demo": "synthetic demo set (small DICOMs of every class, broken files)",
            "uncompressed": "2000x2500 12-bit uncompressed", "j2k": "2000x2500 12-bit JPEG 2000 lossless"}


def archive_files(folder: Path, archive: str, args) -> list[str]:
    import pydicom.uid

    from bench.inference import write_xrays
    from utils.backfill.sources import list_sources
    from utils.data.demo import generate_demo_dicoms

    if archive == "demo":
        generate_demo_dicoms(folder, images_per_class=args.per_class, progress=False)
        return list_sources([folder])[0]
    syntax = pydicom.uid.ExplicitVRLittleEndian if archive == "uncompressed" else pydicom.uid.JPEG2000Lossless
    return write_xrays(folder, syntax, args.files)


def measure(files: list[str], model: Path, predictor, tmp: Path, args):
    """(files/s per pipeline per run, re-run seconds, 2-file run seconds), the pipelines taking turns."""
    from utils.backfill import pipeline
    from utils.constants import THRESHOLD
    from utils.infer.batch_predict import run as predict_run

    rates: dict[str, list[float]] = {}
    resume_s, fixed_s = [], []
    for _ in range(args.runs):
        summary = predict_run(predictor, files, output=tmp / "predict.csv", threshold=THRESHOLD,
                              batch_size=args.batch_size, progress=False)
        rates.setdefault("predict.py", []).append(len(files) / summary.seconds)
        for workers in (1, 2):
            out = tmp / f"out{workers}"
            shutil.rmtree(out, ignore_errors=True)
            settings = pipeline.Settings(workers=workers, batch_size=args.batch_size)
            start = time.perf_counter()
            result = pipeline.run(files, model=model, output=out, threshold=THRESHOLD, settings=settings,
                                  progress=False)
            assert result.written == len(files), result
            rates.setdefault(f"backfill.py, {workers} worker{'s' * (workers > 1)}", []).append(
                len(files) / (time.perf_counter() - start))
        start = time.perf_counter()
        assert pipeline.run(files, model=model, output=tmp / "out1", threshold=THRESHOLD,
                            progress=False).written == 0
        resume_s.append(time.perf_counter() - start)
        shutil.rmtree(tmp / "out-fixed", ignore_errors=True)
        start = time.perf_counter()
        pipeline.run(files[:2], model=model, output=tmp / "out-fixed", threshold=THRESHOLD,
                     settings=pipeline.Settings(workers=1, batch_size=args.batch_size), progress=False)
        fixed_s.append(time.perf_counter() - start)
    return rates, statistics.median(resume_s), statistics.median(fixed_s)


if __name__ == "__main__":
    main()
