"""EfficientNet B0-B2 from keras.applications, without their top.

keras.applications' EfficientNet takes 0..255 and normalizes inside, but not the same way in
every case: with weights="imagenet" it computes (x / 255 - mean) / std (ImageNet mean/std,
via Rescaling, Normalization and a correcting Rescaling, see tensorflow#49930), while with
weights=None it builds only x / 255 and an un-adapted Normalization (mean 0, variance 1).
A model trained from ImageNet and rebuilt from scratch to load its weights would therefore
silently see differently scaled inputs. Here the backbone is the keras graph *after* its
normalization layers, and the model's "preprocess" layer always computes
(x / 255 - mean) / std, which is exactly what the ImageNet weights expect.
"""

from __future__ import annotations

import keras

from models.registry import register_model
from models.weights import ImagenetFile

_URL = "https://storage.googleapis.com/keras-applications/"
# (application, file hash of the "_notop" weights as in keras.applications.efficientnet)
_VARIANTS = {
    "b0": (keras.applications.EfficientNetB0, "50bc09e76180e00e4465e1a485ddc09d"),
    "b1": (keras.applications.EfficientNetB1, "74c4e6b3e1f6a1eea24c589628592432"),
    "b2": (keras.applications.EfficientNetB2, "111f8e2ac8aa800a7a99e3239f7bfb39"),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN = sum(IMAGENET_MEAN) / 3  # a 1-channel model from scratch: the channel average
GRAY_STD = sum(IMAGENET_STD) / 3
_NORMALIZATION = "ImageNet standardization ((x / 255 - mean) / std, about [-2.1, 2.6])"


def _standardize(channels: int) -> keras.layers.Layer:
    """(x / 255 - mean) / std as a single per-channel affine Rescaling layer."""
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((GRAY_MEAN,), (GRAY_STD,))
    scale = [1.0 / (255.0 * s) for s in std]
    offset = [-m / s for m, s in zip(mean, std)]
    return keras.layers.Rescaling(scale, offset=offset, name="preprocess")


def _file(variant: str):
    def imagenet_file(input_shape) -> ImagenetFile:
        fname = f"efficientnet{variant}_notop.h5"
        return ImagenetFile(fname, _URL + fname, _VARIANTS[variant][1])

    return imagenet_file


def _backbone(variant: str, input_shape, weights_file) -> keras.Model:
    application = _VARIANTS[variant][0]
    # weights_file is loaded by keras into the full graph (layer order matches the file:
    # the rescaling layers it leaves out hold no weights); we then keep the part after the
    # normalization, which shares those layers and weights.
    base = application(input_shape=input_shape, include_top=False, weights=weights_file,
                       pooling=None)
    stem = base.get_layer("stem_conv_pad")
    return keras.Model(stem.input, base.output, name="backbone")


def _register(variant: str):
    @register_model(f"efficientnet_{variant}", family="efficientnet", preprocess=_standardize,
                    normalization=_NORMALIZATION, imagenet_file=_file(variant))
    def build(input_shape, weights_file=None) -> keras.Model:
        return _backbone(variant, input_shape, weights_file)

    build.__name__ = f"efficientnet_{variant}"
    return build


efficientnet_b0 = _register("b0")
efficientnet_b1 = _register("b1")
efficientnet_b2 = _register("b2")
