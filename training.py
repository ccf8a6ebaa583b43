"""Train a body-part classifier on a prepared dataset (the paper's recipe by default).

    python training.py --data data/radiographs --backbone mobilenet_v1 --epochs 30
    python training.py --demo                       # synthetic DICOMs, small model, a few minutes on CPU
    python training.py --resume runs/mobilenet_v1-20261125-120000
    python training.py --resume runs/mobilenet_v1-20261125-120000 --epochs 80   # train longer
    python training.py --data data/radiographs --folds 5           # grouped 5-fold cross-validation
    python training.py --data data/radiographs128 --recipe small-data   # a few hundred labelled images
    python training.py --finetune runs/mobilenet_v1-20261125-120000 --data data/corrections   # on new labels

Defaults come from utils/constants.py: Adam with coupled L2 1e-4, one-cycle lr (max 0.01, 30%
warm-up), gradient value clipping 0.1, batch 32, 50 epochs, seed 42, from scratch. The run
directory holds config.json, log.csv, TensorBoard logs, best.keras (by validation macro-F1),
last.keras (for --resume), training_curves.png.

--resume continues a run with the settings it was started with; only --epochs (to train longer:
the added epochs get a one-cycle schedule of their own), --cache, --xla and --quiet may change,
and any other flag with another value than the run's is refused.

--recipe NAME sets a group of flags at once (listed at the end of this help): "paper" is the
paper's code, "small-data" the cross-validated recipe for a few hundred labelled images; flags
written on the command line win over the recipe.

--folds K trains one run per fold of a K-fold cross-validation grouped by patient and stratified by
label (over every labelled image of the dataset), into CV_DIR/fold-1..K, then pools each fold's
predictions of its held-out images into CV_DIR/oof_predictions.csv; test.py CV_DIR evaluates them.
--resume CV_DIR continues a stopped cross-validation.

--finetune RUN_DIR trains RUN_DIR's best.keras a little further on --data (e.g. the router's
corrections, prepared with `prepare.py --model RUN_DIR`) into a new run: the model's own spec and
classes (a dataset for other classes or pixels is refused, --image-size/--channels/--backbone are
taken from the model), a short schedule with a low learning rate (FINETUNE_EPOCHS,
FINETUNE_MAX_LR; --epochs/--max-lr win), RUN_DIR's other settings, RUN_DIR's validation set
kept (plus --data's val split, if any: a few corrections all in train are fine), some of RUN_DIR's
training images mixed back in (FINETUNE_REHEARSAL per new image), calibration and threshold
refitted; config.json records the parent under "finetune". See docs/TRAINING.md.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from utils import config, constants
from utils.artifacts import run_dir as run_dir_files

FLAGS = ("RECIPE", "BACKBONE", "WEIGHTS", "EPOCHS", "BATCH_SIZE", "MAX_LR", "WARMUP_FRACTION", "LR_START_DIV",
         "LR_FINAL_DIV", "WEIGHT_DECAY", "CLIP_VALUE", "LABEL_SMOOTHING", "CLASS_WEIGHTS", "FREEZE_EPOCHS",
         "DROPOUT", "BN_MOMENTUM", "BN_RECALIBRATION_STEPS", "AUGMENT_ROTATION_DEG", "AUGMENT_BRIGHTNESS", "AUGMENT_CONTRAST",
         "HORIZONTAL_FLIP", "AUGMENT_SCALE", "AUGMENT_TRANSLATE", "AUGMENT_SHEAR_DEG",
         "AUGMENT_GAMMA", "AUGMENT_SHARPNESS", "AUGMENT_NOISE", "AUGMENT_BORDER", "AUGMENT_INVERT",
         "AUGMENT_EQUALISE", "AUGMENT_RESAMPLE", "AUGMENT_JPEG", "CACHE", "SEED",
         "MIXED_PRECISION", "XLA", "FOLDS")

log = logging.getLogger("training")


def parse_args(argv: list[str] | None = None):
    from models import list_models
    from utils.train import recipes

    parser = config.ArgumentParser(description=__doc__, epilog="recipes:\n" + recipes.describe())
    parser.add_argument("--data", default=constants.DATA_DIR, help="a prepared dataset (prepare.py output)")
    parser.add_argument("--output", help=f"run directory (default: {constants.RUNS_DIR}/<backbone>-<time>)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="must equal the prepared dataset's size (default: taken from the dataset)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="1 or 3 input channels (default: the dataset's spec)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a stopped run from its last.keras with its saved settings; --epochs N "
                             "(more than planned) trains longer; other flags may not change")
    parser.add_argument("--finetune", metavar="RUN_DIR",
                        help=f"fine-tune RUN_DIR's model on --data into a new run: its spec and classes, "
                             f"{constants.FINETUNE_EPOCHS} epochs at max lr {constants.FINETUNE_MAX_LR:g} unless "
                             "--epochs/--max-lr, its validation set kept, some of its training images mixed in, "
                             "calibration refitted")
    parser.add_argument("--demo", action="store_true",
                        help=f"generate + prepare the synthetic demo set, train {constants.DEMO_BACKBONE} for "
                             f"{constants.DEMO_EPOCHS} epochs at {constants.DEMO_IMAGE_SIZE}px")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap steps per epoch (smoke tests)")
    parser.add_argument("--quiet", action="store_true", help="no per-batch progress bar")
    config.add_flags(parser, FLAGS, choices={"BACKBONE": list_models(), "RECIPE": recipes.recipe_names()})
    args = parser.parse_args(argv)
    args.given_flags = config.given_flags(argv)  # --resume compares them with the run's settings
    set_by_recipe = recipes.apply(args, args.recipe, args.given_flags)
    if args.folds == 1:
        parser.error("--folds 1 leaves nothing to train on: use 0 (the prepared splits) or at least 2")
    if args.finetune:
        clash = [flag for flag, on in (("--resume", args.resume), ("--demo", args.demo), ("--folds", args.folds),
                                       ("--recipe", "--recipe" in args.given_flags)) if on]
        if clash:
            parser.error(f"--finetune cannot be combined with {', '.join(clash)} (a fine-tune keeps its parent's "
                         "recipe and trains one run; give other flags one by one)")
        if "--data" not in args.given_flags:
            parser.error("--finetune RUN_DIR needs --data DIR: the new labelled images (prepare.py --model RUN_DIR)")
    if args.demo:
        explicit = args.given_flags | set_by_recipe
        if "--backbone" not in explicit:
            args.backbone = constants.DEMO_BACKBONE
        if "--epochs" not in explicit:
            args.epochs = constants.DEMO_EPOCHS
        if "--batch-size" not in explicit:
            args.batch_size = 8  # more steps per epoch: BatchNorm statistics keep up with the weights
        if "--max-lr" not in explicit:
            args.max_lr = 0.003  # tiny synthetic set: the paper's 0.01 is too hot for ~140 images
    return args


def main(argv: list[str] | None = None) -> int:
    args, settings = config.start(parse_args, argv, FLAGS)

    from utils.train import runner

    if args.demo:
        from utils.data.demo import prepare_demo

        print(prepare_demo(progress=not args.quiet).summary())
        args.data = str(Path(constants.DEMO_DIR) / "prepared")
        if not args.output:
            args.output = str(Path(constants.RUNS_DIR) / "demo")
            if not args.resume:
                shutil.rmtree(args.output, ignore_errors=True)  # the demo run is rebuilt every time
    cross_validating = settings["folds"] >= 2 or bool(args.resume and run_dir_files.is_cv_dir(args.resume))
    try:
        if cross_validating:
            from utils.train import cross_validation

            return _report_cv(cross_validation.run(args, settings, runner.train))
        if args.finetune:
            from utils.train import finetune

            run_dir = finetune.finetune(args, settings)
        else:
            run_dir = runner.train(args, settings)
    except (runner.TrainingSetupError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\nrun directory: {run_dir}")
    info = run_dir_files.read_best(run_dir)
    if info is not None:
        print(f"best epoch {info['epoch']}: val_macro_f1 {info.get('val_macro_f1', float('nan')):.4f}, "
              f"val_accuracy {info.get('val_accuracy', float('nan')):.4f}")
    if args.finetune:
        print(f"compare it with its parent on the original test split: python test.py {args.finetune} {run_dir}")
    else:
        print(f"evaluate it with: python test.py {run_dir}" + (" --demo" if args.demo else f" --data {args.data}"))
    return 0


def _report_cv(parent: Path) -> int:
    folds = run_dir_files.read_cv(parent)["folds"]
    print(f"\ncross-validation directory: {parent}")
    for fold in folds:
        f1 = "n/a" if fold["macro_f1"] is None else f"{fold['macro_f1']:.4f}"
        print(f"fold {fold['fold']}: {fold['evaluated']} of {fold['listed']} test images, macro F1 {f1}")
    print(f"pooled out-of-fold predictions: {parent / run_dir_files.OOF_PREDICTIONS}")
    print(f"evaluate them (pooled metrics, patient-level CIs, spread between folds) with: python test.py {parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
