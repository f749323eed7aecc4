"""The verifier's bound engines: general linear specifications over boxes (CROWN), alpha/beta
parameters (any value sound), their exact gradients, and branch and bound against brute force."""

from __future__ import annotations

import gzip
import math
import time
from types import SimpleNamespace

import numpy
import pytest
from conftest import SHARED

from robeval.certifiers.crown import crown_margin_bounds
from robeval.ir import Network, Node
from robeval.verify.alpha import Chain, NotAChain, initial_alpha, optimise, tighten_intermediate
from robeval.verify.bab import BabSettings
from robeval.verify.bounds import as_verification_network, box_bounds, domain_lower, spec_lower, spec_lower_bounds
from robeval.verify.prove import prove_case

from nets import random_cnn, random_mlp


def _box(rng, net, width):
    x = rng.uniform(-1, 1, size=(1,) + tuple(net.input_shape))
    return x - width, x + width


def _samples(rng, lo, hi, n=4000):
    """Points of the box [lo, hi] (1, *shape): uniform inside plus random corners."""
    inside = rng.uniform(lo, hi, size=(n,) + lo.shape[1:])
    corners = numpy.where(rng.random((n,) + lo.shape[1:]) < 0.5, lo, hi)
    return numpy.concatenate([inside, corners])


@pytest.mark.parametrize("seed", range(4))
def test_margin_rows_equal_crown_margin_bounds(seed):
    rng = numpy.random.default_rng(seed)
    net = random_mlp(rng, (6, 16, 16, 5))
    x = rng.uniform(0, 1, size=(1, 1, 6))
    y = int(net.forward(x).argmax())
    eps = 0.05
    ref = crown_margin_bounds(net, x, numpy.array([y]), eps, domain=None)[0]
    A = numpy.eye(5)[y] - numpy.eye(5)
    low = spec_lower_bounds(net, x - eps, x + eps, A)[0]
    keep = numpy.arange(5) != y
    # the same bound; the margin certifier widens x -/+ eps by one rounding, hence the tolerance
    numpy.testing.assert_allclose(low[keep], ref[keep], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_general_rows_hold_at_sampled_points(seed, kind):
    rng = numpy.random.default_rng(seed)
    net = random_mlp(rng, (5, 12, 12, 4)) if kind == "mlp" else random_cnn(rng, hw=6)
    lo, hi = _box(rng, net, 0.2)
    A = rng.normal(size=(7, 4))
    c = rng.normal(size=7)
    low = spec_lower_bounds(net, lo, hi, A, c)[0]
    out = net.astype(numpy.float64).forward(_samples(rng, lo, hi))
    values = out @ A.T + c
    assert (values.min(axis=0) >= low).all()
    assert numpy.isfinite(low).all()


def _random_parameters(rng, chain, n, lo, hi, splits_rate=0.3):
    """Random alpha (also outside [0, 1]), beta >= 0 and splits; each domain's splits take the signs
    of one random box point's pre-activations, so that no subdomain is empty."""
    splits, alpha, beta = {}, {}, {}
    acts = chain.net.forward(rng.uniform(lo, hi, size=(n,) + lo.shape[1:]), keep=True)
    for relu in chain.relus:
        shape = (n,) + chain.bounds[chain.relu_input[relu]][0].shape[1:]
        unstable = numpy.broadcast_to(chain.unstable(relu, {}), shape)
        sign = numpy.where(acts[chain.relu_input[relu]] >= 0, 1.0, -1.0)
        s = numpy.where(unstable & (rng.random(unstable.shape) < splits_rate), sign, 0.0)
        splits[relu] = s
        alpha[relu] = rng.uniform(-0.5, 1.5, size=unstable.shape)  # outside [0, 1] too: clipped, still sound
        beta[relu] = rng.uniform(0, 2, size=unstable.shape) * (s != 0)
    return splits, alpha, beta


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_domain_bounds_sound_for_any_alpha_beta_and_splits(seed, kind):
    """On each subdomain (the box points whose split pre-activations have the split's sign), the
    rigorous bound with random slopes, multipliers and splits is below every sampled value."""
    rng = numpy.random.default_rng(seed)
    if kind == "mlp":
        net = as_verification_network(random_mlp(rng, (4, 10, 10, 10, 3)))
    else:  # conv -> relu -> avgpool -> conv -> relu -> dense: a chain with convolutions
        net = as_verification_network(random_cnn(rng, hw=6, classes=3, pool="avgpool"))
    lo, hi = _box(rng, net, 0.3 if kind == "mlp" else 0.1)
    root = box_bounds(net, lo, hi)
    chain = Chain(net, root.bounds, lo, hi)
    n = 6
    splits, alpha, beta = _random_parameters(rng, chain, n, lo, hi)
    A, c = rng.normal(size=(n, 3)), rng.normal(size=n)
    low = domain_lower(net, root, lo, hi, A, c, alpha, beta, splits, chain.relu_input)
    pts = _samples(rng, lo, hi, 20000)
    acts = net.forward(pts, keep=True)
    values = net.forward(pts) @ A.T + c
    checked = 0
    for d in range(n):
        inside = numpy.ones(len(pts), dtype=bool)
        for relu, s in splits.items():
            h = acts[chain.relu_input[relu]].reshape(len(pts), -1)
            sd = s[d].reshape(-1)
            inside &= ((h * sd[None]) >= 0).all(axis=1)  # s = 0 puts no condition
        if inside.any():
            checked += 1
            assert values[inside, d].min() >= low[d]
    assert checked == n


def test_chain_bound_matches_rigorous_and_gradients_match_finite_differences():
    rng = numpy.random.default_rng(3)
    net = as_verification_network(random_mlp(rng, (5, 12, 12, 12, 4)))
    lo, hi = _box(rng, net, 0.3)
    root = box_bounds(net, lo, hi)
    chain = Chain(net, root.bounds, lo, hi, dtype=numpy.float64)
    n = 4
    splits, alpha, beta = _random_parameters(rng, chain, n, lo, hi)
    alpha = {k: numpy.clip(v, 0, 1) for k, v in alpha.items()}
    A, c = rng.normal(size=(n, 4)), rng.normal(size=n)
    result = chain.evaluate(A, c, alpha, beta, splits)
    rigorous = domain_lower(net, root, lo, hi, A, c, alpha, beta, splits, chain.relu_input)
    numpy.testing.assert_allclose(result.bound, rigorous, rtol=1e-9, atol=1e-9)
    assert (rigorous <= result.bound).all()  # the rigorous one adds its rounding allowance
    fast = Chain(net, root.bounds, lo, hi).evaluate(A, c, alpha, beta, splits)  # the default, float32
    numpy.testing.assert_allclose(fast.bound, rigorous, rtol=1e-5, atol=1e-5)
    for relu, g in result.grad_alpha.items():
        numpy.testing.assert_allclose(fast.grad_alpha[relu], g, rtol=1e-4, atol=1e-5)
    h = 1e-7
    compared = 0
    for params, grads in ((alpha, result.grad_alpha), (beta, result.grad_beta)):
        for relu, g in grads.items():
            for idx in map(tuple, numpy.argwhere(numpy.abs(g) > 1e-3)[:3]):
                moved = {k: v.copy() for k, v in params.items()}
                moved[relu][idx] += h
                args = (moved, beta) if params is alpha else (alpha, moved)
                again = chain.evaluate(A, c, *args, splits, need_grad=False).bound
                assert (again[idx[0]] - result.bound[idx[0]]) / h == pytest.approx(g[idx], rel=1e-4, abs=1e-6)
                compared += 1
    assert compared >= 6


def test_optimised_alpha_only_tightens_and_intermediate_tightening_is_sound():
    rng = numpy.random.default_rng(7)
    net = as_verification_network(random_mlp(rng, (6, 24, 24, 24, 5)))
    lo, hi = _box(rng, net, 0.25)
    root = box_bounds(net, lo, hi)
    A = rng.normal(size=(5, 5))
    before = spec_lower(root, A)[0]
    stable_before = {h: ((root.bounds[h][0] < 0) & (root.bounds[h][1] > 0)).sum() for h in ("fc1", "fc2")}
    tighten_intermediate(net, root, lo, hi, iterations=30)
    acts = net.forward(_samples(rng, lo, hi), keep=True)
    for h in ("fc0", "fc1", "fc2"):  # every sampled pre-activation inside the tightened bounds
        assert (acts[h] >= root.bounds[h][0]).all() and (acts[h] <= root.bounds[h][1]).all()
    assert sum(((root.bounds[h][0] < 0) & (root.bounds[h][1] > 0)).sum() for h in ("fc1", "fc2")) \
        <= sum(stable_before.values())
    chain = Chain(net, root.bounds, lo, hi)
    alpha, _, relaxed = optimise(chain, A, numpy.zeros(5), initial_alpha(chain, 5, {}), {}, {}, 50, stop_at=math.inf)
    after = domain_lower(net, root, lo, hi, A, numpy.zeros(5), alpha, relu_inputs=chain.relu_input)
    assert (after >= before - 1e-9).all() and (after > before + 1e-6).any()
    values = net.forward(_samples(rng, lo, hi)) @ A.T
    assert (values.min(axis=0) >= after).all()


def test_non_chain_network_is_named():
    nodes = [Node("a", "dense", ("input",), {"weight": numpy.eye(2), "bias": numpy.zeros(2)}),
             Node("r", "relu", ("a",)), Node("s", "add", ("r", "a"), attrs={"in_shapes": [(2,), (2,)]})]
    with pytest.raises(NotAChain, match="'a' feeds 2 nodes"):
        Chain(Network(nodes, (2,)), {}, numpy.zeros((1, 2)), numpy.ones((1, 2)))


def _case(lo, hi, rows):
    dis = tuple(SimpleNamespace(A=a[None], b=numpy.zeros(1), strict=numpy.zeros(1, bool)) for a in rows)
    return SimpleNamespace(lo=lo.reshape(-1), hi=hi.reshape(-1), disjuncts=dis)


def _grid_min(net, lo, hi, rows, steps=301):
    axes = [numpy.linspace(lo[0, 0, i], hi[0, 0, i], steps) for i in range(2)]
    g0, g1 = numpy.meshgrid(*axes)
    pts = numpy.stack([g0.ravel(), g1.ravel()], axis=1)[:, None, :]
    return (net.forward(pts) @ numpy.stack(rows).T).min()


def test_branch_and_bound_against_brute_force_on_two_inputs():
    """Tiny two-input networks: 'unsat' only where the dense grid's minimum is positive (a claim a
    grid point contradicts would be unsound); most clearly safe cases get proven; the corner
    candidates BaB offers really violate the row."""
    proved = safe = 0
    for seed in range(24):
        rng = numpy.random.default_rng(100 + seed)
        net = as_verification_network(random_mlp(rng, (2, 16, 16, 3)))
        lo, hi = _box(rng, net, 0.4)
        x = (lo + hi) / 2
        y = int(net.forward(x).argmax())
        rows = [numpy.eye(3)[y] - numpy.eye(3)[j] for j in range(3) if j != y]
        found = []

        def check(point, rows=rows, net=net, found=found):
            value = (net.forward(point.reshape(1, 1, 2)) @ numpy.stack(rows).T).min()
            found.append(value)
            return value <= 0

        status, details = prove_case(net, _case(lo, hi, rows), time.perf_counter() + 10, check=check,
                                     settings=BabSettings(batch=16, max_domains=4000))
        truth = _grid_min(net, lo, hi, rows)
        if status == "unsat":
            assert truth > 0, (seed, details)
        if status == "sat":
            assert truth <= 1e-3 and found and found[-1] <= 0
        if truth > 0.02:
            safe += 1
            proved += status == "unsat"
    assert safe >= 5 and proved >= 0.8 * safe


def test_relaxation_corner_that_violates_the_row_is_returned_as_sat_after_alpha_crown():
    """Every ReLU active on the box: the relaxation is exact and its minimising corner is the
    network's lowest point; a row violated only there (the centre is safe) is 'sat' right after
    alpha-CROWN, with that corner, once the replay accepts it, and never when it refuses."""
    wa = numpy.array([[1.0, 0.5], [-2.0, 1.0], [-1.0, 0.3]])  # (3 hidden, 2 inputs)
    wb = numpy.array([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]])  # (2 outputs, 3 hidden)
    nodes = [Node("a", "dense", ("input",), {"weight": wa, "bias": numpy.full(3, 10.0)}),
             Node("r", "relu", ("a",)), Node("b", "dense", ("r",), {"weight": wb, "bias": numpy.zeros(2)})]
    net = as_verification_network(Network(nodes, (2,)))
    lo, hi = numpy.array([[-1.0, -1.0]]), numpy.array([[1.0, 1.0]])
    row = numpy.array([1.0, -1.0])
    grad = row @ wb @ wa  # d(row . f)/dx where every ReLU is active
    lowest = numpy.where(grad > 0, lo, hi).reshape(-1)
    centre_value = row @ net.forward(numpy.zeros((1, 2))).reshape(-1)
    shift = centre_value - 0.5 * (centre_value - row @ net.forward(lowest.reshape(1, 2)).reshape(-1))
    case = _case(lo, hi, [row])
    case.disjuncts[0].b[:] = shift  # row . f(x) <= shift: false at the centre, true at the corner
    seen = []

    def accept(x):
        seen.append(x.copy())
        return True

    status, details = prove_case(net, case, time.perf_counter() + 10, check=accept)
    assert status == "sat" and details["stage"] == "alpha-crown"
    numpy.testing.assert_array_equal(details["x"], lowest)
    assert row @ net.forward(details["x"].reshape(1, 2)).reshape(-1) <= shift < centre_value
    assert len(seen) == 1
    status, details = prove_case(net, case, time.perf_counter() + 10, check=lambda x: False)
    assert status != "sat" and "x" not in details


