"""Where a model's initial weights come from: nothing, the ImageNet files of keras.applications,
or a local ``.keras`` / ``.weights.h5`` file written by this project.

Kept apart from the builders so the three cases, and their errors, read in one place.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import zipfile
from dataclasses import dataclass

import h5py
import keras
from keras.utils import get_file  # module-level name so tests can replace the download

logger = logging.getLogger(__name__)

SCRATCH = "none"
IMAGENET = "imagenet"
PATH = "path"
WEIGHTS_SUFFIXES = (".weights.h5", ".keras")


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but could not be downloaded (e.g. an offline machine)."""


class WeightsMismatchError(ValueError):
    """A weights file does not fit the architecture that was built."""


@dataclass(frozen=True)
class ImagenetFile:
    """The exact file keras.applications downloads, so a file already in its cache is reused."""

    fname: str  # file name inside <keras home>/models/
    origin: str  # URL keras.applications downloads it from
    file_hash: str | None = None  # md5/sha256 keras checks; None where keras checks none


def parse_weights(weights: str | os.PathLike | None) -> tuple[str, str | None]:
    """Return ("none", None), ("imagenet", None) or ("path", path) for a ``weights`` argument."""
    if weights is None:
        return SCRATCH, None
    text = os.fspath(weights)
    if text.strip().lower() in ("", "none", "null", "scratch"):
        return SCRATCH, None
    if text.strip().lower() == IMAGENET:
        return IMAGENET, None
    if not text.endswith(WEIGHTS_SUFFIXES):
        raise ValueError(
            f"weights={text!r} is neither 'none', 'imagenet' nor a path ending in "
            f"{' or '.join(WEIGHTS_SUFFIXES)}."
        )
    if not os.path.isfile(text):
        raise FileNotFoundError(f"Weights file not found: {text}")
    return PATH, text


def keras_cache_dir() -> str:
    """The folder keras.utils.get_file uses by default (KERAS_HOME or ~/.keras, else /tmp/.keras)."""
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = os.path.expanduser("~")
        base = base if os.access(base, os.W_OK) else "/tmp"
        home = os.path.join(base, ".keras")
    home = os.path.expanduser(home)
    if not os.access(home, os.W_OK):
        home = "/tmp/.keras"  # get_file's own fallback for an unwritable (or missing) cache
    return home


def fetch_imagenet(model_name: str, spec: ImagenetFile) -> str:
    """Return the local path of the ImageNet weights file, downloading it if Keras has no copy."""
    cache_dir = keras_cache_dir()
    target = os.path.join(cache_dir, "models", spec.fname)
    try:
        return get_file(
            spec.fname,
            spec.origin,
            cache_subdir="models",
            cache_dir=cache_dir,
            file_hash=spec.file_hash,
        )
    # get_file raises a bare Exception ("URL fetch failure on ...") for network errors.
    except Exception as err:
        raise WeightsUnavailableError(
            f"ImageNet weights for {model_name} could not be downloaded ({err}).\n"
            f"Keras caches them as {target} (file name {spec.fname!r}). On an offline machine, "
            f"download {spec.origin} elsewhere and copy it to {target}, "
            f"or use --weights none (train from scratch, as the paper did) "
            f"or --weights PATH (a .keras or .weights.h5 file of this architecture)."
        ) from err


def _h5_signature(h5: h5py.File) -> dict[str, tuple[int, ...]]:
    """Map every layer variable stored in a Keras 3 weights file to its shape (optimizer ignored)."""
    signature: dict[str, tuple[int, ...]] = {}

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and name.startswith("layers/"):
            signature[name] = tuple(obj.shape)

    h5.visititems(visit)
    return signature


def file_signature(path: str) -> dict[str, tuple[int, ...]]:
    """Variable paths and shapes in a ``.weights.h5`` file or in the weights inside a ``.keras``."""
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            data = archive.read("model.weights.h5")
        with h5py.File(io.BytesIO(data), "r") as h5:
            return _h5_signature(h5)
    with h5py.File(path, "r") as h5:
        return _h5_signature(h5)


def model_signature(model: keras.Model) -> dict[str, tuple[int, ...]]:
    """What ``file_signature`` would return for a file saved from ``model``."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe.weights.h5")
        model.save_weights(probe)
        return file_signature(probe)


def signature_diff(expected: dict, found: dict, limit: int = 3) -> str:
    """A short human description of how two signatures differ ("" when they are equal)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} variables missing from the file, e.g. {missing[:limit]}")
    if unexpected:
        parts.append(f"{len(unexpected)} variables in the file but not in the model, "
                     f"e.g. {unexpected[:limit]}")
    if reshaped:
        parts.append(f"{len(reshaped)} shapes differ, e.g. "
                     + ", ".join(f"{k}: model {expected[k]} vs file {found[k]}"
                                 for k in reshaped[:limit]))
    return "; ".join(parts)


def load_weights_file(model: keras.Model, path: str, description: str) -> None:
    """Load ``path`` into ``model``, refusing any file that does not match it exactly.

    Keras alone raises on a wrong shape but silently loads a file holding MORE layers than
    the model (e.g. resnet34 weights into resnet18), hence the explicit comparison first.
    """
    diff = signature_diff(model_signature(model), file_signature(path))
    if diff:
        raise WeightsMismatchError(
            f"{path} does not match {description}: {diff}. Build the model with the same "
            f"backbone, number of classes and channels as the run that saved the file."
        )
    model.load_weights(path)
    logger.info("Loaded weights from %s", path)
