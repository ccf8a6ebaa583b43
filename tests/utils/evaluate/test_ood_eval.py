"""test.py's out-of-distribution report: AUROC, shares flagged, the auto-routed share, the files written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from utils.evaluate import ood_eval


def test_auroc_counts_ties_half_and_needs_both_sides():
    assert ood_eval.auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert ood_eval.auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert ood_eval.auroc([0.5], [0.5]) == 0.5
    assert ood_eval.auroc([], [1.0]) is None


def test_summary_of_real_images_and_a_set():
    entry = {"threshold": 1.0, "quantile": 0.995, "fitted_on": "x"}
    real = np.array([0.2, 0.5, 1.5, 0.1])  # one real radiograph above the threshold
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.99, 0.01], [0.02, 0.98], [0.995, 0.005], [0.6, 0.4]])  # the last: wrong, not confident
    rows = [{"kind": "ct", "retagged": False}, {"kind": "ct", "retagged": True},
            {"kind": "photo", "retagged": False}, {"kind": "photo", "retagged": True}]
    scores = np.array([3.0, 3.0, 0.5, 0.5])
    flags = np.array([True, True, True, True])  # the photo: caught by the colour check, not the score
    summary = ood_eval.summarise(entry, real, y, probs, 0.95, set_scores=scores, set_flags=flags, set_rows=rows,
                                 guard_reasons=["Modality CT", "", "Modality XC", ""])
    assert summary["real_flagged"] == 1 and summary["real_flagged_share"] == 0.25
    assert summary["auto_without_ood"] == {"routed_share": 0.75, "routed": 3, "accuracy": 1.0}
    assert summary["auto_with_ood"] == {"routed_share": 0.5, "routed": 2, "accuracy": 1.0}
    s = summary["set"]
    assert s["flagged_share"] == 1.0 and s["flagged_share_retagged"] == 1.0
    assert s["auroc"] == pytest.approx(13 / 16)  # pairs won, a tie counting half
    assert s["header_guard_share_as_sent"] == 1.0 and s["per_kind"]["photo"]["flagged_share"] == 1.0
    text = ood_eval.markdown(summary)
    assert "evaluated split flagged (false alarms): 1 of 4 (25.0 %)" in text and "| photo | 2 | 100.0 % |" in text


def test_without_a_detector_the_report_says_why_and_files_are_written(tmp_path):
    summary = ood_eval.summarise(None, None, np.array([0]), np.array([[1.0]]), None)
    assert summary["available"] is False and "calibrate.py" in summary["why"]
    (tmp_path / ood_eval.OOD_CSV).write_text("stale\n")
    written = ood_eval.write(tmp_path, summary)
    assert json.loads((tmp_path / ood_eval.OOD_JSON).read_text()) == summary
    assert not (tmp_path / ood_eval.OOD_CSV).exists() and len(written) == 2  # an earlier run's rows removed
    ood_eval.write(tmp_path, summary, [{"path": "a.dcm", "ood_score": 2.0}])
    assert (tmp_path / ood_eval.OOD_CSV).read_text().startswith("path,ood_score")
