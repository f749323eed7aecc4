"""Interval bound propagation (Gowal et al. 2018): sound elementwise bounds layer by layer, with the
margin specification folded into the last dense layer. Bounds include a rigorous floating-point
rounding term (see robeval.ir.registry.AffineOp), so they enclose the exact real-arithmetic network."""

from __future__ import annotations

from typing import Any

from ..backend import gamma, get_xp
from .base import Certifier, input_box
from .spec import margin_weights, mask_true_class, split_margin_head


def folded_margin_lower(xp, head, y, lo, hi):
    """Lower bounds (N, K) of (W_y - W_j) z + b_y - b_j for z in [lo, hi], rounding included."""
    w, b = margin_weights(xp, head, y)
    dtype = lo.dtype
    gam = gamma(w.shape[-1] + 2, dtype)
    u = float(xp.finfo(dtype).eps)
    mid = (lo + hi) * 0.5
    rad = (hi - lo) * 0.5 + u * (xp.abs(lo) + xp.abs(hi))
    # one product for the radius: the centre product's error gamma |w| |mid| and the rounding of
    # forming W_y - W_j (u |w| (|mid| + rad)) ride along with |w| rad
    spread = rad * (1 + gam + u) + (gam + u) * xp.abs(mid)
    centre = xp.matmul(w, mid[:, :, None])[..., 0]
    radius = xp.matmul(xp.abs(w), spread[:, :, None])[..., 0] * (1 + gam)
    if b is not None:
        centre = centre + b
        radius = radius + (gam + u) * xp.abs(b)
    lower = centre - radius
    return mask_true_class(xp, lower - (u * xp.abs(lower) + float(xp.finfo(dtype).tiny)), y)


def ibp_margin_bounds(net, x, y, eps, domain=(0.0, 1.0)) -> Any:
    """IBP lower bounds (N, K) of logit[y] - logit[j] over the L-inf ball of radius eps around x
    intersected with the domain box; +inf at column y. ``net`` must end in logits (no softmax).

    >>> # lower = ibp_margin_bounds(net, x, y, 0.1); verified = (lower.min(axis=1) > 0)
    """
    xp = get_xp(x)
    lo, hi = input_box(xp, x, eps, domain)
    split = split_margin_head(net)
    if split.head is None:
        out_lo, out_hi = net.interval(lo, hi)
        idx = xp.arange(x.shape[0])
        return mask_true_class(xp, out_lo[idx, y][:, None] - out_hi, y)
    body_lo, body_hi = split.body.interval(lo, hi)
    return folded_margin_lower(xp, split.head, y, body_lo, body_hi)


class IBP(Certifier):
    """Interval bound propagation; norm 'linf' (the L2 ball is enclosed in its bounding box)."""

    name = "ibp"
    rule = "interval"
    norms = ("linf", "l2")

    def margin_lower(self, net, x, y, eps):
        return ibp_margin_bounds(net, x, y, eps, self.domain)

    def bytes_per_sample(self, net) -> int:
        return 8 * 8 * workspace_floats(net)


def workspace_floats(net) -> int:
    """Floats per sample that one bound pass touches: activations, plus im2col columns of convs."""
    shapes = net.shapes()
    total = 0
    for node in net.nodes:
        out = shapes[node.name]
        size = 1
        for d in out:
            size *= d
        if node.op == "conv":
            _, cin_g, kh, kw = node.params["weight"].shape
            size += (size // out[0]) * cin_g * kh * kw
        total += size
    return total
