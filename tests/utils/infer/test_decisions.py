"""The header guard shared by predict.py, test.py, backfill.py and the router's built-in rules."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from utils.infer.decisions import PROJECTION_SOP_CLASSES, not_projection
from utils.routing.decision import rules

CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

HEADERS = [
    ({"Modality": "CR", "SOPClassUID": CT_CLASS}, True),  # Modality decides when present, as in the router
    ({"Modality": "DX"}, True), ({"Modality": "DR"}, True), ({"Modality": "RG"}, True),
    ({"Modality": " dx "}, True), ({"Modality": "dx"}, True), ({"Modality": "Cr"}, True),  # trimmed, any case
    ({"Modality": "", "SOPClassUID": PROJECTION_SOP_CLASSES[1]}, True),
    ({"SOPClassUID": PROJECTION_SOP_CLASSES[2]}, True),
    ({"Modality": "CT", "SOPClassUID": PROJECTION_SOP_CLASSES[0]}, False), ({"Modality": "ct"}, False),
    ({"Modality": "MG"}, False), ({"Modality": "XA"}, False), ({"Modality": "OT"}, False),
    ({"Modality": "", "SOPClassUID": ""}, False), ({"Modality": "", "SOPClassUID": CT_CLASS}, False),
]


@pytest.mark.parametrize("header, passes", [
    ({}, True),  # PNG / JPEG: no header to judge (the out-of-distribution score is what looks at them)
    *HEADERS,
])
def test_not_projection(header, passes):
    why = not_projection(header)
    assert (why == "") is passes
    if not passes:
        assert "not projection radiography" in why and "--no-projection-only" in why


def dicom_with(path: Path, header: dict[str, str]) -> Path:
    """A DICOM without pixels holding ``header``'s Modality and SOPClassUID as written (an empty one: absent)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = header.get("SOPClassUID") or SECONDARY_CAPTURE  # not projection either
    meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID = generate_uid(), ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta, ds.SOPInstanceUID = meta, meta.MediaStorageSOPInstanceUID
    if header.get("SOPClassUID"):
        ds.SOPClassUID = header["SOPClassUID"]
    if "Modality" in header:
        with warnings.catch_warnings():  # pydicom warns of a lower-case code string: written so on purpose
            warnings.simplefilter("ignore", UserWarning)
            ds.Modality = header["Modality"]
    ds.save_as(path, enforce_file_format=True)
    return path


def queued(path: Path, sop_class: str = ""):
    """The router's queue row of ``path``, its SOP class as the SCP records it from the C-STORE."""
    from utils.routing import queue as q

    return q.QueueItem(1, path.name, "1.2.3", sop_class, "1.2.840.10008.1.2.1", "SENDER", "", 0, q.RECEIVED,
                       "", None, "", "", "", 0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("header, passes", HEADERS)
def test_predict_and_the_routers_default_rules_agree(tmp_path, header, passes):
    """The same header through not_projection (predict.py, test.py, backfill.py) and the router's built-in rules,
    as the SCP records the object (its SOP class from the C-STORE): the same verdict."""
    from utils.io.dicom import read_dicom_header

    path = dicom_with(tmp_path / "x.dcm", header)
    decision = rules.RuleSet((), {"spine", "uncertain", "unreadable"}).decide(
        queued(path, header.get("SOPClassUID", "")), path)
    assert (decision.destination == rules.MODEL) is passes, decision
    assert (not_projection(read_dicom_header(path)) == "") is passes  # what predict.py reads from the file
    if not passes:
        assert decision.reason.startswith(rules.NOT_PROJECTION)


def test_a_hostile_header_value_is_shown_printable_and_bounded():
    why = not_projection({"Modality": "CT\r\nforged log line\x1b[31m" + "x" * 500, "SOPClassUID": "\x00"})
    assert "\n" not in why and "\r" not in why and "\x1b" not in why and "\x00" not in why and len(why) < 300


def test_the_router_rules_use_the_same_definition():
    assert rules.PROJECTION_MODALITIES is not None
    from utils.infer import decisions

    assert rules.PROJECTION_MODALITIES is decisions.PROJECTION_MODALITIES
    assert rules.PROJECTION_SOP_CLASSES is decisions.PROJECTION_SOP_CLASSES
    assert rules.NOT_PROJECTION == decisions.NOT_PROJECTION == "not_projection_radiography"


def test_configured_rules_still_compare_exactly(tmp_path):
    """Only the built-in rules normalise the Modality: a configured rule on CT does not match 'ct'."""
    configured = rules.parse_rules([{"name": "ct", "match": {"modality": "CT"}, "destination": "pass_through"}],
                                   {"pass_through"}, "router.yaml")
    rule_set = rules.RuleSet(configured, {"spine", "uncertain", "pass_through"})
    for modality, decided_by in (("CT", "rule:ct"), ("ct", "rule:not-projection"), ("dx", "rule:projection")):
        path = dicom_with(tmp_path / f"{modality}.dcm", {"Modality": modality})
        assert rule_set.decide(queued(path), path).decided_by == decided_by
