"""Patches mode: CROWN bounds of every neuron of a convolution at once, with the coefficients of each
neuron kept as a local kernel over its receptive field instead of a dense row over the whole tensor
(auto_LiRPA's "patches" mode, Xu et al. 2020).

The bounds of neuron (o, i, j) of a conv output depend, through a chain of convolutions and
elementwise activations, only on a window of each tensor below it. The coefficients are held as an
array ``coef`` (b, P, R, D): P = Ho * Wo output positions, R = 2 * (output channels) rows (+e for the
lower bounds, then -e for the upper ones) and D = C * kh * kw window entries. Entry (p, q) of the
window of position (i, j) sits at (i * sh - t + p, j * sw - l + q) of the current tensor (``Window``);
entries outside the tensor (its zero padding) are held at zero.

Backward steps, each the dense step restricted to the window:

- elementwise lines (ReLU and the other ops with a ``relax`` rule, alpha slopes included): the line
  maps are unfolded into windows (zero outside the tensor) and applied entry by entry;
- convolution: a transposed convolution of each window (stride s, no padding) with the kernel; the
  window grows to (k - 1) s + d (kc - 1) + 1, its stride becomes s_old * s and its offset t * s + pad;
- at the input: the box (or ball) is concretised over the window.

Rounding is charged exactly as in the dense pass (``robeval.certifiers.crown``): an entry of a
composed window sums a subset of the products of the dense entry, so the same gamma bounds hold,
and each error weight map is unfolded into windows and dotted with |coef|.

Cost: per sample, R * P * (C * K^2) floats per step against the dense R * P * (C * H * W), so the
mode pays when windows are much smaller than the tensors (early layers of a CNN). ``pays`` compares
the two, counting only the neurons the dense pass would bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..backend import gamma
from ..ir.graph import Node
from ..ir.ops.conv import attrs_of, dilate_kernel, pad2d, windows
from ..ir.registry import ElementwiseOp, get_op
from .crown_relax import BACKWARD_RULES, line_weight, relu_alpha_lines, split_signs


@dataclass(frozen=True)
class Window:
    """Where the windows sit on the current tensor: entry (p, q) of output position (i, j) reads
    (i * stride[0] - offset[0] + p, j * stride[1] - offset[1] + q)."""

    stride: tuple
    offset: tuple
    kernel: tuple
    out_hw: tuple

    def through_conv(self, node) -> Window:
        """The windows on the input of conv ``node`` that cover these windows on its output."""
        stride, pads, dilation, _ = attrs_of(node)
        _, _, kh, kw = node.params["weight"].shape
        kernel = tuple((k - 1) * s + d * (kc - 1) + 1 for k, s, d, kc in zip(self.kernel, stride, dilation, (kh, kw)))
        return Window(tuple(a * s for a, s in zip(self.stride, stride)),
                      tuple(o * s + p for o, s, p in zip(self.offset, stride, pads[:2])), kernel, self.out_hw)

    def unfold(self, xp, x):
        """The windows of x (B, C, H, W), zero outside x, as (B, P, C * kh * kw)."""
        n, c, h, w = x.shape
        (sh, sw), (t, l), (kh, kw), (ho, wo) = self.stride, self.offset, self.kernel, self.out_hw
        bottom, right = max(0, (ho - 1) * sh + kh - t - h), max(0, (wo - 1) * sw + kw - l - w)
        padded = pad2d(xp, x, (t, l, bottom, right))
        win = windows(xp, padded, (kh, kw), (sh, sw), (1, 1))[:, :, :ho, :wo]
        return win.transpose(0, 2, 3, 1, 4, 5).reshape(n, ho * wo, c * kh * kw)


def patch_chain(net, name):
    """The nodes from conv ``name`` down to the network input (``name`` first) when every one is a
    single-input conv or elementwise op with lines, on (C, H, W) tensors; otherwise None."""
    nodes = {n.name: n for n in net.nodes}
    node = nodes.get(name)
    if node is None or node.op != "conv":
        return None
    chain = [node]
    while chain[-1].inputs[0] != net.input_name:
        node = nodes[chain[-1].inputs[0]]
        op = get_op(node.op)
        conv = node.op == "conv" and len(node.inputs) == 1
        lines = isinstance(op, ElementwiseOp) and len(node.inputs) == 1 and op.supports("relax") \
            and node.op not in BACKWARD_RULES
        if not (conv or lines):
            return None
        chain.append(node)
    if len(net.input_shape) != 3:
        return None
    return chain


def windows_along(chain, out_hw):
    """The Window on the input of every node of the chain (the target conv first)."""
    target = chain[0]
    stride, pads, dilation, _ = attrs_of(target)
    weight = dilate_kernel(target.params["weight"], dilation) if dilation != (1, 1) else target.params["weight"]
    win = Window(stride, pads[:2], tuple(weight.shape[2:]), tuple(out_hw))
    out = [win]
    for node in chain[1:]:
        if node.op == "conv":
            win = win.through_conv(node)
        out.append(win)
    return out


def pays(run, chain, neurons: int) -> bool:
    """Whether patches move fewer floats than dense rows for ``neurons`` neurons of the target."""
    shapes = run.shapes
    out = shapes[chain[0].name]
    wins = windows_along(chain, out[1:])
    positions = out[1] * out[2]
    patch = dense = 0
    for node, win in zip(chain, wins):
        shape = shapes[node.inputs[0]]
        patch += 2 * out[0] * positions * shape[0] * math.prod(win.kernel)
        dense += 2 * neurons * math.prod(shape)
    return patch < dense


def patch_bounds(run, chain, budget: float):
    """CROWN lower and upper bounds (B, size) of every neuron of conv ``chain[0]``, for the batch
    ``run`` (a ``crown._Batch``), computed a block of output channels at a time within ``budget`` bytes."""
    xp = run.xp
    target = chain[0]
    cout, ho, wo = run.shapes[target.name]
    wins = windows_along(chain, (ho, wo))
    widest = max(run.shapes[node.inputs[0]][0] * math.prod(w.kernel) for node, w in zip(chain, wins))
    per_channel = 4 * 2 * run.n * ho * wo * widest * run.dtype.itemsize
    block = int(max(1, min(cout, budget // max(1, per_channel))))
    lows, highs = [], []
    for start in range(0, cout, block):
        lower = _block_lower(run, chain, wins, range(start, min(cout, start + block)))
        k = lower.shape[-1] // 2
        lows.append(lower[..., :k].transpose(0, 2, 1))  # (B, k, P): channel-major like (C, H, W)
        highs.append(-lower[..., k:].transpose(0, 2, 1))
    shape = (run.n, cout * ho * wo)
    return xp.concatenate(lows, axis=1).reshape(shape), xp.concatenate(highs, axis=1).reshape(shape)


def _block_lower(run, chain, wins, channels):
    """Lower bounds (B, P, 2k) of +z and -z for the k output channels ``channels`` of the target."""
    xp, u = run.xp, run.u
    target = chain[0]
    op = get_op(target.op)
    cout, ho, wo = run.shapes[target.name]
    positions = ho * wo
    sel = slice(channels.start, channels.stop)
    weight = target.params["weight"]
    stride, pads, dilation, groups = attrs_of(target)
    weight = dilate_kernel(weight, dilation) if dilation != (1, 1) else weight
    weight = xp.asarray(weight, dtype=run.dtype)[sel]
    cin = run.shapes[target.inputs[0]][0]
    if groups > 1:  # a dense (Cout, Cin, kh, kw) kernel with zeros outside each output's group
        full = xp.zeros((weight.shape[0], cin) + weight.shape[2:], dtype=run.dtype)
        per_in, per_out = cin // groups, cout // groups
        for i, o in enumerate(range(channels.start, channels.stop)):
            g = o // per_out
            full[i, g * per_in:(g + 1) * per_in] = weight[i]
        weight = full
    k = weight.shape[0]
    flat = weight.reshape(k, -1)
    coef = xp.concatenate([flat, -flat])[None, None]  # (1, 1, 2k, D): the target's rows on its input

    def to_rows(m):  # (B, C, Ho, Wo) map of the target's channels -> (B, P, 2k), both signs
        m = m[:, sel].reshape(m.shape[0], k, positions).transpose(0, 2, 1)
        return xp.concatenate([m, m], axis=-1)

    bias = run.bias(target, op)
    const = xp.zeros((1, 1, 2 * k), dtype=run.dtype)
    if bias is not None:
        b = bias[0, sel, 0, 0]
        const = xp.concatenate([b, -b])[None, None]
    err = 2 * to_rows(run.affine_weight(target, op)) + 2 * u * xp.abs(const)
    for node, win in zip(chain[1:], wins[1:]):
        below = wins[chain.index(node) - 1]  # the windows on this node's output
        if node.op == "conv":
            coef, const, err = _conv_step(run, node, coef, const, err, below, win)
        else:
            coef, const, err = _lines_step(run, node, coef, const, err, below)
    return _concretize(run, coef, const, err, wins[-1])


def _charge(xp, coef, unfolded):
    """Per-row dot products (b, P, R) of coefficients (b, P, R, D) with windows (B, P, D)."""
    return xp.matmul(coef, unfolded[..., None])[..., 0]


def _lines_step(run, node, coef, const, err, win):
    """Backward through an elementwise op (its lines unfolded into the windows)."""
    xp = run.xp
    lo, hi = run.bounds[node.inputs[0]]
    if node.name in run.lower_slopes:
        lines = relu_alpha_lines(xp, lo, hi, run.lower_slopes[node.name])
    else:
        lines = get_op(node.op).relax(xp, node, lo, hi)
    al, bl, au, bu = (win.unfold(xp, a) for a in lines)
    weight = win.unfold(xp, line_weight(xp, lines, lo, hi))
    pos, neg = split_signs(xp, coef)
    const = const + _charge(xp, pos, bl) + _charge(xp, neg, bu)
    err = err + 2 * (_charge(xp, pos, weight) - _charge(xp, neg, weight)) + 2 * run.u * xp.abs(const)
    coef = pos * al[:, :, None] + neg * au[:, :, None]
    return coef, const, err


def _conv_step(run, node, coef, const, err, win, win_in):
    """Backward through a conv: bias and rounding over the (masked) windows, then each window's
    transposed convolution."""
    xp = run.xp
    op = get_op(node.op)
    c, h, w = run.shapes[node.name]
    inside = win.unfold(xp, xp.ones((1, c, h, w), dtype=run.dtype))  # 0 where a window leaves the tensor
    coef = coef * inside[:, :, None]
    bias = run.bias(node, op)
    if bias is not None:
        const = const + _charge(xp, coef, win.unfold(xp, bias))
    err = err + 2 * _charge(xp, xp.abs(coef), win.unfold(xp, run.affine_weight(node, op))) + 2 * run.u * xp.abs(const)
    return xp.matmul(coef, window_map(run, node, win, win_in)), const, err


def window_map(run, node, win, win_in):
    """The matrix (D, D_in) that maps one window on the output of conv ``node`` to the window on its
    input: the transposed convolution without padding, the same for every position (cached). Its
    entries are single kernel weights or zeros, so the product sums the dense step's products, plus
    exact zeros, and the dense step's rounding bound holds."""
    key = ("window", node.name, win.kernel)
    if key not in run._weights:
        xp = run.xp
        c = run.shapes[node.name][0]
        stride, _, dilation, groups = attrs_of(node)
        cin = run.shapes[node.inputs[0]][0]
        local = Node(node.name, "conv", node.inputs, node.params,
                     {"stride": stride, "padding": (0, 0, 0, 0), "dilation": dilation, "groups": groups,
                      "in_shape": (cin,) + win_in.kernel})
        d = c * math.prod(win.kernel)
        basis = xp.eye(d, dtype=run.dtype).reshape((d, c) + win.kernel)
        run._weights[key] = get_op("conv").linear_t(xp, local, basis)[0].reshape(d, -1)
    return run._weights[key]


def _concretize(run, coef, const, err, win):
    """The lower bound over the input region of coef . x + const - err, rounding included."""
    xp = run.xp
    shape = (run.n,) + run.shapes[run.net.input_name]
    inside = win.unfold(xp, xp.ones((1,) + shape[1:], dtype=run.dtype))
    coef = coef * inside[:, :, None]
    d = coef.shape[-1]
    gam = gamma(d + 1, run.dtype)
    val = _charge(xp, coef, win.unfold(xp, run.centre.reshape(shape)))
    mag = xp.abs(coef)
    if run.norm == "linf":
        radius = _charge(xp, mag, win.unfold(xp, run.rad.reshape(shape)))
        err = err + 2 * gam * _charge(xp, mag, win.unfold(xp, run.rad2[..., 1].reshape(shape)))
    else:
        norm = xp.sqrt(xp.einsum("bprd,bprd->bpr", coef, coef)) * (1 + 2 * gamma(d + 2, run.dtype))
        radius = run.eps * norm
        err = err + 2 * gam * norm * run.x0_norm[:, None, None]
    return run.finish(xp.broadcast_to(const, val.shape), val, radius, err)
