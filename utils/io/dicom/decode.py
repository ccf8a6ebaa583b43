"""Step 3: decode the first frame, after every check that can be made without decoding.

Uncompressed data must hold every declared frame; compressed frame 0 goes through
``codestream.check_frame`` (sizes against the header and the budget, JP2 boxes, RLE offsets).
Then pydicom decodes with the checked Image Pixel values, or, with a ``target_shape``, a
grayscale JPEG 2000 or HTJ2K frame is decoded at a reduced resolution (``j2k``).

pydicom's plugins are tried in ``PRIMARY_PLUGINS`` order, never GDCM; when they all fail with
``decode_failed`` (or none is installed), GDCM gets the frame (``fallback``, if installed).
"""

from __future__ import annotations

from typing import NamedTuple

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

from . import fallback, j2k, openjp2
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
# pydicom's plugins in the order pydicom itself tries them, less GDCM (its first choice for JPEG
# and JPEG 2000), which is only the fallback here; plugins not named go last, by name.
PRIMARY_PLUGINS = ("pylibjpeg", "pyjpegls", "pillow", "pydicom")


class DecodedFrame(NamedTuple):
    """Frame 0's stored values and where they came from."""

    pixels: np.ndarray  # rows x columns (x samples), Bits Allocated / Pixel Representation's dtype
    photometric: str  # the photometric interpretation they came out in
    reduced_by: int  # JPEG 2000 resolution levels skipped (0: full resolution)
    decoder: str  # pydicom's plugin ("pylibjpeg", "pillow"...), "gdcm" (the fallback), "native",
    #               or "openjp2"/"pillow" for a reduced JPEG 2000 decode


def decode_first_frame(
    ds: Dataset,
    module: PixelModule,
    tsyntax: UID,
    path: str | None,
    max_pixels: int,
    target_shape: j2k.TargetShape | None = None,
    gray_step: j2k.GrayStep | None = None,
) -> DecodedFrame:
    """Stored values of frame 0, the photometric interpretation they came out in, the JPEG 2000
    resolution levels skipped (0: full resolution) and the decoder that made them."""
    if not getattr(ds, "file_meta", None):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = tsyntax  # pydicom's decoders need it
    decoder = decoder_for(tsyntax, path)
    if module.frames == 1 and "NumberOfFrames" in ds and ds["NumberOfFrames"].value in (None, "", 0):
        ds.NumberOfFrames = 1  # what pydicom assumes, without its warning
    with contained(path, "read the Pixel Data and its offset tables"):
        options = as_pixel_options(ds, **module.decoding_options())

    header = None  # frame 0's codestream header, for the fallback
    if not tsyntax.is_compressed:
        check_native_length(ds, module, path)
    else:
        codestream = _first_codestream(ds, options, tsyntax, path)
        header = check_frame(codestream, tsyntax, module, path, max_pixels)
        if target_shape is not None and tsyntax in j2k.REDUCIBLE_SYNTAXES:
            reduced = j2k.decode_reduced(codestream, module, target_shape, path, tsyntax, gray_step)
            if reduced is not None:
                used = "openjp2" if openjp2.available() else "pillow"
                return DecodedFrame(reduced[0], module.photometric, reduced[1], used)

    try:
        frame, meta, used = _decode_primary(decoder, ds, options)
    except BaseException as exc:  # codecs raise RuntimeError/ValueError/..., Rust ones panic
        if passes_through(exc):
            raise
        error = _decode_error(exc, tsyntax, path)
        if error.reason != "decode_failed" or tsyntax not in fallback.SYNTAXES:
            raise error from exc
        frame, meta = _decode_fallback(ds, tsyntax, options, path, error, fallback.refusal(module, header))
        used = fallback.NAME
    expected = (module.rows, module.columns) + ((module.samples,) if module.samples > 1 else ())
    if frame.shape != expected:
        raise DicomReadError(
            f"the decoder returned an array of shape {frame.shape}, expected {expected}", path, reason="decode_failed"
        )
    return DecodedFrame(frame, str(meta.get("photometric_interpretation", module.photometric)), 0, used)


