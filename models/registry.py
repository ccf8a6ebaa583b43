"""Backbone registry and ``build_model``: name -> backbone, then the shared head.

Every model takes float32 images (H, W, C), C = 1 or 3, with pixel values 0..255, and
contains as layers whatever its backbone expects beyond that:

    image -> [gray_to_rgb] -> preprocess -> backbone -> avg_pool -> head_dropout -> logits

``gray_to_rgb`` (C=1 with 3-channel ImageNet weights) repeats the gray channel; ``preprocess``
maps 0..255 to the backbone's range; ``backbone`` is a nested keras.Model, so
``model.get_layer("backbone").trainable = False`` leaves only the head trainable.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass

import keras

from models.head import classification_head
from models.names import MODEL_NAMES, list_models
from models.weights import (
    IMAGENET,
    PATH,
    ImagenetFile,
    WeightsMismatchError,
    fetch_imagenet,
    file_signature,
    load_weights_file,
    model_signature,
    parse_weights,
)

logger = logging.getLogger(__name__)

# builder(input_shape, weights_file) -> keras.Model named "backbone" returning a feature map;
# weights_file is None (random init) or a local ImageNet file from ImagenetFile.
BackboneBuilder = Callable[[tuple[int, int, int], "str | None"], keras.Model]


@dataclass(frozen=True)
class BackboneInfo:
    """What the rest of the project may want to know about a backbone without building it."""

    name: str
    family: str
    build_backbone: BackboneBuilder
    preprocess: Callable[[int], keras.layers.Layer]  # channels -> layer named "preprocess"
    normalization: str  # what "preprocess" maps the 0..255 input to, in words
    imagenet_file: Callable[[tuple[int, int, int]], ImagenetFile] | None = None

    @property
    def imagenet(self) -> bool:
        """Whether keras.applications ships ImageNet weights for this backbone."""
        return self.imagenet_file is not None


_REGISTRY: dict[str, BackboneInfo] = {}
BACKBONE_INFO = types.MappingProxyType(_REGISTRY)  # read-only view, filled by models.load_backbones()


def register_model(
    name: str,
    *,
    family: str,
    preprocess: Callable[[int], keras.layers.Layer],
    normalization: str,
    imagenet_file: Callable[[tuple[int, int, int]], ImagenetFile] | None = None,
):
    """Decorator registering a backbone builder under ``name``."""

    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _REGISTRY:
            raise ValueError(f"Backbone {name!r} is registered twice")
        _REGISTRY[name] = BackboneInfo(name, family, builder, preprocess, normalization, imagenet_file)
        return builder

    return decorator


def get_backbone_info(name: str) -> BackboneInfo:
    """The BackboneInfo of ``name``; an unknown name raises ValueError listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in MODEL_NAMES:
            raise RuntimeError(
                f"Backbone {name!r} is not registered yet: its module registers it when imported; "
                "use models.build_model / models.BACKBONE_INFO, or call models.load_backbones() first"
            ) from None
        raise ValueError(
            f"Unknown backbone {name!r}. Valid names: {', '.join(list_models())}"
        ) from None


def iter_layers(layer):
    """Every layer nested inside ``layer`` (depth first), not including ``layer`` itself."""
    for sub in getattr(layer, "layers", ()):
        yield sub
        yield from iter_layers(sub)


def set_bn_momentum(model: keras.Model, momentum: float) -> int:
    """Set the momentum of every BatchNormalization layer; returns how many were changed.

    Keras reads ``momentum`` when it traces the training step, and get_config saves it.
    """
    count = 0
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = float(momentum)
            count += 1
    return count


