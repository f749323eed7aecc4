"""Loss gradients with respect to inputs through a Network's vector-Jacobian products."""

from __future__ import annotations

from ..backend import get_xp
from ..errors import InvalidParameterError

LOSSES = ("ce", "margin")


def loss_and_cotangent(xp, logits, y, loss: str):
    """Per-sample loss and its gradient w.r.t. the logits: cross-entropy, or the CW margin
    loss max_{j != y} z_j - z_y (increasing means closer to misclassification)."""
    n = logits.shape[0]
    idx = xp.arange(n)
    if loss == "ce":
        z = logits - logits.max(axis=1, keepdims=True)
        p = xp.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        value = -xp.log(xp.maximum(p[idx, y], float(xp.finfo(p.dtype).tiny)))
        g = p.copy()
        g[idx, y] -= 1.0
        return value, g
    if loss == "margin":
        others = logits.copy()
        others[idx, y] = -xp.inf
        j = others.argmax(axis=1)
        value = logits[idx, j] - logits[idx, y]
        g = xp.zeros_like(logits)
        g[idx, j] = 1.0
        g[idx, y] = -1.0
        return value, g
    raise InvalidParameterError(f"loss={loss!r} is not known; expected one of {LOSSES}")


def loss_gradient_network(net, x, y, loss: str = "ce"):
    """dL/dx for each sample (the sum over samples, so each row is that sample's own gradient)."""
    xp = get_xp(x)
    stripped, _ = net.strip_output_squashers()
    logits = stripped.forward(x)
    _, g = loss_and_cotangent(xp, logits, xp.asarray(y), loss)
    return stripped.vjp(x, g)
