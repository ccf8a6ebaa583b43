"""Routing rules before the model: config checks, matching, first match, the default projection policy,
unreadable headers, decided_by in queue and audit, --check and --status; end to end through the SCP."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

import router as router_script
from utils.config import ConfigError
from utils.io.dicom_writer import write_dicom, write_non_image
from utils.routing import queue as q
from utils.routing.operations.audit import read_audit
from utils.routing.operations.config import from_dict
from utils.routing.decision.rules import MODEL, NOT_PROJECTION, RuleSet, parse_rules

from .conftest import CLASSES, ROWS_BY_CLASS, bright_rows_image, free_port, send, wait_for, write_config

TIMEOUT = 60
FOLDERS = {c: {"folder": c} for c in (*CLASSES, "uncertain")}


def config_with(tmp_path: Path, rules, destinations=None):
    return from_dict({"model": "m.keras", "destinations": destinations or {**FOLDERS, "pass_through": {"folder": "p"}},
                      "rules": rules}, base=tmp_path, where="router.yaml")


def item(path: Path, *, calling_ae: str = "SENDER", sop_class_uid: str = "") -> q.QueueItem:
    return q.QueueItem(1, path.name, "1.2.3", sop_class_uid, "1.2.840.10008.1.2.1", calling_ae, "", 0, q.RECEIVED,
                       "", None, "", "", "", 0, 0.0, 0.0, 0.0)


def xray(path: Path, modality: str = "DX", **extra) -> Path:
    """A small image; ``SOPClassUID`` in ``extra`` overrides the class write_dicom picks for the modality."""
    return write_dicom(path, bright_rows_image(ROWS_BY_CLASS["spine"]), modality=modality, bits_stored=12,
                       body_part=extra.pop("body_part", "LSPINE"), extra=extra or None)


# --- configuration checks ---------------------------------------------------------------------


def rule(**fields):
    return {"name": "r1", "match": {"modality": "CT"}, "destination": "pass_through", **fields}


@pytest.mark.parametrize("rules, message", [
    ([rule(destination="pacs")], r"rule 1 \('r1'\): destination: unknown destination 'pacs'.*pass_through"),
    ([rule(destination="pass_thru")], r"did you mean 'pass_through'\?"),
    ([rule(match={"BodyPartExamined": {"regex": "CHEST("}})],
     r"rule 1 \('r1'\): match.BodyPartExamined.regex: bad regular expression 'CHEST\('"),
    ([rule(match={"BodyPartExamnied": "CHEST"})],
     r"rule 1 \('r1'\): match.BodyPartExamnied: unknown field 'BodyPartExamnied' \(did you mean 'BodyPartExamined'"),
    ([rule(match={})], r"rule 1 \('r1'\): match: empty rule"),
    ([{}], r"rule 1: empty rule"),
    ([None], r"rule 1: empty rule"),
    ([{"name": "r1", "match": {"modality": "CT"}}], r"rule 1 \('r1'\): missing destination"),
    ([rule(destinaton="x")], r"unknown key 'destinaton' \(did you mean 'destination'\?\)"),
    ([rule(match={"modality": {"equal": "CT"}})], r"match.modality: unknown operator 'equal' \(did you mean 'equals'"),
    ([rule(match={"modality": {"equals": "CT", "in": ["MR"]}})], r"match.modality: expected exactly one operator"),
    ([rule(match={"modality": {"in": []}})], r"match.modality.in: expected a non-empty list"),
    ([rule(match={"modality": {"missing": "yes"}})], r"match.modality.missing: expected true or false"),
    ([rule(match={"modality": "ct"})], r"match.modality.equals: 'ct' can never match.*'CT'"),
    ([rule(match={"(0012,0062)": True})], r"match.\(0012,0062\).equals: got the boolean True.*quote"),
    ([rule(match={"ReferencedImageSequence": "x"})], r"ReferencedImageSequence is a sequence"),
    ([rule(match={"(7FE0,0010)": {"missing": True}})], r"at or after Pixel Data"),
    ([rule(match={"sop_class_uid": "CTImageStorag"})], r"neither a UID nor the keyword.*did you mean CTImageStorage"),
    ([rule(match={"modality": {"not": {"not": {"equals": "CT"}}}})], r"match.modality.not: 'not' takes one operator"),
    ([rule(), rule()], r"rule 2 \('r1'\): name: another rule is called 'r1'"),
    ([rule(name="projection")], r"name: 'projection' is the name of a built-in default rule"),
    ([rule(name="has space")], r"rule 1 \('has space'\): name: expected 1-64 letters"),
    ({"name": "r1"}, r"rules: expected list, got dict"),
])
def test_bad_rules_are_refused_naming_the_rule_and_the_field(tmp_path, rules, message):
    with pytest.raises(ConfigError, match=message) as error:
        config_with(tmp_path, rules)
    assert str(error.value).startswith("router.yaml: rule")


def test_a_destination_called_model_is_reserved(tmp_path):
    with pytest.raises(ConfigError, match=r"destinations.model: 'model' is reserved"):
        config_with(tmp_path, [], {**FOLDERS, "model": {"folder": "m"}})


def test_the_router_refuses_a_bad_rule_at_start_with_exit_code_2(tmp_path, capsys):
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"model": "m.keras", "destinations": FOLDERS, "rules": [rule()]}))
    assert router_script.main(["--config", str(path), "--check"]) == 2
    assert "rule 1 ('r1'): destination: unknown destination 'pass_through'" in capsys.readouterr().err


def test_rule_destinations_and_pass_through_are_known_routes(tmp_path):
    config = config_with(tmp_path, [rule(destination="research")],
                         {**FOLDERS, "pass_through": {"folder": "p"}, "research": {"folder": "r"}})
    config.check_routes(CLASSES)  # research is used by a rule, pass_through by the default: no "unknown label"
    unused = config_with(tmp_path, [], {**FOLDERS, "research": {"folder": "r"}})
    with pytest.raises(ConfigError, match=r"destinations for unknown labels \['research'\]"):
        unused.check_routes(CLASSES)


# --- matching ---------------------------------------------------------------------------------


def first_rule(tmp_path, match, path, **item_fields) -> str:
    """Name of the rule that decides ``path`` when one rule ``match`` precedes the default."""
    config = config_with(tmp_path, [{"name": "tested", "match": match, "destination": "research"}],
                         {**FOLDERS, "research": {"folder": "r"}, "pass_through": {"folder": "p"}})
    return config.rule_set().decide(item(path, **item_fields), path).decided_by


@pytest.mark.parametrize("match, hits", [
    ({"modality": "DX"}, True),
    ({"modality": {"equals": "CR"}}, False),
    ({"modality": ["CR", "DX"]}, True),
    ({"modality": {"in": ["CT", "MR"]}}, False),
    ({"BodyPartExamined": {"regex": "L?SPINE"}}, True),
    ({"BodyPartExamined": {"regex": "SPINE"}}, False),  # the whole value must match
    ({"BodyPartExamined": {"regex": "(?i)lspine"}}, True),
    ({"(0018,0015)": "LSPINE"}, True),  # the same attribute by tag
    ({"00180015": "LSPINE"}, True),
    ({"0018,0015": {"equals": "CHEST"}}, False),
    ({"ViewPosition": {"missing": True}}, True),
    ({"ViewPosition": {"missing": False}}, False),
    ({"BodyPartExamined": {"missing": True}}, False),
    ({"BodyPartExamined": {"not": {"missing": True}}}, True),
    ({"modality": {"not": ["CT", "MR"]}}, True),
    ({"modality": {"not": {"equals": "DX"}}}, False),
    ({"ImageType": "PRIMARY"}, True),  # one of several values
    ({"ImageType": {"regex": ".*LOCALIZER.*"}}, False),
    ({"calling_ae": "XR_ROOM3"}, True),
    ({"calling_ae": "OTHER"}, False),
    ({"modality": "DX", "calling_ae": "OTHER"}, False),  # every field must hold
    ({"sop_class_uid": "DigitalXRayImageStorageForPresentation"}, True),  # a UID by keyword
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1"}, True),
])
def test_operators_on_keywords_tags_and_queue_fields(tmp_path, match, hits):
    path = xray(tmp_path / "dx.dcm")
    decided = first_rule(tmp_path, match, path, calling_ae="XR_ROOM3",
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1")
    assert decided == ("rule:tested" if hits else "rule:projection")


def test_the_first_matching_rule_wins(tmp_path):
    path = xray(tmp_path / "dx.dcm")
    a = {"name": "by-modality", "match": {"modality": "DX"}, "destination": "spine"}
    b = {"name": "by-body-part", "match": {"BodyPartExamined": "LSPINE"}, "destination": "others"}
    decision = config_with(tmp_path, [a, b]).rule_set().decide(item(path), path)
    assert (decision.decided_by, decision.destination) == ("rule:by-modality", "spine")
    decision = config_with(tmp_path, [b, a]).rule_set().decide(item(path), path)
    assert (decision.decided_by, decision.destination) == ("rule:by-body-part", "others")


def test_rules_on_queue_fields_do_not_read_the_file(tmp_path):
    """A rule on calling_ae decides even a file that is not DICOM at all; the default then needs the header."""
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a DICOM file")
    rules = config_with(tmp_path, [{"name": "room3", "match": {"calling_ae": "XR_ROOM3"}, "destination": "spine"}])
    assert rules.rule_set().decide(item(garbage, calling_ae="XR_ROOM3"), garbage).decided_by == "rule:room3"
    decision = rules.rule_set().decide(item(garbage, calling_ae="OTHER"), garbage)
    assert (decision.destination, decision.decided_by) == ("unreadable", "header_unreadable")
    assert decision.reason.startswith("header_unreadable: InvalidDicomError")


# --- the built-in default -----------------------------------------------------------------------


def default_decision(path: Path, *, pass_through: bool, sop_class_uid: str = ""):
    destinations = {*CLASSES, "uncertain", "unreadable", *(["pass_through"] if pass_through else [])}
    return RuleSet((), destinations).decide(item(path, sop_class_uid=sop_class_uid), path)


@pytest.mark.parametrize("modality, sop_class, to_model", [
    ("CR", None, True),
    ("DX", None, True),
    ("DR", None, True),
    ("RG", SecondaryCaptureImageStorage, True),  # a digitised film
    ("CT", CTImageStorage, False),
    ("MR", MRImageStorage, False),
    ("MG", DigitalMammographyXRayImageStorageForPresentation, False),  # projection, but not a body part it knows
    ("OT", "1.2.840.10008.5.1.4.1.1.1.1", False),  # the Modality says what it is, whatever the SOP class
    (None, "1.2.840.10008.5.1.4.1.1.1.1", True),  # no Modality: a Digital X-Ray SOP class goes to the model
    (None, "1.2.840.10008.5.1.4.1.1.1", True),  # Computed Radiography
    (None, SecondaryCaptureImageStorage, False),  # nothing says it is an X-ray
])
def test_only_projection_radiography_goes_to_the_model_by_default(tmp_path, modality, sop_class, to_model):
    extra = {"SOPClassUID": sop_class} if sop_class else {}
    path = xray(tmp_path / "x.dcm", modality or "DX", **extra)
    if modality is None:
        ds = pydicom.dcmread(path)
        del ds.Modality
        ds.save_as(path, enforce_file_format=True)
    with_pass_through = default_decision(path, pass_through=True)
    without = default_decision(path, pass_through=False)
    if to_model:
        assert with_pass_through.destination == without.destination == MODEL
    else:
        assert (with_pass_through.destination, with_pass_through.decided_by) == ("pass_through", "rule:not-projection")
        assert with_pass_through.reason == ""
        assert without.destination == "unreadable"  # never a body-part destination
        assert without.reason.startswith(f"{NOT_PROJECTION}: Modality {modality or '(none)'}, SOP class")


def test_a_report_without_modality_or_sop_class_in_the_queue_is_not_projection(tmp_path):
    sr = write_non_image(tmp_path / "sr.dcm", BasicTextSRStorage, PatientID="X")  # no Modality at all
    decision = default_decision(sr, pass_through=False)
    assert decision.destination == "unreadable" and "Modality (none), SOP class 1.2.840.10008.5.1.4.1.1.88.11" \
        in decision.reason


@pytest.mark.parametrize("damage", ["not_dicom", "broken_sequence"])
def test_a_header_that_cannot_be_parsed_goes_to_unreadable_with_the_reason(tmp_path, damage):
    path = xray(tmp_path / "x.dcm")
    data = path.read_bytes()
    if damage == "not_dicom":
        data = b"\0" * 300
    else:  # an undefined-length sequence whose item runs past the end of the file, before Modality
        at = data.find(b"\x08\x00\x60\x00CS")
        data = data[:at] + b"\x08\x00\x11\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\x10\x00\x00\x00" + b"\x01" * 5
    path.write_bytes(data)
    decision = default_decision(path, pass_through=True)
    assert (decision.destination, decision.decided_by) == ("unreadable", "header_unreadable")
    assert decision.reason.startswith(f"header_unreadable: {'InvalidDicomError' if damage == 'not_dicom' else 'OSError'}")


def test_a_header_cut_short_says_nothing_about_projection_and_stays_away_from_the_model(tmp_path):
    """pydicom reads what is there: a file cut inside its meta has no Modality and no SOP class."""
    path = xray(tmp_path / "x.dcm")
    path.write_bytes(path.read_bytes()[:200])
    decision = default_decision(path, pass_through=True)
    assert (decision.destination, decision.decided_by) == ("pass_through", "rule:not-projection")


# --- end to end: pynetdicom C-STORE into a running router -----------------------------------------


def test_ct_and_mr_go_to_pass_through_without_the_model_and_x_rays_are_classified(router, peers, tmp_path,
                                                                                   monkeypatch):
    body, archive = peers("BODYPART"), peers("ARCHIVE")
    node = router({**{c: body.node() for c in CLASSES}, "uncertain": body.node(), "pass_through": archive.node()},
                  rules=[{"name": "room3-chest", "match": {"calling_ae": "ROOM3"}, "destination": "adult_chest"}])
    seen_by_model: list[str] = []
    engine_decode = node.classifier.engine.decode

    def spy(paths):
        seen_by_model.extend(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths)
        return engine_decode(paths)

    monkeypatch.setattr(node.classifier.engine, "decode", spy)
    ct = xray(tmp_path / "ct.dcm", "CT", SOPClassUID=CTImageStorage)
    mr = xray(tmp_path / "mr.dcm", "MR", SOPClassUID=MRImageStorage)
    cr, dx = xray(tmp_path / "cr.dcm", "CR"), xray(tmp_path / "dx.dcm", "DX")
    room3 = xray(tmp_path / "room3.dcm", "DX")
    uids = {name: str(pydicom.dcmread(p).SOPInstanceUID) for name, p in
            {"ct": ct, "mr": mr, "cr": cr, "dx": dx, "room3": room3}.items()}
    assert send(node.port, [ct, mr, cr, dx]) == [0] * 4
    assert send(node.port, [room3], calling="ROOM3") == [0]

    wait_for(lambda: {uids["ct"], uids["mr"]} <= set(archive.received), TIMEOUT, "CT and MR at the archive")
    wait_for(lambda: {uids["cr"], uids["dx"], uids["room3"]} <= set(body.received), TIMEOUT, "the X-rays")
    assert set(archive.received) == {uids["ct"], uids["mr"]}
    assert set(seen_by_model) == {uids["cr"], uids["dx"]}  # CT, MR and the ROOM3 image never reached the model

    rows = {i.sop_instance_uid: i for i in node.queue.items()}
    assert rows[uids["ct"]].decided_by == rows[uids["mr"]].decided_by == "rule:not-projection"
    assert rows[uids["ct"]].route == "pass_through" and rows[uids["ct"]].model_id == ""
    assert rows[uids["room3"]].decided_by == "rule:room3-chest" and rows[uids["room3"]].route == "adult_chest"
    assert rows[uids["cr"]].decided_by == rows[uids["dx"]].decided_by == "model:test-brightness"
    assert rows[uids["dx"]].label == "spine"  # the model decided it (the spine brightness)
    classified = {r["sop_instance_uid"]: r for r in read_audit(node.config.audit_log) if r["event"] == "classified"}
    assert classified[uids["ct"]]["decided_by"] == "rule:not-projection" and classified[uids["ct"]]["modality"] == "CT"
    assert classified[uids["mr"]]["route"] == "pass_through" and classified[uids["mr"]]["confidence"] is None
    assert classified[uids["room3"]]["decided_by"] == "rule:room3-chest"
    assert classified[uids["dx"]]["decided_by"] == "model:test-brightness" and classified[uids["dx"]]["label"] == "spine"
    started = next(r for r in read_audit(node.config.audit_log) if r["event"] == "started")
    assert started["rules"][0] == "room3-chest: calling_ae equals ROOM3 -> adult_chest"


def test_without_pass_through_ct_is_quarantined_with_the_reason_and_a_broken_spool_file_does_not_stall(
        router, peers, tmp_path):
    body = peers("BODYPART")
    node = router({**{c: body.node() for c in CLASSES}, "uncertain": body.node()})  # unreadable: quarantine folder
    ct = xray(tmp_path / "ct.dcm", "CT", SOPClassUID=CTImageStorage)
    dx = xray(tmp_path / "dx.dcm")
    node.queue.store(b"no DICOM here", sop_instance_uid="1.2.999", sop_class_uid=CTImageStorage,
                     transfer_syntax="1.2.840.10008.1.2.1")  # a spool file whose header cannot be read
    assert send(node.port, [ct, dx]) == [0, 0]
    quarantine = node.config.destinations["unreadable"].folder
    wait_for(lambda: len(list(quarantine.glob("*.json"))) == 2, TIMEOUT, "CT and the broken file in the quarantine")
    wait_for(lambda: str(pydicom.dcmread(dx).SOPInstanceUID) in body.received, TIMEOUT, "the X-ray")
    sidecars = {(d := json.loads(p.read_text()))["sop_instance_uid"]: d for p in quarantine.glob("*.json")}
    ct_uid = str(pydicom.dcmread(ct).SOPInstanceUID)
    assert set(sidecars) == {ct_uid, "1.2.999"} and ct_uid not in body.received
    assert sidecars[ct_uid]["reason"].startswith(f"{NOT_PROJECTION}: Modality CT, SOP class 1.2.840.10008.5.1.4.1.1.2")
    assert sidecars["1.2.999"]["reason"].startswith("header_unreadable: InvalidDicomError")
    rows = {i.sop_instance_uid: i for i in node.queue.items()}
    assert rows["1.2.999"].decided_by == "header_unreadable" and rows["1.2.999"].label == "unreadable"


# --- --check, --status, the queue's migration ----------------------------------------------------


def test_check_prints_the_rules_in_order_with_their_destinations_and_the_default(tmp_path, model_file, capsys):
    config = write_config(tmp_path / "router.yaml", port=free_port(), spool=tmp_path / "spool", model=model_file,
                          destinations={**{c: {"folder": str(tmp_path / c)} for c in (*CLASSES, "uncertain")},
                                        "pass_through": {"folder": str(tmp_path / "archive")}},
                          rules=[{"name": "ct-mr", "match": {"modality": ["CT", "MR"]}, "destination": "pass_through"},
                                 {"name": "no-part", "match": {"BodyPartExamined": {"missing": True}},
                                  "destination": "uncertain"}])
    assert router_script.main(["--config", str(config), "--check"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line[:5].strip().rstrip(".").isdigit()]
    assert [line.split()[2] for line in lines] == ["ct-mr", "no-part", "projection", "projection-sop-class",
                                                   "not-projection"]
    assert lines[0].split()[1] == "rule" and lines[2].split()[1] == "default"
    assert "modality in [CT, MR]  -> pass_through (folder:" in lines[0]
    assert "BodyPartExamined missing  -> uncertain (folder:" in lines[1]
    assert "modality in [CR, DX, DR, RG]  -> model (classify)" in lines[2]
    assert "anything else  -> pass_through (folder:" in lines[4] and "archive" in lines[4]
    without = yaml.safe_load(config.read_text())
    del without["destinations"]["pass_through"], without["rules"]
    config.write_text(yaml.safe_dump(without))
    assert router_script.main(["--config", str(config), "--check"]) == 0
    last = next(line for line in capsys.readouterr().out.splitlines() if "not-projection" in line)
    assert f"-> unreadable (folder:{tmp_path / 'spool' / 'quarantine'}), reason {NOT_PROJECTION}" in last


def test_status_counts_decisions_by_rule_and_model(tmp_path, model_file, capsys):
    config = write_config(tmp_path / "router.yaml", port=free_port(), spool=tmp_path / "spool", model=model_file,
                          destinations={c: {"folder": "out"} for c in [*CLASSES, "uncertain", "pass_through"]})
    spool = q.SpoolQueue(tmp_path / "spool")
    a, b, c, d = (spool.store(u.encode(), sop_instance_uid=u, sop_class_uid="1.2", transfer_syntax="1.2")[0]
                  for u in ("1.1", "1.2", "1.3", "1.4"))
    spool.set_classified([q.Classification(a.id, "pass_through", None, "", "pass_through", "", "rule:ct"),
                          q.Classification(b.id, "pass_through", None, "", "pass_through", "", "rule:ct"),
                          q.Classification(c.id, "spine", 0.9, "m", "spine", "", "model:m")])
    spool.close()
    assert router_script.main(["--config", str(config), "--status"]) == 0
    assert "  decided by: rule:ct 2, model:m 1\n" in capsys.readouterr().out  # d (received) is not counted
    assert d.decided_by == ""


def test_an_older_spool_database_gets_the_decided_by_column(tmp_path):
    root = tmp_path / "spool"
    (root / "files").mkdir(parents=True)
    db = sqlite3.connect(root / "queue.sqlite3")
    schema = q._SCHEMA.replace(",\n    decided_by TEXT NOT NULL DEFAULT ''", "")
    assert "decided_by" not in schema
    db.executescript(schema)
    db.execute("INSERT INTO items (file, sop_instance_uid, state, label, route, received_at, updated_at)"
               " VALUES ('1.dcm', '1.2.3', 'forwarded', 'spine', 'spine', 1, 1)")
    db.commit()
    db.close()
    assert q.read_summary(root, "unreadable").decided_by == {}  # --status before the new router opened it
    spool = q.SpoolQueue(root)
    try:
        assert spool.items()[0].decided_by == ""
        assert q.read_summary(root, "unreadable").decided_by == {q.UNRECORDED: 1}
    finally:
        spool.close()


def test_parse_rules_without_rules_is_empty():
    assert parse_rules(None, {"unreadable"}, "x") == () and parse_rules([], {"unreadable"}, "x") == ()


def test_the_commented_rules_of_the_example_file_are_valid(tmp_path):
    """router.example.yaml shows rules and pass_through commented out: uncommented, they load and take effect."""
    from .conftest import ROOT

    text = (ROOT / "router.example.yaml").read_text()
    start = text.index("# rules:")
    uncommented = text[:start] + "\n".join(line[2:] for line in text[start:].splitlines() if line.startswith("# "))
    uncommented = uncommented.replace("  # pass_through:", "  pass_through:")
    path = tmp_path / "router.yaml"
    path.write_text(uncommented)
    from utils.routing.operations.config import load_config

    config = load_config(path)
    assert [r.name for r in config.rules] == ["ct-mr-us", "scanned-films-to-model", "localizers-away"]
    assert config.rule_set().pass_through and config.destinations["pass_through"].port == 11206
