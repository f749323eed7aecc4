"""alpha-CROWN / beta-CROWN parameter search on chain networks, with exact gradients and no torch.

A chain is a network whose nodes each read the previous node only (flatten, dense, conv, relu, ...,
dense): the mnist_fc and most VNN-COMP MLP/CNN benchmarks. For a fixed choice of the free
parameters, the CROWN bound of one specification row c + a . f(x) over a box is

    bound = const + lam_0 . centre - |lam_0| . radius,

built backwards: through an affine op lam_in = L^T lam (const += lam . bias); through an elementwise
op with lines al x + bl <= f(x) <= au x + bu, lam_in = (lam >= 0 ? al : au) lam (const += lam+ bl +
lam- bu). The free parameters are the lower slopes al = alpha in [0, 1] of unstable ReLUs
(alpha-CROWN, Xu et al. 2021) and, on a branch-and-bound subdomain where some pre-activations h_j
are fixed to a sign s_j, multipliers beta_j >= 0 of the valid terms -beta_j s_j h_j >= ... (added to
lam at h; beta-CROWN, Wang et al. 2021).

With the sign pattern of every lam fixed, the bound is linear in each lam, and its derivative with
respect to the coefficients at a node is the "signal" obtained by pushing the box corner that
minimises the last step (x* = lo where lam_0 > 0, else hi) forwards through the chosen lines. So one
backward and one forward pass give the bound and its exact (sub)gradient in every alpha and beta.

These bounds are computed without rounding terms, in float32 by default (half the memory traffic
and twice the GEMM speed of float64), and serve only to choose parameters; the verdict always comes
from ``robeval.verify.bounds`` (rigorous, float64) with the chosen parameters."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy

from ..ir.registry import ElementwiseOp, get_op
from .bounds import domain_lower, narrow_node, split_clamp, unstable_rows


class NotAChain(ValueError):
    """The network has a node with several inputs or consumers, or an op the chain engine lacks."""


def chain_nodes(net) -> list:
    """The nodes of ``net`` in order when it is a chain of affine and elementwise ops, else NotAChain."""
    previous = net.input_name
    for node in net.nodes:
        op = get_op(node.op)
        fanout = len(net.consumers(previous))
        if fanout != 1:
            raise NotAChain(f"node '{previous}' feeds {fanout} nodes")
        if list(node.inputs) != [previous]:
            raise NotAChain(f"node '{node.name}' does not read only the node before it")
        if not op.affine and not (isinstance(op, ElementwiseOp) and hasattr(op, "relax")):
            raise NotAChain(f"op '{node.op}' (node '{node.name}') has no chain rule")
        previous = node.name
    return list(net.nodes)


@dataclass
class ChainBound:
    """Bounds (B,) and exact gradients of one evaluation; ``lam`` at each ReLU output (for branching)
    and ``corner`` the input point (B, D) that attains the last step's minimum."""

    bound: numpy.ndarray
    grad_alpha: dict
    grad_beta: dict
    lam: dict
    corner: numpy.ndarray


