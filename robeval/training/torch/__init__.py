"""Robust training for PyTorch: drop-in layers and losses for your own loop, plus a small trainer.

- Lipschitz layers: ``SpectralLinear``, ``SpectralConv2d``, ``GroupSort``/``MaxMin``,
  ``SandwichLayer``/``SandwichLinear``/``LBDN``; each has ``export()`` (plain layers) and
  ``lipschitz_bound()`` (a float upper bound).
- Losses: ``HKRLoss``, ``KRLoss``, ``HingeMarginLoss``, ``TauCrossEntropyLoss``.
- Regularisers: ``JacobianRegularizer``, ``AdversarialRegularizer``.
- Randomized smoothing: ``GaussianNoiseLoss`` (noise augmentation, optional consistency term).
- Certified training: ``ibp_margin_bounds``, ``crown_ibp_margin_bounds``, ``mixed_margin_bounds``,
  ``robust_cross_entropy``, ``IBPLoss`` (``bound="ibp"`` or ``"crown-ibp"``), ``ibp_init_`` with
  ``EpsilonSchedule``/``KappaSchedule``.
- ``Trainer`` and ``export_onnx``.
"""

from .._common import EpsilonSchedule, KappaSchedule, SpectralConfig
from .adversarial import AdversarialRegularizer
from .crown_ibp import crown_ibp_margin_bounds, mixed_margin_bounds
from .ibp import (
    IBPLoss,
    certified_accuracy,
    ibp_init_,
    ibp_margin_bounds,
    interval_bounds,
    robust_cross_entropy,
)
from .jacobian import JacobianRegularizer, jacobian_frobenius_sq
from .layers import (
    GroupSort,
    MaxMin,
    SpectralConv2d,
    SpectralLinear,
    bjorck,
    export_model,
    lipschitz_bound,
)
from .losses import HingeMarginLoss, HKRLoss, KRLoss, TauCrossEntropyLoss, kr_estimate
from .noise import GaussianNoiseLoss
from .sandwich import LBDN, SandwichLayer, SandwichLinear, cayley
from .trainer import EpochResult, Trainer, accuracy, export_onnx, plain_model

__all__ = [
    "AdversarialRegularizer",
    "EpochResult",
    "EpsilonSchedule",
    "GaussianNoiseLoss",
    "GroupSort",
    "HKRLoss",
    "HingeMarginLoss",
    "IBPLoss",
    "JacobianRegularizer",
    "KRLoss",
    "KappaSchedule",
    "LBDN",
    "MaxMin",
    "SandwichLayer",
    "SandwichLinear",
    "SpectralConfig",
    "SpectralConv2d",
    "SpectralLinear",
    "TauCrossEntropyLoss",
    "Trainer",
    "accuracy",
    "bjorck",
    "cayley",
    "certified_accuracy",
    "crown_ibp_margin_bounds",
    "export_model",
    "export_onnx",
    "ibp_init_",
    "ibp_margin_bounds",
    "interval_bounds",
    "jacobian_frobenius_sq",
    "kr_estimate",
    "lipschitz_bound",
    "mixed_margin_bounds",
    "plain_model",
    "robust_cross_entropy",
]
