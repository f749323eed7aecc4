"""Robust training for Keras 3 (TensorFlow backend): the twin of ``robeval.training.torch``.

Same methods, same math (both bind ``robeval.training._common``), in Keras idioms: layers,
``keras.losses.Loss``/``keras.metrics.Metric`` objects for ``compile``, and ``keras.Model`` wrappers
whose ``train_step`` adds the robust objective, so ``compile`` and ``fit`` work as usual.

- Lipschitz layers: ``SpectralDense``, ``SpectralConv2D``, ``GroupSort``/``MaxMin``,
  ``SandwichLayer``/``SandwichDense``/``LBDN``; each has ``export()`` (plain Keras layers) and
  ``lipschitz_bound()``; ``export_model`` and ``lipschitz_bound`` work on whole chain models.
- Losses: ``HKRLoss``, ``KRLoss``, ``HingeMarginLoss``, ``TauCrossEntropyLoss``; metrics ``KREstimate``,
  ``HingeMargin``, ``SignAccuracy``, ``CertifiedAccuracy``.
- Regularisers: ``AdversarialRegularization`` (NSL-style), ``JacobianRegularization``.
- Randomized smoothing: ``GaussianNoiseTraining`` (noise augmentation, optional consistency term).
- Certified training: ``IBPTraining`` (``bound="ibp"`` or ``"crown-ibp"``) with the ``EpsilonScheduler``
  callback; ``ibp_margin_bounds``, ``crown_ibp_margin_bounds``, ``mixed_margin_bounds``,
  ``robust_cross_entropy``, ``IBPLoss``, ``ibp_init``, ``certified_accuracy``.

Every layer, loss and metric is registered with Keras (package "robeval"), so ``.keras`` files load
with ``safe_mode=True`` once this module is imported.
"""

import keras as _keras

from ...errors import BackendError as _BackendError

if _keras.backend.backend() != "tensorflow":
    raise _BackendError(
        f"robeval.training.keras needs the TensorFlow backend of Keras 3, but KERAS_BACKEND is "
        f"'{_keras.backend.backend()}'; set KERAS_BACKEND=tensorflow before importing keras"
    )

from .._common import EpsilonSchedule, KappaSchedule, SpectralConfig  # noqa: E402
from ._shared import AdversarialConfig, make_adv_reg_config  # noqa: E402
from .adversarial import AdversarialRegularization, adversarial_losses, perturb  # noqa: E402
from .callbacks import EpsilonScheduler  # noqa: E402
from .crown_ibp import crown_ibp_margin_bounds, mixed_margin_bounds  # noqa: E402
from .export import binary_as_two_logits, export_model, flat_layers, lipschitz_bound  # noqa: E402
from .ibp import (  # noqa: E402
    IBPLoss,
    IBPTraining,
    certified_accuracy,
    ibp_init,
    ibp_loss,
    ibp_margin_bounds,
    interval_bounds,
    robust_cross_entropy,
)
from .jacobian import JacobianRegularization, jacobian_frobenius_sq  # noqa: E402
from .layers import GroupSort, MaxMin, SpectralConv2D, SpectralDense, bjorck  # noqa: E402
from .losses import HingeMarginLoss, HKRLoss, KRLoss, TauCrossEntropyLoss, hinge_margin, kr_estimate  # noqa: E402
from .metrics import CertifiedAccuracy, HingeMargin, KREstimate, SignAccuracy, certified_radius  # noqa: E402
from .model import RobustModel  # noqa: E402
from .noise import GaussianNoiseTraining  # noqa: E402
from .sandwich import LBDN, SandwichDense, SandwichLayer, cayley  # noqa: E402

__all__ = [
    "AdversarialConfig",
    "AdversarialRegularization",
    "CertifiedAccuracy",
    "EpsilonSchedule",
    "EpsilonScheduler",
    "GaussianNoiseTraining",
    "GroupSort",
    "HKRLoss",
    "HingeMargin",
    "HingeMarginLoss",
    "IBPLoss",
    "IBPTraining",
    "JacobianRegularization",
    "KREstimate",
    "KRLoss",
    "KappaSchedule",
    "LBDN",
    "MaxMin",
    "RobustModel",
    "SandwichDense",
    "SandwichLayer",
    "SignAccuracy",
    "SpectralConfig",
    "SpectralConv2D",
    "SpectralDense",
    "TauCrossEntropyLoss",
    "adversarial_losses",
    "binary_as_two_logits",
    "bjorck",
    "cayley",
    "certified_accuracy",
    "crown_ibp_margin_bounds",
    "certified_radius",
    "export_model",
    "flat_layers",
    "hinge_margin",
    "ibp_init",
    "ibp_loss",
    "ibp_margin_bounds",
    "interval_bounds",
    "jacobian_frobenius_sq",
    "kr_estimate",
    "lipschitz_bound",
    "mixed_margin_bounds",
    "make_adv_reg_config",
    "perturb",
    "robust_cross_entropy",
]
