"""Sound lower bounds of linear output specifications A . f(x) + c over input boxes, with CROWN.

This is the rigorous engine of ``robeval.verify``: every bound it returns holds for every point of
the box in exact arithmetic, floating-point rounding included (see ``robeval.certifiers.crown``).
The optimisers (``alpha``, ``bab``) only choose the free parameters it is given; whatever they
choose, the bound computed here stays sound."""

from __future__ import annotations

import numpy

from ..certifiers.crown import CostModel, _Batch, check_supported, memory_budget, serial_blas
from ..errors import InvalidParameterError


def as_verification_network(net):
    """The network in float64 on NumPy, checked to be one CROWN can bound."""
    check_supported(net)
    return net.astype(numpy.float64)


def _boxes(net, lo, hi):
    shape = tuple(net.input_shape)
    lo = numpy.asarray(lo, dtype=numpy.float64).reshape((-1,) + shape)
    hi = numpy.asarray(hi, dtype=numpy.float64).reshape((-1,) + shape)
    if lo.shape != hi.shape:
        raise InvalidParameterError(f"box bounds have shapes {lo.shape} and {hi.shape}; expected equal shapes")
    if not (numpy.isfinite(lo).all() and numpy.isfinite(hi).all()):
        raise InvalidParameterError("box bounds contain NaN or infinity; every input needs finite bounds")
    if (lo > hi).any():
        raise InvalidParameterError("box has a lower bound above its upper bound; check the specification")
    return lo, hi


def box_bounds(net, lo, hi, method: str = "crown"):
    """A ``_Batch`` holding every node's bounds over the boxes [lo, hi] (B boxes, flat or shaped like
    the input): IBP, then CROWN for the nodes a nonlinear op reads unless ``method`` is 'ibp'."""
    lo, hi = _boxes(net, lo, hi)
    batch = _Batch(net, lo, 0.0, "linf", None, box=(lo, hi))
    if method == "crown":
        budget = memory_budget()
        with serial_blas(numpy):
            batch.tighten(False, CostModel(net, "crown", 8), budget)
    elif method != "ibp":
        raise InvalidParameterError(f"method={method!r}; expected 'crown' or 'ibp'")
    return batch


def spec_lower(batch, A, c=None):
    """Lower bounds (B, S) of A . f(x) + c over the batch's boxes; A (S, K) or (B, S, K)."""
    A = numpy.asarray(A, dtype=numpy.float64)
    if A.ndim == 2:
        A = A[None]
    c = numpy.zeros(A.shape[:2]) if c is None else numpy.asarray(c, dtype=numpy.float64).reshape(-1, A.shape[1])
    with serial_blas(numpy):
        return batch.spec_lower(A, numpy.broadcast_to(c, (batch.n, A.shape[1])))


def spec_lower_bounds(net, lo, hi, A, c=None, method: str = "crown"):
    """Sound lower bounds (B, S) of A . f(x) + c over each box [lo_b, hi_b].

    >>> # lower = spec_lower_bounds(net, x - 0.01, x + 0.01, A)   # row s holds where lower[:, s] > 0
    """
    net = as_verification_network(net)
    return spec_lower(box_bounds(net, lo, hi, method), A, c)


def domain_lower(net, root, lo, hi, A, c, alpha=None, beta=None, splits=None, relu_inputs=None):
    """Sound lower bounds (B,) of c_b + A_b . f(x) over the subdomains b of the box [lo, hi].

    ``root``: a ``box_bounds`` batch over the whole box (B = 1); subdomain b keeps its node bounds,
    with each split pre-activation clamped (splits[relu] = +1: h >= 0, -1: h <= 0, 0: free), uses
    ReLU lower slopes ``alpha[relu]`` and adds the split terms -beta s h (>= 0 ... see
    ``robeval.verify.alpha``); any values of alpha and beta >= 0 give a sound bound.
    ``relu_inputs`` maps each ReLU node to the node it reads."""
    alpha, beta, splits = alpha or {}, beta or {}, splits or {}
    A = numpy.asarray(A, dtype=numpy.float64)
    n = A.shape[0]
    lo, hi = _boxes(net, lo, hi)
    lo, hi = numpy.broadcast_to(lo, (n,) + lo.shape[1:]), numpy.broadcast_to(hi, (n,) + hi.shape[1:])
    per_domain = {name: (numpy.repeat(blo, n, axis=0) if blo.shape[0] == 1 else blo,
                         numpy.repeat(bhi, n, axis=0) if bhi.shape[0] == 1 else bhi)
                  for name, (blo, bhi) in root.bounds.items()}
    batch = _Batch(net, lo, 0.0, "linf", None, box=(lo, hi), node_bounds=per_domain)
    for relu, s in splits.items():
        h = relu_inputs[relu]
        blo, bhi = batch.bounds[h]
        batch.bounds[h] = (numpy.where(s > 0, numpy.maximum(blo, 0.0), blo),
                           numpy.where(s < 0, numpy.minimum(bhi, 0.0), bhi))
    batch.lower_slopes = dict(alpha)
    batch.extra = {relu_inputs[relu]: (-numpy.maximum(b, 0.0) * splits[relu])[:, None] for relu, b in beta.items()}
    c = numpy.zeros(n) if c is None else numpy.asarray(c, dtype=numpy.float64)
    with serial_blas(numpy):
        return batch.spec_lower(A[:, None, :], c[:, None])[:, 0]


__all__ = ["as_verification_network", "box_bounds", "domain_lower", "spec_lower", "spec_lower_bounds"]
