"""Falsification and replay: violations found and replayed on onnxruntime and in float64, none where the
property holds, float32-only / float64-only ties refused, and the competition's counterexample format."""

from __future__ import annotations

import re

import numpy
import pytest
from conftest import SHARED

pytest.importorskip("onnx", reason="the falsifier tests build ONNX models (pip install 'robeval[onnx]')")
pytest.importorskip("onnxruntime", reason="counterexamples replay on onnxruntime")

from robeval.adapters.onnx import load_onnx  # noqa: E402
from robeval.verify import Case, Disjunct, Replayer, Spec, falsify, read_vnnlib, replay, robustness_spec  # noqa: E402
from robeval.verify.falsify import representable_box  # noqa: E402

from verify_models import mlp_onnx, random_layers, save, sum_net, tie_net  # noqa: E402

THIRD = float(numpy.float32(1 / 3))


def parse_vnncomp(text: str):
    lines = text.splitlines()
    assert lines[0] == "sat" and lines[1] == "(" and lines[-1] == ")"
    pairs = [re.fullmatch(r"\(([XY])_(\d+) (\S+)\)", line).groups() for line in lines[2:-1]]
    xs = [float(v) for k, _, v in pairs if k == "X"]
    ys = [float(v) for k, _, v in pairs if k == "Y"]
    assert [int(i) for k, i, _ in pairs if k == "X"] == list(range(len(xs)))
    return numpy.array(xs), numpy.array(ys)


def test_a_violation_only_the_gradient_reaches_is_found_and_replays(tmp_path):
    n = 16
    path = save(sum_net(n), tmp_path / "sum.onnx")
    net = load_onnx(path, channels_last=False)
    # violated iff sum(x) >= 15.5 on [0, 1]^16: uniform points have mean 8 and sd 1.15, never get there
    case = Spec.from_box(numpy.zeros(n), numpy.ones(n), [[-1.0, 0.0]], [-15.5]).cases[0]
    cex = falsify(net, case, model=path, restarts=2, steps=10)
    assert cex is not None and cex.disjunct == 0
    assert case.contains(cex.x) and cex.y[0] >= 15.5 and cex.y64[0] >= 15.5
    assert numpy.array_equal(cex.y, numpy.asarray(net.forward(cex.x.astype(numpy.float32)[None]))[0])
    x, y = parse_vnncomp(cex.to_vnncomp())
    assert numpy.array_equal(x, cex.x) and numpy.array_equal(y, cex.y)  # repr precision: exact round trip
    assert replay(path, net, case, cex.x) is not None


@pytest.mark.parametrize("seed", range(3))
def test_rare_violations_of_random_relu_nets_are_found(seed, tmp_path):
    rng = numpy.random.default_rng(seed)
    model = mlp_onnx(random_layers(rng, (6, 24, 24, 3)))
    net = load_onnx(model, channels_last=False)
    lo, hi = numpy.full(6, -1.0), numpy.ones(6)
    pts = rng.uniform(lo, hi, size=(20000, 6)).astype(numpy.float32)
    gap = numpy.asarray(net.forward(pts), dtype=numpy.float64) @ numpy.array([-1.0, 1.0, 0.0])
    threshold = numpy.quantile(gap, 0.999)  # 0.1% of uniform points have y1 - y0 >= threshold
    case = Spec.from_box(lo, hi, [[1.0, -1.0, 0.0]], [-threshold]).cases[0]
    cex = falsify(net, case, model=model, restarts=4, steps=50, seed=seed)
    assert cex is not None
    assert cex.y[1] - cex.y[0] >= threshold and cex.y64[1] - cex.y64[0] >= threshold


def test_nothing_is_returned_where_the_property_holds(tmp_path):
    # y = relu(x) on a box around (0.9, 0.1) of radius 0.01: y0 - y1 >= 0.78 everywhere
    model = mlp_onnx([(numpy.eye(2), numpy.zeros(2)), (numpy.eye(2), numpy.zeros(2))])
    net = load_onnx(model, channels_last=False)
    spec = robustness_spec(numpy.array([0.9, 0.1]), 0.01, label=0, num_classes=2)
    assert falsify(net, spec.cases[0], model=model, restarts=8, steps=50) is None


