"""Step 3: decode the first frame, after every check that can be made without decoding.

Uncompressed data must hold every declared frame; compressed frame 0 goes through
``codestream.check_frame`` (sizes against the header and the budget, JP2 boxes, RLE offsets).
Then pydicom decodes with the checked Image Pixel values, or, with a ``target_shape``, a
grayscale JPEG 2000 or HTJ2K frame is decoded at a reduced resolution (``j2k``).
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from . import j2k
from .codestream import check_frame
from .errors import (
    DicomReadError,
    TruncatedPixelDataError,
    UnsupportedTransferSyntaxError,
    as_read_error,
    contained,
    exception_label,
    passes_through,
)
from .pixel_module import PixelModule, check_native_length, pixel_data_bytes

# What to install for each encapsulated syntax pydicom can decode with a plugin.
_LIBJPEG = "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_OPENJPEG = "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
_INSTALL_HINTS: dict[str, str] = {
    JPEGBaseline8Bit: _LIBJPEG,
    JPEGExtended12Bit: _LIBJPEG,
    JPEGLossless: _LIBJPEG,
    JPEGLosslessSV1: _LIBJPEG,
    JPEGLSLossless: "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)",
    JPEGLSNearLossless: "pip install pyjpegls (or pylibjpeg pylibjpeg-libjpeg, or python-gdcm)",
    JPEG2000Lossless: _OPENJPEG,
    JPEG2000: _OPENJPEG,
    HTJ2KLossless: "pip install pylibjpeg pylibjpeg-openjpeg",
    HTJ2KLosslessRPCL: "pip install pylibjpeg pylibjpeg-openjpeg",
    HTJ2K: "pip install pylibjpeg pylibjpeg-openjpeg",
    RLELossless: "pip install pylibjpeg pylibjpeg-rle (or python-gdcm)",
}
_NO_DECODER_HINT = (
    "pydicom has no decoder for it; convert the file to an uncompressed transfer syntax "
    "first (e.g. dcmtk's dcmconv/dcmdjpeg or gdcmconv --raw)"
)


def decode_first_frame(
    ds: Dataset,
    module: PixelModule,
    tsyntax: UID,
    path: str | None,
    max_pixels: int,
    target_shape: j2k.TargetShape | None = None,
    gray_step: j2k.GrayStep | None = None,
) -> tuple[np.ndarray, str, int]:
    """Stored values of frame 0, the photometric interpretation they came out in, and the
    JPEG 2000 resolution levels skipped (0: full resolution)."""
    if not getattr(ds, "file_meta", None):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax  # pydicom's decoders need it
    decoder = decoder_for(tsyntax, path)
    if module.frames == 1 and "NumberOfFrames" in ds and ds["NumberOfFrames"].value in (None, "", 0):
        ds.NumberOfFrames = 1  # what pydicom assumes, without its warning
    with contained(path, "read the Pixel Data and its offset tables"):
        options = as_pixel_options(ds, **module.decoding_options())

    if not tsyntax.is_compressed:
        check_native_length(ds, module, path)
    else:
        codestream = _first_codestream(ds, options, tsyntax, path)
        check_frame(codestream, tsyntax, module, path, max_pixels)
        if target_shape is not None and tsyntax in j2k.REDUCIBLE_SYNTAXES:
            reduced = j2k.decode_reduced(codestream, module, target_shape, path, tsyntax, gray_step)
            if reduced is not None:
                return reduced[0], module.photometric, reduced[1]

    try:
        frame, meta = decoder.as_array(ds, index=0, validate=True, **options)
    except BaseException as exc:  # codecs raise RuntimeError/ValueError/..., Rust ones panic
        if passes_through(exc):
            raise
        raise _decode_error(exc, tsyntax, path) from exc
    expected = (module.rows, module.columns) + ((module.samples,) if module.samples > 1 else ())
    if frame.shape != expected:
        raise DicomReadError(
            f"the decoder returned an array of shape {frame.shape}, expected {expected}", path, reason="decode_failed"
        )
    return frame, str(meta.get("photometric_interpretation", module.photometric)), 0


def _first_codestream(ds: Dataset, options: dict, tsyntax: UID, path: str | None) -> bytes:
    """Frame 0's compressed bytes, found the way pydicom's decoder will find them."""
    data = pixel_data_bytes(ds, path)
    if not data:
        raise TruncatedPixelDataError("the Pixel Data element is empty", path)
    try:
        return get_frame(
            data, 0, number_of_frames=options["number_of_frames"], extended_offsets=options.get("extended_offsets")
        )
    except BaseException as exc:
        if passes_through(exc):
            raise
        raise _decode_error(exc, tsyntax, path, "find frame 0 in the encapsulated pixel data") from exc


def decoder_for(tsyntax: UID, path: str | None):
    hint = _INSTALL_HINTS.get(tsyntax, _NO_DECODER_HINT)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"cannot decode {_syntax_label(tsyntax)}: {_NO_DECODER_HINT}",
            path,
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise UnsupportedTransferSyntaxError(
            f"cannot decode {_syntax_label(tsyntax)}: no decoder "
            f"plugin is available ({missing}); {hint}",
            path,
        )
    return decoder


def _syntax_label(tsyntax: UID) -> str:
    if tsyntax.name != str(tsyntax):
        return f"transfer syntax {tsyntax.name} ({tsyntax})"
    return f"unknown or private transfer syntax {tsyntax}"


def _decode_error(exc: BaseException, tsyntax: UID, path: str | None, what: str | None = None) -> DicomReadError:
    what = what or f"decode the {tsyntax.name} pixel data"
    if not isinstance(exc, Exception) or isinstance(exc, (MemoryError, RecursionError)):
        return as_read_error(exc, path, what)  # out_of_memory, codec_panic...
    text = str(exc)
    if "missing dependencies" in text:
        hint = _INSTALL_HINTS.get(tsyntax, _NO_DECODER_HINT)
        return UnsupportedTransferSyntaxError(f"cannot decode {_syntax_label(tsyntax)}: {text}; {hint}", path)
    if "less than expected" in text:
        return TruncatedPixelDataError(f"the pixel data is shorter than expected [{exception_label(exc)}]", path)
    return DicomReadError(f"could not {what} [{exception_label(exc)}]", path, reason="decode_failed")

