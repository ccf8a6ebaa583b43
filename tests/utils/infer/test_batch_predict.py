"""predict.py --sort-into with hostile class names (they come from the model file) and hostile file names: every
file lands one folder below the sort folder, under a harmless name."""

from __future__ import annotations

from pathlib import Path

import pytest

from utils.infer.batch_predict import Summary, _sort, place
from utils.untrusted import is_safe_component, safe_component

HOSTILE_LABELS = ["../../escaped", "/tmp/predict-escaped-absolute", "..", ".", "", "a\x00b", "x\r\ny", "L" * 300,
                  "\u202egpj", "..\\..\\x", "CON", "-rf", "spine"]
HOSTILE_NAMES = ["-rf.dcm", "a\nb.dcm", "x" * 250 + ".dcm", "CON.dcm", "\u202egpj.dcm", "..\\x.dcm", ".hidden.dcm",
                 "plain.dcm", "a\x1b[2Jb.png"]


@pytest.fixture
def sources(tmp_path) -> list[Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for i, name in enumerate(HOSTILE_NAMES):
        paths.append(folder / name)
        paths[-1].write_bytes(f"file {i}".encode())
    return paths


@pytest.mark.parametrize("label", HOSTILE_LABELS)
def test_hostile_labels_and_file_names_stay_inside_the_sort_folder(tmp_path, sources, label):
    sort_into = tmp_path / "sorted"
    summary = Summary()
    for source in sources:
        row = {"error": ""}
        placed = _sort(str(source), sort_into, label, "copy", row, summary)
        assert placed and not row["error"], row
        target = Path(placed)
        assert target.parent == sort_into / safe_component(label) and is_safe_component(target.name)
        assert target.read_bytes() == source.read_bytes()
    assert summary.placed == len(sources)
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.parent in (tmp_path / "in", sort_into / safe_component(label)) for p in everything), everything
    assert not Path("/tmp/predict-escaped-absolute").exists()
    if label == "spine":  # a harmless class name and file name are kept as they are
        assert (sort_into / "spine" / "plain.dcm").is_file()


def test_a_label_folder_that_links_out_of_the_sort_folder_is_an_error_in_the_row(tmp_path, sources):
    sort_into, outside = tmp_path / "sorted", tmp_path / "outside"
    sort_into.mkdir()
    outside.mkdir()
    (sort_into / "spine").symlink_to(outside)
    row = {"error": ""}
    assert _sort(str(sources[0]), sort_into, "spine", "copy", row, Summary()) == ""
    assert "sort_failed" in row["error"] and "would leave" in row["error"]
    assert list(outside.iterdir()) == []


def test_place_never_writes_through_a_link_of_the_same_name(tmp_path, sources):
    folder, outside = tmp_path / "out", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (folder / "plain.dcm").symlink_to(outside / "victim.dcm")  # dangling: it would be created out there
    source = next(p for p in sources if p.name == "plain.dcm")
    target, new = place(source, folder)
    assert new and target == folder / "plain_1.dcm" and not target.is_symlink()
    assert list(outside.iterdir()) == []
