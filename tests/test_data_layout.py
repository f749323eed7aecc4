"""User .npz files of colour images: NHWC uint8 and NCHW float land in NCHW with the right values,
the layout is detected from the shape or decided by the model, and shapes that could be either are
refused with both readings and the fix (in Python and on the command line)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from robeval.cli import main
from robeval.data import detect_layout, load_dataset
from robeval.errors import InputShapeError


def save(tmp_path, name, x, y=None):
    path = tmp_path / f"{name}.npz"
    np.savez(path, x=x, y=np.arange(len(x)) % 4 if y is None else y)
    return path


def test_nhwc_uint8_colour_becomes_nchw_in_unit_range(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    ds = load_dataset(save(tmp_path, "rgb", raw))
    assert ds.x.shape == (6, 3, 32, 32) and ds.x.dtype == np.float32 and ds.layout == "NCHW"
    np.testing.assert_array_equal(ds.x, raw.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))
    assert ds.x[2, 1, 5, 7] == np.float32(raw[2, 5, 7, 1]) / np.float32(255)  # channel 1 is green, not a row


def test_nhwc_uint8_onto_another_value_range(tmp_path):
    raw = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=3).repeat(4, axis=1)  # (1, 4, 3, 3)
    raw = np.concatenate([raw, raw])
    ds = load_dataset(save(tmp_path, "r", raw, y=[0, 1]), value_range=(-1.0, 1.0), layout="NHWC")
    np.testing.assert_allclose(ds.x[0, :, 0, :], [[-1.0, -0.6, 1.0]] * 3, atol=1e-6)


def test_nchw_float_colour_is_kept_as_it_is(tmp_path):
    raw = np.random.default_rng(1).uniform(0, 1, (5, 3, 24, 32))  # float64, not square
    ds = load_dataset(save(tmp_path, "f", raw))
    assert ds.x.shape == (5, 3, 24, 32)
    np.testing.assert_array_equal(ds.x, raw.astype(np.float32))


@pytest.mark.parametrize("shape, layout", [
    ((2, 24, 32, 3), "NHWC"), ((2, 3, 24, 32), "NCHW"), ((2, 28, 28, 1), "NHWC"), ((2, 1, 28, 28), "NCHW"),
    ((2, 8, 16, 16), "NCHW"), ((2, 16, 16, 8), "NHWC"),  # neither end holds 1 or 3: the square pair decides
])
def test_detected_layouts(shape, layout):
    assert detect_layout(shape) == layout


@pytest.mark.parametrize("shape", [(2, 3, 8, 3), (2, 1, 5, 1), (2, 3, 3, 3), (2, 16, 16, 16), (2, 5, 7, 9)])
def test_ambiguous_shapes_are_refused_with_both_readings(tmp_path, shape):
    path = save(tmp_path, "amb", np.zeros(shape, np.uint8), y=[0, 1])
    with pytest.raises(InputShapeError) as info:
        load_dataset(path)
    message = str(info.value)
    _, a, b, c = shape
    assert f"NCHW ({a} channel(s) of {b}x{c})" in message and f"NHWC ({c} channel(s) of {a}x{b})" in message
    assert "layout='NCHW'" in message and "--layout" in message and "amb.npz" in message


def test_the_model_input_shape_decides_an_ambiguous_file(tmp_path):
    raw = np.random.default_rng(2).integers(0, 256, (4, 3, 8, 3), dtype=np.uint8)
    path = save(tmp_path, "amb", raw)
    nhwc = load_dataset(path, input_shape=(3, 3, 8))  # only the NHWC reading gives (3, 3, 8)
    np.testing.assert_array_equal(nhwc.x, raw.transpose(0, 3, 1, 2) / np.float32(255))
    for unhelpful in ((3, 8, 3), (1, 3, 8)):  # a model shape that is itself ambiguous; one that fits neither
        with pytest.raises(InputShapeError, match="could be NCHW"):
            load_dataset(path, input_shape=unhelpful)
    # an explicit layout wins over the model
    assert load_dataset(path, input_shape=(3, 3, 8), layout="NCHW").x.shape == (4, 3, 8, 3)


def onnx_model(path, per_sample, classes=4):
    """Flatten -> Gemm on inputs of per-sample shape ``per_sample``, as an ONNX file."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    d = int(np.prod(per_sample))
    w = (np.random.default_rng(3).normal(size=(d, classes)) / np.sqrt(d)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, *per_sample])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, classes])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(classes, np.float32), "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_cli_uses_the_model_and_layout_option(tmp_path):
    raw = np.random.default_rng(4).integers(0, 256, (6, 3, 8, 3), dtype=np.uint8)
    data = save(tmp_path, "amb", raw)
    run = CliRunner().invoke
    decided = run(main, ["certify", str(onnx_model(tmp_path / "m.onnx", (3, 3, 8))), "--data", str(data),
                         "--eps", "0.01", "--no-progress"])
    assert decided.exit_code == 0, decided.output
    assert "(6 samples)" in decided.output
    cube = onnx_model(tmp_path / "cube.onnx", (3, 3, 3))
    cube_data = save(tmp_path, "cube", raw[:, :, :3, :])
    refused = run(main, ["certify", str(cube), "--data", str(cube_data), "--eps", "0.01", "--no-progress"])
    assert refused.exit_code != 0 and "--layout" in refused.output and "could be NCHW" in refused.output
    chosen = run(main, ["certify", str(cube), "--data", str(cube_data), "--layout", "NHWC", "--eps", "0.01",
                        "--no-progress"])
    assert chosen.exit_code == 0, chosen.output


def test_layout_is_checked_against_the_model(tmp_path):
    raw = np.zeros((3, 32, 32, 3), np.uint8)
    out = CliRunner().invoke(main, ["certify", str(onnx_model(tmp_path / "m.onnx", (3, 16, 16))), "--data",
                                    str(save(tmp_path, "big", raw, y=[0, 1, 2])), "--eps", "0.01", "--no-progress"])
    assert out.exit_code != 0 and "(3, 16, 16)" in out.output
