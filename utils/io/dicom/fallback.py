"""The fallback decoder: GDCM (python-gdcm, optional) for a compressed frame the primary
decoders refuse.

``decode.py`` tries it only after pydicom's other plugins (pylibjpeg, pyjpegls, Pillow) failed
with ``decode_failed``, or when none of them is installed, and only for ``SYNTAXES``. The files
it exists for: 12-bit JPEG Extended (process 2/4) written by older encoders whose scan header
says Se = 0 instead of 63, which libjpeg refuses ("scan start must be zero and scan stop must be
63") and dcmtk and GDCM decode with a warning. Never primary: pydicom lists GDCM first for JPEG
and JPEG 2000, so leaving the choice to pydicom would let installing python-gdcm change which
library decodes every such file (and its pixels).

This is a pydicom decoder plugin (``is_available``, ``DECODER_DEPENDENCIES``, ``decode_frame``)
run on a ``Decoder`` of its own, so pydicom's runner does what it does for every plugin (dtype
from Bits Allocated and Pixel Representation, shape, colour) and pydicom's shared decoders are
left alone. Frames go to pydicom's own GDCM plugin, except 12-bit JPEG Extended, which that
plugin refuses outright although GDCM's 12-bit libjpeg decodes it; that one is built here the
same way. GDCM prints libjpeg's warnings ("Invalid SOS parameters for sequential JPEG") on
stderr. It is C++: a crash on hostile data kills the process, which is why untrusted files are
decoded in ``utils.io.isolation``'s worker processes.

RLE is not here: pydicom's own RLE decoder already backs up pylibjpeg-rle, and pydicom's GDCM
plugin has no RLE path. HTJ2K: GDCM has no decoder for it.
"""

from __future__ import annotations

import functools

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset

from .codestream import FrameHeader
from .pixel_module import PixelModule

NAME = "gdcm"  # the label it has in pydicom's decoders, and the DicomImage.decoder it gives
INSTALL_HINT = "pip install python-gdcm"
SYNTAXES = (
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
)
DECODER_DEPENDENCIES = {syntax: ("python-gdcm>=3.0.10",) for syntax in SYNTAXES}  # pydicom's plugin protocol


@functools.cache
def _gdcm():
    """The gdcm module, imported on first use; None when python-gdcm is not installed."""
    try:
        import gdcm
    except ImportError:
        return None
    return gdcm


def available() -> bool:
    """python-gdcm is installed (3.x, as pydicom's GDCM plugin requires)."""
    gdcm = _gdcm()
    return gdcm is not None and int(gdcm.Version.GetMajorVersion()) >= 3


def is_available(syntax: str) -> bool:
    """pydicom's plugin protocol: can this plugin decode ``syntax`` here."""
    return syntax in SYNTAXES and available()


def version() -> str:
    """GDCM's version, "" when not installed."""
    return str(_gdcm().Version.GetVersion()) if available() else ""


def refusal(module: PixelModule, header: FrameHeader | None) -> str | None:
    """Why GDCM must not see this frame, or None. GDCM aborts the whole process (a C++
    exception nothing catches) on pixel descriptions its codecs have no case for, found by
    fuzzing: Bits Allocated other than 8 or 16, Bits Stored below Bits Allocated 8. So it gets
    only frames whose container fits the codestream's precision."""
    if module.bits_allocated not in (8, 16):
        return f"it decodes only 8- or 16-bit containers, not Bits Allocated {module.bits_allocated}"
    if module.bits_allocated == 8 and module.bits_stored != 8:
        return f"Bits Stored {module.bits_stored} in Bits Allocated 8"
    if header is None or header.precision is None or header.components != module.samples:
        return "the codestream's frame header does not describe the image"
    if not 1 < header.precision <= 16 or (header.precision <= 8) != (module.bits_allocated == 8):
        return f"a {header.precision}-bit codestream in Bits Allocated {module.bits_allocated}"
    return None


def decode(ds: Dataset, syntax: uid.UID, options: dict) -> tuple[np.ndarray, dict]:
    """Frame 0 of ``ds`` through GDCM: pydicom's ``Decoder.as_array(ds, index=0, **options)``
    with this module as its only plugin. Raises what pydicom and GDCM raise."""
    from pydicom.pixels.decoders.base import Decoder

    decoder = Decoder(syntax)
    decoder.add_plugin(NAME, (__name__, "decode_frame"))
    return decoder.as_array(ds, index=0, validate=True, decoding_plugin=NAME, **options)


def decode_frame(src: bytes, runner) -> bytes:
    """pydicom's plugin protocol: one encoded frame -> its decoded bytes."""
    if runner.transfer_syntax == uid.JPEGExtended12Bit and runner.bits_stored != 8:
        return _decode_jpeg_12_bit(src, runner)
    from pydicom.pixels.decoders import gdcm as pydicom_gdcm

    try:
        return pydicom_gdcm._decode_frame(src, runner)
    except AttributeError:  # GDCM gives None instead of a buffer when it cannot decode
        raise ValueError("GDCM could not decode the frame") from None


def _decode_jpeg_12_bit(src: bytes, runner) -> bytes:
    """As pydicom's GDCM plugin builds its image (gdcm.Image around one fragment, then
    GetBuffer), for the 12-bit JPEG Extended that plugin declines."""
    gdcm = _gdcm()
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    element = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    element.SetValue(fragments.__ref__())

    image = gdcm.Image()
    image.SetNumberOfDimensions(2)
    image.SetDimensions((runner.columns, runner.rows, 1))
    image.SetDataElement(element)
    photometric = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    image.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(photometric))
    if runner.samples_per_pixel > 1:
        image.SetPlanarConfiguration(runner.planar_configuration)
    image.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(uid.JPEGExtended12Bit))))
    # The JPEG samples as they are (unsigned); a signed image's are sign-extended below, as
    # pydicom does with pylibjpeg's (GDCM's own signed path gives other values).
    bits = runner.bits_stored
    image.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, runner.bits_allocated, bits, bits - 1, 0))
    buffer = image.GetBuffer()  # char* as str (surrogate-escaped), None when decoding failed
    if buffer is None:
        raise ValueError("GDCM could not decode the 12-bit JPEG frame")
    frame = buffer.encode("utf-8", "surrogateescape")
    expected = runner.rows * runner.columns * runner.samples_per_pixel * (runner.bits_allocated // 8)
    if len(frame) != expected or runner.bits_allocated != 16:
        raise ValueError(f"GDCM returned {len(frame)} bytes for the 12-bit JPEG frame, expected {expected} "
                         f"(Bits Allocated {runner.bits_allocated})")
    if not runner.pixel_representation:
        return frame
    samples = np.frombuffer(frame, "<u2").astype(np.int32)
    signed = np.where(samples >= 1 << (bits - 1), samples - (1 << bits), samples)
    return signed.astype("<i2").tobytes()
