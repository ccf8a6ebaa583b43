"""Classify the body part of DICOM (and PNG/JPEG) files in bulk.

    python predict.py --model runs/demo data/demo/dicom
    python predict.py --model best.keras scans/ one.dcm list.txt --output out.csv --threshold 0.7
    python predict.py --model runs/demo scans/ --sort-into sorted/ --sort-mode hardlink
    python predict.py --model runs/demo scans/ --threshold auto  # the threshold calibrate.py recommended

INPUT is a file, a folder (searched recursively for images and DICOM files) or a text file
(*.txt, *.lst, *.list) listing paths. One CSV row per file: path, SOPInstanceUID,
StudyInstanceUID, label, confidence, top_label, prob_<class> for each class, ood_score,
BodyPartExamined, tag_disagrees (true/false, empty without a tag), error, sorted_to. A file that cannot be read gets
label "unreadable" and its reason; a prediction below --threshold gets label "uncertain". A DICOM
whose Modality is not projection radiography (CR, DX, DR, RG; without a Modality, a CR or DX SOP
class) is not shown to the model: label "unreadable", reason not_projection_radiography (the
router's default rule); --no-projection-only turns that off for archives that mis-tag. An image
unlike the radiographs the model was trained on (its out-of-distribution score, stored with the
model by training or calibrate.py, above the model's threshold: a CT slice, a photo or a document
even when tagged DX) gets label "uncertain" with error "out_of_distribution: ..."; ood_score is
empty for a model without one.
--threshold auto uses the threshold recommended when the model was calibrated (calibrate.py, or
the end of training: the lowest confidence whose automatically routed share reached the target
accuracy, calibrate.py --target-accuracy, on the validation split); a model without one is refused
(run calibrate.py MODEL).
Confidences are the model's calibrated probabilities, softmax(logits / T), T stored with the model.
Files are decoded in worker processes (--decode-pool): a file that hangs its decoder past
--decode-timeout-s, crashes it or needs more than --decode-memory-limit-mb costs only its row.
--sort-into copies (or links, --sort-mode) each file into DIR/<label>/; it never overwrites and
never moves or alters a source file.
"""

from __future__ import annotations

import argparse
import logging
import sys

from utils import config, constants
from utils.infer.decisions import threshold_value
from utils.io.isolation import PoolSettings

FLAGS = ("THRESHOLD", "SORT_MODE", "PROJECTION_ONLY", "DECODE_POOL", "DECODE_WORKERS", "DECODE_TIMEOUT_S",
         "DECODE_MEMORY_LIMIT_MB", "DECODE_THREADS")
# --threshold also takes "auto", so it is checked by its own type (threshold_value), not by config.resolve
CHECKED_FLAGS = tuple(name for name in FLAGS if name != "THRESHOLD")

log = logging.getLogger("predict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config.ArgumentParser(description=__doc__)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or lists of paths")
    parser.add_argument("--model", required=True, metavar="RUN_OR_MODEL",
                        help="training run directory (its best.keras) or a .keras file (required)")
    parser.add_argument("--output", default="predictions.csv", help="CSV file written (default: predictions.csv)")
    parser.add_argument("--sort-into", default=None, metavar="DIR",
                        help="also place each file into DIR/<label>/ (default: off)")
    parser.add_argument("--batch-size", type=int, default=constants.BATCH_SIZE,
                        help=f"images per model call (default: {constants.BATCH_SIZE})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--threshold", dest="threshold", type=threshold_value, default=constants.THRESHOLD,
                        metavar="{0..1,auto}",
                        help=config.constant_comments()["THRESHOLD"] + "; 'auto': the threshold recommended by the "
                        "model's calibration (calibrate.py), refused for a model without one")
    config.add_flags(parser, CHECKED_FLAGS)
    args = parser.parse_args(argv)
    try:  # the bounds of utils/constants.py (*_RANGE); --batch-size is BATCH_SIZE's; --threshold: threshold_value
        config.validate({config.dest_name(n): getattr(args, config.dest_name(n))
                         for n in (*CHECKED_FLAGS, "BATCH_SIZE")})
    except config.ConfigError as error:
        parser.error(str(error))
    PoolSettings.from_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args, settings = config.start(parse_args, argv, CHECKED_FLAGS)
    from utils.infer import batch_predict
    from utils.infer.predictor import load_predictor, resolve_threshold

    try:
        files, skipped = batch_predict.collect_inputs(args.inputs)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if skipped:
        log.info("skipped %d files that are neither images nor DICOM (e.g. %s)", len(skipped), skipped[0])
    if not files:
        print("error: no image or DICOM file found in the inputs", file=sys.stderr)
        return 2
    try:
        predictor = load_predictor(args.model)
    except (OSError, ValueError) as error:
        print(f"error: cannot load model {args.model}: {error}", file=sys.stderr)
        return 2
    try:
        threshold = resolve_threshold(args.threshold, predictor, args.model)
    except ValueError as error:
        print(f"error: --threshold {args.threshold}: {error}", file=sys.stderr)
        return 2
    log.info("model %s (%s), %d classes, %d px, temperature %.3g, threshold %.4g; %d files", predictor.model_id,
             predictor.backbone, predictor.spec.num_classes, predictor.spec.image_size,
             predictor.metadata.temperature if getattr(predictor, "metadata", None) else 1.0, threshold, len(files))
    from utils.infer.ood import describe

    log.info("%s", describe(getattr(getattr(predictor, "metadata", None), "ood", None)))  # is the OOD score on?
    summary = batch_predict.run(predictor, files, output=args.output, threshold=threshold,
                                batch_size=args.batch_size, pool=PoolSettings.from_flags(settings),
                                sort_into=args.sort_into, sort_mode=args.sort_mode, progress=not args.quiet,
                                projection_only=args.projection_only)
    for line in summary.lines():
        print(line)
    print(f"predictions: {args.output}" + (f"; sorted into {args.sort_into}" if args.sort_into else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
