"""Robust training plugins.

Framework-neutral pieces (schedules, HKR constants, iteration settings, bounds on stored
weights) live in ``robeval.training._common`` and are re-exported here; this module imports no
framework. The PyTorch layers, losses and trainer are in ``robeval.training.torch``.
"""

from ._common import (
    HKR_ALPHA,
    HKR_MIN_MARGIN,
    EpsilonSchedule,
    KappaSchedule,
    SpectralConfig,
    ramp_fraction,
)

__all__ = [
    "HKR_ALPHA",
    "HKR_MIN_MARGIN",
    "EpsilonSchedule",
    "KappaSchedule",
    "SpectralConfig",
    "ramp_fraction",
]
