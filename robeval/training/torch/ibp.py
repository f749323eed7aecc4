"""Interval bound propagation (IBP) for certified training (Gowal et al. 2018; Shi et al. 2021).

Bounds travel as centre and radius through an ``nn.Sequential``, with autograd through them, so
a robust loss on the bounds trains the network. The last ``nn.Linear`` is folded into the margin
specification: for label y the rows W_y - W_j give z_y - z_j directly, which is tighter than
subtracting independent bounds of the logits (lower(z_y) - upper(z_j)).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputShapeError, InvalidParameterError
from .. import _common
from .._common import EpsilonSchedule, KappaSchedule
from .layers import GroupSort, SpectralConv2d, SpectralLinear

Box = tuple[torch.Tensor, torch.Tensor]  # (centre, radius)


def _linear(m: nn.Linear, c: torch.Tensor, r: torch.Tensor) -> Box:
    return F.linear(c, m.weight, m.bias), F.linear(r, m.weight.abs())


def _spectral_linear(m: SpectralLinear, c: torch.Tensor, r: torch.Tensor) -> Box:
    w = m.weight_matrix()
    return F.linear(c, w, m.bias), F.linear(r, w.abs())


def _conv_with(weight: torch.Tensor, m: nn.Module, c: torch.Tensor, r: torch.Tensor) -> Box:
    kw = dict(stride=m.stride, padding=m.padding)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise InvalidParameterError(f"Conv2d padding_mode={m.padding_mode!r}; IBP supports 'zeros' only")
        kw.update(dilation=m.dilation, groups=m.groups)
    return F.conv2d(c, weight, m.bias, **kw), F.conv2d(r, weight.abs(), None, **kw)


def _conv(m: nn.Conv2d, c: torch.Tensor, r: torch.Tensor) -> Box:
    return _conv_with(m.weight, m, c, r)


def _spectral_conv(m: SpectralConv2d, c: torch.Tensor, r: torch.Tensor) -> Box:
    return _conv_with(m.kernel(), m, c, r)


def _batchnorm(m: nn.modules.batchnorm._BatchNorm, c: torch.Tensor, r: torch.Tensor) -> Box:
    if m.training or m.running_var is None:
        raise InvalidParameterError(
            f"{type(m).__name__} in training mode (or without running statistics) has no fixed affine "
            "map to bound; call model.eval() on BatchNorm layers (or leave them out) for IBP"
        )
    scale = m.running_var.add(m.eps).rsqrt()
    if m.weight is not None:
        scale = scale * m.weight
    shape = (1, -1) + (1,) * (c.dim() - 2)
    centre = F.batch_norm(c, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    return centre, r * scale.abs().reshape(shape)


def _avgpool(m: nn.Module, c: torch.Tensor, r: torch.Tensor) -> Box:
    return m(c), m(r)  # a linear map with non-negative weights


def _reshape(m: nn.Module, c: torch.Tensor, r: torch.Tensor) -> Box:
    return m(c), m(r)


def _monotone(m: nn.Module, c: torch.Tensor, r: torch.Tensor) -> Box:
    """Elementwise non-decreasing maps (ReLU, pooling maxima, sorted groups): bounds map to bounds."""
    lo, hi = m(c - r), m(c + r)
    return (hi + lo) / 2, (hi - lo) / 2


def _identity_in_eval(m: nn.Module, c: torch.Tensor, r: torch.Tensor) -> Box:
    if m.training:
        raise InvalidParameterError(f"{type(m).__name__} in training mode is random; call model.eval() first")
    return c, r


RULES: dict[type, Callable[[nn.Module, torch.Tensor, torch.Tensor], Box]] = {
    nn.Linear: _linear,
    SpectralLinear: _spectral_linear,
    nn.Conv2d: _conv,
    SpectralConv2d: _spectral_conv,
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.AvgPool2d: _avgpool,
    nn.AdaptiveAvgPool2d: _avgpool,
    nn.Flatten: _reshape,
    nn.Unflatten: _reshape,
    nn.ReLU: _monotone,
    nn.MaxPool2d: _monotone,
    nn.Sigmoid: _monotone,
    nn.Tanh: _monotone,
    GroupSort: _monotone,
    nn.Identity: _reshape,
    nn.Dropout: _identity_in_eval,
}


def _rule(layer: nn.Module, index: int):
    for cls in type(layer).__mro__:
        if cls in RULES:
            return RULES[cls]
    raise InvalidParameterError(
        f"layer {index} ({type(layer).__name__}) has no IBP rule; supported: "
        + ", ".join(sorted(c.__name__ for c in RULES))
    )


def _layers(model: nn.Module) -> list[nn.Module]:
    if not isinstance(model, nn.Sequential):
        raise InvalidParameterError(
            f"IBP needs an nn.Sequential, got {type(model).__name__}; wrap the layers in nn.Sequential"
        )
    layers = list(model)
    for i, layer in enumerate(layers):
        _rule(layer, i)  # report an unsupported layer before any work
    return layers


def input_box(x: torch.Tensor, eps: float, clip: tuple[float, float] | None = (0.0, 1.0)) -> Box:
    """Centre and radius of the L-inf ball of radius eps around x, intersected with ``clip``."""
    _common.check_positive("eps", eps, allow_zero=True)
    lo, hi = x - eps, x + eps
    if clip is not None:
        lo, hi = lo.clamp(*clip), hi.clamp(*clip)
    return (hi + lo) / 2, (hi - lo) / 2


def propagate(layers: list[nn.Module], centre: torch.Tensor, radius: torch.Tensor) -> Box:
    """Push a box (centre, radius) through ``layers`` in order."""
    for i, layer in enumerate(layers):
        try:
            centre, radius = _rule(layer, i)(layer, centre, radius)
        except RuntimeError as e:
            raise InputShapeError(
                f"layer {i} ({type(layer).__name__}) on input shape {tuple(centre.shape)}: {e}"
            ) from e
    return centre, radius


def interval_bounds(model: nn.Module, x: torch.Tensor, eps: float,
                    clip: tuple[float, float] | None = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) bounds of ``model`` on the L-inf ball of radius eps around x (clipped)."""
    c, r = propagate(_layers(model), *input_box(x, eps, clip))
    return c - r, c + r


