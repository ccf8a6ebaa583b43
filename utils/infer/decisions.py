"""What a prediction means: the label (or ``uncertain``), and whether the DICOM tag agrees.

Shared by predict.py, test.py and the router through utils.infer.engine; small and free of model and
codec imports, so configuration code can name the routes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

UNCERTAIN = "uncertain"  # top probability below the threshold: route to manual review
UNREADABLE = "unreadable"  # not an image the model can see (broken, non-image object, not DICOM)
AUTO_THRESHOLD = "auto"  # --threshold auto / threshold: auto: the model's calibrated recommendation
NOT_PROJECTION = "not_projection_radiography"  # reason of a DICOM the header guard keeps from the model

# The header guard (predict.py, test.py on raw files, backfill.py; the router's built-in rules): a
# DICOM goes to the model when its Modality is one of these, or, without a Modality, when its SOP
# class is Computed Radiography or Digital X-Ray (For Presentation / For Processing). Mammography,
# intra-oral and panoramic dental X-rays (MG, IO, PX) are projection images too, but no body part
# this model knows. Modality is written by the sender: the model's out-of-distribution score is what
# catches a photo or a CT slice tagged DX.
PROJECTION_MODALITIES = ("CR", "DX", "DR", "RG")  # DR: retired term older devices still send; RG: digitised film
PROJECTION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1")

# Body Part Examined values (DICOM PS3.16 CID 4031 defined terms and common variants, compared
# upper-case without separators) that agree with each default class. Classes not listed here
# agree with a tag equal to their own name (e.g. a "knee" class with KNEE).
BODY_PART_TAGS: dict[str, frozenset[str]] = {
    "abdominal": frozenset({"ABDOMEN", "ABDOMENPELVIS", "ABD", "KUB", "BOWEL", "STOMACH"}),
    "adult_chest": frozenset({"CHEST", "THORAX", "LUNG", "CHESTPA", "CHESTAP", "CHESTLAT"}),
    "pediatric_chest": frozenset({"CHEST", "THORAX", "LUNG", "CHESTPA", "CHESTAP", "CHESTLAT"}),
    "spine": frozenset({"SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "CTSPINE", "TLSPINE", "LSSPINE",
                        "WHOLESPINE", "COCCYX", "SACRUM", "CERVICALSPINE", "THORACICSPINE", "LUMBARSPINE"}),
}
OTHER_CLASSES = ("others", "other")  # a catch-all class agrees with any tag no specific class claims


def decide(probs: np.ndarray, class_names: Sequence[str], threshold: float) -> tuple[list[str], list[str], np.ndarray]:
    """(labels with ``uncertain`` below the threshold, top labels, confidences) for probs (N, K)."""
    top = np.argmax(probs, axis=1)
    confidence = probs[np.arange(len(probs)), top].astype(np.float64)
    top_labels = [class_names[i] for i in top]
    labels = [name if c >= threshold else UNCERTAIN for name, c in zip(top_labels, confidence)]
    return labels, top_labels, confidence


def _normalise_tag(value: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", (value or "").upper())


def tag_disagrees(label: str, tag: str, class_names: Sequence[str]) -> bool | None:
    """Does the BodyPartExamined tag contradict the predicted class? None when there is no tag.

    CHEST agrees with both chest classes; a catch-all class ("others") disagrees only with tags
    that another class claims; a tag no class claims contradicts every specific class.
    """
    tag = _normalise_tag(tag)
    if not tag or label not in class_names:
        return None
    claimed = {c for c in class_names if tag in BODY_PART_TAGS.get(c, frozenset({_normalise_tag(c)}))}
    if label in OTHER_CLASSES:
        return bool(claimed - {label})
    return label not in claimed


def tag_classes(tag: str | None, class_names: Sequence[str]) -> frozenset[str]:
    """The classes a BodyPartExamined tag stands for, by the same mapping as :func:`tag_disagrees`: the classes
    that claim it, else the catch-all class ("others") if the model has one; empty for a missing tag, or one no
    class claims when there is no catch-all. A label agrees with the tag when it is in this set."""
    tag = _normalise_tag(tag or "")
    if not tag:
        return frozenset()
    claimed = frozenset(c for c in class_names if tag in BODY_PART_TAGS.get(c, frozenset({_normalise_tag(c)})))
    return claimed or frozenset(c for c in class_names if c in OTHER_CLASSES)


def not_projection(header: dict[str, str] | None) -> str:
    """Why the header guard keeps a DICOM from the model ("" when it may go): its Modality is not
    projection radiography (PROJECTION_MODALITIES), or it has none and its SOP class is not one of
    PROJECTION_SOP_CLASSES. ``header`` is the reader's HEADER_FIELDS; an empty one (PNG, JPEG: no
    header to judge) passes."""
    if not header:
        return ""
    modality = str(header.get("Modality") or "").strip().upper()
    sop_class = str(header.get("SOPClassUID") or "").strip()
    if modality in PROJECTION_MODALITIES or (not modality and sop_class in PROJECTION_SOP_CLASSES):
        return ""
    shown_modality = _printable(modality) or "(none)"
    shown_class = _printable(sop_class) or "(none)"
    return (f"Modality {shown_modality}, SOP class {shown_class}: not projection radiography "
            f"({'/'.join(PROJECTION_MODALITIES)}); --no-projection-only sends it to the model anyway")


def _printable(text: str, limit: int = 64) -> str:
    """A header value as it may appear in a message: printable ASCII only, at most ``limit`` characters."""
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def threshold_value(text: str) -> float | str:
    """The argparse type of predict.py's and router.py's --threshold: a number in THRESHOLD_RANGE, or
    "auto" (the threshold the model's calibration recommends; utils.infer.predictor.resolve_threshold)."""
    import argparse

    from utils import config

    if text.strip().lower() == AUTO_THRESHOLD:
        return AUTO_THRESHOLD
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or '{AUTO_THRESHOLD}', got {text!r}") from None
    try:
        config.check_value("THRESHOLD", value)
    except config.ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value
