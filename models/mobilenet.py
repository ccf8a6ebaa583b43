"""MobileNet V1 and V2 (alpha 1.0) from keras.applications, without their top.

Both expect pixels in [-1, 1] (keras.applications.mobilenet*.preprocess_input, mode "tf"),
so the model's "preprocess" layer is x / 127.5 - 1.
"""

from __future__ import annotations

import keras

from models.registry import register_model
from models.weights import ImagenetFile

_V1_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet/"
_V2_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
_V1_ROWS = (128, 160, 192, 224)  # sizes keras.applications has V1 weights for
_V2_ROWS = (96, 128, 160, 192, 224)
_NORMALIZATION = "[-1, 1] (x / 127.5 - 1)"


def _weights_rows(input_shape, available) -> int:
    """keras.applications' rule: square inputs of a published size get that file, else 224."""
    rows, cols = input_shape[:2]
    return rows if rows == cols and rows in available else 224


def _v1_file(input_shape) -> ImagenetFile:
    fname = f"mobilenet_1_0_{_weights_rows(input_shape, _V1_ROWS)}_tf_no_top.h5"
    return ImagenetFile(fname, _V1_URL + fname)


def _v2_file(input_shape) -> ImagenetFile:
    fname = ("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"
             f"1.0_{_weights_rows(input_shape, _V2_ROWS)}_no_top.h5")
    return ImagenetFile(fname, _V2_URL + fname)


def _to_minus_one_one(channels: int) -> keras.layers.Layer:
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")


def _backbone(application, input_shape, weights_file) -> keras.Model:
    base = application(input_shape=input_shape, include_top=False, weights=weights_file,
                       pooling=None)
    return keras.Model(base.input, base.output, name="backbone")


@register_model("mobilenet_v1", family="mobilenet", preprocess=_to_minus_one_one,
                normalization=_NORMALIZATION, imagenet_file=_v1_file)
def mobilenet_v1(input_shape, weights_file=None) -> keras.Model:
    return _backbone(keras.applications.MobileNet, input_shape, weights_file)


@register_model("mobilenet_v2", family="mobilenet", preprocess=_to_minus_one_one,
                normalization=_NORMALIZATION, imagenet_file=_v2_file)
def mobilenet_v2(input_shape, weights_file=None) -> keras.Model:
    return _backbone(keras.applications.MobileNetV2, input_shape, weights_file)