def _primary_plugins(decoder) -> list[str]:
    """pydicom's installed plugins for the syntax but GDCM, in ``PRIMARY_PLUGINS`` order."""
    names = [name for name in decoder.available_plugins if name != fallback.NAME]
    return sorted(names, key=lambda name: (PRIMARY_PLUGINS.index(name) if name in PRIMARY_PLUGINS
                                           else len(PRIMARY_PLUGINS), name))


def _decode_primary(decoder, ds: Dataset, options: dict) -> tuple[np.ndarray, dict, str]:
    """Frame 0 through the first primary plugin that decodes it: (array, pixel properties, plugin).

    As pydicom's own loop over plugins: an Exception moves on to the next plugin, anything else
    (a Rust panic) leaves at once. When every plugin failed, the one failure, or a RuntimeError
    listing them all."""
    if decoder.is_native:
        return *decoder.as_array(ds, index=0, validate=True, **options), "native"
    plugins = _primary_plugins(decoder)
    if not plugins:
        raise RuntimeError(f"no decoding plugin but {fallback.NAME} is installed")
    failures: list[Exception] = []
    for name in plugins:
        try:
            return *decoder.as_array(ds, index=0, validate=True, decoding_plugin=name, **options), name
        except MemoryError:
            raise
        except Exception as exc:
            failures.append(exc)
    if len(failures) == 1:
        raise failures[0]
    texts = "; ".join(_plugin_failure(exc) for exc in failures)
    raise RuntimeError(f"every decoding plugin failed: {texts}") from failures[0]


def _plugin_failure(exc: BaseException) -> str:
    """"plugin: what went wrong" out of pydicom's "Unable to decode as exceptions were raised by
    all available plugins: ..." (the whole text when it is something else)."""
    text = " ".join(str(exc).split("raised by all available plugins:", 1)[-1].split())
    return text if len(text) <= 300 else text[:297] + "..."


def _decode_fallback(
    ds: Dataset, tsyntax: UID, options: dict, path: str | None, primary: DicomReadError, refusal: str | None
) -> tuple[np.ndarray, dict]:
    """Frame 0 through GDCM after the primary plugins failed with ``primary``, unless
    ``fallback.refusal`` gave a reason not to."""
    if not fallback.available():
        raise DicomReadError(
            f"{primary.message}; the fallback decoder ({fallback.NAME}) is not installed: {fallback.INSTALL_HINT}",
            path, reason="decode_failed") from None
    if refusal is not None:
        raise DicomReadError(f"{primary.message}; the fallback decoder ({fallback.NAME}) was not tried: {refusal}",
                             path, reason="decode_failed") from None
    try:
        return fallback.decode(ds, tsyntax, options)
    except BaseException as exc:
        if passes_through(exc):
            raise
        second = _decode_error(exc, tsyntax, path)
        if second.reason not in ("decode_failed", "unsupported_transfer_syntax"):
            raise second from exc  # out_of_memory, truncated_pixel_data: what the fallback found
        raise DicomReadError(
            f"{primary.message}; the fallback decoder failed too [{_plugin_failure(exc)}]",
            path, reason="decode_failed") from exc


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
    """pydicom's decoder for ``tsyntax``, when a primary plugin or the fallback can decode it."""
    hint = _INSTALL_HINTS.get(tsyntax, _NO_DECODER_HINT)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            f"cannot decode {_syntax_label(tsyntax)}: {_NO_DECODER_HINT}",
            path,
        ) from None
    if decoder.is_native or _primary_plugins(decoder) or fallback.is_available(tsyntax):
        return decoder
    missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
    raise UnsupportedTransferSyntaxError(
        f"cannot decode {_syntax_label(tsyntax)}: no decoder "
        f"plugin is available ({missing}); {hint}",
        path,
    )


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

