"""Classify a whole archive on Ray Data: resumable, to a Parquet dataset, with a curation report.

    python backfill.py /archive --model model.int8.tflite --output backfill/        # this machine, all cores
    python backfill.py manifest.csv s3://bucket/xrays/ --model model.onnx --output backfill/ --workers 6
    python backfill.py /nfs/archive --model /nfs/models/best.keras --output /nfs/backfill \
        --address auto --inference-gpus 1                                           # a Ray cluster

SOURCE is a folder (recursive), a file, a list file (*.txt, *.lst, *.list: one path per line), a
CSV manifest (*.csv: column "path", else the first column), local or an fsspec URL (s3://...,
gs://..., file://...; s3 needs `pip install s3fs`). Local sources are expanded as predict.py does.
A DICOMweb archive is dicomweb+https://host/dicom-web?from=YYYYMMDD&to=YYYYMMDD (study dates; or
?study=UID,UID): its instances of the --dicomweb-modalities are listed by QIDO-RS and fetched by
WADO-RS, one row each; credentials from --dicomweb-password-file / --dicomweb-token-file or an
environment variable, never the URL. A listing that missed studies or series exits with status 1.

Decoding runs in --workers Ray actors (1 CPU each), each with an isolated decoding process: a
file that hangs past --decode-timeout-s, crashes its decoder or needs more than
--decode-memory-limit-mb becomes an error row and never stops the run. Inference runs in
--inference-workers actors holding the model (int8 TFLite or ONNX on CPUs; Keras with
--inference-gpus 1 on GPU nodes). A DICOM whose header is not projection radiography (Modality
not CR/DX/DR/RG) is an error row with reason not_projection_radiography, never shown to the model
(--no-projection-only for archives that mis-tag). Output: DIR/part-*.parquet with predict.py's CSV columns
(path, SOPInstanceUID, StudyInstanceUID, label, confidence, top_label, prob_<class>...,
BodyPartExamined, tag_disagrees, error, sorted_to [empty]), typed; parts are written atomically,
so a re-run skips every file already in DIR and a killed run, run again, finishes the rest. At
the end DIR/report.md, report.json (counts per label and per BodyPartExamined, the tag x
prediction matrix, the out_of_distribution and not_projection_radiography counts) and
tag_corrections.csv (tags missing or contradicted, at confidence >= --correction-threshold; none
for an image the OOD score flagged) cover everything in DIR.

Without --address (or RAY_ADDRESS) Ray starts on this machine with --num-cpus CPUs (default: all
cores); with --address auto it joins the cluster this machine belongs to (`ray start --head`,
KubeRay): the model, the output folder and local sources must then be on storage every node sees
(NFS), or the sources URLs. See docs/BACKFILL.md.
"""

from __future__ import annotations

import argparse
import logging
import sys

from utils import config, constants
from utils.infer.decisions import threshold_value
from utils.io.isolation import PoolSettings

FLAGS = ("PROJECTION_ONLY", "DECODE_POOL", "DECODE_TIMEOUT_S", "DECODE_MEMORY_LIMIT_MB", "DECODE_THREADS")
# Flags named without the BACKFILL_ prefix (--workers, args.workers); defaults, help and ranges are the constants'.
LAYOUT = ("BACKFILL_WORKERS", "BACKFILL_INFERENCE_WORKERS", "BACKFILL_INFERENCE_CPUS", "BACKFILL_INFERENCE_GPUS",
          "BACKFILL_ROWS_PER_FILE", "BACKFILL_NUM_CPUS", "BACKFILL_CORRECTION_THRESHOLD")
PREFIX = "BACKFILL_"
# DICOMweb sources: --dicomweb-user ... (utils.backfill.dicomweb.Access); numbers checked against their ranges too.
DICOMWEB = ("BACKFILL_DICOMWEB_USER", "BACKFILL_DICOMWEB_PASSWORD_ENV", "BACKFILL_DICOMWEB_PASSWORD_FILE",
            "BACKFILL_DICOMWEB_TOKEN_ENV", "BACKFILL_DICOMWEB_TOKEN_FILE", "BACKFILL_DICOMWEB_CA",
            "BACKFILL_DICOMWEB_CERT", "BACKFILL_DICOMWEB_KEY", "BACKFILL_DICOMWEB_PAGE_SIZE",
            "BACKFILL_DICOMWEB_LIST_THREADS", "BACKFILL_DICOMWEB_TIMEOUT_S", "BACKFILL_DICOMWEB_RETRIES",
            "BACKFILL_DICOMWEB_MAX_INSTANCE_MB")

