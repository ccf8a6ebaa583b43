"""The out-of-distribution evaluation set: every file reads (pydicom and the project's reader),
the manifest matches the folder, two copies per image, deterministic per seed, offline."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from utils.evaluate import ood_set
from utils.io.dicom import DicomReadError
from utils.preprocessing import PreprocessSpec, preprocess_file

# pydicom's test files carry a few invalid UIDs on purpose
# (and MR_small_padded.dcm its padding), kept in the copies as sent
pytestmark = [pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
              pytest.mark.filterwarnings("ignore:The pixel data is .* excess padding")]

PER_KIND = 2
SPEC = PreprocessSpec(image_size=128)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The whole set at PER_KIND, written with the network unreachable and pydicom's downloader
    refusing: the real files must come from disk (pydicom's own and pydicom-data's)."""
    import pydicom.data.download

    downloads = []

    def refuse_download(url, *args, **kwargs):
        downloads.append(url)
        raise RuntimeError(f"no network in this test: {url}")

    def refuse_connect(self, address):
        raise OSError(f"no network in this test: {address}")

    folder = tmp_path_factory.mktemp("ood")
    ood_set._real_candidates.cache_clear()  # list and decode the test files here, offline
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pydicom.data.download, "download_with_progress", refuse_download)
        mp.setattr(socket.socket, "connect", refuse_connect)
        manifest = ood_set.write_ood_set(folder, seed=0, per_kind=PER_KIND)
    assert downloads == []
    return folder, manifest


def test_manifest_matches_the_files(written):
    folder, manifest = written
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.dcm"))
    assert sorted(manifest["path"]) == on_disk
    assert manifest["path"].is_unique
    assert list(manifest.columns) == list(ood_set.COLUMNS)
    again = ood_set.read_manifest(folder)
    assert again["path"].tolist() == manifest["path"].tolist()
    assert again["retagged"].tolist() == manifest["retagged"].tolist()
    assert (again["note"] == manifest["note"]).all()


def test_all_kinds_present_with_two_copies_each(written):
    _, manifest = written
    assert set(manifest["kind"]) == set(ood_set.KINDS)
    for kind in ood_set.SYNTHETIC_KINDS:
        assert (manifest["kind"] == kind).sum() == 2 * PER_KIND, kind
    for image_id, copies in manifest.groupby("image_id"):
        assert sorted(copies["retagged"]) == [False, True], image_id
        # the same pixel module in both copies: only the tags differ
        for column in ("kind", "source", "group", "rows", "columns", "photometric", "bits_stored", "transfer_syntax"):
            assert copies[column].nunique() == 1, (image_id, column)


def test_every_file_reads_with_pydicom_and_says_what_the_manifest_says(written):
    folder, manifest = written
    pixel_data = {}
    for row in manifest.itertuples():
        ds = pydicom.dcmread(folder / row.path)
        assert str(ds.get("Modality", "")) == row.modality
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID
        assert (int(ds.Rows), int(ds.Columns)) == (row.rows, row.columns)
        if row.retagged:
            assert ds.Modality == "DX"
            assert ds.SOPClassUID == pydicom.uid.DigitalXRayImageStorageForPresentation
        else:
            assert str(ds.get("Modality", "")).upper() not in ood_set.PROJECTION_MODALITIES
            assert ds.SOPClassUID != pydicom.uid.DigitalXRayImageStorageForPresentation
        pixel_data.setdefault(row.image_id, []).append(ds.PixelData)
    # the re-tagged copy carries exactly the pixels of the copy as sent
    assert all(len(copies) == 2 and copies[0] == copies[1] for copies in pixel_data.values())
    uids = [pydicom.dcmread(folder / p, stop_before_pixels=True).SOPInstanceUID for p in manifest["path"]]
    assert len(set(uids)) == len(uids)


def test_every_file_is_accepted_by_the_project_reader(written):
    folder, manifest = written
    for row in manifest.itertuples():
        if row.note.startswith(ood_set.REFUSED):  # a refusal must be typed, with the recorded reason
            with pytest.raises(DicomReadError) as excinfo:
                preprocess_file(folder / row.path, SPEC)
            assert excinfo.value.reason == row.note.removeprefix(ood_set.REFUSED)
            continue
        image, header = preprocess_file(folder / row.path, SPEC)
        assert image.shape == (128, 128) and image.dtype == np.uint8
        # not a flat image (a few of pydicom's 16 x 16 CT slices have almost no contrast)
        assert image.std() > (0 if row.kind == "real" else 10), row.path
        assert header["Modality"] == row.modality


