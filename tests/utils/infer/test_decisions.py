"""The header guard shared by predict.py, test.py, backfill.py and the router's built-in rules."""

from __future__ import annotations

import pytest

from utils.infer.decisions import PROJECTION_SOP_CLASSES, not_projection
from utils.routing import rules

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize("header, passes", [
    ({}, True),  # PNG / JPEG: no header to judge (the out-of-distribution score is what looks at them)
    ({"Modality": "CR", "SOPClassUID": CT_CLASS}, True),  # Modality decides when present, as in the router
    ({"Modality": "DX"}, True), ({"Modality": "DR"}, True), ({"Modality": "RG"}, True), ({"Modality": " dx "}, True),
    ({"Modality": "", "SOPClassUID": PROJECTION_SOP_CLASSES[1]}, True),
    ({"Modality": "CT", "SOPClassUID": PROJECTION_SOP_CLASSES[0]}, False),
    ({"Modality": "MG"}, False), ({"Modality": "XA"}, False), ({"Modality": "OT"}, False),
    ({"Modality": "", "SOPClassUID": ""}, False), ({"Modality": "", "SOPClassUID": CT_CLASS}, False),
])
def test_not_projection(header, passes):
    why = not_projection(header)
    assert (why == "") is passes
    if not passes:
        assert "not projection radiography" in why and "--no-projection-only" in why


def test_a_hostile_header_value_is_shown_printable_and_bounded():
    why = not_projection({"Modality": "CT\r\nforged log line\x1b[31m" + "x" * 500, "SOPClassUID": "\x00"})
    assert "\n" not in why and "\r" not in why and "\x1b" not in why and "\x00" not in why and len(why) < 300


def test_the_router_rules_use_the_same_definition():
    assert rules.PROJECTION_MODALITIES is not None
    from utils.infer import decisions

    assert rules.PROJECTION_MODALITIES is decisions.PROJECTION_MODALITIES
    assert rules.PROJECTION_SOP_CLASSES is decisions.PROJECTION_SOP_CLASSES
    assert rules.NOT_PROJECTION == decisions.NOT_PROJECTION == "not_projection_radiography"
