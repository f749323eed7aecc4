"""Framework-neutral pieces the Keras twin needs that ``training/_common.py`` does not hold yet.

Plain Python only (no framework import): the adversarial-regularisation configuration in the
words of Neural Structured Learning (``multiplier``, ``adv_step_size``, ``adv_grad_norm``), the
PGD default step, the activations whose Lipschitz constant is known, and label helpers. They
belong in ``_common.py`` once the PyTorch twin binds them too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidParameterError
from .. import _common

#: robeval's norm names and the spellings accepted for them (NSL writes "infinity").
NORM_ALIASES = {"linf": "linf", "inf": "linf", "infinity": "linf", "l2": "l2"}
ADV_METHODS = ("fgsm", "pgd")
#: Whose Jacobian the Jacobian regulariser penalises.
JACOBIAN_OUTPUTS = ("logits", "probabilities")
#: PGD step as a multiple of eps / steps (Madry et al. use 2.5 eps / steps).
PGD_STEP_FACTOR = 2.5

#: L2 Lipschitz constants of elementwise activations (a name -> float); others have no bound here.
ACTIVATION_LIPSCHITZ = {"linear": 1.0, "relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "leaky_relu": 1.0,
                        "elu": 1.0, "softplus": 1.0}
#: Elementwise non-decreasing activations: interval bounds map to interval bounds.
MONOTONE_ACTIVATIONS = frozenset(ACTIVATION_LIPSCHITZ) | {"relu6", "selu", "softsign", "hard_sigmoid"}


def canonical_norm(norm: str) -> str:
    """'linf' or 'l2' for any accepted spelling ('infinity', 'inf', 'linf', 'l2')."""
    key = str(norm).lower()
    if key not in NORM_ALIASES:
        raise InvalidParameterError(f"norm={norm!r}; expected one of {sorted(NORM_ALIASES)}")
    return NORM_ALIASES[key]


def pgd_step_size(eps: float, steps: int) -> float:
    """Default PGD step: 2.5 eps / steps, as ``robeval.training.torch.AdversarialRegularizer`` uses."""
    return PGD_STEP_FACTOR * eps / steps


def check_clip(clip: tuple[float, float] | None) -> tuple[float, float] | None:
    """(low, high) with low < high, or None."""
    if clip is None:
        return None
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"clip={clip!r}; expected (low, high) or None") from None
    if not lo < hi:
        raise InvalidParameterError(f"clip={clip!r}; expected (low, high) with low < high, or None")
    return lo, hi


@dataclass(frozen=True)
class AdversarialConfig:
    """Settings of adversarial regularisation, named as in NSL's ``make_adv_reg_config``.

    Attributes:
        multiplier: weight of the adversarial loss (0.2 in the NSL tutorial).
        adv_step_size: the FGSM step, or the PGD radius.
        adv_grad_norm: "infinity" (gradient sign) or "l2" (normalised gradient); "linf" also works.
        method: "fgsm" (one step) or "pgd" (``pgd_iterations`` projected steps).
        pgd_iterations, pgd_step_size: PGD settings; the step defaults to 2.5 * eps / iterations.
        clip: (low, high) box for the perturbed inputs, or None.

    >>> AdversarialConfig(multiplier=0.2, adv_step_size=0.2, adv_grad_norm="infinity").norm
    'linf'
    """

    multiplier: float = 0.2
    adv_step_size: float = 0.2
    adv_grad_norm: str = "infinity"
    method: str = "fgsm"
    pgd_iterations: int = 10
    pgd_step_size: float | None = None
    clip: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        _common.check_positive("multiplier", self.multiplier, allow_zero=True)
        _common.check_positive("adv_step_size", self.adv_step_size, allow_zero=True)
        canonical_norm(self.adv_grad_norm)
        if self.method not in ADV_METHODS:
            raise InvalidParameterError(f"method={self.method!r}; expected one of {ADV_METHODS}")
        _common.check_int("pgd_iterations", self.pgd_iterations, 1)
        if self.pgd_step_size is not None:
            _common.check_positive("pgd_step_size", self.pgd_step_size)
        object.__setattr__(self, "clip", check_clip(self.clip))

    @property
    def norm(self) -> str:
        return canonical_norm(self.adv_grad_norm)

    @property
    def step_size(self) -> float:
        """The PGD step actually used."""
        if self.pgd_step_size is not None:
            return float(self.pgd_step_size)
        return pgd_step_size(self.adv_step_size, self.pgd_iterations)

    def to_dict(self) -> dict:
        return {"multiplier": self.multiplier, "adv_step_size": self.adv_step_size,
                "adv_grad_norm": self.adv_grad_norm, "method": self.method,
                "pgd_iterations": self.pgd_iterations, "pgd_step_size": self.pgd_step_size,
                "clip": None if self.clip is None else list(self.clip)}


def make_adv_reg_config(multiplier: float = 0.2, adv_step_size: float = 0.2, adv_grad_norm: str = "infinity",
                        **options) -> AdversarialConfig:
    """NSL's ``make_adv_reg_config`` spelling; extra options: method, pgd_iterations, pgd_step_size, clip."""
    return AdversarialConfig(multiplier=multiplier, adv_step_size=adv_step_size, adv_grad_norm=adv_grad_norm,
                             **options)
