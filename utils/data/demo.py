"""A SYNTHETIC demo dataset: cartoon X-rays of the five classes, written as real DICOM files.

Nothing here is a real radiograph. The images are drawn with simple shapes (lungs and ribs, a
column of vertebrae, a limb bone...) so that ``training.py --demo`` and ``test.py --demo`` can run
end to end on a fresh machine without downloading anything. The files exercise the DICOM reader:
MONOCHROME1 and MONOCHROME2, 8/12/16 bits, signed pixels with rescale, window values, a VOI LUT,
RLE and JPEG 2000 compression, plus one non-image object and one broken file that prepare.py must
reject with a reason.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pydicom.uid

from utils import constants

log = logging.getLogger(__name__)

DEMO_CLASSES = ("abdominal", "adult_chest", "pediatric_chest", "spine", "others")


def _ellipse(canvas: np.ndarray, centre, axes, value: float, angle: float = 0.0) -> None:
    cv2.ellipse(canvas, (int(centre[0]), int(centre[1])), (max(1, int(axes[0])), max(1, int(axes[1]))),
                angle, 0, 360, float(value), -1, lineType=cv2.LINE_AA)


def _chest(rng: np.random.Generator, shape: tuple[int, int], child: bool) -> np.ndarray:
    h, w = shape
    img = np.full(shape, 0.05, np.float32)
    body_w = w * (0.42 if child else 0.46)
    _ellipse(img, (w / 2, h * 0.55), (body_w, h * 0.55), 0.45)
    lung_axes = (w * (0.15 if child else 0.17), h * (0.22 if child else 0.3))
    for side in (-1, 1):
        _ellipse(img, (w / 2 + side * w * 0.2, h * 0.48), lung_axes, 0.12, angle=side * 8)
    _ellipse(img, (w * 0.56, h * 0.66), (w * 0.12, h * 0.1), 0.5)  # heart shadow
    cv2.rectangle(img, (int(w * 0.47), 0), (int(w * 0.53), h), 0.6, -1)  # spine / mediastinum
    for k in range(6 if child else 9):  # ribs
        y = h * (0.25 + k * (0.07 if child else 0.055))
        for side in (-1, 1):
            cv2.ellipse(img, (int(w / 2), int(y)), (int(w * 0.38), int(h * 0.06)), 0,
                        90 - side * 10, 90 - side * 80, 0.8, max(1, int(h * 0.008)), lineType=cv2.LINE_AA)
    for side in (-1, 1):  # clavicles
        cv2.line(img, (int(w / 2 + side * w * 0.05), int(h * 0.2)), (int(w / 2 + side * w * 0.33), int(h * 0.15)),
                 0.85, max(2, int(h * 0.015)), lineType=cv2.LINE_AA)
    if child:  # arms raised beside the small chest
        for side in (-1, 1):
            x = int(w / 2 + side * w * 0.46)
            cv2.line(img, (x, int(h * 0.05)), (x, int(h * 0.6)), 0.8, max(2, int(w * 0.035)), lineType=cv2.LINE_AA)
    return img


def _abdomen(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    img = np.full(shape, 0.05, np.float32)
    _ellipse(img, (w / 2, h / 2), (w * 0.48, h * 0.6), 0.5)
    for _ in range(rng.integers(6, 14)):  # bowel gas
        _ellipse(img, (rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.7) * h),
                 (rng.uniform(0.02, 0.06) * w, rng.uniform(0.02, 0.05) * h), 0.2)
    for k in range(5):  # lumbar vertebrae
        y = h * (0.1 + k * 0.13)
        cv2.rectangle(img, (int(w * 0.45), int(y)), (int(w * 0.55), int(y + h * 0.1)), 0.8, -1)
    for side in (-1, 1):  # iliac wings
        cv2.ellipse(img, (int(w / 2 + side * w * 0.22), int(h * 0.85)), (int(w * 0.18), int(h * 0.12)), 0,
                    180, 360, 0.85, max(2, int(h * 0.02)), lineType=cv2.LINE_AA)
    return img


def _spine(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    img = np.full(shape, 0.08, np.float32)
    _ellipse(img, (w / 2, h / 2), (w * 0.35, h * 0.7), 0.35)
    count = int(rng.integers(7, 12))
    curve = rng.uniform(-0.08, 0.08) * w
    for k in range(count):
        y0 = h * (0.03 + k * 0.94 / count)
        x = w / 2 + curve * math.sin(math.pi * k / count)
        cv2.rectangle(img, (int(x - w * 0.12), int(y0)), (int(x + w * 0.12), int(y0 + 0.94 * h / count * 0.75)),
                      0.85, -1)
    return img


def _limb(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    img = np.full(shape, 0.02, np.float32)
    angle = rng.uniform(-30, 30)
    _ellipse(img, (w / 2, h / 2), (w * 0.2, h * 0.55), 0.35, angle=angle)
    dx, dy = math.sin(math.radians(-angle)) * h * 0.45, math.cos(math.radians(-angle)) * h * 0.45
    start, end = (int(w / 2 - dx), int(h / 2 - dy)), (int(w / 2 + dx), int(h / 2 + dy))
    cv2.line(img, start, end, 0.9, max(3, int(w * 0.07)), lineType=cv2.LINE_AA)
    for point in (start, end):  # joint ends
        _ellipse(img, point, (w * 0.08, w * 0.08), 0.95)
    return img


_DRAW: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "abdominal": lambda rng: _abdomen(rng, (int(rng.integers(220, 260)), int(rng.integers(260, 300)))),
    "adult_chest": lambda rng: _chest(rng, (int(rng.integers(270, 300)), int(rng.integers(250, 280))), False),
    "pediatric_chest": lambda rng: _chest(rng, (224, 224), True),
    "spine": lambda rng: _spine(rng, (int(rng.integers(300, 340)), int(rng.integers(130, 170)))),
    "others": lambda rng: _limb(rng, (int(rng.integers(200, 300)), int(rng.integers(160, 240)))),
}


def draw(label: str, rng: np.random.Generator) -> np.ndarray:
    """One synthetic image of ``label`` in [0, 1] (bright = dense), with blur, noise and jitter."""
    image = _DRAW[label](rng)
    h, w = image.shape
    shift = np.float32([[1, 0, rng.uniform(-0.04, 0.04) * w], [0, 1, rng.uniform(-0.04, 0.04) * h]])
    image = cv2.warpAffine(image, shift, (w, h), borderMode=cv2.BORDER_REPLICATE)
    image = cv2.GaussianBlur(image, (0, 0), 1.2)
    image = image * rng.uniform(0.85, 1.1) + rng.normal(0, 0.03, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0)


# Encodings cycled through the demo files: (transfer syntax, photometric, bits, extras)
ENCODINGS = (
    ("explicit", "MONOCHROME2", 8, {}),
    ("explicit", "MONOCHROME1", 12, {"window": True}),
    ("rle", "MONOCHROME2", 16, {}),
    ("j2k_lossless", "MONOCHROME1", 12, {}),
    ("explicit", "MONOCHROME2", 16, {"signed_rescale": True, "window": True}),
    ("explicit", "MONOCHROME2", 12, {"voi_lut": True}),
)
_SYNTAX = {"explicit": pydicom.uid.ExplicitVRLittleEndian, "rle": pydicom.uid.RLELossless,
           "j2k_lossless": pydicom.uid.JPEG2000Lossless}


def write_demo_file(path: Path, label: str, index: int, rng: np.random.Generator) -> Path:
    """Draw one image and write it with the ``index``-th encoding of :data:`ENCODINGS`."""
    from utils.io.dicom_writer import write_dicom

    syntax, photometric, bits, extras = ENCODINGS[index % len(ENCODINGS)]
    image = draw(label, rng)
    if photometric == "MONOCHROME1":
        image = 1.0 - image  # stored values: dense = low, the viewer inverts
    top = 2 ** bits - 1
    kwargs: dict = {}
    if extras.get("signed_rescale"):
        # Signed stored values; rescale maps them to 0..4095 "attenuation" units.
        stored = np.rint(image * 4095 - 2048).astype(np.int16)
        kwargs["rescale"] = (1.0, 2048.0)
        kwargs["bits_stored"] = 16
        if extras.get("window"):
            kwargs["window"] = (2048.0, 4096.0)
    else:
        dtype = np.uint8 if bits == 8 else np.uint16
        stored = np.rint(image * top).astype(dtype)
        kwargs["bits_stored"] = bits
        if extras.get("window"):
            kwargs["window"] = (top / 2, top + 1)
        if extras.get("voi_lut"):
            # An identity-like 10-bit LUT over the 12-bit range with a mild gamma.
            kwargs["voi_lut"] = np.rint(1023 * (np.arange(top + 1) / top) ** 0.9).astype(np.uint16)
    body_part = {"abdominal": "ABDOMEN", "adult_chest": "CHEST", "pediatric_chest": "CHEST",
                 "spine": "SPINE", "others": "HAND"}[label]
    return write_dicom(path, stored, photometric=photometric, transfer_syntax=_SYNTAX[syntax],
                       modality="DX", body_part=body_part,
                       patient_id=f"DEMO-{label}-{index // 2:03d}",  # two images per synthetic patient
                       patient_age="004Y" if label == "pediatric_chest" else "045Y", **kwargs)


def write_bad_files(folder: Path) -> list[Path]:
    """A non-image DICOM object and a truncated file: prepare.py must reject both with a reason."""
    from utils.io.dicom_writer import write_non_image

    folder.mkdir(parents=True, exist_ok=True)
    sr_path = write_non_image(folder / "synthetic_report_sr.dcm", pydicom.uid.BasicTextSRStorage,
                              Modality="SR", PatientID="DEMO-REPORT")
    broken = folder / "synthetic_truncated.dcm"
    whole = write_demo_file(folder / "synthetic_whole.tmp", "others", 0, np.random.default_rng(0))
    data = whole.read_bytes()
    broken.write_bytes(data[: len(data) - len(data) // 3])  # pixel data cut short, as by a failed copy
    whole.unlink()
    return [sr_path, broken]


def generate_demo_dicoms(folder: str | os.PathLike, *, images_per_class: int = constants.DEMO_IMAGES_PER_CLASS,
                         seed: int = constants.SEED, progress: bool = True) -> Path:
    """Write the synthetic set as ``folder/<class>/*.dcm`` (idempotent: existing files are kept)."""
    from tqdm import tqdm

    folder = Path(folder)
    jobs = [(label, i) for label in DEMO_CLASSES for i in range(images_per_class)]
    for label, i in tqdm(jobs, desc="writing synthetic DICOMs", unit="file", disable=not progress):
        path = folder / label / f"synthetic_{label}_{i:03d}.dcm"
        file_rng = np.random.default_rng([seed, DEMO_CLASSES.index(label), i])
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_demo_file(path, label, i, file_rng)
    write_bad_files(folder / "others")
    (folder / "README.txt").write_text(
        "SYNTHETIC demo data written by utils/data/demo.py: cartoon images, not radiographs.\n")
    return folder


def prepare_demo(*, progress: bool = True, image_size: int | None = None, root: str | os.PathLike | None = None,
                 images_per_class: int = constants.DEMO_IMAGES_PER_CLASS):
    """Generate the synthetic DICOMs (once) and prepare them into ``<root>/prepared``."""
    from utils.data import files
    from utils.data.prepare import prepare_dataset
    from utils.preprocessing import PreprocessSpec

    root = Path(root or constants.DEMO_DIR)
    source = generate_demo_dicoms(root / "dicom", images_per_class=images_per_class, progress=progress)
    spec = PreprocessSpec(class_names=DEMO_CLASSES, image_size=image_size or constants.DEMO_IMAGE_SIZE,
                          channels=constants.CHANNELS, aspect=constants.ASPECT,
                          window_percentiles=constants.WINDOW_PERCENTILES)
    output = root / "prepared"
    # The demo folder is ours: prepared at another size before, it is redone rather than refused.
    stale = files.is_prepared(output) and not files.read_spec(output).same_pixels(spec)
    return prepare_dataset(source, output, spec, ratios=constants.SPLIT_RATIOS,
                           seed=constants.SEED, workers=0, progress=progress, overwrite=stale)
