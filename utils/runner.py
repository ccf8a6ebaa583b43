"""The training run behind training.py: data, model, phases, callbacks, resume."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import pandas as pd
import tensorflow as tf

from utils import config, constants
from utils.artifacts import LAST_MODEL, load_model
from utils.dataset import Augmentation, load_split
from models.weights import SCRATCH, parse_weights
from utils.preprocessing import PreprocessSpec
from utils import training as T

log = logging.getLogger(__name__)
LOG_CSV = "log.csv"


class TrainingSetupError(ValueError):
    """The data, flags or run directory do not fit together."""


@dataclass(frozen=True)
class Phase:
    """Epochs [start, end) trained with the backbone frozen or not, each with a fresh one-cycle."""

    start: int
    end: int
    frozen: bool


def plan_phases(epochs: int, freeze_epochs: int, pretrained: bool) -> list[Phase]:
    if pretrained and 0 < freeze_epochs < epochs:
        return [Phase(0, freeze_epochs, True), Phase(freeze_epochs, epochs, False)]
    return [Phase(0, epochs, False)]


def dataset_spec(data_dir: str, args, settings: dict[str, Any]) -> PreprocessSpec:
    spec_path = Path(data_dir) / "preprocess.json"
    if not spec_path.is_file():
        raise TrainingSetupError(f"{data_dir} is not a prepared dataset (no preprocess.json): run prepare.py first")
    spec = PreprocessSpec.load(spec_path)
    if args.image_size is not None and args.image_size != spec.image_size:
        raise TrainingSetupError(
            f"--image-size {args.image_size} but {data_dir} was prepared at {spec.image_size}px. Prepare it "
            f"at that size: python prepare.py --input SRC --output OTHER_DIR --image-size {args.image_size}")
    if args.channels is not None:
        spec = spec.replace(channels=args.channels)
    return spec


def new_run_dir(args) -> Path:
    if args.output:
        run_dir = Path(args.output)
        if (run_dir / LAST_MODEL).exists() and not args.resume:
            raise TrainingSetupError(f"{run_dir} already holds a run; use --resume {run_dir} or another --output")
    else:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(constants.RUNS_DIR) / f"{args.backbone}-{stamp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _resume_state(run_dir: Path) -> tuple[int, float]:
    """(epochs completed, best val_macro_f1 so far) from the run's CSV log."""
    csv = run_dir / LOG_CSV
    if not csv.is_file():
        return 0, -math.inf
    frame = pd.read_csv(csv)
    if frame.empty:
        return 0, -math.inf
    best = float(frame["val_macro_f1"].max()) if "val_macro_f1" in frame else -math.inf
    return int(frame["epoch"].max()) + 1, best


def _load_resume(args) -> tuple[Path, dict[str, Any], Any]:
    run_dir = Path(args.resume)
    saved = run_dir / "config.json"
    if not (run_dir / LAST_MODEL).is_file() or not saved.is_file():
        raise TrainingSetupError(f"{run_dir}: nothing to resume (needs {LAST_MODEL} and config.json)")
    payload = json.loads(saved.read_text())
    return run_dir, payload["config"], payload


