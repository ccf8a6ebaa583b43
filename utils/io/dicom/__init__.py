"""Read a DICOM X-ray into a float image as a viewer would display it; the one reader of
untrusted DICOM in the project.

``read_dicom`` is the one entry point for pixels; ``read_dicom_header`` reads the few header
fields the project uses without decoding pixels; ``is_dicom`` is a cheap file-type check.

The contract
------------
For anything about a file's content, ``read_dicom`` and ``read_dicom_header`` raise only
``DicomReadError`` (a ``ValueError``; picklable, with ``reason``, ``path`` and ``message``),
whatever pydicom or a codec does underneath: ordinary exceptions, panics of compiled plugins
(a Rust ``PanicException`` is a BaseException), ``MemoryError``, ``RecursionError``, warnings
turned into errors. ``is_dicom`` returns False instead.
``reason`` is one of ``REASONS``:

    not_dicom, malformed_dicom, no_pixel_data, invalid_pixel_module, image_too_large,
    implausible_compression, truncated_pixel_data, unsupported_transfer_syntax,
    unsupported_photometric, decode_failed, codec_panic, out_of_memory, invalid_palette,
    invalid_modality_lut, empty_image

and the message says what was wrong in plain words, with the original exception's type and
text in brackets where there was one. What still propagates unchanged: an ``OSError`` that
carries an errno (a missing file, a permission or disk error: not a DICOM problem;
pydicom's own errno-less OSErrors such as "No tag to read" are ``malformed_dicom``), a
file object that cannot seek (``io.UnsupportedOperation``), KeyboardInterrupt, SystemExit and
cancellation.

Limits, checked before work: one frame may declare at most ``max_pixels`` samples
(``utils.constants.MAX_IMAGE_PIXELS``; Rows x Columns x Samples per Pixel, in the header and
in frame 0's codestream); uncompressed pixel data must hold every declared frame before
pydicom touches it; a compressed frame's own header must match the DICOM header, and a large
frame may not come from implausibly few bytes; no read asks for more bytes than the file has;
a deflated dataset may not inflate beyond 1 GiB. So no small file makes the reader allocate
gigabytes or decode for long, and a reader capped at a 4 GiB address space does not run out
of memory on any file.

Speed: the grayscale steps run through a table of every stored value (``grayscale``), and a
caller that will shrink the image can pass ``target_shape`` to have a JPEG 2000 or HTJ2K image
decoded at a lower resolution level (``j2k``), with ``set_j2k_threads`` OpenJPEG threads per
frame; see ``read_dicom``.

Layout
------
errors.py        DicomReadError, its subclasses, REASONS; turning any exception into one
reader.py        the public functions, HEADER_FIELDS, DicomImage
parse.py         steps 1-2: bounded reading, dcmread, preamble-less files, no pixel data
pixel_module.py  the Image Pixel module as checked integers; the pixel budget; native length
codestream.py    frame 0's JPEG / JPEG-LS / JPEG 2000 (JP2) / RLE header checks
decode.py        step 3: decoder choice and install hints, first-frame decoding
fallback.py      step 3 for what the primary decoders refuse: GDCM (python-gdcm, optional)
j2k.py           step 3 at reduced resolution for JPEG 2000 and HTJ2K
openjp2.py       libopenjp2 through ctypes: from memory, reduced, with OpenJPEG's threads
colour.py        step 4: Photometric Interpretation, colour and palette to luminance
grayscale.py     steps 5-7: modality LUT, VOI, MONOCHROME1, through the stored-value table
"""

import functools
from importlib import metadata as _metadata

from .errors import (
    REASONS,
    CodecPanicError,
    DicomReadError,
    EmptyImageError,
    ImageTooLargeError,
    InvalidPixelModuleError,
    MalformedDicomError,
    NoPixelDataError,
    NotDicomError,
    TruncatedPixelDataError,
    UnsupportedPhotometricError,
    UnsupportedTransferSyntaxError,
)
from .j2k import MAX_J2K_REDUCTION, TargetShape
from .j2k import set_decode_threads as set_j2k_threads
from .parse import Source
from .reader import (
    HEADER_FIELDS,
    DicomImage,
    is_dicom,
    read_dicom,
    read_dicom_header,
)

# Bump when the pixels ``read_dicom`` returns for some valid file change (a new decoding path,
# a LUT fix...): prepared caches are keyed on it, so a change re-decodes what it affects.
# 1: first reader; 2: JPEG 2000 decoded at a reduced resolution level when the output is smaller;
# 3: HTJ2K too, and libopenjp2 called directly (its version joins the key); 4: JPEG 2000 detail
# sub-bands and bit-planes the resize averages away left out (j2k_packets).
READER_VERSION = 4
# The distributions whose code turns bytes into pixels: their versions are part of the same key.
# python-gdcm: the fallback (fallback.py); only files the others refuse reach it, but a cache key
# cannot know that before decoding.
DECODER_DISTRIBUTIONS = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
                         "pillow", "numpy", "python-gdcm")  # Pillow: the reduced-resolution JPEG 2000 path


@functools.cache
def decoder_versions() -> dict[str, str]:
    """READER_VERSION, the installed versions of DECODER_DISTRIBUTIONS ("" when absent) and of the
    libopenjp2 the reduced JPEG 2000 path calls (a system library: no distribution names it)."""
    from . import openjp2

    versions = {"reader": str(READER_VERSION)}
    for name in DECODER_DISTRIBUTIONS:
        try:
            versions[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            versions[name] = ""
    versions["libopenjp2"] = openjp2.version()
    return versions


__all__ = [
    "DECODER_DISTRIBUTIONS",
    "HEADER_FIELDS",
    "MAX_J2K_REDUCTION",
    "REASONS",
    "CodecPanicError",
    "DicomImage",
    "DicomReadError",
    "EmptyImageError",
    "ImageTooLargeError",
    "InvalidPixelModuleError",
    "MalformedDicomError",
    "NoPixelDataError",
    "NotDicomError",
    "Source",
    "TargetShape",
    "TruncatedPixelDataError",
    "UnsupportedPhotometricError",
    "UnsupportedTransferSyntaxError",
    "is_dicom",
    "read_dicom",
    "READER_VERSION",
    "decoder_versions",
    "read_dicom_header",
    "set_j2k_threads",
]
