"""What the router accepts by either way in (the Storage SCP, STOW-RS): transfer syntaxes and SOP classes.

Forwarders send each object in the transfer syntax it arrived in, so this list is also what destinations are
offered. Both intakes refuse the rest with their own status: the SCP in association negotiation, STOW-RS per
instance (FailureReason 0xC122 / 0x0122).
"""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000,
    HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless,
]


def storage_sop_classes() -> frozenset[str]:
    """Every storage SOP class pynetdicom knows (images and non-images: SR, encapsulated PDF, presentation states...)."""
    from pynetdicom import AllStoragePresentationContexts

    return frozenset(str(context.abstract_syntax) for context in AllStoragePresentationContexts)
