"""Sound lower bounds of linear output specifications A . f(x) + c over input boxes, with CROWN.

This is the rigorous engine of ``robeval.verify``: every bound it returns holds for every point of
the box in exact arithmetic, floating-point rounding included (see ``robeval.certifiers.crown``).
The optimisers (``alpha``, ``bab``) only choose the free parameters it is given; whatever they
choose, the bound computed here stays sound."""

from __future__ import annotations

import numpy

from ..certifiers.crown import CostModel, _Batch, bound_targets, check_supported, memory_budget, serial_blas
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


def exact_float32(net):
    """``net`` in float32 when that rounds no parameter (a float32 model read in float64), else
    None. The rigorous engine is exact about its own dtype's rounding, so on this copy it bounds the
    same function, at float32 speed, with float32's (larger) rounding allowance."""
    fast = net.astype(numpy.float32)
    for node, copy in zip(net.nodes, fast.nodes):
        for name, a in node.params.items():
            a = numpy.asarray(a)
            if a.dtype.kind == "f" and not numpy.array_equal(numpy.asarray(copy.params[name], dtype=a.dtype), a):
                return None
    return fast


def _outward(lo, hi, dtype):
    """[lo, hi] in ``dtype``, rounded outwards so that it contains the given interval."""
    if lo.dtype == dtype:
        return lo, hi
    flo, fhi = lo.astype(dtype), hi.astype(dtype)
    flo = numpy.where(flo > lo, numpy.nextafter(flo, dtype.type(-numpy.inf)), flo)
    fhi = numpy.where(fhi < hi, numpy.nextafter(fhi, dtype.type(numpy.inf)), fhi)
    return flo, fhi


def split_clamp(lo, hi, s):
    """A split ReLU input's bounds: s = +1 (h >= 0) raises lo to 0, s = -1 (h <= 0) lowers hi to 0,
    s = 0 leaves both (shared by the optimiser and the rigorous engine, so both see one domain)."""
    return numpy.where(s > 0, numpy.maximum(lo, 0.0), lo), numpy.where(s < 0, numpy.minimum(hi, 0.0), hi)


def _domain_batch(net, root, lo, hi, n, splits, relu_inputs, bounds=None):
    """A rigorous batch over n subdomains of the box in ``net``'s dtype: ``root``'s node bounds,
    replaced by ``bounds`` (name -> (lo, hi), each (n, *shape)) where given, with each split
    pre-activation clamped; box and bounds rounded outwards into that dtype."""
    dtype = numpy.dtype(net.dtype)
    lo, hi = _outward(*_boxes(net, lo, hi), dtype)
    lo, hi = numpy.broadcast_to(lo, (n,) + lo.shape[1:]), numpy.broadcast_to(hi, (n,) + hi.shape[1:])
    bounds = bounds or {}
    per_domain = {}
    for name, (blo, bhi) in root.bounds.items():
        if name in bounds:
            blo, bhi = bounds[name]
        blo, bhi = _outward(blo, bhi, dtype)
        per_domain[name] = (numpy.repeat(blo, n, axis=0) if blo.shape[0] == 1 else blo,
                            numpy.repeat(bhi, n, axis=0) if bhi.shape[0] == 1 else bhi)
    batch = _Batch(net, lo, 0.0, "linf", None, box=(lo, hi), node_bounds=per_domain)
    for relu, s in (splits or {}).items():
        h = relu_inputs[relu]
        batch.bounds[h] = split_clamp(*batch.bounds[h], s)
    return batch


def domain_lower(net, root, lo, hi, A, c, alpha=None, beta=None, splits=None, relu_inputs=None, bounds=None):
    """Sound lower bounds (B,) of c_b + A_b . f(x) over the subdomains b of the box [lo, hi].

    ``root``: a ``box_bounds`` batch over the whole box (B = 1); subdomain b keeps its node bounds
    (``bounds[name]`` (B, *shape) where given, e.g. from ``refine_bounds``, else the root's), with
    each split pre-activation clamped (splits[relu] = +1: h >= 0, -1: h <= 0, 0: free), uses ReLU
    lower slopes ``alpha[relu]`` and adds the split terms -beta s h (>= 0 ... see
    ``robeval.verify.alpha``); any values of alpha and beta >= 0 give a sound bound.
    ``relu_inputs`` maps each ReLU node to the node it reads."""
    alpha, beta, splits = alpha or {}, beta or {}, splits or {}
    A = numpy.asarray(A, dtype=numpy.float64)
    n = A.shape[0]
    batch = _domain_batch(net, root, lo, hi, n, splits, relu_inputs, bounds)
    batch.lower_slopes = dict(alpha)
    batch.extra = {relu_inputs[relu]: (-numpy.maximum(b, 0.0) * splits[relu])[:, None] for relu, b in beta.items()}
    c = numpy.zeros(n) if c is None else numpy.asarray(c, dtype=numpy.float64)
    with serial_blas(numpy):
        return batch.spec_lower(A[:, None, :], c[:, None])[:, 0]


