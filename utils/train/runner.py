"""The training run behind training.py: data, model, phases, callbacks, resume.

Resume rules. A run is continued with the settings it was started with (config.json). On the
command line of ``--resume`` only these may differ: ``--epochs``, to train longer (the added
epochs are a new phase with a one-cycle schedule of their own, since a finished cycle has
annealed its learning rate to the floor), and what changes nothing in the result
(``RESUME_MAY_CHANGE``). Any other flag given with a value other than the run's is refused with
the list of differences. The number of finished epochs comes from one place: the epoch recorded
inside last.keras (the best score so far: inside best.keras), never from log.csv; rows of
log.csv past that epoch (a kill between the two writes) are dropped before training again.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import pandas as pd
import tensorflow as tf

from models.weights import SCRATCH, parse_weights
from utils import config
from utils.artifacts import run_dir as R
from utils.artifacts.model_file import load_model, read_model_info
from utils.data import files as dataset_files
from utils.data.dataset import Augmentation, load_split
from utils.data.split import Fold
from utils.evaluate.calibration import calibrate_after_training
from utils.preprocessing import PreprocessSpec
from utils.train import components as T

log = logging.getLogger(__name__)
LOG_CSV = R.LOG
# Settings a --resume may change: they change how fast or how verbosely, not what is learnt.
RESUME_MAY_CHANGE = ("epochs", "cache", "xla", "quiet")


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


def run_fold(settings: dict[str, Any]) -> Fold | None:
    """The cross-validation fold a run trains on (settings "fold", "folds", "seed"), or None."""
    if settings.get("fold") is None:
        return None
    return Fold(int(settings["fold"]), int(settings["folds"]), int(settings["seed"]))


def phases_to_json(phases: list[Phase]) -> list[list]:
    return [[p.start, p.end, p.frozen] for p in phases]


def phases_from_json(value: list[list]) -> list[Phase]:
    return [Phase(int(start), int(end), bool(frozen)) for start, end, frozen in value]


def dataset_spec(data_dir: str, args, settings: dict[str, Any]) -> PreprocessSpec:
    if not dataset_files.is_prepared(data_dir):
        raise TrainingSetupError(f"{data_dir} is not a prepared dataset (no {dataset_files.LABELS} or "
                                 f"{dataset_files.SPEC}): run prepare.py first")
    spec = dataset_files.read_spec(data_dir)
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
        if (run_dir / R.LAST_MODEL).exists() and not args.resume:
            raise TrainingSetupError(f"{run_dir} already holds a run; use --resume {run_dir} or another --output")
    else:
        run_dir = R.default_dir(args.backbone)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _resume_state(run_dir: Path) -> tuple[int, float]:
    """(epochs finished, best val_macro_f1 so far) as the checkpoints themselves record them."""
    extra = read_model_info(run_dir / R.LAST_MODEL).extra
    if "epoch" not in extra:
        raise TrainingSetupError(f"{run_dir / R.LAST_MODEL} does not record its epoch: it was not written "
                                 "by training.py, and the run cannot be resumed")
    best = -math.inf
    if (run_dir / R.BEST_MODEL).is_file():
        best = float(read_model_info(run_dir / R.BEST_MODEL).extra.get(R.MONITOR, -math.inf))
    return int(extra["epoch"]), best


def _trim_log(run_dir: Path, done: int) -> None:
    """Drop log.csv rows of epochs past ``done`` (they are trained again); warn about missing ones."""
    csv = run_dir / LOG_CSV
    if not csv.is_file():
        return
    frame = pd.read_csv(csv)
    if "epoch" not in frame:
        return
    kept = frame[frame["epoch"] < done]
    if len(kept) < len(frame):
        log.info("%s: dropping %d row(s) of epochs after %d, which are trained again", csv, len(frame) - len(kept),
                 done)
        dataset_files.write_csv(kept, csv)
    missing = sorted(set(range(done)) - set(kept["epoch"].astype(int)))
    if missing:
        log.warning("%s has no row for epoch(s) %s (stopped between the checkpoint and the log)", csv,
                    [m + 1 for m in missing])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def _asked(args, settings: dict[str, Any]) -> dict[str, Any]:
    """What this command line asks for, by config key, for the flags actually written on it."""
    asked = {}
    for flag in getattr(args, "given_flags", set()):
        key = flag[2:].replace("-", "_")
        if key in ("resume", "demo", "output"):
            continue
        if key.startswith("no_") and key[3:] in settings:  # --no-cache
            key = key[3:]
        value = getattr(args, key) if hasattr(args, key) else settings.get(key)
        if key == "data" and value is not None:
            value = os.path.abspath(value)
        asked[key] = value
    return asked


def check_resume_flags(args, settings: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse a --resume whose flags would change what the run learns (see the module docstring)."""
    if args.output and Path(args.output).resolve() != Path(args.resume).resolve():
        raise TrainingSetupError(f"--output {args.output} differs from --resume {args.resume}: a resumed run "
                                 "stays in its own directory")
    recorded = {**saved, "data": os.path.abspath(saved["data"])}
    differences = []
    for key, value in _asked(args, settings).items():
        if key in RESUME_MAY_CHANGE or key not in recorded or value is None:
            continue
        if not _same(value, recorded[key]):
            differences.append(f"--{key.replace('_', '-')} {value} (the run has {recorded[key]})")
    if differences:
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in RESUME_MAY_CHANGE)
        raise TrainingSetupError(
            f"--resume continues {args.resume} with the settings it was started with; these flags ask for "
            f"others: {'; '.join(differences)}. Only {allowed} may change on resume (--epochs to train longer). "
            "Start a new run (another --output) for other settings.")
    epochs = _asked(args, settings).get("epochs", saved["epochs"])
    if epochs < saved["epochs"]:
        raise TrainingSetupError(
            f"--epochs {epochs} is fewer than the {saved['epochs']} epochs {args.resume} was planned for: its "
            "one-cycle schedule cannot be cut short. Evaluate its best.keras or last.keras as it is.")