def _mnist_fc(name):
    path = SHARED / "vnncomp" / "mnist_fc"
    if not (path / "onnx" / f"{name}.onnx.gz").exists():
        pytest.skip(f"VNN-COMP mnist_fc not found at {path} (set ROBEVAL_SHARED to the shared folder)")
    import onnx

    from robeval.adapters.onnx import load_onnx

    return load_onnx(onnx.load_from_string(gzip.open(path / "onnx" / f"{name}.onnx.gz").read())), path


def _prop(path, name):
    """The mnist_fc box and 'some y_j >= y_label' rows, read directly (independent of the parser)."""
    import re

    text = gzip.open(path / "vnnlib" / f"{name}.vnnlib.gz", "rt").read()
    lo, hi = numpy.zeros(784), numpy.zeros(784)
    for m in re.finditer(r"\(assert \(<= X_(\d+) ([-\d.e]+)\)\)", text):
        hi[int(m[1])] = float(m[2])
    for m in re.finditer(r"\(assert \(>= X_(\d+) ([-\d.e]+)\)\)", text):
        lo[int(m[1])] = float(m[2])
    rows = []
    for j, label in re.findall(r"\(and \(>= Y_(\d+) Y_(\d+)\)\)", text):
        a = numpy.zeros(10)
        a[int(label)], a[int(j)] = 1.0, -1.0
        rows.append(a)
    return _case(lo, hi, rows)


