"""training.py --finetune RUN_DIR --data DIR: a trained run's model, trained a little further on new labels.

Made for the router's corrections (a few to a few hundred images an operator labelled), it keeps what
the parent run decided and changes only what must change:

* **the model** is the parent's ``best.keras`` (architecture, weights, preprocessing spec, class
  names); a dataset prepared for other classes or other pixels is refused (``prepare.py --model
  RUN_DIR`` prepares one that fits), and so are ``--image-size`` / ``--channels`` / ``--backbone``
  values other than the model's;
* **the schedule** is short with a low learning rate (``FINETUNE_EPOCHS``, ``FINETUNE_MAX_LR``;
  ``--epochs`` and ``--max-lr`` win), every other training setting is the parent's unless given on
  the command line; BatchNorm layers keep the parent's statistics (``FINETUNE_FREEZE_BATCHNORM``);
* **validation** is the parent's validation set (every source it was validated on, recursively
  through earlier fine-tunes) plus the new data's ``val`` split. New data without one (corrections
  all in ``train``) gives ``FINETUNE_HOLDOUT`` of its patients to validation once it has
  ``FINETUNE_HOLDOUT_MIN_PATIENTS`` (grouped, stratified): the best epoch, temperature and threshold
  then see the new site too, not only the images the deployed model was judged on. Fewer
  corrections all train, and those choices rest on the parent's validation set alone (which still
  keeps the model from forgetting it unnoticed);
* **rehearsal**: up to ``FINETUNE_REHEARSAL`` of the parent's training images per new training image,
  drawn stratified by class with the seed, are mixed back into training (logged; when the parent's
  data is gone the log says that training is on the new images alone);
* **calibration**: temperature and threshold are refitted at the end exactly as after any training
  (``calibrate_after_training``), on that validation set; the out-of-distribution detector on every
  training image of the lineage plus the new ones (not only the rehearsal sample: a detector fitted
  on a few dozen images calls most of the parent's world unfamiliar, and one fitted on the new site
  alone calls everything else unfamiliar).

The new run directory records its lineage in config.json under ``finetune`` (parent run, parent model
id, new data, every source, counts) and in best.keras's metadata (``extra.finetuned_from``).
config.json's ``data`` stays the lineage's original dataset, so ``test.py RUN`` and ``export.py``
find its test split and calibration images as for the parent. A fine-tune is not resumed: run it again.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils import config, constants
from utils.artifacts import run_dir as R
from utils.artifacts.model_file import ModelMetadata, read_metadata, resolve_model_path, write_metadata
from utils.data import files as dataset_files
from utils.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

KEY = "finetune"  # config.json's entry of a fine-tuned run
# Flags that would change what the parent's model is: refused unless equal to the model's.
_MODEL_FLAGS = ("image_size", "channels", "backbone")
# Settings that do not apply to a fine-tune (or are set by it).
_NOT_INHERITED = {"data", "image_size", "channels", "max_steps_per_epoch", "phases", "weights", "folds", "recipe",
                  "epochs", "max_lr", "freeze_epochs", "cache", "xla", "mixed_precision"}


class FinetuneError(ValueError):
    """The parent run, the data or the flags do not fit a fine-tune."""


@dataclass(frozen=True)
class Parent:
    """The run a fine-tune starts from."""

    run_dir: Path
    model_path: Path
    metadata: ModelMetadata
    settings: dict[str, Any]  # its config.json "config" ({} when it has none)
    sources: tuple[str, ...]  # the prepared datasets it was trained and validated on (its lineage's too)

    @property
    def spec(self) -> PreprocessSpec:
        return self.metadata.spec


def read_parent(path: str | os.PathLike) -> Parent:
    """The parent of ``--finetune PATH`` (a run directory, or a .keras file inside one)."""
    try:
        model_path = resolve_model_path(path)
        metadata = read_metadata(model_path)
    except (OSError, ValueError) as error:
        raise FinetuneError(f"--finetune {path}: {error}") from error
    if metadata.format not in (None, "keras") or model_path.suffix != ".keras":
        raise FinetuneError(f"--finetune {path}: needs a run directory or its .keras model, not {model_path.name}")
    run_dir = model_path.parent
    payload: dict[str, Any] = {}
    if (run_dir / R.CONFIG).is_file():
        try:
            payload = R.read_config(run_dir)
        except (OSError, ValueError) as error:
            raise FinetuneError(f"--finetune {path}: unreadable {R.CONFIG} ({error})") from error
    settings = dict(payload.get("config") or {})
    lineage = payload.get(KEY) or {}
    if lineage.get("sources"):
        sources = tuple(str(s) for s in lineage["sources"])
    else:
        sources = (str(settings["data"]),) if settings.get("data") else ()
    return Parent(run_dir, model_path, metadata, settings, sources)


def check_flags(args, parent: Parent) -> None:
    """Refuse flags that ask for another model than the parent's (module docstring)."""
    given = getattr(args, "given_flags", set())
    model_values = {"image_size": parent.spec.image_size, "channels": parent.spec.channels,
                    "backbone": parent.metadata.backbone or parent.settings.get("backbone")}
    conflicts = []
    for key in _MODEL_FLAGS:
        flag = "--" + key.replace("_", "-")
        value = getattr(args, key, None)
        if flag in given and value is not None and model_values[key] is not None and value != model_values[key]:
            conflicts.append(f"{flag} {value} (the model has {model_values[key]})")
    if "--weights" in given:
        conflicts.append(f"--weights {args.weights} (a fine-tune starts from {parent.model_path})")
    if conflicts:
        raise FinetuneError(f"--finetune {parent.run_dir} trains that run's model as it is; these flags ask for "
                            f"another: {'; '.join(conflicts)}. Leave them out (they are taken from the model).")


