"""How another site would have rendered the same X-ray: named, seeded image shifts for a robustness benchmark.

Each shift takes the 8-bit display image the model is fed (uint8 (H, W), the prepared cache's PNG or
what ``utils.preprocessing.preprocess_file`` makes of a raw file, at the spec's size) and returns
another uint8 (H, W) image of the same shape: the same radiograph as a site with another detector,
processing, export or annotation habit would send it. The shifted image then goes to the model
exactly as a clean one does (``to_model_input``), so the model's preprocessing spec stays the one
contract; test.py ``--shift`` (utils.evaluate.shift_eval) runs the benchmark.

Severities 1-3 grow one parameter (``Shift.levels``); a shift with one level (``invert``) has only
severity 1. Severity 1 of the detector and geometry shifts is about what training's augmentation
already draws (utils.data.dataset: gamma exp(+-0.3), unsharp +-0.5, noise SD <= 5 gray levels,
rotation +-10 degrees, zoom +-15 %), 2 and 3 go beyond it. Random choices (which direction of the
gamma, which corner the marker is in, black or white borders...) come from a generator seeded with
(seed, shift name, image key) and not the severity: the same image gets the same choices at every
severity, only larger, and the same seed gives the same image every time.

Geometric sizes (borders, text, blur radii) are fractions of the image side, so a shift means the
same at 64 and at 512 px. The shifts are applied at the model's resolution, after the site's image
was resized: noise or JPEG blocks at full resolution would be averaged away in part by the
resize, so these severities are harsher than the same settings at the detector. PNG sources are
taken as displayed (no windowing); a DICOM is windowed by percentiles before the resize, which
would undo part of a linear window change (``bits``, ``window``) but not a gamma curve or
equalisation.

Pure numpy / OpenCV: nothing here imports TensorFlow.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import cv2
import numpy as np

SEVERITIES = (1, 2, 3)
ALL = "all"


@dataclass(frozen=True)
class Shift:
    """A named shift: ``apply(image, level, rng) -> image`` with ``levels[severity - 1]``."""

    name: str
    description: str  # what a site does to make it, in one line
    levels: tuple  # the parameter of severities 1, 2, 3 (fewer for a shift with fewer severities)
    unit: str  # what the level means, for the tables
    apply: Callable[[np.ndarray, object, np.random.Generator], np.ndarray]

    @property
    def severities(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.levels) + 1))

    def level(self, severity: int) -> object:
        if severity not in self.severities:
            raise ValueError(f"shift {self.name!r} has severities {list(self.severities)}, not {severity}")
        return self.levels[severity - 1]


# --- Helpers --------------------------------------------------------------------------------
def _check(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 2 or min(image.shape) < 8:
        raise ValueError(f"a shift takes an 8-bit gray image (H, W) of at least 8 px, got {image.dtype} {image.shape}")
    return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _side(image: np.ndarray) -> int:
    return min(image.shape)


def _lut(function: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A 256-entry uint8 look-up table of ``function`` on 0..255 (float in, float out)."""
    return _to_uint8(function(np.arange(256, dtype=np.float64)))


# --- Detector and processing ----------------------------------------------------------------
def gamma(image, level: float, rng) -> np.ndarray:
    """Another detector's or processing's gamma curve: 255 (x / 255) ** exp(+-level), darker or lighter."""
    exponent = float(np.exp(level if rng.random() < 0.5 else -level))
    return cv2.LUT(image, _lut(lambda x: 255.0 * (x / 255.0) ** exponent))


def equalise(image, level, rng) -> np.ndarray:
    """Local contrast equalisation (CLAHE of clip limit ``level`` on 4 x 4 tiles), or, level
    ``"global"``, whole-image histogram equalisation: what 'enhanced' exports look like."""
    if level == "global":
        return cv2.equalizeHist(image)
    return cv2.createCLAHE(clipLimit=float(level), tileGridSize=(4, 4)).apply(image)


