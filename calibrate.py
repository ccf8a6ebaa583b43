"""Calibrate a trained model's confidence (temperature scaling) and store it with the model.

    python calibrate.py runs/mobilenet_v1-20261125-120000            # its best.keras, on its val split
    python calibrate.py runs/demo/best.keras --data data/radiographs --target-accuracy 0.99
    python calibrate.py runs/demo --plots runs/demo/calibration      # + reliability and risk-coverage figures
    python calibrate.py runs/demo/best.tflite --data data/radiographs   # an export: its metadata file

The model's logits on --split (default val) of --data (default: the dataset the run was trained
on) fix one temperature T, the one that minimises the negative log-likelihood there; from then on
every predictor (Keras, TFLite, ONNX, SavedModel: predict.py, test.py, the router) returns
softmax(logits / T). Labels and accuracy do not change; the confidences become honest, so that
a threshold on them is a statement about accuracy. With the calibrated confidences it also
recommends the lowest threshold whose automatically routed images reach --target-accuracy on
that split (or 1.0, "review everything", flagged unreachable, when none does), which
`predict.py --threshold auto` and the router's `threshold: auto` use. A recommendation that rests
on fewer auto-routed images than the target needs to be shown (ceil(1 / (1 - target)): 200 at
0.995; the demo's 30 validation images are far fewer) is flagged ``enough_images: false`` and
warned about here and by --threshold auto.

Both go into the model's metadata (``calibration``: temperature, data, image count, NLL and ECE
before/after, the threshold recommendation), inside the .keras file (rewritten atomically), or the
metadata file of an export. Training does this by itself at the end of a run; this script is for
runs trained before, or to calibrate on other data or another target. Calibrating again replaces
the earlier calibration. A model calibrated after it was exported must be exported again (exports
copy the metadata of their source).

It also fits the model's out-of-distribution score (utils/infer/ood.py; ``ood`` in the metadata) on
the stage statistics of the dataset's train split (a Mahalanobis distance, and a logistic regression
against synthetic non-radiographs the project generates), each part thresholded at --ood-quantile of
the --split images' scores, so that a little over 1 - that share of real radiographs is flagged. Images above it become "uncertain" with reason out_of_distribution in predict.py, test.py,
backfill.py and the router. Exports made before the score existed have no features output and get
none: re-export them from the .keras file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from utils import config, constants

FLAGS = ("TARGET_ACCURACY", "CALIBRATION_BINS", "OOD_QUANTILE", "OOD_COMPONENTS")

log = logging.getLogger("calibrate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config.ArgumentParser(description=__doc__)
    parser.add_argument("model", metavar="MODEL",
                        help="training run directory (its best.keras), a .keras file, or an export of export.py")
    parser.add_argument("--data", default=None,
                        help="prepared dataset, CSV or class folders to calibrate on; None: the run's training data")
    parser.add_argument("--split", default="val", choices=constants.SPLIT_CHOICES,
                        help="the split to fit on (keep the test split unseen: it measures the calibrated model)")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="also write reliability_diagram.png and risk_coverage.png into DIR")
    parser.add_argument("--batch-size", type=int, default=constants.BATCH_SIZE, help="images per model call")
    config.add_flags(parser, FLAGS)
    args = parser.parse_args(argv)
    try:  # --batch-size has BATCH_SIZE's bounds (the flags of FLAGS are checked by config.start)
        config.check_value("BATCH_SIZE", args.batch_size)
    except config.ConfigError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args, settings = config.start(parse_args, argv, FLAGS)
    from utils.evaluate.calibration import calibrate_run

    if args.split != "val":
        log.warning("calibrating on split %r: the test split should stay unseen to measure the calibrated model",
                    args.split)
    try:
        result = calibrate_run(args.model, args.data, args.split, target_accuracy=settings["target_accuracy"],
                               bins=settings["calibration_bins"], batch_size=args.batch_size,
                               ood_quantile=settings["ood_quantile"], ood_components=settings["ood_components"])
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.plots:
        from pathlib import Path

        from utils.evaluate import plots

        folder = Path(args.plots)
        t = result.entry["temperature"]
        probs = {"T = 1 (uncalibrated)": result.probs_before, f"T = {t:.3g} (calibrated)": result.probs_after}
        plots.plot_reliability_diagram(result.labels, probs, folder / "reliability_diagram.png",
                                       bins=settings["calibration_bins"])
        plots.plot_risk_coverage(result.labels, probs, folder / "risk_coverage.png",
                                 target_accuracy=settings["target_accuracy"],
                                 threshold=result.entry["threshold"]["value"])
    print(result.summary())
    print(f"stored in {result.path}:")
    print(json.dumps(result.entry, indent=2))
    if result.ood is not None:
        def without_arrays(value):
            if isinstance(value, dict):
                return {k: without_arrays(v) for k, v in value.items()
                        if not (isinstance(v, dict) and "float32_base64" in v)}
            return value

        shown = without_arrays(result.ood)
        print("out-of-distribution detector (its arrays left out):")
        print(json.dumps(shown, indent=2))
    threshold = result.entry["threshold"]
    if not threshold["reachable"]:
        print(f"warning: target accuracy {settings['target_accuracy']} unreachable on these data; --threshold auto "
              "would send (nearly) every image to review", file=sys.stderr)
    elif threshold.get("enough_images") is False:
        print(f"warning: the recommended threshold rests on {threshold['routed_images']} auto-routed images, too few "
              f"to show accuracy {settings['target_accuracy']} ({threshold['min_images']} or more needed); "
              "--threshold auto would use it with a warning", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