class Chain:
    """The chain engine over fixed node bounds (from the rigorous engine, B = 1 or per domain).

    ``nodes`` keep the network's float64 parameters (exact affine pieces for the leaf LPs); the
    optimiser's passes run on a copy in ``dtype``. Node bounds, and so which neurons are stable, stay
    float64."""

    def __init__(self, net, bounds: dict, lo, hi, dtype=numpy.float32):
        self.net = net
        self.nodes = chain_nodes(net)
        self.dtype = numpy.dtype(dtype)
        self.fast = list(net.astype(self.dtype).nodes) if self.dtype != numpy.float64 else self.nodes
        self.bounds = bounds  # node name -> (lo, hi), each (b, *shape) with b in {1, B}
        self.lo = numpy.asarray(lo, dtype=numpy.float64).reshape(lo.shape[0], -1)
        self.hi = numpy.asarray(hi, dtype=numpy.float64).reshape(hi.shape[0], -1)
        self.relus = [n.name for n in self.nodes if n.op == "relu"]
        self.relu_input = {n.name: n.inputs[0] for n in self.nodes if n.op == "relu"}
        self.shapes = net.shapes()
        self._bias = {n.name: get_op(n.op).bias(numpy, n) for n in self.nodes if get_op(n.op).affine}
        self._fast_bias = {n.name: get_op(n.op).bias(numpy, n) for n in self.fast if get_op(n.op).affine}

    def with_bounds(self, bounds: dict) -> Chain:
        """The same chain over other node bounds (name -> (lo, hi), e.g. each domain's own); the
        names not given keep this chain's."""
        if not bounds:
            return self
        view = copy.copy(self)
        view.bounds = {**self.bounds, **bounds}
        return view

    def pre_bounds(self, relu, splits):
        """(lo, hi) of the ReLU's input with the subdomain's splits applied (s = +1: h >= 0, -1: h <= 0)."""
        lo, hi = self.bounds[self.relu_input[relu]]
        s = splits.get(relu)
        if s is None:
            return lo, hi
        return split_clamp(lo, hi, s)

    def unstable(self, relu, splits):
        lo, hi = self.pre_bounds(relu, splits)
        return (lo < 0) & (hi > 0)

    def lines(self, splits: dict) -> dict:
        """Per nonlinear node: (free, al, bl, au, bu), its relaxation lines on the domains' bounds
        (free: the unstable ReLU entries where alpha applies), computed in float64 and stored in the
        engine's dtype. They change only with the splits."""
        out = {}
        for node in self.nodes:
            op = get_op(node.op)
            if op.affine:
                continue
            if node.op == "relu":
                lo, hi = self.pre_bounds(node.name, splits)
            else:
                lo, hi = self.bounds[node.inputs[0]]
            al, bl, au, bu = (numpy.asarray(a, dtype=self.dtype) for a in op.relax(numpy, node, lo, hi))
            out[node.name] = ((lo < 0) & (hi > 0) if node.op == "relu" else None, al, bl, au, bu)
        return out

    def evaluate(self, A, c, alpha: dict, beta: dict, splits: dict, need_grad: bool = True,
                 lines: dict | None = None) -> ChainBound:
        """The bound of c + A . f(x) (A (B, K), c (B,)) per domain, and its gradients; ``lines``:
        ``self.lines(splits)`` when the caller has it."""
        lines = self.lines(splits) if lines is None else lines
        dt = self.dtype
        alpha = {k: v.astype(dt, copy=False) for k, v in alpha.items()}
        beta = {k: v.astype(dt, copy=False) for k, v in beta.items()}
        splits = {k: v.astype(dt, copy=False) for k, v in splits.items()}
        n = A.shape[0]
        lam = A.reshape((n,) + self.shapes[self.net.output_name]).astype(dt)
        const = numpy.asarray(c, dtype=numpy.float64).copy()
        saved, lam_out = {}, {}
        for node in reversed(self.fast):
            op = get_op(node.op)
            if op.affine:
                bias = self._fast_bias[node.name]
                if bias is not None:
                    const += (lam * bias).reshape(n, -1).sum(axis=1)
                lam = op.linear_t(numpy, node, lam)[0]
                continue
            free, al, bl, au, bu = lines[node.name]
            if node.name in alpha:
                al = numpy.where(free, alpha[node.name], al)
            # the chosen line per entry (lower where lam >= 0), blended arithmetically: exact for 0/1
            # weights and several times faster than numpy.where on broadcast operands
            pos = (lam >= 0).astype(dt)
            neg = 1 - pos
            slope = al * pos
            slope += au * neg
            icpt = bl * pos
            icpt += bu * neg
            const += numpy.einsum("ij,ij->i", lam.reshape(n, -1), icpt.reshape(n, -1))
            saved[node.name] = (pos, slope, icpt)
            lam_out[node.name] = lam
            lam = slope * lam
            if node.name in beta:
                lam -= beta[node.name] * splits[node.name]
        flat = lam.reshape(n, -1)
        corner = numpy.where(flat > 0, self.lo, self.hi)
        bound = const + (flat * corner).sum(axis=1)
        grad_alpha, grad_beta = {}, {}
        if need_grad:
            g = corner.reshape((n,) + tuple(self.net.input_shape)).astype(dt)
            for node in self.fast:
                op = get_op(node.op)
                if op.affine:
                    g = op.linear(numpy, node, g)
                    bias = self._fast_bias[node.name]
                    if bias is not None:
                        g += bias
                    continue
                pos, slope, icpt = saved[node.name]
                if node.name in alpha:
                    grad = g * lam_out[node.name]
                    grad *= pos
                    grad *= lines[node.name][0]
                    grad_alpha[node.name] = grad
                if node.name in beta:
                    grad_beta[node.name] = -g * splits[node.name]
                g = g * slope
                g += icpt
        return ChainBound(bound, grad_alpha, grad_beta, lam_out, corner)


class Adam:
    """Projected Adam ascent on a dict of arrays (alpha clipped to [0, 1], beta to >= 0), updated in
    place in the parameters' own dtype."""

    def __init__(self, params: dict, lr: float, low: float, high: float):
        self.params, self.lr, self.low, self.high = params, lr, low, high
        self.m = {k: numpy.zeros_like(v) for k, v in params.items()}
        self.v = {k: numpy.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, grads: dict, active=None):
        self.t += 1
        b1, b2 = 0.9, 0.999
        rate = self.lr * math.sqrt(1 - b2 ** self.t) / (1 - b1 ** self.t)  # both bias corrections
        for k, g in grads.items():
            if active is not None:
                g = g * active.reshape((-1,) + (1,) * (g.ndim - 1))
            m, v, p = self.m[k], self.v[k], self.params[k]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            step = numpy.sqrt(v)
            step += 1e-8 * math.sqrt(1 - b2 ** self.t)
            numpy.divide(m, step, out=step)
            step *= rate
            p += step
            numpy.clip(p, self.low, self.high, out=p)


