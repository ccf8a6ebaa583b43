"""Evaluate trained models with bootstrap confidence intervals (the paper's table, honestly).

    python test.py runs/mobilenet_v1-20261125-120000 --data data/radiographs
    python test.py runs/a runs/b runs/c --data data/radiographs --output results/compare
    python test.py --demo                      # after: python training.py --demo

MODEL is a training run directory (its best.keras) or a .keras file saved by this project; its
embedded preprocessing spec decides how images are read. --data is a prepared dataset (its
--split is used), a CSV of path,label[,group], or a folder per class; raw files are decoded in
worker processes (--decode-pool), so one that hangs or crashes a codec is left out with its
reason. Outputs per model: results.json, results.md, predictions.csv, confusion_matrix.png,
roc_curves.png (beside the model, or in --output/<model name>); with several models,
comparison.md/.csv as well.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from utils import config, constants
from utils.isolation import PoolSettings

FLAGS = ("SPLIT", "BOOTSTRAP_RESAMPLES", "CONFIDENCE_LEVEL", "BOOTSTRAP_UNIT", "SEED", "BATCH_SIZE",
         "DECODE_POOL", "DECODE_WORKERS", "DECODE_TIMEOUT_S", "DECODE_MEMORY_LIMIT_MB")

log = logging.getLogger("test")


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
    from utils import evaluation, reports
    from utils.artifacts import training_data
    from utils.predictor import load_predictor

    info = load_predictor(model_arg)
    data = args.data or training_data(model_arg) or constants.DATA_DIR
    subset = evaluation.eval_set(data, settings["split"], info.spec)
    log.info("%s (%s): %d images from %s", model_arg, info.model_id, len(subset.files), subset.description)
    probs, kept, errors = evaluation.predict(info, subset.files, cached=subset.cached,
                                             batch_size=settings["batch_size"], progress=not args.quiet,
                                             pool=PoolSettings.from_flags(settings))
    for path, reason in errors + subset.skipped:
        log.warning("left out %s: %s", path, reason)
    if len(kept) == 0:
        raise SystemExit(f"error: no readable image in {data}")
    timing = evaluation.time_inference(info, runs=args.timing_runs) if args.timing_runs else None
    groups = [subset.groups[i] for i in kept] if subset.groups is not None else None
    results = reports.write_evaluation(
        output_dir, y_true=subset.labels[kept], probs=probs, class_names=info.spec.class_names,
        files=[subset.files[i] for i in kept], groups=groups, n_resamples=settings["bootstrap_resamples"],
        confidence=settings["confidence_level"], seed=settings["seed"], unit=settings["bootstrap_unit"],
        model_id=info.model_id, split=subset.split, timing=timing,
        extra={"data": str(data), "source": subset.description, "backbone": info.backbone,
               "left_out": [{"file": f, "reason": r} for f, r in errors + subset.skipped]})
    config.save_config({**settings, "model": model_arg, "data": str(data)}, output_dir / "test_config.json")
    return results


def main(argv: list[str] | None = None) -> int:
    args, settings = config.start(parse_args, argv, FLAGS)
    from utils import reports

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
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {model_arg}: {error}", file=sys.stderr)
            return 2
        all_results.append(results)
        names.append(name)
        print(f"\n{name} on {results['n_images']} images (split: {results['split']}):")
        print(reports.comparison_table([results], [name]))
        print(f"details: {output_dir / 'results.md'}")
    if len(all_results) > 1:
        target = Path(args.output or ".") / "comparison.md"
        reports.write_comparison(target, all_results, names)
        print("\n" + reports.comparison_table(all_results, names))
        print(f"wrote {target} and {target.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
