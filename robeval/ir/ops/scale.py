"""Elementwise affine maps with constant coefficients y = x * scale + shift: constant Add/Sub/Mul/Div
(input normalisation inside a model) and inference-mode batch normalisation.

The certified network is the one with the model's stored constants, evaluated exactly. A division
by a stored constant c, or a batch norm gamma (x - mean) / sqrt(var + eps) + beta, is not exactly a
product with one float: its coefficients are computed here in float64 from the stored values, with
a bound on how far each computed coefficient is from the exact one (``coefficients``), and every
rule accounts for that distance (``param_error``)."""

from __future__ import annotations

import numpy

from ...backend import asnumpy
from ..registry import AffineOp, register

#: Relative error allowed per float64 operation when folding coefficients (a few ulps, doubled).
FOLD_ULPS = 8.0


def _cast_up(xp, value64, dtype):
    """A float64 non-negative bound cast to ``dtype`` without rounding below the true value."""
    fi = xp.finfo(dtype)
    return (value64 * (1 + 4 * float(fi.eps))).astype(dtype) + float(fi.tiny)


def _in_dtype(xp, exact64, err64, dtype):
    """(value, error) in ``dtype``: the error grows by the cast of the value itself."""
    value = exact64.astype(dtype)
    err = err64 + xp.abs(value.astype(numpy.float64) - exact64)
    return value, _cast_up(xp, err, dtype)


@register("scale")
class Scale(AffineOp):
    """params: scale (or divisor: y = x / divisor + shift), shift, each broadcastable to the
    per-sample shape (no batch axis)."""

    def folded(self, xp, node):
        """(scale, shift, scale_err, shift_err) in float64, or errors None when the constants are exact."""
        p = node.params
        shift = xp.asarray(p["shift"], dtype=numpy.float64)
        if "divisor" not in p:
            return xp.asarray(p["scale"], dtype=numpy.float64), shift, None, None
        c = xp.asarray(p["divisor"], dtype=numpy.float64)
        scale = 1.0 / c
        err = FOLD_ULPS * 2.0**-53 * xp.abs(scale) + 1e-300
        return scale, shift, err, xp.zeros_like(shift)

    def coefficients(self, xp, node, dtype):
        """(scale, shift, scale_err, shift_err) in ``dtype``: |exact - value| <= err (errors None when
        the stored constants are used as they are)."""
        p = node.params
        if "divisor" not in p:
            s, t = xp.asarray(p["scale"]).astype(dtype, copy=False), xp.asarray(p["shift"]).astype(dtype, copy=False)
            if all(bool(xp.all(a.astype(numpy.float64) == xp.asarray(p[k], dtype=numpy.float64)))
                   for a, k in ((s, "scale"), (t, "shift"))):
                return s, t, None, None  # the stored constants, exactly
        s, t, ds, dt = self.folded(xp, node)
        if ds is None:
            ds, dt = xp.zeros_like(s), xp.zeros_like(t)
        s, ds = _in_dtype(xp, s, ds, dtype)
        t, dt = _in_dtype(xp, t, dt, dtype)
        return s, t, ds, dt

    def param_error(self, xp, node, m_in):
        """Bound on |exact(z) - computed(z)| per output entry for |z| <= m_in (None when exact)."""
        _, _, ds, dt = self.coefficients(xp, node, m_in.dtype)
        if ds is None:
            return None
        u = float(xp.finfo(m_in.dtype).eps)
        out = ds * m_in + dt
        out *= 1 + 4 * u
        return out + float(xp.finfo(m_in.dtype).tiny)

    def linear(self, xp, node, x):
        return x * self.coefficients(xp, node, x.dtype)[0]

    def linear_t(self, xp, node, g):
        return (g * self.coefficients(xp, node, g.dtype)[0],)

    def abs_linear(self, xp, node, r):
        return r * xp.abs(self.coefficients(xp, node, r.dtype)[0])

    def bias(self, xp, node):
        dtype = node.params["shift"].dtype if "shift" in node.params else numpy.float64
        return self.coefficients(xp, node, dtype)[1]

    def interval(self, xp, node, bounds):
        """Pick the end by the sign of the scale, then widen by the rounding of one product and one sum
        (and by the distance of the computed coefficients from the exact ones)."""
        lo, hi = bounds
        scale, shift, _, _ = self.coefficients(xp, node, lo.dtype)
        a, c = lo * scale, hi * scale
        small, large = xp.minimum(a, c), xp.maximum(a, c)
        out_lo, out_hi = small + shift, large + shift
        u = float(xp.finfo(out_lo.dtype).eps)
        tiny = float(xp.finfo(out_lo.dtype).tiny)
        out_lo = out_lo - (u * (xp.abs(out_lo) + xp.abs(small)) + tiny)
        out_hi = out_hi + (u * (xp.abs(out_hi) + xp.abs(large)) + tiny)
        extra = self.param_error(xp, node, xp.maximum(xp.abs(lo), xp.abs(hi)))
        if extra is not None:
            out_lo, out_hi = out_lo - extra, out_hi + extra
        return out_lo, out_hi

    def op_norm(self, node, in_shapes):
        s, _, ds, _ = self.folded(numpy, _on_host(node))
        bound = numpy.abs(s) if ds is None else numpy.abs(s) + ds
        return float(numpy.max(bound, initial=0.0))


def _on_host(node):
    """The node with its parameters as NumPy arrays (Lipschitz constants are computed on the host)."""
    return node.replace(params={k: asnumpy(v) for k, v in node.params.items()})


@register("batchnorm")
class BatchNorm(Scale):
    """Inference batch norm gamma (x - mean) / sqrt(var + eps) + beta from the stored statistics
    (params gamma, beta, mean, var with shape (C, 1, 1) for images or (C,) for features; attrs eps),
    folded in float64 to scale = gamma / sqrt(var + eps), shift = beta - mean * scale with a bound on
    the folding's rounding."""

    def folded(self, xp, node):
        p = node.params
        gamma, beta, mean, var = (xp.asarray(p[k], dtype=numpy.float64) for k in ("gamma", "beta", "mean", "var"))
        u = 2.0**-53
        root = xp.sqrt(var + float(node.attrs.get("eps", 1e-5)))
        scale = gamma / root  # add, sqrt, divide: under 3 ulps relative
        scale_err = FOLD_ULPS * u * xp.abs(scale) + 1e-300
        moved = mean * scale
        shift = beta - moved
        # the product's own rounding, the subtraction's, and the scale's error carried by |mean|
        shift_err = FOLD_ULPS * u * (xp.abs(moved) + xp.abs(shift)) + xp.abs(mean) * scale_err * (1 + 4 * u) + 1e-300
        return scale, shift, scale_err, shift_err

    def coefficients(self, xp, node, dtype):
        s, t, ds, dt = self.folded(xp, node)
        s, ds = _in_dtype(xp, s, ds, dtype)
        t, dt = _in_dtype(xp, t, dt, dtype)
        return s, t, ds, dt

    def bias(self, xp, node):
        return self.coefficients(xp, node, node.params["beta"].dtype)[1]