def _split_last_linear(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    layers = _layers(model)
    while layers and isinstance(layers[-1], (nn.Identity, nn.Dropout)):
        layers.pop()
    if not layers or not isinstance(layers[-1], (nn.Linear, SpectralLinear)):
        raise InvalidParameterError(
            "the margin specification is folded into the last layer, which must be nn.Linear (or "
            f"SpectralLinear); this model ends with {type(layers[-1]).__name__ if layers else 'nothing'}"
        )
    return layers[:-1], layers[-1]


def ibp_margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                      clip: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """Lower bounds of z_y - z_j over the eps-box, shape (N, K), +inf at the true class.

    The last Linear is applied to the box as the K rows W_y - W_j (biases b_y - b_j), so the
    margins are bounded as affine functions of the penultimate box: a positive row j
    certifies that class j cannot overtake y. Differentiable with respect to the weights.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> ibp_margin_bounds(net, torch.rand(2, 1, 2, 2), torch.tensor([0, 2]), 0.01).shape
    torch.Size([2, 3])
    """
    body, last = _split_last_linear(model)
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputShapeError(f"labels have shape {tuple(y.shape)}; expected ({x.shape[0]},) class indices")
    c, r = propagate(body, *input_box(x, eps, clip))
    w = last.weight_matrix() if isinstance(last, SpectralLinear) else last.weight
    diff = w[y][:, None, :] - w[None, :, :]                     # (N, K, H): rows W_y - W_j
    centre = torch.einsum("nkh,nh->nk", diff, c.flatten(1))
    if last.bias is not None:
        centre = centre + (last.bias[y][:, None] - last.bias[None, :])
    lower = centre - torch.einsum("nkh,nh->nk", diff.abs(), r.flatten(1))
    true = F.one_hot(y, lower.shape[1]).bool()
    return lower.masked_fill(true, math.inf)


def robust_cross_entropy(margin_lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the worst-case logits -margin_lower (0 for the true class).

    It upper-bounds the cross-entropy of every input in the box, since softmax cross-entropy
    depends on the logits only through the differences z_j - z_y <= -margin_lower_j.
    """
    true = F.one_hot(y, margin_lower.shape[1]).bool()
    worst = (-margin_lower).masked_fill(true, 0.0)
    return F.cross_entropy(worst, y)


def certified_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                       clip: tuple[float, float] | None = (0.0, 1.0), batch_size: int = 1000,
                       bound: str = "ibp") -> float:
    """Fraction of samples whose margin lower bounds (``bound``: "ibp" or "crown-ibp") are all positive."""
    if _common.check_bound(bound) == "ibp":
        margins = ibp_margin_bounds
    else:
        from .crown_ibp import crown_ibp_margin_bounds as margins
    hits = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            lb = margins(model, x[i:i + batch_size], y[i:i + batch_size], eps, clip)
            hits += int((lb > 0).all(dim=1).sum())
    return hits / max(x.shape[0], 1)


class IBPLoss:
    """kappa(t) * CE(clean) + (1 - kappa(t)) * robust CE at radius eps(t); t in epochs.

    Args:
        eps: a fixed radius or an ``EpsilonSchedule`` (warm-up at 0, then a ramp).
        kappa: a fixed weight or a ``KappaSchedule`` (1 -> 0.5 in Gowal et al.).
        clip: input domain the box is clipped to.
        bound: ``"ibp"`` (interval bounds) or ``"crown-ibp"`` (Zhang et al. 2020: the mixture
            beta * CROWN-IBP + (1 - beta) * IBP of the margin lower bounds; ReLU networks).
        beta: weight of CROWN-IBP when ``bound="crown-ibp"``, fixed or a ``KappaSchedule``
            (the paper's choice: ``KappaSchedule(start=1, end=0)`` over the eps ramp).

    During warm-up (eps = 0) the robust term equals the clean one, so only the clean
    cross-entropy is computed.
    """

    def __init__(self, eps: float | EpsilonSchedule, kappa: float | KappaSchedule = 0.5,
                 clip: tuple[float, float] | None = (0.0, 1.0), bound: str = "ibp",
                 beta: float | KappaSchedule = 1.0):
        self.eps = eps if callable(eps) else EpsilonSchedule(target=_common.check_positive("eps", eps, True))
        self.kappa = _common.weight_schedule("kappa", kappa)
        self.bound = _common.check_bound(bound)
        self.beta = _common.weight_schedule("beta", beta)
        self.clip = clip

    def margin_lower(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                     t: float = math.inf) -> torch.Tensor:
        """The margin lower bounds this loss trains on at radius eps and time t."""
        if self.bound == "ibp":
            return ibp_margin_bounds(model, x, y, eps, self.clip)
        from .crown_ibp import mixed_margin_bounds

        return mixed_margin_bounds(model, x, y, eps, float(self.beta(t)), self.clip)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 t: float = math.inf) -> torch.Tensor:
        eps, kappa = float(self.eps(t)), float(self.kappa(t))
        clean = F.cross_entropy(model(x), y)
        if eps == 0 or kappa == 1:
            return clean
        robust = robust_cross_entropy(self.margin_lower(model, x, y, eps, t), y)
        return kappa * clean + (1 - kappa) * robust


def ibp_init_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """IBP initialisation (Shi et al. 2021): weights ~ N(0, 2 pi / fan_in^2), last layer kept.

    Every ``nn.Linear`` and ``nn.Conv2d`` except the last one met in ``model.modules()`` is
    re-drawn (biases unchanged); see ``_common.ibp_init_std`` for why this keeps interval
    widths from growing with the layer width. Returns ``model``.
    """
    affine = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for m in affine[:-1]:
            fan_in = m.weight[0].numel()
            m.weight.normal_(0.0, _common.ibp_init_std(fan_in), generator=generator)
    return model
