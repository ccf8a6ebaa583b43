"""Backbones for body-part classification: ``build_model(name, num_classes, ...)``.

Importing this package imports neither Keras nor a backbone: ``list_models()`` comes from
models/names.py. The other names (``build_model``, ``BACKBONE_INFO``, ...) are loaded on first
use, which imports models/registry.py and registers every backbone (``load_backbones()``).

``load_backbones`` lives here, not in models/registry.py: the backbone modules import the
registry, so the registry importing them back would be an import cycle.
"""

from __future__ import annotations

import importlib

from models.names import MODEL_NAMES, list_models

# name -> the module defining it; looked up on first access (PEP 562 module __getattr__)
_LAZY = {
    "BACKBONE_INFO": "models.registry",
    "BackboneInfo": "models.registry",
    "build_model": "models.registry",
    "get_backbone_info": "models.registry",
    "register_model": "models.registry",
    "set_bn_momentum": "models.registry",
    "WeightsMismatchError": "models.weights",
    "WeightsUnavailableError": "models.weights",
}


def load_backbones() -> None:
    """Import every backbone module, which registers its backbones (the ``@register_model``
    decorators run at their import); later calls cost nothing. Not done at import: listing the
    names (``list_models()``) needs no Keras."""
    # Registration order is list_models() order (the paper's table), hence not sorted.
    from models import mobilenet, resnet, efficientnet  # noqa: F401, I001


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    load_backbones()  # BACKBONE_INFO is complete whenever it is handed out
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BACKBONE_INFO",
    "BackboneInfo",
    "MODEL_NAMES",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "build_model",
    "get_backbone_info",
    "list_models",
    "load_backbones",
    "register_model",
    "set_bn_momentum",
]