@pytest.mark.parametrize("net_name,prop,stage", [("mnist-net_256x2", "prop_0_0.03", "crown"),
                                                  ("mnist-net_256x6", "prop_2_0.03", "alpha-crown"),
                                                  ("mnist-net_256x2", "prop_10_0.05", "bab")])
def test_mnist_fc_instances_proven_as_published(net_name, prop, stage):
    """alpha-beta-CROWN (VNN-COMP 2022) reports these unsat; each is proven, by the stage named."""
    net, path = _mnist_fc(net_name)
    status, details = prove_case(net, _prop(path, prop), time.perf_counter() + 60)
    assert status == "unsat" and details["stage"] == stage


def _milp_minimum(net, lo, hi, row):
    """The exact minimum of row . f(x) over the box, for a flatten -> (dense -> relu)* -> dense
    network, by the standard big-M mixed-integer program (scipy's HiGHS), with IBP bounds as M."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    dense = [n for n in net.nodes if n.op == "dense"]
    bounds = net.interval(lo, hi, keep=True)
    sizes = [lo.size] + [int(n.params["weight"].shape[0]) for n in dense]
    # variables: x, then per hidden layer (h, z, d); the output is affine in the last z
    offsets, count = [0], lo.size
    for k in sizes[1:-1]:
        offsets.append(count)
        count += 3 * k
    rows, low, up = [], [], []
    var_lo, var_hi = [lo.ravel()], [hi.ravel()]
    integrality = [numpy.zeros(lo.size)]
    prev = (0, sizes[0])  # (offset, width) of the layer's input variables
    for layer, node in enumerate(dense[:-1]):
        w, b = node.params["weight"], node.params["bias"]
        k, base = w.shape[0], offsets[layer + 1]
        hl, hu = (a.ravel() for a in bounds[node.name])
        for j in range(k):  # h_j = w_j . prev + b_j
            r = numpy.zeros(count)
            r[prev[0]:prev[0] + prev[1]] = w[j]
            r[base + j] = -1.0
            rows.append(r), low.append(-b[j]), up.append(-b[j])
            zj, dj = base + k + j, base + 2 * k + j
            for coef, lo_v, up_v in (({zj: 1, base + j: -1}, 0, numpy.inf),                    # z >= h
                                     ({zj: 1, base + j: -1, dj: -hl[j]}, -numpy.inf, -hl[j]),   # z <= h - l(1-d)
                                     ({zj: 1, dj: -hu[j]}, -numpy.inf, 0)):                     # z <= u d
                r = numpy.zeros(count)
                for idx, v in coef.items():
                    r[idx] += v
                rows.append(r), low.append(lo_v), up.append(up_v)
        var_lo += [hl, numpy.zeros(k), numpy.zeros(k)]
        var_hi += [hu, numpy.maximum(hu, 0), numpy.ones(k)]
        integrality += [numpy.zeros(k), numpy.zeros(k), numpy.ones(k)]
        prev = (base + k, k)
    last = dense[-1]
    objective = numpy.zeros(count)
    objective[prev[0]:prev[0] + prev[1]] = row @ last.params["weight"]
    res = milp(objective, constraints=LinearConstraint(numpy.array(rows), low, up),
               integrality=numpy.concatenate(integrality),
               bounds=Bounds(numpy.concatenate(var_lo), numpy.concatenate(var_hi)))
    assert res.status == 0, res.message
    return float(res.fun + row @ last.params["bias"])


def _verdicts_against_milp(sizes, seeds, weights, settings):
    """For each seed a tiny random MLP, a box, and its margin rows, each row's exact minimum from the
    MILP: 'unsat' never where it is <= 0, always where it is clearly positive. Returns how many rows
    were clearly safe, how many unsafe, and every case's details."""
    seen_safe = seen_unsafe = 0
    all_details = []
    for seed in seeds:
        rng = numpy.random.default_rng(seed)
        net = as_verification_network(random_mlp(rng, sizes).astype(weights))
        lo, hi = _box(rng, net, 0.5)
        k = sizes[-1]
        y = int(net.forward((lo + hi) / 2).argmax())
        for j in (j for j in range(k) if j != y):
            row = numpy.eye(k)[y] - numpy.eye(k)[j]
            exact = _milp_minimum(net, lo, hi, row)
            sampled = (net.forward(_samples(rng, lo, hi, 2000)) @ row).min()
            assert exact <= sampled + 1e-7  # the oracle is a true minimum (no point below it)
            status, details = prove_case(net, _case(lo, hi, [row]), time.perf_counter() + 20, settings=settings)
            all_details.append(details)
            if exact < -1e-7:
                seen_unsafe += 1
                assert status != "unsat", (seed, j, exact, details)
            if exact > 1e-3:
                seen_safe += 1
                assert status == "unsat", (seed, j, exact, details)
    return seen_safe, seen_unsafe, all_details


