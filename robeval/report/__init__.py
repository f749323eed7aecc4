"""Result objects and report renderers."""

from .empirical import AttackReport, AttackResult, NoiseResult
from .results import FALSIFIED, UNKNOWN, VERIFIED, CertificationResult

__all__ = ["CertificationResult", "AttackResult", "AttackReport", "NoiseResult", "VERIFIED", "FALSIFIED", "UNKNOWN"]
