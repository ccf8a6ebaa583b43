"""An evaluation set of images that are NOT projection radiographs, written by the project itself.

What it is for: measuring how many non-radiographs an out-of-distribution (OOD) score flags. The
classifier gives a confident body part to anything it is shown (a CT slice, an ultrasound, a
photo of a screen...); the header guard (``utils.infer.decisions.not_projection``) keeps most of
them away by their Modality, but a sender can tag anything DX. So every image is written twice:

* **as sent**: its own Modality and SOP class (CT, MR, US, NM, XA, SC, XC photographs, RTDOSE...);
* **re-tagged**: Modality DX and SOP class Digital X-Ray Image Storage - For Presentation
  (``retagged=True``; for colour images this is deliberately non-conformant), so a detector
  has to tell them apart by the pixels alone.

Kinds (``KINDS``): ``real`` (every non-projection image in pydicom's own test files and in
pydicom-data that the project's reader decodes, first frame only, original pixels, size and
transfer syntax; about 140 files, whatever ``per_kind`` is), and ten synthetic kinds
drawn with NumPy/OpenCV: ``ct``, ``mr``, ``ultrasound``, ``nuclear``, ``document``, ``photo``
(scikit-learn's two bundled sample photos, cropped and resized, plus procedural scenes),
``screen_photo`` (a cartoon X-ray from ``utils.data.demo`` or a scene photographed on a monitor),
``colour`` (UI screenshots, charts, colourful noise), ``fluoroscopy`` (XA/RF, some multi-frame)
and ``mask`` (label maps, binary masks, RT dose grids). ``manifest.csv`` lists every file.

Independence: nothing is fitted on this set, and nothing here knows how any OOD detector is
built or calibrated; it is drawn from its own seed, so it can score any detector honestly.

Limits: the synthetic kinds only approximate their modalities (cartoon anatomy, simple noise
models; a detector can learn to spot the drawing style), the real files are few and small
(pydicom ships several encodings of the same picture: the ``group`` column marks such
near-duplicates, so rates can be weighted per group), and a fluoroscopy frame or a photo of an
X-ray on a screen is arguably X-ray content: flagging them is a policy, not a law of physics.
As-sent copies of real files keep the original attributes except a fresh SOP Instance UID (so
the set can be sent through a PACS without collisions); every UID this module makes is derived
from the seed, so a rerun writes the same pixels under the same UIDs.

    python -m utils.evaluate.ood_set --output data/ood [--seed 0] [--per-kind N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("real", "ct", "mr", "ultrasound", "nuclear", "document", "photo", "screen_photo", "colour",
         "fluoroscopy", "mask")
SYNTHETIC_KINDS = KINDS[1:]
PER_KIND = 10  # synthetic images per kind (each written twice); with the real files about 450 files in all
MANIFEST = "manifest.csv"
REFUSED = "reader refuses: "  # how a note starts when the project's reader refuses the file
COLUMNS = ("path", "kind", "source", "modality", "retagged", "image_id", "group", "sop_class", "photometric",
           "rows", "columns", "frames", "bits_stored", "transfer_syntax", "detail", "note")
# Modalities of projection radiography (and its dental/mammography relatives): real files with these
# are not out of distribution for this purpose and are left out.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "MG", "IO", "PX"})
MAX_SIDE = 512  # synthetic images stay at most this many pixels per side

# SOP classes (PS3.4 B.5)
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
NM_IMAGE = "1.2.840.10008.5.1.4.1.1.20"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
XA_IMAGE = "1.2.840.10008.5.1.4.1.1.12.1"
RF_IMAGE = "1.2.840.10008.5.1.4.1.1.12.2"
LABEL_MAP_SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation Storage (2024 standard)
RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"

_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX
_WORDS = ("patient", "name", "date", "of", "birth", "clinical", "history", "request", "examination", "ward",
          "referring", "physician", "signature", "contrast", "allergy", "pregnant", "yes", "no", "priority",
          "routine", "urgent", "department", "radiology", "report", "findings", "impression", "consent",
          "left", "right", "follow", "up", "insurance", "number", "address", "phone", "room", "the", "and")


@dataclasses.dataclass
class _Image:
    """One synthetic image and how it is stored (both copies share everything but the tags)."""

    pixels: np.ndarray
    modality: str
    sop_class: str
    photometric: str = "MONOCHROME2"
    bits_stored: int | None = None
    rescale: tuple[float, float] | None = None
    window: tuple[float, float] | None = None
    syntax: str = "explicit"  # explicit, rle, j2k (lossless), jpeg (baseline, via OpenCV)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "synthetic"
    detail: str = ""


# --------------------------------------------------------------------------------------------
# small drawing helpers


def _cv2():
    import cv2

    return cv2


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return _cv2().GaussianBlur(img, (0, 0), sigma) if sigma > 0 else img


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: coarse random grid, upsampled smoothly."""
    cv2 = _cv2()
    h, w = shape
    gh, gw = max(2, int(h / scale)), max(2, int(w / scale))
    coarse = rng.normal(0, 1, (gh, gw)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _ellipse(img: np.ndarray, centre, axes, value, angle: float = 0.0, thickness: int = -1) -> None:
    _cv2().ellipse(img, (int(round(centre[0])), int(round(centre[1]))),
                   (max(1, int(round(axes[0]))), max(1, int(round(axes[1])))), float(angle), 0, 360,
                   value if isinstance(value, tuple) else float(value), thickness, lineType=16)


def _text(img: np.ndarray, text: str, org, scale: float, value, thickness: int = 1) -> None:
    """Anti-aliased text of ``value`` (a number or an RGB tuple) into a float image, in place
    (OpenCV draws text into 8-bit images only: it is drawn as a coverage mask, then blended)."""
    cover = np.zeros(img.shape[:2], np.uint8)
    _cv2().putText(cover, text, (int(org[0]), int(org[1])), _FONT, scale, 255, thickness, lineType=16)
    alpha = cover.astype(np.float32) / 255
    if img.ndim == 3:
        alpha = alpha[:, :, None]
    img[...] = img * (1 - alpha) + np.asarray(value, np.float32) * alpha


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(_WORDS, size=n))


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# --------------------------------------------------------------------------------------------
# the synthetic kinds: each ``_draw_<kind>(rng, index) -> _Image``


