"""The auto_LiRPA reference model and bounds in ``../shared/reference``: loading and ordering helpers
shared by the certifier tests (the ``reference_bounds`` / ``reference_onnx`` fixtures skip with a
reason when the folder is missing)."""

from __future__ import annotations

import numpy
import pytest

from robeval.ir import Network, Node


def reference_network(path) -> Network:
    """The reference MLP (Flatten -> (Gemm -> Relu)* -> Gemm) read straight from its ONNX initializers,
    independently of robeval's ONNX adapter."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    nodes, prev = [Node("flat", "flatten", ("input",))], "flat"
    for i, g in enumerate(gemms):
        nodes.append(Node(f"fc{i}", "dense", (prev,), {"weight": inits[g.input[1]], "bias": inits[g.input[2]]}))
        prev = f"fc{i}"
        if i < len(gemms) - 1:
            nodes.append(Node(f"relu{i}", "relu", (prev,)))
            prev = f"relu{i}"
    return Network(nodes, (1, 28, 28))


def in_reference_order(lower, c_margin):
    """(N, K) margin bounds (+inf at y) -> (N, K-1) in the order of the reference's C_margin rows."""
    j = numpy.argmin(c_margin, axis=2)  # the column with -1 in each specification row
    return numpy.take_along_axis(lower, j, axis=1)


def relative_error(ours, ref):
    """max |ours - ref| / max(1, |ref|), the measure the reference README quotes."""
    return float((numpy.abs(ours - ref) / numpy.maximum(1.0, numpy.abs(ref))).max())
