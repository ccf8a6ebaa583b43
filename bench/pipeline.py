"""Input-pipeline and DICOM-decoding throughput.

    python -m bench.pipeline                      # synthetic 512px cache + synthetic 2000x2500 DICOMs
    python -m bench.pipeline --data data/radiographs512 --runs 5
    python -m bench.pipeline --skip-pipeline --size 256   # DICOM decoding only

Part 1: images/s that utils.data.dataset delivers from a prepared PNG cache (eval mode, training mode
with augmentation, and training from the in-memory cache), batch 32. Part 2: ms per file for
preprocess_file (read_dicom + resize to the cache size + 8 bits) on realistic X-ray sizes (about
2000x2500, 12 and 16 bit), uncompressed, RLE and JPEG 2000 lossless and lossy, each file also the
way it was decoded before the fast paths (VOI per pixel, JPEG 2000 at full resolution). Medians
of --runs runs; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np


def _synthetic_cache(folder: Path, count: int, size: int) -> list[str]:
    from utils.data.demo import DEMO_CLASSES, draw

    paths = []
    for i in range(count):
        label = DEMO_CLASSES[i % len(DEMO_CLASSES)]
        image = cv2.resize(draw(label, np.random.default_rng(i)), (size, size), interpolation=cv2.INTER_LINEAR)
        path = folder / f"{i:05d}.png"
        cv2.imwrite(str(path), np.rint(image * 255).astype(np.uint8))
        paths.append(str(path))
    return paths


def _cache_paths(data: str | None, count: int, size: int, tmp: Path) -> tuple[list[str], str]:
    if data:
        from utils.data.files import read_labels

        frame = read_labels(data)
        paths = [str(Path(data) / p) for p in frame["path"]][:count]
        return paths, f"{data} ({len(paths)} real prepared PNGs)"
    return _synthetic_cache(tmp, count, size), f"{count} synthetic PNGs"


def pipeline_throughput(paths: list[str], size: int, batch: int, runs: int) -> list[tuple[str, float]]:
    import tensorflow as tf  # noqa: F401

    from utils.data.dataset import NO_AUGMENTATION, Augmentation, build_dataset
    from utils.preprocessing import PreprocessSpec

    spec = PreprocessSpec(image_size=size)
    labels = [0] * len(paths)
    modes = [("eval (decode, no augmentation)", dict(training=False, augmentation=NO_AUGMENTATION, cache=False)),
             ("train (decode + rotation/brightness/contrast)", dict(training=True, augmentation=Augmentation(),
                                                                     cache=False)),
             ("train from in-memory cache (augmentation)", dict(training=True, augmentation=Augmentation(),
                                                                 cache=True))]
    rows = []
    for name, kwargs in modes:
        ds = build_dataset(paths, labels, spec, batch_size=batch, **kwargs)
        for _ in ds:  # warm-up epoch (fills the cache where asked)
            pass
        rates = []
        for _ in range(runs):
            start = time.perf_counter()
            count = sum(int(x.shape[0]) for x, _ in ds)
            rates.append(count / (time.perf_counter() - start))
        rows.append((name, statistics.median(rates)))
    return rows


def _xray(shape: tuple[int, int], bits: int, seed: int) -> np.ndarray:
    from utils.data.demo import draw

    base = cv2.resize(draw("adult_chest", np.random.default_rng(seed)), (shape[1], shape[0]),
                      interpolation=cv2.INTER_CUBIC)
    noise = np.random.default_rng(seed).normal(0, 0.01, shape).astype(np.float32)  # detector noise
    return np.clip(np.rint((base + noise) * (2 ** bits - 1)), 0, 2 ** bits - 1).astype(np.uint16)


@contextlib.contextmanager
def _decode_as_before():
    """read_dicom without its stored-value table: modality LUT and VOI run per pixel again."""
    from utils.io.dicom import grayscale

    saved = grayscale._MIN_PIXELS_PER_TABLE_ENTRY
    grayscale._MIN_PIXELS_PER_TABLE_ENTRY = math.inf
    try:
        yield
    finally:
        grayscale._MIN_PIXELS_PER_TABLE_ENTRY = saved


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def dicom_decoding(tmp: Path, size: int, runs: int) -> list[tuple[str, str, float, float]]:
    """(file, path, ms/file, files/s) for preprocess_file now and for the decode as it was before."""
    import pydicom.uid

    from utils.io import dicom
    from utils.io.dicom_writer import write_dicom
    from utils.preprocessing import PreprocessSpec, display_to_cache, preprocess_file, resized_shape

    spec = PreprocessSpec(image_size=size)
    target = functools.partial(resized_shape, size=size, aspect=spec.aspect)
    cases = [("uncompressed", pydicom.uid.ExplicitVRLittleEndian, 12, {}),
             ("uncompressed", pydicom.uid.ExplicitVRLittleEndian, 16, {}),
             ("uncompressed, window", pydicom.uid.ExplicitVRLittleEndian, 12, {"window": (2048.0, 4096.0)}),
             ("RLE lossless", pydicom.uid.RLELossless, 12, {}),
             ("JPEG 2000 lossless", pydicom.uid.JPEG2000Lossless, 12, {}),
             ("JPEG 2000 lossy", pydicom.uid.JPEG2000, 12, {})]
    rows = []
    for name, syntax, bits, extra in cases:
        path = tmp / f"{name.replace(' ', '_').replace(',', '')}_{bits}.dcm"
        write_dicom(path, _xray((2500, 2000), bits, 1), bits_stored=bits, transfer_syntax=syntax,
                    photometric="MONOCHROME2", **extra)
        label = f"2000x2500 {bits}-bit {name} ({path.stat().st_size / 1e6:.1f} MB)"
        level = dicom.read_dicom(path, target_shape=target).reduced_by
        now = "VOI table" + (f", JPEG 2000 decoded at 1/{2 ** level} size" if level else "")
        with _decode_as_before():
            before = _median_ms(lambda path=path: display_to_cache(dicom.read_dicom(path).pixels, spec), runs)
        after = _median_ms(lambda path=path: preprocess_file(path, spec), runs)
        rows += [(label, "before: per-pixel VOI, full resolution", before, 1000 / before),
                 (label, f"now: {now}", after, 1000 / after)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a prepared dataset at --size (default: synthetic PNGs)")
    parser.add_argument("--size", type=int, default=512, help="cache image size")
    parser.add_argument("--images", type=int, default=640, help="images per pipeline epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per row (median reported)")
    parser.add_argument("--skip-dicom", action="store_true", help="only the tf.data part")
    parser.add_argument("--skip-pipeline", action="store_true", help="only the DICOM decoding part")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from utils.config import environment

    env = environment()
    print(f"\nMachine: {env['processor']}, {env['cpu_count']} cores; {env['time'][:10]}")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_pipeline:
            paths, source = _cache_paths(args.data, args.images, args.size, Path(tmp))
            rows = pipeline_throughput(paths, args.size, args.batch_size, args.runs)
            print(f"\n### tf.data from the PNG cache ({source}, {args.size}x{args.size}, batch {args.batch_size}, "
                  f"median of {args.runs} epochs)\n")
            print("| mode | images/s |\n|---|---|")
            for name, rate in rows:
                print(f"| {name} | {rate:.0f} |")
        if not args.skip_dicom:
            drows = dicom_decoding(Path(tmp), args.size, args.runs)
            print(f"\n### DICOM file -> {args.size}px cache image (preprocess_file: read_dicom + resize + 8-bit), "
                  f"one process, median of {args.runs}\n")
            print("| file | decode path | ms/file | files/s |\n|---|---|---|---|")
            for name, how, ms, rate in drows:
                print(f"| {name} | {how} | {ms:.0f} | {rate:.1f} |")


if __name__ == "__main__":
    main()
