"""utils.backfill.store: typed parts written atomically, what is done, the run's identity."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from utils.backfill.store import OutputMismatch, OutputStore, output_schema, typed_record
from utils.infer.batch_predict import csv_columns

CLASSES = ("chest", "others")


def table(paths):
    rows = [{**dict.fromkeys(csv_columns(CLASSES), ""), "path": p, "label": "chest", "tag_disagrees": "false"}
            for p in paths]
    records = [typed_record(r, 0.75, [0.75, 0.25], CLASSES) for r in rows]
    records.append(typed_record({"path": "bad.dcm", "label": "unreadable", "error": "not_dicom: x"}, None, None,
                                CLASSES))
    return pa.Table.from_pylist(records, schema=output_schema(CLASSES))


def test_parts_resume_set_and_stale_temporary_files(tmp_path):
    store = OutputStore(tmp_path, CLASSES, identity={"model_id": "m", "threshold": 0.5})
    assert store.done_paths() == set() and store.read().empty
    (tmp_path / ".part-killed-000001.parquet.tmp").write_bytes(b"PAR1 half a file")
    store.write(table(["a.dcm", "b.dcm"]))
    again = OutputStore(tmp_path, CLASSES, identity={"model_id": "m", "threshold": 0.5})
    assert not list(tmp_path.glob(".part-*"))  # the killed run's half part is gone, never read
    assert again.done_paths() == {"a.dcm", "b.dcm", "bad.dcm"}
    frame = again.read()
    assert list(frame.columns) == csv_columns(CLASSES)
    bad = frame.set_index("path").loc["bad.dcm"]
    assert bad["label"] == "unreadable" and pd_isna(bad["confidence"]) and pd_isna(bad["prob_chest"])
    assert frame.set_index("path").loc["a.dcm", "prob_others"] == 0.25
    assert frame.set_index("path").loc["a.dcm", "tag_disagrees"] == False
    with pytest.raises(OutputMismatch, match="model_id"):
        OutputStore(tmp_path, CLASSES, identity={"model_id": "other", "threshold": 0.5})
    with pytest.raises(OutputMismatch, match="class_names"):
        OutputStore(tmp_path, ("chest", "spine"), identity={"model_id": "m", "threshold": 0.5})


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_a_part_written_before_the_ood_score_column_is_read_and_resumed(tmp_path):
    store = OutputStore(tmp_path, CLASSES, identity={"model_id": "m", "threshold": 0.5})
    old = table(["old.dcm"]).drop_columns(["ood_score"])  # the schema of backfills before the OOD score
    pq.write_table(old, tmp_path / "part-20240101T000000-1-000001.parquet")
    again = OutputStore(tmp_path, CLASSES, identity={"model_id": "m", "threshold": 0.5})
    assert again.done_paths() == {"old.dcm", "bad.dcm"}
    new = table(["new.dcm"]).set_column(csv_columns(CLASSES).index("ood_score"), "ood_score",
                                        pa.array([3.5, None], pa.float64()))
    again.write(new.filter(pc.equal(new.column("path"), "new.dcm")))
    frame = again.read().set_index("path")
    assert list(frame.columns) == csv_columns(CLASSES)[1:] and frame.index.tolist() == ["old.dcm", "bad.dcm", "new.dcm"]
    assert pd_isna(frame.loc["old.dcm", "ood_score"]) and frame.loc["new.dcm", "ood_score"] == 3.5
    assert frame["ood_score"].dtype == "float64" and frame.loc["old.dcm", "prob_others"] == 0.25
    assert again.read(columns=["path", "ood_score"])["ood_score"].isna().tolist() == [True, True, False]
