"""Lipschitz-bounded PyTorch layers: spectral dense and conv layers, GroupSort activations.

Each layer keeps a free parameter and maps it, on every forward pass in training, to a weight
with spectral norm close to 1 (power iteration, then Björck orthonormalisation, as deel-lip
does). ``export()`` returns the plain ``nn.Linear``/``nn.Conv2d`` with that weight frozen and
``lipschitz_bound()`` a float64 upper bound on the exported layer's L2 Lipschitz constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputShapeError, InvalidParameterError
from .. import _common
from .._common import SpectralConfig


def power_iteration(w: torch.Tensor, u: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate sigma_max(w) for a 2-D ``w`` from the left vector ``u``; returns (sigma, u).

    No gradient flows through the vectors; sigma = u^T w v carries the gradient to ``w``.
    The estimate is a lower bound of sigma_max, so it only normalises; bounds use an SVD.
    """
    with torch.no_grad():
        for _ in range(steps):
            v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
            u = F.normalize(w @ v, dim=0, eps=1e-12)
    sigma = torch.dot(u, w @ v)
    return sigma, u


def bjorck(w: torch.Tensor, iterations: int = 15, beta: float = 0.5) -> torch.Tensor:
    """Björck orthonormalisation: W <- (1 + beta) W - beta W W^T W, ``iterations`` times.

    Each step maps a singular value s to s (1 + beta - beta s^2), whose fixed point is 1, so the
    rows (or columns, whichever are fewer) become orthonormal when ||W||_2 < sqrt(1 + 2/beta)
    to start with. The smaller Gram matrix is used.
    """
    for _ in range(iterations):
        if w.shape[0] <= w.shape[1]:
            w = (1 + beta) * w - beta * (w @ w.t()) @ w
        else:
            w = (1 + beta) * w - beta * w @ (w.t() @ w)
    return w