def train(args, settings: dict[str, Any]) -> Path:
    resume_payload = None
    if args.resume:
        run_dir, settings, resume_payload = _load_resume(args)
        data_dir = settings["data"]
        args.backbone = settings["backbone"]
    else:
        data_dir = args.data
    spec = dataset_spec(data_dir, args, settings) if resume_payload is None else \
        PreprocessSpec.from_dict(resume_payload["spec"])
    try:  # everything that can refuse the run does so before a run directory exists
        pretrained = parse_weights(settings["weights"])[0] != SCRATCH
        strategy = T.select_strategy()
    except (ValueError, FileNotFoundError, T.MultiWorkerUnsupported) as error:
        raise TrainingSetupError(str(error)) from error
    if resume_payload is None:
        run_dir = new_run_dir(args)
        settings = {**settings, "data": str(data_dir), "image_size": spec.image_size, "channels": spec.channels}
        config.save_config(settings, run_dir / "config.json", spec=spec.to_dict())
    T.seed_everything(settings["seed"])
    mixed = T.configure_precision(settings["mixed_precision"])
    log.info("device: %s; mixed precision %s; %d replica(s)", T.device_name(), "on" if mixed else "off",
             strategy.num_replicas_in_sync)

    batch = settings["batch_size"] * strategy.num_replicas_in_sync
    aug = Augmentation(settings["augment_rotation_deg"], settings["augment_brightness"],
                       settings["augment_contrast"], settings["horizontal_flip"])
    train_ds, train_rows = load_split(data_dir, "train", spec, training=True, batch_size=batch, augmentation=aug,
                                      cache=settings["cache"], seed=settings["seed"])
    val_ds, val_rows = load_split(data_dir, "val", spec, training=False, batch_size=batch, cache=settings["cache"])
    steps = math.ceil(len(train_rows) / batch)
    if args.max_steps_per_epoch:
        steps = min(steps, args.max_steps_per_epoch)
        train_ds = train_ds.repeat()
    log.info("data %s: %d train / %d val images, %d steps per epoch, %dx%dx%d input", data_dir, len(train_rows),
             len(val_rows), steps, *spec.input_shape)
    weights = T.class_weights(train_rows["y"], spec.num_classes) if settings["class_weights"] else None

    phases = plan_phases(settings["epochs"], settings["freeze_epochs"], pretrained)
    done, best = _resume_state(run_dir) if resume_payload is not None else (0, -math.inf)
    if done >= settings["epochs"]:
        log.info("%s already finished %d epochs", run_dir, done)
        return run_dir

    model = None
    with strategy.scope():
        if resume_payload is not None:
            model, _ = load_model(run_dir / LAST_MODEL, compile=True)
            log.info("resuming %s after epoch %d (best val_macro_f1 %.4f)", run_dir, done, best)
    for phase in phases:
        if phase.end <= done:
            continue
        with strategy.scope():
            if model is None:
                model = _build(settings, spec)
            resumed_here = resume_payload is not None and phase.start < done
            if not resumed_here:
                _set_frozen(model, phase.frozen)
                _compile(model, settings, spec, steps * (phase.end - phase.start))
        callbacks = _callbacks(run_dir, spec, settings["backbone"], best)
        if settings.get("bn_recalibration_steps"):
            stats_ds, _ = load_split(data_dir, "train", spec, training=False, batch_size=batch, cache=settings["cache"])
            callbacks.insert(0, T.RecalibrateBatchNorm(stats_ds.repeat(), settings["bn_recalibration_steps"]))
        start = max(done, phase.start)
        log.info("epochs %d-%d%s", start + 1, phase.end, " (backbone frozen)" if phase.frozen else "")
        model.fit(train_ds, validation_data=val_ds, epochs=phase.end, initial_epoch=start, steps_per_epoch=steps,
                  class_weight=weights, callbacks=callbacks, verbose=2 if args.quiet else 1,
                  shuffle=False)  # the tf.data pipeline shuffles
        best = next(c for c in callbacks if isinstance(c, T.Checkpoints)).best
        done = phase.end
    return run_dir


def _build(settings: dict[str, Any], spec: PreprocessSpec):
    from models import build_model

    try:
        return build_model(settings["backbone"], spec.num_classes, spec.input_shape, settings["weights"],
                           dropout=settings["dropout"], bn_momentum=settings["bn_momentum"])
    except (ValueError, RuntimeError, OSError) as error:
        raise TrainingSetupError(str(error)) from error


def _set_frozen(model, frozen: bool) -> None:
    try:
        model.get_layer("backbone").trainable = not frozen
    except ValueError:
        if frozen:
            raise TrainingSetupError("this model has no layer named 'backbone' to freeze")


def _compile(model, settings: dict[str, Any], spec: PreprocessSpec, total_steps: int) -> None:
    optimizer = T.make_optimizer(max_lr=settings["max_lr"], total_steps=max(total_steps, 2),
                                 warmup_fraction=settings["warmup_fraction"], start_div=settings["lr_start_div"],
                                 final_div=settings["lr_final_div"], weight_decay=settings["weight_decay"],
                                 clip_value=settings["clip_value"])
    if settings["label_smoothing"]:
        num_classes = spec.num_classes
        smoothing = settings["label_smoothing"]

        def loss(y_true, logits):
            one_hot = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), num_classes)
            return keras.losses.categorical_crossentropy(one_hot, logits, from_logits=True,
                                                         label_smoothing=smoothing)
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss,
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"), T.MacroF1(spec.num_classes)],
                  jit_compile=bool(settings["xla"]))


def _callbacks(run_dir: Path, spec: PreprocessSpec, backbone: str, best: float) -> list:
    csv_path = run_dir / LOG_CSV
    return [
        T.LearningRateLogger(),
        T.Checkpoints(run_dir, spec, backbone, best=best),
        keras.callbacks.CSVLogger(str(csv_path), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False, profile_batch=0),
        T.PlotCurves(csv_path, run_dir / "training_curves.png"),
        keras.callbacks.TerminateOnNaN(),
    ]