@pytest.mark.parametrize("dtype,refine,weights", [("float32", True, "float32"), ("float32", True, "float64"),
                                                  ("float64", True, "float64"), ("float32", False, "float64")])
def test_verdicts_against_exact_milp_minima(dtype, refine, weights):
    """Tiny networks, exact minima from a MILP: 'unsat' never where the minimum is <= 0, and (BaB
    complete enough) every case whose minimum is clearly positive is proven, with the optimiser in
    either dtype, with and without per-domain intermediate bounds (computed in float32 for a net
    whose weights are float32 values)."""
    seen_safe, seen_unsafe, _ = _verdicts_against_milp((3, 8, 8, 3), [500 + seed for seed in range(16)], weights,
                                                       BabSettings(batch=16, max_domains=4000, dtype=dtype,
                                                                   refine=refine))
    assert seen_safe >= 5 and seen_unsafe >= 5


@pytest.mark.parametrize("seed", range(6))
def test_leaf_lp_on_fully_fixed_domains(seed):
    """A domain whose ReLUs are all fixed (to the signs of a box point x0): the LP finds a violating
    point when x0 violates (and that point is in the box, on the subdomain, violating); with an easy
    row it proves the domain through the rigorous engine with the LP's duals as beta."""
    from robeval.verify.bab import Domains, leaf_lp

    rng = numpy.random.default_rng(900 + seed)
    net = as_verification_network(random_mlp(rng, (2, 6, 6, 3)))
    lo, hi = _box(rng, net, 0.5)
    root = box_bounds(net, lo, hi)
    chain = Chain(net, root.bounds, lo, hi)
    x0 = rng.uniform(lo, hi)
    acts = net.forward(x0, keep=True)
    splits = {r: numpy.where(chain.unstable(r, {}), numpy.where(acts[chain.relu_input[r]] >= 0, 1.0, -1.0), 0.0)
              for r in chain.relus}
    a = rng.normal(size=3)
    value = float(net.forward(x0)[0] @ a)
    zeros = {r: numpy.zeros_like(s) for r, s in splits.items()}

    def domain(c):
        return Domains(a[None], numpy.array([c]), numpy.array([0]), splits, initial_alpha(chain, 1, splits),
                       zeros, numpy.array([-1.0]))

    verdict, x = leaf_lp(net, chain, root, lo, hi, domain(-value - 0.1))  # x0 itself violates
    assert verdict == "sat"
    assert (x >= lo.ravel() - 1e-12).all() and (x <= hi.ravel() + 1e-12).all()
    acts_x = net.forward(x.reshape(lo.shape), keep=True)
    for r, s in splits.items():
        assert (s * acts_x[chain.relu_input[r]] >= -1e-9).all()  # on the subdomain
    assert float(net.forward(x.reshape(lo.shape))[0] @ a) - value - 0.1 <= 1e-9
    verdict, _ = leaf_lp(net, chain, root, lo, hi, domain(-value + 50.0))
    assert verdict == "unsat"


