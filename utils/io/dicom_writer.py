"""Write small synthetic DICOM images: test fixtures and the synthetic demo dataset.

``write_dicom`` builds a complete Part 10 file (preamble, file meta, the usual Type 1/2
attributes) around a numpy array, so dcmtk, pynetdicom and ``utils.io.dicom.read_dicom`` all
accept it. Every file is marked as synthetic (Series Description, Image Comments,
Patient Name), so it can never be mistaken for patient data.
"""

from __future__ import annotations

import datetime
import os
import pathlib
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_encoder, set_pixel_data
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSNearLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

SYNTHETIC_MARK = "SYNTHETIC"
# Native syntaxes need no encoder; pydicom writes them directly.
_NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_ENCODER_INSTALL_HINTS = {
    "pyjpegls": "pip install pyjpegls",
    "pylibjpeg": "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-rle",
    "gdcm": "pip install python-gdcm",
}
_DEFAULT_BITS = {np.dtype(np.uint8): 8, np.dtype(np.int8): 8, np.dtype(np.uint16): 16,
                 np.dtype(np.int16): 16}
_J2K_LOSSY_RATIO = 10.0  # JPEG 2000 (lossy) compression ratio; visibly lossy, still readable
_J2K_MIN_SIDE = 32  # openjpeg's 6 resolution levels need 2**5 pixels per side
_LOSSY_METHODS = {JPEG2000: "ISO_15444_1", JPEGLSNearLossless: "ISO_14495_1"}


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: np.ndarray | None = None,
    voi_lut_bits: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "DX",
    body_part: str | None = None,
    patient_id: str = SYNTHETIC_MARK,
    patient_age: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    extra: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write ``pixels`` as a DICOM Part 10 file at ``path`` and return the path.

    Args:
        pixels: uint8, int8, uint16 or int16. (rows, cols) is one frame, (frames, rows,
            cols) a multi-frame; with ``photometric="RGB"``, (rows, cols, 3) or
            (frames, rows, cols, 3) uint8. Signed input sets Pixel Representation 1.
        photometric: MONOCHROME1, MONOCHROME2 or RGB.
        bits_stored: default 8 for 8-bit input, 16 for 16-bit input; e.g. 12 for CR data
            in uint16 (every value must fit).
        rescale: (slope, intercept) -> Rescale Slope/Intercept/Type.
        window: (center, width) -> Window Center/Width (in rescaled units).
        voi_lut: 1-D LUT data -> a one-item VOI LUT Sequence whose first entry maps stored
            value 0 (first value mapped = 0).
        voi_lut_bits: bits per LUT entry (LUT Descriptor value 3), i.e. the LUT's output
            range 0..2**bits-1; default: the smallest allowed depth (8, 10..16) that holds
            the largest entry, e.g. 10 for a table whose maximum is 1023.
        transfer_syntax: Explicit/Implicit/Deflated VR Little Endian, or any syntax pydicom has an
            encoder for (RLE Lossless, JPEG 2000 lossless and lossy, JPEG-LS with
            ``pyjpegls``). Raises ``ValueError`` for syntaxes pydicom cannot encode and
            ``RuntimeError`` (saying what to install) when the encoder's plugins are missing.
        modality: DX -> Digital X-Ray (For Presentation), CR -> Computed Radiography, other
            modalities and RGB -> Secondary Capture. ``extra["SOPClassUID"]`` overrides.
        body_part, patient_id, patient_age: Body Part Examined, Patient ID, Patient's Age.
        study_uid, series_uid, sop_uid: generated when None.
        extra: keyword -> value set last (e.g. ``{"ViewPosition": "PA",
            "VOILUTFunction": "SIGMOID"}``); None as a value deletes the element.
    """
    path = pathlib.Path(path)
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
        raise ValueError(f"photometric must be MONOCHROME1, MONOCHROME2 or RGB, not {photometric!r}")
    unknown = [keyword for keyword in (extra or {}) if tag_for_keyword(keyword) is None]
    if unknown:
        raise ValueError(f"unknown DICOM keyword(s) in extra: {', '.join(unknown)}")
    arr = np.asarray(pixels)
    tsyntax = UID(transfer_syntax)
    encoder = None if tsyntax in _NATIVE_SYNTAXES else _encoder_for(tsyntax)
    bits = _bits_stored(arr, bits_stored)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # set_pixel_data wants it native
    set_pixel_data(ds, arr, photometric, bits, generate_instance_uid=False)
    _set_identity(ds, modality, photometric, patient_id, patient_age, body_part,
                  study_uid, series_uid, sop_uid)
    _set_grayscale_pipeline(ds, rescale, window, voi_lut, voi_lut_bits, photometric)
    _apply_extra(ds, extra or {})
    _set_file_meta(ds)
    _encode(ds, tsyntax, encoder)

    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_non_image(path: str | os.PathLike, sop_class: str, **elements: Any) -> pathlib.Path:
    """A storage object without pixel data (SR, encapsulated PDF...) with fresh SOP, Study and
    Series UIDs, explicit VR little endian, and ``elements`` set by keyword (Modality,
    PatientID, EncapsulatedDocument...)."""
    path = pathlib.Path(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _apply_extra(ds: Dataset, extra: dict[str, Any]) -> None:
    for keyword, value in extra.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)


def _encode(ds: Dataset, tsyntax: UID, encoder) -> None:
    """Compress the native pixel data in place (or just record a native syntax)."""
    if encoder is None:
        ds.file_meta.TransferSyntaxUID = tsyntax
        return
    if tsyntax in (JPEG2000, JPEG2000Lossless) and min(ds.Rows, ds.Columns) < _J2K_MIN_SIDE:
        # pylibjpeg-openjpeg always uses 6 resolution levels and does not expose the setting
        raise ValueError(
            f"JPEG 2000 encoding needs at least {_J2K_MIN_SIDE} x {_J2K_MIN_SIDE} pixels, "
            f"got {ds.Rows} x {ds.Columns}"
        )
    options = {"j2k_cr": [_J2K_LOSSY_RATIO]} if tsyntax == JPEG2000 else {}
    ds.compress(tsyntax, generate_instance_uid=False, **options)
    if tsyntax in _LOSSY_METHODS:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = _LOSSY_METHODS[tsyntax]


def _encoder_for(tsyntax: UID):
    try:
        encoder = get_encoder(tsyntax)
    except NotImplementedError:
        raise ValueError(
            f"pydicom cannot encode {tsyntax.name} ({tsyntax}); use Explicit VR Little "
            "Endian, RLE Lossless, JPEG 2000 (lossless or lossy) or JPEG-LS"
        ) from None
    if not encoder.is_available:
        missing = "; ".join(encoder.missing_dependencies)
        hints = sorted({hint for name, hint in _ENCODER_INSTALL_HINTS.items() if name in missing})
        raise RuntimeError(
            f"no encoder for {tsyntax.name} is installed ({missing}); "
            f"install one of: {', '.join(hints) or missing}"
        )
    return encoder


def _bits_stored(arr: np.ndarray, bits_stored: int | None) -> int:
    if arr.dtype not in _DEFAULT_BITS:
        raise TypeError(
            f"pixels must be uint8, int8, uint16 or int16, not {arr.dtype}; "
            "cast explicitly (e.g. arr.astype(np.uint16)) so the stored range is deliberate"
        )
    return _DEFAULT_BITS[arr.dtype] if bits_stored is None else int(bits_stored)


def _set_identity(
    ds: Dataset,
    modality: str,
    photometric: str,
    patient_id: str,
    patient_age: str | None,
    body_part: str | None,
    study_uid: str | None,
    series_uid: str | None,
    sop_uid: str | None,
) -> None:
    """SOP Common, Patient, Study, Series, Equipment and General Image attributes."""
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    if photometric == "RGB":
        sop_class = SecondaryCaptureImageStorage
    else:
        sop_class = {
            "DX": DigitalXRayImageStorageForPresentation,
            "CR": ComputedRadiographyImageStorage,
        }.get(modality, SecondaryCaptureImageStorage)

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.ImageType = ["DERIVED", "PRIMARY"]  # DX requires PRIMARY as value 2
    # Patient (Type 2 may be empty)
    ds.PatientName = f"{SYNTHETIC_MARK}^DATA"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    if patient_age is not None:
        ds.PatientAge = patient_age
    # Study
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate, ds.StudyTime = date, time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    # Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = SYNTHETIC_MARK
    if body_part is not None:
        ds.BodyPartExamined = body_part
    # Equipment and image
    ds.Manufacturer = SYNTHETIC_MARK
    if sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "SYN"  # synthetic image; Type 1 in the SC Equipment module
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = date, time
    ds.ImageComments = f"{SYNTHETIC_MARK} image, not patient data"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if sop_class == DigitalXRayImageStorageForPresentation:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.ImageLaterality = "U"
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        # PS3.3 C.8.11.3: INVERSE for MONOCHROME1, IDENTITY for MONOCHROME2
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"


def _set_grayscale_pipeline(
    ds: Dataset,
    rescale: tuple[float, float] | None,
    window: tuple[float, float] | None,
    voi_lut: np.ndarray | None,
    voi_lut_bits: int | None,
    photometric: str,
) -> None:
    """Modality LUT (rescale) and VOI (window, VOI LUT Sequence) attributes."""
    if photometric == "RGB" and (rescale or window or voi_lut is not None):
        raise ValueError("rescale, window and voi_lut apply to MONOCHROME images only")
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = (float(v) for v in rescale)
        ds.RescaleType = "US"  # unspecified units
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = (float(v) for v in window)
    if voi_lut is not None:
        ds.VOILUTSequence = Sequence([_voi_lut_item(np.asarray(voi_lut), voi_lut_bits)])


def _voi_lut_item(lut: np.ndarray, bits: int | None) -> Dataset:
    if lut.ndim != 1 or not 1 <= lut.size <= 2**16:
        raise ValueError(f"voi_lut must be 1-D with 1..65536 entries, got shape {lut.shape}")
    if lut.min() < 0:
        raise ValueError("voi_lut values must be >= 0")
    if bits is None:
        # The smallest depth the standard allows (8 or 10-16) that holds the largest entry.
        needed = int(lut.max()).bit_length()
        bits = 8 if needed <= 8 else max(10, needed)
    if lut.max() > 2**bits - 1:
        raise ValueError(f"voi_lut values must fit in {bits} bits")
    item = Dataset()
    # 65536 entries is written as 0 (PS3.3 C.11.2.1.1); first stored value mapped is 0
    item.LUTDescriptor = [lut.size % 2**16, 0, bits]
    # OW, not US: a 4-byte length field holds tables of any size in explicit VR
    item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
    item.LUTExplanation = f"{SYNTHETIC_MARK} VOI LUT"
    return item


def _set_file_meta(ds: Dataset) -> None:
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
