"""Named training recipes: ``training.py --recipe NAME`` sets a coherent group of flags at once.

A recipe is a dict of utils/constants.py names to values. Flags written on the command line win
over the recipe, and the recipe wins over constants.py; what a recipe does not name comes from
constants.py. Without ``--recipe`` (``none``), constants.py alone decides, as before presets
existed. The recipe's name is recorded in the run's config.json with every resolved value.

* ``paper``: the paper's code as faithfully as this project can train it (ICCV 2021 workshop,
  VinDr-BodyPartXR, 16,093 images: MobileNet-V1 from scratch, 512 px, batch 32, 50 epochs,
  Adam with coupled L2 1e-4, one-cycle lr with peak 0.01, gradient clipping 0.1, rotation
  +-10 degrees and horizontal flips with p = 0.5, no other augmentation). The best epoch is still
  chosen by validation macro-F1 and BatchNorm momentum is PyTorch's 0.9, as everywhere here.
* ``small-data``: for a few hundred to a few thousand labelled images trained from scratch; chosen
  by grouped 5-fold cross-validation on 1,029 public X-rays (docs/EVALUATION.md, "Results on real images"):
  twice the steps (batch 16), 60 epochs, inverse-frequency class weights, zoom / shift / shear, and
  the look of other detectors (gamma curves, blur or edge enhancement, noise).
"""

from __future__ import annotations

import textwrap

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

NONE = "none"


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str  # one line for --help and the README
    settings: Mapping[str, Any] = field(default_factory=dict)  # utils/constants.py name -> value


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe for recipe in (
        Recipe("paper", "the paper's code: batch 32, 50 epochs, rotation 10 deg + horizontal flips, nothing else", {
            "WEIGHTS": "none", "EPOCHS": 50, "BATCH_SIZE": 32, "MAX_LR": 0.01, "WARMUP_FRACTION": 0.3,
            "LR_START_DIV": 25.0, "LR_FINAL_DIV": 1e4, "WEIGHT_DECAY": 1e-4, "CLIP_VALUE": 0.1,
            "LABEL_SMOOTHING": 0.0, "CLASS_WEIGHTS": False, "FREEZE_EPOCHS": 0, "BN_MOMENTUM": 0.9,
            "BN_RECALIBRATION_STEPS": 0, "AUGMENT_ROTATION_DEG": 10.0, "HORIZONTAL_FLIP": True,
            "AUGMENT_BRIGHTNESS": 0.0, "AUGMENT_CONTRAST": 0.0, "AUGMENT_SCALE": 0.0, "AUGMENT_TRANSLATE": 0.0,
            "AUGMENT_SHEAR_DEG": 0.0, "AUGMENT_GAMMA": 0.0, "AUGMENT_SHARPNESS": 0.0, "AUGMENT_NOISE": 0.0,
            "AUGMENT_BORDER": 0.0, "AUGMENT_INVERT": 0.0, "AUGMENT_EQUALISE": 0.0, "AUGMENT_RESAMPLE": 0.0,
            "AUGMENT_JPEG": 0.0,
        }),
        Recipe("small-data", "a few hundred labelled images from scratch: batch 16, 60 epochs, class weights, "
                             "zoom/shift/shear and detector looks", {
            "WEIGHTS": "none", "EPOCHS": 60, "BATCH_SIZE": 16, "CLASS_WEIGHTS": True,
            "AUGMENT_SCALE": 0.15, "AUGMENT_TRANSLATE": 0.1, "AUGMENT_SHEAR_DEG": 5.0,
            "AUGMENT_GAMMA": 0.3, "AUGMENT_SHARPNESS": 0.5, "AUGMENT_NOISE": 0.02,
        }),
        Recipe("site-robust", "small-data plus the looks of other sites that break it (test.py --shift): "
                              "collimation borders, inverted and equalised gray scales, lower resolution, lossy "
                              "JPEG, wider gamma, contrast and noise", {
            "WEIGHTS": "none", "EPOCHS": 60, "BATCH_SIZE": 16, "CLASS_WEIGHTS": True,
            "AUGMENT_SCALE": 0.15, "AUGMENT_TRANSLATE": 0.1, "AUGMENT_SHEAR_DEG": 5.0,
            "AUGMENT_GAMMA": 0.7, "AUGMENT_SHARPNESS": 0.5, "AUGMENT_NOISE": 0.05, "AUGMENT_CONTRAST": 0.4,
            "AUGMENT_BORDER": 0.3, "AUGMENT_INVERT": 0.2, "AUGMENT_EQUALISE": 0.2, "AUGMENT_RESAMPLE": 0.25,
            "AUGMENT_JPEG": 0.25,
        }),
    )
}


def recipe_names() -> list[str]:
    """``none`` first, then every recipe: the choices of ``--recipe``."""
    return [NONE, *RECIPES]


def describe() -> str:
    """One line per recipe with what it sets, for ``--help``."""
    lines = []
    for recipe in RECIPES.values():
        values = ", ".join(f"--{name.lower().replace('_', '-')} {_text(value)}"
                           for name, value in recipe.settings.items())
        lines.append(textwrap.fill(f"--recipe {recipe.name}: {recipe.summary}. Sets {values}.", width=100,
                                   subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines)


def _text(value: Any) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def apply(args: Any, name: str, given: set[str]) -> set[str]:
    """Set the recipe's values on the parsed ``args`` for every flag not in ``given`` (the flags
    written on the command line); returns the flags it set. ``none`` sets nothing."""
    if name == NONE:
        return set()
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(recipe_names())}")
    applied = set()
    for constant, value in RECIPES[name].settings.items():
        flag = "--" + constant.lower().replace("_", "-")
        if flag in given or (isinstance(value, bool) and "--no-" + flag[2:] in given):
            continue
        if not hasattr(args, constant.lower()):
            raise ValueError(f"recipe {name!r} sets {constant}, which is not a flag of this script")
        setattr(args, constant.lower(), value)
        applied.add(flag)
    return applied
