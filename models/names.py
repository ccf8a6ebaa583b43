"""The registered backbone names, importable without Keras (argument parsing, --help).

Kept in step with the ``@register_model`` decorators of the backbone modules by
tests/models/test_names.py; the order is ``list_models()`` order (the paper's table).
"""

MODEL_NAMES: tuple[str, ...] = (
    "mobilenet_v1",
    "mobilenet_v2",
    "resnet18",
    "resnet34",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
)


def list_models() -> list[str]:
    """Registered backbone names, in the paper's order; imports neither Keras nor a backbone."""
    return list(MODEL_NAMES)


__all__ = ["MODEL_NAMES", "list_models"]