def test_counterexample_found_by_branch_and_bound_replays_on_the_file():
    """mnist_fc 256x2 prop_2_0.03 (sat in alpha-beta-CROWN's results): the falsifier's APGD misses
    it; a BaB corner, moved into the file's float32 box, replays on onnxruntime and in float64."""
    path = SHARED / "vnncomp" / "mnist_fc"
    if not (path / "onnx" / "mnist-net_256x2.onnx.gz").exists():
        pytest.skip(f"VNN-COMP mnist_fc not found at {path} (set ROBEVAL_SHARED to the shared folder)")
    import robeval
    from robeval.verify import read_vnnlib

    spec = read_vnnlib(path / "vnnlib" / "prop_2_0.03.vnnlib.gz")
    result = robeval.verify(path / "onnx" / "mnist-net_256x2.onnx.gz", spec, timeout=60)
    assert result.status == "violated"
    x = result.counterexample.x
    case = spec.cases[0]
    assert case.contains(x) and numpy.array_equal(x.astype(numpy.float32).astype(numpy.float64), x)


def test_branch_and_bound_stops_at_its_deadline():
    """A case far too hard for the time given: 'timeout' by the deadline, even with optimiser runs and
    rounds far longer than the time (each stops at the deadline, rounds are sized to end by it)."""
    rng = numpy.random.default_rng(11)
    net = as_verification_network(random_mlp(rng, (12, 96, 96, 96, 96, 4)))
    lo, hi = _box(rng, net, 1.0)
    y = int(net.forward((lo + hi) / 2).argmax())
    row = numpy.eye(4)[y] - numpy.eye(4)[(y + 1) % 4]
    budget = 1.5
    start = time.perf_counter()
    slow = BabSettings(batch=4096, iterations=2000, root_iterations=2000, intermediate_iterations=2000)
    status, details = prove_case(net, _case(lo, hi, [row]), start + budget, settings=slow)
    elapsed = time.perf_counter() - start
    assert status == "timeout", details
    assert elapsed <= budget + 1.5, (elapsed, details)  # a round of 4096 parents would take far longer