def unsharp(image, level: float, rng) -> np.ndarray:
    """Edge enhancement (unsharp masking): x + level (x - blur(x)), blur sigma 2 % of the side."""
    sigma = 0.02 * _side(image)
    x = image.astype(np.float32)
    blurred = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)
    return _to_uint8(x + float(level) * (x - blurred))


def noise(image, level: float, rng) -> np.ndarray:
    """Additive Gaussian noise of SD ``level`` gray levels (a noisier detector or a lower dose)."""
    return _to_uint8(image.astype(np.float32) + rng.normal(0.0, float(level), image.shape))


# --- Resolution and compression -------------------------------------------------------------
def downsample(image, level: int, rng) -> np.ndarray:
    """A lower-resolution detector or export: shrunk ``level`` times (area), then enlarged back (linear)."""
    rows, cols = image.shape
    small = cv2.resize(image, (max(1, cols // level), max(1, rows // level)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (cols, rows), interpolation=cv2.INTER_LINEAR)


def jpeg(image, level: int, rng) -> np.ndarray:
    """Lossy JPEG at quality ``level`` (a PACS or teleradiology export)."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(level)])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 gray image
        raise RuntimeError("JPEG encoding failed")
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


# --- Framing --------------------------------------------------------------------------------
def border(image, level: float, rng) -> np.ndarray:
    """Collimation or shutters: each side covered over a depth drawn in [level / 2, level] of the
    side, white (unexposed, as detected) or black (electronic shutter), one colour per image."""
    out = image.copy()
    rows, cols = image.shape
    top, bottom, left, right = (np.array([rows, rows, cols, cols]) * rng.uniform(0.5, 1.0, 4) * level).round()
    value = 255 if rng.random() < 0.5 else 0
    out[: int(top)] = value
    out[rows - int(bottom):] = value
    out[:, : int(left)] = value
    out[:, cols - int(right):] = value
    return out


def letterbox(image, level: float, rng) -> np.ndarray:
    """An image letterboxed (aspect kept, black bars) where the model's images were stretched: the
    content squeezed to ``level`` of the side along one axis (drawn per image), the rest black."""
    rows, cols = image.shape
    out = np.zeros_like(image)
    if rng.random() < 0.5:  # bars left and right
        width = max(1, round(cols * level))
        left = (cols - width) // 2
        out[:, left : left + width] = cv2.resize(image, (width, rows), interpolation=cv2.INTER_AREA)
    else:  # bars above and below
        height = max(1, round(rows * level))
        top = (rows - height) // 2
        out[top : top + height] = cv2.resize(image, (cols, height), interpolation=cv2.INTER_AREA)
    return out


def stretch(image, level: float, rng) -> np.ndarray:
    """An image of another aspect ratio stretched to the square: enlarged ``level`` times along one
    axis (drawn per image), centre cropped back."""
    rows, cols = image.shape
    if rng.random() < 0.5:
        width = round(cols * level)
        wide = cv2.resize(image, (width, rows), interpolation=cv2.INTER_LINEAR)
        left = (width - cols) // 2
        return np.ascontiguousarray(wide[:, left : left + cols])
    height = round(rows * level)
    tall = cv2.resize(image, (cols, height), interpolation=cv2.INTER_LINEAR)
    top = (height - rows) // 2
    return np.ascontiguousarray(tall[top : top + rows])


def rotate(image, level: float, rng) -> np.ndarray:
    """A detector or a scan rotated by +-``level`` degrees about the centre, corners black."""
    rows, cols = image.shape
    angle = level if rng.random() < 0.5 else -level
    matrix = cv2.getRotationMatrix2D(((cols - 1) / 2, (rows - 1) / 2), float(angle), 1.0)
    return cv2.warpAffine(image, matrix, (cols, rows), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


def crop(image, level: float, rng) -> np.ndarray:
    """A tighter field of view: a window of ``level`` of each side at a random place, enlarged back."""
    rows, cols = image.shape
    height, width = max(1, round(rows * level)), max(1, round(cols * level))
    top = int(rng.integers(0, rows - height + 1))
    left = int(rng.integers(0, cols - width + 1))
    return cv2.resize(image[top : top + height, left : left + width], (cols, rows), interpolation=cv2.INTER_LINEAR)


# --- Annotations ----------------------------------------------------------------------------
_CORNERS = ("top left", "top right", "bottom left", "bottom right")
_TEXT = ("ST. ELSEWHERE RADIOLOGY", "AP SUPINE PORTABLE", "2024-03-17 02:14", "ACC 88412093", "kVp 85 mAs 2.5")


def text(image, level: int, rng) -> np.ndarray:
    """Burned-in annotations: an L or R marker in a random corner, plus ``level - 1`` lines of
    white text (site, view, date...) in the opposite corner, scaled with the image."""
    out = image.copy()
    rows, cols = image.shape
    side = _side(image)
    font = cv2.FONT_HERSHEY_SIMPLEX
    corner = int(rng.integers(0, 4))
    marker = "L" if rng.random() < 0.5 else "R"
    scale = side / 128 * 0.6
    thickness = max(1, round(side / 64))
    (width, height), _ = cv2.getTextSize(marker, font, scale, thickness)
    margin = max(1, round(0.04 * side))
    x = margin if corner in (0, 2) else cols - margin - width
    y = margin + height if corner in (0, 1) else rows - margin
    cv2.putText(out, marker, (x, y), font, scale, 255, thickness, cv2.LINE_AA)
    lines = [_TEXT[i] for i in rng.permutation(len(_TEXT))[: int(level) - 1]]
    line_scale = side / 128 * 0.28
    line_thickness = max(1, round(side / 256))
    opposite = 3 - corner
    step = cv2.getTextSize("Ag", font, line_scale, line_thickness)[0][1] + max(2, round(0.02 * side))
    for i, line in enumerate(lines):
        (width, height), _ = cv2.getTextSize(line, font, line_scale, line_thickness)
        x = margin if opposite in (0, 2) else max(0, cols - margin - width)
        y = margin + height + i * step if opposite in (0, 1) else rows - margin - (len(lines) - 1 - i) * step
        cv2.putText(out, line, (x, y), font, line_scale, 255, line_thickness, cv2.LINE_AA)
    return out


# --- Photometric interpretation and bit depth -----------------------------------------------
def invert(image, level, rng) -> np.ndarray:
    """MONOCHROME1 mishandled: the image shown inverted (bone dark, air white)."""
    return cv2.bitwise_not(image)


def bits(image, level: float, rng) -> np.ndarray:
    """A 12-bit image exported to 8 bits through its full range: the anatomy fills only ``level``
    of the gray scale (at a random offset), a flat low-contrast image with fewer distinct levels."""
    offset = rng.uniform(0.0, 1.0 - level) * 255.0
    return cv2.LUT(image, _lut(lambda x: offset + x * level))


def window(image, level: float, rng) -> np.ndarray:
    """An 8-bit export through a narrower window than the model's: the darkest and brightest
    ``level`` percent of the pixels clipped, the rest stretched to 0..255."""
    low, high = np.percentile(image, [level, 100.0 - level])
    if high <= low:
        return image.copy()
    return cv2.LUT(image, _lut(lambda x: (x - low) * 255.0 / (high - low)))


REGISTRY: dict[str, Shift] = {s.name: s for s in (
    Shift("gamma", "another detector's gamma curve, darker or lighter", (0.3, 0.6, 0.9),
          "exponent exp(+-level)", gamma),
    Shift("equalise", "contrast equalisation: CLAHE, then global histogram equalisation", (1.5, 3.0, "global"),
          "CLAHE clip limit (4 x 4 tiles), or global", equalise),
    Shift("unsharp", "edge enhancement (unsharp masking, sigma 2 % of the side)", (0.5, 1.5, 3.0),
          "amount", unsharp),
    Shift("noise", "Gaussian noise", (5.0, 10.0, 20.0), "SD in gray levels", noise),
    Shift("downsample", "lower resolution, enlarged back", (2, 4, 8), "factor", downsample),
    Shift("jpeg", "lossy JPEG export", (50, 20, 5), "quality", jpeg),
    Shift("border", "collimation / shutter borders, black or white", (0.06, 0.12, 0.2),
          "depth per side (share of the side)", border),
    Shift("letterbox", "letterboxed (black bars) instead of stretched", (0.85, 0.7, 0.5),
          "content share of one axis", letterbox),
    Shift("stretch", "another aspect ratio stretched to the square", (1.15, 1.3, 1.5),
          "stretch of one axis", stretch),
    Shift("text", "burned-in L/R marker and text lines", (1, 2, 4), "marker + level - 1 text lines", text),
    Shift("rotate", "small rotation, corners black", (5.0, 10.0, 20.0), "degrees", rotate),
    Shift("crop", "tighter field of view, enlarged back", (0.9, 0.8, 0.65), "share of each side kept", crop),
    Shift("invert", "MONOCHROME1 shown inverted", ("inverted",), "", invert),
    Shift("bits", "12-bit range mapped linearly into 8 bits: low contrast", (0.6, 0.35, 0.2),
          "share of the gray scale used", bits),
    Shift("window", "narrower 8-bit window: tails clipped", (2.0, 5.0, 12.0), "percent clipped at each end", window),
)}


# --- Applying and naming --------------------------------------------------------------------
def rng_for(name: str, key: str = "", seed: int = 0) -> np.random.Generator:
    """The generator of one shift on one image: the same (seed, name, key) give the same draws."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode()), zlib.crc32(str(key).encode())])


def apply(image: np.ndarray, name: str, severity: int, *, key: str = "", seed: int = 0) -> np.ndarray:
    """``image`` (uint8 (H, W)) as shift ``name`` at ``severity`` renders it: uint8 (H, W), a new array.

    ``key`` names the image (its file name), so that each image gets its own draws; ``seed`` varies them all."""
    shift = get(name)
    level = shift.level(int(severity))
    out = shift.apply(_check(image), level, rng_for(name, key, seed))
    if out.shape != image.shape or out.dtype != np.uint8:  # pragma: no cover - each shift keeps them
        raise AssertionError(f"shift {name} returned {out.dtype} {out.shape} for uint8 {image.shape}")
    return out


def get(name: str) -> Shift:
    if name not in REGISTRY:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(REGISTRY)} (or {ALL})")
    return REGISTRY[name]


def label(name: str, severity: int) -> str:
    return f"{name}:{severity}"


def parse(values: Sequence[str]) -> list[tuple[str, int]]:
    """``--shift`` values -> [(name, severity)], in the order given, each once. A value is
    ``all``, ``NAME`` (all its severities) or ``NAME:SEVERITY``; commas separate several.
    ValueError for an unknown name or severity."""
    out: list[tuple[str, int]] = []
    for value in values:
        for item in filter(None, (part.strip() for part in str(value).split(","))):
            name, _, severity = item.partition(":")
            name = name.strip().lower()
            if name == ALL:
                if severity:
                    chosen = [(n, int(severity)) for n, s in REGISTRY.items() if _int(severity, item) in s.severities]
                else:
                    chosen = [(n, s) for n, shift in REGISTRY.items() for s in shift.severities]
            else:
                shift = get(name)
                chosen = [(name, s) for s in shift.severities] if not severity else [(name, _int(severity, item))]
                for _, s in chosen:
                    shift.level(s)  # raises for a severity the shift does not have
            out += [c for c in chosen if c not in out]
    return out


def _int(text: str, item: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--shift {item}: the severity must be a number, got {text!r}") from None


def help_text() -> str:
    """One line per shift for --help: name, what it is, the levels of its severities."""
    lines = []
    for shift in REGISTRY.values():
        levels = ", ".join(str(level) for level in shift.levels)
        lines.append(f"{shift.name} ({shift.description}; {shift.unit + ' ' if shift.unit else ''}{levels})")
    return "; ".join(lines)