def check_data(data_dir: str | os.PathLike, parent: Parent) -> PreprocessSpec:
    """The new dataset's spec, refused unless it was prepared for the parent's classes and pixels."""
    if not dataset_files.is_prepared(data_dir):
        raise FinetuneError(f"{data_dir} is not a prepared dataset: prepare it as the model reads images with "
                            f"python prepare.py --input SRC --output {data_dir} --model {parent.run_dir}")
    spec = dataset_files.read_spec(data_dir)
    redo = f"prepare it again with: python prepare.py --input SRC --output OTHER_DIR --model {parent.run_dir}"
    if set(spec.class_names) != set(parent.spec.class_names):
        raise FinetuneError(f"{data_dir} was prepared for the classes {list(spec.class_names)} but the model of "
                            f"{parent.run_dir} has {list(parent.spec.class_names)}: a fine-tune keeps the model's "
                            f"classes. If the labels are right, {redo}")
    if not spec.same_pixels(parent.spec):
        raise FinetuneError(f"{data_dir} was prepared with {spec.pixel_fields()} but the model of {parent.run_dir} "
                            f"reads images with {parent.spec.pixel_fields()}: {redo}")
    return parent.spec


def finetune_settings(args, settings: dict[str, Any], parent: Parent) -> dict[str, Any]:
    """The parent's settings, with the fine-tune's schedule, and what the command line says on top."""
    given = getattr(args, "given_flags", set())
    merged = dict(settings)
    for key, value in parent.settings.items():
        if key in merged and key not in _NOT_INHERITED and f"--{key.replace('_', '-')}" not in given \
                and f"--no-{key.replace('_', '-')}" not in given:
            merged[key] = value
    if "--epochs" not in given:
        merged["epochs"] = constants.FINETUNE_EPOCHS
    if "--max-lr" not in given:
        merged["max_lr"] = constants.FINETUNE_MAX_LR
    if "--freeze-epochs" not in given:
        merged["freeze_epochs"] = 0
    merged.update(backbone=parent.metadata.backbone or parent.settings.get("backbone", settings["backbone"]),
                  weights=str(parent.model_path), folds=0, recipe="none")
    if constants.FINETUNE_FREEZE_BATCHNORM:
        merged["bn_recalibration_steps"] = 0  # frozen BatchNorm: nothing to recalibrate
    config.validate(merged)
    return merged