def _inside(acts, chain, splits, d, npts):
    """Which sampled points lie in subdomain d (their split pre-activations have the split's sign)."""
    inside = numpy.ones(npts, dtype=bool)
    for relu, s in splits.items():
        h = acts[chain.relu_input[relu]].reshape(npts, -1)
        inside &= ((h * s[d].reshape(-1)[None]) >= 0).all(axis=1)
    return inside


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("kind", ["mlp", "mlp-float32", "cnn"])
def test_refined_bounds_hold_on_each_subdomain_and_never_loosen(seed, kind):
    """Each subdomain's recomputed intermediate bounds contain every sampled point of it, are inside
    the root's (clamped by the splits), are tighter somewhere, and give sound spec bounds."""
    from robeval.verify.bounds import exact_float32, refine_bounds

    rng = numpy.random.default_rng(seed)
    if kind == "cnn":
        net = as_verification_network(random_cnn(rng, hw=6, classes=3, pool="avgpool"))
    else:
        net = random_mlp(rng, (4, 12, 12, 12, 3))
        net = as_verification_network(net.astype(numpy.float32) if kind == "mlp-float32" else net)
    fast = exact_float32(net)
    assert (fast is not None) == (kind == "mlp-float32")
    lo, hi = _box(rng, net, 0.3 if kind != "cnn" else 0.1)
    root = box_bounds(net, lo, hi)
    chain = Chain(net, root.bounds, lo, hi)
    n = 8
    splits, alpha, beta = _random_parameters(rng, chain, n, lo, hi, splits_rate=0.4)
    refined, empty = refine_bounds(net, root, lo, hi, splits, chain.relu_input, fast=fast)
    assert not empty.any()  # each domain's splits come from a box point: none is empty
    pts = _samples(rng, lo, hi, 20000)
    acts = net.forward(pts, keep=True)
    tighter = 0.0
    for d in range(n):
        inside = _inside(acts, chain, splits, d, len(pts))
        assert inside.any()
        for name, (blo, bhi) in refined.items():
            v = acts[name][inside].reshape(int(inside.sum()), -1)
            assert (v >= blo[d].reshape(-1)).all() and (v <= bhi[d].reshape(-1)).all(), name
            clamped = chain.pre_bounds(next(r for r, h in chain.relu_input.items() if h == name),
                                       {k: s[d:d + 1] for k, s in splits.items()})
            assert (blo[d] >= clamped[0][0]).all() and (bhi[d] <= clamped[1][0]).all()
            tighter += float(((bhi[d] - blo[d]) < (clamped[1][0] - clamped[0][0]) - 1e-9).sum())
    assert tighter > 0
    A, c = rng.normal(size=(n, 3)), rng.normal(size=n)
    low = domain_lower(net, root, lo, hi, A, c, alpha, beta, splits, chain.relu_input, refined)
    values = net.forward(pts) @ A.T + c
    for d in range(n):
        assert values[_inside(acts, chain, splits, d, len(pts)), d].min() >= low[d]


