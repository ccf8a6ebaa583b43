"""JPEG 2000 and HTJ2K archives: files/s before and after the direct libopenjp2 path, on this machine.

    python -m bench.j2k --model best_int8.tflite                 # 64 files per kind, medians of 3 runs
    python -m bench.j2k --model best_int8.tflite --profile       # and where one file's time goes

Files: 2000x2500 12-bit MONOCHROME2 X-rays (bench.pipeline's synthetic chest with detector noise),
8 distinct images then copies: uncompressed (the baseline measured in the same run), JPEG 2000
lossless, and HTJ2K lossless (the same samples re-encoded by OpenJPH's ojph_compress; skipped
without it: Debian openjph-tools). Ways of decoding, taking turns in each run so that the shared
machine's drift hits them alike:

- before: OpenJPEG through Pillow (OPENJP2_LIBRARY=none), the default pool (one process per core);
- after: libopenjp2 direct, the default pool (one process per core, 1 OpenJPEG thread each);
  "after" includes the thinned decode (utils/io/dicom/j2k_packets.py: at 512 px these files'
  rows could lose a second level, so level 2 keeps its HL sub-band only, less the bit-planes
  below one display gray level); Pillow cannot take a rewritten codestream's shortcut, so
  "before" is the previous path whole;
- after: libopenjp2 direct, 1 process with 2 OpenJPEG threads;
- after: libopenjp2 direct, the threads pool (2 per core: ctypes lets go of the GIL while decoding).

"Decoding only" = Engine.decode_batches with started workers; "DICOM -> label" = predict.py's
``utils.infer.batch_predict.run`` with --model (worker start-up included). Prints Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

WAYS = {  # name: (OPENJP2_LIBRARY value or None for the default, PoolSettings keywords)
    "before: Pillow, processes (default pool)": ("none", {}),
    "after: direct, processes (default pool), 1 thread each": (None, {}),
    "after: direct, 1 process x 2 OpenJPEG threads": (None, {"workers": 1, "threads": 2}),
    "after: direct, threads pool": (None, {"mode": "threads"}),
}


@contextlib.contextmanager
def library(value: str | None):
    """OPENJP2_LIBRARY for the worker processes started inside (and this process)."""
    from utils.io.dicom import openjp2

    saved = os.environ.get("OPENJP2_LIBRARY")
    if value is None:
        os.environ.pop("OPENJP2_LIBRARY", None)
    else:
        os.environ["OPENJP2_LIBRARY"] = value
    openjp2._library.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OPENJP2_LIBRARY", None)
        else:
            os.environ["OPENJP2_LIBRARY"] = saved
        openjp2._library.cache_clear()


def write_htj2k(folder: Path, j2k_files: list[str]) -> list[str] | None:
    """The JPEG 2000 files with their samples re-encoded as HTJ2K lossless (None without ojph_compress)."""
    import numpy as np
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import HTJ2KLossless

    if shutil.which("ojph_compress") is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    encoded: dict[bytes, bytes] = {}
    paths = []
    for i, source in enumerate(j2k_files):
        ds = pydicom.dcmread(source)
        pixels = ds.pixel_array
        key = pixels.tobytes()[:4096] + pixels.tobytes()[-4096:]
        if key not in encoded:
            pgm, out = folder / "in.pgm", folder / "out.j2c"
            rows, cols = pixels.shape
            pgm.write_bytes(f"P5\n{cols} {rows}\n4095\n".encode() + pixels.astype(">u2").tobytes())
            subprocess.run(["ojph_compress", "-i", str(pgm), "-o", str(out), "-reversible", "true"], check=True,
                           capture_output=True)
            encoded[key] = out.read_bytes()
        ds.PixelData = encapsulate([encoded[key]])
        ds.file_meta.TransferSyntaxUID = HTJ2KLossless
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    assert np.array_equal(pydicom.dcmread(paths[0]).pixel_array, pydicom.dcmread(j2k_files[0]).pixel_array)
    return paths


def measure(files: list[str], predictor, tmp: Path, ways: dict, runs: int) -> dict[str, tuple[float, float]]:
    """way -> (decoding only files/s, DICOM -> label files/s), medians of ``runs``."""
    from utils.constants import THRESHOLD
    from utils.infer.batch_predict import run
    from utils.infer.engine import Engine
    from utils.io.isolation import PoolSettings

    decode: dict[str, list[float]] = {w: [] for w in ways}
    full: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(runs):
        for way, (value, keywords) in ways.items():
            pool = PoolSettings(**keywords)
            with library(value):
                with Engine(predictor.spec, pool=pool) as engine:
                    engine.decode(files[: pool.worker_count])  # start the workers
                    start = time.perf_counter()
                    for _batch in engine.decode_batches(files, 32):
                        pass
                    decode[way].append(len(files) / (time.perf_counter() - start))
                summary = run(predictor, files, output=tmp / "e2e.csv", threshold=THRESHOLD, pool=pool, progress=False)
                full[way].append(len(files) / summary.seconds)
    return {w: (statistics.median(decode[w]), statistics.median(full[w])) for w in ways}


def levels(path: str, runs: int = 5) -> str:
    """ms to decode frame 0 at each resolution level with libopenjp2 (1 and 2 threads), and the share
    of the wavelet coefficients each level decodes: the time follows the coefficients (tier-1)."""
    import pydicom
    from pydicom.encaps import get_frame

    from utils.io.dicom import openjp2

    codestream = get_frame(pydicom.dcmread(path).PixelData, 0, number_of_frames=1)
    lines = ["| levels skipped | coefficients decoded | ms, 1 thread | ms, 2 threads |", "|---|---|---|---|"]
    for level in (0, 1, 2, 5):
        times = {}
        for threads in (1, 2):
            openjp2.decode(codestream, level, threads)
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                openjp2.decode(codestream, level, threads)
                samples.append((time.perf_counter() - start) * 1000)
            times[threads] = statistics.median(samples)
        lines.append(f"| {level} | 1/{4 ** level} | {times[1]:.1f} | {times[2]:.1f} |")
    return "\n".join(lines + thinned_rows(path, codestream, runs))


def thinned_rows(path: str, codestream: bytes, runs: int) -> list[str]:
    """Rows for the decode at 1 level skipped with level 2's LH and HH left out (``j2k_packets``),
    without and with the bit-planes the reader leaves out for this file; and the rewrite's cost."""
    import pydicom

    from utils.io.dicom import j2k_packets, openjp2
    from utils.io.dicom.grayscale import stored_values_per_gray_level
    from utils.io.dicom.j2k import dropped_planes
    from utils.preprocessing import PreprocessSpec

    if not openjp2.available():
        return []
    levels = codestream[codestream.index(b"\xff\x52") + 9]
    try:
        j2k_packets.thin(codestream, levels - 1, frozenset({j2k_packets.HL}))
    except j2k_packets.Unsupported:  # HTJ2K code-blocks: decoded the plain way
        return []
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    spec = PreprocessSpec()
    step = stored_values_per_gray_level(ds, lambda: openjp2.decode(codestream, levels)[0], spec.window_percentiles,
                                        1_000_000)  # read_dicom's default sample count
    rows = []
    for planes in sorted({0, dropped_planes(step)}):
        thinned = j2k_packets.thin(codestream, levels - 1, frozenset({j2k_packets.HL}), planes)
        times = {}
        for threads in (1, 2):
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                openjp2.decode(thinned, 1, threads)
                samples.append((time.perf_counter() - start) * 1000)
            times[threads] = statistics.median(samples)
        share = f"1/4, level 2: HL only{f', less its {planes} lowest bit-planes' if planes else ''}"
        rows.append(f"| 1, thinned | {share} | {times[1]:.1f} | {times[2]:.1f} |")
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        j2k_packets.thin(codestream, levels - 1, frozenset({j2k_packets.HL}), dropped_planes(step))
        samples.append((time.perf_counter() - start) * 1000)
    rows.append(f"| (rewriting the packets, Python) | | {statistics.median(samples):.1f} | |")
    return rows


