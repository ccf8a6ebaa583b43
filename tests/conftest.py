"""Settings every test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def few_ood_negatives(monkeypatch):
    """Training and calibrate.py fit the OOD score against synthetic non-radiographs (40 per kind by default,
    about 10 s to write and decode); 2 per kind are enough to exercise the path in tests."""
    from utils import constants

    monkeypatch.setattr(constants, "OOD_NEGATIVES_PER_KIND", 2)
