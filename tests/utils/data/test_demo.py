import numpy as np
import pydicom
import pytest

from utils.data import demo
from utils.io.dicom import DicomReadError, read_dicom


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return demo.generate_demo_dicoms(tmp_path_factory.mktemp("demo"), images_per_class=6, progress=False)


def test_every_class_every_encoding_reads_back(demo_folder):
    syntaxes, photometrics, sources = set(), set(), set()
    for label in demo.DEMO_CLASSES:
        files = sorted((demo_folder / label).glob("synthetic_*_0*.dcm"))
        assert len(files) == 6
        for path in files:
            ds = pydicom.dcmread(path)
            assert "SYNTHETIC" in str(ds.get("ImageComments", "")) + str(ds.get("SeriesDescription", ""))
            syntaxes.add(ds.file_meta.TransferSyntaxUID)
            photometrics.add(ds.PhotometricInterpretation)
            image = read_dicom(path)
            sources.add(image.window_source)
            assert image.pixels.std() > 0.05  # real contrast, not a flat image
    assert syntaxes == {pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless}
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert sources == {"percentile", "window", "voi_lut"}


def test_monochrome1_files_display_like_monochrome2(demo_folder):
    """Dense structures are bright after reading, whatever the stored polarity: the spine files
    (vertebrae in the middle column) are brighter in the centre than at the left edge."""
    for path in sorted((demo_folder / "spine").glob("synthetic_*.dcm")):
        pixels = read_dicom(path).pixels
        cols = pixels.shape[1]
        assert pixels[:, cols // 2 - 3: cols // 2 + 3].mean() > pixels[:, :5].mean() + 0.2, path.name


def test_classes_are_visually_distinct():
    rng = np.random.default_rng(0)
    shapes = {label: demo.draw(label, rng).shape for label in demo.DEMO_CLASSES}
    assert shapes["pediatric_chest"] == (224, 224)
    assert shapes["spine"][0] > 1.7 * shapes["spine"][1]  # tall and narrow


def test_bad_files_are_rejected_with_reasons(demo_folder):
    reasons = {}
    for name in ("synthetic_report_sr.dcm", "synthetic_truncated.dcm"):
        with pytest.raises(DicomReadError) as info:
            read_dicom(demo_folder / "others" / name)
        reasons[name] = info.value.reason
    assert reasons == {"synthetic_report_sr.dcm": "no_pixel_data", "synthetic_truncated.dcm": "truncated_pixel_data"}