def _load_resume(args, settings: dict[str, Any]) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(run directory, the settings to continue with, config.json payload); refuses what cannot be."""
    run_dir = Path(args.resume)
    if not (run_dir / R.LAST_MODEL).is_file() or not (run_dir / R.CONFIG).is_file():
        raise TrainingSetupError(f"{run_dir}: nothing to resume (needs {R.LAST_MODEL} and {R.CONFIG})")
    payload = R.read_config(run_dir)
    if payload.get("finetune"):
        raise TrainingSetupError(f"{run_dir} is a fine-tune of {payload['finetune'].get('parent')}, which is not "
                                 "resumed: run training.py --finetune again (it is short)")
    saved = payload["config"]
    saved.setdefault("max_steps_per_epoch", None)
    if "phases" not in saved:  # a run started before phases were recorded
        pretrained = parse_weights(saved["weights"])[0] != SCRATCH
        saved["phases"] = phases_to_json(plan_phases(saved["epochs"], saved["freeze_epochs"], pretrained))
    check_resume_flags(args, settings, saved)
    resumed = dict(saved)
    asked = _asked(args, settings)
    resumed.update({key: asked[key] for key in RESUME_MAY_CHANGE if key in asked and key in resumed})
    if resumed["epochs"] > saved["epochs"]:  # train longer: the added epochs are a phase of their own
        resumed["phases"] = saved["phases"] + [[saved["epochs"], resumed["epochs"], False]]
    return run_dir, resumed, payload


def _record_resume(run_dir: Path, payload: dict[str, Any], settings: dict[str, Any], done: int) -> None:
    payload = {**payload, "config": config.to_jsonable(settings)}
    payload.setdefault("resumes", []).append({
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": list(sys.argv),
        "after_epoch": done, "epochs": settings["epochs"]})
    R.write_config(run_dir, payload)


def train(args, settings: dict[str, Any]) -> Path:
    resume_payload = None
    if args.resume:
        run_dir, settings, resume_payload = _load_resume(args, settings)
        data_dir = settings["data"]
        args.backbone = settings["backbone"]
        args.max_steps_per_epoch = settings["max_steps_per_epoch"]
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
        phases = plan_phases(settings["epochs"], settings["freeze_epochs"], pretrained)
        settings = {**settings, "data": str(data_dir), "image_size": spec.image_size, "channels": spec.channels,
                    "max_steps_per_epoch": args.max_steps_per_epoch, "phases": phases_to_json(phases)}
        config.save_config(settings, run_dir / R.CONFIG, spec=spec.to_dict())
    T.seed_everything(settings["seed"])
    # The mixed-precision policy is process-wide in Keras: set for this run only, restored after it.
    with T.precision_policy(settings["mixed_precision"]) as mixed:
        log.info("device: %s; mixed precision %s; %d replica(s)", config.device_name(), "on" if mixed else "off",
                 strategy.num_replicas_in_sync)

        batch = settings["batch_size"] * strategy.num_replicas_in_sync
        aug = Augmentation.from_settings(settings)
        fold = run_fold(settings)
        train_ds, train_rows = load_split(data_dir, "train", spec, training=True, batch_size=batch, augmentation=aug,
                                          cache=settings["cache"], seed=settings["seed"], fold=fold)
        val_ds, val_rows = load_split(data_dir, "val", spec, training=False, batch_size=batch, cache=settings["cache"],
                                      fold=fold)
        steps = math.ceil(len(train_rows) / batch)
        if args.max_steps_per_epoch:
            steps = min(steps, args.max_steps_per_epoch)
            train_ds = train_ds.repeat()
        log.info("data %s: %d train / %d val images, %d steps per epoch, %dx%dx%d input", data_dir, len(train_rows),
                 len(val_rows), steps, *spec.input_shape)
        weights = T.class_weights(train_rows["y"], spec.num_classes) if settings["class_weights"] else None

        phases = phases_from_json(settings["phases"])
        done, best = _resume_state(run_dir) if resume_payload is not None else (0, -math.inf)
        if done >= settings["epochs"]:
            log.info("%s already finished %d epochs (train longer with --resume %s --epochs N)", run_dir, done,
                     run_dir)
            return run_dir

        model = None
        started = time.monotonic()
        with strategy.scope():
            if resume_payload is not None:
                _trim_log(run_dir, done)
                _record_resume(run_dir, resume_payload, settings, done)
                model, _ = load_model(run_dir / R.LAST_MODEL, compile=True)
                log.info("resuming %s after epoch %d of %d (best %s %.4f)", run_dir, done, settings["epochs"],
                         R.MONITOR, best)
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
                stats_ds, _ = load_split(data_dir, "train", spec, training=False, batch_size=batch,
                                         cache=settings["cache"], fold=fold)
                callbacks.insert(0, T.RecalibrateBatchNorm(stats_ds.repeat(), settings["bn_recalibration_steps"]))
            start = max(done, phase.start)
            log.info("epochs %d-%d%s", start + 1, phase.end, " (backbone frozen)" if phase.frozen else "")
            model.fit(train_ds, validation_data=val_ds, epochs=phase.end, initial_epoch=start, steps_per_epoch=steps,
                      class_weight=weights, callbacks=callbacks, verbose=2 if args.quiet else 1,
                      shuffle=False)  # the tf.data pipeline shuffles
            best = next(c for c in callbacks if isinstance(c, T.Checkpoints)).best
            done = phase.end
        # temperature, threshold and the out-of-distribution detector into best.keras
        calibrate_after_training(run_dir, data_dir, val_rows, train_rows=train_rows)
        _add_train_seconds(run_dir, time.monotonic() - started)
        return run_dir


def _add_train_seconds(run_dir: Path, seconds: float) -> None:
    """config.json ``train_seconds``: the wall-clock seconds spent training and calibrating this run,
    summed over every resume (what a recipe costs; the machine is in ``environment``)."""
    payload = R.read_config(run_dir)
    payload["train_seconds"] = round(float(payload.get("train_seconds", 0.0)) + seconds, 1)
    R.write_config(run_dir, payload)


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
