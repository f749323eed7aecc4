"""Jacobian regularisation (Hoffman, Roberts & Yaida 2019, "Robust learning with Jacobian
regularization"): penalise the squared Frobenius norm of the input-output Jacobian, estimated
with random projections so that each projection costs one extra backward pass.

For v uniform on the unit sphere of R^C, E[v v^T] = I / C, hence
||J||_F^2 = tr(J^T J) = C * E[||v^T J||^2]: the estimator below is unbiased.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidParameterError
from .. import _common


def jacobian_frobenius_sq(model: nn.Module, x: torch.Tensor, n_projections: int = 1,
                          create_graph: bool = False, outputs: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample unbiased estimate of ||d model(x) / dx||_F^2, shape (N,).

    Args:
        model: maps (N, ...) inputs to (N, C) outputs; samples must not interact (BatchNorm in
            training mode couples them, which adds cross-sample terms to the estimate).
        x: inputs; a leaf with ``requires_grad`` is used as is, else a detached copy is made.
        n_projections: number of random unit directions averaged.
        create_graph: keep the graph so the estimate can be differentiated (training).
        outputs: ``model(x)`` if already computed from this same ``x`` (saves a forward pass).
        generator: torch random generator for the directions.
    """
    n_projections = _common.check_int("n_projections", n_projections, 1)
    if outputs is None or not x.requires_grad:
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        outputs = model(x)
    z = outputs.reshape(outputs.shape[0], -1)
    c = z.shape[1]
    total = torch.zeros(x.shape[0], dtype=z.dtype, device=z.device)
    for i in range(n_projections):
        v = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
        v = F.normalize(v, dim=1)
        (g,) = torch.autograd.grad((v * z).sum(), x, create_graph=create_graph,
                                   retain_graph=create_graph or i < n_projections - 1)
        total = total + g.reshape(g.shape[0], -1).pow(2).sum(1)
    return total * (c / n_projections)


OUTPUTS = ("logits", "probabilities")


class JacobianRegularizer:
    """loss(model(x), y) + coefficient / 2 * mean_i ||J(x_i)||_F^2 (the MATLAB example's form).

    Args:
        model: the network being trained; it returns logits.
        coefficient: weight lambda of the Jacobian term (the tutorial uses 1).
        n_projections: random projections per step (1 suffices in practice).
        outputs: whose Jacobian: "logits" (Hoffman et al.) or "probabilities" (softmax of the
            logits, as in the MATLAB example, whose network ends in a softmax layer).
        criterion: data loss on (logits, labels); cross-entropy by default.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    >>> reg = JacobianRegularizer(net, coefficient=1.0)
    >>> loss = reg(torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,)))
    >>> loss.backward()
    """

    def __init__(self, model: nn.Module, coefficient: float = 1.0, n_projections: int = 1,
                 outputs: str = "logits",
                 criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        if outputs not in OUTPUTS:
            raise InvalidParameterError(f"outputs={outputs!r}; expected one of {OUTPUTS}")
        self.model = model
        self.coefficient = _common.check_positive("coefficient", coefficient, allow_zero=True)
        self.n_projections = _common.check_int("n_projections", n_projections, 1)
        self.outputs = outputs
        self.criterion = criterion or F.cross_entropy

    def penalty(self, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """coefficient / 2 * batch mean of the estimated ||J||_F^2 (differentiable).

        ``logits`` must be ``model(x)`` computed from this same ``x`` (a leaf requiring grad).
        """
        if logits is None or not x.requires_grad:
            x = x.detach().requires_grad_(True)
            logits = self.model(x)
        z = logits.softmax(dim=1) if self.outputs == "probabilities" else logits
        est = jacobian_frobenius_sq(self.model, x, self.n_projections, create_graph=True, outputs=z)
        return 0.5 * self.coefficient * est.mean()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        logits = self.model(x)
        return self.criterion(logits, y) + self.penalty(x, logits)
