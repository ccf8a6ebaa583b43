"""The reader's promise, checked on one input: an image or a ``DicomReadError``, nothing else.

Every harness (the in-process corpus test, the isolated runner, the atheris target) calls
``exercise``, which runs the three ways the project reads a file:

1. ``read_dicom(source, target_shape=...)`` with a small fixed target, so JPEG 2000 images
   larger than it take the reduced-resolution path;
2. ``read_dicom(source)`` at full resolution;
3. ``read_dicom_header(source)``.

A ``DicomReadError`` with a non-empty ``reason`` is an expected outcome. A decoded image must
be a finite float32 2-D array in [0, 1]. Anything else propagates: an exception of another
type (including BaseExceptions such as codec panics) or a ``ContractViolation``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO

from utils.io.dicom import DicomReadError, read_dicom, read_dicom_header

TARGET_SHAPE = (32, 32)  # small, so the 64-256 px JPEG 2000 files in the corpus get reduced
STAGES = ("read_dicom(target_shape)", "read_dicom", "read_dicom_header")

Source = str | os.PathLike | BinaryIO


class ContractViolation(AssertionError):
    """The reader returned something it promises not to (a malformed image, an error without reason)."""


def target_shape(rows: int, cols: int) -> tuple[int, int]:
    return TARGET_SHAPE


def exercise(open_source: Callable[[], Source], state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the three reads on fresh sources from ``open_source()``.

    Returns ``{"outcome": "decoded" | "typed_error", "reason": <first reason or "">,
    "stages": {stage: "decoded HxW" | reason}}``; the outcome is that of the full-resolution
    ``read_dicom``. ``state["stage"]`` names the stage running, so a caller that catches an
    escaping exception knows where it came from.
    """
    state = {} if state is None else state
    calls = (
        lambda source: read_dicom(source, target_shape=target_shape),
        read_dicom,
        read_dicom_header,
    )
    stages: dict[str, str] = {}
    reasons = []
    for stage, call in zip(STAGES, calls):
        state["stage"] = stage
        try:
            result = call(open_source())
        except DicomReadError as exc:
            reason = getattr(exc, "reason", None)
            if not isinstance(reason, str) or not reason:
                raise ContractViolation(f"{stage}: DicomReadError without a reason: {exc!r}") from exc
            stages[stage] = reason
            reasons.append(reason)
            continue
        stages[stage] = _check_result(stage, result)
    state.pop("stage", None)
    full = stages["read_dicom"]
    return {
        "outcome": "decoded" if full.startswith("decoded") else "typed_error",
        "reason": reasons[0] if reasons else "",
        "stages": stages,
    }


def _check_result(stage: str, result: Any) -> str:
    import numpy as np

    if stage == "read_dicom_header":
        if not isinstance(result, dict) or not all(isinstance(v, str) for v in result.values()):
            raise ContractViolation(f"{stage} returned {type(result).__name__}, not a dict of str")
        return "decoded"
    pixels = getattr(result, "pixels", None)
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.float32 or pixels.ndim != 2:
        what = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ContractViolation(f"{stage} returned pixels {what}, not a float32 2-D array")
    if pixels.size == 0:
        raise ContractViolation(f"{stage} returned an empty image {pixels.shape}")
    bad = int((~np.isfinite(pixels)).sum())
    if bad:
        raise ContractViolation(f"{stage} returned {bad} non-finite pixel(s) (NaN or inf) of {pixels.size}")
    if pixels.min() < 0.0 or pixels.max() > 1.0:
        raise ContractViolation(f"{stage} returned values outside [0, 1] ({pixels.min()}..{pixels.max()})")
    return f"decoded {pixels.shape[0]}x{pixels.shape[1]}"


def describe(exc: BaseException) -> dict[str, str]:
    """Type, message and innermost frame of an escaping exception (for reports)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f"{_short_path(last.filename)}:{last.lineno} in {last.name}"
    kind = type(exc)
    module = kind.__module__
    name = kind.__qualname__ if module in ("builtins", "") else f"{module}.{kind.__qualname__}"
    return {"exception_type": name, "message": _one_line(str(exc)), "where": where}


def _short_path(filename: str) -> str:
    if "site-packages" + os.sep in filename:
        return filename.split("site-packages" + os.sep, 1)[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    return filename.removeprefix(root)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
