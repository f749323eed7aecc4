"""Layer 1 of the test plan (STYLE.md, "Ops"): every registered op against something independent.

A table of cases (op, a small Network around it with random weights, a torch reference) in the
spirit of tinygrad's ``helper_test_op`` and sklearn's ``parametrize_with_checks``. Each case is run
in float64 through:

1. ``forward`` against torch.nn.functional (1e-10);
2. ``vjp`` against ``torch.autograd.grad`` with a random cotangent (1e-10; inputs without ties);
3. ``interval`` soundness with zero tolerance (sampled points, box corners, a tiny box), tightness
   for monotone ops and, for affine ops, against the exact box image M c + b +- |M| r;
4. Lipschitz bounds against random pairs, sampled Jacobians and explicit matrices;
5. CROWN relaxations (relu, leaky_relu, clip) against sampled points and the textbook choice;
6. float32 intervals at eps = 0 enclosing the float64 forward (the rounding term is big enough).

The table must cover ``robeval.ir.OPS`` exactly, so a new op without a case fails here.
Torch runs in float64 on CPU; the whole file takes a few seconds.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robeval.errors import (
    DataRangeError,
    InputShapeError,
    NetworkError,
    RobevalError,
    UnsupportedRuleError,
)
from robeval.ir import OPS, Network, Node, get_op, register
from robeval.ir.registry import RULES, AffineOp, MonotoneOp, Op

N_POINTS = 2000  # sampled points per interval box
N_PAIRS = 500  # random pairs per Lipschitz check
MAX_CORNER_ENTRIES = 10  # enumerate all 2**n corners of boxes with at most this many entries

# ----------------------------------------------------------------------------- builders


def _dense(name: str, rng, n_out: int, n_in: int, src: str = "input", bias: bool = True) -> Node:
    params = {"weight": rng.normal(size=(n_out, n_in)) / math.sqrt(n_in)}
    if bias:
        params["bias"] = rng.normal(size=n_out)
    return Node(name, "dense", (src,), params)


def _conv(name: str, rng, cin: int, cout: int, kernel=(3, 3), groups: int = 1, src: str = "input",
          bias: bool = True, **attrs) -> Node:
    fan = cin // groups * kernel[0] * kernel[1]
    params = {"weight": rng.normal(size=(cout, cin // groups) + tuple(kernel)) / math.sqrt(fan)}
    if bias:
        params["bias"] = rng.normal(size=cout)
    return Node(name, "conv", (src,), params, dict(attrs, groups=groups))


def _node(op: str, inputs=("input",), **attrs) -> Callable:
    """Builder of a one-node network (the node is called 'op')."""
    return lambda rng: [Node("op", op, tuple(inputs), {}, dict(attrs))]


def _scale_node(rng, shape, name="op", src="input", op="scale") -> Node:
    scale = rng.normal(size=shape) * 1.5  # both signs: the interval rule must pick the ends by sign
    return Node(name, op, (src,), {"scale": scale, "shift": rng.normal(size=shape)})


def _batchnorm_node(rng, channels: int, spatial: bool) -> Node:
    """Inference batch norm as adapters store it: the raw statistics, folded by the op itself."""
    shape = (channels, 1, 1) if spatial else (channels,)
    stats = {"gamma": rng.normal(size=channels), "beta": rng.normal(size=channels),
             "mean": rng.normal(size=channels), "var": rng.uniform(0.1, 2.0, size=channels)}
    return Node("op", "batchnorm", ("input",), {k: v.reshape(shape) for k, v in stats.items()}, {"eps": 1e-5})


def _divisor_node(rng, shape) -> Node:
    """x / c + b with divisors of both signs (ONNX Div by a constant): 1 / c rounds when folded."""
    divisor = rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.3, 3.0, size=shape)
    return Node("op", "scale", ("input",), {"divisor": divisor, "shift": rng.normal(size=shape)})


def _prelu_node(rng, shape) -> Node:
    """Learned slopes of every kind: negative (|x|-like), in [0, 1], and above 1 (concave)."""
    slope = rng.choice([-2.5, -1.0, -0.3, 0.0, 0.25, 1.0, 1.7], size=shape)
    return Node("op", "prelu", ("input",), {"slope": slope})


# ----------------------------------------------------------------------------- torch references


def _p(net: Network, node: str, key: str):
    value = net.node(node).params.get(key)
    return None if value is None else torch.from_numpy(np.asarray(value, dtype=np.float64))


def _tdense(net, x, name="op"):
    return F.linear(x, _p(net, name, "weight"), _p(net, name, "bias"))


def _tconv(net, x, name="op"):
    a = net.node(name).attrs
    t, l, b, r = a.get("padding", (0, 0, 0, 0))
    x = F.pad(x, (l, r, t, b))  # torch's own padding is symmetric only
    return F.conv2d(x, _p(net, name, "weight"), _p(net, name, "bias"), stride=tuple(a.get("stride", (1, 1))),
                    dilation=tuple(a.get("dilation", (1, 1))), groups=a.get("groups", 1))


def _tscale(net, x, name="op"):
    if "divisor" in net.node(name).params:
        return x / _p(net, name, "divisor") + _p(net, name, "shift")
    return x * _p(net, name, "scale") + _p(net, name, "shift")


def _tbatchnorm(net, x):
    node = net.node("op")
    gamma, beta, mean, var = (_p(net, "op", k).reshape(-1) for k in ("gamma", "beta", "mean", "var"))
    return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=float(node.attrs["eps"]))


def _tprelu(net, x):
    return torch.where(x > 0, x, x * _p(net, "op", "slope"))


def _tmaxpool(net, x):
    a = net.node("op").attrs
    t, l, b, r = a.get("padding", (0, 0, 0, 0))
    x = F.pad(x, (l, r, t, b), value=-math.inf)
    return F.max_pool2d(x, tuple(a["kernel"]), tuple(a.get("stride", a["kernel"])))


def _tavgpool(net, x):
    a = net.node("op").attrs
    t, l, b, r = a.get("padding", (0, 0, 0, 0))
    kernel, stride = tuple(a["kernel"]), tuple(a.get("stride", a["kernel"]))
    if a.get("count_include_pad", False):
        return F.avg_pool2d(F.pad(x, (l, r, t, b)), kernel, stride)
    assert (t, l) == (b, r)  # symmetric: torch pads itself and leaves the pad out of the divisor
    return F.avg_pool2d(x, kernel, stride, padding=(t, l), count_include_pad=False)


def _tgroupsort(net, x):
    k = net.node("op").attrs["group_size"]
    grouped = x.reshape((x.shape[0], x.shape[1] // k, k) + tuple(x.shape[2:]))
    return grouped.sort(dim=2).values.reshape(x.shape)


def _tclip(low, high):
    return lambda net, x: torch.clamp(x, low, high)


def _tslice(net, x):
    a = net.node("op").attrs
    index = [slice(None)] * x.ndim
    index[a["axis"]] = slice(a["start"], a["stop"], a.get("step", 1))
    return x[tuple(index)]


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """One op under test: a network whose last node 'op' is the op, and its torch reference."""

    id: str
    op: str
    input_shape: tuple[int, ...]
    build: Callable  # rng -> list of Nodes, the last one named 'op'
    ref: Callable  # (network, float64 tensor (N, *input_shape)) -> tensor
    explicit_norm: bool = False  # compare the Lipschitz bound with the explicit matrix's norm
    max_norm_ratio: float | None = None  # the bound may exceed the explicit norm by at most this factor

    def network(self) -> Network:
        rng = np.random.default_rng(zlib.crc32(self.id.encode()))
        return Network(self.build(rng), self.input_shape)

    def rng(self, salt: str):
        return np.random.default_rng(zlib.crc32((self.id + salt).encode()))


def _two_dense(op: str, n: int = 6, bias=True):
    """op(dense_a(x), dense_b(x)): two branches that never tie."""
    return lambda rng: [_dense("a", rng, n, n), _dense("b", rng, n, n, bias=bias), Node("op", op, ("a", "b"))]


CONV_ATTRS = {
    "conv": dict(padding=(1, 1, 1, 1)),
    "conv_stride2": dict(stride=(2, 2), padding=(1, 1, 1, 1)),
    "conv_pad1021": dict(padding=(1, 0, 2, 1)),
    "conv_dilation2": dict(dilation=(2, 2), padding=(2, 2, 2, 2)),
    "conv_all": dict(stride=(2, 1), padding=(1, 0, 2, 1), dilation=(2, 1)),
}

CASES = [
    Case("dense", "dense", (6,), lambda rng: [_dense("op", rng, 4, 6)], _tdense, explicit_norm=True),
    Case("dense_nobias", "dense", (5,), lambda rng: [_dense("op", rng, 5, 5, bias=False)], _tdense,
         explicit_norm=True),
    Case("conv", "conv", (2, 5, 5), lambda rng: [_conv("op", rng, 2, 3, **CONV_ATTRS["conv"])], _tconv,
         explicit_norm=True, max_norm_ratio=1.5),
    Case("conv_stride2", "conv", (2, 6, 6), lambda rng: [_conv("op", rng, 2, 3, **CONV_ATTRS["conv_stride2"])],
         _tconv, explicit_norm=True),
    Case("conv_pad1021", "conv", (2, 5, 5), lambda rng: [_conv("op", rng, 2, 3, **CONV_ATTRS["conv_pad1021"])],
         _tconv, explicit_norm=True, max_norm_ratio=1.5),
    Case("conv_dilation2", "conv", (2, 5, 5),
         lambda rng: [_conv("op", rng, 2, 2, **CONV_ATTRS["conv_dilation2"])], _tconv, explicit_norm=True,
         max_norm_ratio=1.5),
    Case("conv_groups2", "conv", (4, 5, 5), lambda rng: [_conv("op", rng, 4, 4, groups=2, padding=(1, 1, 1, 1))],
         _tconv, explicit_norm=True, max_norm_ratio=1.5),
    Case("conv_all_groups2", "conv", (4, 6, 5),
         lambda rng: [_conv("op", rng, 4, 6, kernel=(3, 2), groups=2, bias=False, **CONV_ATTRS["conv_all"])],
         _tconv, explicit_norm=True),
    Case("scale_per_channel", "scale", (3, 4, 4), lambda rng: [_scale_node(rng, (3, 1, 1))], _tscale,
         explicit_norm=True),
    Case("scale_scalar", "scale", (5,), lambda rng: [_scale_node(rng, ())], _tscale, explicit_norm=True),
    Case("scale_divisor", "scale", (3, 2, 2), lambda rng: [_divisor_node(rng, (3, 1, 1))], _tscale,
         explicit_norm=True),
    Case("batchnorm_image", "batchnorm", (3, 2, 2), lambda rng: [_batchnorm_node(rng, 3, True)], _tbatchnorm,
         explicit_norm=True),
    Case("batchnorm_features", "batchnorm", (4,), lambda rng: [_batchnorm_node(rng, 4, False)], _tbatchnorm,
         explicit_norm=True),
    Case("add_residual", "add", (5,),
         lambda rng: [_dense("d", rng, 5, 5), Node("r", "relu", ("d",)), Node("op", "add", ("input", "r"))],
         lambda net, x: x + F.relu(_tdense(net, x, "d"))),
    # a (C,1,1) branch broadcast over the image: its norm grows by sqrt(H*W) on the way
    Case("add_broadcast", "add", (2, 3, 3),
         lambda rng: [Node("g", "global_avgpool", ("input",)), Node("op", "add", ("input", "g"))],
         lambda net, x: x + x.mean(dim=(2, 3), keepdim=True)),
    Case("sub_residual", "sub", (5,),
         lambda rng: [_dense("d", rng, 5, 5), Node("t", "tanh", ("d",)), Node("op", "sub", ("input", "t"))],
         lambda net, x: x - torch.tanh(_tdense(net, x, "d"))),
    Case("sub_broadcast", "sub", (2, 3, 3),
         lambda rng: [Node("g", "global_avgpool", ("input",)), Node("op", "sub", ("input", "g"))],
         lambda net, x: x - x.mean(dim=(2, 3), keepdim=True)),
    Case("relu", "relu", (7,), _node("relu"), lambda net, x: F.relu(x)),
    Case("leaky_relu_0.1", "leaky_relu", (7,), _node("leaky_relu", alpha=0.1),
         lambda net, x: F.leaky_relu(x, 0.1)),
    Case("leaky_relu_2", "leaky_relu", (7,), _node("leaky_relu", alpha=2.0),
         lambda net, x: F.leaky_relu(x, 2.0)),
    # negative slopes make the op |x|-like (not monotone): the minimum can sit inside the box
    Case("leaky_relu_-1", "leaky_relu", (7,), _node("leaky_relu", alpha=-1.0),
         lambda net, x: F.leaky_relu(x, -1.0)),
    Case("leaky_relu_-3", "leaky_relu", (7,), _node("leaky_relu", alpha=-3.0),
         lambda net, x: F.leaky_relu(x, -3.0)),
    Case("prelu_channels", "prelu", (7, 2, 2), lambda rng: [_prelu_node(rng, (7, 1, 1))], _tprelu),
    Case("prelu_features", "prelu", (7,), lambda rng: [_prelu_node(rng, (7,))], _tprelu),
    Case("prelu_shared_negative", "prelu", (6,),
         lambda rng: [Node("op", "prelu", ("input",), {"slope": np.array(-0.5)})], _tprelu),
    Case("sigmoid", "sigmoid", (7,), _node("sigmoid"), lambda net, x: torch.sigmoid(x)),
    Case("tanh", "tanh", (7,), _node("tanh"), lambda net, x: torch.tanh(x)),
    Case("clip_low", "clip", (7,), _node("clip", low=-0.5), _tclip(-0.5, None)),
    # thresholds exact in float32: a float32 run clips at float32(t), as float32 frameworks do
    Case("clip_high", "clip", (7,), _node("clip", high=0.75), _tclip(None, 0.75)),
    Case("clip_both", "clip", (7,), _node("clip", low=-0.5, high=0.75), _tclip(-0.5, 0.75)),
    Case("identity", "identity", (2, 3), _node("identity"), lambda net, x: x),
    Case("softmax", "softmax", (6,), _node("softmax"), lambda net, x: torch.softmax(x, -1)),
    Case("softmax_channels", "softmax", (3, 2, 2), _node("softmax", axis=1), lambda net, x: torch.softmax(x, 1)),
    Case("log_softmax", "log_softmax", (6,), _node("log_softmax"), lambda net, x: torch.log_softmax(x, -1)),
    Case("log_softmax_axis1", "log_softmax", (5,), _node("log_softmax", axis=1),
         lambda net, x: torch.log_softmax(x, 1)),
    Case("maxpool_overlap", "maxpool", (2, 7, 7), _node("maxpool", kernel=(3, 3), stride=(2, 2),
                                                        padding=(1, 1, 1, 1)), _tmaxpool),
    Case("maxpool_asym_pad", "maxpool", (2, 5, 6), _node("maxpool", kernel=(2, 3), stride=(2, 1),
                                                         padding=(0, 1, 1, 0)), _tmaxpool),
    Case("avgpool_include_pad", "avgpool", (2, 6, 6),
         _node("avgpool", kernel=(3, 3), stride=(2, 2), padding=(1, 0, 1, 1), count_include_pad=True),
         _tavgpool, explicit_norm=True),
    Case("avgpool_exclude_pad", "avgpool", (2, 6, 6),
         _node("avgpool", kernel=(3, 3), stride=(2, 2), padding=(1, 1, 1, 1), count_include_pad=False),
         _tavgpool, explicit_norm=True),
    Case("avgpool_nopad", "avgpool", (1, 6, 5), _node("avgpool", kernel=(2, 2)), _tavgpool, explicit_norm=True),
    Case("global_avgpool", "global_avgpool", (3, 4, 5), _node("global_avgpool"),
         lambda net, x: x.mean(dim=(2, 3), keepdim=True), explicit_norm=True),
    Case("flatten", "flatten", (2, 3, 2), _node("flatten"), lambda net, x: x.flatten(1)),
    Case("reshape", "reshape", (2, 3, 2), _node("reshape", shape=(3, 4)), lambda net, x: x.reshape(-1, 3, 4)),
    Case("transpose", "transpose", (2, 3, 4), _node("transpose", perm=(0, 2, 3, 1)),
         lambda net, x: x.permute(0, 2, 3, 1)),
    Case("concat_branches", "concat", (4,),
         lambda rng: [_dense("d", rng, 3, 4), Node("t", "tanh", ("input",)), Node("op", "concat", ("d", "t"),
                                                                                  attrs={"axis": 1})],
         lambda net, x: torch.cat([_tdense(net, x, "d"), torch.tanh(x)], 1)),
    Case("concat_images", "concat", (2, 3, 3),
         lambda rng: [_conv("c", rng, 2, 1, padding=(1, 1, 1, 1)), Node("op", "concat", ("input", "c"),
                                                                         attrs={"axis": 1})],
         lambda net, x: torch.cat([x, _tconv(net, x, "c")], 1)),
    Case("slice_step2", "slice", (3, 7, 2), _node("slice", axis=2, start=1, stop=7, step=2), _tslice),
    Case("max", "max", (6,), _two_dense("max"),
         lambda net, x: torch.maximum(_tdense(net, x, "a"), _tdense(net, x, "b"))),
    Case("min", "min", (6,), _two_dense("min", bias=False),
         lambda net, x: torch.minimum(_tdense(net, x, "a"), _tdense(net, x, "b"))),
    Case("groupsort_2", "groupsort", (8,), _node("groupsort", group_size=2), _tgroupsort),
    Case("groupsort_4", "groupsort", (8,), _node("groupsort", group_size=4), _tgroupsort),
    Case("groupsort_2_image", "groupsort", (4, 2, 2), _node("groupsort", group_size=2), _tgroupsort),
]

CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case ids must be unique"

#: Rules each op is expected to lack; every other rule in RULES must be implemented.
MISSING_RULES = {
    "softmax": {"relax"},  # output squashers are stripped before certification
    "log_softmax": {"relax"},
    "maxpool": {"relax"},  # not elementwise: CROWN's rules for these live in certifiers/crown_relax.py
    "max": {"relax"},
    "min": {"relax"},
    "groupsort": {"relax"},
}

#: Ops with their own relaxation (affine ops "support" relax through their vjp).
RELAX_CASES = ["relu", "leaky_relu_0.1", "leaky_relu_2", "leaky_relu_-1", "leaky_relu_-3", "prelu_channels",
               "prelu_features", "prelu_shared_negative", "clip_low", "clip_high", "clip_both", "sigmoid", "tanh"]

#: Elementwise ops that are not monotone for every parameter (their tightness is checked apart).
PIECEWISE = ("leaky_relu", "prelu")


def _case(case_id: str) -> Case:
    return next(c for c in CASES if c.id == case_id)


def _params(ids=None):
    chosen = CASES if ids is None else [_case(i) for i in ids]
    return pytest.mark.parametrize("case", chosen, ids=[c.id for c in chosen])


# ----------------------------------------------------------------------------- small helpers


def _inputs(case: Case, rng, n: int) -> np.ndarray:
    """Random inputs; continuous, so that max-type ops and ReLU see no ties or kinks."""
    return rng.normal(size=(n,) + case.input_shape) * 2.0


def _torch_forward(case: Case, net: Network, x: np.ndarray, grad: bool = False):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=grad)
    return xt, case.ref(net, xt)


def _target(net: Network) -> tuple[Op, Node]:
    node = net.node("op")
    return get_op(node.op), node


def _box(rng, shape, max_radius: float = 1.5):
    """A random box [lo, hi] with some degenerate (lo == hi) entries."""
    centre = rng.normal(size=shape) * 2.0
    radius = rng.uniform(0.0, max_radius, size=shape) * (rng.uniform(size=shape) > 0.1)
    return centre - radius, centre + radius


def _sample(rng, lo, hi, n: int, corners: bool = True) -> np.ndarray:
    """n points of [lo, hi] (shapes (1, ...)): uniform ones, plus every corner when there are few entries."""
    u = rng.uniform(size=(n,) + lo.shape[1:])
    points = np.clip(lo + (hi - lo) * u, lo, hi)
    if corners and lo.size <= MAX_CORNER_ENTRIES:
        return np.concatenate([points, _corners(lo, hi)])
    return points


def _corners(lo, hi) -> np.ndarray:
    bits = np.array(list(itertools.product((0, 1), repeat=lo.size)), dtype=bool)
    return np.where(bits, hi.reshape(1, -1), lo.reshape(1, -1)).reshape((-1,) + lo.shape[1:])


def _assert_inside(values, lo, hi, what: str):
    """Zero tolerance: the interval rules are meant to absorb their own rounding."""
    below, above = values < lo, values > hi
    if below.any() or above.any():
        gap = max(float(np.max(np.where(below, lo - values, 0))), float(np.max(np.where(above, values - hi, 0))))
        raise AssertionError(f"{what}: {int(below.sum())} values below and {int(above.sum())} above the "
                             f"bounds (largest gap {gap:.3e})")


def _explicit_matrix(forward, in_shape) -> np.ndarray:
    """The matrix M of an affine map f(x) = M x + f(0), from f applied to the identity basis."""
    n = math.prod(in_shape)
    basis = np.eye(n).reshape((n,) + tuple(in_shape))
    zero = forward(np.zeros((1,) + tuple(in_shape)))
    return (forward(basis) - zero).reshape(n, -1).T


def _jacobian(net: Network, x: np.ndarray) -> np.ndarray:
    """The Jacobian (out, in) at one sample x (shape (1, ...)), one output row per vjp cotangent."""
    out_shape = net.forward(x).shape[1:]
    m = math.prod(out_shape)
    rows = net.vjp(np.repeat(x, m, axis=0), np.eye(m).reshape((m,) + out_shape))
    return rows.reshape(m, -1)


# ----------------------------------------------------------------------------- the registry


def test_table_covers_every_registered_op():
    assert {c.op for c in CASES} == set(OPS), (
        f"ops without a test case: {sorted(set(OPS) - {c.op for c in CASES})}; "
        f"cases for unregistered ops: {sorted({c.op for c in CASES} - set(OPS))}")
    assert set(MISSING_RULES) <= set(OPS)


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_declares_its_rules(name):
    op = OPS[name]
    supported = {rule for rule in RULES if op.supports(rule)}
    assert supported == set(RULES) - MISSING_RULES.get(name, set())


@pytest.mark.parametrize(("name", "rule"), [(n, r) for n in sorted(MISSING_RULES) for r in MISSING_RULES[n]])
def test_missing_rule_raises_with_op_rule_and_node(name, rule):
    case = next(c for c in CASES if c.op == name)
    net = case.network()
    op, node = _target(net)
    lo = np.zeros((1,) + net.shapes()[node.inputs[0]])
    with pytest.raises(UnsupportedRuleError) as info:
        if rule == "relax":
            op.relax(np, node, lo, lo)
        else:
            getattr(op, rule)(np, node, *[(lo, lo)] * len(node.inputs))
    err = info.value
    assert (err.op, err.rule, err.node) == (name, rule, "op")
    assert f"'{name}'" in str(err) and f"'{rule}'" in str(err) and "'op'" in str(err)


def test_missing_rule_raises_through_network_walk(monkeypatch):
    """An op without an interval rule (simulated by removing LogSoftmax's) stops the walk by name."""
    monkeypatch.setattr(type(OPS["log_softmax"]), "interval", Op.interval)
    net = Network([_dense("d", np.random.default_rng(0), 3, 4), Node("ls", "log_softmax", ("d",))], (4,))
    x = np.zeros((1, 4))
    with pytest.raises(UnsupportedRuleError, match="'log_softmax' \\(node 'ls'\\) has no 'interval'"):
        net.interval(x, x)
    assert net.unsupported("interval") == [("log_softmax", "ls")]


def test_register_twice_raises_and_unknown_op_lists_names():
    with pytest.raises(RobevalError, match="'relu' is registered twice"):
        @register("relu")
        class Again(MonotoneOp):
            pass
    assert type(OPS["relu"]).__name__ == "ReLU"
    with pytest.raises(KeyError, match="no op 'swish'.*relu"):
        get_op("swish")


# ----------------------------------------------------------------------------- 1, 2: forward and vjp


@_params()
def test_forward_matches_torch(case):
    net = case.network()
    x = _inputs(case, case.rng("forward"), 3)
    _, ref = _torch_forward(case, net, x)
    out = net.forward(x)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-10, atol=1e-10)


