"""Prepare a dataset: DICOM / PNG / JPEG sources -> 8-bit PNG cache, labels.csv, rejects.csv.

    python prepare.py --input ../shared/radiographs --output data/radiographs --image-size 256
    python prepare.py --demo          # writes a synthetic DICOM set, then prepares it
    python prepare.py --input router-spool/corrections/labels.csv --output data/corrections --model runs/demo
                                      # images as runs/demo's model reads them (size, channels, classes)

Supported source layouts are described in data/README.md. Re-running reuses an image only when
its source file (path, size, modification time), the pixel settings and the reader/decoder
versions are unchanged; anything else is redone, and stale cache images are removed.
Files are read in --workers processes (--decode-pool): a source file that hangs a decoder past
--decode-timeout-s, crashes it or needs more than --decode-memory-limit-mb becomes a row of
rejects.csv with its reason (e.g. decode_timeout, decoder_crashed) instead of stopping the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from utils import config, constants
from utils.constants import DEMO_DIR
from utils.data import files
from utils.io.isolation import PoolSettings

FLAGS = ("CLASS_NAMES", "IMAGE_SIZE", "CHANNELS", "ASPECT", "WINDOW_PERCENTILES", "SPLIT_RATIOS", "SEED",
         "WORKERS", "DECODE_POOL", "DECODE_TIMEOUT_S", "DECODE_MEMORY_LIMIT_MB")


def parse_args(argv: list[str] | None = None):
    parser = config.ArgumentParser(description=__doc__)
    parser.add_argument("--input", help="source folder (one folder per class, or VinDr-BodyPartXR) or CSV")
    parser.add_argument("--output", help="prepared dataset folder (images/, labels.csv, rejects.csv)")
    parser.add_argument("--demo", action="store_true",
                        help=f"generate the synthetic demo DICOMs in {DEMO_DIR}/dicom and prepare them")
    parser.add_argument("--model", metavar="RUN_DIR_OR_MODEL",
                        help="prepare the images as this trained model reads them: its class names, image size, "
                             "channels, aspect and windowing (its saved spec); for training.py --finetune")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every image (needed when the output was prepared with other pixel settings; "
                             "a changed source file, reader or decoder is redone without it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    config.add_flags(parser, FLAGS)
    args = parser.parse_args(argv)
    if not args.demo and (not args.input or not args.output):
        parser.error("--input and --output are required (or use --demo)")
    PoolSettings.from_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args, settings = config.start(parse_args, argv, FLAGS)

    from utils.data import demo, prepare
    from utils.preprocessing import PreprocessSpec

    if args.demo:
        result = demo.prepare_demo(progress=not args.quiet, image_size=args.image_size
                                   if "--image-size" in config.given_flags(argv) else None,
                                   images_per_class=constants.DEMO_IMAGES_PER_CLASS)
        output = Path(DEMO_DIR) / "prepared"
    else:
        output = Path(args.output)
        try:
            spec = prepare.spec_of_model(args.model, settings, config.given_flags(argv)) if args.model else \
                PreprocessSpec(class_names=settings["class_names"], image_size=settings["image_size"],
                               channels=settings["channels"], aspect=settings["aspect"],
                               window_percentiles=settings["window_percentiles"])
            result = prepare.prepare_dataset(args.input, output, spec, ratios=settings["split_ratios"],
                                             seed=settings["seed"], workers=settings["workers"],
                                             progress=not args.quiet, overwrite=args.overwrite,
                                             pool=PoolSettings.from_flags(settings))
        except prepare.SourceError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    spec = result.spec
    # What this dataset was really made with (--demo has its own size, classes, split and seed).
    recorded = {**settings, "class_names": spec.class_names, "image_size": spec.image_size,
                "channels": spec.channels, "aspect": spec.aspect, "window_percentiles": spec.window_percentiles}
    if args.demo:
        recorded.update(split_ratios=constants.SPLIT_RATIOS, seed=constants.SEED)
    config.save_config(recorded, output / files.CONFIG, spec=spec.to_dict())
    summary = result.summary(None if args.demo else output)
    (output / files.SUMMARY).write_text(summary + "\n")
    print(summary)
    print(f"\nwrote {output / files.LABELS}, {output / files.REJECTS}, {output / files.SUMMARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
