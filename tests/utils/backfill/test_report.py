"""utils.backfill.report on a constructed set of rows: counts, the tag x prediction matrix, corrections."""

from __future__ import annotations

import json

import pandas as pd

from utils.backfill.report import build_report, proposed_tag, write_report
from utils.infer.decisions import tag_disagrees

CLASSES = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")


def row(path, label, tag, confidence=0.99, top=None, error=""):
    top = top or (label if label in CLASSES else "")
    flag = tag_disagrees(top, tag, CLASSES) if top else None
    return {"path": path, "SOPInstanceUID": f"uid.{path}", "StudyInstanceUID": "study", "label": label,
            "confidence": confidence if top else None, "top_label": top, "BodyPartExamined": tag,
            "tag_disagrees": flag, "error": error}


def frame():
    return pd.DataFrame([
        row("a", "adult_chest", "CHEST"),
        row("b", "adult_chest", "chest "),  # the same tag, written differently
        row("c", "spine", "CHEST", 0.97),  # contradicts, confident: proposed SPINE
        row("d", "spine", "CHEST", 0.60),  # contradicts, below the correction threshold
        row("e", "abdominal", ""),  # missing, confident: proposed ABDOMEN
        row("f", "others", "SKULL"),  # others agrees with a tag no class claims
        row("g", "others", "", 0.99),  # missing but the catch-all proposes nothing
        row("h", "uncertain", "ABDOMEN", 0.40, top="spine"),  # contradicts, not confident
        row("i", "unreadable", "CHEST", error="not_dicom: no preamble"),
        row("j", "unreadable", "", error="decoder_crashed: the process died"),
    ])


def test_counts_matrix_and_corrections(tmp_path):
    report, corrections = build_report(frame(), CLASSES, correction_threshold=0.95)
    assert report["files"] == 10 and report["readable"] == 8
    assert report["labels"] == {"adult_chest": 2, "others": 2, "spine": 2, "unreadable": 2, "abdominal": 1,
                                "uncertain": 1}
    assert report["body_part_examined"] == {"CHEST": 5, "(missing)": 3, "ABDOMEN": 1, "SKULL": 1}
    assert report["unreadable_reasons"] == {"decoder_crashed": 1, "not_dicom": 1}
    counts = report["disagreement_matrix"]["counts"]
    assert list(counts) == ["(missing)", "ABDOMEN", "CHEST", "SKULL"]
    assert counts["CHEST"] == {"abdominal": 0, "adult_chest": 2, "pediatric_chest": 0, "spine": 2, "others": 0}
    assert counts["ABDOMEN"]["spine"] == 1 and counts["(missing)"] == {**dict.fromkeys(CLASSES, 0), "abdominal": 1,
                                                                        "others": 1}
    assert report["tag_contradicts_prediction"] == 3 and report["tag_missing"] == 2
    assert corrections["path"].tolist() == ["c", "e"]
    assert corrections["proposed_BodyPartExamined"].tolist() == ["SPINE", "ABDOMEN"]
    assert corrections["why"].tolist() == ["contradicts", "missing"]
    assert report["corrections"] == {"threshold": 0.95, "proposed": 2, "missing": 1, "contradicts": 1}
    json_path, md_path, csv_path = write_report(report, corrections, tmp_path)
    assert json.loads(json_path.read_text()) == report
    assert "| CHEST | 0 | 2 | 0 | 2 | 0 |" in md_path.read_text()
    assert pd.read_csv(csv_path)["SOPInstanceUID"].tolist() == ["uid.c", "uid.e"]


def test_every_proposed_tag_agrees_with_its_class():
    for name in CLASSES:
        tag = proposed_tag(name)
        assert (tag == "") == (name == "others")
        if tag:
            assert tag_disagrees(name, tag, CLASSES) is False
    assert proposed_tag("knee") == "KNEE" and tag_disagrees("knee", "KNEE", ("knee", "others")) is False


def test_a_files_tag_cannot_break_the_markdown_report(tmp_path):
    rows = pd.DataFrame([row("a", "adult_chest", "CHEST | forged | 9 |\r\n| x"), row("b", "spine", "\x1b[2JSPINE")])
    report, corrections = build_report(rows, CLASSES, correction_threshold=0.95)
    _, md_path, _ = write_report(report, corrections, tmp_path)
    text = md_path.read_text()
    assert "\x1b" not in text and "\r" not in text and "| x" not in text
    assert "| CHEST \\| FORGED \\| 9 \\|\\r\\n\\| X | 1 |" in text


def test_out_of_distribution_rows_propose_nothing_and_both_guards_are_counted(tmp_path):
    """An image the OOD score flagged keeps its confident top class (label uncertain): its tag is not corrected.
    The report counts those rows and the DICOMs the header guard kept from the model."""
    rows = pd.DataFrame([
        row("c", "spine", "CHEST", 0.97),  # contradicts, confident: proposed SPINE
        row("o", "uncertain", "CHEST", 0.99, top="spine", error="out_of_distribution: OOD score 9 > 5"),
        row("m", "uncertain", "", 0.99, top="abdominal", error="out_of_distribution: OOD score 7 > 5"),
        row("n", "unreadable", "HEAD", error="not_projection_radiography: Modality CT, SOP class (none)"),
    ])
    report, corrections = build_report(rows, CLASSES, correction_threshold=0.95)
    assert corrections["path"].tolist() == ["c"]
    assert report["out_of_distribution"] == 2 and report["not_projection_radiography"] == 1
    assert report["corrections"]["proposed"] == 1
    json_path, md_path, _ = write_report(report, corrections, tmp_path)
    assert json.loads(json_path.read_text())["out_of_distribution"] == 2
    text = md_path.read_text()
    assert "2 readable files unlike the training radiographs (out_of_distribution" in text
    assert "1 DICOMs not projection radiography (not_projection_radiography" in text
