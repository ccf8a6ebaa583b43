"""ResNet-18 and ResNet-34 (He et al. 2016, basic blocks), trained from scratch.

keras.applications has no ResNet18/34, hence no ImageNet weights. The layout follows the
paper and torchvision: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool stem, then four stages of
basic blocks (two 3x3 convs) with 64/128/256/512 filters; a block whose shape changes gets a
1x1/2 conv + BN projection shortcut. The residual addition is kept (the paper's code dropped
the residual branch). Input scaling is [0, 1] (x / 255), as the paper scaled its images.
"""

from __future__ import annotations

import keras

from models.registry import register_model

_BN_EPSILON = 1e-5  # PyTorch's default, the paper's framework
# torchvision's conv init: kaiming_normal_(mode="fan_out", nonlinearity="relu")
_CONV_INIT = keras.initializers.VarianceScaling(2.0, mode="fan_out",
                                                distribution="untruncated_normal")
_FILTERS = (64, 128, 256, 512)


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool):
    """Conv (no bias) + BN (+ ReLU) with PyTorch's symmetric padding of kernel // 2."""
    pad = kernel // 2
    if stride > 1 and pad:
        # Keras "same" pads stride-2 convs asymmetrically; PyTorch pads both sides.
        x = keras.layers.ZeroPadding2D(pad, name=f"{name}_pad")(x)
        padding = "valid"
    else:
        padding = "same"
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False,
                            kernel_initializer=_CONV_INIT, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name}_bn")(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def basic_block(x, filters: int, stride: int, name: str):
    """relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))."""
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, f"{name}_proj", relu=False)
    y = _conv_bn(x, filters, 3, stride, f"{name}_1", relu=True)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def resnet(input_shape, blocks_per_stage, name: str = "backbone") -> keras.Model:
    """A basic-block ResNet feature extractor (no pooling, no classifier)."""
    inputs = keras.Input(shape=input_shape, name="backbone_input")
    x = _conv_bn(inputs, 64, 7, 2, "stem", relu=True)
    # Zero padding equals PyTorch's -inf padding here: the inputs are ReLU outputs (>= 0).
    x = keras.layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="stem_pool")(x)
    for stage, (filters, blocks) in enumerate(zip(_FILTERS, blocks_per_stage), start=1):
        for block in range(blocks):
            stride = 2 if stage > 1 and block == 0 else 1
            x = basic_block(x, filters, stride, name=f"stage{stage}_block{block + 1}")
    return keras.Model(inputs, x, name=name)


def _to_zero_one(channels: int) -> keras.layers.Layer:
    return keras.layers.Rescaling(1.0 / 255.0, name="preprocess")


@register_model("resnet18", family="resnet", preprocess=_to_zero_one,
                normalization="[0, 1] (x / 255)")
def resnet18(input_shape, weights_file=None) -> keras.Model:
    return resnet(input_shape, (2, 2, 2, 2))


@register_model("resnet34", family="resnet", preprocess=_to_zero_one,
                normalization="[0, 1] (x / 255)")
def resnet34(input_shape, weights_file=None) -> keras.Model:
    return resnet(input_shape, (3, 4, 6, 3))
