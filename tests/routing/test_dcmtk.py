"""The dcmtk helpers used by tests, bench and docs: storescu profiles, finding dcmtk's own binaries."""

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from utils.routing.delivery import dcmtk

from .conftest import bright_rows_image, needs_dcmtk, write_dicom, write_sr


def test_profile_has_one_context_per_class_and_syntax(tmp_path):
    for name, syntax in (("a", ExplicitVRLittleEndian), ("b", RLELossless), ("c", JPEG2000Lossless),
                         ("d", RLELossless)):
        write_dicom(tmp_path / "in" / f"{name}.dcm", bright_rows_image(9), transfer_syntax=syntax)
    write_sr(tmp_path / "in" / "sr.dcm")
    (tmp_path / "in" / "README.txt").write_text("skipped")
    assert dcmtk.main([str(tmp_path / "in"), "--output", str(tmp_path / "scu.cfg")]) == 0
    text = (tmp_path / "scu.cfg").read_text()
    contexts = [line for line in text.splitlines() if line.startswith("PresentationContext") and "\\" in line]
    assert len(contexts) == 4  # DX x 3 syntaxes + SR x 1
    assert "[[Profiles]]" in text and "PresentationContexts = Router" in text
    assert dcmtk.environment()["TCP_NODELAY"] == "1"


def test_find_tool_ignores_what_is_not_dcmtk():
    assert dcmtk.find_tool("no-such-dicom-tool") is None


@needs_dcmtk
def test_find_tool_finds_dcmtk():
    assert "storescu" in dcmtk.find_tool("storescu")
