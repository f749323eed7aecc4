"""CROWN (Zhang et al. 2018) and CROWN-IBP (Zhang et al. 2020): linear bounds propagated backwards
from the margin specification to the input, through every op of the network DAG.

Methods (``get_certifier(name)``):

- ``crown``: auto_LiRPA's default. IBP bounds every node first; a node that feeds a nonlinear op then
  gets CROWN bounds, computed only for the neurons IBP leaves unstable when every consumer is a
  ReLU/LeakyReLU (a stable neuron's relaxation is exact whatever its bounds), and intersected with IBP.
- ``crown-pure``: textbook CROWN ("crown_pure" in the reference): every such node, every neuron, by
  CROWN alone.
- ``crown-ibp``: IBP for all intermediate bounds, CROWN only from the output specification.
- ``best``: IBP, then CROWN-IBP, then CROWN on the samples still unknown; per sample the largest
  (all sound) lower bound wins.

In every CROWN mode, under ``linf``, the first affine op on the input keeps its interval bound, which
is exactly what CROWN computes there; and the output of an elementwise activation, where a nonlinear
op needs it, gets the exact image of its input's bounds (interval rule).

Input regions: ``linf`` is the box [x - eps, x + eps] clipped to the domain (concretised with
lam+ . lo + lam- . hi); ``l2`` is the whole ball ||x' - x||_2 <= eps (concretised with lam . x -
eps ||lam||_2; the domain clip is ignored, which is sound), with its bounding box for IBP.

Soundness in floating point. A backward pass keeps coefficients ``lam`` (b, S, *shape) on a node z
(b = 1 while they do not depend on the sample), a constant c and an error budget e (B, S) such that
for every input in the region, in exact arithmetic: spec . out >= sum lam . z + c - e. Each step
computes its new coefficients in floating point and adds to e a bound of what that rounding can
change, using m = max(|lo|, |hi|) >= |z| from the node bounds:

- affine z = L(z_in) + b: lam_in = fl(L^T lam) is a sum of n products per entry (n below
  ``transpose_terms``), off by at most gamma_{n+1} |lam| |L| (Higham 2002, 3.5), so
  e += gamma_{n+1} |lam| . (|L| m_in); the bias dot product adds gamma_{n+1} |lam| . |b|; an op
  whose coefficients are folded from its constants (batch norm, x / c) adds |lam| . its
  ``param_error`` (the folded coefficients' distance from the exact ones, times m_in);
- relaxation: the lines are first widened by their own rounding (``crown_relax.line_slack``);
  the new coefficients are single products (error u |lam| |slope|) and the constant a dot product;
- sums of coefficients at fan-out nodes, and of constants, add u per addition;
- concretisation: the dot products with the box centre and radius (or the L2 norm) add
  gamma_{D+1} |lam| . (|centre| + radius) (or gamma_{D+2} of ||lam|| ||x||).

Every error term is doubled, which covers the rounding of computing the error terms themselves
(their relative error is below gamma_n, far below 1), and the final bound is pushed down by one
more unit of roundoff. The allowance is ~1e-13 relative in float64, far below any tolerance.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

from ..backend import gamma, get_xp
from ..errors import InvalidParameterError, RobevalError, UnsupportedOpError
from ..ir.registry import ElementwiseOp, StructuralOp, get_op
from .base import DEFAULT_MEMORY_MB, Certifier, input_box
from .crown_patches import patch_bounds, patch_chain, pays
from .crown_relax import Step, backward_rule, bdot, magnitude, relu_slopes_rule
from .ibp import ibp_margin_bounds
from .spec import split_margin_head

#: Methods of ``crown_margin_bounds``: how intermediate bounds are computed.
METHODS = ("crown", "crown-pure", "crown-ibp")
#: Consumers whose relaxation is exact for a sign-stable neuron (so IBP-stable neurons are skipped).
SIGN_STABLE = ("relu", "leaky_relu", "prelu")
#: Arrays of the size of one coefficient tensor alive at once during a step (the cost model).
WORK_ARRAYS = 4
#: Specification rows per sample assumed when choosing the batch; more rows run in chunks.
ROWS_HINT = 1024
#: Working set a batch aims for (MiB): larger batches only add cache misses on CPUs.
FAST_WORKSPACE_MB = 96
#: Floats of input coefficients formed at once when the first op is concretised (fits in L2 cache).
ENTRY_CHUNK_FLOATS = 2**17


def memory_budget(memory_mb=None) -> float:
    """Bytes the bound computation may use ($ROBEVAL_MEMORY_MB, default DEFAULT_MEMORY_MB MiB)."""
    return float(memory_mb or os.environ.get("ROBEVAL_MEMORY_MB", DEFAULT_MEMORY_MB)) * 2**20


def check_supported(net) -> None:
    """Raise UnsupportedOpError listing every op CROWN cannot propagate through."""
    missing = [(n.op, n.name) for n in net.nodes
               if not get_op(n.op).affine and backward_rule(get_op(n.op)) is None]
    if missing:
        raise UnsupportedOpError(missing, "robeval network (for CROWN)")


def transpose_terms(node, op, shapes) -> int:
    """Most products summed into one entry of L^T lam (0 when the transpose only moves entries)."""
    out = math.prod(shapes[node.name])
    if isinstance(op, StructuralOp):
        return 0
    if node.op == "dense":
        return int(node.params["weight"].shape[0])
    if node.op == "conv":
        cout, _, kh, kw = node.params["weight"].shape
        return int(cout // int(node.attrs.get("groups", 1)) * kh * kw)
    if node.op in ("scale", "batchnorm", "global_avgpool"):
        return 1
    if node.op == "avgpool":
        kh, kw = node.attrs["kernel"]
        return int(kh * kw + 1)
    if node.op in ("add", "sub"):
        ratios = [out // max(1, math.prod(s)) for s in node.attrs["in_shapes"]]
        return 0 if max(ratios) == 1 else max(ratios)
    return out + 1  # any entry of L^T lam sums at most every output entry


def param_error(xp, node, op, m_ins):
    """|exact - computed| of an affine op whose constants are folded with rounding (batch norm, x / c),
    for inputs bounded by ``m_ins`` in magnitude; None for ops whose stored constants are used as they are."""
    rule = getattr(op, "param_error", None)
    return None if rule is None else rule(xp, node, *m_ins)


# ----------------------------------------------------------------------------- cost model
def _step_floats(node, shapes) -> int:
    """Floats per specification row that a backward step through ``node`` touches at most."""
    size = max([math.prod(shapes[node.name])] + [math.prod(s) for s in node.attrs["in_shapes"]])
    out = shapes[node.name]
    if node.op == "conv":
        _, cin_g, kh, kw = node.params["weight"].shape
        size = max(size, math.prod(out[1:]) * cin_g * int(node.attrs.get("groups", 1)) * kh * kw)
    elif node.op == "maxpool":
        size = max(size, math.prod(out) * math.prod(node.attrs["kernel"]))
    elif node.op == "groupsort":
        size = max(size, math.prod(out) * int(node.attrs["group_size"]))
    elif node.op in ("max", "min"):
        size = 2 * max(size, math.prod(out))
    return size


class CostModel:
    """Bytes a backward pass needs: per sample and row for each start node, plus fixed per sample."""

    def __init__(self, net, method: str, itemsize: int = 8):
        shapes = net.shapes()
        self.itemsize = itemsize
        prefix, running = {}, math.prod(net.input_shape)
        for node in net.nodes:
            running = max(running, _step_floats(node, shapes))
            prefix[node.name] = running
        self.row_bytes = {name: itemsize * WORK_ARRAYS * v for name, v in prefix.items()}
        self.row_bytes[net.input_name] = itemsize * WORK_ARRAYS * math.prod(net.input_shape)
        self.fixed = itemsize * 6 * (net.activation_size() + math.prod(net.input_shape))
        split = split_margin_head(net)
        out = split.head.inputs[0] if split.head is not None else net.output_name
        self.rows = {out: split.num_classes - 1}
        if method != "crown-ibp":
            for name in bound_targets(net):
                self.rows[name] = 2 * math.prod(shapes[name])

    def per_sample(self) -> int:
        """Bytes per sample when rows run in chunks of at most ROWS_HINT (for choosing the batch)."""
        return self.fixed + max(self.row_bytes[n] * min(r, ROWS_HINT) for n, r in self.rows.items())

    def minimum(self) -> tuple[int, str]:
        """Bytes one sample needs with the smallest chunks (two rows), and the node that needs them."""
        name = max(self.rows, key=lambda n: self.row_bytes[n] * min(self.rows[n], 2))
        return self.fixed + self.row_bytes[name] * min(self.rows[name], 2), name

    def check(self, budget: float) -> None:
        need, name = self.minimum()
        if need > budget:
            floats = self.row_bytes[name] // (WORK_ARRAYS * self.itemsize)
            raise RobevalError(
                f"CROWN needs at least {need / 2**20:.1f} MiB for one sample on this model (the backward pass "
                f"from node '{name}' holds {WORK_ARRAYS} arrays of {floats} "
                f"floats per specification row), but the memory budget is {budget / 2**20:.1f} MiB; raise "
                "$ROBEVAL_MEMORY_MB, or use method='crown-ibp' or 'ibp', which need far less")

    def batch(self, n: int, budget: float) -> int:
        """Samples per pass: within the budget, and within FAST_WORKSPACE_MB when that allows one."""
        self.check(budget)
        per = self.per_sample()
        fast = min(budget, FAST_WORKSPACE_MB * 2**20)
        return int(max(1, min(n, fast // per if per <= fast else budget // per)))

    def rows_per_chunk(self, name: str, batch: int, budget: float) -> int:
        free = budget - batch * self.fixed
        rows = int(free // max(1, batch * self.row_bytes[name]))
        if rows < 2:
            raise RobevalError(f"memory budget {budget / 2**20:.1f} MiB is too small for {batch} samples at node "
                               f"'{name}'; raise $ROBEVAL_MEMORY_MB or lower batch_size")
        return rows - rows % 2


def entry_op(net):
    """The affine op through which every path leaves the input, after a chain of structural ops
    (flatten, reshape, ...) that each have one input and one consumer; with that chain, nearest the op
    first. (None, []) when the input fans out or the first op is not affine."""
    chain, name = [], net.input_name
    while True:
        consumers = net.consumers(name)
        if len(consumers) != 1 or len(consumers[0].inputs) != 1 or not get_op(consumers[0].op).affine:
            return None, []
        node = consumers[0]
        if not isinstance(get_op(node.op), StructuralOp):
            return node.name, chain[::-1]
        chain.append(node)
        name = node.name


def bound_targets(net) -> list[str]:
    """Nodes whose bounds a nonlinear op needs, in topological order (the network input excluded)."""
    needed = {i for n in net.nodes if not get_op(n.op).affine for i in n.inputs}
    return [n.name for n in net.nodes if n.name in needed]


# ----------------------------------------------------------------------------- one batch
class _Batch:
    """The bounds of one batch: the region, every node's bounds, and backward passes over them."""

    #: bound convolutions in patches mode where that moves fewer floats (``crown_patches``)
    patches = True
    #: bound each sample's own unstable neurons when they are much fewer than the batch's union
    per_sample_rows = True

    def __init__(self, net, x, eps, norm, domain, box=None, node_bounds=None):
        """The region around ``x``; or, with ``box=(lo, hi)`` (arrays shaped like x, lo <= hi), that
        exact box (norm 'linf'; x and eps are then ignored). ``node_bounds``: every node's sound
        bounds over the region when the caller has them (skips the IBP pass)."""
        xp = self.xp = get_xp(x)
        self.net, self.norm, self.eps = net, norm, float(eps)
        self.n = int(x.shape[0])
        self.dtype = x.dtype
        self.u = float(xp.finfo(x.dtype).eps) / 2
        self.shapes = net.shapes()
        self.index = {node.name: i for i, node in enumerate(net.nodes)}
        self.index[net.input_name] = -1
        self.nodes = {node.name: node for node in net.nodes}
        #: alpha-CROWN lower slopes per ReLU node (B, *shape), used by every backward pass.
        self.lower_slopes: dict = {}
        #: coefficients (B, 1, *shape) added to lam at a node (beta-CROWN split terms, each a valid
        #: lower bound of zero on its subdomain); set them only for the final specification pass.
        self.extra: dict = {}
        #: neurons (B, *shape) that ``tighten`` bounds even where they are stable (split ones)
        self.recheck: dict = {}
        if box is not None:
            lo, hi = box
        elif norm == "linf":
            lo, hi = input_box(xp, x, eps, domain)
        else:
            lo, hi = x - eps, x + eps
        if box is None:
            low_edge = -math.inf if domain is None or norm != "linf" else domain[0]
            high_edge = math.inf if domain is None or norm != "linf" else domain[1]
            # x -/+ eps rounds: widen by one unit of roundoff wherever the domain did not clip exactly
            lo = xp.where(lo > low_edge, lo - self.u * xp.abs(lo), lo)
            hi = xp.where(hi < high_edge, hi + self.u * xp.abs(hi), hi)
        self.bounds = dict(net.interval(lo, hi, keep=True) if node_bounds is None else node_bounds)
        self._m: dict = {}
        self._bias: dict = {}
        self._weights: dict = {}
        flat_lo, flat_hi = lo.reshape(self.n, -1), hi.reshape(self.n, -1)
        if norm == "linf":  # the box as centre +- radius, the radius rounded up to contain it
            self.centre = (flat_lo + flat_hi) * 0.5
            self.rad = (flat_hi - flat_lo) * 0.5 + self.u * 2 * (xp.abs(flat_lo) + xp.abs(flat_hi))
            self.rad2 = xp.stack([self.rad, xp.abs(self.centre) + self.rad], axis=-1)  # (B, D, 2)
            self.reach = self.rad2[..., 1]  # bounds |x| over the region
        else:
            self.centre = x.reshape(self.n, -1)
            d = self.centre.shape[1]
            self.x0_norm = xp.sqrt((self.centre * self.centre).sum(axis=1)) * (1 + 2 * gamma(d + 2, self.dtype))
            self.reach = xp.abs(self.centre) + self.eps
        self.entry, self.chain = entry_op(net)

    def m(self, name):
        """max(|lo|, |hi|) of a node (cached: called once a node's bounds are final)."""
        if name not in self._m:
            self._m[name] = magnitude(self.xp, *self.bounds[name])
        return self._m[name]

    # -- one backward pass
    def backward(self, start, lam, const, err):
        """Lower bounds (B, S) of spec . z_start + const - err, with spec = lam (b, S, *shape)."""
        xp = self.xp
        lams, summed = {start: lam}, set()
        for node in reversed(self.net.nodes[: self.index[start] + 1]):
            lam = lams.pop(node.name, None)
            if lam is None:
                continue
            if node.name in self.extra:
                lam = lam + self.extra[node.name]
                summed.add(node.name)
            extra = self.u * self.m(node.name) if node.name in summed else None
            if node.name == self.entry and lam.shape[0] == self.n:
                return self.enter(node, lam, const, err, extra)  # nothing else is left: see __init__
            step = self.step(node, lam)
            if step.err is not None:
                err = err + 2 * step.err
            if extra is not None:
                err = err + 2 * bdot(xp, xp.abs(lam), extra)
            del lam
            if step.const is not None:
                const = const + step.const
                err = err + 2 * self.u * xp.abs(const)
            for name, g in zip(node.inputs, step.grads):
                if g is None:
                    continue
                if name in lams:
                    lams[name] = lams[name] + g
                    summed.add(name)
                else:
                    lams[name] = g
        lam = lams.pop(self.net.input_name, None)
        if lam is not None and self.net.input_name in summed:
            err = err + 2 * bdot(xp, xp.abs(lam), self.u * self.m(self.net.input_name))
        return self.concretize(lam, const, err)

    def step(self, node, lam) -> Step:
        op = get_op(node.op)
        if op.affine:
            return self.affine_step(node, op, lam)
        if node.name in self.lower_slopes:
            return relu_slopes_rule(self.xp, lam, *self.bounds[node.inputs[0]], self.lower_slopes[node.name])
        return backward_rule(op)(self.xp, node, lam, [self.bounds[i] for i in node.inputs])

    def affine_step(self, node, op, lam) -> Step:
        xp = self.xp
        b, s = lam.shape[:2]
        grads = op.linear_t(xp, node, lam.reshape((b * s,) + self.shapes[node.name]))
        grads = tuple(None if g is None else g.reshape((b, s) + self.shapes[i]) for g, i in zip(grads, node.inputs))
        bias = self.bias(node, op)
        const = None if bias is None else bdot(xp, lam, bias)
        weight = self.affine_weight(node, op)
        return Step(grads, const, None if weight is None else bdot(xp, xp.abs(lam), weight))

    def affine_weight(self, node, op):
        """gamma_{n+1} (|L| m_in + |b|): the error weight of an affine step (cached per node)."""
        if node.name not in self._weights:
            xp = self.xp
            weight = None
            terms = transpose_terms(node, op, self.shapes)
            if terms:
                weight = gamma(terms + 1, self.dtype) * op.abs_linear(xp, node, *[self.m(i) for i in node.inputs])
            bias = self.bias(node, op)
            if bias is not None:
                wb = gamma(bias.size + 1, self.dtype) * xp.abs(bias)
                weight = wb if weight is None else weight + wb
            folded = param_error(xp, node, op, [self.m(i) for i in node.inputs])
            if folded is not None:
                weight = folded if weight is None else weight + folded
            self._weights[node.name] = weight
        return self._weights[node.name]

    def enter(self, node, lam, const, err, extra):
        """Backward through the affine op L that reads the input, concretised on the fly:
        lam . L(x) >= lam . L(c) - |L^T lam| . r over the box c +- r (or - eps ||L^T lam||_2 over the
        L2 ball around c), with L^T lam formed a chunk of rows at a time so that it stays in cache.

        Rounding: L(c), its dot with lam and L^T lam are dot products of at most n terms, so they are
        off by gamma_{n+1} |lam| . (|L c| + |L| (|c| + r)) in all; the final sums of non-negative terms
        (|L^T lam| . r, or the sum of squares) are low by at most a factor 1 - gamma_D."""
        xp = self.xp
        op = get_op(node.op)
        centre, weight = self.entry_terms(node, op)
        if extra is not None:
            weight = weight + extra
        bias = self.bias(node, op)
        if bias is not None:
            const = const + bdot(xp, lam, bias)
            err = err + 2 * self.u * xp.abs(const)
        val = bdot(xp, lam, centre)
        err = err + 2 * bdot(xp, xp.abs(lam), weight)
        b, s = lam.shape[:2]
        d = self.centre.shape[1]
        rows = max(1, ENTRY_CHUNK_FLOATS // (b * d))
        parts = []
        for r in range(0, s, rows):
            sub = lam[:, r:r + rows]
            g = op.linear_t(xp, node, sub.reshape((-1,) + self.shapes[node.name]))[0]
            for link in self.chain:  # structural ops between the input and the op: exact
                g = get_op(link.op).linear_t(xp, link, g)[0]
            g = g.reshape(b, sub.shape[1], d)
            if self.norm == "linf":
                mag = xp.abs(g, out=g) if _owns(g) else xp.abs(g)
                parts.append(xp.matmul(mag, self.rad[:, :, None])[..., 0])
            else:
                parts.append(xp.einsum("bsd,bsd->bs", g, g))
        acc = xp.concatenate(parts, axis=1)
        if self.norm == "linf":
            radius = acc * (1 + 2 * gamma(d + 1, self.dtype))
        else:
            radius = self.eps * xp.sqrt(acc) * (1 + 2 * gamma(d + 2, self.dtype))
        return self.finish(const, val, radius, err)

    def entry_terms(self, node, op):
        """L(c) (B, *out) and the rounding weight of ``enter`` (cached)."""
        key = ("entry", node.name)
        if key not in self._weights:
            xp = self.xp
            centre, reach = (a.reshape((self.n,) + self.shapes[self.net.input_name]) for a in (self.centre, self.reach))
            for link in reversed(self.chain):
                centre, reach = (get_op(link.op).forward(xp, link, a) for a in (centre, reach))
            folded = param_error(xp, node, op, [xp.abs(centre) + reach])
            centre = op.linear(xp, node, centre)
            n = max(transpose_terms(node, op, self.shapes), math.prod(self.shapes[node.name]),
                    op.fan_in(node), self.centre.shape[1])
            weight = gamma(n + 2, self.dtype) * (xp.abs(centre) + op.abs_linear(xp, node, reach))
            if folded is not None:
                weight = weight + folded
            bias = self.bias(node, op)
            if bias is not None:
                weight = weight + gamma(bias.size + 1, self.dtype) * xp.abs(bias)
            self._weights[key] = (centre, weight)
        return self._weights[key]

    def bias(self, node, op):
        """The op's constant term broadcast to (1, *out_shape), or None."""
        if node.name not in self._bias:
            b = op.bias(self.xp, node)
            if b is not None:
                shape = self.shapes[node.name]
                b = self.xp.asarray(b, dtype=self.dtype)
                if b.ndim > len(shape):
                    b = b.reshape(b.shape[b.ndim - len(shape):])
                b = self.xp.broadcast_to(b, shape)[None]
            self._bias[node.name] = b
        return self._bias[node.name]

    def concretize(self, lam, const, err):
        """The lower bound of lam . x + const - err over the input region, rounding included."""
        xp = self.xp
        if lam is None:
            val = radius = xp.zeros_like(const)
        else:
            b, s = lam.shape[:2]
            flat = lam.reshape(b, s, -1)
            d = flat.shape[-1]
            gam = gamma(d + 1, self.dtype)
            if self.norm == "linf":
                val = bdot(xp, flat, self.centre)
                if b == 1:
                    r = xp.matmul(xp.abs(flat[0]), self.rad2.transpose(1, 0, 2).reshape(d, -1))
                    r = r.reshape(s, self.n, 2).transpose(1, 0, 2)
                else:
                    mag = xp.abs(flat, out=flat) if _owns(flat) else xp.abs(flat)
                    r = xp.matmul(mag, self.rad2)
                radius = r[..., 0]
                err = err + 2 * gam * r[..., 1]
            else:
                val = bdot(xp, flat, self.centre)
                norm = xp.sqrt(xp.einsum("bsd,bsd->bs", flat, flat)) * (1 + 2 * gamma(d + 2, self.dtype))
                radius = self.eps * norm
                err = err + 2 * gam * norm * self.x0_norm[:, None]
        return self.finish(const, val, radius, err)

    def finish(self, const, val, radius, err):
        """const + val - radius - err, pushed down by the rounding of these few operations."""
        xp, u = self.xp, self.u
        lower = const + val - radius
        err = err + 4 * u * (xp.abs(const) + xp.abs(val) + xp.abs(radius))
        lower = lower - err
        return lower - (u * xp.abs(lower) + float(xp.finfo(self.dtype).tiny))

    # -- intermediate bounds
    def tighten(self, pure: bool, cost: CostModel, budget: float, skip=frozenset()) -> None:
        """CROWN bounds for every node a nonlinear op reads (see the module docstring), except the
        names in ``skip`` (their bounds are kept as they are)."""
        xp = self.xp
        for name in bound_targets(self.net):
            if name in skip:
                continue
            node = self.nodes[name]
            op = get_op(node.op)
            if name == self.entry and self.norm == "linf":
                continue  # one affine op on the input box (after moves): its interval bound is CROWN's
            if isinstance(op, ElementwiseOp) and len(node.inputs) == 1:
                self.bounds[name] = op.interval(xp, node, self.bounds[node.inputs[0]])
                continue
            lo, hi = (a.reshape(self.n, -1) for a in self.bounds[name])
            if pure or not all(c.op in SIGN_STABLE for c in self.net.consumers(name)):
                idx, unstable = xp.arange(lo.shape[1]), None
            else:
                unstable = (lo < 0) & (hi > 0)
                if name in self.recheck:
                    unstable |= self.recheck[name].reshape(self.n, -1)
                idx = xp.nonzero(unstable.any(axis=0))[0]
            if idx.size == 0:
                continue
            chain = patch_chain(self.net, name) if self.patches else None
            lo, hi = lo.copy(), hi.copy()
            if chain is not None and pays(self, chain, int(idx.size)):
                new_lo, new_hi = (a[:, idx] for a in patch_bounds(self, chain, budget - self.n * cost.fixed))
            else:
                idx = self.per_sample(unstable, idx) if self.per_sample_rows else idx
                new_lo, new_hi = self.neuron_bounds(name, idx, cost.rows_per_chunk(name, self.n, budget))
            at = (slice(None), idx) if idx.ndim == 1 else (xp.arange(self.n)[:, None], idx)
            if pure:
                lo[at], hi[at] = new_lo, new_hi
            else:
                lo[at] = xp.maximum(lo[at], new_lo)
                hi[at] = xp.minimum(hi[at], new_hi)
            shape = (self.n,) + self.shapes[name]
            self.bounds[name] = (lo.reshape(shape), hi.reshape(shape))

    def per_sample(self, unstable, idx):
        """The neurons to bound: ``idx`` (k,), unstable in some sample of the batch, or per sample
        (B, k') when each sample's own unstable ones are much fewer (k' <= 0.8 k; a sample with fewer
        than k' fills its row with stable neurons, whose bounds can only tighten too). Each row of a
        backward pass is its own computation, so a neuron bounded either way gets the same number; one
        left out is stable in that sample, where its relaxation is exact whatever its bounds (they
        enter only the rounding allowance)."""
        if unstable is None or self.n == 1:
            return idx
        xp = self.xp
        most = int(unstable.sum(axis=1).max())
        if most > 0.8 * int(idx.size):
            return idx
        return xp.argsort(~unstable, axis=1)[:, :most]  # any order puts the unstable ones first

    def neuron_bounds(self, name, idx, rows):
        """CROWN lower and upper bounds (B, k) of the neurons ``idx`` of node ``name`` (shared (k,)
        or per sample (B, k)), in chunks of ``rows`` specification rows (a neuron takes two: +e_i for
        its lower bound, -e_i for its upper)."""
        xp = self.xp
        size = math.prod(self.shapes[name])
        lows, highs = [], []
        per = max(1, rows // 2)
        for start in range(0, int(idx.shape[-1]), per):
            chunk = idx[..., start:start + per]
            k = int(chunk.shape[-1])
            b = 1 if chunk.ndim == 1 else self.n
            at = (0,) if chunk.ndim == 1 else (xp.arange(b)[:, None],)
            spec = xp.zeros((b, 2 * k, size), dtype=self.dtype)
            spec[at + (xp.arange(k), chunk)] = 1.0
            spec[at + (k + xp.arange(k), chunk)] = -1.0
            zeros = xp.zeros((self.n, 2 * k), dtype=self.dtype)
            lower = self.backward(name, spec.reshape((b, 2 * k) + self.shapes[name]), zeros, zeros)
            lows.append(lower[:, :k])
            highs.append(-lower[:, k:])
        return xp.concatenate(lows, axis=1), xp.concatenate(highs, axis=1)

    # -- the margin specification
    def margins(self, y, cost: CostModel, budget: float):
        """Lower bounds (B, K) of logit[y] - logit[j], +inf at column y."""
        xp = self.xp
        split = split_margin_head(self.net)
        k = split.num_classes
        others = (y[:, None] + xp.arange(1, k)[None, :]) % k  # (B, K-1): every j != y
        zeros = xp.zeros((self.n, k - 1), dtype=self.dtype)
        if split.head is not None:
            start = split.head.inputs[0]
            weight = split.head.params["weight"]
            spec = weight[y][:, None, :] - weight[others]  # one rounding per entry: error u |spec| m
            err = 2 * bdot(xp, xp.abs(spec), self.u * self.m(start))
            bias = split.head.params.get("bias")
            const = zeros if bias is None else bias[y][:, None] - bias[others]
            err = err + 2 * self.u * xp.abs(const)
            spec = spec.reshape((self.n, k - 1) + self.shapes[start])
        else:
            start = self.net.output_name
            eye = xp.eye(k, dtype=self.dtype)
            spec = eye[y][:, None, :] - eye[others]
            const, err = zeros, zeros
        rows = cost.rows_per_chunk(start, self.n, budget)
        lower = xp.concatenate([self.backward(start, spec[:, r:r + rows], const[:, r:r + rows], err[:, r:r + rows])
                                for r in range(0, k - 1, rows)], axis=1)
        out = xp.full((self.n, k), xp.inf, dtype=self.dtype)
        out[xp.arange(self.n)[:, None], others] = lower
        return out


    # -- a general linear specification
    def spec_lower(self, A, c, rows=None):
        """Lower bounds (B, S) of A . out + c over the region, A (b, S, K) with b in {1, B}, c (B, S).

        A final dense layer (W, bias) is folded in: rows A W over its input, constants A bias + c.
        Each entry of A W and A bias is a dot product of K terms (error gamma_{K+1} |A| |W|, resp.
        |A| |bias|), charged against the input's magnitude bound like any affine step."""
        xp = self.xp
        A = xp.asarray(A, dtype=self.dtype)
        c = xp.asarray(c, dtype=self.dtype)
        b, s, k = A.shape
        split = split_margin_head(self.net)
        if split.head is not None:
            start = split.head.inputs[0]
            weight = split.head.params["weight"]
            bias = split.head.params.get("bias")
            g = gamma(k + 1, self.dtype)
            spec = xp.matmul(A, weight)  # (b, S, d)
            err = 2 * g * bdot(xp, xp.matmul(xp.abs(A), xp.abs(weight)), self.m(start))
            err = xp.broadcast_to(err, (self.n, s))
            const = c if bias is None else c + xp.matmul(A, bias)
            if bias is not None:
                err = err + 2 * g * xp.broadcast_to(xp.matmul(xp.abs(A), xp.abs(bias)), (self.n, s))
            const = xp.broadcast_to(const, (self.n, s))
            err = err + 2 * self.u * xp.abs(const)
            spec = spec.reshape((b, s) + self.shapes[start])
        else:
            start = self.net.output_name
            spec, const = A.reshape((b, s) + self.shapes[start]), xp.broadcast_to(c, (self.n, s))
            err = xp.zeros((self.n, s), dtype=self.dtype)
        rows = rows or s
        return xp.concatenate([self.backward(start, spec[:, r:r + rows], const[:, r:r + rows], err[:, r:r + rows])
                               for r in range(0, s, rows)], axis=1)


def _owns(a) -> bool:
    """Whether ``a`` may be overwritten in place (a NumPy array with writeable, non-broadcast data)."""
    flags = getattr(a, "flags", None)
    return bool(getattr(flags, "writeable", False)) and 0 not in a.strides


# ----------------------------------------------------------------------------- entry points
def crown_margin_bounds(net, x, y, eps, norm="linf", domain=(0.0, 1.0), method="crown", memory_mb=None):
    """CROWN lower bounds (N, K) of logit[y] - logit[j] over the eps-ball around x; +inf at column y.

    ``method`` is 'crown' (auto_LiRPA's default), 'crown-pure' (textbook) or 'crown-ibp'; ``norm``
    'linf' (box clipped to ``domain``) or 'l2' (whole ball). ``net`` must end in logits.

    >>> # lower = crown_margin_bounds(net, x, y, 0.1); verified = lower.min(axis=1) > 0
    """
    if method not in METHODS:
        raise InvalidParameterError(f"method={method!r}; expected one of {METHODS}")
    if norm not in ("linf", "l2"):
        raise InvalidParameterError(f"norm={norm!r}; expected 'linf' or 'l2'")
    check_supported(net)
    xp = get_xp(x)
    x = x.astype(net.dtype, copy=False)
    budget = memory_budget(memory_mb)
    cost = CostModel(net, method, x.dtype.itemsize)
    n = int(x.shape[0])
    cost.check(budget)
    workers = thread_count(xp)
    while workers > 1 and cost.minimum()[0] > budget / workers:
        workers -= 1
    share = budget / workers  # each thread works on its own batch within its share of the budget
    batch = cost.batch(n, share)
    count = -(-n // batch)
    count += -count % workers if count > 1 else 0  # as many batches per thread, of even sizes
    batch = -(-n // count)
    starts = range(0, n, batch)

    def bound(start):
        run = _Batch(net, x[start:start + batch], eps, norm, domain)
        if method != "crown-ibp":
            run.tighten(method == "crown-pure", cost, share)
        return run.margins(xp.asarray(y[start:start + batch]), cost, share)

    if workers == 1 or len(starts) == 1:
        return xp.concatenate([bound(start) for start in starts], axis=0)
    from concurrent.futures import ThreadPoolExecutor

    with serial_blas(xp), ThreadPoolExecutor(min(workers, len(starts))) as pool:
        return xp.concatenate(list(pool.map(bound, starts)), axis=0)


def serial_blas(xp):
    """A context holding BLAS to one thread while our threads use the cores (a no-op when there are
    none). Held over a whole certification too: BLAS threads that ran even a forward pass keep
    spinning for a while afterwards, taking a core from the bound threads."""
    if thread_count(xp) == 1:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def thread_count(xp) -> int:
    """Threads that bound separate batches at once: one per CPU core ($ROBEVAL_THREADS overrides) on
    NumPy, where BLAS is held to one thread meanwhile (this needs threadpoolctl; without it, BLAS
    threads alone use the cores); always 1 on CuPy. NumPy releases the GIL in BLAS and ufunc loops,
    so batches overlap nearly perfectly, where BLAS threads would leave the elementwise work serial."""
    if xp.__name__ != "numpy":
        return 1
    env = os.environ.get("ROBEVAL_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise InvalidParameterError(f"$ROBEVAL_THREADS={env!r}; expected a positive integer (1: no threads)")
        cores = int(env)
    elif hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    if cores > 1:
        try:
            import threadpoolctl  # noqa: F401
        except ImportError:
            return 1
    return max(1, cores)


def _register(cls):
    from . import register_certifier

    return register_certifier(cls)


@_register
class CROWN(Certifier):
    """CROWN margin bounds (auto_LiRPA's default intermediate bounds); norm 'linf' or 'l2'."""

    name = "crown"
    method = "crown"  # how intermediate bounds are computed (see METHODS)
    norms = ("linf", "l2")

    def margin_lower(self, net, x, y, eps):
        return crown_margin_bounds(net, x, y, eps, self.norm, self.domain, method=self.method)

    def certify(self, network, x, y, eps):
        with serial_blas(self.xp):
            return super().certify(network, x, y, eps)

    def bytes_per_sample(self, net) -> int:
        check_supported(net)
        cost = CostModel(net, self.method, self.dtype.itemsize)
        cost.check(memory_budget())
        return cost.per_sample()


@_register
class CROWNPure(CROWN):
    """Textbook CROWN: every intermediate bound by CROWN alone."""

    name = method = "crown-pure"


@_register
class CROWNIBP(CROWN):
    """CROWN-IBP: IBP intermediate bounds, CROWN from the output specification."""

    name = method = "crown-ibp"


@_register
class Best(CROWN):
    """IBP, then CROWN-IBP, then CROWN on samples still unknown; the largest lower bound per sample.

    Args:
        time_budget: seconds after which (measured from the start of ``certify``) no further
            refinement starts; a stage already running finishes. None: no limit.
    """

    name = "best"
    method = "crown"  # the most demanding stage, for the memory estimate

    def __init__(self, time_budget: float | None = None, **options):
        super().__init__(**options)
        if time_budget is not None and (not isinstance(time_budget, (int, float)) or not time_budget > 0):
            raise InvalidParameterError(f"time_budget={time_budget!r}; expected a number of seconds > 0 or None")
        self.time_budget = time_budget
        self._deadline = math.inf

    def certify(self, network, x, y, eps):
        self._deadline = time.perf_counter() + self.time_budget if self.time_budget else math.inf
        return super().certify(network, x, y, eps)

    def margin_lower(self, net, x, y, eps):
        xp = get_xp(x)
        lower = ibp_margin_bounds(net, x, y, eps, self.domain)
        z = net.forward(x)
        idx = xp.arange(x.shape[0])
        zy = z[idx, y]
        z[idx, y] = -xp.inf
        promising = zy > z.max(axis=1)  # a wrong or tied clean prediction cannot be verified
        for method in ("crown-ibp", "crown"):
            todo = xp.nonzero(promising & ~(lower.min(axis=1) > 0))[0]
            if todo.size == 0 or time.perf_counter() > self._deadline:
                break
            sub = crown_margin_bounds(net, x[todo], y[todo], eps, self.norm, self.domain, method=method)
            lower[todo] = xp.maximum(lower[todo], sub)
        return lower


__all__ = ["CROWN", "CROWNPure", "CROWNIBP", "Best", "crown_margin_bounds", "METHODS"]