@_params()
def test_vjp_matches_torch_autograd(case):
    net = case.network()
    rng = case.rng("vjp")
    x = _inputs(case, rng, 3)
    xt, y = _torch_forward(case, net, x, grad=True)
    g = rng.normal(size=tuple(y.shape))
    (ref,) = torch.autograd.grad(y, xt, torch.from_numpy(g))
    np.testing.assert_allclose(net.vjp(x, g), ref.numpy(), rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- 3: intervals


@_params()
def test_interval_encloses_sampled_points_of_the_op(case):
    """The op's own rule on independent random boxes per input: points land inside, zero tolerance."""
    net = case.network()
    op, node = _target(net)
    if not op.supports("interval"):
        pytest.skip(f"{case.op} has no interval rule (declared in MISSING_RULES)")
    rng = case.rng("interval-op")
    shapes = node.attrs["in_shapes"]
    total = sum(math.prod(s) for s in shapes)
    for radius in (1.5, 1e-9):  # a wide box, and a tiny one where rounding dominates
        boxes = [_box(rng, (1,) + s, radius) for s in shapes]
        if total <= MAX_CORNER_ENTRIES:  # every corner of the joint box
            joint_lo = np.concatenate([b[0].ravel() for b in boxes])[None]
            joint_hi = np.concatenate([b[1].ravel() for b in boxes])[None]
            flat = _sample(rng, joint_lo, joint_hi, N_POINTS)
            cuts = np.cumsum([math.prod(s) for s in shapes])[:-1]
            points = [p.reshape((-1,) + s) for p, s in zip(np.split(flat, cuts, axis=1), shapes)]
        else:
            points = [_sample(rng, lo, hi, N_POINTS, corners=False) for lo, hi in boxes]
        lo_out, hi_out = op.interval(np, node, *boxes)
        values = op.forward(np, node, *points)
        _assert_inside(values, lo_out, hi_out, f"{case.id} (radius {radius})")


@_params()
def test_interval_of_network_encloses_sampled_points(case):
    net = case.network()
    if net.unsupported("interval"):
        pytest.skip(f"{case.op} has no interval rule (declared in MISSING_RULES)")
    rng = case.rng("interval-net")
    lo, hi = _box(rng, (1,) + case.input_shape)
    lo_out, hi_out = net.interval(lo, hi)
    _assert_inside(net.forward(_sample(rng, lo, hi, N_POINTS)), lo_out, hi_out, case.id)


@_params()
def test_interval_with_eps_zero_is_the_forward(case):
    net = case.network()
    if net.unsupported("interval"):
        pytest.skip(f"{case.op} has no interval rule (declared in MISSING_RULES)")
    x = _inputs(case, case.rng("eps0"), 4)
    lo, hi = net.interval(x, x)
    y = net.forward(x)
    _assert_inside(y, lo, hi, case.id)
    tol = 1e-12 * max(1.0, float(np.abs(y).max()))
    np.testing.assert_allclose(lo, y, rtol=0, atol=tol)
    np.testing.assert_allclose(hi, y, rtol=0, atol=tol)


@_params([c.id for c in CASES if isinstance(OPS[c.op], MonotoneOp) and c.op not in PIECEWISE])
def test_monotone_interval_is_tight(case):
    """For monotone ops the bounds are the forward at the box ends (up to the declared widening)."""
    net = case.network()
    op, node = _target(net)
    rng = case.rng("tight")
    boxes = [_box(rng, (1,) + s) for s in node.attrs["in_shapes"]]
    lo_out, hi_out = op.interval(np, node, *boxes)
    np.testing.assert_allclose(lo_out, op.forward(np, node, *(b[0] for b in boxes)), rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(hi_out, op.forward(np, node, *(b[1] for b in boxes)), rtol=1e-9, atol=1e-300)


@_params([c.id for c in CASES if c.op in PIECEWISE])
def test_piecewise_linear_interval_is_tight(case):
    """x if x > 0 else a x: the extremes over a box are at its ends or, when it straddles 0, at 0."""
    net = case.network()
    op, node = _target(net)
    lo, hi = _box(case.rng("tight"), (1,) + node.attrs["in_shapes"][0])
    f_lo, f_hi = op.forward(np, node, lo), op.forward(np, node, hi)
    straddle = (lo < 0) & (hi > 0)
    want_lo = np.where(straddle, np.minimum(np.minimum(f_lo, f_hi), 0), np.minimum(f_lo, f_hi))
    want_hi = np.where(straddle, np.maximum(np.maximum(f_lo, f_hi), 0), np.maximum(f_lo, f_hi))
    lo_out, hi_out = op.interval(np, node, (lo, hi))
    np.testing.assert_allclose(lo_out, want_lo, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(hi_out, want_hi, rtol=1e-9, atol=1e-300)


@_params([c.id for c in CASES if isinstance(OPS[c.op], AffineOp) and len(c.build(np.random.default_rng(0))) == 1])
def test_affine_interval_is_the_exact_box_image(case):
    """Closed form: an affine map sends [c - r, c + r] to exactly M c + b +- |M| r (up to rounding)."""
    net = case.network()
    rng = case.rng("affine")
    m = _explicit_matrix(net.forward, case.input_shape)
    bias = net.forward(np.zeros((1,) + case.input_shape)).ravel()
    lo, hi = _box(rng, (1,) + case.input_shape)
    centre, radius = ((lo + hi) / 2).ravel(), ((hi - lo) / 2).ravel()
    exact_lo, exact_hi = m @ centre + bias - np.abs(m) @ radius, m @ centre + bias + np.abs(m) @ radius
    lo_out, hi_out = (b.ravel() for b in net.interval(lo, hi))
    scale = 1e-10 * max(1.0, float(np.abs(exact_lo).max()), float(np.abs(exact_hi).max()))
    assert np.all(lo_out <= exact_lo + scale) and np.all(hi_out >= exact_hi - scale)
    np.testing.assert_allclose(lo_out, exact_lo, rtol=0, atol=scale)
    np.testing.assert_allclose(hi_out, exact_hi, rtol=0, atol=scale)


def test_softmax_interval_survives_a_wide_dynamic_range():
    """Logits far apart: sums like exp(0) + exp(-46) lose the small terms to rounding, and
    exp(-800) underflows; the bounds must stay finite and sound anyway."""
    net = Network([Node("op", "softmax", ("input",))], (3,))
    rng = np.random.default_rng(7)
    boxes = [([-23.0, -46.0, -46.0], [0.0, -46.0, -46.0]), ([-800.0, -900.0, -1e4], [0.0, -800.0, -1e4]),
             ([5.0, 5.0, 5.0], [5.0, 5.0, 5.0]), ([1e4, -1e4, 0.0], [1e4 + 1.0, -1e4 + 1e-3, 1e-12])]
    for lo, hi in boxes:
        lo, hi = np.array([lo]), np.array([hi])
        lo_out, hi_out = net.interval(lo, hi)
        assert np.isfinite(lo_out).all() and np.isfinite(hi_out).all()
        _assert_inside(net.forward(_sample(rng, lo, hi, N_POINTS)), lo_out, hi_out, f"box {lo} {hi}")
    four = Network([Node("op", "softmax", ("input",))], (4,))
    for _ in range(200):  # random wide boxes; _sample adds every corner, where the extremes lie
        lo, hi = _box(rng, (1, 4), max_radius=30.0)
        lo_out, hi_out = four.interval(lo, hi)
        _assert_inside(four.forward(_sample(rng, lo, hi, 200)), lo_out, hi_out, f"box {lo} {hi}")


# ----------------------------------------------------------------------------- 4: Lipschitz


@_params()
def test_lipschitz_bound_holds_on_random_pairs(case):
    net = case.network()
    bound = net.lipschitz_bounds()[net.output_name]
    rng = case.rng("pairs")
    x = _inputs(case, rng, N_PAIRS)
    step = rng.normal(size=x.shape) * np.logspace(-3, 0.5, N_PAIRS).reshape((-1,) + (1,) * len(case.input_shape))
    y = x + step
    num = np.linalg.norm((net.forward(x) - net.forward(y)).reshape(N_PAIRS, -1), axis=1)
    den = np.linalg.norm((x - y).reshape(N_PAIRS, -1), axis=1)
    worst = float((num / den).max())
    assert worst <= bound * (1 + 1e-9), f"{case.id}: pair ratio {worst} exceeds the bound {bound}"


@_params()
def test_lipschitz_bound_holds_for_sampled_jacobians(case):
    """||J(x)||_2 at random points, with J built row by row from the (autograd-checked) vjp."""
    net = case.network()
    bound = net.lipschitz_bounds()[net.output_name]
    rng = case.rng("jacobian")
    worst = max(np.linalg.norm(_jacobian(net, _inputs(case, rng, 1)), 2) for _ in range(10))
    assert worst <= bound * (1 + 1e-9), f"{case.id}: Jacobian norm {worst} exceeds the bound {bound}"


@_params([c.id for c in CASES if c.explicit_norm])
def test_lipschitz_bound_of_affine_op_against_explicit_matrix(case):
    """The op's bound against numpy.linalg.norm(M, 2) of the explicit matrix.

    Measured bound / explicit norm (seeded weights, padded inputs of 5x5 to 7x7): conv 1.101,
    conv_pad1021 1.054, conv_dilation2 1.463, conv_groups2 1.081 (stride 1: checked <= 1.5); the
    circular-embedding bound ignores subsampling, so strided layers are looser: conv_stride2 1.567,
    conv_all_groups2 1.193. Dense, scale, batchnorm, global_avgpool: 1.000; avgpool's
    sqrt(||A||_1 ||A||_inf): 1.413 (count_include_pad), 1.352 (excluded pad), 1.000 (no pad)."""
    net = case.network()
    bound = net.lipschitz_bounds()["op"]
    exact = float(np.linalg.norm(_explicit_matrix(net.forward, case.input_shape), 2))
    assert bound >= exact, f"{case.id}: bound {bound} below the explicit norm {exact}"
    if case.max_norm_ratio is not None:
        assert bound <= case.max_norm_ratio * exact, f"{case.id}: bound / norm = {bound / exact:.3f}"


def test_maxpool_lipschitz_bound_is_attained_with_overlap():
    """One entry that wins all four overlapping 3x3/stride-2 windows around it makes ||J|| = 2 = sqrt(4)."""
    net = _case("maxpool_overlap").network()
    x = np.random.default_rng(3).normal(size=(1, 2, 7, 7))
    x[0, 0, 2, 2] = 10.0  # in the windows of outputs (0,0), (0,1), (1,0), (1,1) with padding 1
    bound = net.lipschitz_bounds()["op"]
    jac_norm = np.linalg.norm(_jacobian(net, x), 2)
    assert bound == pytest.approx(2.0) and jac_norm == pytest.approx(2.0)


# ----------------------------------------------------------------------------- 5: relaxations


def _relax_boxes(rng, n: int = 400):
    lo = rng.normal(size=n) * 2.0
    hi = lo + rng.exponential(size=n) * 2.0
    edges = np.array([[0.0, 1.0], [-1.0, 0.0], [-2.0, 2.0], [-1.0, 3.0], [-3.0, 1.0], [-0.5, 0.7],
                      [-0.6, 0.8], [-0.4, 0.6], [0.7, 2.0], [-2.0, -0.5], [-1e-9, 1e-9]])
    lo[: len(edges)], hi[: len(edges)] = edges[:, 0], edges[:, 1]
    return lo, hi


@_params(RELAX_CASES)
def test_relaxation_lines_enclose_the_function(case):
    net = case.network()
    op, node = _target(net)
    rng = case.rng("relax")
    per = math.prod(case.input_shape)
    lo, hi = _relax_boxes(rng, per * -(-400 // per))
    if "slope" in node.params:  # per-entry slopes: boxes shaped (batch, *per-sample shape) as CROWN passes them
        lo, hi = (a.reshape((-1,) + case.input_shape) for a in (lo, hi))
    a_l, b_l, a_u, b_u = op.relax(np, node, lo, hi)
    u = rng.uniform(size=(300,) + lo.shape)
    x = np.concatenate([lo[None], hi[None], np.clip(lo + (hi - lo) * u, lo, hi)])
    f = op.forward(np, node, x)
    slack = 1e-12 * (1 + np.abs(x) + np.abs(f))
    _assert_inside(f, a_l * x + b_l - slack, a_u * x + b_u + slack, case.id)


def test_relu_relaxation_is_crowns_textbook_choice():
    net = _case("relu").network()
    op, node = _target(net)
    lo, hi = _relax_boxes(np.random.default_rng(11))
    a_l, b_l, a_u, b_u = op.relax(np, node, lo, hi)
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    chord = np.where(unstable, hi / np.where(unstable, hi - lo, 1.0), 0.0)
    np.testing.assert_allclose(a_u, np.where(unstable, chord, active * 1.0), rtol=1e-15)
    np.testing.assert_allclose(b_u, np.where(unstable, -chord * lo, 0.0), rtol=1e-14, atol=1e-300)
    np.testing.assert_array_equal(a_l, np.where(unstable, (hi > -lo) * 1.0, active * 1.0))
    np.testing.assert_array_equal(b_l, 0.0)


# ----------------------------------------------------------------------------- 6: float32 rounding


@_params()
def test_float32_interval_encloses_float64_forward(case):
    """At eps = 0 the float32 bounds must contain the (nearly exact) float64 output of the same
    float32 weights and inputs: the rounding term has to cover float32's rounding."""
    net64 = case.network()
    if net64.unsupported("interval"):
        pytest.skip(f"{case.op} has no interval rule (declared in MISSING_RULES)")
    net32 = net64.astype(np.float32)
    exact_net = net32.astype(np.float64)
    rng = case.rng("float32")
    for magnitude in (1e-6, 1.0, 1e3):  # tiny inputs: the bias dominates and its addition rounds
        x32 = (_inputs(case, rng, 8) * magnitude).astype(np.float32)
        lo, hi = net32.interval(x32, x32)
        assert lo.dtype == np.float32 and hi.dtype == np.float32
        _assert_inside(exact_net.forward(x32.astype(np.float64)), lo, hi, f"{case.id} float32 x{magnitude}")
    box_lo, box_hi = (b.astype(np.float32) for b in _box(rng, (1,) + case.input_shape))
    lo, hi = net32.interval(box_lo, box_hi)
    points = _sample(rng, box_lo.astype(np.float64), box_hi.astype(np.float64), 500).astype(np.float32)
    _assert_inside(exact_net.forward(points.astype(np.float64)), lo, hi, f"{case.id} float32 box")


# ----------------------------------------------------------------------------- backends


@_params()
def test_rules_agree_across_backends(case, xp):
    """The same rules on the ``xp`` fixture's backend (CuPy skipped without a GPU) as on NumPy."""
    from robeval.backend import asnumpy

    net = case.network()
    moved = net if xp is np else net.to("cuda")
    rng = case.rng("backend")
    x = _inputs(case, rng, 2)
    g = rng.normal(size=net.forward(x).shape)
    np.testing.assert_allclose(asnumpy(moved.forward(xp.asarray(x))), net.forward(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(asnumpy(moved.vjp(xp.asarray(x), xp.asarray(g))), net.vjp(x, g),
                               rtol=1e-12, atol=1e-12)
    if not net.unsupported("interval"):
        lo, hi = _box(rng, (1,) + case.input_shape)
        for ours, ref in zip(moved.interval(xp.asarray(lo), xp.asarray(hi)), net.interval(lo, hi)):
            np.testing.assert_allclose(asnumpy(ours), ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- Network


def test_nodes_out_of_order_name_the_node():
    nodes = [Node("late", "relu", ("early",)), Node("early", "relu", ("input",))]
    with pytest.raises(NetworkError, match="node 0 'late' \\(relu\\) reads \\['early'\\] before"):
        Network(nodes, (3,))


def test_unknown_op_and_duplicate_names_raise():
    with pytest.raises(NetworkError, match="node 0 'act' uses op 'swish', which is not registered"):
        Network([Node("act", "swish", ("input",))], (3,))
    with pytest.raises(NetworkError, match="'r' is used twice"):
        Network([Node("r", "relu", ("input",)), Node("r", "relu", ("r",))], (3,))
    with pytest.raises(NetworkError, match="output 'nope'"):
        Network([Node("r", "relu", ("input",))], (3,), output_name="nope")


def test_shape_errors_name_the_node():
    bad = _dense("fc", np.random.default_rng(0), 3, 5)
    with pytest.raises(NetworkError, match="node 0 'fc' \\(dense\\)"):
        Network([bad], (4,))


def test_check_input_hints():
    net = Network([Node("r", "relu", ("input",))], (1, 28, 28))
    assert net.check_input(np.zeros((2, 1, 28, 28))).shape == (2, 1, 28, 28)
    with pytest.raises(InputShapeError, match=r"\(1, 28, 28\).*expected \(N, 1, 28, 28\).*x\[None\]"):
        net.check_input(np.zeros((1, 28, 28)))
    with pytest.raises(InputShapeError, match=r"add a channel axis: x\[:, None\]"):
        net.check_input(np.zeros((5, 28, 28)))
    bad = np.zeros((2, 1, 28, 28))
    bad[1, 0, 3, 4] = np.nan
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(DataRangeError, match="2 NaN or infinite"):
        net.check_input(bad)


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 8, 8)])
def test_check_input_channels_last_hint(input_shape):
    net = Network([Node("r", "relu", ("input",))], input_shape)
    c, h, w = input_shape
    with pytest.raises(InputShapeError, match=r"channels-last.*transpose\(0, 3, 1, 2\)"):
        net.check_input(np.zeros((4, h, w, c)))


def test_strip_output_squashers():
    rng = np.random.default_rng(0)
    net = Network([_dense("fc", rng, 3, 4), Node("sm", "softmax", ("fc",))], (4,), meta={"source": "test"})
    stripped, removed = net.strip_output_squashers()
    assert removed == ["softmax 'sm'"]
    assert stripped.output_name == "fc" and [n.name for n in stripped.nodes] == ["fc"]
    assert stripped.meta == {"source": "test", "stripped": ["softmax 'sm'"]}
    x = rng.normal(size=(2, 4))
    np.testing.assert_array_equal(stripped.forward(x), net.forward(x, keep=True)["fc"])
    assert net.lipschitz_bound() == stripped.lipschitz_bounds()["fc"]

    log = Network([_dense("fc", rng, 3, 4), Node("ls", "log_softmax", ("fc",))], (4,))
    assert log.strip_output_squashers()[1] == ["log_softmax 'ls'"]
    plain = Network([_dense("fc", rng, 3, 4), Node("id", "identity", ("fc",))], (4,))
    assert plain.strip_output_squashers() == (plain, [])
    inner = Network([_dense("fc", rng, 3, 4), Node("sm", "softmax", ("fc",)), _dense("out", rng, 2, 3, "sm")],
                    (4,))
    assert inner.strip_output_squashers() == (inner, [])  # a softmax inside the network stays


def test_strip_output_squashers_with_trailing_identity():
    rng = np.random.default_rng(0)
    net = Network([_dense("fc", rng, 3, 4), Node("sm", "softmax", ("fc",)), Node("out", "identity", ("sm",))],
                  (4,))
    stripped, removed = net.strip_output_squashers()
    assert removed == ["softmax 'sm'"] and stripped.output_name == "fc"


@pytest.mark.parametrize("op", ["dense", "conv"])
def test_float32_interval_covers_accumulated_rounding(op):
    """An adversary for the rounding term: 1 + (n - 1) * (u / 2) summed in float32 drops every small
    term (ties go to even), so the computed product misses the exact one by up to (n - 1) u / 2."""
    n = 4096
    half_ulp = np.float32(np.finfo(np.float32).eps / 4)  # u / 2: 1 + u / 2 rounds back to 1
    if op == "dense":
        node, shape = Node("op", "dense", ("input",), {"weight": np.ones((1, n), np.float32)}), (n,)
    else:
        node = Node("op", "conv", ("input",), {"weight": np.ones((1, n // 16, 4, 4), np.float32)})
        shape = (n // 16, 4, 4)
    net = Network([node], shape)
    x = np.full((1,) + shape, half_ulp, dtype=np.float32)
    x.reshape(-1)[0] = 1.0
    exact = 1.0 + (n - 1) * float(half_ulp)  # every term is a power of two: exact in float64
    lo, hi = net.interval(x, x)
    assert float(net.forward(x).ravel()[0]) != exact  # the float32 product does round here
    assert float(lo.ravel()[0]) <= exact <= float(hi.ravel()[0])


# ----------------------------------------------------------------------------- 7: parameters of any sign and scale

#: Parameters that must stay positive for the op to be defined (a variance).
POSITIVE_PARAMS = {"var"}
#: Scalar attributes that are free parameters of the op, and extreme values of both signs for them.
FREE_ATTRS = {"alpha": (-1e3, -1.0, -1e-3, 0.0, 1e-3, 1.0, 1e3)}


def _rescaled(net: Network, rng, scale: float) -> Network:
    """The network with every weight multiplied by +-scale (random sign per entry; variances kept
    positive) and free scalar attributes set to an extreme value of either sign."""
    nodes = []
    for n in net.nodes:
        params = {}
        for k, v in n.params.items():
            v = np.asarray(v, dtype=np.float64)
            signs = rng.choice([-1.0, 1.0], size=v.shape)
            params[k] = np.abs(v) * scale + 1e-3 if k in POSITIVE_PARAMS else v * signs * scale
        attrs = {k: (float(rng.choice(FREE_ATTRS[k])) if k in FREE_ATTRS else a) for k, a in n.attrs.items()
                 if k not in ("in_shape", "in_shapes")}
        nodes.append(Node(n.name, n.op, n.inputs, params, attrs))
    return Network(nodes, net.input_shape)


@_params([c.id for c in CASES if any(n.params or set(n.attrs) & set(FREE_ATTRS)
                                     for n in c.network().nodes)])
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_interval_is_sound_for_parameters_of_any_sign_and_scale(case, scale):
    """Property test per op: no rule may assume a parameter's sign, a monotone shape or float32 constants."""
    base = case.network()
    if base.unsupported("interval"):
        pytest.skip(f"{case.op} has no interval rule (declared in MISSING_RULES)")
    rng = case.rng(f"signs-{scale}")
    for trial in range(4):
        net = _rescaled(base, rng, scale)
        lo, hi = _box(rng, (1,) + case.input_shape)
        lo_out, hi_out = net.interval(lo, hi)
        _assert_inside(net.forward(_sample(rng, lo, hi, 500)), lo_out, hi_out, f"{case.id} x{scale} trial {trial}")
        net32 = net.astype(np.float32)
        x32 = _inputs(case, rng, 4).astype(np.float32)
        lo32, hi32 = net32.interval(x32, x32)
        exact = net32.astype(np.float64).forward(x32.astype(np.float64))
        _assert_inside(exact, lo32, hi32, f"{case.id} x{scale} float32 trial {trial}")
        if any(get_op(n.op).supports("relax") and not get_op(n.op).affine for n in net.nodes):
            node = net.node("op")
            op = get_op(node.op)
            if op.supports("relax") and not op.affine and len(node.inputs) == 1:
                a_l, b_l, a_u, b_u = op.relax(np, node, lo, hi)
                pts = _sample(rng, lo, hi, 300)
                f = op.forward(np, node, pts)
                # CROWN widens every line by line_slack of its scale (crown_relax): the same allowance here
                from robeval.certifiers.crown_relax import line_slack

                m = np.maximum(np.abs(lo), np.abs(hi))
                slack = line_slack(np, np.maximum(np.abs(a_l), np.abs(a_u)) * m + np.maximum(np.abs(b_l), np.abs(b_u)))
                _assert_inside(f, a_l * pts + b_l - slack, a_u * pts + b_u + slack, f"{case.id} relax x{scale}")


@pytest.mark.parametrize("cin,cout,hw,k,stride,pads", [
    (8, 16, 14, 4, (2, 2), (1, 1, 1, 1)), (4, 6, 11, 3, (2, 2), (2, 3, 2, 2)), (3, 5, 10, 5, (3, 3), (0, 0, 0, 0)),
    (6, 2, 9, 2, (3, 2), (1, 0, 2, 1)), (4, 4, 7, 1, (2, 2), (0, 0, 1, 1))])
def test_strided_conv_transpose_as_one_gemm_equals_the_tap_scatter(cin, cout, hw, k, stride, pads, monkeypatch):
    """phase_transpose (one matrix product over stride phases) against the tap-by-tap scatter and
    the adjoint identity <conv(x), g> = <x, conv^T(g)>."""
    from robeval.ir.ops import conv as conv_module

    rng = np.random.default_rng(cin * 100 + k)
    node = Node("c", "conv", ("x",), {"weight": rng.normal(size=(cout, cin, k, k))},
                {"stride": stride, "padding": pads, "in_shape": (cin, hw, hw + 2)})
    op = get_op("conv")
    x = rng.normal(size=(3, cin, hw, hw + 2))
    g = rng.normal(size=op.linear(np, node, x).shape)
    fast = op.linear_t(np, node, g)[0]
    monkeypatch.setattr(conv_module, "PHASE_GEMM_MIN", 10**9)
    slow = op.linear_t(np, node, g)[0]
    assert fast.shape == slow.shape == x.shape
    assert np.abs(fast - slow).max() <= 1e-12 * np.abs(slow).max()
    assert abs((op.linear(np, node, x) * g).sum() - (fast * x).sum()) <= 1e-10 * np.abs(g).sum()
