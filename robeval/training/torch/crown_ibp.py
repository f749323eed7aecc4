"""CROWN-IBP for certified training (Zhang et al. 2020): IBP bounds for every ReLU's input, then one
backward pass of linear bounds from the margin specification to the input box.

The margin rows W_y - W_j of the last ``nn.Linear`` start the backward pass, as in the certifier.
Each affine layer maps the coefficients through its transpose (its vector-Jacobian product); each
ReLU uses CROWN's adaptive relaxation on its IBP pre-activation bounds [l, u]: the chord
u (x - l) / (u - l) above, and below the line x if u > -l, else 0 (stable neurons are exact). The
relaxation's slopes depend on l and u, so gradients reach the weights through them as well; the
choice of the lower slope is a step function and passes none. These are the rules of robeval's
``crown-ibp`` certifier, so the bound trained on equals the certifier's on the exported model.

Cost: the coefficients have shape (N, K, *layer shape), K times an IBP pass, one matrix product
per affine layer (plus, for convolutions and pooling, one autograd pass over N * K inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputShapeError, InvalidParameterError
from .ibp import _rule, _split_last_linear, input_box
from .layers import SpectralConv2d, SpectralLinear

#: Layers that CROWN-IBP passes through as affine maps (their IBP rule is linear in the box).
AFFINE = (nn.Linear, SpectralLinear, nn.Conv2d, SpectralConv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
          nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)


def _kind(layer: nn.Module, index: int) -> str:
    _rule(layer, index)  # unsupported by IBP: the same error as IBP training gives
    if isinstance(layer, nn.ReLU):
        return "relu"
    if isinstance(layer, AFFINE):
        return "affine"
    raise InvalidParameterError(
        f"layer {index} ({type(layer).__name__}) has no linear relaxation in CROWN-IBP training, which "
        "supports ReLU between affine layers (Linear, Conv2d, BatchNorm, AvgPool, Flatten); train this "
        "model with bound='ibp'"
    )


def _matrix(layer: nn.Module) -> torch.Tensor:
    return layer.weight_matrix() if isinstance(layer, SpectralLinear) else layer.weight


def _affine_back(layer: nn.Module, lam: torch.Tensor, in_shape: tuple[int, ...]):
    """(L^T lam, lam . b) for the affine layer z -> L z + b; lam is (N, K, *out_shape)."""
    n, k = lam.shape[:2]
    if isinstance(layer, (nn.Linear, SpectralLinear)):
        w = _matrix(layer)
        const = lam @ layer.bias if layer.bias is not None else None
        return lam @ w, const
    if isinstance(layer, (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)):
        return lam.reshape(n, k, *in_shape), None
    # any other affine layer: its transpose is the gradient of <lam, L z> with respect to z (taken
    # under no_grad too, as in certified_accuracy; the graph is kept only where gradients are on)
    offset = layer(torch.zeros((1,) + in_shape, dtype=lam.dtype, device=lam.device))
    flat = lam.reshape((n * k,) + tuple(lam.shape[2:]))
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        zero = torch.zeros((n * k,) + in_shape, dtype=lam.dtype, device=lam.device, requires_grad=True)
        (grad,) = torch.autograd.grad(layer(zero), zero, grad_outputs=flat, create_graph=keep_graph)
    const = (lam * offset[0]).flatten(2).sum(-1)
    return grad.reshape((n, k) + in_shape), const


def _relu_back(lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Coefficients and constant after CROWN's ReLU relaxation on [lo, hi] (per sample)."""
    unstable = (lo < 0) & (hi > 0)
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))
    active = (lo >= 0).to(lo.dtype)
    up_slope = torch.where(unstable, hi / width, active)
    up_icpt = torch.where(unstable, -hi * lo / width, torch.zeros_like(hi))
    low_slope = torch.where(unstable, (hi > -lo).to(lo.dtype), active)
    pos, neg = lam.clamp(min=0), lam.clamp(max=0)
    coeff = pos * low_slope[:, None] + neg * up_slope[:, None]
    const = (neg * up_icpt[:, None]).flatten(2).sum(-1)
    return coeff, const


def _both_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                 clip: tuple[float, float] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(IBP, CROWN-IBP) lower bounds of z_y - z_j, each (N, K) with +inf at the true class."""
    body, last = _split_last_linear(model)
    kinds = [_kind(layer, i) for i, layer in enumerate(body)]
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputShapeError(f"labels have shape {tuple(y.shape)}; expected ({x.shape[0]},) class indices")
    c0, r0 = input_box(x, eps, clip)
    c, r = c0, r0
    boxes, shapes = [], []
    for i, (layer, kind) in enumerate(zip(body, kinds)):
        boxes.append((c - r, c + r) if kind == "relu" else None)
        shapes.append(tuple(c.shape[1:]))
        try:
            c, r = _rule(layer, i)(layer, c, r)
        except RuntimeError as e:
            raise InputShapeError(f"layer {i} ({type(layer).__name__}) on input shape {tuple(c.shape)}: {e}") from e
    w = _matrix(last)
    spec = w[y][:, None, :] - w[None, :, :]                     # (N, K, H): rows W_y - W_j
    const = torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device)
    if last.bias is not None:
        const = const + (last.bias[y][:, None] - last.bias[None, :])
    ibp = const + torch.einsum("nkh,nh->nk", spec, c.flatten(1)) - torch.einsum("nkh,nh->nk", spec.abs(), r.flatten(1))
    lam = spec.reshape(spec.shape[:2] + tuple(c.shape[1:]))
    for layer, kind, box, shape in zip(reversed(body), reversed(kinds), reversed(boxes), reversed(shapes)):
        if kind == "relu":
            lam, added = _relu_back(lam, *box)
        else:
            lam, added = _affine_back(layer, lam, shape)
        if added is not None:
            const = const + added
    flat = lam.flatten(2)
    crown = (const + torch.einsum("nkd,nd->nk", flat, c0.flatten(1))
             - torch.einsum("nkd,nd->nk", flat.abs(), r0.flatten(1)))
    true = F.one_hot(y, ibp.shape[1]).bool()
    return ibp.masked_fill(true, math.inf), crown.masked_fill(true, math.inf)


def crown_ibp_margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                            clip: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """CROWN-IBP lower bounds of z_y - z_j over the eps-box, shape (N, K), +inf at the true class.

    ``model`` is an ``nn.Sequential`` of affine layers and ReLUs ending in ``nn.Linear``.
    Differentiable with respect to the weights. Equal to ``robeval certify --method crown-ibp``.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> crown_ibp_margin_bounds(net, torch.rand(2, 1, 2, 2), torch.tensor([0, 2]), 0.01).shape
    torch.Size([2, 3])
    """
    return _both_bounds(model, x, y, eps, clip)[1]


def mixed_margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, beta: float,
                        clip: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """beta * CROWN-IBP + (1 - beta) * IBP lower bounds (Zhang et al. 2020, eq. 9); sound for beta in [0, 1].

    A convex combination of two lower bounds is a lower bound. The paper moves beta from 1 to 0
    while eps ramps up: the tighter CROWN-IBP bound steadies early training, and the network ends
    up tuned to the IBP bound.
    """
    if not 0.0 <= beta <= 1.0:
        raise InvalidParameterError(f"beta={beta!r}; expected a weight in [0, 1]")
    ibp, crown = _both_bounds(model, x, y, eps, clip)
    if beta == 1.0:
        return crown
    true = torch.isinf(ibp)
    mixed = beta * crown.masked_fill(true, 0.0) + (1.0 - beta) * ibp.masked_fill(true, 0.0)
    return mixed.masked_fill(true, math.inf)