def refine_bounds(net, root, lo, hi, splits, relu_inputs, bounds=None, after=None, fast=None):
    """Each subdomain's own bounds of the nodes nonlinear ops read (name -> (lo, hi), (n, *shape),
    float64), and which subdomains are empty (n,).

    CROWN recomputed layer by layer with the splits' pre-activations clamped (h >= 0 makes a ReLU
    the identity there, h <= 0 makes it zero), so a split stabilises neurons after it; each result
    is intersected with the bounds it starts from (``bounds``, else the root's), so it never loosens.
    Nodes up to ``after`` (a node name) are kept as they are (no split lies before it) and left out
    of the result. ``fast``: an
    ``exact_float32`` copy of ``net`` to compute on. A subdomain where some lower bound exceeds its
    upper bound contains no point of the box: rigorously empty."""
    n = int(next(iter(splits.values())).shape[0])
    batch = _domain_batch(net if fast is None else fast, root, lo, hi, n, splits, relu_inputs, bounds)
    targets = bound_targets(net)
    skip = targets[: targets.index(after) + 1] if after in targets else []
    batch.recheck = {relu_inputs[relu]: s != 0 for relu, s in splits.items()}  # may show them empty
    with serial_blas(numpy):
        batch.tighten(False, CostModel(net, "crown", batch.dtype.itemsize), memory_budget(), skip=set(skip))
    out = {}
    empty = numpy.zeros(n, dtype=bool)
    for name in targets[len(skip):]:  # the kept ones are as given (their splits are clamped where used)
        start = bounds[name] if bounds and name in bounds else root.bounds[name]
        blo, bhi = (a.astype(numpy.float64) for a in batch.bounds[name])
        blo, bhi = numpy.maximum(blo, start[0]), numpy.minimum(bhi, start[1])
        out[name] = (blo, bhi)
        empty |= (blo > bhi).reshape(n, -1).any(axis=1)
    return out, empty


def unstable_index(root, h):
    """Flat indices of node ``h``'s unstable neurons in ``root`` (lower bound < 0 < upper bound)."""
    blo, bhi = root.bounds[h]
    return numpy.nonzero((blo.reshape(-1) < 0) & (bhi.reshape(-1) > 0))[0]


def unstable_rows(root, h):
    """The unstable neurons of node ``h`` in ``root`` (flat indices, k) and the rows (2k, size)
    whose lower bounds are their lower bounds (+e_j) and minus their upper bounds (-e_j)."""
    idx = unstable_index(root, h)
    k = len(idx)
    A = numpy.zeros((2 * k, root.bounds[h][0].size))
    A[numpy.arange(k), idx] = 1.0
    A[k + numpy.arange(k), idx] = -1.0
    return idx, A


def narrow_node(root, h, relu, idx, low) -> int:
    """Intersect ``root``'s bounds of the ReLU input ``h`` at ``idx`` with the lower bounds ``low``
    of ``unstable_rows``' rows, and the ReLU's output bounds with the result; returns how many of
    those neurons are now stable. Where nothing narrows, the bound arrays stay the same objects (a
    caller may tell unchanged bounds by identity: ``tighten.PrefixSearch.refresh``)."""
    k = len(idx)
    blo, bhi = root.bounds[h]
    new_lo, new_hi = blo.reshape(-1).copy(), bhi.reshape(-1).copy()
    new_lo[idx] = numpy.maximum(new_lo[idx], low[:k])
    new_hi[idx] = numpy.minimum(new_hi[idx], -low[k:])
    stable = int(((new_lo[idx] >= 0) | (new_hi[idx] <= 0)).sum())
    if numpy.array_equal(new_lo, blo.reshape(-1)) and numpy.array_equal(new_hi, bhi.reshape(-1)):
        return stable
    root.bounds[h] = (new_lo.reshape(blo.shape), new_hi.reshape(bhi.shape))
    rlo, rhi = root.bounds[relu]
    root.bounds[relu] = (numpy.maximum(rlo, numpy.maximum(root.bounds[h][0], 0.0)),
                         numpy.minimum(rhi, numpy.maximum(root.bounds[h][1], 0.0)))
    root._m.clear()
    return stable


__all__ = ["as_verification_network", "box_bounds", "domain_lower", "exact_float32", "narrow_node", "refine_bounds",
           "spec_lower", "spec_lower_bounds", "unstable_index", "unstable_rows"]
