"""Sandwich layers and LBDN networks (Wang & Manchester 2023, "Direct parameterisation of
Lipschitz-bounded deep networks").

A sandwich layer computes h -> sqrt(2) A^T Psi relu(sqrt(2) Psi^-1 B h + b) where [A B] has
orthonormal rows by construction (Cayley transform of a free matrix) and Psi is a positive
diagonal. Its Jacobian is 2 A^T D B with D diagonal in [0, 1], whose norm is at most 1
(proof in ``_common.sandwich_bound``), so every parameter value gives a 1-Lipschitz layer:
no projection step, no penalty. An LBDN scales its input and its output by sqrt(gamma) around
1-Lipschitz layers, so the network is gamma-Lipschitz.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InvalidParameterError
from .. import _common


def cayley(x: torch.Tensor) -> torch.Tensor:
    """Map a free (n, n + m) matrix to Q = [A B] (A: n x n, B: n x m) with Q Q^T = I.

    With X^T = [U; V] (U: n x n, V: m x n), Z = U - U^T + V^T V has a positive semi-definite
    symmetric part, so I + Z is invertible, and the stacked matrix
    [(I + Z)^-1 (I - Z); -2 V (I + Z)^-1] has orthonormal columns; Q is its transpose.
    """
    n = x.shape[0]
    u, v = x[:, :n].t(), x[:, n:].t()
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    z = u - u.t() + v.t() @ v
    inv = torch.linalg.inv(eye + z)
    top = inv @ (eye - z)                # (n, n)
    bottom = -2.0 * v @ inv              # (m, n)
    return torch.cat((top, bottom), dim=0).t()


class _CayleyBase(nn.Module):
    """A free (out, out + in) matrix with a learnt scale alpha, mapped by ``cayley``."""

    def _init_cayley(self, in_features: int, out_features: int) -> None:
        _common.check_int("in_features", in_features, 1)
        _common.check_int("out_features", out_features, 1)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features + out_features))
        nn.init.xavier_normal_(self.weight)
        # alpha scales the normalised weight (weight normalisation), as in the authors' code
        self.alpha = nn.Parameter(self.weight.detach().norm().reshape(1).clone())

    def q_matrix(self) -> torch.Tensor:
        """Q = [A B] of shape (out, out + in) with orthonormal rows."""
        return cayley(self.alpha * self.weight / self.weight.norm())

    def _q_numpy(self):
        with torch.no_grad():
            return self.q_matrix().cpu().double().numpy()


class SandwichLayer(_CayleyBase):
    """One 1-Lipschitz sandwich layer with a ReLU inside (maps ``in_features`` to ``out_features``).

    Args:
        in_features, out_features: sizes.
        scale: factor applied to the input (sqrt(gamma) for the first layer of an LBDN).

    ``export()`` returns ``nn.Sequential(Linear(W1, b), ReLU(), Linear(W2, no bias))`` with
    W1 = scale * sqrt(2) Psi^-1 B and W2 = sqrt(2) A^T Psi.
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0):
        super().__init__()
        self._init_cayley(in_features, out_features)
        self.scale = _common.check_positive("scale", scale)
        self.psi = nn.Parameter(torch.zeros(out_features))
        self.bias = nn.Parameter(torch.empty(out_features).uniform_(-0.1, 0.1))

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.q_matrix()
        n = self.out_features
        a, b = q[:, :n], q[:, n:]
        w1 = (self.scale * 2**0.5) * torch.exp(-self.psi)[:, None] * b
        w2 = 2**0.5 * a.t() * torch.exp(self.psi)[None, :]
        return w1, w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self._weights()
        return F.linear(F.relu(F.linear(x, w1, self.bias)), w2)

    @torch.no_grad()
    def export(self) -> nn.Sequential:
        w1, w2 = self._weights()
        first = nn.Linear(self.in_features, self.out_features)
        first.weight.copy_(w1)
        first.bias.copy_(self.bias)
        second = nn.Linear(self.out_features, self.out_features, bias=False)
        second.weight.copy_(w2)
        return nn.Sequential(first, nn.ReLU(), second)

    def lipschitz_bound(self) -> float:
        """scale * ||Q||^2 (= scale up to rounding); see ``_common.sandwich_bound``."""
        return self.scale * _common.sandwich_bound(self._q_numpy())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}"


