"""Gaussian noise augmentation for randomized smoothing (Cohen et al. 2019), optionally with the
consistency regulariser of Jeong & Shin (2020).

The base classifier of a smoothed model must be accurate under N(0, sigma^2 I) noise, so it is
trained on noisy copies: loss = mean over ``copies`` of CE(f(x + sigma * e_i), y), plus
``consistency`` * mean_i KL(p_bar || p_i), where p_i = softmax(f(x + sigma * e_i)) and p_bar their
mean (pulling the copies' predictions together). Noise is not clipped to the input domain: the
smoothed classifier that ``robeval certify --method smoothing`` certifies adds unclipped noise too."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import _common


class GaussianNoiseLoss:
    """loss(x, y) for training a base classifier for smoothing at noise level ``sigma``.

    Args:
        model: the network being trained (logits out).
        sigma: noise standard deviation (train at the sigma you will certify with).
        copies: noisy copies per input (1 is Cohen et al.'s augmentation; the consistency term needs >= 2).
        consistency: weight of the KL consistency term (0: plain augmentation).
        criterion: loss on (logits, labels), mean-reduced; cross-entropy by default.
        generator: a torch.Generator for reproducible noise (None: the global one).

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> GaussianNoiseLoss(net, sigma=0.25, copies=2, consistency=1.0)(torch.rand(8, 1, 2, 2),
    ...                                                               torch.randint(0, 3, (8,))).backward()
    """

    def __init__(self, model: nn.Module, sigma: float = 0.25, copies: int = 1, consistency: float = 0.0,
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 generator: torch.Generator | None = None):
        self.model = model
        self.sigma = _common.check_positive("sigma", sigma)
        self.copies = _common.check_int("copies", copies, 1)
        self.consistency = _common.check_positive("consistency", consistency, allow_zero=True)
        if self.consistency > 0 and self.copies < 2:
            raise _common.InvalidParameterError("the consistency term compares noisy copies: use copies >= 2")
        self.criterion = criterion or F.cross_entropy
        self.generator = generator

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        """(copies * N, ...) noisy inputs, copy-major."""
        rep = x.repeat((self.copies,) + (1,) * (x.dim() - 1))
        noise = torch.randn(rep.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return rep + self.sigma * noise

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(classification loss on the noisy copies, consistency term), both differentiable."""
        logits = self.model(self.noisy(x))
        ce = self.criterion(logits, y.repeat(self.copies))
        if self.consistency == 0:
            return ce, torch.zeros((), device=x.device, dtype=logits.dtype)
        logp = F.log_softmax(logits, dim=1).reshape(self.copies, x.shape[0], -1)
        p_bar = logp.exp().mean(0)
        kl = (p_bar * (torch.log(p_bar.clamp_min(1e-12)) - logp)).sum(-1)  # KL(p_bar || p_i) per copy, sample
        return ce, kl.mean()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce, kl = self.losses(x, y)
        return ce + self.consistency * kl
