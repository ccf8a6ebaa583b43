"""Shadow mode (utils/routing/decision/shadow.py): the shadow block checked at start, objects forwarded by the site's rule while
the model's decision is recorded, and the report on a hand-made audit log and after a real trial run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

import router
from utils.config import ConfigError
from utils.infer.decisions import tag_classes, tag_disagrees
from utils.io.dicom_writer import write_dicom
from utils.routing.operations.audit import AuditLog, read_audit
from utils.routing.operations.config import load_config
from utils.routing.decision.shadow import Proportion, build_report, parse_time, wilson

from .conftest import (
    CLASSES,
    ROOT,
    ROWS_BY_CLASS,
    UNCERTAIN_ROWS,
    bright_rows_image,
    expected_labels,
    free_port,
    needs_dcmtk,
    node,
    received_files,
    send,
    start_router,
    start_storescp,
    storescu,
    wait_for,
    write_config,
)

FOLDERS = {c: {"folder": c} for c in (*CLASSES, "uncertain", "pacs", "chest_ai", "pass_through")}
BODY_PART_MAP = {"shadow": {"body_part_map": {"CHEST": "chest_ai", "abdomen": "pacs"}, "default": "pacs"}}


def write(tmp_path: Path, **settings) -> Path:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"model": "model.keras", "destinations": FOLDERS, **settings}))
    return path


# --- configuration ----------------------------------------------------------------------------


def test_route_mode_is_the_default_and_has_no_shadow_rule(tmp_path):
    config = load_config(write(tmp_path))
    assert (config.mode, config.shadow) == ("route", None)
    assert config.to_dict()["shadow"] is None and config.to_dict()["mode"] == "route"


def test_a_body_part_map_matches_trimmed_and_in_any_case(tmp_path):
    config = load_config(write(tmp_path, mode="shadow", **BODY_PART_MAP))
    rule = config.shadow
    assert rule.decided_by == "shadow:body_part_map"
    assert [rule.route(t) for t in ("CHEST", " chest ", "Abdomen", "LSPINE", "", None)] == \
        ["chest_ai", "chest_ai", "pacs", "pacs", "pacs", "pacs"]
    assert config.to_dict()["shadow"] == {"body_part_map": {"CHEST": "chest_ai", "ABDOMEN": "pacs"}, "default": "pacs"}
    config.check_routes(CLASSES)  # chest_ai and pacs are known routes in shadow mode


def test_status_says_the_router_is_in_a_trial(tmp_path, capsys):
    from utils.routing.operations import service
    from utils.routing.queue import SpoolQueue

    for settings, shown in (({}, False), ({"mode": "shadow", **BODY_PART_MAP}, True)):
        config = load_config(write(tmp_path, spool_dir=str(tmp_path / "spool"), **settings))
        SpoolQueue(config.spool_dir).close()
        assert service.print_status(config) == 0
        out = capsys.readouterr().out
        assert ("mode: shadow, shadow rule body_part_map" in out) is shown, out


def test_a_fixed_destination_takes_everything(tmp_path):
    rule = load_config(write(tmp_path, mode="shadow", shadow={"destination": "pacs"})).shadow
    assert (rule.route("CHEST"), rule.route(None), rule.decided_by) == ("pacs", "pacs", "shadow:destination")


def test_a_shadow_destination_outside_shadow_mode_is_an_unknown_route(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown labels \['chest_ai', 'pacs'\]"):
        load_config(write(tmp_path)).check_routes(CLASSES)


@pytest.mark.parametrize(("settings", "message"), [
    ({"mode": "shadow"}, r"router.yaml: mode: shadow needs a shadow block"),
    ({"shadow": {"destination": "pacs"}}, r"shadow: a shadow block without 'mode: shadow'.*model's label"),
    ({"mode": "shadwo"}, r"router.yaml: mode must be one of \('route', 'shadow'\), got 'shadwo'"),
    ({"mode": "shadow", "shadow": "pacs"}, r"router.yaml: shadow: expected dict"),
    ({"mode": "shadow", "shadow": {}}, r"give exactly one of 'destination'.*not neither"),
    ({"mode": "shadow", "shadow": {"destination": "pacs", "body_part_map": {"CHEST": "pacs"}}}, r"not both"),
    ({"mode": "shadow", "shadow": {"destinaton": "pacs"}}, r"shadow: unknown key 'destinaton' \(did you mean"),
    ({"mode": "shadow", "shadow": {"destination": "pacss"}},
     r"shadow.destination: unknown destination 'pacss' \(did you mean pacs\?\)"),
    ({"mode": "shadow", "shadow": {"destination": "pacs", "default": "pacs"}}, r"shadow.default: goes with body_part_map"),
    ({"mode": "shadow", "shadow": {"body_part_map": {}, "default": "pacs"}}, r"body_part_map: expected a non-empty"),
    ({"mode": "shadow", "shadow": {"body_part_map": {"CHEST": "pacs"}}}, r"shadow.default: required with body_part_map"),
    ({"mode": "shadow", "shadow": {"body_part_map": {"CHEST": "chest", "KNEE": "pacs"}, "default": "pacs"}},
     r"shadow.body_part_map.CHEST: unknown destination 'chest' \(did you mean chest_ai\?\)"),
    ({"mode": "shadow", "shadow": {"body_part_map": {"CHEST": "pacs", "chest ": "pacs"}, "default": "pacs"}},
     r"'CHEST' and 'chest ' are the same tag"),
    ({"mode": "shadow", "shadow": {"body_part_map": {"CHEST": "pacs"}, "default": "nowhere"}},
     r"shadow.default: unknown destination 'nowhere'"),
    ({"mode": "shadow", "shadow": {"body_part_map": {1: "pacs"}, "default": "pacs"}}, r"expected a BodyPartExamined"),
])
def test_bad_shadow_settings_are_refused_at_start(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, **settings))


def test_check_prints_the_mode_and_the_shadow_rule(tmp_path, model_file, capsys):
    path = write(tmp_path, model=str(model_file), spool_dir=str(tmp_path / "spool"), mode="shadow", **BODY_PART_MAP)
    assert router.main(["--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "mode: shadow" in out
    assert "shadow rule body_part_map (BodyPartExamined, trimmed, any case): CHEST -> chest_ai, ABDOMEN -> pacs; " \
           "otherwise -> pacs" in out


def test_tag_classes_is_the_mapping_behind_tag_disagrees():
    for tag in ("CHEST", "chest", "L-SPINE", "ABDOMEN", "KNEE", "OTHERS"):
        for label in CLASSES:
            assert (label not in tag_classes(tag, CLASSES)) == tag_disagrees(label, tag, CLASSES), (tag, label)
    assert tag_classes("CHEST", CLASSES) == {"adult_chest", "pediatric_chest"}
    assert tag_classes("KNEE", CLASSES) == {"others"}  # no class claims it: the catch-all does
    assert tag_classes("KNEE", CLASSES[:4]) == frozenset()  # ... and without one, no class
    assert tag_classes("", CLASSES) == tag_classes(None, CLASSES) == frozenset()


# --- the report on a hand-made audit log --------------------------------------------------------


def classified(uid: str, time: str, label: str, top: str | None, confidence: float | None, tag: str | None,
               route: str, **extra) -> dict:
    return {"time": time, "event": "classified", "sop_instance_uid": uid, "item": 1, "label": label,
            "top_label": top, "confidence": confidence, "model_id": "m", "route": route, "reason": None,
            "body_part_examined": tag, "decided_by": "shadow:body_part_map", "mode": "shadow", "model_route": label,
            **extra}


def corrected(uid: str, time: str, label: str, previous: str) -> dict:
    return {"time": time, "event": "corrected", "sop_instance_uid": uid, "label": label, "previous_label": previous,
            "who": "dr.a"}


def trial_log(path: Path) -> Path:
    """A hand-made trial: numbers worked out in test_report_numbers_by_hand."""
    day = "2026-03-01T"
    records = [
        {"time": "2026-02-01T08:00:00.000+00:00", "event": "started", "threshold": 0.6, "class_names": list(CLASSES)},
        classified("H", "2026-02-01T09:00:00.000+00:00", "adult_chest", "adult_chest", 0.99, "CHEST", "chest_ai"),
        classified("B", day + "09:00:00.000+00:00", "uncertain", "spine", 0.55, "CHEST", "chest_ai"),  # superseded
        classified("A", day + "10:00:00.000+00:00", "adult_chest", "adult_chest", 0.9, "CHEST", "chest_ai"),
        classified("B", day + "10:05:00.000+00:00", "spine", "spine", 0.8, "CHEST", "chest_ai"),
        classified("C", day + "10:10:00.000+00:00", "uncertain", "abdominal", 0.5, "", "pacs"),
        classified("D", day + "10:15:00.000+00:00", "others", "others", 0.7, "KNEE", "pacs"),
        classified("E", day + "10:20:00.000+00:00", "spine", "spine", 0.65, "LSPINE", "pacs"),
        classified("F", day + "10:25:00.000+00:00", "unreadable", None, None, "CHEST", "pacs"),
        {"time": day + "10:30:00.000+00:00", "event": "classified", "sop_instance_uid": "G", "label": "pass_through",
         "route": "pass_through", "decided_by": "rule:not-projection", "modality": "CT"},
        {"time": day + "10:31:00.000+00:00", "event": "forwarded", "sop_instance_uid": "A", "status": "0x0000"},
        corrected("A", day + "12:00:00.000+00:00", "pediatric_chest", "adult_chest"),
        corrected("B", day + "12:01:00.000+00:00", "adult_chest", "spine"),
        corrected("C", day + "12:02:00.000+00:00", "abdominal", "uncertain"),
        corrected("H", day + "12:03:00.000+00:00", "adult_chest", "adult_chest"),
        corrected("A", "2026-04-01T12:00:00.000+00:00", "adult_chest", "pediatric_chest"),  # later: this one wins
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"time": "torn')
    return path


def test_report_numbers_by_hand(tmp_path):
    report = build_report(trial_log(tmp_path / "audit.jsonl"), since="2026-03-01")
    assert (report.threshold, report.class_names) == (0.6, list(CLASSES))
    assert (report.classified, report.readable, report.unreadable, report.repeated) == (6, 5, 1, 1)
    assert report.modes == {"shadow": 6} and report.by_rule == {"rule:not-projection": 1}
    # tag: A agrees, B (spine, CHEST) disagrees, C has none, D (others, KNEE: no class claims it) agrees, E agrees
    assert (report.tag_agreement.k, report.tag_agreement.n) == (3, 4)
    assert (report.tag_missing, report.tag_unmapped, report.tag_catch_all) == (1, 0, 1)
    assert report.tag_table == {"CHEST": {"adult_chest": 1, "spine": 1}, "(missing)": {"abdominal": 1},
                                "KNEE": {"others": 1}, "LSPINE": {"spine": 1}}
    # corrections: A right (the later correction wins), B wrong, C right; H is outside the period
    assert (report.reviewed.k, report.reviewed.n) == (2, 3)
    assert report.confusion == {"adult_chest": {"adult_chest": 1}, "spine": {"adult_chest": 1},
                                "abdominal": {"abdominal": 1}}
    assert (report.corrections, report.corrections_elsewhere) == (4, 1)
    # confidence >= 0.6: A, B, D, E of the 5 readable; of those A and B reviewed (1 right), A B D E tagged (3 agree)
    assert (report.auto_routed.k, report.auto_routed.n) == (4, 5)
    assert (report.auto_vs_corrections.k, report.auto_vs_corrections.n) == (1, 2)
    assert (report.auto_vs_tag.k, report.auto_vs_tag.n) == (3, 4)
    assert report.routes == {"adult_chest": {"chest_ai": 1}, "spine": {"chest_ai": 1, "pacs": 1},
                             "uncertain": {"pacs": 1}, "others": {"pacs": 1}, "unreadable": {"pacs": 1}}
    assert (report.first, report.last) == ("2026-03-01T10:00:00Z", "2026-03-01T10:25:00Z")


def test_report_threshold_and_period(tmp_path):
    log = trial_log(tmp_path / "audit.jsonl")
    strict = build_report(log, since="2026-03-01", threshold=0.85)
    assert (strict.auto_routed.k, strict.auto_routed.n) == (1, 5)  # only A (0.9)
    assert strict.routes["uncertain"] == {"chest_ai": 1, "pacs": 3}  # B, C, D, E would wait for review
    everything = build_report(log)
    assert everything.classified == 7 and everything.corrections_elsewhere == 0
    assert (everything.reviewed.k, everything.reviewed.n) == (3, 4)  # H confirmed by its reviewer
    february = build_report(log, until="2026-02-28")  # a date alone: that whole day included
    assert february.classified == 1 and february.first == "2026-02-01T09:00:00Z"
    assert build_report(log, until="2026-03-01").classified == 7  # the 1st included
    late = build_report(log, since="2026-03-01T10:02:00Z", until="2026-03-01T10:16+00:00")
    assert late.classified == 3 and late.repeated == 0  # B's later line, C, D; A (10:00) is before
    empty = build_report(log, since="2030-01-01")
    assert empty.classified == 0 and empty.auto_routed.describe() == "no evidence (n=0)"
    assert any("nothing to judge" in n for n in empty.notes)


def test_report_without_class_names_or_threshold_says_where_it_got_them(tmp_path):
    records = [classified("A", "2026-03-01T10:00:00+00:00", "spine", "spine", 0.9, "KNEE", "pacs"),
               classified("B", "2026-03-01T10:01:00+00:00", "uncertain", "spine", 0.4, "LSPINE", "pacs"),
               # a line written after a crash by reconciliation: only the queue's columns, the time in "at"
               {"time": "2026-04-01T00:00:00+00:00", "at": "2026-03-01T10:02:00Z", "event": "classified",
                "sop_instance_uid": "C", "label": "spine", "confidence": 0.9, "route": "pacs",
                "decided_by": "shadow:body_part_map", "reconciled": True},
               {"time": "2026-04-01T00:00:00+00:00", "at": "2026-03-01T10:03:00Z", "event": "classified",
                "sop_instance_uid": "D", "label": "uncertain", "confidence": 0.3, "route": "pacs",
                "decided_by": "shadow:body_part_map", "reconciled": True}]
    path = tmp_path / "audit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = build_report(path, until="2026-03-02")
    assert report.class_names == ["spine"] and "inferred" in report.class_names_source
    assert report.threshold is None and report.auto_routed.k == 2  # the recorded labels: A and C
    assert (report.tag_unmapped, report.tag_missing, report.tag_agreement.n) == (1, 1, 1)  # KNEE: no class; C: none
    assert report.modes == {"shadow": 4} and (report.readable, report.unreadable) == (4, 0)
    assert report.routes == {"spine": {"pacs": 2}, "uncertain": {"pacs": 2}}
    assert any("threshold is unknown" in n for n in report.notes)
    assert any(n.startswith("1 uncertain objects have no top label") for n in report.notes)


def test_wilson_interval_and_thin_evidence():
    low, high = wilson(4, 5)
    assert (round(low, 4), round(high, 4)) == (0.3755, 0.9638)
    assert wilson(0, 0) == (0.0, 1.0) and wilson(10, 10)[1] == 1.0
    assert Proportion(4, 5).describe() == "80.0% (4/5; 95% CI 37.6-96.4%; thin evidence, n=5)"
    assert "thin" not in Proportion(300, 400).describe()
    assert Proportion(3, 4).to_dict() == {"k": 3, "n": 4, "rate": 0.75, "ci95": list(wilson(3, 4)), "thin": True}


def test_report_renders_as_markdown_html_and_json(tmp_path):
    report = build_report(trial_log(tmp_path / "audit.jsonl"), since="2026-03-01")
    markdown = report.to_markdown()
    assert "Model agrees with the BodyPartExamined tag: 75.0% (3/4; 95% CI" in markdown
    assert "Would have been routed automatically (confidence >= 0.6): 80.0% (4/5;" in markdown
    assert "| spine | chest_ai | 1 |" in markdown and "Thin evidence" in markdown
    html = report.to_html()
    assert html.startswith("<h1>Shadow mode report</h1>") and "<script" not in html
    assert "<td>spine</td><td>pacs</td><td>1</td>" in html and "model \\ reviewer" in html
    data = json.loads(json.dumps(report.to_dict()))
    assert data["auto_vs_corrections"]["n"] == 2 and data["routes"]["spine"] == {"chest_ai": 1, "pacs": 1}


def test_parse_time():
    assert parse_time("2026-03-01").isoformat() == "2026-03-01T00:00:00+00:00"
    assert parse_time("2026-03-01", end=True).isoformat() == "2026-03-02T00:00:00+00:00"
    assert parse_time("2026-03-01T08:00+01:00").isoformat() == "2026-03-01T07:00:00+00:00"
    assert parse_time("2026-03-01T08:00Z") == parse_time("2026-03-01 08:00")
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("last week")


def test_report_command_line(tmp_path, capsys):
    spool = tmp_path / "spool"
    spool.mkdir()
    trial_log(spool / "audit.jsonl")
    path = write(tmp_path, spool_dir=str(spool), threshold=0.6, mode="shadow", **BODY_PART_MAP)
    out = tmp_path / "report.json"
    assert router.main(["--config", str(path), "--shadow-report", "--since", "2026-03-01", "--output", str(out)]) == 0
    assert "# Shadow mode report" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert (data["classified"], data["threshold"], data["nodes"]["pacs"]) == (6, 0.6, f"folder:{tmp_path / 'pacs'}")
    assert router.main(["--config", str(path), "--shadow-report", "--threshold", "0.85", "--since", "2026-03-01",
                        "--output", str(tmp_path / "r.html")]) == 0
    assert "<h1>" in (tmp_path / "r.html").read_text() and "threshold 0.85" in capsys.readouterr().out
    assert router.main(["--config", str(path), "--shadow-report", "--since", "yesterday"]) == 2
    assert router.main(["--config", str(path), "--shadow-report", "--output", "r.txt"]) == 2
    assert "expected a .json, .md or .html file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        router.parse_args(["--config", str(path), "--since", "2026-03-01"])
    assert "go with --shadow-report" in capsys.readouterr().err


# --- in-process: what the queue and the audit record ----------------------------------------------


def test_shadow_mode_records_the_model_and_forwards_by_the_rule(tmp_path, router, model_file):
    """pynetdicom only (no dcmtk): the queue row keeps the model's label, its route is the shadow rule's."""
    folders = {route: {"folder": str(tmp_path / "out" / route)} for route in FOLDERS}
    files = [write_dicom(tmp_path / "in" / "spine_as_chest.dcm", bright_rows_image(ROWS_BY_CLASS["spine"]),
                         body_part="CHEST", bits_stored=12),
             write_dicom(tmp_path / "in" / "untagged.dcm", bright_rows_image(ROWS_BY_CLASS["abdominal"]),
                         bits_stored=12),
             write_dicom(tmp_path / "in" / "ct.dcm", bright_rows_image(20), modality="CT", body_part="CHEST")]
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    node_ = router(folders, mode="shadow", **BODY_PART_MAP)
    assert send(node_.port, files) == [0, 0, 0]
    wait_for(lambda: node_.queue.counts().get("forwarded", 0) == 3, 60, "three objects delivered")
    rows = {i.sop_instance_uid: i for i in node_.queue.items()}
    assert [(rows[u].label, rows[u].route, rows[u].decided_by) for u in uids] == [
        ("spine", "chest_ai", "shadow:body_part_map"), ("abdominal", "pacs", "shadow:body_part_map"),
        ("pass_through", "pass_through", "rule:not-projection")]
    lines = {r["sop_instance_uid"]: r for r in read_audit(node_.config.audit_log) if r["event"] == "classified"}
    spine = lines[uids[0]]
    assert (spine["mode"], spine["model_route"], spine["route"], spine["tag_disagrees"]) == \
        ("shadow", "spine", "chest_ai", True)
    assert set(spine["probabilities"]) == set(CLASSES) and max(spine["probabilities"].values()) == \
        round(spine["confidence"], 4)
    assert "mode" not in lines[uids[2]]  # a rule's decision is recorded as in route mode
    started = next(r for r in read_audit(node_.config.audit_log) if r["event"] == "started")
    assert started["mode"] == "shadow" and started["class_names"] == list(CLASSES)
    assert (tmp_path / "out" / "chest_ai" / f"{uids[0]}.dcm").exists()
    assert not (tmp_path / "out" / "spine").exists() and not (tmp_path / "out" / "abdominal").exists()


# --- end to end: a trial with dcmtk --------------------------------------------------------------


@needs_dcmtk
def test_a_shadow_trial_end_to_end(tmp_path, processes, model_file):
    """storescu -> router in shadow mode -> the site's destinations (a storescp and folders), not the model's; then
    reviewers' corrections in the audit log and the report from the command line."""
    images = tmp_path / "images"
    sent = {  # name -> (brightness rows, BodyPartExamined, modality)
        "chest": (ROWS_BY_CLASS["adult_chest"], "CHEST", "DX"),
        "spine_tagged_chest": (ROWS_BY_CLASS["spine"], "CHEST", "DX"),
        "abdomen": (ROWS_BY_CLASS["abdominal"], "ABDOMEN", "DX"),
        "spine": (ROWS_BY_CLASS["spine"], "LSPINE", "CR"),
        "boundary": (UNCERTAIN_ROWS, None, "DX"),
        "knee": (ROWS_BY_CLASS["others"], "KNEE", "DX"),
        "ct": (20, "CHEST", "CT"),
    }
    paths = {name: write_dicom(images / f"{name}.dcm", bright_rows_image(rows), body_part=tag, modality=modality,
                               bits_stored=12) for name, (rows, tag, modality) in sent.items()}
    uid = {name: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for name, p in paths.items()}
    model_labels = {s.path.stem: s.label for s in expected_labels(model_file, list(paths.values())).values()}
    assert model_labels["spine_tagged_chest"] == "spine" and model_labels["boundary"] == "uncertain"

    ports = {"router": free_port(), "pacs": free_port()}
    out = tmp_path / "out"
    destinations = {route: {"folder": str(out / route)} for route in (*CLASSES, "uncertain", "chest_ai", "pass_through")}
    destinations["pacs"] = node("PACS", ports["pacs"])
    config = write_config(tmp_path / "router.yaml", port=ports["router"], spool=tmp_path / "spool", model=model_file,
                          destinations=destinations, mode="shadow",
                          shadow={"body_part_map": {"CHEST": "chest_ai", "abdomen": "pacs"}, "default": "pacs"})
    start_storescp(processes, out / "pacs", "PACS", ports["pacs"])
    routed = start_router(processes, config, tmp_path / "router.log")
    storescu(list(paths.values()), ports["router"], tmp_path)
    audit_path = tmp_path / "spool" / "audit.jsonl"

    def delivered() -> dict[str, str]:
        return {r["sop_instance_uid"]: r["destination"] for r in read_audit(audit_path)
                if r["event"] == "forwarded" and r["status"] in ("0x0000", "stored")}

    wait_for(lambda: len(delivered()) == len(sent), 60, f"{len(sent)} deliveries (router log {routed.log})")
    expected = {"chest_ai": {"chest", "spine_tagged_chest"}, "pacs": {"abdomen", "spine", "boundary", "knee"},
                "pass_through": {"ct"}}
    assert set(received_files(out / "pacs")) == {uid[n] for n in expected["pacs"]}
    for route in ("chest_ai", "pass_through"):
        assert {p.stem for p in (out / route).glob("*.dcm")} == {uid[n] for n in expected[route]}
    for route in (*CLASSES, "uncertain"):  # where route mode would have sent them: nothing arrived there
        assert not list((out / route).glob("*.dcm")), route

    lines = {r["sop_instance_uid"]: r for r in read_audit(audit_path) if r["event"] == "classified"}
    for name, label in model_labels.items():
        line = lines[uid[name]]
        if name == "ct":
            assert (line["decided_by"], line["route"]) == ("rule:not-projection", "pass_through")
            continue
        assert (line["label"], line["model_route"], line["mode"]) == (label, label, "shadow")
        assert line["decided_by"] == "shadow:body_part_map"
        assert line["route"] == next(r for r, names in expected.items() if name in names)

    audit = AuditLog(audit_path)  # as the console writes them, while the router runs
    try:
        audit.write("corrected", sop_instance_uid=uid["chest"], label="pediatric_chest", previous_label="adult_chest",
                    who="dr.a")
        audit.write("corrected", sop_instance_uid=uid["spine_tagged_chest"], label="spine", previous_label="spine",
                    who="dr.b")
        audit.write("corrected", sop_instance_uid=uid["abdomen"], label="others", previous_label="abdominal", who="dr.b")
        audit.write("corrected", sop_instance_uid=uid["chest"], label="adult_chest", previous_label="pediatric_chest",
                    who="dr.a")  # changed their mind: the latest wins
    finally:
        audit.close()
    result = subprocess.run([sys.executable, ROOT / "router.py", "--config", config, "--shadow-report",
                             "--output", tmp_path / "report.json"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# Shadow mode report" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["classified"], report["unreadable"], report["by_rule"]) == (6, 0, {"rule:not-projection": 1})
    assert (report["threshold"], report["class_names"]) == (0.6, list(CLASSES))
    # the tag: chest, abdomen, spine and knee (the catch-all) agree, spine_tagged_chest does not; boundary has none
    assert (report["tag_agreement"]["k"], report["tag_agreement"]["n"], report["tag_missing"]) == (4, 5, 1)
    assert report["tag_catch_all"] == 1
    assert (report["reviewed"]["k"], report["reviewed"]["n"]) == (2, 3)
    assert report["confusion"] == {"adult_chest": {"adult_chest": 1}, "spine": {"spine": 1},
                                   "abdominal": {"others": 1}}
    assert (report["auto_routed"]["k"], report["auto_routed"]["n"]) == (5, 6)
    assert (report["auto_vs_corrections"]["k"], report["auto_vs_corrections"]["n"]) == (2, 3)
    assert (report["auto_vs_tag"]["k"], report["auto_vs_tag"]["n"]) == (4, 5)
    assert report["routes"] == {"adult_chest": {"chest_ai": 1}, "spine": {"chest_ai": 1, "pacs": 1},
                                "abdominal": {"pacs": 1}, "uncertain": {"pacs": 1}, "others": {"pacs": 1}}
    assert routed.kill(signal.SIGTERM, timeout=60) == 0, routed.output()


def test_the_commented_shadow_example_is_valid(tmp_path):
    """router.example.yaml shows shadow mode commented out: uncommented, it loads."""
    lines = (ROOT / "router.example.yaml").read_text().splitlines()
    start = lines.index("# mode: shadow                       # default: route (the model's label picks the destination)")
    shown = [line[2:] for line in lines[start:start + 4]]
    path = tmp_path / "router.yaml"
    path.write_text("\n".join([*lines[:start], *shown, *lines[start + 4:]]) + "\n")
    config = load_config(path)
    assert config.mode == "shadow" and config.shadow.route(" chest") == "adult_chest"
    assert config.shadow.route("KNEE") == "others"


def test_a_senders_tag_cannot_break_the_markdown_report(tmp_path):
    day = "2026-03-01T"
    path = tmp_path / "audit.jsonl"
    records = [classified("X", day + "10:00:00.000+00:00", "spine", "spine", 0.9, "CHEST\r\n| forged | row |\x1b[2J",
                          "pacs")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    text = build_report(path, class_names=list(CLASSES), threshold=0.5).to_markdown()
    [row] = [line for line in text.splitlines() if line.startswith("| CHEST")]
    assert row.startswith("| CHEST\\r\\n\\| FORGED \\| ROW \\|\\x1b[2J |") and "\x1b" not in text