def test_refined_bounds_find_an_empty_subdomain():
    """h = x (two copies), g = relu(h1) - 0.5: the subdomain h1 <= 0 and g >= 0 holds no point."""
    from robeval.verify.bounds import refine_bounds

    nodes = [Node("flat", "flatten", ("input",)),
             Node("a", "dense", ("flat",), {"weight": numpy.array([[1.0], [1.0]]), "bias": numpy.zeros(2)}),
             Node("r", "relu", ("a",)),
             Node("b", "dense", ("r",), {"weight": numpy.array([[1.0, 0.0]]), "bias": numpy.array([-0.5])}),
             Node("r2", "relu", ("b",)),
             Node("out", "dense", ("r2",), {"weight": numpy.array([[1.0]]), "bias": numpy.zeros(1)})]
    net = as_verification_network(Network(nodes, (1, 1)))
    lo, hi = numpy.array([[[-1.0]]]), numpy.array([[[1.0]]])
    root = box_bounds(net, lo, hi)
    chain = Chain(net, root.bounds, lo, hi)
    splits = {"r": numpy.array([[-1.0, 0.0], [1.0, 0.0]]), "r2": numpy.array([[1.0], [1.0]])}
    refined, empty = refine_bounds(net, root, lo, hi, splits, chain.relu_input)
    assert empty.tolist() == [True, False]  # x in [0.5, 1] satisfies the second
    assert refined["b"][1][0, 0] <= 0.5 + 1e-9


