"""ONNX import (robeval.adapters.onnx) against onnxruntime, in the manner of onnx2torch's tests.

1. One-node (or few-node) models built with onnx.helper, one per converter and option: the
   network's forward in float32 and float64 must match onnxruntime to 1e-5.
2. Whole models exported from torch (legacy and dynamo exporters) and Keras (tf2onnx): MLP, CNN with
   batch norm and pooling, residual block, input normalisation, MaxMin activations (which must be
   fused into ``groupsort`` for a tight Lipschitz bound), and the shared reference MLP.
3. Bad input: unsupported ops reported together, missing/corrupt files, old opsets, shapes.
4. The OnnxModel adapter: predict, fidelity checks, gradients against finite differences and torch.
"""

from __future__ import annotations

import math
import os
import sys
import types
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from robeval.adapters.onnx import OnnxModel, load_onnx, supported_ops  # noqa: E402
from robeval.errors import (  # noqa: E402
    FidelityError,
    InputShapeError,
    InvalidParameterError,
    ModelLoadError,
    UnsupportedOpError,
)

FLOAT = TensorProto.FLOAT
ATOL = 1e-5
RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------- helpers
def make_model(nodes, in_shape, inits=None, opset=17, out="y"):
    """A model with input 'x' of shape ["N", *in_shape], constants ``inits`` and output ``out``."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", FLOAT, ["N", *in_shape])],
                              [helper.make_tensor_value_info(out, FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    return onnx.shape_inference.infer_shapes(model)


def run_ort(model, x):
    blob = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def assert_matches_ort(model, x, input_shape=None, atol=ATOL):
    """network.forward in float32 and float64 against onnxruntime; returns the network."""
    net = load_onnx(model, input_shape)
    ref = run_ort(model, x.astype(np.float32)).astype(np.float64)
    if net.meta["channels_last"]:  # the network takes NCHW where the model takes NHWC
        x = x.transpose(0, 3, 1, 2)
    out32 = net.forward(x.astype(np.float32))
    out64 = net.astype(np.float64).forward(x.astype(np.float64))
    assert out32.dtype == np.float32
    assert out32.shape == ref.shape, (out32.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(out32 - ref).max() <= atol * scale, np.abs(out32 - ref).max()
    assert np.abs(out64 - ref).max() <= atol * scale, np.abs(out64 - ref).max()
    return net


def w(*shape, fan_in=None):
    fan_in = fan_in or (math.prod(shape[1:]) if len(shape) > 1 else 1)
    return (RNG.normal(size=shape) / math.sqrt(fan_in)).astype(np.float32)


def c(values, dtype=np.int64):
    return np.asarray(values, dtype=dtype)


def node(op, inputs, outputs=("y",), **kw):
    return helper.make_node(op, list(inputs), list(outputs), **kw)


def export_torch(model, x, path, dynamo=False, **kw):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model.eval(), (x,), path, dynamo=True, opset_version=18, input_names=["input"],
                              dynamic_shapes={"input": {0: torch.export.Dim("batch")}}, verbose=False)
        else:
            kw.setdefault("dynamic_axes", {"input": {0: "batch"}})
            torch.onnx.export(model.eval(), x, path, dynamo=False, opset_version=17, input_names=["input"], **kw)
    return str(path)


# ---------------------------------------------------------------------------------- one-op models
IMG = (3, 6, 7)  # per-sample (C, H, W) for image ops


def _conv(pads=None, strides=(1, 1), dilations=(1, 1), group=1, auto_pad=None, k=(3, 3)):
    kw = {"strides": list(strides), "dilations": list(dilations), "group": group}
    if pads is not None:
        kw["pads"] = list(pads)
    if auto_pad:
        kw["auto_pad"] = auto_pad
    cin = IMG[0] // group
    return ([node("Conv", ["x", "W", "B"], **kw)], IMG, {"W": w(6, cin, *k), "B": w(6)})


def _pool(op, **kw):
    return ([node(op, ["x"], **kw)], IMG, {})


CASES = {
    "gemm_transB_alpha_beta": ([node("Gemm", ["x", "W", "C"], alpha=0.5, beta=2.0, transB=1)], (4,),
                               {"W": w(5, 4), "C": w(5)}),
    "gemm_C_row": ([node("Gemm", ["x", "W", "C"])], (4,), {"W": w(4, 5), "C": w(1, 5)}),
    "gemm_no_C": ([node("Gemm", ["x", "W"], transB=1)], (4,), {"W": w(3, 4)}),
    "matmul": ([node("MatMul", ["x", "W"])], (4,), {"W": w(4, 3)}),
    "matmul_3d": ([node("MatMul", ["x", "W"])], (2, 4), {"W": w(4, 3)}),
    "add_const": ([node("Add", ["x", "C"])], IMG, {"C": w(1, 3, 1, 1)}),
    "sub_const": ([node("Sub", ["x", "C"])], IMG, {"C": c(0.25, np.float32)}),
    "sub_const_first": ([node("Sub", ["C", "x"])], IMG, {"C": w(7)}),
    "mul_const": ([node("Mul", ["C", "x"])], IMG, {"C": w(3, 1, 1)}),
    "div_const": ([node("Div", ["x", "C"])], IMG, {"C": c([[[0.5]], [[2.0]], [[-4.0]]], np.float32)}),
    "add_two": ([node("Relu", ["x"], ["r"]), node("Add", ["x", "r"])], IMG, {}),
    "sub_two_broadcast": ([node("ReduceMean", ["x"], ["m"], axes=[1], keepdims=1), node("Sub", ["x", "m"])], IMG, {}),
    "neg": ([node("Neg", ["x"])], IMG, {}),
    "conv_pads_stride_dilation": _conv(pads=(1, 2, 0, 1), strides=(2, 1), dilations=(1, 2)),
    "conv_same_upper": _conv(auto_pad="SAME_UPPER", strides=(2, 2), k=(4, 3)),
    "conv_same_lower": _conv(auto_pad="SAME_LOWER", strides=(2, 2), k=(4, 3)),
    "conv_valid": _conv(auto_pad="VALID"),
    "conv_depthwise": _conv(pads=(1, 1, 1, 1), group=3),
    "conv_1d": ([node("Conv", ["x", "W", "B"], pads=[2, 1], strides=[2])], (3, 11), {"W": w(4, 3, 3), "B": w(4)}),
    "batchnorm_4d": ([node("BatchNormalization", ["x", "g", "b", "m", "v"], epsilon=1e-3)], IMG,
                     {"g": w(3), "b": w(3), "m": w(3), "v": np.abs(w(3)) + 0.5}),
    "batchnorm_2d": ([node("BatchNormalization", ["x", "g", "b", "m", "v"])], (5,),
                     {"g": w(5), "b": w(5), "m": w(5), "v": np.abs(w(5)) + 0.5}),
    "relu": ([node("Relu", ["x"])], IMG, {}),
    "leaky_relu": ([node("LeakyRelu", ["x"], alpha=0.2)], IMG, {}),
    "leaky_relu_negative": ([node("LeakyRelu", ["x"], alpha=-1.5)], IMG, {}),
    "prelu_channels": ([node("PRelu", ["x", "s"])], IMG, {"s": c([[[-1.5]], [[0.25]], [[2.0]]], np.float32)}),
    "prelu_scalar": ([node("PRelu", ["x", "s"])], (5,), {"s": c(-0.5, np.float32)}),
    "sigmoid": ([node("Sigmoid", ["x"])], IMG, {}),
    "tanh": ([node("Tanh", ["x"])], IMG, {}),
    "clip_min_max": ([node("Clip", ["x", "lo", "hi"])], IMG, {"lo": c(-0.5, np.float32), "hi": c(0.7, np.float32)}),
    "clip_max_only": ([node("Clip", ["x", "", "hi"])], IMG, {"hi": c(0.3, np.float32)}),
    "clip_none": ([node("Clip", ["x"])], IMG, {}),
    "maxpool_pads_strides": _pool("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 0]),
    "maxpool_same_upper": _pool("MaxPool", kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    "maxpool_ceil_mode": _pool("MaxPool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    "maxpool_ceil_mode_pads": _pool("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
    "maxpool_1d": ([node("MaxPool", ["x"], kernel_shape=[3], strides=[2])], (3, 11), {}),
    "avgpool_exclude_pad": _pool("AveragePool", kernel_shape=[3, 3], strides=[2, 1], pads=[1, 1, 1, 1]),
    "avgpool_include_pad": _pool("AveragePool", kernel_shape=[3, 3], strides=[2, 1], pads=[1, 1, 1, 1],
                                 count_include_pad=1),
    "avgpool_ceil_mode": _pool("AveragePool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    "avgpool_ceil_mode_include_pad": _pool("AveragePool", kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1,
                                           count_include_pad=1),
    "avgpool_ceil_mode_pads": _pool("AveragePool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1,
                                    pads=[1, 1, 1, 1]),
    "global_avgpool": _pool("GlobalAveragePool"),
    "global_maxpool": _pool("GlobalMaxPool"),
    "flatten": ([node("Flatten", ["x"])], IMG, {}),
    "flatten_axis_past_ones": ([node("Flatten", ["x"], axis=2)], (1, 4, 5), {}),
    "reshape_zero_minus_one": ([node("Reshape", ["x", "s"])], IMG, {"s": c([0, -1, 2, 7])}),
    "reshape_minus_one_first": ([node("Reshape", ["x", "s"])], IMG, {"s": c([-1, 42, 3])}),
    "transpose": ([node("Transpose", ["x"], perm=[0, 2, 3, 1])], IMG, {}),
    "concat": ([node("Relu", ["x"], ["r"]), node("Concat", ["x", "r"], axis=-1)], IMG, {}),
    "slice": ([node("Slice", ["x", "s", "e", "a", "t"])], IMG,
              {"s": c([1, 0, 0]), "e": c([-1, 100, 2**62]), "a": c([2, 3, 0]), "t": c([1, 2, 1])}),
    "slice_no_axes": ([node("Slice", ["x", "s", "e"])], (9,), {"s": c([0, 2]), "e": c([2**62, -3])}),
    "split_sizes": ([node("Split", ["x", "s"], ["a", "b"], axis=1), node("Concat", ["b", "a"], axis=1)],
                    IMG, {"s": c([1, 2])}),
    "split_equal": ([node("Split", ["x"], ["a", "b", "d"], axis=2), node("Concat", ["d", "b", "a"], ["y"], axis=2)],
                    (2, 6, 4), {}),
    "max_min_two": ([node("Neg", ["x"], ["n"]), node("Max", ["x", "n"], ["a"]), node("Min", ["x", "n"], ["b"]),
                     node("Concat", ["b", "a"], axis=1)], IMG, {}),
    "max_scalar": ([node("Max", ["x", "C"])], IMG, {"C": c(0.1, np.float32)}),
    "min_tensor": ([node("Min", ["C", "x"])], IMG, {"C": w(3, 1, 7)}),
    "max_three": ([node("Relu", ["x"], ["r"]), node("Neg", ["x"], ["n"]), node("Max", ["x", "r", "n"])], IMG, {}),
    "identity": ([node("Identity", ["x"])], IMG, {}),
    "dropout": ([node("Dropout", ["x", "p"])], IMG, {"p": c(0.5, np.float32)}),
    "softmax": ([node("Softmax", ["x"], axis=1)], IMG, {}),
    "log_softmax": ([node("LogSoftmax", ["x"])], (10,), {}),
    "squeeze_unsqueeze": ([node("Unsqueeze", ["x", "a"], ["u"]), node("Squeeze", ["u", "b"])], (3, 4),
                          {"a": c([1, -1]), "b": c([1])}),
    "constant": ([node("Constant", [], ["k"], value=numpy_helper.from_array(w(7), "k")), node("Add", ["x", "k"])],
                 IMG, {}),
    "reduce_mean": ([node("ReduceMean", ["x"], axes=[2, 3], keepdims=0)], IMG, {}),
    "reduce_sum": ([node("ReduceSum", ["x", "a"], keepdims=1)], IMG, {"a": c([1])}),
    "reduce_max": ([node("ReduceMax", ["x"], axes=[1], keepdims=1)], IMG, {}),
    "reduce_min": ([node("ReduceMin", ["x"], axes=[-1, 2], keepdims=0)], IMG, {}),
    "gather_scalar": ([node("Gather", ["x", "i"], axis=2)], IMG, {"i": c(-2)}),
    "gather_list": ([node("Gather", ["x", "i"], axis=1)], IMG, {"i": c([2, 0, 1, 0])}),
    "pad": ([node("Pad", ["x", "p"])], IMG, {"p": c([0, 0, 1, 2, 0, 0, 3, 0])}),
    "topk_sort_descending": ([node("TopK", ["x", "k"], ["y", "i"], axis=1)], IMG, {"k": c([3])}),
    "topk_sort_ascending": ([node("TopK", ["x", "k"], ["y", "i"], axis=-1, largest=0)], IMG, {"k": c([7])}),
    "cast_float": ([node("Cast", ["x"], to=FLOAT)], IMG, {}),
    "shape_subgraph_flatten": ([node("Shape", ["x"], ["s"]), node("Gather", ["s", "z"], ["n"], axis=0),
                                node("Unsqueeze", ["n", "z1"], ["n1"]), node("Concat", ["n1", "m1"], ["t"], axis=0),
                                node("Reshape", ["x", "t"])], IMG,
                               {"z": c(0), "z1": c([0]), "m1": c([-1])}),
    "size_subgraph": ([node("Size", ["x"], ["s"]), node("Shape", ["x"], ["sh"]), node("Gather", ["sh", "z"], ["n"]),
                       node("Div", ["s", "n"], ["per"]), node("Unsqueeze", ["per", "z1"], ["per1"]),
                       node("Concat", ["m1", "per1"], ["t"], axis=0), node("Reshape", ["x", "t"])], IMG,
                      {"z": c(0), "z1": c([0]), "m1": c([-1])}),
    "batch_sized_constant": ([node("Shape", ["x"], ["s"]), node("ConstantOfShape", ["s"], ["k"],
                                                                  value=numpy_helper.from_array(c([0.5], np.float32))),
                              node("Add", ["x", "k"])], IMG, {}),
}

OPSET18_CASES = {
    "split_num_outputs": ([node("Split", ["x"], ["a", "b", "d"], axis=2, num_outputs=3),
                           node("Concat", ["d", "a", "b"], axis=2)], (2, 7, 3), {}),
    "reduce_max_axes_input": ([node("ReduceMax", ["x", "a"], keepdims=0)], IMG, {"a": c([1])}),
    "reduce_mean_axes_input": ([node("ReduceMean", ["x", "a"], keepdims=1)], IMG, {"a": c([-1])}),
}


@pytest.mark.parametrize("name", sorted(CASES) + sorted(OPSET18_CASES))
def test_op_matches_onnxruntime(name):
    nodes, shape, inits = CASES[name] if name in CASES else OPSET18_CASES[name]
    model = make_model(nodes, shape, inits, opset=17 if name in CASES else 18)
    x = RNG.normal(size=(4, *shape)).astype(np.float32)
    assert_matches_ort(model, x)


@pytest.mark.parametrize("name", sorted(CASES) + sorted(OPSET18_CASES))
def test_op_gradient_matches_finite_differences(name):
    """The converted network's vjp (float64) along a random direction, against central differences."""
    nodes, shape, inits = CASES[name] if name in CASES else OPSET18_CASES[name]
    net = load_onnx(make_model(nodes, shape, inits, opset=17 if name in CASES else 18)).astype(np.float64)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, *net.input_shape))
    g, d = rng.normal(size=net.forward(x).shape), rng.normal(size=x.shape)
    fd = ((net.forward(x + 1e-6 * d) - net.forward(x - 1e-6 * d)) * g).sum() / 2e-6
    assert abs(fd - (net.vjp(x, g) * d).sum()) <= 1e-6 * max(1.0, abs(fd))


