"""Backbones for body-part classification: ``build_model(name, num_classes, ...)``.

Importing this package registers the backbones (order below = ``list_models()`` order) and
builds nothing.
"""

# Registration order is list_models() order (the paper's table), hence not sorted.
from models import mobilenet, resnet, efficientnet  # noqa: F401, I001
from models.registry import (
    BACKBONE_INFO,
    BackboneInfo,
    build_model,
    get_backbone_info,
    list_models,
    register_model,
    set_bn_momentum,
)
from models.weights import WeightsMismatchError, WeightsUnavailableError

__all__ = [
    "BACKBONE_INFO",
    "BackboneInfo",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "build_model",
    "get_backbone_info",
    "list_models",
    "register_model",
    "set_bn_momentum",
]