@pytest.mark.parametrize("rows, b, strict, accepted, why", [
    ([[-1.0]], [-1.0], [True], False, "y > 1 holds in float64 (1.00000003) but not on onnxruntime (1.0)"),
    ([[1.0]], [1.0], [False], False, "y <= 1 holds on onnxruntime (1.0) but not in float64"),
    ([[-1.0]], [-1.0], [False], True, "y >= 1 holds in both"),
])
def test_ties_between_float32_and_float64_are_not_accepted(rows, b, strict, accepted, why):
    model = tie_net()
    net = load_onnx(model, channels_last=False)
    case = Case([THIRD], [THIRD], (Disjunct(rows, b, numpy.array(strict)),))
    y, y64 = Replayer(model, net).outputs(numpy.array([[THIRD]]))
    assert y[0, 0] == 1.0 and y64[0, 0] == 3 * THIRD > 1.0  # the tie itself
    found = falsify(net, case, model=model, restarts=2, steps=5)
    assert (found is not None) == accepted, why
    assert (replay(model, net, case, [THIRD]) is not None) == accepted, why


def test_replay_checks_the_real_box_and_the_files_dtype():
    model = tie_net()
    net = load_onnx(model, channels_last=False)
    d = Disjunct([[-1.0]], [-100.0])  # y >= 100
    case = Case([0.0], [40.0], (d,), inner=(numpy.array([0.0]), numpy.array([34.0])))
    rep = Replayer(model, net)
    assert rep.check(case, [34.0]) is not None  # y = 102
    assert rep.check(case, [35.0]) is None  # in the outer box only: outside the specification's box
    assert rep.check(case, [33.4]) is None  # not a float32 value: the file cannot be run on it exactly
    assert rep.check(case, [float(numpy.float32(33.4))]) is not None
    assert rep.check(case, [numpy.nan]) is None


def test_representable_box_rounds_inwards():
    lo, hi = numpy.array([0.7, 0.0]), numpy.array([0.8, 1e-50])
    l32, h32 = representable_box(lo, hi, numpy.float32)
    assert (l32.astype(float) >= lo).all() and (h32.astype(float) <= hi).all()
    assert float(numpy.float32(0.7)) < 0.7 and l32[0] == numpy.nextafter(numpy.float32(0.7), numpy.float32(1))
    assert float(numpy.float32(0.8)) > 0.8 and h32[0] == numpy.nextafter(numpy.float32(0.8), numpy.float32(0))
    assert h32[1] == 0.0  # 1e-50 is below float32's smallest subnormal
    assert representable_box(numpy.array([0.1]), numpy.array([0.1]), numpy.float32) is None  # no float32 is 0.1


def test_several_disjuncts_and_one_without_rows():
    model = mlp_onnx([(numpy.array([[1.0, -1.0]]), numpy.zeros(2))])  # y = (x, -x)
    net = load_onnx(model, channels_last=False)
    impossible = Disjunct([[1.0, 0.0]], [-5.0])  # x <= -5 on [0, 1]
    reachable = Disjunct([[0.0, 1.0]], [-0.75])  # -x <= -0.75
    cex = falsify(net, Case([0.0], [1.0], (impossible, reachable)), model=model)
    assert cex is not None and cex.disjunct == 1 and cex.x[0] >= 0.75
    anything = Disjunct(numpy.zeros((0, 2)), numpy.zeros(0))
    cex = falsify(net, Case([0.0], [1.0], (impossible, anything)), model=model)
    assert cex is not None and cex.disjunct == 1


def test_deadline_stops_the_search(tmp_path):
    model = mlp_onnx([(numpy.eye(2), numpy.zeros(2))])
    net = load_onnx(model, channels_last=False)
    case = Spec.from_box([0, 0], [1, 1], [[1.0, 0.0]], [-1.0]).cases[0]  # impossible: x0 <= -1
    assert falsify(net, case, model=model, steps=10_000, deadline=0.0) is None  # returns at once


def test_mnist_fc_counterexample_replays_on_the_gzip_file():
    onnx_path = SHARED / "vnncomp" / "mnist_fc" / "onnx" / "mnist-net_256x2.onnx.gz"
    prop = SHARED / "vnncomp" / "mnist_fc" / "vnnlib" / "prop_1_0.05.vnnlib.gz"
    if not onnx_path.exists() or not prop.exists():
        pytest.skip(f"VNN-COMP mnist_fc not found under {SHARED} (set ROBEVAL_SHARED to the shared folder)")
    net = load_onnx(onnx_path, channels_last=False)
    assert net.input_shape == (784, 1)  # the file's (1, 784, 1) input without its batch axis
    spec = read_vnnlib(prop, n_inputs=784, n_outputs=10)
    cex = falsify(net, spec.cases[0], model=onnx_path)
    assert cex is not None  # the competition's α,β-CROWN also reports sat here
    label = int(numpy.argmax(spec.cases[0].disjuncts[0].A[0]))
    assert numpy.argmax(cex.y) != label and cex.y.max() >= cex.y[label]
    assert spec.cases[0].contains(cex.x)
    assert numpy.allclose(cex.y, cex.y64, atol=1e-5)
