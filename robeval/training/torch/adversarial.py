"""Adversarial regularisation (Goodfellow et al. 2015; the form of Neural Structured Learning):
loss(x) + multiplier * loss(x_adv), where x_adv is a gradient-sign (FGSM) or projected-gradient
(PGD) perturbation of x found against the model being trained, treated as a constant input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidParameterError
from .. import _common

NORMS = ("linf", "l2")
METHODS = ("fgsm", "pgd")


def _step_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    flat = grad.reshape(grad.shape[0], -1)
    return (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(grad.shape)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.reshape(delta.shape[0], -1)
    factor = (eps / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    return (flat * factor).reshape(delta.shape)


class AdversarialRegularizer:
    """Adds ``multiplier`` times the loss on adversarial neighbours to the clean loss.

    Args:
        model: network being trained (its mode is left as it is while perturbing).
        multiplier: weight of the adversarial loss (0.2 in the NSL tutorial).
        eps: perturbation size: the FGSM step, or the PGD radius.
        norm: "linf" (gradient sign) or "l2" (normalised gradient).
        method: "fgsm" (one step of size eps) or "pgd" (``steps`` projected steps).
        steps, step_size: PGD settings; step_size defaults to 2.5 * eps / steps.
        clip: (low, high) box the perturbed inputs are clipped to, or None.
        criterion: loss on (logits, labels), mean-reduced; cross-entropy by default.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> reg = AdversarialRegularizer(net, multiplier=0.2, eps=0.2)
    >>> reg(torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))).backward()
    """

    def __init__(self, model: nn.Module, multiplier: float = 0.2, eps: float = 0.2, norm: str = "linf",
                 method: str = "fgsm", steps: int = 10, step_size: float | None = None,
                 clip: tuple[float, float] | None = (0.0, 1.0),
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        if norm not in NORMS:
            raise InvalidParameterError(f"norm={norm!r}; expected one of {NORMS}")
        if method not in METHODS:
            raise InvalidParameterError(f"method={method!r}; expected one of {METHODS}")
        if clip is not None and not clip[0] < clip[1]:
            raise InvalidParameterError(f"clip={clip!r}; expected (low, high) with low < high, or None")
        self.model = model
        self.multiplier = _common.check_positive("multiplier", multiplier, allow_zero=True)
        self.eps = _common.check_positive("eps", eps, allow_zero=True)
        self.norm, self.method, self.clip = norm, method, clip
        self.steps = _common.check_int("steps", steps, 1)
        self.step_size = (_common.check_positive("step_size", step_size) if step_size is not None
                          else 2.5 * self.eps / self.steps)
        self.criterion = criterion or F.cross_entropy

    def _clip(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip is None else x.clamp(*self.clip)

    def _grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.criterion(self.model(x), y), x)
        return g

    def perturb(self, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial inputs (no gradient attached); ``grad`` is d loss / d x at x if known."""
        x = x.detach()
        if self.eps == 0:
            return x.clone()
        if self.method == "fgsm":
            g = self._grad(x, y) if grad is None else grad
            return self._clip(x + self.eps * _step_direction(g, self.norm)).detach()
        adv = x.clone()
        for _ in range(self.steps):
            adv = adv + self.step_size * _step_direction(self._grad(adv, y), self.norm)
            adv = self._clip(x + _project(adv - x, self.eps, self.norm)).detach()
        return adv

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean loss, adversarial loss), both differentiable with respect to the model."""
        x = x.detach().requires_grad_(self.method == "fgsm")
        clean = self.criterion(self.model(x), y)
        grad = None
        if self.method == "fgsm" and self.eps > 0:
            (grad,) = torch.autograd.grad(clean, x, retain_graph=True)
        adv = self.perturb(x, y, grad)
        return clean, self.criterion(self.model(adv), y)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        clean, adv = self.losses(x, y)
        return clean + self.multiplier * adv
