"""OpenJPEG called directly (ctypes): one JPEG 2000 or HTJ2K codestream, from memory, at a reduced
resolution level, with OpenJPEG's own threads.

Why not Pillow, pylibjpeg-openjpeg or glymur: Pillow can reduce but never asks OpenJPEG for
threads; pylibjpeg-openjpeg has neither reduction nor threads; glymur has both but reads files
only (a temporary file per frame) and needs a system libopenjp2. This module uses the system's
libopenjp2 2.5 or later where there is one (Debian: libopenjp2-7; its build decoded HTJ2K about
1.4x faster than the copy in Pillow's wheel here), else the copy Pillow's wheel ships (the one
Pillow's own JPEG 2000 plugin runs: no new dependency). Without either, ``available()`` is False
and callers keep their other decoder. The environment variable OPENJP2_LIBRARY names another
library file to use, or "none" to leave OpenJPEG to Pillow and pydicom (read once per process).

ctypes releases the GIL for the length of ``opj_decode``, so several Python threads decode at
once, and ``threads`` > 1 splits one frame's code-blocks across OpenJPEG's threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

MIN_VERSION = (2, 5, 0)  # HTJ2K (Part 15) decoding, strict mode, stable thread API
_CODEC_J2K = 0  # OPJ_CODEC_J2K: a raw codestream, as DICOM encapsulates it
_END_OF_STREAM = ctypes.c_size_t(-1).value


class OpenJpegError(RuntimeError):
    """OpenJPEG refused or failed to decode; the message holds what it said."""


class _Component(ctypes.Structure):  # opj_image_comp_t (openjpeg.h, 2.x)
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("dx", "dy", "w", "h", "x0", "y0", "prec", "bpp", "sgnd", "resno_decoded", "factor")] + [
        ("data", ctypes.POINTER(ctypes.c_int32)), ("alpha", ctypes.c_uint16)]


class _Image(ctypes.Structure):  # opj_image_t
    _fields_ = [(name, ctypes.c_uint32) for name in ("x0", "y0", "x1", "y1", "numcomps")] + [
        ("color_space", ctypes.c_int), ("comps", ctypes.POINTER(_Component)),
        ("icc_profile_buf", ctypes.c_void_p), ("icc_profile_len", ctypes.c_uint32)]


_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_MESSAGE = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)


def _candidates() -> list[str]:
    """OPENJP2_LIBRARY, else the system's libopenjp2, then Pillow's bundled copy (Linux wheels:
    pillow.libs/, macOS: PIL/.dylibs/)."""
    chosen = os.environ.get("OPENJP2_LIBRARY", "")
    if chosen:
        return [] if chosen.lower() == "none" else [chosen]
    system = ctypes.util.find_library("openjp2")
    paths = [system] if system else []
    try:
        import PIL

        folder = os.path.dirname(PIL.__file__)
        for pattern in ("../pillow.libs/libopenjp2*.so*", ".dylibs/libopenjp2*.dylib"):
            paths += sorted(glob.glob(os.path.join(folder, pattern)))
    except ImportError:
        pass
    return paths


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    void_p, image_pp = ctypes.c_void_p, ctypes.POINTER(ctypes.POINTER(_Image))
    signatures = {
        "opj_version": (ctypes.c_char_p, []),
        "opj_has_thread_support": (ctypes.c_int, []),
        "opj_create_decompress": (void_p, [ctypes.c_int]),
        "opj_set_default_decoder_parameters": (None, [void_p]),
        "opj_setup_decoder": (ctypes.c_int, [void_p, void_p]),
        "opj_decoder_set_strict_mode": (ctypes.c_int, [void_p, ctypes.c_int]),
        "opj_codec_set_threads": (ctypes.c_int, [void_p, ctypes.c_int]),
        "opj_set_error_handler": (ctypes.c_int, [void_p, _MESSAGE, void_p]),
        "opj_read_header": (ctypes.c_int, [void_p, void_p, image_pp]),
        "opj_set_decoded_resolution_factor": (ctypes.c_int, [void_p, ctypes.c_uint32]),
        "opj_decode": (ctypes.c_int, [void_p, void_p, ctypes.POINTER(_Image)]),
        "opj_end_decompress": (ctypes.c_int, [void_p, void_p]),
        "opj_destroy_codec": (None, [void_p]),
        "opj_image_destroy": (None, [ctypes.POINTER(_Image)]),
        "opj_stream_create": (void_p, [ctypes.c_size_t, ctypes.c_int]),
        "opj_stream_destroy": (None, [void_p]),
        "opj_stream_set_read_function": (None, [void_p, _READ]),
        "opj_stream_set_skip_function": (None, [void_p, _SKIP]),
        "opj_stream_set_seek_function": (None, [void_p, _SEEK]),
        "opj_stream_set_user_data_length": (None, [void_p, ctypes.c_uint64]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)  # AttributeError: too old a library
        function.restype, function.argtypes = restype, argtypes
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    for path in _candidates():
        try:
            lib = _declare(ctypes.CDLL(path))
            version = tuple(int(part) for part in lib.opj_version().decode().split(".")[:3])
        except (OSError, AttributeError, ValueError) as exc:
            logger.debug("libopenjp2 at %s not usable: %r", path, exc)
            continue
        if version >= MIN_VERSION:
            return lib
        logger.debug("libopenjp2 at %s is %s; %s or later is needed", path, version, MIN_VERSION)
    return None


def available() -> bool:
    """Whether a usable libopenjp2 (2.5 or later) was found."""
    return _library() is not None


def version() -> str:
    """The libopenjp2 version this module uses ("" when none)."""
    lib = _library()
    return lib.opj_version().decode() if lib is not None else ""


def has_threads() -> bool:
    lib = _library()
    return bool(lib is not None and lib.opj_has_thread_support())


def decode(codestream: bytes, reduce: int = 0, threads: int = 1, dtype=np.int32) -> tuple[np.ndarray, int, bool]:
    """One-component codestream -> (samples at 1 / 2**reduce of each side, precision, signed).

    The samples come as ``dtype`` (OpenJPEG's int32 by default; a narrower one the caller
    knows holds the precision saves a copy).

    Strict mode: a codestream cut short is an error, not a partly decoded image. Raises
    OpenJpegError (also for several components, or without a usable library)."""
    lib = _library()
    if lib is None:
        raise OpenJpegError("no usable libopenjp2 (2.5 or later) was found")
    data = bytes(codestream)
    size = len(data)
    base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value
    position = 0
    messages: list[str] = []

    def read(buffer, count, _user):
        nonlocal position
        if position >= size:
            return _END_OF_STREAM
        count = min(count, size - position)
        ctypes.memmove(buffer, base + position, count)
        position += count
        return count

    def skip(count, _user):
        nonlocal position
        count = max(-position, min(count, size - position))
        position += count
        return count

    def seek(offset, _user):
        nonlocal position
        if not 0 <= offset <= size:
            return 0
        position = offset
        return 1

    # The callbacks must outlive every library call that may use them.
    callbacks = (_READ(read), _SKIP(skip), _SEEK(seek), _MESSAGE(lambda text, _u: messages.append(text.decode(
        "utf-8", "replace").strip())))
    stream = codec = image = None
    try:
        stream = lib.opj_stream_create(size, 1)
        codec = lib.opj_create_decompress(_CODEC_J2K)
        if not stream or not codec:
            raise OpenJpegError("OpenJPEG could not allocate a decoder")
        lib.opj_stream_set_read_function(stream, callbacks[0])
        lib.opj_stream_set_skip_function(stream, callbacks[1])
        lib.opj_stream_set_seek_function(stream, callbacks[2])
        lib.opj_stream_set_user_data_length(stream, size)
        lib.opj_set_error_handler(codec, callbacks[3], None)
        parameters = ctypes.create_string_buffer(16384)  # opj_dparameters_t is about 8.3 KB
        lib.opj_set_default_decoder_parameters(parameters)
        image = ctypes.POINTER(_Image)()
        if not (lib.opj_setup_decoder(codec, parameters) and lib.opj_decoder_set_strict_mode(codec, 1)):
            raise OpenJpegError("OpenJPEG could not set up a decoder" + _said(messages))
        if threads > 1:
            lib.opj_codec_set_threads(codec, int(threads))  # false without thread support: one thread then
        if not lib.opj_read_header(stream, codec, ctypes.byref(image)) or not image:
            raise OpenJpegError("OpenJPEG could not read the codestream header" + _said(messages))
        if image.contents.numcomps != 1:
            raise OpenJpegError(f"{image.contents.numcomps} components; one was expected")
        if reduce and not lib.opj_set_decoded_resolution_factor(codec, reduce):
            raise OpenJpegError(f"cannot skip {reduce} resolution levels" + _said(messages))
        if not lib.opj_decode(codec, stream, image) or not lib.opj_end_decompress(codec, stream):
            raise OpenJpegError("OpenJPEG could not decode the codestream" + _said(messages))
        component = image.contents.comps[0]
        if not component.data or component.factor != reduce:
            raise OpenJpegError("OpenJPEG returned no samples at the resolution asked for")
        samples = np.ctypeslib.as_array(component.data, shape=(component.h, component.w)).astype(dtype)
        return samples, int(component.prec), bool(component.sgnd)
    finally:
        if image:
            lib.opj_image_destroy(image)
        if codec:
            lib.opj_destroy_codec(codec)
        if stream:
            lib.opj_stream_destroy(stream)


def _said(messages: list[str]) -> str:
    return f": {'; '.join(messages[-3:])}" if messages else ""