def test_every_converted_op_type_has_a_case():
    used = {n.op_type for cases in (CASES, OPSET18_CASES) for nodes, _, _ in cases.values() for n in nodes}
    assert set(supported_ops()) - used == set()


def test_converters_cover_every_op_version_from_opset_13():
    from onnx import defs

    from robeval.adapters.onnx_ops import CONVERTERS

    for op in {op for op, _ in CONVERTERS}:
        for opset in range(13, defs.onnx_opset_version() + 1):
            assert (op, defs.get_schema(op, opset, "").since_version) in CONVERTERS, (op, opset)


def test_converter_details():
    net = load_onnx(make_model(*CASES["batchnorm_4d"]))
    assert [n.op for n in net.nodes] == ["batchnorm"] and net.nodes[0].params["gamma"].shape == (3, 1, 1)
    assert net.nodes[0].params["var"].dtype == np.float32  # the stored statistics, folded by the op in float64
    net = load_onnx(make_model(*CASES["batchnorm_2d"]))
    assert net.nodes[0].params["mean"].shape == (5,)
    net = load_onnx(make_model(*CASES["gemm_transB_alpha_beta"]))
    assert [n.op for n in net.nodes] == ["dense"] and net.nodes[0].params["weight"].dtype == np.float32
    net = load_onnx(make_model(*CASES["shape_subgraph_flatten"]))
    assert [n.op for n in net.nodes] == ["reshape"] and net.nodes[0].attrs["shape"] == (126,)
    net = load_onnx(make_model(*CASES["sub_const_first"]))
    assert float(net.nodes[0].params["scale"].max()) == -1.0