def initial_alpha(chain: Chain, n: int, splits: dict) -> dict:
    """CROWN's adaptive slopes (1 where hi > -lo, else 0) as the starting point, per domain."""
    alpha = {}
    for relu in chain.relus:
        lo, hi = chain.pre_bounds(relu, splits)
        lo, hi = numpy.broadcast_to(lo, (n,) + lo.shape[1:]), numpy.broadcast_to(hi, (n,) + hi.shape[1:])
        alpha[relu] = (hi > -lo).astype(numpy.float64)
    return alpha


def optimise(chain: Chain, A, c, alpha: dict, beta: dict, splits: dict, iterations: int = 20,
             lr_alpha: float = 0.1, lr_beta: float = 0.05, stop_at: float = 0.0, deadline: float | None = None):
    """Maximise the chain bound over alpha (and beta) by projected Adam; returns the best parameters
    seen per domain and their (unrounded) bounds. Domains whose bound passes ``stop_at`` stop moving;
    at ``deadline`` (a ``time.perf_counter()`` value) the best so far is returned."""
    dt = chain.dtype  # the optimiser's state lives in the engine's dtype; results go back as float64
    alpha = {k: v.astype(dt) for k, v in alpha.items()}
    beta = {k: v.astype(dt) for k, v in beta.items()}
    splits = {k: v.astype(dt, copy=False) for k, v in splits.items()}
    opt_a = Adam(alpha, lr_alpha, 0.0, 1.0)
    opt_b = Adam(beta, lr_beta, 0.0, numpy.inf) if beta else None
    lines = chain.lines(splits)
    best = chain.evaluate(A, c, alpha, beta, splits, need_grad=False, lines=lines).bound
    best_alpha = {k: v.copy() for k, v in alpha.items()}
    best_beta = {k: v.copy() for k, v in beta.items()}
    for _ in range(iterations):
        active = best <= stop_at
        if not active.any() or (deadline is not None and time.perf_counter() > deadline):
            break
        result = chain.evaluate(A, c, opt_a.params, opt_b.params if opt_b else {}, splits, lines=lines)
        better = result.bound > best
        best = numpy.where(better, result.bound, best)
        for k in best_alpha:
            best_alpha[k][better] = opt_a.params[k][better]
        for k in best_beta:
            best_beta[k][better] = opt_b.params[k][better]
        opt_a.step(result.grad_alpha, active)
        if opt_b:
            opt_b.step(result.grad_beta, active)
    final = chain.evaluate(A, c, opt_a.params, opt_b.params if opt_b else {}, splits, need_grad=False,
                           lines=lines).bound
    better = final > best
    for k in best_alpha:
        best_alpha[k][better] = opt_a.params[k][better]
    for k in best_beta:
        best_beta[k][better] = opt_b.params[k][better]
    best_alpha = {k: v.astype(numpy.float64, copy=False) for k, v in best_alpha.items()}
    best_beta = {k: v.astype(numpy.float64, copy=False) for k, v in best_beta.items()}
    return best_alpha, best_beta, numpy.maximum(best, final)


__all__ = ["Chain", "ChainBound", "NotAChain", "chain_nodes", "initial_alpha", "optimise"]


def optimised_rows(net, root, lo, hi, A, c, iterations: int, lr: float, deadline: float | None = None,
                   dtype=numpy.float32):
    """alpha-CROWN on rows (A, c) of ``net`` over ``root``'s bounds: the chain, the slopes optimised
    per row, and the rigorous engine's lower bounds with them (the verdict; the optimiser only chooses)."""
    chain = Chain(net, root.bounds, lo, hi, dtype)
    alpha, _, _ = optimise(chain, A, c, initial_alpha(chain, len(c), {}), {}, {}, iterations, lr, deadline=deadline)
    return chain, alpha, domain_lower(net, root, lo, hi, A, c, alpha, relu_inputs=chain.relu_input)


def tighten_intermediate(net, root, lo, hi, iterations: int = 20, deadline: float | None = None,
                         lr: float = 0.1) -> int:
    """alpha-CROWN intermediate bounds: for each ReLU input after the first, the bounds of its
    unstable neurons with slopes optimised per neuron and bound, computed by the rigorous engine on
    the network's prefix and intersected with ``root``'s bounds (in place, layer by layer, so later
    layers use the tighter ones). Returns how many neurons became stable."""
    chain = Chain(net, root.bounds, lo, hi)
    stabilised = 0
    for relu in chain.relus[1:]:
        if deadline is not None and time.perf_counter() > deadline:
            break
        h = chain.relu_input[relu]
        idx, A = unstable_rows(root, h)
        if not len(idx):
            continue
        _, _, low = optimised_rows(net.prefix(h), root, lo, hi, A, numpy.zeros(len(A)), iterations, lr, deadline)
        stabilised += narrow_node(root, h, relu, idx, low)
    return stabilised