def test_refined_bounds_need_fewer_domains_for_the_same_verdicts():
    """Deeper tiny nets, properties that hold (exact MILP minimum > 0) and need some branching: with
    each domain's intermediate bounds recomputed under its splits, branch and bound proves each of
    them, as it does without, with fewer domains in all (and finds empty subdomains). The hidden-layer
    stage is off: it would prove most of them before the search; 3 branching candidates, so that
    enough of these small properties need 50 or more domains without refinement."""
    totals = {True: 0, False: 0}
    empty = cases = 0
    for seed in range(40):
        rng = numpy.random.default_rng(700 + seed)
        net = as_verification_network(random_mlp(rng, (3, 10, 10, 10, 3)))
        lo, hi = _box(rng, net, 0.5)
        y = int(net.forward((lo + hi) / 2).argmax())
        row = numpy.eye(3)[y] - numpy.eye(3)[(y + 1) % 3]
        if _milp_minimum(net, lo, hi, row) < 0.01:
            continue
        domains = {}
        for refine in (False, True):
            status, details = prove_case(net, _case(lo, hi, [row]), time.perf_counter() + 30,
                                         settings=BabSettings(batch=8, max_domains=20000, refine=refine,
                                                               tighten=False, candidates=3))
            assert status == "unsat", (seed, refine, details)
            domains[refine] = details.get("domains", 0)
            empty += details.get("empty", 0) if refine else 0
            if domains[False] < 50:
                break
        if len(domains) == 2:
            cases += 1
            totals[True] += domains[True]
            totals[False] += domains[False]
        if cases == 5:
            break
    assert cases == 5
    assert totals[True] < 0.85 * totals[False], totals
    assert empty > 0


def test_float32_copy_only_when_exact_and_boxes_rounded_outwards():
    from robeval.verify.bounds import _outward, exact_float32

    rng = numpy.random.default_rng(0)
    net = random_mlp(rng, (4, 6, 3))
    assert exact_float32(as_verification_network(net)) is None  # float64 weights would be rounded
    fast = exact_float32(as_verification_network(net.astype(numpy.float32)))
    assert fast is not None and fast.dtype == numpy.float32
    lo = rng.normal(size=1000)
    hi = lo + rng.uniform(0, 1e-6, size=1000)
    flo, fhi = _outward(lo, hi, numpy.dtype(numpy.float32))
    assert flo.dtype == numpy.float32 and (flo.astype(float) <= lo).all() and (fhi.astype(float) >= hi).all()
    assert (flo.astype(float) < lo).any()  # most float64 values are not float32 ones


def test_prove_case_progress_reports_each_stage_with_the_bounds_it_reached(monkeypatch):
    """The progress lines carry the prover's own numbers: alpha-CROWN's worst bound, one line per
    hidden-layer pass with that pass's worst bound (as in details['tightened_margin']), and one per
    branch-and-bound round that left domains open, counting rounds up with a lowest bound that
    never falls (children are bounded at least as high as their parent)."""
    import re

    from robeval.verify import prove

    monkeypatch.setattr(prove, "PROGRESS_EVERY", 0.0)  # every round of branch and bound reports
    rng = numpy.random.default_rng(11)
    net = as_verification_network(random_mlp(rng, (4, 24, 24, 24, 3)))
    lo, hi = _box(rng, net, 0.3)
    y = int(net.forward((lo + hi) / 2).argmax())
    rows = [numpy.eye(3)[y] - numpy.eye(3)[j] for j in range(3) if j != y]
    lines = []
    status, details = prove_case(net, _case(lo, hi, rows), time.perf_counter() + 6,
                                 settings=BabSettings(batch=8, tighten_first=0.05, candidates=3), progress=lines.append)
    assert details["stage"] == "bab" and status in ("unsat", "timeout"), details
    number = r"(-?[0-9.e+-]+|inf)"
    alpha = [float(m[1]) for m in (re.fullmatch(rf"alpha-CROWN: .*worst bound {number}", t) for t in lines) if m]
    passes = [float(m[1]) for m in (re.fullmatch(rf"hidden layers pass \d+: .*worst bound {number}", t) for t in lines)
              if m]
    bab = [m for m in (re.fullmatch(rf"branch and bound: round (\d+), (\d+) domains bounded, (\d+) open, "
                                    rf"lowest bound {number}", t) for t in lines) if m]
    assert len(alpha) == 1 and alpha[0] < 0  # not proven by alpha-CROWN: the search went on
    assert len(passes) == len(details["tightened"]) >= 2
    assert passes == pytest.approx(details["tightened_margin"], rel=1e-3)
    assert len(alpha) + len(passes) + len(bab) == len(lines)
    rounds = [int(m[1]) for m in bab]
    assert rounds == list(range(1, len(bab) + 1))
    assert len(bab) == details["rounds"] - (status == "unsat")  # the round that closes the last domain is silent
    lowest = [float(m[4]) for m in bab]
    assert lowest == sorted(lowest) and lowest[0] >= passes[-1] - 1e-9
