"""Losses for Lipschitz networks: Kantorovich-Rubinstein (KR), hinge margin, their HKR sum
(Serrurier et al. 2021, as in deel-lip) and cross-entropy with a temperature.

Label conventions (checked, with the fix in the message):
- binary: outputs of shape (N,) or (N, 1); labels in {-1, +1} or {0, 1} (0 is the negative class).
- multiclass: outputs of shape (N, K), K >= 2; integer labels (N,) or one-hot (N, K). Each class
  is treated one-vs-all: output k should be high on class k and low elsewhere, as in deel-lip.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputShapeError, InvalidParameterError
from .. import _common


def signed_targets(y_pred: torch.Tensor, y_true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (outputs, signs), both (N, K): sign +1 where the output should be high, -1 elsewhere."""
    out = y_pred.reshape(-1, 1) if y_pred.dim() == 1 else y_pred
    if out.dim() != 2:
        raise InputShapeError(f"outputs have shape {tuple(y_pred.shape)}; expected (N,), (N, 1) or (N, K)")
    n, k = out.shape
    if k == 1:
        y = y_true.reshape(-1).to(out.dtype)
        if y.shape[0] != n:
            raise InputShapeError(f"{y.shape[0]} labels for {n} outputs; give one label per sample")
        if not bool(((y == 1) | (y == -1) | (y == 0)).all()):
            raise InvalidParameterError(
                "binary labels must be in {-1, 1} or {0, 1}; map your two classes to them"
            )
        return out, torch.where(y > 0, 1.0, -1.0).to(out.dtype)[:, None]
    if y_true.dim() == 2 and y_true.shape == out.shape:
        onehot = y_true > 0
    elif y_true.dim() == 1 and y_true.shape[0] == n:
        if y_true.dtype.is_floating_point or int(y_true.min()) < 0 or int(y_true.max()) >= k:
            raise InvalidParameterError(
                f"class labels must be integers in [0, {k}); got dtype {y_true.dtype}"
            )
        onehot = F.one_hot(y_true.long(), k).bool()
    else:
        raise InputShapeError(
            f"labels have shape {tuple(y_true.shape)} for outputs {tuple(out.shape)}; give (N,) class "
            "indices or (N, K) one-hot labels"
        )
    return out, onehot.to(out.dtype) * 2 - 1


def kr_estimate(y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
    """Kantorovich-Rubinstein estimate E[f | positive] - E[f | negative], averaged over outputs.

    For a 1-Lipschitz f its supremum is the Wasserstein-1 distance between the two classes.
    A class missing from the batch contributes 0 to its mean.
    """
    out, sign = signed_targets(y_pred, y_true)
    pos, neg = (sign > 0).to(out.dtype), (sign < 0).to(out.dtype)
    mean_pos = (out * pos).sum(0) / pos.sum(0).clamp_min(1)
    mean_neg = (out * neg).sum(0) / neg.sum(0).clamp_min(1)
    return (mean_pos - mean_neg).mean()


def hinge_margin(y_pred: torch.Tensor, y_true: torch.Tensor, min_margin: float) -> torch.Tensor:
    """mean over samples and outputs of relu(min_margin - sign * f)."""
    out, sign = signed_targets(y_pred, y_true)
    return F.relu(min_margin - sign * out).mean()


class KRLoss(nn.Module):
    """Loss = -KR estimate (minimising it maximises the KR distance the network sees)."""

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return -kr_estimate(y_pred, y_true)


class HingeMarginLoss(nn.Module):
    """Hinge loss relu(min_margin - y f(x)) averaged over samples and (one-vs-all) outputs."""

    def __init__(self, min_margin: float = _common.HKR_MIN_MARGIN):
        super().__init__()
        self.min_margin = _common.check_positive("min_margin", min_margin)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return hinge_margin(y_pred, y_true, self.min_margin)


class HKRLoss(nn.Module):
    """Hinge-regularised KR loss: alpha * hinge(min_margin) - KR.

    Limits: ``alpha=0`` gives ``KRLoss`` exactly; ``alpha=math.inf`` gives ``HingeMarginLoss``
    (the limit of HKR / alpha); when every sample is classified with margin >= min_margin the
    hinge term is 0 and the loss is -KR. With a 1-Lipschitz binary network, |f(x)| is a
    certified L2 radius, and min_margin is the margin the hinge term asks for.

    Args:
        alpha: weight of the hinge term (>= 0, may be ``math.inf``); 10 in deel-lip's tutorial.
        min_margin: margin of the hinge term (> 0).

    >>> loss = HKRLoss(alpha=10.0, min_margin=1.0)
    >>> float(loss(torch.tensor([2.0, -2.0]), torch.tensor([1, -1])))
    -4.0
    """

    def __init__(self, alpha: float = _common.HKR_ALPHA, min_margin: float = _common.HKR_MIN_MARGIN):
        super().__init__()
        self.alpha = _common.check_positive("alpha", alpha, allow_zero=True, allow_inf=True)
        self.min_margin = _common.check_positive("min_margin", min_margin)

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        if math.isinf(self.alpha):
            return hinge_margin(y_pred, y_true, self.min_margin)
        kr = kr_estimate(y_pred, y_true)
        if self.alpha == 0:
            return -kr
        return self.alpha * hinge_margin(y_pred, y_true, self.min_margin) - kr


class TauCrossEntropyLoss(nn.Module):
    """Cross-entropy of tau * logits, divided by tau.

    Lipschitz networks produce logits of bounded scale, so plain cross-entropy saturates at a
    high loss; tau sets how large a margin the loss keeps rewarding (small tau: wide margins,
    closer to a hinge; large tau: ordinary cross-entropy behaviour).
    """

    def __init__(self, tau: float = 1.0):
        super().__init__()
        self.tau = _common.check_positive("tau", tau)

    def forward(self, logits: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.tau * logits, y_true) / self.tau