@pytest.mark.parametrize("layer, shape, weight, bias", [
    ("MatMul", (4,), w(4, 3), w(3)),
    ("Conv", (2, 5, 5), w(3, 2, 3, 3), w(1, 3, 1, 1)),
])
def test_constant_add_after_a_linear_layer_becomes_its_bias(layer, shape, weight, bias):
    model = make_model([node(layer, ["x", "W"], ["h"]), node("Add", ["h", "b"])], shape, {"W": weight, "b": bias})
    net = assert_matches_ort(model, RNG.normal(size=(5, *shape)).astype(np.float32))
    assert [n.op for n in net.nodes] == [layer.lower().replace("matmul", "dense")]
    assert net.nodes[0].params["bias"].shape == (3,)


@pytest.mark.parametrize("case, reason", [
    ([node("MaxPool", ["x"], kernel_shape=[2, 2], dilations=[2, 2])], "dilation"),
    ([node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
           count_include_pad=1)], "count_include_pad"),
    ([node("Flatten", ["x"], axis=2)], "batch"),
    ([node("Transpose", ["x"], perm=[1, 0, 2, 3])], "batch"),
    ([node("Mul", ["x", "x"])], "two input-dependent"),
    ([node("Div", ["C", "x"])], "division"),
    ([node("Slice", ["x", "s", "e", "a"])], "batch"),
    ([node("Softmax", ["x"], axis=0)], "batch"),
    ([node("Reshape", ["x", "t"])], "batch"),
])
def test_unsupported_uses_are_explained(case, reason):
    inits = {"C": c(2.0, np.float32), "s": c([1]), "e": c([2]), "a": c([0]), "t": c([1, -1])}
    model = make_model(case, IMG, {k: v for k, v in inits.items() if k in case[0].input})
    with pytest.raises(UnsupportedOpError, match=reason) as info:
        load_onnx(model)
    assert info.value.problems[0][1] == f"{case[0].op_type} -> y"