log = logging.getLogger("backfill")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = config.ArgumentParser(description=__doc__)
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="folders, files, lists, CSV manifests or URLs")
    parser.add_argument("--model", required=True, metavar="ARTIFACT",
                        help="run directory, .keras, .tflite, .onnx or SavedModel, readable on every node (required)")
    parser.add_argument("--output", required=True, metavar="DIR", help="the Parquet dataset folder (required)")
    parser.add_argument("--threshold", type=threshold_value, default=constants.THRESHOLD, metavar="{0..1,auto}",
                        help=config.constant_comments()["THRESHOLD"] + "; 'auto': the model's calibrated recommendation")
    parser.add_argument("--batch-size", type=int, default=constants.BATCH_SIZE,
                        help="files per decode call and per model call")
    config.add_flags(parser, LAYOUT, prefix=PREFIX)
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join ('auto': this machine's cluster); default: RAY_ADDRESS, else "
                        "start Ray on this machine")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    config.add_flags(parser, FLAGS)
    config.add_flags(parser, DICOMWEB, prefix=PREFIX)
    parser.add_argument("--dicomweb-modalities", nargs="+", metavar="MODALITY",
                        default=constants.BACKFILL_DICOMWEB_MODALITIES,
                        help=config.constant_comments()["BACKFILL_DICOMWEB_MODALITIES"])
    args = parser.parse_args(argv)
    try:  # the one checker, with constants.py's ranges (BATCH_SIZE_RANGE, BACKFILL_*_RANGE)
        config.check_value("BATCH_SIZE", args.batch_size)
        for name in LAYOUT + DICOMWEB:
            short = name.removeprefix(PREFIX)
            config.check_value(name, getattr(args, config.dest_name(short)), label=config.flag_name(short))
    except config.ConfigError as error:
        parser.error(str(error))
    PoolSettings.from_args(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args, settings = config.start(parse_args, argv, FLAGS)
    from utils.artifacts.model_file import read_metadata
    from utils.backfill import pipeline, report, sources
    from utils.backfill.dicomweb import Access
    from utils.backfill.store import OutputMismatch, OutputStore
    from utils.dicomweb.archive import Listing
    from utils.dicomweb.http import DicomwebError
    from utils.infer.predictor import resolve_threshold

    access, listing = Access.from_args(args), Listing()
    try:
        files, skipped = sources.list_sources(args.sources, access, listing)
    except (FileNotFoundError, ValueError, DicomwebError) as error:  # ValueError: a malformed DICOMweb source
        print(f"error: {error}", file=sys.stderr)
        return 2
    if skipped:
        log.info("skipped %d files that are neither images nor DICOM (e.g. %s)", len(skipped), skipped[0])
    try:
        metadata = read_metadata(args.model)
        threshold = resolve_threshold(args.threshold, metadata, args.model)
    except (OSError, ValueError) as error:
        print(f"error: cannot use model {args.model}: {error}", file=sys.stderr)
        return 2
    # one decoding process per actor, which holds 1 CPU: one OpenJPEG thread unless asked for more
    pool = PoolSettings.from_flags({**settings, "decode_workers": 1, "decode_threads": settings["decode_threads"] or 1})
    layout = pipeline.Settings(workers=args.workers, inference_workers=args.inference_workers,
                               inference_cpus=args.inference_cpus, inference_gpus=args.inference_gpus,
                               batch_size=args.batch_size, rows_per_file=args.rows_per_file, pool=pool,
                               projection_only=args.projection_only, dicomweb=access)
    if not args.address and not args.num_cpus and args.workers:  # room for the actors asked for
        import os

        args.num_cpus = max(os.cpu_count() or 1, args.workers + int(args.inference_workers * args.inference_cpus))
    if args.quiet:
        _quiet_ray()
    pipeline.start_ray(args.address, args.num_cpus or None)
    log.info("model %s, %d classes, threshold %.4g; %d files listed", metadata.model_id,
             metadata.spec.num_classes, threshold, len(files))
    from utils.infer.ood import describe

    log.info("%s", describe(metadata.ood))  # whether images unlike the training set become out_of_distribution
    try:
        result = pipeline.run(files, model=args.model, output=args.output, threshold=threshold, settings=layout,
                              progress=not args.quiet)
    except OutputMismatch as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in result.lines():
        print(line)
    frame = OutputStore(args.output, metadata.spec.class_names).read()
    summary, corrections = report.build_report(frame, metadata.spec.class_names, args.correction_threshold)
    paths = report.write_report(summary, corrections, args.output)
    print(f"output: {args.output} ({summary['files']} rows); report: {paths[1]}; "
          f"{len(corrections)} proposed tag corrections: {paths[2]}")
    if listing.failed:  # those instances were not even listed: a scheduler must see that the run is incomplete
        print(f"DICOMweb: {'; '.join(listing.lines()[1:])}; run the same command again to list them",
              file=sys.stderr)
        return 1
    return 0


def _quiet_ray() -> None:
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False


if __name__ == "__main__":
    sys.exit(main())