def orthonormal_weight(w: torch.Tensor, u: torch.Tensor,
                       config: SpectralConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise a 2-D ``w`` by its estimated sigma_max, then orthonormalise it; returns (W, u)."""
    sigma, u = power_iteration(w, u, config.power_iterations)
    w = w / sigma.clamp_min(1e-12)
    return bjorck(w, config.bjorck_iterations, config.bjorck_beta), u


class _SpectralBase(nn.Module):
    """Shared machinery: a free weight, the kept power-iteration vector and an eval-time cache."""

    config: SpectralConfig

    def _init_spectral(self, rows: int, config: SpectralConfig | None) -> None:
        self.config = config or SpectralConfig()
        self.register_buffer("_u", F.normalize(torch.randn(rows), dim=0))
        self._cache: torch.Tensor | None = None

    def train(self, mode: bool = True) -> _SpectralBase:
        self._cache = None  # a training step will change the free weight
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None  # .to(), .double(), ...: recompute on the new device / dtype
        return super()._apply(fn, *args, **kwargs)

    def weight_matrix(self) -> torch.Tensor:
        """The constrained 2-D weight (rows = outputs); cached in eval mode."""
        if not self.training and self._cache is not None:
            return self._cache
        w, u = orthonormal_weight(self.weight.reshape(self.weight.shape[0], -1), self._u, self.config)
        if self.training:
            self._u.copy_(u)
        else:
            self._cache = w.detach()
        return w


class SpectralLinear(_SpectralBase):
    """Dense layer whose weight is orthonormalised (spectral norm 1) at every step.

    Args:
        in_features, out_features: sizes as in ``nn.Linear``.
        bias: add a learned bias (does not change the Lipschitz constant).
        config: power/Björck iteration settings (``SpectralConfig``).

    >>> layer = SpectralLinear(784, 32)
    >>> round(layer.lipschitz_bound(), 3)
    1.0
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: SpectralConfig | None = None):
        super().__init__()
        _common.check_int("in_features", in_features, 1)
        _common.check_int("out_features", out_features, 1)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.orthogonal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._init_spectral(out_features, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_matrix(), self.bias)

    @torch.no_grad()
    def export(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the constrained weight frozen in."""
        was_training = self.training
        self.eval()
        w = self.weight_matrix().clone()
        self.train(was_training)
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight.copy_(w)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def lipschitz_bound(self) -> float:
        """Upper bound on the L2 Lipschitz constant: float64 sigma_max of the exported weight."""
        return _common.spectral_norm(self.export().weight.detach().cpu().numpy())

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}"


class SpectralConv2d(_SpectralBase):
    """2-D convolution with a guaranteed L2 Lipschitz bound of (about) 1.

    The kernel, reshaped to the (C_out, C_in*kh*kw) matrix W_mat, is orthonormalised and divided
    by sqrt(ceil(kh/sh) * ceil(kw/sw)). Why that bounds the operator: every output position is
    W_mat times one input patch, and every input pixel lies in at most ceil(kh/sh)*ceil(kw/sw)
    patches under zero padding, so ||conv(x)|| <= sqrt(overlap) ||W_mat|| ||x||
    (see ``_common.conv_lipschitz_factor``). The bound is safe but loose for 'same' padding:
    deel-lip's corrections for tightness are not used here.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as in ``nn.Conv2d``
            (zero padding only; no dilation or groups).
        config: power/Björck iteration settings.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 bias: bool = True, config: SpectralConfig | None = None):
        super().__init__()
        ks = _pair(kernel_size, "kernel_size")
        st = _pair(stride, "stride")
        if padding == "same" and st != (1, 1):
            raise InvalidParameterError("padding='same' needs stride 1; give an integer padding instead")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = ks, st, padding
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *ks))
        nn.init.orthogonal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.factor = _common.conv_lipschitz_factor(ks, st)
        self._init_spectral(out_channels, config)

    def kernel(self) -> torch.Tensor:
        """The constrained 4-D kernel used by the convolution."""
        return (self.weight_matrix() / self.factor).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputShapeError(
                f"input has shape {tuple(x.shape)}; expected (N, {self.in_channels}, H, W)"
            )
        return F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding)

    @torch.no_grad()
    def export(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the constrained kernel frozen in."""
        was_training = self.training
        self.eval()
        k = self.kernel().clone()
        self.train(was_training)
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                        self.padding, bias=self.bias is not None)
        out.weight.copy_(k)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def lipschitz_bound(self) -> float:
        """sqrt(overlap) * float64 sigma_max of the exported kernel's (C_out, C_in*kh*kw) matrix."""
        k = self.export().weight.detach().cpu().numpy()
        return self.factor * _common.spectral_norm(k.reshape(k.shape[0], -1))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


def _pair(v: int | tuple[int, int], name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and i >= 1 for i in t):
        raise InvalidParameterError(f"{name}={v!r}; expected a positive int or a pair of them")
    return t  # type: ignore[return-value]


class GroupSort(nn.Module):
    """Sort consecutive groups of ``group_size`` features (axis 1) in ascending order.

    A permutation of each group, so it is 1-Lipschitz in L2 and keeps gradient norms
    (Anil et al. 2019). Group size 2 is written with min/max so it exports to ONNX Min/Max.

    >>> GroupSort()(torch.tensor([[3.0, 1.0, -1.0, 2.0]]))
    tensor([[ 1.,  3., -1.,  2.]])
    """

    def __init__(self, group_size: int = 2):
        super().__init__()
        self.group_size = _common.check_int("group_size", group_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, g = x.shape[1], self.group_size
        if c % g:
            raise InputShapeError(
                f"GroupSort(group_size={g}) got {c} features on axis 1; use a width divisible by {g}"
            )
        shape = (x.shape[0], c // g, g, *x.shape[2:])
        grouped = x.reshape(shape)
        if g == 2:
            a, b = grouped[:, :, 0], grouped[:, :, 1]
            out = torch.stack((torch.minimum(a, b), torch.maximum(a, b)), dim=2)
        else:
            out = grouped.sort(dim=2).values
        return out.reshape(x.shape)

    def export(self) -> GroupSort:
        return GroupSort(self.group_size)

    def lipschitz_bound(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MaxMin(GroupSort):
    """GroupSort with groups of 2: each pair becomes (min, max)."""

    def __init__(self) -> None:
        super().__init__(2)

    def export(self) -> GroupSort:
        return GroupSort(2)

    def extra_repr(self) -> str:
        return ""


_ONE_LIPSCHITZ = (nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout, nn.Tanh)


def export_model(model: nn.Module) -> nn.Sequential:
    """Replace every robeval training layer of a ``nn.Sequential`` by its plain export.

    Plain layers are deep-copied; a layer whose ``export()`` returns a Sequential is spliced in.
    """
    import copy

    if not isinstance(model, nn.Sequential):
        if hasattr(model, "export"):
            out = model.export()
            return out if isinstance(out, nn.Sequential) else nn.Sequential(out)
        raise InvalidParameterError(
            f"export_model needs an nn.Sequential or a layer with export(), got {type(model).__name__}"
        )
    layers: list[nn.Module] = []
    for layer in model:
        new = layer.export() if hasattr(layer, "export") else copy.deepcopy(layer)
        layers.extend(new if isinstance(new, nn.Sequential) else [new])
    return nn.Sequential(*layers).eval()


def lipschitz_bound(model: nn.Module) -> float:
    """Product of per-layer L2 bounds of a ``nn.Sequential`` (robeval layers and 1-Lipschitz ones).

    Plain ``nn.Linear`` layers count with their float64 spectral norm; any other layer without
    a ``lipschitz_bound()`` raises, naming it.
    """
    if hasattr(model, "lipschitz_bound") and not isinstance(model, nn.Sequential):
        return float(model.lipschitz_bound())
    bound = 1.0
    for i, layer in enumerate(model):
        if hasattr(layer, "lipschitz_bound"):
            bound *= float(layer.lipschitz_bound())
        elif isinstance(layer, nn.Linear):
            bound *= _common.spectral_norm(layer.weight.detach().cpu().numpy())
        elif isinstance(layer, nn.LeakyReLU):  # a slope of any sign: Lipschitz max(1, |slope|)
            bound *= max(1.0, abs(float(layer.negative_slope)))
        elif isinstance(layer, _ONE_LIPSCHITZ):
            continue
        else:
            raise InvalidParameterError(
                f"layer {i} ({type(layer).__name__}) has no lipschitz_bound(); use robeval's "
                "Lipschitz layers (SpectralLinear, SpectralConv2d, GroupSort, SandwichLayer)"
            )
    return bound
