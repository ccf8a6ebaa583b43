"""models/names.py (the names argument parsing uses, without Keras) stays in step with the
``@register_model`` decorators, and importing ``models`` imports no Keras."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import models
from models import registry
from models.names import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[2]


def test_static_names_are_the_registered_backbones_in_order():
    models.load_backbones()
    assert len(set(MODEL_NAMES)) == len(MODEL_NAMES), "a name is listed twice in models/names.py"
    assert set(registry.BACKBONE_INFO) == set(MODEL_NAMES), (
        "models/names.py MODEL_NAMES and the @register_model decorators differ: "
        f"only registered {sorted(set(registry.BACKBONE_INFO) - set(MODEL_NAMES))}, "
        f"only listed {sorted(set(MODEL_NAMES) - set(registry.BACKBONE_INFO))}")
    assert list(registry.BACKBONE_INFO) == list(MODEL_NAMES)  # load_backbones() registers in list order
    assert models.list_models() == registry.list_models() == list(MODEL_NAMES)


def test_importing_models_and_listing_names_imports_no_keras():
    """In a fresh interpreter: ``import models`` and ``list_models()`` load neither Keras nor a
    backbone module; the first lazy attribute loads the registry with every backbone registered."""
    script = textwrap.dedent("""
        import json, sys
        import models
        names = models.list_models()
        before = sorted(m for m in ("keras", "tensorflow", "models.registry", "models.mobilenet") if m in sys.modules)
        info = models.BACKBONE_INFO
        print(json.dumps({"before": before, "names": names, "registered": list(info)}))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"before": [], "names": list(MODEL_NAMES), "registered": list(MODEL_NAMES)}


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        models.no_such_thing  # noqa: B018