@pytest.mark.parametrize("channels", [3, 1])
def test_nhwc_input_becomes_nchw(channels):
    """tf2onnx-style models take NHWC and turn it to NCHW first (a reshape for one channel)."""
    first = node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]) if channels > 1 else node("Reshape", ["x", "s"], ["t"])
    model = make_model([first, node("Conv", ["t", "W"], ["c"]), node("Transpose", ["c"], perm=[0, 2, 3, 1])],
                       (5, 6, channels), {"W": w(2, channels, 3, 3), "s": c([-1, 1, 5, 6])})
    x = RNG.normal(size=(3, 5, 6, channels)).astype(np.float32)
    net = assert_matches_ort(model, x)
    assert net.input_shape == (channels, 5, 6) and [n.op for n in net.nodes] == ["conv", "transpose"]
    assert load_onnx(model, channels_last=False).input_shape == (5, 6, channels)


def test_used_extra_outputs_are_refused():
    nodes = [node("TopK", ["x", "k"], ["v", "i"], axis=1), node("Cast", ["i"], ["f"], to=FLOAT),
             node("Add", ["v", "f"])]
    with pytest.raises(UnsupportedOpError, match="output 1"):
        load_onnx(make_model(nodes, (4,), {"k": c([4])}))


# ---------------------------------------------------------------------------------- bad input
def test_unsupported_ops_are_reported_together():
    """Nodes after an unsupported one are still checked, on shapes from ONNX shape inference."""
    nodes = [node("Erf", ["x"], ["e"], name="my_erf"), node("Relu", ["e"], ["r"]),
             node("Mod", ["r", "C"], ["m"], name="my_mod", fmod=1), node("Mul", ["m", "r"], ["p"], name="my_mul"),
             node("Transpose", ["p"], ["y"], perm=[1, 0], name="my_transpose")]
    with pytest.raises(UnsupportedOpError) as info:
        load_onnx(make_model(nodes, (4,), {"C": c(2.0, np.float32)}))
    problems = info.value.problems
    assert [p[1] for p in problems] == ["my_erf", "my_mod", "my_mul", "my_transpose"]
    assert problems[:2] == [("Erf", "my_erf"), ("Mod", "my_mod")]
    message = str(info.value)
    assert "Erf (node 'my_erf')" in message and "Mod (node 'my_mod')" in message and "Gemm" in message
    assert "two input-dependent" in message and "moves the batch axis" in message
    assert info.value.framework == "ONNX"


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_onnx(tmp_path / "nope.onnx")


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(np.random.default_rng(1).bytes(2000))
    with pytest.raises(ModelLoadError, match="not a valid ONNX model") as info:
        load_onnx(path)
    assert str(path) in str(info.value)


