"""The curation report of a backfill: what the archive holds, and which tags to fix.

    report = build_report(frame, class_names, correction_threshold=0.95)   # frame: OutputStore.read()
    write_report(report, corrections, "out/")   # report.json, report.md, tag_corrections.csv

Counts per label (a class, ``uncertain``, ``unreadable``), per BodyPartExamined value (as
written; ``(missing)`` without one), per unreadable reason; the disagreement matrix (rows: the
tag, upper-case and trimmed; columns: the predicted class, ``top_label``, readable files only)
with the number of readable files whose tag contradicts the prediction (predict.py's
``tag_disagrees``). Proposed corrections are the readable files whose tag is missing or
contradicts the prediction and whose confidence is at least ``correction_threshold``: the
proposed value is :data:`PROPOSED_TAG` of the predicted class (a DICOM PS3.16 CID 4031 term that
utils.infer.decisions accepts for it); a catch-all class (``others``) proposes nothing, and neither
does an image the model's out-of-distribution score flagged (label ``uncertain``, error
``out_of_distribution: ...``): its top class says nothing about what it shows. The report counts
those rows, and the DICOMs the header guard kept from the model (``not_projection_radiography``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.infer.decisions import NOT_PROJECTION, OTHER_CLASSES
from utils.infer.ood import OUT_OF_DISTRIBUTION
from utils.untrusted import log_safe

MISSING_TAG = "(missing)"
# The BodyPartExamined value proposed for each default class; a class not listed proposes its own
# name upper-case (the tag utils.infer.decisions.tag_disagrees accepts for it), the catch-all none.
PROPOSED_TAG = {"abdominal": "ABDOMEN", "adult_chest": "CHEST", "pediatric_chest": "CHEST", "spine": "SPINE"}
CORRECTION_COLUMNS = ("path", "SOPInstanceUID", "StudyInstanceUID", "BodyPartExamined", "proposed_BodyPartExamined",
                      "predicted", "confidence", "why")


def proposed_tag(label: str) -> str:
    if label in OTHER_CLASSES:
        return ""
    return PROPOSED_TAG.get(label, label.upper())


def _tag(value) -> str:
    text = str(value or "").strip().upper()
    return text or MISSING_TAG


def build_report(frame, class_names: Sequence[str], correction_threshold: float):
    """(report dict, corrections DataFrame) for the rows of a backfill (store.OutputStore.read())."""
    import pandas as pd

    tags = frame["BodyPartExamined"].map(_tag)
    readable = frame["label"] != "unreadable"
    reasons = frame.loc[~readable, "error"].map(lambda e: str(e).split(":", 1)[0])
    matrix = pd.crosstab(tags[readable], frame.loc[readable, "top_label"])
    matrix = matrix.reindex(columns=[c for c in class_names], fill_value=0).sort_index()
    flag = frame["tag_disagrees"]
    contradicts = readable & flag.fillna(False).astype(bool)
    missing = readable & (tags == MISSING_TAG)
    confident = frame["confidence"].fillna(-1.0) >= correction_threshold
    errors = frame["error"].fillna("").astype(str)
    out_of_distribution = errors.str.startswith(OUT_OF_DISTRIBUTION)
    not_projection = errors.str.startswith(NOT_PROJECTION)
    chosen = frame[(contradicts | missing) & confident & ~out_of_distribution].copy()
    chosen["proposed_BodyPartExamined"] = chosen["top_label"].map(proposed_tag)
    chosen = chosen[chosen["proposed_BodyPartExamined"] != ""]
    chosen["predicted"] = chosen["top_label"]
    chosen["why"] = [MISSING_TAG.strip("()") if _tag(t) == MISSING_TAG else "contradicts"
                     for t in chosen["BodyPartExamined"]]
    corrections = chosen.loc[:, list(CORRECTION_COLUMNS)].sort_values(["why", "confidence", "path"],
                                                                      ascending=[True, False, True])
    report: dict[str, Any] = {
        "files": len(frame),
        "labels": _counts(frame["label"]),
        "body_part_examined": _counts(tags),
        "unreadable_reasons": _counts(reasons),
        "readable": int(readable.sum()),
        "out_of_distribution": int(out_of_distribution.sum()),
        "not_projection_radiography": int(not_projection.sum()),
        "tag_contradicts_prediction": int(contradicts.sum()),
        "tag_missing": int(missing.sum()),
        "disagreement_matrix": {"rows": "BodyPartExamined", "columns": "predicted class (top_label)",
                                "counts": {tag: {c: int(n) for c, n in row.items()} for tag, row in matrix.iterrows()}},
        "corrections": {"threshold": float(correction_threshold), "proposed": len(corrections),
                        "missing": int((corrections["why"] == "missing").sum()),
                        "contradicts": int((corrections["why"] == "contradicts").sum())},
    }
    return report, corrections


def _counts(series) -> dict[str, int]:
    counts = series.value_counts()
    return {str(k): int(v) for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))}


def _cell(value: Any) -> str:
    """A Markdown table cell: a file's tag escaped (control characters, ``|``), so it cannot break the table."""
    return log_safe(value).replace("|", "\\|")


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Backfill report", "", f"{report['files']} files, {report['readable']} readable.", "",
             (f"{report['out_of_distribution']} readable files unlike the training radiographs "
              f"({OUT_OF_DISTRIBUTION}, label uncertain, no tag correction proposed); "
              f"{report['not_projection_radiography']} DICOMs not projection radiography ({NOT_PROJECTION}, "
              "never shown to the model)."), "",
             "## Labels", "", "| label | files |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["labels"].items()]
    lines += ["", "## BodyPartExamined", "", "| tag | files |", "|---|---:|"]
    lines += [f"| {_cell(k)} | {v} |" for k, v in report["body_part_examined"].items()]
    if report["unreadable_reasons"]:
        lines += ["", "## Unreadable files by reason", "", "| reason | files |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in report["unreadable_reasons"].items()]
    counts = report["disagreement_matrix"]["counts"]
    columns = list(next(iter(counts.values())).keys()) if counts else []
    lines += ["", "## Tag x prediction (readable files)", "",
              (f"Rows: BodyPartExamined; columns: predicted class. The tag contradicts the prediction for "
               f"{report['tag_contradicts_prediction']} files; {report['tag_missing']} have no tag."), "",
              "| tag | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {_cell(tag)} | " + " | ".join(str(row[c]) for c in columns) + " |" for tag, row in counts.items()]
    c = report["corrections"]
    lines += ["", "## Proposed tag corrections", "",
              (f"{c['proposed']} files at confidence >= {c['threshold']:g} ({c['missing']} missing tags, "
               f"{c['contradicts']} contradicting ones): tag_corrections.csv."), ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], corrections, folder: str | os.PathLike) -> list[Path]:
    """report.json, report.md and tag_corrections.csv in ``folder``, each written atomically."""
    from utils.backfill.store import atomic_write_text

    folder = Path(folder)
    paths = [folder / "report.json", folder / "report.md", folder / "tag_corrections.csv"]
    atomic_write_text(paths[0], json.dumps(report, indent=2) + "\n")
    atomic_write_text(paths[1], markdown(report))
    atomic_write_text(paths[2], corrections.to_csv(index=False, float_format="%.6f"))
    return paths