def _rows(data_dir: str, split: str, spec: PreprocessSpec) -> pd.DataFrame:
    from utils.data.dataset import split_frame

    frame = split_frame(data_dir, split, spec.class_names)
    return frame.assign(source=str(data_dir))


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def rehearsal_sample(frame: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    """Up to ``count`` rows of ``frame``, stratified by label (each class in proportion, at least one of
    each class while ``count`` allows), seeded."""
    if count >= len(frame):
        return frame
    if count <= 0 or frame.empty:
        return frame.iloc[:0]
    rng = np.random.default_rng(seed)
    sizes = frame["label"].value_counts()
    exact = {label: size * count / len(frame) for label, size in sizes.items()}
    quota = {label: max(1, int(math.floor(value))) for label, value in exact.items()}
    for label in sorted(exact, key=lambda k: exact[k] - math.floor(exact[k]), reverse=True):
        if sum(quota.values()) >= count:
            break
        if quota[label] < sizes[label]:  # largest remainders first
            quota[label] += 1
    while sum(quota.values()) > count:  # the minimum of one each overshot: trim the largest
        largest = max(quota, key=quota.get)
        quota[largest] -= 1
    picked = []
    for label, n in quota.items():
        indices = np.flatnonzero(frame["label"].to_numpy() == label)
        picked.extend(rng.choice(indices, size=min(n, len(indices)), replace=False).tolist())
    return frame.iloc[sorted(picked)]


def hold_out(frame: pd.DataFrame, share: float, min_patients: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows, validation rows) of new data that came without a val split: ``share`` of its
    patients (whole groups, stratified by label, seeded) for validation once it has ``min_patients``
    patients or more; below that, or with ``share`` 0, every row trains."""
    from utils.data.split import distribute_groups

    groups = frame["group"].astype(str) if "group" in frame else frame["path"].astype(str)
    if share <= 0:
        return frame, frame.iloc[:0]
    if groups.nunique() < min_patients:
        log.warning("only %d patient(s) of new data and no val split: all train, and the best epoch, the threshold and "
                    "the out-of-distribution threshold are judged without any image of the new site. Measured on a "
                    "held-out source (docs/TRAINING.md), 10 corrections left a third of its images routed with a "
                    "wrong label; collect corrections of %d patients or more before deploying a fine-tune for a new "
                    "site", groups.nunique(), min_patients)
        return frame, frame.iloc[:0]
    parts = distribute_groups(frame["label"].tolist(), groups.tolist(), (1.0 - share, share), seed,
                              balance_ties=True)
    held = groups.map(parts).to_numpy() == 1
    log.info("the new data has no val split: %d of its %d images (%d of %d patients) held out to validate and "
             "calibrate on (FINETUNE_HOLDOUT %g)", int(held.sum()), len(frame), groups[held].nunique(),
             groups.nunique(), share)
    return frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)


def gather(data_dir: str, parent: Parent, spec: PreprocessSpec, seed: int,
           rehearsal: float = constants.FINETUNE_REHEARSAL, holdout: float = constants.FINETUNE_HOLDOUT,
           holdout_min: int = constants.FINETUNE_HOLDOUT_MIN_PATIENTS
           ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(training rows, validation rows, rows the out-of-distribution detector is fitted on, what was
    used) of a fine-tune (module docstring). The detector learns every training image of the lineage
    with the new ones, not the small rehearsal sample: what it calls "like the training data" must
    stay the parent's whole training set plus the new site."""
    new_train = _rows(data_dir, "train", spec)
    new_val = _rows(data_dir, "val", spec)
    held_out = 0
    if new_val.empty:
        new_train, new_val = hold_out(new_train, holdout, holdout_min, seed)
        held_out = len(new_val)
    sources = [s for s in parent.sources if not _same_dir(s, data_dir)]
    present = [s for s in sources if dataset_files.is_prepared(s)]
    missing = [s for s in sources if s not in present]
    for source in missing:
        log.warning("the parent's dataset %s is gone: its validation and rehearsal images are left out", source)
    old_val = pd.concat([_rows(s, "val", spec) for s in present]) if present else new_val.iloc[:0]
    old_train = pd.concat([_rows(s, "train", spec) for s in present]) if present else new_train.iloc[:0]
    if new_train.empty:
        raise FinetuneError(f"{data_dir} has no training images (split 'train' is empty): nothing to fine-tune on")
    wanted = int(round(rehearsal * len(new_train))) if rehearsal > 0 else 0
    replayed = rehearsal_sample(old_train.reset_index(drop=True), wanted, seed)
    if rehearsal <= 0:
        log.info("rehearsal off (FINETUNE_REHEARSAL 0): training on the %d new images alone", len(new_train))
    elif old_train.empty:
        log.warning("no rehearsal: the parent's training images are not available (%s); training on the %d new "
                    "images alone, which may make the model forget", ", ".join(sources) or "no dataset recorded",
                    len(new_train))
    else:
        log.info("rehearsal: %d of the parent's %d training images mixed in with the %d new ones", len(replayed),
                 len(old_train), len(new_train))
    train = pd.concat([new_train, replayed]).reset_index(drop=True)
    val = pd.concat([old_val, new_val]).reset_index(drop=True)
    if "SOPInstanceUID" in val and "SOPInstanceUID" in train:  # an image trained on judges nothing
        uids = set(train["SOPInstanceUID"].astype(str)) - {""}
        leaked = val["SOPInstanceUID"].astype(str).isin(uids)
        if leaked.any():
            log.warning("%d validation image(s) are also training images (same SOP Instance UID): left out of "
                        "validation", int(leaked.sum()))
            val = val[~leaked].reset_index(drop=True)
    if val.empty:
        raise FinetuneError(
            f"no validation images: {data_dir} has no 'val' split and the parent's validation set is not available "
            f"({', '.join(sources) or 'its run records no dataset'}). Keep the parent's prepared dataset where its "
            f"config.json says, or prepare the new data with enough patients for a validation split.")
    ood = pd.concat([new_train, old_train]).reset_index(drop=True)
    used = {"new_train": len(new_train), "new_val": len(new_val), "new_held_out": held_out,
            "rehearsal_images": len(replayed), "parent_train_available": len(old_train),
            "parent_val": len(old_val), "val": len(val), "ood_fit": len(ood), "missing_sources": missing}
    return train, val, ood, used


def freeze_batchnorm(model) -> int:
    """Put every BatchNormalization layer (nested ones included) in inference mode; returns how many."""
    import keras

    count = 0
    stack = [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            count += 1
        stack.extend(getattr(layer, "layers", []) or [])
    return count


def finetune(args, settings: dict[str, Any]) -> Path:
    """Fine-tune ``args.finetune``'s model on ``args.data`` into a new run directory; returns it."""
    from utils.artifacts.model_file import load_model
    from utils.data.dataset import Augmentation, build_dataset
    from utils.evaluate.calibration import calibrate_after_training
    from utils.train import components as T
    from utils.train import runner

    parent = read_parent(args.finetune)
    check_flags(args, parent)
    data_dir = str(args.data)
    spec = check_data(data_dir, parent)
    settings = finetune_settings(args, settings, parent)
    train_rows, val_rows, ood_rows, used = gather(data_dir, parent, spec, settings["seed"])
    try:
        strategy = T.select_strategy()
    except (ValueError, T.MultiWorkerUnsupported) as error:
        raise FinetuneError(str(error)) from error
    if not args.output:
        args.output = str(R.default_dir(f"{settings['backbone']}-finetune"))
    args.backbone = settings["backbone"]
    run_dir = runner.new_run_dir(args)
    root = parent.settings.get("data") if parent.sources else None
    phases = runner.plan_phases(settings["epochs"], settings["freeze_epochs"], pretrained=True)
    settings = {**settings, "data": str(root or data_dir), "image_size": spec.image_size, "channels": spec.channels,
                "max_steps_per_epoch": args.max_steps_per_epoch, "phases": runner.phases_to_json(phases)}
    lineage = {"parent": str(parent.run_dir), "parent_model": str(parent.model_path),
               "parent_model_id": parent.metadata.model_id, "data": data_dir,
               "sources": [*[s for s in parent.sources if not _same_dir(s, data_dir)], data_dir],
               "rehearsal_per_new_image": constants.FINETUNE_REHEARSAL, "freeze_batchnorm": constants.FINETUNE_FREEZE_BATCHNORM,
               "holdout": constants.FINETUNE_HOLDOUT,
               **used}
    config.save_config(settings, run_dir / R.CONFIG, spec=spec.to_dict(), **{KEY: lineage})
    log.info("fine-tuning %s (%s) on %s: %d training images (%d new, %d rehearsal), %d validation images "
             "(%d the parent's, %d new); %d epochs at max lr %g", parent.run_dir, parent.metadata.model_id, data_dir,
             len(train_rows), used["new_train"], used["rehearsal_images"], len(val_rows), used["parent_val"],
             used["new_val"], settings["epochs"], settings["max_lr"])

    T.seed_everything(settings["seed"])
    started = time.monotonic()
    with T.precision_policy(settings["mixed_precision"]):
        batch = settings["batch_size"] * strategy.num_replicas_in_sync
        train_ds = build_dataset(train_rows["abs_path"].tolist(), train_rows["y"].tolist(), spec, training=True,
                                 batch_size=batch, augmentation=Augmentation.from_settings(settings),
                                 cache=settings["cache"], seed=settings["seed"])
        val_ds = build_dataset(val_rows["abs_path"].tolist(), val_rows["y"].tolist(), spec, training=False,
                               batch_size=batch, cache=settings["cache"])
        steps = math.ceil(len(train_rows) / batch)
        if args.max_steps_per_epoch:
            steps = min(steps, args.max_steps_per_epoch)
            train_ds = train_ds.repeat()
        weights = T.class_weights(train_rows["y"], spec.num_classes) if settings["class_weights"] else None
        with strategy.scope():
            model, _ = load_model(parent.model_path, compile=False)
        best = -math.inf
        for phase in phases:
            with strategy.scope():
                runner._set_frozen(model, phase.frozen)
                if constants.FINETUNE_FREEZE_BATCHNORM:
                    freeze_batchnorm(model)
                runner._compile(model, settings, spec, steps * (phase.end - phase.start))
            callbacks = runner._callbacks(run_dir, spec, settings["backbone"], best)
            model.fit(train_ds, validation_data=val_ds, epochs=phase.end, initial_epoch=phase.start,
                      steps_per_epoch=steps, class_weight=weights, callbacks=callbacks,
                      verbose=2 if args.quiet else 1, shuffle=False)
            best = next(c for c in callbacks if isinstance(c, T.Checkpoints)).best
        described = " + ".join(dict.fromkeys([*val_rows["source"], *train_rows["source"]]))
        calibrate_after_training(run_dir, described, val_rows, train_rows=ood_rows)
    _record_lineage(run_dir, lineage)
    runner._add_train_seconds(run_dir, time.monotonic() - started)
    return run_dir


def _record_lineage(run_dir: Path, lineage: dict[str, Any]) -> None:
    """best.keras's metadata says which model it was fine-tuned from (it travels into exports)."""
    best = run_dir / R.BEST_MODEL
    if not best.is_file():
        return
    metadata = read_metadata(best)
    extra = {**metadata.extra, "finetuned_from": {"run": lineage["parent"], "model_id": lineage["parent_model_id"],
                                                  "data": lineage["data"]}}
    write_metadata(best, metadata.replace(extra=extra))