def _assemble(
    info: BackboneInfo,
    num_classes: int,
    input_shape: tuple[int, int, int],
    gray_to_rgb: bool,
    imagenet_path: str | None,
    dropout: float,
) -> keras.Model:
    inputs = keras.Input(shape=input_shape, dtype="float32", name="image")
    x = inputs
    channels = input_shape[-1]
    if gray_to_rgb:
        x = keras.layers.Concatenate(axis=-1, name="gray_to_rgb")([x, x, x])
        channels = 3
    x = info.preprocess(channels)(x)
    backbone = info.build_backbone((*input_shape[:2], channels), imagenet_path)
    if backbone.name != "backbone":
        raise RuntimeError(f"Builder of {info.name} must name its model 'backbone'")
    logits = classification_head(backbone(x), num_classes, dropout)
    return keras.Model(inputs, logits, name=info.name)


def build_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, int, int] = (512, 512, 3),
    weights: str | os.PathLike | None = None,
    *,
    dropout: float = 0.2,
    bn_momentum: float | None = 0.9,
    gray_to_rgb: bool | None = None,
) -> keras.Model:
    """Build backbone ``name`` with the shared head; the model outputs float32 logits.

    Args:
        name: one of ``list_models()``.
        num_classes: size of the logits.
        input_shape: (H, W, C) with C = 1 or 3; pixel values 0..255.
        weights: None / "none" (random init, the paper's setting), "imagenet"
            (keras.applications weights; WeightsUnavailableError when they cannot be
            downloaded), or a path to a ``.keras`` / ``.weights.h5`` file saved from a model
            built the same way (WeightsMismatchError when it does not fit).
        dropout: rate of the dropout before the logits.
        bn_momentum: momentum of every BatchNormalization layer (Keras moving-average
            convention: 0.9 equals PyTorch's 0.1); None keeps the Keras defaults (0.99).
        gray_to_rgb: repeat a single gray channel to 3 inside the model. None (default) does
            it exactly when C = 1 and weights = "imagenet"; for a weights file with C = 1 it
            takes whichever of the two layouts the file fits.
    """
    info = get_backbone_info(name)
    mode, path = parse_weights(weights)
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3):
        raise ValueError(f"input_shape must be (H, W, 1) or (H, W, 3), got {input_shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    channels = input_shape[-1]
    if gray_to_rgb and channels != 1:
        raise ValueError("gray_to_rgb=True needs a 1-channel input_shape")

    imagenet_path = None
    if mode == IMAGENET:
        if not info.imagenet:
            raise ValueError(
                f"ImageNet weights are not available for {name}: keras.applications has no "
                f"{name}. Use weights='none' (from scratch) or a .keras/.weights.h5 path. "
                f"Backbones with ImageNet weights: "
                f"{', '.join(n for n in list_models() if n in _REGISTRY and _REGISTRY[n].imagenet)}"
            )
        if channels == 1 and gray_to_rgb is False:
            raise ValueError("ImageNet weights need 3 channels: 1-channel input needs gray_to_rgb")
        imagenet_path = fetch_imagenet(name, info.imagenet_file(input_shape))

    replicate = gray_to_rgb if gray_to_rgb is not None else (channels == 1 and mode == IMAGENET)
    model = _assemble(info, num_classes, input_shape, replicate, imagenet_path, dropout)

    # A 1-channel model was trained either from scratch (1-channel backbone) or from
    # ImageNet (gray_to_rgb): the file tells which.
    if mode == PATH and channels == 1 and gray_to_rgb is None \
            and model_signature(model) != file_signature(path):
        other = _assemble(info, num_classes, input_shape, True, None, dropout)
        if model_signature(other) == file_signature(path):
            model = other

    if bn_momentum is not None:
        set_bn_momentum(model, bn_momentum)
    if mode == PATH:
        load_weights_file(
            model, path,
            f"{name} with num_classes={num_classes}, input_shape={input_shape}",
        )
    logger.info("Built %s (weights=%s): %s parameters", name, mode, f"{model.count_params():,}")
    return model


__all__ = [
    "BACKBONE_INFO",
    "MODEL_NAMES",
    "BackboneInfo",
    "WeightsMismatchError",
    "build_model",
    "get_backbone_info",
    "iter_layers",
    "list_models",
    "register_model",
    "set_bn_momentum",
]
