"""Op registry: each op keeps its forward, vector-Jacobian product, interval, relaxation and
Lipschitz rules side by side in one stateless class; weights live on the Node, never on the op."""

from __future__ import annotations

from typing import Any

from ..backend import gamma
from ..errors import RobevalError, UnsupportedRuleError

OPS: dict[str, Op] = {}

#: Rules a certifier may need; `Op.supports(rule)` tells whether an op implements one.
RULES = ("forward", "vjp", "interval", "relax", "lipschitz")


def register(name: str):
    """Class decorator: register one instance of an Op subclass under ``name``."""

    def wrap(cls):
        if name in OPS:
            raise RobevalError(f"op '{name}' is registered twice ({OPS[name].__class__.__name__} and {cls.__name__})")
        cls.name = name
        OPS[name] = cls()
        return cls

    return wrap


def get_op(name: str) -> Op:
    """The registered op called ``name``; raises KeyError with the known names otherwise."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"no op '{name}' is registered; known ops: {', '.join(sorted(OPS))}") from None


def widen(xp: Any, lo: Any, hi: Any, rel: float) -> tuple[Any, Any]:
    """Push [lo, hi] outwards by ``rel`` relative (plus the smallest normal number) to absorb rounding."""
    tiny = float(xp.finfo(lo.dtype).tiny)
    return lo - (rel * xp.abs(lo) + tiny), hi + (rel * xp.abs(hi) + tiny)


class Op:
    """Base op. Subclasses override the rules they support; a missing rule raises UnsupportedRuleError."""

    name = "op"
    affine = False  # True when the op is affine in its inputs (CROWN back-substitutes through vjp)

    def forward(self, xp, node, *xs):
        raise UnsupportedRuleError(self.name, "forward", node.name)

    def vjp(self, xp, node, xs, g):
        """Gradients w.r.t. each input given the output cotangent g (same leading batch as xs)."""
        raise UnsupportedRuleError(self.name, "vjp", node.name)

    def interval(self, xp, node, *bounds):
        """Sound elementwise bounds (lo, hi) of the output given a (lo, hi) pair per input."""
        raise UnsupportedRuleError(self.name, "interval", node.name)

    def relax(self, xp, node, lo, hi):
        """Linear bounds a_l x + b_l <= f(x) <= a_u x + b_u on [lo, hi] (elementwise ops only)."""
        raise UnsupportedRuleError(self.name, "relax", node.name)

    def lipschitz(self, node, in_lips, in_shapes):
        """Upper bound of the L2 Lipschitz constant of the output w.r.t. the network input,
        given such bounds ``in_lips`` for the inputs and their per-sample shapes."""
        raise UnsupportedRuleError(self.name, "lipschitz", node.name)

    def supports(self, rule: str) -> bool:
        """Whether this op implements ``rule`` (overrides the base-class stub)."""
        if rule == "relax" and self.affine:
            return True  # affine ops need no relaxation: CROWN uses their vjp
        return getattr(type(self), rule) is not getattr(Op, rule)


class MonotoneOp(Op):
    """An op non-decreasing in every input: interval = (forward(lo), forward(hi)), widened by
    ``ulps`` units of roundoff when the forward itself rounds (transcendental functions)."""

    ulps = 0.0

    def interval(self, xp, node, *bounds):
        lo = self.forward(xp, node, *(b[0] for b in bounds))
        hi = self.forward(xp, node, *(b[1] for b in bounds))
        if self.ulps:
            lo, hi = widen(xp, lo, hi, self.ulps * float(xp.finfo(lo.dtype).eps))
        return lo, hi


class ElementwiseOp(MonotoneOp):
    """A single-input elementwise monotone op with a slope bound (its Lipschitz constant)."""

    def slope_bound(self, node) -> float:
        raise UnsupportedRuleError(self.name, "lipschitz", node.name)

    def lipschitz(self, node, in_lips, in_shapes):
        return self.slope_bound(node) * in_lips[0]


class AffineOp(Op):
    """An op y = L(x_1, ..., x_k) + b. Subclasses give the linear part, its transpose, |L| and b.

    The interval rule works in centre/radius form and adds Higham's bound gamma_n on the rounding
    error of every n-term dot product, so the bounds enclose the exact real-arithmetic output."""

    affine = True

    def linear(self, xp, node, *xs):
        raise UnsupportedRuleError(self.name, "forward", node.name)

    def linear_t(self, xp, node, g):
        """Transpose of the linear part: a tuple with one cotangent per input."""
        raise UnsupportedRuleError(self.name, "vjp", node.name)

    def abs_linear(self, xp, node, *rs):
        """|L| applied to non-negative radii (defaults to L itself, right for non-negative maps)."""
        return self.linear(xp, node, *rs)

    def bias(self, xp, node):
        """The constant term b (broadcastable to the output), or None."""
        return None

    def fan_in(self, node) -> int:
        """Length of the longest dot product in the linear part (0 when it computes nothing)."""
        return 1

    def op_norm(self, node, in_shapes) -> float:
        """Upper bound of the L2 operator norm of the linear part (single-input ops)."""
        raise UnsupportedRuleError(self.name, "lipschitz", node.name)

    def forward(self, xp, node, *xs):
        y = self.linear(xp, node, *xs)
        b = self.bias(xp, node)
        return y if b is None else y + b

    def vjp(self, xp, node, xs, g):
        return self.linear_t(xp, node, g)

    def interval(self, xp, node, *bounds):
        dtype = bounds[0][0].dtype
        gam = gamma(self.fan_in(node) + 2, dtype)
        u = float(xp.finfo(dtype).eps)
        mids, rads = [], []
        for lo, hi in bounds:
            mid = lo + hi
            mid *= 0.5
            # |lo| + |hi| >= 2 |mid| and >= hi - lo: one slack term covers the rounding of the centre
            # and radius here and, through |L|, the error gamma |L| |mid| of the centre's product
            slack = xp.abs(lo)
            slack += xp.abs(hi)
            slack *= u * (1 + gam) + 0.5 * gam
            rad = hi - lo
            rad *= 0.5 * (1 + gam)
            rad += slack
            mids.append(mid)
            rads.append(rad)
        centre = self.linear(xp, node, *mids)
        radius = self.abs_linear(xp, node, *rads)
        b = self.bias(xp, node)
        if b is not None:
            centre = centre + b
        # the radius product rounds (gamma), the bias sum and the final +/- round (2u |centre| + 2u radius)
        radius *= 1 + gam + 2 * u
        slack = xp.abs(centre)
        slack *= 2 * u
        radius += slack
        if b is not None:
            radius += gam * xp.abs(b) + float(xp.finfo(dtype).tiny)
        return centre - radius, centre + radius

    def lipschitz(self, node, in_lips, in_shapes):
        return self.op_norm(node, in_shapes) * in_lips[0]


class StructuralOp(AffineOp):
    """A linear op that only moves or selects entries (reshape, slice, ...): exact bounds, norm <= 1."""

    def fan_in(self, node) -> int:
        return 0

    def interval(self, xp, node, *bounds):
        return self.forward(xp, node, *(b[0] for b in bounds)), self.forward(xp, node, *(b[1] for b in bounds))

    def op_norm(self, node, in_shapes) -> float:
        return 1.0
