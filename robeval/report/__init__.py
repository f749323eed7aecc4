"""Result objects and report renderers."""

from .results import FALSIFIED, UNKNOWN, VERIFIED, CertificationResult

__all__ = ["CertificationResult", "VERIFIED", "FALSIFIED", "UNKNOWN"]
