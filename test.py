"""Evaluate trained models with bootstrap confidence intervals (the paper's table, honestly).

    python test.py runs/mobilenet_v1-20261125-120000 --data data/radiographs
    python test.py runs/a runs/b runs/c --data data/radiographs --output results/compare
    python test.py --demo                      # after: python training.py --demo

MODEL is a training run directory (its best.keras) or a .keras file saved by this project; its
embedded preprocessing spec decides how images are read. --data is a prepared dataset (its
--split is used), a CSV of path,label[,group], or a folder per class; raw files are decoded in
worker processes (--decode-pool), so one that hangs or crashes a codec is left out with its
reason. Outputs per model: results.json, results.md, predictions.csv, confusion_matrix.png,
roc_curves.png (beside the model, or in --output/<model name>), and skipped.csv (file, reason,
message) when a listed file was left out; with several models, comparison.md/.csv as well. Every
report says how many images were listed, evaluated and skipped (by reason). When more than
--max-skipped-share of the listed files cannot be read (or none can), no result is written: only
skipped.csv, an error naming the counts and reasons, and exit status 2.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

from utils import config, constants
from utils.io.isolation import PoolSettings

FLAGS = ("SPLIT", "BOOTSTRAP_RESAMPLES", "CONFIDENCE_LEVEL", "BOOTSTRAP_UNIT", "SEED", "BATCH_SIZE",
         "DECODE_POOL", "DECODE_WORKERS", "DECODE_TIMEOUT_S", "DECODE_MEMORY_LIMIT_MB", "MAX_SKIPPED_SHARE")

log = logging.getLogger("test")


class CoverageError(Exception):
    """Too large a share of the listed files could not be read (or none could): no result is written."""


def parse_args(argv: list[str] | None = None):
    parser = config.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", metavar="MODEL", help="run directories or .keras files")
    parser.add_argument("--data", default=None, help=f"prepared dataset, CSV or class folders "
                                                     f"(default: the run's training data, else {constants.DATA_DIR})")
    parser.add_argument("--output", default=None, help="where results go (default: beside each model)")
    parser.add_argument("--timing-runs", type=int, default=50,
                        help="batch-1 inference repetitions for the latency figure; 0 skips timing")
    parser.add_argument("--demo", action="store_true", help="evaluate runs/demo on the synthetic demo test split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    config.add_flags(parser, FLAGS)
    args = parser.parse_args(argv)
    if not 0 <= args.max_skipped_share <= 1:  # also rejects nan
        parser.error(f"--max-skipped-share must be in [0, 1] (a share of the listed images), "
                     f"got {args.max_skipped_share}")
    PoolSettings.from_args(parser, args)
    if args.demo:
        args.models = args.models or [str(Path(constants.RUNS_DIR) / "demo")]
        args.data = args.data or str(Path(constants.DEMO_DIR) / "prepared")
        if "--timing-runs" not in config.given_flags(argv):
            args.timing_runs = 10
    if not args.models:
        parser.error("give at least one MODEL (a run directory or .keras file), or --demo")
    return args


def evaluate_one(model_arg: str, args, settings: dict, output_dir: Path) -> dict:
    from utils.artifacts.run_dir import training_data
    from utils.evaluate import evaluation, reports
    from utils.infer.predictor import load_predictor

    info = load_predictor(model_arg)
    data = args.data or training_data(model_arg) or constants.DATA_DIR
    subset = evaluation.eval_set(data, settings["split"], info.spec)
    log.info("%s (%s): %d images from %s", model_arg, info.model_id, len(subset.files), subset.description)
    probs, kept, errors = evaluation.predict(info, subset.files, cached=subset.cached,
                                             batch_size=settings["batch_size"], progress=not args.quiet,
                                             pool=PoolSettings.from_flags(settings))
    for path, reason in subset.skipped + errors:
        log.warning("left out %s: %s", path, reason)
    coverage = evaluation.Coverage.of(subset, len(kept), errors, settings["max_skipped_share"])
    skipped_csv = reports.write_skipped_csv(output_dir, coverage.skipped)
    if coverage.too_many_skipped:
        for stale in reports.remove_evaluation_outputs(output_dir):
            log.warning("removed %s of an earlier evaluation", stale)
        raise CoverageError(coverage_error(coverage, data, skipped_csv))
    if coverage.skipped:
        log.warning("%d of %d listed images skipped (%s); the metrics cover the other %d: see %s",
                    len(coverage.skipped), coverage.listed, reports.reasons_text(coverage.by_reason),
                    coverage.evaluated, skipped_csv)
    timing = evaluation.time_inference(info, runs=args.timing_runs) if args.timing_runs else None
    groups = [subset.groups[i] for i in kept] if subset.groups is not None else None
    results = reports.write_evaluation(
        output_dir, y_true=subset.labels[kept], probs=probs, class_names=info.spec.class_names,
        files=[subset.files[i] for i in kept], groups=groups, n_resamples=settings["bootstrap_resamples"],
        confidence=settings["confidence_level"], seed=settings["seed"], unit=settings["bootstrap_unit"],
        model_id=info.model_id, split=subset.split, timing=timing,
        extra={"data": str(data), "source": subset.description, "backbone": info.backbone,
               "left_out": [{"file": f, "reason": r} for f, r in subset.skipped + errors]},
        coverage=coverage.to_dict())
    config.save_config({**settings, "model": model_arg, "data": str(data)}, output_dir / reports.CONFIG_FILENAME)
    return results


def coverage_error(coverage, data, skipped_csv: Path | None) -> str:
    """Why an evaluation is refused: counts, reasons, the threshold and how to allow it."""
    from utils.evaluate import reports

    reasons = reports.reasons_text(coverage.by_reason)
    share, limit = coverage.skipped_share, coverage.max_skipped_share
    if coverage.evaluated == 0:
        head = f"none of the {coverage.listed} listed images in {data} could be read ({reasons})"
    else:
        head = (f"{len(coverage.skipped)} of {coverage.listed} listed images in {data} ({share:.1%}) could not "
                f"be read ({reasons}): more than the {limit:.1%} that --max-skipped-share {limit:g} allows, "
                f"so the metrics would cover only the other {coverage.evaluated}")
    tail = f"Each file and its reason: {skipped_csv}. " if skipped_csv else ""
    tail += "No results written. Fix or remove those files"
    if coverage.evaluated:
        allow = min(1.0, math.ceil(share * 1000) / 1000)
        tail += f", or accept metrics on part of the data with --max-skipped-share {allow:g}"
    return f"{head}. {tail}."


def main(argv: list[str] | None = None) -> int:
    args, settings = config.start(parse_args, argv, FLAGS)
    from utils.evaluate import reports

    all_results, names = [], []
    for model_arg in args.models:
        path = Path(model_arg)
        name = path.name if path.is_dir() else path.stem
        if args.output:
            output_dir = Path(args.output) / name if len(args.models) > 1 else Path(args.output)
        else:
            output_dir = (path if path.is_dir() else path.parent) / f"eval-{settings['split']}"
        try:
            results = evaluate_one(model_arg, args, settings, output_dir)
        except (FileNotFoundError, ValueError, CoverageError) as error:
            print(f"error: {model_arg}: {error}", file=sys.stderr)
            return 2
        all_results.append(results)
        names.append(name)
        cov = results["coverage"]
        print(f"\n{name} on {cov['evaluated']} of {cov['listed']} listed images, {cov['skipped']} skipped "
              f"(split: {results['split']}):")
        print(reports.comparison_table([results], [name]))
        print(f"details: {output_dir / reports.RESULTS_MD}")
    if len(all_results) > 1:
        target = Path(args.output or ".") / reports.COMPARISON_MD
        reports.write_comparison(target, all_results, names)
        print("\n" + reports.comparison_table(all_results, names))
        print(f"wrote {target} and {target.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
