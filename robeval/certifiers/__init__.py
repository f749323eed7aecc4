"""Certifiers (sound lower bounds on robustness) and attacks (upper bounds).

``CERTIFIERS`` maps a method name to its class; ``get_certifier`` builds one with validated options."""

from __future__ import annotations

from ..errors import InvalidParameterError
from .apgd import APGD
from .attacks import FGSM, PGD, Attack, attack, get_attack
from .base import Certifier
from .consistency import ConsistencyError, GradientMaskingWarning
from .ibp import IBP, ibp_margin_bounds
from .lipschitz import LipschitzMargin, certified_radii, pairwise_lipschitz
from .noise import NoiseSweep, sweep

CERTIFIERS: dict[str, type[Certifier]] = {"ibp": IBP, "lipschitz": LipschitzMargin}


def register_certifier(cls: type[Certifier]) -> type[Certifier]:
    """Add a certifier class under its ``name`` (used by optional modules such as CROWN)."""
    CERTIFIERS[cls.name] = cls
    return cls


def get_certifier(method: str, **options) -> Certifier:
    """A certifier instance by method name, e.g. get_certifier("ibp", norm="linf")."""
    try:
        cls = CERTIFIERS[method.lower()]
    except KeyError:
        raise InvalidParameterError(f"method={method!r} is not known; expected one of {sorted(CERTIFIERS)}") from None
    return cls(**options)


__all__ = ["CERTIFIERS", "Certifier", "IBP", "LipschitzMargin", "get_certifier", "register_certifier",
           "ibp_margin_bounds", "certified_radii", "pairwise_lipschitz", "Attack", "FGSM", "PGD", "APGD",
           "attack", "get_attack", "NoiseSweep", "sweep", "ConsistencyError", "GradientMaskingWarning"]

from . import (  # noqa: E402
    crown,  # noqa: F401  (registers crown, crown-pure, crown-ibp and best)
    smoothing,  # noqa: F401  (registers smoothing: probabilistic, see smoothing.py)
)