def test_old_opset_is_converted_on_load():
    model = make_model([node("Relu", ["x"])], (4,), opset=11)
    net = load_onnx(model)
    assert net.meta["opset_converted_from"] == 11 and [n.op for n in net.nodes] == ["relu"]


def test_opset_the_converter_cannot_upgrade_is_refused_with_its_reason():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    with pytest.raises(ModelLoadError, match=r"opset 9 and onnx.version_converter cannot upgrade it.*NoSuchOp"):
        load_onnx(model)


def test_symbolic_per_sample_dims_need_input_shape():
    model = make_model([node("Relu", ["x"], ["r"]), node("Flatten", ["r"])], ("H", 4))
    with pytest.raises(InputShapeError, match="input_shape"):
        load_onnx(model)
    assert load_onnx(model, input_shape=(3, 4)).shapes()["y"] == (12,)
    with pytest.raises(InputShapeError, match="does not match"):
        load_onnx(model, input_shape=(3, 5))


def test_two_inputs_are_refused():
    graph = helper.make_graph([node("Add", ["x", "z"])], "g",
                              [helper.make_tensor_value_info(n, FLOAT, ["N", 3]) for n in "xz"],
                              [helper.make_tensor_value_info("y", FLOAT, ["N", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelLoadError, match="exactly one input"):
        load_onnx(model)


# ---------------------------------------------------------------------------------- whole models
try:
    import torch
    from torch import nn
except ImportError:  # the torch-exported models are skipped; the onnx.helper models above still run
    torch, nn = None, types.SimpleNamespace(Module=object)
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (it exports these test models)")


class MaxMinView(nn.Module):
    """MaxMin as x.view -> max/min over pairs -> cat (pairs of neighbours, max first)."""

    def forward(self, x):
        y = x.view(x.shape[0], x.shape[1] // 2, 2, *x.shape[2:])
        return torch.cat([y.max(dim=2, keepdim=True)[0], y.min(dim=2, keepdim=True)[0]], 2).view(x.shape)


class MaxMinHalves(nn.Module):
    """MaxMin as chunk -> maximum/minimum -> cat (pairs across the two halves of the channels)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)


class GroupSortBySort(nn.Module):
    """GroupSort with groups of 4 as torch.sort (exported as TopK)."""

    def forward(self, x):
        return torch.sort(x.view(x.shape[0], -1, 4), dim=2)[0].view(x.shape)


class Normalize(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def _torch_models():
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AvgPool2d(2, ceil_mode=True),
                        nn.Flatten(), nn.Linear(6 * 2 * 2, 5))
    for m in cnn:
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    return {
        "mlp": (nn.Sequential(nn.Flatten(), nn.Linear(48, 20), nn.ReLU(), nn.Linear(20, 10), nn.Softmax(dim=1)),
                (3, 4, 4)),
        "cnn_bn_pools": (cnn, (3, 11, 11)),
        "residual": (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Residual(4), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten(), nn.Linear(4, 3)), (3, 6, 6)),
        "normalize": (nn.Sequential(Normalize(), nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(),
                                    nn.Linear(2 * 4 * 4, 4), nn.LogSoftmax(dim=1)), (3, 6, 6)),
        "maxmin_view": (nn.Sequential(nn.Linear(6, 8), MaxMinView(), nn.Linear(8, 3)), (6,)),
        "maxmin_halves": (nn.Sequential(nn.Linear(6, 8), MaxMinHalves(), nn.Linear(8, 3)), (6,)),
        "maxmin_conv_channels": (nn.Sequential(nn.Conv2d(2, 4, 3), MaxMinView(), nn.Flatten(), nn.Linear(36, 3)),
                                 (2, 5, 5)),
        "groupsort4_sort": (nn.Sequential(nn.Linear(6, 8), GroupSortBySort(), nn.Linear(8, 3)), (6,)),
        "maxmin_then_maxpool": (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), MaxMinHalves(), nn.MaxPool2d(2),
                                              nn.Flatten(), nn.Linear(16, 3)), (2, 4, 4)),
    }


TORCH_MODELS = ["mlp", "cnn_bn_pools", "residual", "normalize", "maxmin_view", "maxmin_halves",
                "maxmin_conv_channels", "groupsort4_sort", "maxmin_then_maxpool"]


@needs_torch
@pytest.mark.parametrize("name", TORCH_MODELS)
def test_torch_export_matches(name, tmp_path):
    models = _torch_models()
    assert sorted(models) == sorted(TORCH_MODELS)
    model, shape = models[name]
    path = export_torch(model, torch.randn(2, *shape), tmp_path / f"{name}.onnx",
                        do_constant_folding=name != "cnn_bn_pools")  # keep BatchNormalization nodes there
    x = RNG.uniform(size=(5, *shape)).astype(np.float32)
    net = assert_matches_ort(path, x)
    with torch.no_grad():
        expect = model(torch.from_numpy(x)).numpy()
    assert np.abs(net.forward(x) - expect).max() <= ATOL
    ops = [n.op for n in net.nodes]
    if name == "cnn_bn_pools":
        assert ops.count("batchnorm") == 2 and "maxpool" in ops and "avgpool" in ops
    if name == "mlp":
        assert OnnxModel(path).outputs_probabilities
    if name == "residual":
        assert "add" in ops
    if name == "groupsort4_sort":
        assert ops == ["dense", "groupsort", "dense"] and net.nodes[1].attrs["group_size"] == 4
        _check_lipschitz_is_tight(net)
    if name.startswith("maxmin"):
        assert ops.count("groupsort") == 1 and not {"max", "min"} & set(ops), ops
        assert ops.count("maxpool") == (name == "maxmin_then_maxpool"), ops
        assert net.meta["fused"]
        _check_lipschitz_is_tight(net)


def _check_lipschitz_is_tight(net):
    """After fusion, the bound is the product of the linear layers' norms (groupsort is 1-Lipschitz)."""
    lips = net.lipschitz_bounds()
    layers = [n for n in net.nodes if n.op in ("dense", "conv")]
    product = math.prod(lips[n.name] / lips[n.inputs[0]] for n in layers)
    assert net.lipschitz_bound() <= product * (1 + 1e-9)


@needs_torch
def test_torch_dynamo_export(tmp_path):
    """The torch.export-based exporter (opset 18: ReduceMax with axes inputs, Reshape targets)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), Residual(4), MaxMinView(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    path = export_torch(model, torch.randn(2, 3, 6, 6), tmp_path / "dynamo.onnx", dynamo=True)
    net = assert_matches_ort(path, RNG.uniform(size=(3, 3, 6, 6)).astype(np.float32))
    ops = [n.op for n in net.nodes]
    assert "groupsort" in ops and "add" in ops and "global_avgpool" in ops and not {"max", "min"} & set(ops)


@needs_torch
def test_fixed_batch_export(tmp_path):
    class View(nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1)

    model = nn.Sequential(nn.Conv2d(1, 2, 3), View(), nn.Linear(18, 4))
    path = export_torch(model, torch.randn(2, 1, 5, 5), tmp_path / "fixed.onnx", dynamic_axes=None)
    net = load_onnx(path)
    x = RNG.uniform(size=(5, 1, 5, 5)).astype(np.float32)
    with torch.no_grad():
        assert np.abs(net.forward(x) - model(torch.from_numpy(x)).numpy()).max() <= ATOL
    adapter = OnnxModel(path)  # onnxruntime runs the fixed batch of 2, padding the last chunk
    assert np.abs(adapter.predict(x) - net.forward(x)).max() <= ATOL


def test_reference_mlp(reference_onnx, reference_bounds):
    net = load_onnx(reference_onnx)
    x = reference_bounds["x"]
    assert np.abs(net.forward(x) - reference_bounds["logits"]).max() <= ATOL
    assert np.abs(net.astype(np.float64).forward(x.astype(np.float64)) - reference_bounds["logits_f64"]).max() < 1e-9


# ---------------------------------------------------------------------------------- keras / tf2onnx
@pytest.fixture(scope="module")
def keras():
    pytest.importorskip("tf2onnx", reason="Keras' ONNX export needs tf2onnx (pip install tf2onnx)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("keras")


def _keras_export(keras, model, shape, path):
    model(np.zeros((1, *shape), np.float32))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf2onnx's numpy 2 FutureWarnings
            model.export(str(path), format="onnx", verbose=False)
    except Exception as exc:  # the tf2onnx/keras pairing is fragile; say why instead of failing
        pytest.skip(f"keras could not export to ONNX here: {type(exc).__name__}: {exc}")
    return str(path)


def test_keras_cnn_export(keras, tmp_path):
    L = keras.layers
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, padding="same", activation="relu"),
                              L.MaxPooling2D(2), L.Conv2D(4, 3, strides=2), L.BatchNormalization(),
                              L.GlobalAveragePooling2D(), L.Dense(6, activation="tanh"),
                              L.Dense(3, activation="softmax")])
    path = _keras_export(keras, model, (8, 8, 3), tmp_path / "keras_cnn.onnx")
    x = RNG.uniform(size=(4, 8, 8, 3)).astype(np.float32)
    net = assert_matches_ort(path, x)
    # the model takes NHWC and transposes at once: the network takes NCHW and starts with the conv
    assert net.input_shape == (3, 8, 8) and net.meta["channels_last"] and net.nodes[0].op == "conv"
    x_nchw = x.transpose(0, 3, 1, 2)
    assert np.abs(net.forward(x_nchw) - np.asarray(model(x))).max() <= ATOL
    adapter = OnnxModel(path)
    assert adapter.channels_last and adapter.outputs_probabilities and adapter.input_shape == (3, 8, 8)
    assert np.abs(adapter.predict(x_nchw) - run_ort(path, x)).max() == 0
    assert adapter.check_fidelity(x_nchw) <= ATOL
    assert load_onnx(path, channels_last=False).input_shape == (8, 8, 3)


def test_keras_maxmin_written_with_maxpool_is_fused(keras, tmp_path):
    L = keras.layers
    keras.utils.set_random_seed(1)

    inp = keras.Input((6,))
    h = L.Dense(8)(inp)
    seq = L.Reshape((8, 1))(h)
    top = L.MaxPooling1D(2)(seq)                                   # max of each pair
    low = L.Lambda(lambda t: -t)(L.MaxPooling1D(2)(L.Lambda(lambda t: -t)(seq)))  # min = -max(-x)
    h = L.Flatten()(L.Concatenate(axis=1)([top, low]))
    model = keras.Model(inp, L.Dense(3)(h))
    path = _keras_export(keras, model, (6,), tmp_path / "keras_maxmin.onnx")
    x = RNG.normal(size=(5, 6)).astype(np.float32)
    net = assert_matches_ort(path, x)
    assert np.abs(net.forward(x) - np.asarray(model(x))).max() <= ATOL
    ops = [n.op for n in net.nodes]
    assert ops.count("groupsort") == 1 and "maxpool" not in ops, ops
    _check_lipschitz_is_tight(net)


# ---------------------------------------------------------------------------------- the adapter
@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 8), nn.Tanh(), nn.Linear(8, 4))
    path = export_torch(model, torch.randn(2, 1, 6, 6), tmp_path_factory.mktemp("adapter") / "cnn.onnx")
    return path, model.double()


@needs_torch
def test_adapter_predict_and_fidelity(cnn_file, monkeypatch):
    path, _ = cnn_file
    model = OnnxModel(path, batch_size=3)
    x = RNG.uniform(size=(7, 1, 6, 6)).astype(np.float32)
    assert model.input_shape == (1, 6, 6) and model.num_classes == 4 and not model.channels_last
    assert not model.outputs_probabilities and model.to_network() is model.network
    assert np.abs(model.predict(x) - run_ort(path, x)).max() == 0
    assert model.check_fidelity(x) <= ATOL
    with pytest.raises(InputShapeError, match="NHWC"):
        model.predict(x.transpose(0, 2, 3, 1))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # no onnxruntime: the network predicts
    assert np.abs(OnnxModel(path).predict(x) - run_ort(path, x)).max() <= ATOL
    monkeypatch.undo()
    model.network.nodes[0].params["weight"][0, 0, 1, 1] += 0.1
    with pytest.raises(FidelityError, match="differ"):
        model.check_fidelity(x)


@needs_torch
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_input_gradient(cnn_file, loss):
    path, torch_model = cnn_file
    model = OnnxModel(path)
    x = RNG.uniform(size=(3, 1, 6, 6))
    y = np.array([0, 3, 1])
    g = model.input_gradient(x, y, loss=loss)
    assert g.shape == x.shape and g.dtype == np.float64

    def torch_loss(t):
        z = torch_model(t)
        if loss == "ce":
            return torch.nn.functional.cross_entropy(z, torch.from_numpy(y), reduction="sum")
        others = z.clone()
        others[range(3), y] = -torch.inf
        return (others.max(dim=1).values - z[range(3), y]).sum()  # grows towards misclassification

    t = torch.from_numpy(x).requires_grad_(True)
    (expect,) = torch.autograd.grad(torch_loss(t), t)
    assert np.abs(g - expect.numpy()).max() <= 1e-5
    # central finite differences in float64 along a random direction (piecewise linear: small step)
    d = RNG.normal(size=x.shape)
    h = 1e-6
    with torch.no_grad():
        fd = (torch_loss(torch.from_numpy(x + h * d)) - torch_loss(torch.from_numpy(x - h * d))).item() / (2 * h)
    assert abs(fd - float((g * d).sum())) <= 1e-4 * max(1.0, abs(fd))
    g32 = model.input_gradient(x.astype(np.float32), y, loss=loss)
    assert g32.dtype == np.float32 and np.abs(g32 - g).max() <= 1e-4


@needs_torch
def test_input_gradient_checks_arguments(cnn_file):
    model = OnnxModel(cnn_file[0])
    x = RNG.uniform(size=(2, 1, 6, 6)).astype(np.float32)
    with pytest.raises(InvalidParameterError, match="loss"):
        model.input_gradient(x, [0, 1], loss="hinge")
    with pytest.raises(InvalidParameterError, match="labels"):
        model.input_gradient(x, [0, 9])


@needs_torch
def test_adapter_strips_softmax_for_gradients(tmp_path):
    torch.manual_seed(4)
    tm = nn.Sequential(nn.Linear(5, 4), nn.Softmax(dim=1))
    model = OnnxModel(export_torch(tm, torch.randn(2, 5), tmp_path / "soft.onnx"))
    assert model.outputs_probabilities
    x = RNG.normal(size=(3, 5))
    t = torch.from_numpy(x).requires_grad_(True)
    logits = tm[0].double()(t)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2, 3]), reduction="sum")
    (expect,) = torch.autograd.grad(loss, t)
    assert np.abs(model.input_gradient(x, [1, 2, 3]) - expect.numpy()).max() <= 1e-6