def test_real_files_are_non_projection_images_from_pydicom_and_pydicom_data(written):
    _, manifest = written
    real = manifest[manifest["kind"] == "real"]
    sources = set(real["source"])
    for expected in ("pydicom:CT_small.dcm", "pydicom:MR_small.dcm", "pydicom-data:emri_small.dcm",
                     "pydicom-data:US1_UNCR.dcm", "pydicom:SC_rgb_rle.dcm", "pydicom:rtdose.dcm",
                     "pydicom:liver_1frame.dcm", "pydicom:examples_palette.dcm", "pydicom-data:MR2_J2KI.dcm",
                     "pydicom-data:US1_J2KR.dcm", "pydicom:dicomdirtests/77654033/CT2/17106"):
        assert expected in sources
    assert not any("RG1_" in s or "/CR" in s for s in sources)  # computed radiography is left out
    multi = real[(real["source"] == "pydicom-data:emri_small.dcm")]
    assert (multi["frames"] == 1).all() and multi["detail"].str.contains("first of 10 frames").all()
    # one picture in several encodings is one group
    groups = real.set_index("source")["group"]
    assert groups["pydicom:MR_small.dcm"].iloc[0] == groups["pydicom:MR_small_RLE.dcm"].iloc[0]
    assert groups["pydicom:MR_small.dcm"].iloc[0] != groups["pydicom:CT_small.dcm"].iloc[0]


def test_broken_and_projection_files_are_left_out_with_a_reason():
    found, skipped = ood_set.real_candidates()
    why = dict(skipped)
    assert "truncated_pixel_data" in why["pydicom:MR_truncated.dcm"]
    assert "projection radiograph" in why["pydicom-data:RG1_UNCR.dcm"]
    assert not {f.source for f in found} & set(why)


def test_same_seed_same_pixels_other_seed_other_pixels(tmp_path):
    kinds = ood_set.SYNTHETIC_KINDS
    first = ood_set.write_ood_set(tmp_path / "a", seed=3, per_kind=1, kinds=kinds)
    second = ood_set.write_ood_set(tmp_path / "b", seed=3, per_kind=1, kinds=kinds)
    assert first["path"].tolist() == second["path"].tolist()
    for path in first["path"]:
        a, b = pydicom.dcmread(tmp_path / "a" / path), pydicom.dcmread(tmp_path / "b" / path)
        assert a.PixelData == b.PixelData, path
        assert a.SOPInstanceUID == b.SOPInstanceUID  # UIDs come from the seed too
    for kind in kinds:
        assert not np.array_equal(ood_set.draw(kind, 3, 0).pixels, ood_set.draw(kind, 4, 0).pixels), kind


def test_variety_within_the_set(written):
    _, manifest = written
    synthetic = manifest[manifest["kind"] != "real"]
    assert {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL_422"} <= set(synthetic["photometric"])
    assert {"Explicit VR Little Endian", "RLE Lossless", "JPEG Baseline (Process 1)"} <= set(
        synthetic["transfer_syntax"])
    assert {"CT", "MR", "US", "NM", "OT", "XC", "XA", "RTDOSE"} <= set(manifest["modality"])
    assert synthetic[["rows", "columns"]].max().max() <= ood_set.MAX_SIDE


def test_unknown_kind_and_negative_count_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown kind"):
        ood_set.write_ood_set(tmp_path, kinds=("ct", "pet"))
    with pytest.raises(ValueError, match="per_kind"):
        ood_set.write_ood_set(tmp_path, per_kind=-1)


def test_rewriting_with_fewer_images_leaves_no_stale_files(tmp_path):
    ood_set.write_ood_set(tmp_path, per_kind=2, kinds=("mask",))
    manifest = ood_set.write_ood_set(tmp_path, per_kind=1, kinds=("mask",))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.dcm")) == sorted(manifest["path"])


def test_cli_writes_and_counts(tmp_path, capsys):
    assert ood_set.main(["--output", str(tmp_path), "--per-kind", "1", "--kinds", "nuclear", "colour"]) == 0
    out = capsys.readouterr().out
    assert "nuclear" in out and "colour" in out and "total 4 files" in out
    assert (tmp_path / ood_set.MANIFEST).is_file()


def test_import_has_no_side_effects_and_no_tensorflow():
    heavy = ("tensorflow", "keras", "cv2", "pydicom", "pandas", "sklearn")
    code = f"import sys, utils.evaluate.ood_set; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_sop_class_constants_are_pydicom_s():
    uid = pydicom.uid
    assert ood_set.DX_PRESENTATION == uid.DigitalXRayImageStorageForPresentation
    assert ood_set.CT_IMAGE == uid.CTImageStorage and ood_set.MR_IMAGE == uid.MRImageStorage
    assert ood_set.US_IMAGE == uid.UltrasoundImageStorage and ood_set.NM_IMAGE == uid.NuclearMedicineImageStorage
    assert ood_set.SECONDARY_CAPTURE == uid.SecondaryCaptureImageStorage
    assert ood_set.VL_PHOTOGRAPHIC == uid.VLPhotographicImageStorage
    assert ood_set.XA_IMAGE == uid.XRayAngiographicImageStorage
    assert ood_set.RF_IMAGE == uid.XRayRadiofluoroscopicImageStorage
    assert ood_set.RT_DOSE == uid.RTDoseStorage