def _draw_ct(rng: np.random.Generator, index: int) -> _Image:
    cv2 = _cv2()
    n = int(_pick(rng, (256, 512)))
    region = ("head", "chest", "abdomen")[index % 3]
    hu = np.full((n, n), -1000.0, np.float32)
    c = n / 2 + rng.uniform(-0.03, 0.03, 2) * n
    if region == "head":
        ax = np.array([0.32, 0.38]) * n * rng.uniform(0.9, 1.1)
        _ellipse(hu, c, ax, -100)  # scalp fat
        _ellipse(hu, c, ax * 0.95, rng.uniform(900, 1400))  # skull
        _ellipse(hu, c, ax * 0.86, 35)  # brain
        _ellipse(hu, c, ax * [0.55, 0.6], 28)  # grey/white contrast
        for side in (-1, 1):  # ventricles
            _ellipse(hu, c + [side * 0.06 * n, -0.02 * n], [0.03 * n, 0.09 * n], 5, angle=side * 15)
    else:
        ax = np.array([0.42, 0.3]) * n * rng.uniform(0.85, 1.1, 2)
        _ellipse(hu, c, ax, -100)  # subcutaneous fat
        _ellipse(hu, c, ax * 0.9, 45)  # muscle / organs
        spine = c + [0, ax[1] * 0.6]
        _ellipse(hu, spine, [0.05 * n, 0.045 * n], rng.uniform(500, 900))  # vertebral body
        _ellipse(hu, spine, [0.035 * n, 0.03 * n], 250)
        if region == "chest":
            for side in (-1, 1):
                _ellipse(hu, c + [side * ax[0] * 0.45, -0.02 * n], ax * [0.38, 0.75], -850)
                for _ in range(25):  # vessels in the lung
                    p = c + [side * ax[0] * rng.uniform(0.2, 0.7), rng.uniform(-0.5, 0.5) * ax[1]]
                    _ellipse(hu, p, [rng.uniform(0.5, 2.5)] * 2, 40)
            _ellipse(hu, c + [0.05 * n, 0.02 * n], [0.1 * n, 0.09 * n], 40)  # heart
            _ellipse(hu, c + [-0.02 * n, -0.08 * n], [0.025 * n] * 2, rng.uniform(150, 300))  # aorta (contrast)
            for k in range(8):  # ribs on the rim
                a = math.pi * (0.15 + 0.7 * k / 7) * _pick(rng, (1, -1))
                _ellipse(hu, c + [ax[0] * 0.88 * math.cos(a), ax[1] * 0.88 * math.sin(a)], [0.012 * n] * 2, 800)
        else:
            _ellipse(hu, c + [-0.15 * n, -0.03 * n], [0.14 * n, 0.12 * n], rng.uniform(50, 70))  # liver
            _ellipse(hu, c + [0.17 * n, -0.05 * n], [0.05 * n, 0.06 * n], 45)  # spleen
            for side in (-1, 1):
                _ellipse(hu, spine + [side * 0.1 * n, -0.02 * n], [0.035 * n, 0.05 * n], rng.uniform(120, 200))
            for _ in range(int(rng.integers(3, 9))):  # bowel gas
                _ellipse(hu, c + rng.uniform(-0.12, 0.12, 2) * n, rng.uniform(0.01, 0.03, 2) * n, -950)
        y_table = int(c[1] + ax[1] + 0.04 * n)  # patient table
        cv2.ellipse(hu, (int(c[0]), y_table - int(0.4 * n)), (int(0.45 * n), int(0.4 * n)), 0, 30, 150, 200.0,
                    max(2, n // 100), lineType=16)
    hu = _blur(hu, 0.8 * n / 512) + rng.normal(0, rng.uniform(6, 25), hu.shape).astype(np.float32)
    stored = np.clip(hu + 1024, 0, 4095)
    yy, xx = np.mgrid[:n, :n]
    outside = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 > (n * rng.uniform(0.47, 0.5)) ** 2  # reconstruction FOV
    padding = _pick(rng, (0, -1000))  # outside the FOV: -1024 HU, or a padding value (-2024 HU)
    stored[outside] = padding
    windows = {"soft tissue": (40, 400), "lung": (-600, 1500), "bone": (400, 1800), "brain": (40, 80)}
    order = (["brain", "bone", "soft tissue"] if region == "head"
             else ["lung", "soft tissue", "bone"] if region == "chest" and rng.random() < 0.5
             else ["soft tissue", "lung", "bone"])
    syntax = ("explicit", "rle", "j2k")[index % 3]
    extra = {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "RescaleType": "HU", "KVP": 120,
             "SliceThickness": float(_pick(rng, (1.0, 2.5, 5.0))), "PixelSpacing": [0.7, 0.7],
             "ImagePositionPatient": [-180.0, -180.0, float(rng.uniform(-300, 100))],
             "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "ConversionType": None,
             "WindowCenter": [windows[k][0] for k in order], "WindowWidth": [windows[k][1] for k in order],
             "WindowCenterWidthExplanation": [k.upper() for k in order]}
    if padding:
        extra["PixelPaddingValue"] = padding
    # with a negative padding value: signed 16-bit; else unsigned 12-bit, as most scanners write it
    return _Image(stored.astype(np.int16 if padding else np.uint16), "CT", CT_IMAGE, bits_stored=16 if padding else 12,
                  rescale=(1.0, -1024.0), syntax=syntax, extra=extra,
                  detail=f"{region} {n}px windows {'/'.join(order)} pad {padding} {syntax}")


def _draw_mr(rng: np.random.Generator, index: int) -> _Image:
    rows, cols = _pick(rng, ((256, 256), (192, 256), (256, 192)))
    region = ("head", "body", "knee")[index % 3]
    weighting = _pick(rng, ("T1", "T2", "PD"))
    csf, wm, gm, fat = {"T1": (0.15, 0.75, 0.55, 0.95), "T2": (0.95, 0.35, 0.5, 0.6),
                        "PD": (0.7, 0.6, 0.7, 0.85)}[weighting]
    img = np.zeros((rows, cols), np.float32)
    c = np.array([cols / 2, rows / 2]) + rng.uniform(-0.04, 0.04, 2) * [cols, rows]
    s = min(rows, cols)
    if region == "head":
        ax = np.array([0.36, 0.44]) * s * rng.uniform(0.9, 1.05)
        _ellipse(img, c, ax, fat)  # scalp
        _ellipse(img, c, ax * 0.93, 0.05)  # skull: no signal
        _ellipse(img, c, ax * 0.88, csf)
        _ellipse(img, c, ax * 0.84, gm)
        _ellipse(img, c, ax * [0.62, 0.66], wm)
        for side in (-1, 1):
            _ellipse(img, c + [side * 0.05 * s, 0], [0.03 * s, 0.1 * s], csf, angle=side * 12)
    elif region == "body":
        ax = np.array([0.45, 0.32]) * s * rng.uniform(0.9, 1.05, 2)
        _ellipse(img, c, ax, fat)
        _ellipse(img, c, ax * 0.88, gm * 0.8)
        _ellipse(img, c + [-0.14 * s, -0.02 * s], [0.16 * s, 0.13 * s], wm * 0.7)  # liver
        _ellipse(img, c + [0, 0.2 * s], [0.05 * s, 0.045 * s], 0.3)  # vertebra
        for side in (-1, 1):
            _ellipse(img, c + [side * 0.12 * s, 0.1 * s], [0.035 * s, 0.05 * s], csf * 0.8)
    else:
        ax = np.array([0.3, 0.45]) * s
        _ellipse(img, c, ax, fat)
        _ellipse(img, c, ax * 0.85, gm * 0.7)
        for dy in (-1, 1):  # femur and tibia: marrow fat in a dark cortex
            _ellipse(img, c + [0, dy * 0.22 * s], [0.17 * s, 0.2 * s], 0.05)
            _ellipse(img, c + [0, dy * 0.22 * s], [0.15 * s, 0.18 * s], fat * 0.9)
        img[int(c[1] - 0.015 * s):int(c[1] + 0.015 * s)] *= 0.3  # joint space
    img = _blur(img, 1.2)
    yy, xx = np.mgrid[:rows, :cols].astype(np.float32)
    u, v = (xx / cols - 0.5), (yy / rows - 0.5)
    a = rng.uniform(-0.5, 0.5, 4)
    bias = 1 + a[0] * u + a[1] * v + a[2] * u * v + a[3] * (u * u + v * v)  # coil sensitivity
    signal = img * np.clip(bias, 0.5, 1.6)
    sigma = rng.uniform(0.01, 0.05)
    noisy = np.sqrt((signal + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2)  # Rician
    top = int(_pick(rng, (600, 1200, 2500, 4000)))
    bits = 12 if top < 4096 else 16
    stored = np.clip(noisy / noisy.max() * top, 0, top).astype(np.uint16)
    syntax = ("explicit", "j2k", "rle")[index % 3]
    extra = {"ImageType": ["ORIGINAL", "PRIMARY", "M", "NONE"], "ConversionType": None,
             "MagneticFieldStrength": float(_pick(rng, (1.5, 3.0))), "ScanningSequence": "SE",
             "SequenceVariant": "NONE", "EchoTime": 15.0 if weighting == "T1" else 95.0,
             "RepetitionTime": 500.0 if weighting == "T1" else 4000.0, "PixelSpacing": [0.9, 0.9]}
    window = (top * 0.45, top * 0.9) if rng.random() < 0.5 else None
    return _Image(stored, "MR", MR_IMAGE, bits_stored=bits, window=window, syntax=syntax, extra=extra,
                  detail=f"{region} {weighting} {rows}x{cols} max {top} {syntax}")


def _draw_ultrasound(rng: np.random.Generator, index: int) -> _Image:
    cv2 = _cv2()
    rows, cols = int(rng.integers(300, 481)), int(rng.integers(400, 513))
    apex = (cols / 2 + rng.uniform(-20, 20), rng.uniform(20, 45))
    half = math.radians(rng.uniform(28, 45))
    r0, r1 = rng.uniform(5, 30), rows - apex[1] - rng.uniform(10, 30)
    yy, xx = np.mgrid[:rows, :cols].astype(np.float32)
    dx, dy = xx - apex[0], yy - apex[1]
    r, theta = np.hypot(dx, dy), np.arctan2(dx, dy)
    sector = (r >= r0) & (r <= r1) & (np.abs(theta) <= half)
    # tissue: layered echogenicity, an anechoic cyst, bright specular lines, attenuation with depth
    depth = (r - r0) / (r1 - r0)
    tissue = 0.45 + 0.25 * np.sin(depth * rng.uniform(6, 14) + theta * rng.uniform(-3, 3))
    tissue += 0.3 * _smooth_noise(rng, (rows, cols), 40)
    for _ in range(int(rng.integers(1, 3))):
        centre = (apex[0] + rng.uniform(-0.3, 0.3) * r1, apex[1] + rng.uniform(0.3, 0.8) * r1)
        cyst = np.zeros((rows, cols), np.float32)
        _ellipse(cyst, centre, rng.uniform(15, 50, 2), 1.0, angle=rng.uniform(0, 180))
        tissue = tissue * (1 - 0.9 * cyst)
    tissue *= np.exp(-depth * rng.uniform(0.3, 1.5))
    speckle = np.hypot(rng.normal(0, 1, (rows, cols)), rng.normal(0, 1, (rows, cols))).astype(np.float32)
    speckle = cv2.GaussianBlur(speckle, (0, 0), sigmaX=rng.uniform(1.0, 2.5), sigmaY=0.7)
    img = np.clip(tissue, 0, None) * speckle / speckle.mean() * 110
    for _ in range(int(rng.integers(1, 4))):  # specular reflectors
        y = int(apex[1] + rng.uniform(0.2, 0.9) * r1)
        cv2.line(img, (int(apex[0] - r1 * 0.5), y), (int(apex[0] + r1 * 0.5), y + int(rng.integers(-15, 15))),
                 float(rng.uniform(180, 255)), int(rng.integers(1, 4)), lineType=16)
    img = np.where(sector, np.clip(img, 0, 255), 0).astype(np.float32)
    # annotations: text, depth scale, grey bar
    labels = [f"{_pick(rng, ('ABD', 'OB', 'THY', 'CARD', 'VASC'))} {rng.uniform(2, 12):.1f}MHz",
              f"MI {rng.uniform(0.2, 1.4):.1f}  TIS {rng.uniform(0.1, 1.0):.1f}",
              f"G {int(rng.integers(30, 80))}  DR 60",
              "SYNTHETIC", f"{int(rng.integers(1, 29)):02d}/{int(rng.integers(1, 13)):02d}/2024"]
    for k, line in enumerate(labels):
        _text(img, line, (6, 16 + 15 * k), 0.4, 230)
    for k in range(6):
        y = int(apex[1] + r0 + k * (r1 - r0) / 5)
        cv2.line(img, (cols - 14, y), (cols - 6, y), 220.0, 1)
        _text(img, str(k * 2), (cols - 30, y + 4), 0.3, 200)
    bar = np.linspace(255, 0, max(2, rows // 3))
    img[rows // 3:rows // 3 + bar.size, 4:10] = bar[:, None]
    doppler = index % 3 == 2
    colour = doppler or index % 3 == 1
    if not colour:
        syntax = ("explicit", "rle", "jpeg")[(index // 3) % 3]
        return _Image(_to_u8(img), "US", US_IMAGE, syntax=syntax, extra={"ConversionType": None},
                      detail=f"grey {rows}x{cols} {syntax}")
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    rgb[:, :, 2] *= rng.uniform(0.9, 1.0)  # a slight tint, as many US machines store grey in RGB
    if doppler:  # a colour box with a vessel: red towards, blue away from the probe
        box = sector & (np.abs(theta) < half * 0.5) & (depth > 0.2) & (depth < 0.6)
        vessel = np.zeros((rows, cols), np.float32)
        y0 = apex[1] + r0 + rng.uniform(0.3, 0.5) * (r1 - r0)
        cv2.line(vessel, (0, int(y0)), (cols, int(y0 + rng.uniform(-60, 60))), 1.0, int(rng.integers(8, 20)))
        vessel = _blur(vessel, 2) * box * (0.6 + 0.4 * _smooth_noise(rng, (rows, cols), 8))
        towards = rng.random() < 0.5
        flow = np.clip(vessel, 0, 1)[:, :, None] * (np.array([255, 40, 0]) if towards else np.array([0, 60, 255]))
        rgb = np.where(vessel[:, :, None] > 0.15, flow, rgb)
        edge = (box.astype(np.uint8) - cv2.erode(box.astype(np.uint8), np.ones((3, 3), np.uint8))) > 0
        rgb[edge] = 200
        cbar = np.linspace(0, 1, rows // 4)[:, None]
        scale = np.concatenate([cbar * 255, cbar * 0, (1 - cbar) * 255], axis=1)  # red (top) to blue
        rgb[20:20 + cbar.size, cols - 45:cols - 38] = scale[:, None]
    syntax = _pick(rng, ("explicit", "jpeg", "rle"))
    return _Image(_to_u8(rgb), "US", US_IMAGE, photometric="RGB", syntax=syntax, extra={"ConversionType": None},
                  detail=f"{'doppler' if doppler else 'rgb grey'} {rows}x{cols} {syntax}")


def _blobs(rng: np.random.Generator, shape, n: int, size: tuple[float, float]) -> np.ndarray:
    img = np.zeros(shape, np.float32)
    for _ in range(n):
        _ellipse(img, (rng.uniform(0.2, 0.8) * shape[1], rng.uniform(0.2, 0.8) * shape[0]),
                 rng.uniform(*size, 2) * min(shape), rng.uniform(0.3, 1.0), angle=rng.uniform(0, 180))
    return img


def _draw_nuclear(rng: np.random.Generator, index: int) -> _Image:
    whole_body = index % 2 == 1
    if whole_body:  # anterior and posterior views side by side
        rows, width = int(_pick(rng, (256, 512))), 128
        panels = []
        body = np.zeros((rows, width), np.float32)
        cx = width / 2
        _ellipse(body, (cx, rows * 0.08), (width * 0.13, rows * 0.065), 0.8)  # skull
        for y in np.linspace(0.16, 0.55, 14):  # spine
            _ellipse(body, (cx, rows * y), (width * 0.04, rows * 0.01), 0.7)
        for side in (-1, 1):
            _ellipse(body, (cx + side * width * 0.17, rows * 0.3), (width * 0.14, rows * 0.1), 0.25)  # ribs/lungs
            hip = (int(cx + side * width * 0.12), int(rows * 0.58))
            foot = (int(cx + side * width * 0.14), int(rows * 0.97))
            _cv2().line(body, hip, foot, 0.6, max(2, width // 20))  # legs
            _cv2().line(body, (int(cx + side * width * 0.2), int(rows * 0.2)),
                        (int(cx + side * width * 0.4), int(rows * 0.5)), 0.5, max(2, width // 25))  # arms
            _ellipse(body, (cx + side * width * 0.08, rows * 0.4), (width * 0.05, rows * 0.03), 0.9)  # kidneys
        _ellipse(body, (cx, rows * 0.56), (width * 0.2, rows * 0.05), 0.7)  # pelvis
        _ellipse(body, (cx, rows * 0.6), (width * 0.06, rows * 0.03), rng.uniform(1.5, 4))  # bladder
        for _ in range(int(rng.integers(0, 6))):  # hot spots
            _ellipse(body, (cx + rng.uniform(-0.3, 0.3) * width, rng.uniform(0.1, 0.9) * rows), (2, 2), 3.0)
        body = _blur(body, 1.5)
        for view in range(2):
            panel = body[:, ::-1] if view else body
            panels.append(panel * (rng.uniform(0.7, 1.0) if view else 1.0))
        expected = np.concatenate(panels, axis=1)
        counts = rng.uniform(15, 60)
    else:
        n = int(_pick(rng, (64, 128)))
        expected = _blur(_blobs(rng, (n, n), int(rng.integers(2, 6)), (0.05, 0.2)), n / 32)
        expected += 0.05 * _blur(np.ones((n, n), np.float32), 1)  # background activity
        counts = rng.uniform(5, 40)
    image = rng.poisson(expected / expected.max() * counts).astype(np.uint16)
    monochrome1 = rng.random() < 0.4  # many viewers show NM black on white
    rows, cols = image.shape
    extra = {"ImageType": ["ORIGINAL", "PRIMARY", "WHOLE BODY" if whole_body else "STATIC", "EMISSION"],
             "ConversionType": None, "NumberOfFrames": 1, "FrameIncrementPointer": 0x00540010,
             "EnergyWindowVector": [1], "DetectorVector": [1]}
    return _Image(image, "NM", NM_IMAGE, photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2",
                  bits_stored=16, syntax=_pick(rng, ("explicit", "rle")), extra=extra,
                  detail=f"{'whole body ant/post' if whole_body else 'static'} {rows}x{cols} max {int(image.max())}")


def _draw_document(rng: np.random.Generator, index: int) -> _Image:
    cv2 = _cv2()
    rows, cols = (512, 362) if rng.random() < 0.75 else (362, 512)
    paper = _colour(rng, 225, 256) if index % 2 else (int(rng.integers(215, 256)),) * 3
    page = np.empty((rows, cols, 3), np.float32)
    page[:] = paper
    ink = (int(rng.integers(0, 60)),) * 3
    pen = (30, 40, int(rng.integers(120, 200))) if index % 2 else ink  # blue ballpoint (RGB) on colour scans
    # logo and heading
    lx, ly = int(rng.integers(12, 40)), int(rng.integers(14, 30))
    logo_colour = _colour(rng, 0, 200) if index % 2 else ink
    cv2.circle(page, (lx + 12, ly + 12), 12, logo_colour, -1, lineType=16)
    cv2.rectangle(page, (lx + 9, ly + 3), (lx + 15, ly + 21), paper, -1)
    cv2.rectangle(page, (lx + 3, ly + 9), (lx + 21, ly + 15), paper, -1)
    _text(page, _pick(rng, ("RADIOLOGY REQUEST", "IMAGING REFERRAL", "CONSENT FORM", "REPORT")),
          (lx + 34, ly + 18), 0.55, ink, 2)
    y = ly + 50
    while y < rows - 30:  # blocks of text lines, a table, check boxes
        block = rng.random()
        if block < 0.45:
            for _ in range(int(rng.integers(2, 6))):
                if y >= rows - 30:
                    break
                _text(page, _words(rng, int(rng.integers(3, 8))), (lx, y), 0.35, ink)
                y += 14
        elif block < 0.7:
            n_rows, n_cols = int(rng.integers(2, 6)), int(rng.integers(2, 5))
            x0, x1 = lx, cols - lx
            for r in range(n_rows + 1):
                cv2.line(page, (x0, y + r * 16), (x1, y + r * 16), ink, 1)
            for k in range(n_cols + 1):
                x = int(x0 + k * (x1 - x0) / n_cols)
                cv2.line(page, (x, y), (x, y + n_rows * 16), ink, 1)
            for r in range(n_rows):
                for k in range(n_cols):
                    _text(page, _words(rng, 1), (x0 + 3 + k * (x1 - x0) / n_cols, y + r * 16 + 12), 0.3, ink)
            y += n_rows * 16 + 12
        else:
            for k in range(int(rng.integers(2, 5))):
                x = lx + k * 80
                cv2.rectangle(page, (x, y - 9), (x + 9, y), ink, 1)
                if rng.random() < 0.5:
                    cv2.line(page, (x + 1, y - 5), (x + 4, y - 1), pen, 2)
                    cv2.line(page, (x + 4, y - 1), (x + 10, y - 11), pen, 2)
                _text(page, _words(rng, 1), (x + 13, y), 0.33, ink)
            y += 20
    sig = np.cumsum(rng.normal(0, 3, (40, 2)), axis=0) + [cols * 0.6, rows - 30]
    sig[:, 0] = np.linspace(cols * 0.55, cols * 0.85, 40)
    cv2.polylines(page, [sig.astype(np.int32)], False, pen, 1, lineType=16)
    if index % 2 and rng.random() < 0.6:  # a red stamp
        cv2.circle(page, (int(cols * 0.75), int(rows * 0.8)), 28, (200, 30, 40), 2, lineType=16)
        _text(page, "RECEIVED", (int(cols * 0.75) - 26, int(rows * 0.8) + 4), 0.3, (200, 30, 40))
    # the scan: slight rotation on a darker scanner bed, blur, noise, specks
    angle = rng.uniform(-3, 3)
    m = cv2.getRotationMatrix2D((cols / 2, rows / 2), angle, rng.uniform(0.94, 1.0))
    bed = float(rng.integers(20, 90))
    page = cv2.warpAffine(page, m, (cols, rows), borderMode=cv2.BORDER_CONSTANT, borderValue=(bed, bed, bed))
    page = _blur(page, rng.uniform(0.3, 0.9)) + rng.normal(0, rng.uniform(2, 8), page.shape).astype(np.float32)
    specks = rng.random((rows, cols)) < 0.0008
    page[specks] = 30
    page = page * rng.uniform(0.8, 1.0) + rng.uniform(0, 25)  # exposure of the scanner
    if index % 2 == 0:
        grey = _to_u8(page.mean(axis=2))
        syntax = _pick(rng, ("explicit", "rle", "jpeg"))
        return _Image(grey, "OT", SECONDARY_CAPTURE, syntax=syntax, extra={"ConversionType": "DF"},
                      detail=f"scanned form grey {rows}x{cols} {syntax}")
    syntax = _pick(rng, ("explicit", "jpeg"))
    return _Image(_to_u8(page), "OT", SECONDARY_CAPTURE, photometric="RGB", syntax=syntax,
                  extra={"ConversionType": "DF"}, detail=f"scanned form colour {rows}x{cols} {syntax}")


_SAMPLE_PHOTOS: list[tuple[str, np.ndarray]] = []


def _sample_photos() -> list[tuple[str, np.ndarray]]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg: shipped with it, no download)."""
    if not _SAMPLE_PHOTOS:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
        _SAMPLE_PHOTOS.extend((Path(name).name, np.asarray(image, np.uint8))
                              for name, image in zip(bunch.filenames, bunch.images))
    return _SAMPLE_PHOTOS


def _scene(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A procedural outdoor/indoor-ish RGB scene: gradient sky, hills, sun, trees, houses, texture."""
    cv2 = _cv2()
    t = np.linspace(0, 1, rows, dtype=np.float32)[:, None, None]
    top, bottom = np.array(_colour(rng, 60, 256), np.float32), np.array(_colour(rng, 120, 256), np.float32)
    img = np.broadcast_to(top * (1 - t) + bottom * t, (rows, cols, 3)).copy()
    if rng.random() < 0.6:
        cv2.circle(img, (int(rng.uniform(0.1, 0.9) * cols), int(rng.uniform(0.05, 0.3) * rows)),
                   int(rng.uniform(0.04, 0.1) * min(rows, cols)), _colour(rng, 200, 256), -1, lineType=16)
    horizon = rng.uniform(0.4, 0.7) * rows
    for layer in range(int(rng.integers(1, 4))):
        xs = np.linspace(0, cols, 12)
        ys = horizon + layer * 0.08 * rows + rng.normal(0, 0.06 * rows, 12)
        poly = np.array([[0, rows]] + [[x, y] for x, y in zip(xs, ys)] + [[cols, rows]], np.int32)
        cv2.fillPoly(img, [poly], _colour(rng, 20, 180), lineType=16)
    for _ in range(int(rng.integers(0, 8))):  # trees
        x, y, h = rng.uniform(0, cols), rng.uniform(horizon, rows), rng.uniform(0.05, 0.2) * rows
        pts = np.array([[x, y - h], [x - h / 3, y], [x + h / 3, y]], np.int32)
        cv2.fillPoly(img, [pts], (int(rng.integers(10, 80)), int(rng.integers(80, 160)), int(rng.integers(10, 80))))
    for _ in range(int(rng.integers(0, 4))):  # houses
        x, y, s = rng.uniform(0, cols), rng.uniform(horizon, rows), rng.uniform(0.05, 0.15) * rows
        cv2.rectangle(img, (int(x), int(y - s)), (int(x + s), int(y)), _colour(rng), -1)
        cv2.fillPoly(img, [np.array([[x - s * 0.1, y - s], [x + s / 2, y - 1.6 * s], [x + 1.1 * s, y - s]], np.int32)],
                     _colour(rng, 0, 160))
    img += 12 * _smooth_noise(rng, (rows, cols), rng.uniform(6, 40))[:, :, None]  # texture
    return np.clip(_blur(img, rng.uniform(0.4, 1.2)) + rng.normal(0, 3, img.shape), 0, 255).astype(np.float32)


def _draw_photo(rng: np.random.Generator, index: int) -> _Image:
    cv2 = _cv2()
    if index % 3 == 2:
        rows, cols = int(rng.integers(200, 481)), int(rng.integers(200, 513))
        rgb, source = _scene(rng, rows, cols), "procedural scene"
    else:
        name, photo = _sample_photos()[index % 2]
        h, w = photo.shape[:2]
        ch, cw = int(rng.integers(h // 3, h + 1)), int(rng.integers(w // 3, w + 1))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = photo[y0:y0 + ch, x0:x0 + cw].astype(np.float32)
        scale = min(1.0, MAX_SIDE / max(ch, cw)) * rng.uniform(0.35, 1.0)
        size = (max(32, int(cw * scale)), max(32, int(ch * scale)))
        rgb, source = cv2.resize(crop, size, interpolation=cv2.INTER_AREA), f"sklearn:{name}"
    rows, cols = rgb.shape[:2]
    if rng.random() < 0.35:  # a grey photograph stored as secondary capture
        grey = _to_u8(rgb @ np.array([0.299, 0.587, 0.114], np.float32))
        syntax = _pick(rng, ("explicit", "jpeg", "rle"))
        return _Image(grey, "OT", SECONDARY_CAPTURE, syntax=syntax, source=source, extra={"ConversionType": "DI"},
                      detail=f"grey {rows}x{cols} {syntax}")
    syntax = _pick(rng, ("jpeg", "jpeg", "explicit"))
    return _Image(_to_u8(rgb), "XC", VL_PHOTOGRAPHIC, photometric="RGB", syntax=syntax, source=source,
                  extra={"ConversionType": None}, detail=f"colour {rows}x{cols} {syntax}")


def _draw_screen_photo(rng: np.random.Generator, index: int) -> _Image:
    """A grey image shown on a monitor and photographed: viewer UI, bezel, perspective, moire, glare, cast."""
    cv2 = _cv2()
    if index % 3 != 2:
        from utils.data.demo import DEMO_CLASSES, draw

        label = DEMO_CLASSES[index % len(DEMO_CLASSES)]
        content, source = draw(label, rng) * 255, f"demo:{label}"
    else:
        content = _scene(rng, 240, 320) @ np.array([0.299, 0.587, 0.114], np.float32)
        source = "procedural scene"
    sh, sw = 300, 400  # the screen: dark viewer UI around the image
    screen = np.full((sh, sw), float(rng.integers(10, 40)), np.float32)
    scale = min((sh - 40) / content.shape[0], (sw - 90) / content.shape[1])
    ch, cw = int(content.shape[0] * scale), int(content.shape[1] * scale)
    y0, x0 = 25 + (sh - 40 - ch) // 2, 80 + (sw - 90 - cw) // 2
    screen[y0:y0 + ch, x0:x0 + cw] = cv2.resize(content.astype(np.float32), (cw, ch), interpolation=cv2.INTER_AREA)
    cv2.rectangle(screen, (0, 0), (sw, 18), 70.0, -1)  # title bar
    _text(screen, "SYNTHETIC VIEWER", (6, 13), 0.35, 220)
    for k in range(5):  # thumbnails
        cv2.rectangle(screen, (8, 28 + k * 52), (68, 72 + k * 52), float(rng.integers(60, 160)), -1)
    for k in range(4):
        _text(screen, _words(rng, 2).upper(), (x0 + 4, y0 + 12 + 12 * k), 0.3, 200)
    screen_rgb = np.repeat(screen[:, :, None], 3, axis=2)
    yy, xx = np.mgrid[:sh, :sw].astype(np.float32)
    period = rng.uniform(2.2, 4.5)  # moire between the sensor and the pixel grid
    ang = rng.uniform(0, math.pi)
    moire = 1 + rng.uniform(0.05, 0.2) * np.sin(2 * math.pi * (xx * math.cos(ang) + yy * math.sin(ang)) / period)
    scan = 1 - rng.uniform(0.0, 0.12) * (np.arange(sh) % 3 == 0)[:, None]
    screen_rgb *= (moire * scan)[:, :, None]
    bezel = int(rng.integers(8, 24))
    monitor = np.full((sh + 2 * bezel, sw + 2 * bezel, 3), float(rng.integers(10, 60)), np.float32)
    monitor[bezel:bezel + sh, bezel:bezel + sw] = screen_rgb
    rows, cols = (int(rng.integers(300, 481)), int(rng.integers(360, 513)))
    mh, mw = monitor.shape[:2]
    room = _scene(rng, rows, cols) * 0.6 if rng.random() < 0.5 else np.full((rows, cols, 3), _colour(rng, 40, 200),
                                                                             np.float32)
    corners = np.float32([[0, 0], [mw, 0], [mw, mh], [0, mh]])
    cx, cy, half_w, half_h = cols / 2, rows / 2, cols * rng.uniform(0.32, 0.48), rows * rng.uniform(0.3, 0.46)
    jitter = rng.uniform(-0.08, 0.08, (4, 2)) * [cols, rows]
    target = np.float32([[cx - half_w, cy - half_h], [cx + half_w, cy - half_h], [cx + half_w, cy + half_h],
                         [cx - half_w, cy + half_h]]) + jitter.astype(np.float32)
    warp = cv2.getPerspectiveTransform(corners, target)
    photo = cv2.warpPerspective(monitor, warp, (cols, rows), flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.ones((mh, mw), np.float32), warp, (cols, rows))
    photo = photo * mask[:, :, None] + room * (1 - mask[:, :, None])
    gy, gx = np.mgrid[:rows, :cols].astype(np.float32)
    g = (rng.uniform(0, cols), rng.uniform(0, rows), rng.uniform(0.2, 0.6) * cols)
    glare = np.exp(-((gx - g[0]) ** 2 + (gy - g[1]) ** 2) / (2 * g[2] ** 2)) * rng.uniform(20, 90)
    cast = rng.uniform(0.8, 1.15, 3).astype(np.float32)
    photo = (photo + glare[:, :, None]) * cast
    photo = _blur(photo, rng.uniform(0.5, 1.5)) + rng.normal(0, rng.uniform(2, 7), photo.shape)
    syntax = _pick(rng, ("jpeg", "jpeg", "explicit"))
    return _Image(_to_u8(photo), "XC", VL_PHOTOGRAPHIC, photometric="RGB", syntax=syntax, source=source,
                  extra={"ConversionType": None}, detail=f"screen photo {rows}x{cols} {syntax}")


def _draw_colour(rng: np.random.Generator, index: int) -> _Image:
    cv2 = _cv2()
    style = ("ui", "pie", "random")[index % 3]
    rows, cols = int(rng.integers(240, 481)), int(rng.integers(320, 513))
    img = np.empty((rows, cols, 3), np.float32)
    if style == "ui":
        img[:] = _colour(rng, 200, 256)
        accent = _colour(rng, 0, 220)
        cv2.rectangle(img, (0, 0), (cols, 26), accent, -1)
        _text(img, _words(rng, 3).title(), (8, 18), 0.45, (255, 255, 255))
        side = int(rng.integers(80, 140))
        cv2.rectangle(img, (0, 26), (side, rows), _colour(rng, 150, 230), -1)
        for k in range(int((rows - 40) / 28)):
            cv2.rectangle(img, (8, 36 + 28 * k), (side - 8, 56 + 28 * k), _colour(rng, 100, 256), -1)
            _text(img, _words(rng, 1), (14, 51 + 28 * k), 0.35, (20, 20, 20))
        y = 44
        while y < rows - 20:
            if rng.random() < 0.3:
                cv2.rectangle(img, (side + 12, y), (side + 90, y + 22), accent, -1)
                _text(img, "OK", (side + 40, y + 16), 0.4, (255, 255, 255))
                y += 34
            else:
                _text(img, _words(rng, int(rng.integers(2, 7))), (side + 12, y + 12), 0.4, (30, 30, 30))
                y += 20
    elif style == "pie":
        img[:] = _colour(rng, 210, 256)
        centre, radius = (int(cols * 0.35), int(rows * 0.55)), int(min(rows, cols) * rng.uniform(0.25, 0.38))
        shares = rng.dirichlet(np.ones(int(rng.integers(3, 8)))) * 360
        start = rng.uniform(0, 360)
        for k, share in enumerate(shares):
            colour = _colour(rng, 30, 256)
            cv2.ellipse(img, centre, (radius, radius), 0, start, start + share, colour, -1, lineType=16)
            cv2.rectangle(img, (int(cols * 0.72), 40 + 22 * k), (int(cols * 0.72) + 14, 54 + 22 * k), colour, -1)
            _text(img, f"{_words(rng, 1)} {share / 3.6:.0f}%", (int(cols * 0.72) + 20, 52 + 22 * k), 0.35, (20, 20, 20))
            start += share
        _text(img, _words(rng, 3).title(), (10, 24), 0.6, (20, 20, 20), 2)
    else:
        plasma = np.stack([_smooth_noise(rng, (rows, cols), rng.uniform(8, 60)) for _ in range(3)], axis=2)
        img[:] = 128 + 90 * plasma
        for _ in range(int(rng.integers(5, 30))):
            colour = _colour(rng)
            p = (int(rng.integers(0, cols)), int(rng.integers(0, rows)))
            shape = rng.random()
            if shape < 0.4:
                cv2.circle(img, p, int(rng.integers(5, 60)), colour, -1, lineType=16)
            elif shape < 0.7:
                corner = (p[0] + int(rng.integers(10, 120)), p[1] + int(rng.integers(10, 120)))
                cv2.rectangle(img, p, corner, colour, -1)
            else:
                cv2.line(img, p, (int(rng.integers(0, cols)), int(rng.integers(0, rows))), colour,
                         int(rng.integers(1, 8)), lineType=16)
    syntax = _pick(rng, ("explicit", "rle", "jpeg"))
    return _Image(_to_u8(img), "OT", SECONDARY_CAPTURE, photometric="RGB", syntax=syntax,
                  extra={"ConversionType": "WSD"}, detail=f"{style} {rows}x{cols} {syntax}")


def _vessels(rng: np.random.Generator, shape, start, direction: float, width: float, depth: int,
             canvas: np.ndarray) -> None:
    """A branching random-walk vessel tree drawn into ``canvas`` (1 = opacified vessel)."""
    cv2 = _cv2()
    x, y = start
    steps = int(rng.integers(15, 40))
    for _ in range(steps):
        direction += rng.normal(0, 0.25)
        nx, ny = x + 6 * math.cos(direction), y + 6 * math.sin(direction)
        cv2.line(canvas, (int(x), int(y)), (int(nx), int(ny)), 1.0, max(1, int(round(width))), lineType=16)
        x, y = nx, ny
        if depth < 3 and rng.random() < 0.08:
            _vessels(rng, shape, (x, y), direction + rng.choice([-1, 1]) * rng.uniform(0.4, 0.9), width * 0.7,
                     depth + 1, canvas)
        width = max(1.0, width * 0.985)
        if not (0 <= x < shape[1] and 0 <= y < shape[0]):
            break


def _draw_fluoroscopy(rng: np.random.Generator, index: int) -> _Image:
    cv2 = _cv2()
    n = int(_pick(rng, (256, 384, 512)))
    frames = int(_pick(rng, (3, 4))) if index % 3 == 0 else 1
    if frames > 1:
        n = min(n, 384)  # keep multi-frame files small
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    background = 0.65 + 0.12 * _smooth_noise(rng, (n, n), n / 4)
    for _ in range(int(rng.integers(0, 4))):  # faint bones
        bone = np.zeros((n, n), np.float32)
        cv2.line(bone, (int(rng.integers(0, n)), 0), (int(rng.integers(0, n)), n), 1.0, int(rng.integers(10, 40)))
        background -= 0.12 * _blur(bone, 4)
    tree = np.zeros((n, n), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        _vessels(rng, (n, n), (rng.uniform(0.2, 0.8) * n, rng.uniform(0.05, 0.3) * n), rng.uniform(0.8, 2.3),
                 rng.uniform(3, 8), 0, tree)
    tree = _blur(tree, 1.0)
    catheter = np.zeros((n, n), np.float32)
    pts = np.cumsum(rng.normal(0, 3, (30, 2)), axis=0) + [n * 0.5, n]
    pts[:, 1] = np.linspace(n, n * rng.uniform(0.3, 0.6), 30)
    cv2.polylines(catheter, [pts.astype(np.int32)], False, 1.0, 2, lineType=16)
    radius = n * rng.uniform(0.44, 0.5)
    fov = ((xx - n / 2) ** 2 + (yy - n / 2) ** 2 <= radius ** 2).astype(np.float32)
    if rng.random() < 0.4:  # collimator shutters
        fov[:, : int(rng.uniform(0.05, 0.2) * n)] = 0
        fov[:, n - int(rng.uniform(0.05, 0.2) * n):] = 0
    vignette = 1 - 0.35 * ((xx - n / 2) ** 2 + (yy - n / 2) ** 2) / radius ** 2
    top = 255 if rng.random() < 0.6 else 1023
    stack = []
    for f in range(frames):
        contrast = (f + 1) / frames * rng.uniform(0.4, 0.7)  # contrast agent arriving
        image = (background - contrast * tree - 0.4 * catheter) * vignette
        photons = rng.uniform(30, 150)  # low dose: few quanta per pixel
        image = rng.poisson(np.clip(image, 0.01, None) * photons) / photons
        image = _blur(image.astype(np.float32), 0.7) * fov
        frame = np.clip(image * top, 0, top)
        _text(frame, "SYNTHETIC", (8, 18), 0.45, top)
        _text(frame, f"F {f + 1}/{frames}", (n - 70, n - 10), 0.4, top)
        stack.append(frame)
    pixels = np.stack(stack) if frames > 1 else stack[0]
    pixels = pixels.astype(np.uint8 if top == 255 else np.uint16)
    xa = index % 2 == 0
    extra = {"ImageType": ["ORIGINAL", "PRIMARY", "SINGLE PLANE"], "ConversionType": None, "KVP": 75,
             "PositionerPrimaryAngle": float(rng.uniform(-40, 40)),
             "PositionerSecondaryAngle": float(rng.uniform(-20, 20))}
    if frames > 1:
        extra.update({"FrameIncrementPointer": 0x00181063, "FrameTime": 66.7})
    syntax = ("explicit", "rle", "j2k")[index % 3] if min(pixels.shape[-2:]) >= 32 else "explicit"
    return _Image(pixels, "XA" if xa else "RF", XA_IMAGE if xa else RF_IMAGE,
                  bits_stored=8 if top == 255 else 10, syntax=syntax, extra=extra,
                  detail=f"{'XA' if xa else 'RF'} {n}px {frames} frame(s) {syntax}")


def _draw_mask(rng: np.random.Generator, index: int) -> _Image:
    style = ("labelmap", "binary", "dose")[index % 3]
    if style == "dose":  # an RT dose grid: overlapping beams, coarse, 16-bit with Dose Grid Scaling
        n = int(_pick(rng, (64, 96, 128)))
        yy, xx = np.mgrid[:n, :n].astype(np.float32)
        c = n / 2 + rng.uniform(-0.1, 0.1, 2) * n
        dose = np.zeros((n, n), np.float32)
        for angle in rng.uniform(0, math.pi, int(rng.integers(2, 7))):
            dist = np.abs((xx - c[0]) * math.sin(angle) - (yy - c[1]) * math.cos(angle))
            dose += 1 / (1 + np.exp((dist - n * rng.uniform(0.06, 0.15)) / 1.5))
        body = np.zeros((n, n), np.float32)
        _ellipse(body, (n / 2, n / 2), (n * 0.45, n * 0.35), 1.0)
        dose = _blur(dose * body, 1.0)
        stored = np.rint(dose / dose.max() * rng.uniform(20000, 60000)).astype(np.uint16)
        extra = {"DoseUnits": "GY", "DoseType": "PHYSICAL", "DoseSummationType": "PLAN",
                 "DoseGridScaling": float(rng.uniform(5e-5, 1e-3)), "ConversionType": None, "ImageType": None}
        return _Image(stored, "RTDOSE", RT_DOSE, bits_stored=16, syntax=_pick(rng, ("explicit", "rle")), extra=extra,
                      detail=f"dose grid {n}x{n}")
    n = int(_pick(rng, (128, 256, 512)))
    labels = np.zeros((n, n), np.uint8)
    k = int(rng.integers(1, 2 if style == "binary" else 7))
    body = rng.uniform(0.3, 0.45, 2) * n
    _ellipse(labels, (n / 2, n / 2), body, 1)
    for label in range(2, k + 2):
        _ellipse(labels, (n / 2 + rng.uniform(-0.2, 0.2) * n, n / 2 + rng.uniform(-0.2, 0.2) * n),
                 rng.uniform(0.04, 0.15, 2) * n, label, angle=rng.uniform(0, 180))
    labels = np.minimum(labels, k)  # few values: 0..k
    value_scale = int(_pick(rng, (1, 1, 40, 255 // max(1, k))))  # raw labels 0..k, or spread over 8 bits
    stored = (labels * value_scale).astype(np.uint8)
    if style == "labelmap" and rng.random() < 0.6:
        return _Image(stored, "SEG", LABEL_MAP_SEGMENTATION, bits_stored=8, syntax=_pick(rng, ("explicit", "rle")),
                      extra={"ConversionType": None, "SegmentationType": "LABELMAP"},
                      detail=f"label map {n}px {k + 1} values x{value_scale}")
    return _Image(stored, "OT", SECONDARY_CAPTURE, bits_stored=8, syntax=_pick(rng, ("explicit", "rle")),
                  extra={"ConversionType": "WSD"}, detail=f"{style} mask {n}px {k + 1} values x{value_scale}")


_DRAW: dict[str, Callable[[np.random.Generator, int], _Image]] = {
    "ct": _draw_ct, "mr": _draw_mr, "ultrasound": _draw_ultrasound, "nuclear": _draw_nuclear,
    "document": _draw_document, "photo": _draw_photo, "screen_photo": _draw_screen_photo, "colour": _draw_colour,
    "fluoroscopy": _draw_fluoroscopy, "mask": _draw_mask,
}


def draw(kind: str, seed: int, index: int) -> _Image:
    """The ``index``-th synthetic image of ``kind`` for ``seed`` (pure: same arguments, same pixels)."""
    if kind not in _DRAW:
        raise ValueError(f"unknown synthetic kind {kind!r}; one of {', '.join(SYNTHETIC_KINDS)}")
    rng = np.random.default_rng([seed, KINDS.index(kind), index])
    image = _DRAW[kind](rng, index)
    if image.syntax == "rle":
        # pydicom tries GDCM's RLE encoder first, and it aborts the process (an uncaught C++
        # exception) on an odd number of pixels: RLE images get an even number of rows and columns
        rows, cols = image.pixels.shape[-2:] if image.photometric != "RGB" else image.pixels.shape[-3:-1]
        image.pixels = np.ascontiguousarray(image.pixels[..., : rows // 2 * 2, : cols // 2 * 2, :]
                                            if image.photometric == "RGB" else
                                            image.pixels[..., : rows // 2 * 2, : cols // 2 * 2])
    return image


# --------------------------------------------------------------------------------------------
# writing


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["ood_set", *map(str, parts)])


def _write_synthetic(path: Path, image: _Image, retagged: bool, uids: tuple[str, str, str]) -> None:
    import pydicom.uid

    from utils.io.dicom_writer import write_dicom

    syntax = {"explicit": pydicom.uid.ExplicitVRLittleEndian, "rle": pydicom.uid.RLELossless,
              "j2k": pydicom.uid.JPEG2000Lossless, "jpeg": pydicom.uid.ExplicitVRLittleEndian}[image.syntax]
    extra = dict(image.extra)
    extra["SOPClassUID"] = image.sop_class
    modality = image.modality
    if retagged:  # the mis-tag under test: everything else stays as the modality wrote it
        modality = "DX"
        extra.update({"SOPClassUID": DX_PRESENTATION, "PresentationIntentType": "FOR PRESENTATION",
                      "ConversionType": None})
    write_dicom(path, image.pixels, photometric=image.photometric, bits_stored=image.bits_stored,
                rescale=image.rescale, window=image.window, transfer_syntax=syntax, modality=modality,
                patient_id="SYNTHETIC-OOD", study_uid=uids[0], series_uid=uids[1], sop_uid=uids[2], extra=extra)
    if image.syntax == "jpeg":
        _recompress_jpeg_baseline(path)


def _recompress_jpeg_baseline(path: Path, quality: int = 85) -> None:
    """Re-encode an 8-bit file's pixels as JPEG Baseline (what cameras and US machines send);
    pydicom has no such encoder, OpenCV's libjpeg does it (colour as YBR_FULL_422)."""
    import cv2
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    colour = arr.ndim == 3
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if colour:
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422]
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if colour else arr, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode {path}")
    ds.PixelData = encapsulate([data.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    if colour:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.LossyImageCompressionRatio = round(arr.nbytes / data.size, 2)
    ds.save_as(path, enforce_file_format=True)


def _row(folder: Path, path: Path, kind: str, source: str, retagged: bool, image_id: str, group: str,
         detail: str, note: str) -> dict[str, Any]:
    import pydicom

    with _quiet_pydicom():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    syntax = ds.file_meta.TransferSyntaxUID
    if retagged and not str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME") and not note:
        note = "colour under the DX SOP class: non-conformant on purpose"
    return {"path": path.relative_to(folder).as_posix(), "kind": kind, "source": source,
            "modality": str(ds.get("Modality", "")), "retagged": retagged, "image_id": image_id, "group": group,
            "sop_class": str(getattr(ds.SOPClassUID, "name", ds.SOPClassUID)) if "SOPClassUID" in ds else "",
            "photometric": str(ds.get("PhotometricInterpretation", "")), "rows": int(ds.Rows),
            "columns": int(ds.Columns), "frames": int(ds.get("NumberOfFrames", 1) or 1),
            "bits_stored": int(ds.BitsStored), "transfer_syntax": str(syntax.name), "detail": detail, "note": note}


# --------------------------------------------------------------------------------------------
# the real files


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom's test files are odd on purpose: its warnings about them are not news here."""
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.CRITICAL)  # its decoders log each failed plugin with a traceback
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_log.setLevel(level)


@dataclasses.dataclass
class RealFile:
    path: Path
    source: str  # "pydicom:<path under pydicom's test_files>" or "pydicom-data:<name>"
    image_id: str
    sop_instance: str
    frames: int
    shape: tuple[int, int]  # rows, columns of the display image
    thumbnail: np.ndarray  # 32 x 32 display image, to find near-duplicates


def real_candidates() -> tuple[list[RealFile], list[tuple[str, str]]]:
    """See :func:`_real_candidates` (computed once per process: the test files do not change)."""
    found, skipped = _real_candidates()
    return list(found), list(skipped)


@functools.cache
def _real_candidates() -> tuple[tuple[RealFile, ...], tuple[tuple[str, str], ...]]:
    """pydicom's and pydicom-data's test files that hold a non-projection image the project's
    reader decodes here, and (source, why) for each image file left out.

    Decoding goes through ``utils.io.dicom.read_dicom`` (not pydicom directly: a broken test file
    can abort the process inside a compiled codec); a file it refuses (broken on purpose, or a
    blank image) is left out with its reason. Offline: with pydicom-data installed,
    ``get_testdata_files()``'s default pattern lists files on disk only (the tests check that no
    connection is attempted)."""
    import pydicom
    from pydicom.data import get_testdata_files
    from pydicom.data.data_manager import DATA_ROOT
    from pydicom.errors import InvalidDicomError

    from utils.io.dicom import DicomReadError, read_dicom

    root = Path(DATA_ROOT) / "test_files"
    found, skipped = [], []
    with _quiet_pydicom():  # pydicom's test files are odd on purpose
        for name in sorted(get_testdata_files(), key=lambda p: (Path(p).name, p)):
            path = Path(name)
            if not path.is_file():
                continue
            try:
                source = f"pydicom:{path.relative_to(root).as_posix()}"
            except ValueError:
                source = f"pydicom-data:{path.name}"
            try:  # force: a few files have no preamble or file meta (the reader accepts them too)
                ds = pydicom.dcmread(path, defer_size="1 KB", force=True)
            except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
                log.debug("%s: not a DICOM dataset (%s)", source, exc)
                continue
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                continue  # not an image (SR, RT plan, DICOMDIR...)
            modality = str(ds.get("Modality", "")).upper()
            if modality in PROJECTION_MODALITIES:
                skipped.append((source, f"Modality {modality}: a projection radiograph"))
                continue
            try:
                pixels = read_dicom(path).pixels
            except DicomReadError as exc:
                skipped.append((source, f"the reader cannot decode it here ({exc.reason}): {_first_line(exc, path)}"))
                continue
            stem = re.sub(r"[^A-Za-z0-9_.+-]+", "-", source.split(":", 1)[1]).removesuffix(".dcm")
            try:
                frames = int(ds.get("NumberOfFrames", 1) or 1)
            except (TypeError, ValueError):
                frames = 1
            thumbnail = _cv2().resize(pixels.astype(np.float32), (32, 32), interpolation=_cv2().INTER_AREA)
            found.append(RealFile(path, source, f"real-{stem}", str(ds.get("SOPInstanceUID", "")), frames,
                                  pixels.shape, thumbnail))
    for source, why in skipped:
        log.info("left out %s: %s", source, why)
    return tuple(found), tuple(skipped)


def _first_line(exc: BaseException, path: Path, limit: int = 200) -> str:
    text = str(exc).strip().replace(f"{path}: ", "")
    return (text.splitlines()[0] if text else "")[:limit]


def _group_real(files: list[RealFile]) -> dict[str, str]:
    """image_id -> group: files showing the same picture (same SOP Instance UID, or the same size
    and thumbnails within 0.05 mean absolute difference) share the group of the first of them."""
    group: dict[str, str] = {}
    reps: list[RealFile] = []
    for f in files:
        for rep in reps:
            same_uid = f.sop_instance and f.sop_instance == rep.sop_instance
            same_pixels = (f.shape == rep.shape
                           and float(np.mean(np.abs(f.thumbnail - rep.thumbnail))) < 0.05)
            if same_uid or same_pixels:
                group[f.image_id] = group[rep.image_id]
                break
        else:
            reps.append(f)
            group[f.image_id] = f.image_id
    return group


def _first_frame(ds) -> None:
    """Keep frame 0 only, in the original transfer syntax (encapsulated: its fragments; native: its bytes)."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.pixels.utils import get_expected_length

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames <= 1:
        return
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        first = next(generate_frames(ds.PixelData, number_of_frames=frames))
        ds.PixelData = encapsulate([first])
        for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.NumberOfFrames = 1
    else:
        ds.NumberOfFrames = 1
        length = get_expected_length(ds, unit="bytes")
        data = ds.PixelData[:length]
        ds.PixelData = data + b"\0" * (len(data) % 2)
    if "PerFrameFunctionalGroupsSequence" in ds:
        del ds.PerFrameFunctionalGroupsSequence[1:]


def _ensure_file_meta(ds) -> None:
    """A file read without file meta (no preamble) gets one naming the encoding it was read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit
                                          else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if "SOPClassUID" in ds:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID


def _write_real(real: RealFile, path: Path, retagged: bool, seed: int) -> None:
    import pydicom

    with _quiet_pydicom():
        ds = pydicom.dcmread(real.path, force=True)
        for _ in ds.iterall():  # convert every raw element (a file that says explicit VR but is implicit)
            pass
        _ensure_file_meta(ds)
        _first_frame(ds)
        copy = "dx" if retagged else "sent"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, real.image_id, copy, "sop")
        if retagged:
            ds.Modality = "DX"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION
            ds.PresentationIntentType = "FOR PRESENTATION"
            ds.SeriesInstanceUID = _uid(seed, real.image_id, copy, "series")
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------------------------
# the set


def write_ood_set(folder: str | os.PathLike, seed: int = 0, per_kind: int = PER_KIND,
                  kinds: tuple[str, ...] = KINDS, retagged_copies: bool = True):
    """Write the set into ``folder`` (``<kind>/<image_id>-sent.dcm`` and ``-dx.dcm``) and
    ``folder/manifest.csv``; return the manifest as a DataFrame with columns ``COLUMNS``.

    ``per_kind`` synthetic images per synthetic kind; ``real`` takes every usable pydicom and
    pydicom-data file whatever ``per_kind`` is. Every image is written twice: as sent
    (``retagged`` False) and re-tagged DX (``retagged`` True). Columns: ``path`` (relative to
    ``folder``), ``kind``, ``source`` (``pydicom:<file>``, ``pydicom-data:<file>``, ``synthetic``,
    ``sklearn:<photo>``, ``demo:<class>``...), ``modality`` and ``sop_class`` as written,
    ``image_id`` (the same for both copies), ``group`` (real files showing the same picture in
    several encodings share one; weight rates per group to count each picture once), the pixel
    module (``photometric``, ``rows``, ``columns``, ``frames``, ``bits_stored``),
    ``transfer_syntax``, ``detail`` (how the image was drawn or reduced) and ``note``: a remark,
    or ``reader refuses: <reason>`` for a file ``utils.io.dicom.read_dicom`` refuses (none at
    present: real files it cannot decode are left out and logged, every synthetic one reads).
    ``retagged_copies=False`` writes the synthetic kinds as sent only (the OOD score's negatives:
    the pixels are what it learns from). Files of an earlier run in the kind folders that this run does not write are removed, so
    the folder always matches its manifest.
    """
    import pandas as pd

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown kind(s) {unknown}; choose from {', '.join(KINDS)}")
    if per_kind < 0:
        raise ValueError(f"per_kind must be >= 0, not {per_kind}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stale = {p for kind in KINDS for p in (folder / kind).glob("*-*.dcm") if p.stem.endswith(("-sent", "-dx"))}
    rows: list[dict[str, Any]] = []
    if "real" in kinds:
        files, _ = real_candidates()
        groups = _group_real(files)
        detail = "original pixels"
        for real in files:
            paths = [folder / "real" / f"{real.image_id}-{copy}.dcm" for copy in ("sent", "dx")]
            try:
                for path, retagged in zip(paths, (False, True)):
                    _write_real(real, path, retagged, seed)
            except (ValueError, TypeError, AttributeError, KeyError) as exc:  # pydicom cannot write it back
                log.warning("left out %s: cannot be written back (%s: %s)", real.source, type(exc).__name__, exc)
                for path in paths:
                    path.unlink(missing_ok=True)
                continue
            for path, retagged in zip(paths, (False, True)):
                rows.append(_row(folder, path, "real", real.source, retagged, real.image_id, groups[real.image_id],
                                 detail + (f", first of {real.frames} frames" if real.frames > 1 else ""), ""))
    for kind in SYNTHETIC_KINDS:
        if kind not in kinds:
            continue
        for index in range(per_kind):
            image = draw(kind, seed, index)
            image_id = f"{kind}-{index:03d}"
            study = _uid(seed, image_id, "study")
            for retagged in (False, True) if retagged_copies else (False,):
                copy = "dx" if retagged else "sent"
                path = folder / kind / f"{image_id}-{copy}.dcm"
                _write_synthetic(path, image, retagged,
                                 (study, _uid(seed, image_id, copy, "series"), _uid(seed, image_id, copy, "sop")))
                rows.append(_row(folder, path, kind, image.source, retagged, image_id, image_id, image.detail, ""))
    written = {folder / row["path"] for row in rows}
    for path in sorted(stale - written):  # left by an earlier run with other kinds or a larger per_kind
        log.info("removing %s: not part of this set", path)
        path.unlink()
    manifest = pd.DataFrame(rows, columns=list(COLUMNS))
    manifest.to_csv(folder / MANIFEST, index=False)
    return manifest


def read_manifest(folder: str | os.PathLike):
    """``folder/manifest.csv`` as a DataFrame (``note`` and ``detail`` empty strings, not NaN)."""
    import pandas as pd

    manifest = pd.read_csv(Path(folder) / MANIFEST, keep_default_na=False,
                           dtype={"note": str, "detail": str, "modality": str, "source": str})
    manifest["retagged"] = manifest["retagged"].astype(str).str.lower() == "true"
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utils.evaluate.ood_set",
        description="Write an evaluation set of images that are NOT projection radiographs (real CT/MR/US/... "
                    "test files from pydicom and pydicom-data, and synthetic CT, MR, ultrasound, nuclear medicine, "
                    "documents, photos, photos of screens, colour graphics, fluoroscopy and masks), each as sent "
                    "and re-tagged as DX, plus manifest.csv. Used to measure how many an out-of-distribution score "
                    "flags; nothing is fitted on it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, default=argparse.SUPPRESS,
                        help="folder to write into, e.g. data/ood (required)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images and of all UIDs")
    parser.add_argument("--per-kind", type=int, default=PER_KIND,
                        help="synthetic images per synthetic kind (each written as sent and re-tagged)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), metavar="KIND",
                        help=f"kinds to write, of: {' '.join(KINDS)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    import pandas as pd

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.per_kind < 0:
        build_parser().error("--per-kind must be >= 0")
    kinds = tuple(k for k in KINDS if k in args.kinds)
    manifest = write_ood_set(args.output, seed=args.seed, per_kind=args.per_kind, kinds=kinds)
    counts = pd.crosstab(manifest["kind"], manifest["retagged"]).reindex(index=list(kinds), columns=[False, True])
    counts = counts.fillna(0).astype(int).rename(columns={False: "as_sent", True: "retagged"})
    counts.columns.name = None
    refused = manifest[manifest["note"].str.startswith(REFUSED)]
    print(counts.to_string())
    print(f"total {len(manifest)} files in {args.output}; {len(refused)} refused by the reader "
          f"(see the note column of {MANIFEST})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
