"""The features the out-of-distribution score reads (utils/infer/ood.py), as a second output of the model.

For each stage of the backbone (the last layer at each spatial resolution: for MobileNet-V1 at 128 px,
conv_pw_1 at 64x64, conv_pw_3 at 32x32, ... conv_pw_13 at 4x4) the mean and the standard deviation of
every channel over the image, concatenated in stage order. Early stages describe texture, noise and
contrast (what tells a CT slice, a photo or a document from a radiograph); late stages describe
content. ``with_features(model)`` returns a model with two outputs, ``(logits, features)``, that runs the
backbone once: its logits are the model's own, bit for bit, at the same cost.
"""

from __future__ import annotations

import keras

from models.head import HEAD_LAYER_NAMES

BACKBONE = "backbone"  # models/registry.py names every backbone so
FEATURES_NAME = "ood_features"


def _output(layer):
    """The layer's output in the backbone's own graph: its last call (a backbone cloned from a
    keras.applications model calls each layer a second time, in the clone)."""
    nodes = getattr(layer, "_inbound_nodes", None) or []
    if nodes and len(nodes[-1].output_tensors) == 1:
        return nodes[-1].output_tensors[0]
    return layer.output


def stage_layers(backbone) -> list:
    """The last layer of each spatial resolution of ``backbone``, from the finest to the coarsest (inputs,
    padding and 1 x 1 squeeze-and-excitation maps left out)."""
    last: dict[tuple, object] = {}
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.InputLayer) or "Padding" in type(layer).__name__:
            continue
        try:
            shape = tuple(_output(layer).shape)
        except (AttributeError, ValueError):  # a layer called several times has no single output
            continue
        if len(shape) == 4 and None not in shape[1:] and shape[3] > 3 and shape[1] * shape[2] > 1:
            last[(shape[1], shape[2])] = layer
    return [last[size] for size in sorted(last, key=lambda hw: -hw[0] * hw[1])]


def stage_sizes(model) -> list[int] | None:
    """The width of each stage's block of the features output (2 x channels), or None (no backbone)."""
    try:
        backbone = model.get_layer(BACKBONE)
    except ValueError:
        return None
    return [2 * int(_output(layer).shape[3]) for layer in stage_layers(backbone)]


def _spatial_std(o):
    """keras.ops.std(o, axis=(1, 2)) written out as sqrt(mean(d * d)), d = o - mean(o): the same
    arithmetic in float (reduce_std squares the same differences), but the TFLite converter no
    longer fuses it into SQUARED_DIFFERENCE, which has no XNNPACK int8 kernel: in an int8 export that
    op ran in TFLite's single-threaded reference kernel and cost 3x the whole network (MobileNet-V1 at
    512 px: ~88 ms of CPU per image instead of ~22; bench/RESULTS.md, "Isolation without a throughput
    tax"). As SUB, MUL and MEAN every step stays in the XNNPACK delegate."""
    centred = o - keras.ops.mean(o, axis=(1, 2), keepdims=True)
    return keras.ops.sqrt(keras.ops.mean(centred * centred, axis=(1, 2)))


def with_features(model):
    """``model`` (image -> [gray_to_rgb] -> preprocess -> backbone -> avg_pool -> head_dropout -> logits) with
    a second output, the stage statistics; None for a model of another structure (no nested ``backbone``
    or no head layers of models/head.py)."""
    try:
        backbone = model.get_layer(BACKBONE)
        head = [model.get_layer(name) for name in HEAD_LAYER_NAMES]
        fed = backbone._inbound_nodes[0].input_tensors[0]  # the tensor the model feeds its backbone
    except (ValueError, AttributeError, IndexError):
        return None
    stages = stage_layers(backbone)
    if not stages:
        return None
    inner = keras.Model(backbone.inputs, [backbone.output] + [_output(layer) for layer in stages],
                        name=f"{BACKBONE}_with_stages")
    outputs = inner(fed)
    x = outputs[0]
    for layer in head:
        x = layer(x)
    stats = [keras.ops.concatenate([keras.ops.mean(o, axis=(1, 2)), _spatial_std(o)], axis=-1) for o in outputs[1:]]
    features = keras.layers.Concatenate(name=FEATURES_NAME, dtype="float32")(stats)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # one tensor, as the model's own signature
    return keras.Model(inputs, [x, features], name=f"{model.name}_with_features")