def profile(path: str, spec, top: int) -> str:
    """cProfile of preprocess_file on one file, in this process, one OpenJPEG thread (10 calls)."""
    from utils.preprocessing import preprocess_file

    preprocess_file(path, spec)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(10):
        preprocess_file(path, spec)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="artifact for DICOM -> label (default: an untrained mobilenet_v1 at 512 px "
                        "exported to TFLite fp32)")
    parser.add_argument("--files", type=int, default=64, help="files per kind")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also cProfile one file of each compressed kind")
    parser.add_argument("--top", type=int, default=12, help="profile lines")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import pydicom.uid

    from bench.inference import write_xrays
    from utils.config import cpu_name
    from utils.infer.predictor import load_predictor
    from utils.io.dicom import openjp2
    from utils.io.isolation import default_workers

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-j2k-") as tmp:
        tmp = Path(tmp)
        model = args.model or _untrained_tflite(tmp)
        predictor = load_predictor(model)
        j2k = write_xrays(tmp / "j2k", pydicom.uid.JPEG2000Lossless, args.files)
        kinds = {"uncompressed": write_xrays(tmp / "plain", pydicom.uid.ExplicitVRLittleEndian, args.files),
                 "JPEG 2000 lossless": j2k}
        htj2k = write_htj2k(tmp / "htj2k", j2k)
        if htj2k:
            kinds["HTJ2K lossless"] = htj2k
        rows = []
        for kind, files in kinds.items():
            ways = dict(list(WAYS.items())[:2]) if kind == "uncompressed" else WAYS
            megabytes = Path(files[0]).stat().st_size / 1e6
            for way, (decode, full) in measure(files, predictor, tmp, ways, args.runs).items():
                rows.append((kind, megabytes, way, decode, full))
        profiles = {kind: profile(files[0], predictor.spec, args.top) + "\n" + levels(files[0])
                    for kind, files in kinds.items() if args.profile and kind != "uncompressed"}
    base = {way: (d, f) for kind, _, way, d, f in rows if kind == "uncompressed"}
    print(f"\nmachine: {cpu_name()}, {default_workers('processes')} cores; load average before {load_before:.1f}, "
          f"after {os.getloadavg()[0]:.1f}; libopenjp2 {openjp2.version() or '-'} direct; model {Path(model).name}; "
          f"{args.files} files per kind, medians of {args.runs} runs")
    print("\n| 2000x2500 12-bit | MB/file | decoding | decoding only, files/s | x uncompressed | DICOM -> label, "
          "files/s | x uncompressed |")
    print("|---|---|---|---|---|---|---|")
    plain = base.get("after: direct, processes (default pool), 1 thread each", (1.0, 1.0))
    for kind, megabytes, way, decode, full in rows:
        print(f"| {kind} | {megabytes:.1f} | {way} | {decode:.1f} | {decode / plain[0]:.2f} | {full:.1f} "
              f"| {full / plain[1]:.2f} |")
    for kind, text in profiles.items():
        print(f"\n{kind}, one file, preprocess_file x 10 (cProfile, by own time):\n{text}")


def _untrained_tflite(folder: Path) -> str:
    from models import build_model
    from utils.artifacts.export import export_model
    from utils.artifacts.model_file import save_model
    from utils.preprocessing import PreprocessSpec

    spec = PreprocessSpec(image_size=512)
    path = save_model(build_model("mobilenet_v1", spec.num_classes, spec.input_shape, None), folder / "m.keras", spec,
                      model_id="bench-j2k", backbone="mobilenet_v1")
    return str(export_model(path, "tflite", quantize="none", check_images=2).path)


if __name__ == "__main__":
    main()