class SandwichLinear(_CayleyBase):
    """Affine output layer y = scale * B h + b with ||B||_2 <= 1 (B from the Cayley transform)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, bias: bool = True):
        super().__init__()
        self._init_cayley(in_features, out_features)
        self.scale = _common.check_positive("scale", scale)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def matrix(self) -> torch.Tensor:
        return self.scale * self.q_matrix()[:, self.out_features:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix(), self.bias)

    @torch.no_grad()
    def export(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight.copy_(self.matrix())
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def lipschitz_bound(self) -> float:
        return _common.spectral_norm(self.export().weight.detach().cpu().double().numpy())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale:g}"


class LBDN(nn.Module):
    """Lipschitz-bounded MLP: sqrt(gamma) * input -> sandwich layers -> sqrt(gamma) * B h + b.

    Args:
        in_features: input size (inputs with more axes are flattened).
        hidden: widths of the sandwich layers, e.g. (64, 64).
        out_features: number of outputs (logits).
        gamma: L2 Lipschitz bound of the whole network.

    >>> net = LBDN(784, (64, 64), 10, gamma=5.0)
    >>> net.lipschitz_bound() <= 5.0 * (1 + 1e-4)
    True
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, gamma: float = 1.0):
        super().__init__()
        hidden = [_common.check_int("hidden width", h, 1) for h in hidden]
        if not hidden:
            raise InvalidParameterError("hidden=(); give at least one hidden width, e.g. (64, 64)")
        self.gamma = _common.check_positive("gamma", gamma)
        s = _common.lbdn_scale(gamma)
        sizes = [in_features, *hidden]
        self.layers = nn.ModuleList(
            SandwichLayer(sizes[i], sizes[i + 1], scale=s if i == 0 else 1.0) for i in range(len(hidden))
        )
        self.output = SandwichLinear(hidden[-1], out_features, scale=s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.layers:
            h = layer(h)
        return self.output(h)

    @torch.no_grad()
    def export(self, merge: bool = True) -> nn.Sequential:
        """Plain ``Flatten, Linear, ReLU, ...`` network computing the same function.

        With ``merge=True`` the bias-free Linear ending one sandwich layer is multiplied into the
        Linear starting the next, so a 784-64-64-10 LBDN exports to a plain 784-64-64-10 MLP.
        """
        mods: list[nn.Module] = [nn.Flatten()]
        for layer in self.layers:
            mods.extend(layer.export())
        mods.append(self.output.export())
        if merge:
            mods = _merge_linears(mods)
        return nn.Sequential(*mods).eval()

    def lipschitz_bound(self) -> float:
        """Product of the layer bounds: gamma up to rounding."""
        bound = 1.0
        for layer in self.layers:
            bound *= layer.lipschitz_bound()
        return bound * self.output.lipschitz_bound()


def _merge_linears(mods: list[nn.Module]) -> list[nn.Module]:
    """Fuse each bias-free Linear with the Linear that follows it: W2 (W1 x) + b2."""
    out: list[nn.Module] = []
    for m in mods:
        prev = out[-1] if out else None
        if isinstance(m, nn.Linear) and isinstance(prev, nn.Linear) and prev.bias is None:
            fused = nn.Linear(prev.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                fused.weight.copy_(m.weight.double().matmul(prev.weight.double()).float())
                if m.bias is not None:
                    fused.bias.copy_(m.bias)
            out[-1] = fused
        else:
            out.append(m)
    return out
