"""Tiny ONNX models with known answers for the verifier tests, built with onnx.helper."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy
from onnx import TensorProto, helper, numpy_helper


def mlp_onnx(layers, batch="N", in_shape=None, opset=13):
    """A ModelProto x -> (x W_0 + b_0) -> relu -> ... -> x W_k + b_k for layers [(W (in, out), b), ...];
    the input has shape (batch, *in_shape) (default (batch, in)) and is flattened first when 2-D+."""
    n_in = layers[0][0].shape[0]
    in_shape = tuple(in_shape or (n_in,))
    nodes, inits, prev = [], [], "x"
    if len(in_shape) > 1:
        nodes.append(helper.make_node("Flatten", ["x"], ["flat"], axis=1))
        prev = "flat"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(numpy.asarray(w, numpy.float32), f"w{i}"),
                  numpy_helper.from_array(numpy.asarray(b, numpy.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        prev = f"a{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *in_shape])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, layers[-1][0].shape[1]])],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def save(model, path: Path, compress: bool = False) -> Path:
    data = model.SerializeToString()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def random_layers(rng, sizes):
    return [(rng.normal(size=(a, b)) / numpy.sqrt(a), rng.normal(size=b) * 0.1) for a, b in zip(sizes[:-1], sizes[1:])]


def sum_net(n: int):
    """y = [sum(x), 0]: linear, so sign-gradient steps reach the corner of a box at once."""
    w = numpy.zeros((n, 2))
    w[:, 0] = 1.0
    return mlp_onnx([(w, numpy.zeros(2))])


def tie_net():
    """y = 3 x: at x = float32(1/3) onnxruntime gives exactly 1.0 (3x rounded to float32) while
    the float64 representation gives 1.0000000298... (3 times the float32 value, exactly)."""
    return mlp_onnx([(numpy.array([[3.0]]), numpy.zeros(1))])


def vnnlib_text(lo, hi, rows, strict=None) -> str:
    """VNN-LIB for the box [lo, hi] and one disjunct of rows (a, b): a . y <= b (< where strict)."""
    k = len(rows[0][0])
    lines = [f"(declare-const X_{i} Real)" for i in range(len(lo))] + [f"(declare-const Y_{j} Real)" for j in range(k)]
    for i, (v, w) in enumerate(zip(lo, hi)):
        lines += [f"(assert (>= X_{i} {float(v)!r}))", f"(assert (<= X_{i} {float(w)!r}))"]
    for r, (a, b) in enumerate(rows):
        op = "<" if strict is not None and strict[r] else "<="
        terms = " ".join(f"(* {float(c)!r} Y_{j})" for j, c in enumerate(a) if c != 0)
        lines.append(f"(assert ({op} (+ {terms}) {float(b)!r}))")
    return "\n".join(lines) + "\n"
