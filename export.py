"""Export a trained model to a self-describing SavedModel, TFLite or ONNX artifact, checked against Keras.

    python export.py runs/demo --format tflite                    # runs/demo/best.tflite (fp32)
    python export.py runs/demo --format tflite --quantize fp16    # best_fp16.tflite
    python export.py runs/demo --format tflite --quantize int8    # best_int8.tflite, calibrated on train
    python export.py runs/demo --format onnx                      # best.onnx (ONNX Runtime, tf2onnx)
    python export.py runs/demo/best.keras --format saved_model --output exported/demo_sm

Each artifact gets its metadata beside it (model.tflite.json, model.onnx.json, or artifact.json
inside a SavedModel directory; an .onnx file embeds it as well): class names, input size and
channels, aspect policy, input range, model id, source, quantization and the check against the Keras model (largest probability difference and top-1
agreement on a validation batch), also written to <artifact>.check.json. predict.py, router.py
and test.py accept the artifact with --model. Every artifact takes float32 0..255 input (int8
included: quantisation happens inside the model) and returns logits.
"""

from __future__ import annotations

import argparse
import logging
import sys

from utils import config

log = logging.getLogger("export")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from utils.artifacts.export import FORMATS, QUANTIZATIONS

    parser = config.ArgumentParser(description=__doc__)
    parser.add_argument("model", metavar="RUN_OR_MODEL", help="training run directory (its best.keras) or a .keras file")
    parser.add_argument("--format", required=True, choices=FORMATS, help="artifact format (required)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                        help="tflite only: fp16 weights, or int8 weights+activations calibrated on the train split")
    parser.add_argument("--output", default=None,
                        help="artifact path (default: beside the model, e.g. best_int8.tflite, best_saved_model/)")
    parser.add_argument("--data", default=None,
                        help="prepared dataset for calibration and the check (default: the run's config.json)")
    parser.add_argument("--check-images", type=int, default=64, help="validation images compared with Keras")
    parser.add_argument("--calibration-images", type=int, default=200, help="int8: training images for calibration")
    args = parser.parse_args(argv)
    if args.quantize != "none" and args.format != "tflite":
        parser.error("--quantize applies to --format tflite only")
    if args.check_images < 1 or args.calibration_images < 1:
        parser.error("--check-images and --calibration-images must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args, _ = config.start(parse_args, argv, ())
    from utils.artifacts.export import export_model

    try:
        result = export_model(args.model, args.format, quantize=args.quantize, output=args.output, data=args.data,
                              check_images=args.check_images, calibration_images=args.calibration_images)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
