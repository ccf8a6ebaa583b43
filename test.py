"""Evaluate trained models with bootstrap confidence intervals (the paper's table, honestly).

    python test.py runs/mobilenet_v1-20261125-120000 --data data/radiographs
    python test.py runs/a runs/b runs/c --data data/radiographs --output results/compare
    python test.py --demo                      # after: python training.py --demo
    python test.py runs/mobilenet_v1-cv5-20261201-120000   # a cross-validation (training.py --folds 5)

MODEL is a training run directory (its best.keras) or a .keras file saved by this project; its
embedded preprocessing spec decides how images are read. --data is a prepared dataset (its
--split is used), a CSV of path,label[,group], or a folder per class; raw files are decoded in
worker processes (--decode-pool), so one that hangs or crashes a codec is left out with its
reason. Outputs per model: results.json, results.md, predictions.csv, confusion_matrix.png,
roc_curves.png, error_gallery.png/.csv (the most confident errors, with Grad-CAM for Keras
models; beside the model, or in --output/<model name>), and skipped.csv (file, reason,
message) when a listed file was left out; ood.json/ood.md (the share of real radiographs the model's
out-of-distribution score flags, the auto-routed share with and without it; with --ood-set DIR also
AUROC and the share flagged of images that are not radiographs, as sent and re-tagged DX, per kind,
and ood.csv); with --shift, shifts.json/.csv/.md, shifts.png and shift_examples.png (the split
re-rendered as other sites would send it: macro F1 with patient-level CIs, the drop against clean,
accuracy and auto-routed share at the model's auto threshold, per shift and severity); with several
models, comparison.md/.csv as well. Every
report says how many images were listed, evaluated and skipped (by reason). When more than
--max-skipped-share of the listed files cannot be read (or none can), no result is written: only
skipped.csv, an error naming the counts and reasons, and exit status 2.

A cross-validation directory (training.py --folds K) is evaluated on its pooled out-of-fold
predictions (every labelled image once, by the model that never saw it), with patient-level
bootstrap CIs and the per-fold spread; results go to CV_DIR/eval-cv (--data and --split do not apply).
With --shift, each fold's model also scores its own fold under every shift, pooled the same way (routed
at each fold's own threshold).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from utils import config, constants
from utils.evaluate import shifts
from utils.io.isolation import PoolSettings

FLAGS = ("SPLIT", "BOOTSTRAP_RESAMPLES", "CONFIDENCE_LEVEL", "BOOTSTRAP_UNIT", "SEED", "BATCH_SIZE",
         "DECODE_POOL", "DECODE_WORKERS", "DECODE_TIMEOUT_S", "DECODE_MEMORY_LIMIT_MB",
         "DECODE_THREADS", "TARGET_ACCURACY", "CALIBRATION_BINS", "MAX_SKIPPED_SHARE", "PROJECTION_ONLY")

log = logging.getLogger("test")


def parse_args(argv: list[str] | None = None):
    parser = config.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", metavar="MODEL", help="run directories or .keras files")
    parser.add_argument("--data", default=None, help=f"prepared dataset, CSV or class folders "
                                                     f"(default: the run's training data, else {constants.DATA_DIR})")
    parser.add_argument("--output", default=None, help="where results go (default: beside each model)")
    parser.add_argument("--timing-runs", type=int, default=50,
                        help="batch-1 inference repetitions for the latency figure; 0 skips timing")
    parser.add_argument("--ood-set", default=None, metavar="DIR",
                        help="also score a set of images that are not projection radiographs (a folder written by "
                             "`python -m utils.evaluate.ood_set --output DIR`): AUROC and share flagged by the "
                             "model's out-of-distribution score, as sent and re-tagged DX (default: off)")
    parser.add_argument("--shift", action="append", default=None, metavar="NAME[:SEVERITY]",
                        help="also evaluate the split as another site would render it (repeatable; NAME alone: "
                             "severities 1-3; 'all': every shift at every severity; 'all:1' every shift at "
                             "severity 1): macro F1 with patient-level CIs, its drop against clean, accuracy and "
                             "auto-routed share at the model's auto threshold, into shifts.json/.csv/.md and "
                             "shifts.png. Shifts (levels of severity 1, 2, 3): "
                             + shifts.help_text().replace("%", "%%") + ".")
    parser.add_argument("--demo", action="store_true", help="evaluate runs/demo on the synthetic demo test split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    config.add_flags(parser, FLAGS)
    args = parser.parse_args(argv)
    if not 0 <= args.max_skipped_share <= 1:  # also rejects nan
        parser.error(f"--max-skipped-share must be in [0, 1] (a share of the listed images), "
                     f"got {args.max_skipped_share}")
    PoolSettings.from_args(parser, args)
    try:
        args.shift = shifts.parse(args.shift or [])
    except ValueError as error:
        parser.error(f"--shift: {error}")
    if args.demo:
        args.models = args.models or [str(Path(constants.RUNS_DIR) / "demo")]
        args.data = args.data or str(Path(constants.DEMO_DIR) / "prepared")
        if "--timing-runs" not in config.given_flags(argv):
            args.timing_runs = 10
    if not args.models:
        parser.error("give at least one MODEL (a run directory or .keras file), or --demo")
    if args.ood_set and not (Path(args.ood_set) / "manifest.csv").is_file():
        parser.error(f"--ood-set {args.ood_set}: no manifest.csv there (write a set with "
                     f"python -m utils.evaluate.ood_set --output {args.ood_set})")
    return args


def main(argv: list[str] | None = None) -> int:
    args, settings = config.start(parse_args, argv, FLAGS)
    from utils.artifacts import run_dir
    from utils.evaluate import reports, runner

    all_results, names = [], []
    for model_arg in args.models:
        path = Path(model_arg)
        name = path.name if path.is_dir() else path.stem
        if args.output:
            output_dir = Path(args.output) / name if len(args.models) > 1 else Path(args.output)
        else:
            output_dir = (path if path.is_dir() else path.parent) / f"eval-{settings['split']}"
        cross_validation = run_dir.is_cv_dir(path)
        if cross_validation and not args.output:
            output_dir = path / "eval-cv"
        try:
            if cross_validation:
                if args.ood_set:
                    log.warning("--ood-set applies to one model, not to a cross-validation's pooled predictions: "
                                "evaluate a fold's model (CV_DIR/fold-K) for the OOD report")
                results = runner.evaluate_cv(model_arg, settings, output_dir)
            else:
                results = runner.evaluate_model(model_arg, args.data, settings, output_dir, progress=not args.quiet,
                                                timing_runs=args.timing_runs, ood_set=args.ood_set)
        except (FileNotFoundError, ValueError, runner.CoverageError) as error:
            print(f"error: {model_arg}: {error}", file=sys.stderr)
            return 2
        all_results.append(results)
        names.append(name)
        cov = results["coverage"]
        print(f"\n{name} on {cov['evaluated']} of {cov['listed']} listed images, {cov['skipped']} skipped "
              f"(split: {results['split']}):")
        print(reports.comparison_table([results], [name]))
        if "ood" in results:
            from utils.evaluate import ood_eval

            print(ood_eval.markdown(results["ood"]).rstrip())
        print(f"details: {output_dir / reports.RESULTS_MD}")
        if args.shift:
            from utils.evaluate import shift_eval

            if cross_validation:
                summary = shift_eval.evaluate_cv(model_arg, settings, output_dir, args.shift, progress=not args.quiet)
            else:
                summary = shift_eval.evaluate(model_arg, args.data, settings, output_dir, args.shift,
                                              progress=not args.quiet)
            print(f"\n{name} under site shifts ({summary['n_images']} images):")
            print(shift_eval.table(summary))
            print("\n".join(shift_eval.verdict_lines(summary)))
            print(f"(breaks: macro F1 more than {summary['break_drop']:g} below clean) "
                  f"details: {output_dir / shift_eval.SHIFTS_MD}")
    if len(all_results) > 1:
        target = Path(args.output or ".") / reports.COMPARISON_MD
        reports.write_comparison(target, all_results, names)
        print("\n" + reports.comparison_table(all_results, names))
        print(f"wrote {target} and {target.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
