"""Time from starting router.py to its first successful C-ECHO, and to its first classification.

    python -m bench.router_restart                      # untrained MobileNet-V1 at 512 px: .keras, then int8 .tflite
    python -m bench.router_restart --repeats 5 --model runs/demo

For each model artifact, ``--repeats`` times: a fresh spool, ``python router.py`` started, C-ECHO
tried every 50 ms until it succeeds (time to the first successful C-ECHO, measured from just
before the process is started), then one 1024 x 1024 image sent and the time to its
``classified`` audit line (from the same start; the model is loaded in the background, so this
includes importing the model runtime, loading and warming up). Destinations are folders, so no
dcmtk is needed. Prints Markdown: medians, and the ratio to the .keras model of the same run.
The int8 .tflite is converted here (random calibration images: speed does not depend on them);
it runs on LiteRT without TensorFlow when ``ai-edge-litert`` is installed (the table says which).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.router import CLASSES, _free_port, _wait, make_files, untrained_model

ROOT = Path(__file__).resolve().parents[1]


def int8_tflite(model_path: Path, out: Path, samples: int = 8) -> Path:
    import tensorflow as tf

    from utils.artifacts.export import IO_CONTRACT, quantize_int8
    from utils.artifacts.model_file import load_model, write_sidecar

    model, metadata = load_model(model_path)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    rng = np.random.default_rng(0)
    quantize_int8(converter, lambda: ([rng.uniform(0, 255, (1, *metadata.spec.input_shape)).astype(np.float32)]
                                      for _ in range(samples)))
    out.write_bytes(converter.convert())
    write_sidecar(out, metadata.replace(format="tflite", quantization="int8", source=str(model_path), io=IO_CONTRACT))
    return out


def echo_ok(port: int) -> bool:
    from utils.routing.operations.service import echo

    return echo("BENCH", "127.0.0.1", port, "ROUTER", timeout=2) is None


def store(port: int, path: Path) -> int:
    """C-STORE one file as it is (pynetdicom); its status."""
    import pydicom
    from pynetdicom import AE

    dataset = pydicom.dcmread(path)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="ROUTER")
    try:
        return int(assoc.send_c_store(dataset).Status)
    finally:
        assoc.release()


def one_start(model: Path, image: Path, run: Path) -> dict:
    import yaml

    from utils.routing.operations.service import configure_logging

    configure_logging("ERROR")  # pynetdicom's refused-connection errors while the router starts
    run.mkdir(parents=True)
    port = _free_port()
    config = {"ae_title": "ROUTER", "host": "127.0.0.1", "port": port, "model": str(model), "threshold": 0.5,
              "spool_dir": str(run / "spool"), "batch_size": 1, "min_free_mb": 1,
              "destinations": {c: {"folder": str(run / "out")} for c in (*CLASSES, "uncertain", "unreadable")}}
    (run / "router.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with open(run / "router.log", "wb") as log:
        started = time.monotonic()
        router = subprocess.Popen([sys.executable, ROOT / "router.py", "--config", run / "router.yaml",
                                   "--log-level", "WARNING"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            _wait(lambda: router.poll() is not None or echo_ok(port), 300, "the first C-ECHO")
            echoed = time.monotonic() - started
            if router.poll() is not None:
                raise RuntimeError((run / "router.log").read_text()[-3000:])
            assert store(port, image) == 0
            audit = run / "spool" / "audit.jsonl"
            _wait(lambda: '"classified"' in audit.read_text() or router.poll() is not None, 600, "a classification")
            classified = time.monotonic() - started
            loaded = [json.loads(line) for line in audit.read_text().splitlines() if '"model_loaded"' in line]
        finally:
            router.terminate()
            router.wait(60)
    return {"echo_s": echoed, "classified_s": classified, "runtime": loaded[0]["runtime"] if loaded else "?"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="run dir or .keras (default: untrained backbone)")
    parser.add_argument("--backbone", default="mobilenet_v1")
    parser.add_argument("--image-size", type=int, default=512)
    args = parser.parse_args(argv)

    from utils.config import environment

    with tempfile.TemporaryDirectory(prefix="bench-restart-") as name:
        tmp = Path(name)
        keras_model = Path(args.model) if args.model else untrained_model(tmp / "model.keras", args.backbone,
                                                                           args.image_size)
        models = {"keras": keras_model, "tflite int8": int8_tflite(keras_model, tmp / "model.tflite")}
        image = make_files(tmp / "in", 1, 1024, "explicit", seed=0)[0]
        results: dict[str, list[dict]] = {k: [] for k in models}
        for i in range(args.repeats):  # interleaved, so that a change in the machine's load hits both
            for kind, model in models.items():
                results[kind].append(one_start(model, image, tmp / f"{kind.replace(' ', '-')}-{i}"))
    env = environment()
    print(f"\nMachine: {env['processor']}, {env['cpu_count']} cores; {env['time'][:10]}. Model: "
          f"{args.model or 'untrained ' + args.backbone} at {args.image_size} px; median of {args.repeats} starts.\n")
    print("| model | runtime | first C-ECHO (s) | first classification (s) | C-ECHO vs .keras | classification vs .keras |")
    print("|---|---|---|---|---|---|")
    base = {k: statistics.median(r[k] for r in results["keras"]) for k in ("echo_s", "classified_s")}
    for kind, rows in results.items():
        echo_s = statistics.median(r["echo_s"] for r in rows)
        classified_s = statistics.median(r["classified_s"] for r in rows)
        print(f"| {kind} | {rows[0]['runtime']} | {echo_s:.2f} | {classified_s:.2f} | {echo_s / base['echo_s']:.2f} "
              f"| {classified_s / base['classified_s']:.2f} |")
    print("\nall runs: " + json.dumps({k: [{m: round(v, 2) if isinstance(v, float) else v for m, v in r.items()}
                                          for r in rows] for k, rows in results.items()}))


if __name__ == "__main__":
    main()
