"""Shared fixtures: the reference folder, MNIST, small random networks, and the xp backends."""

from __future__ import annotations

import os
from pathlib import Path

import numpy
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ROBEVAL_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
MNIST = Path(os.environ.get("ROBEVAL_TEST_MNIST", SHARED / "data" / "mnist.npz"))


@pytest.fixture(scope="session")
def reference_bounds():
    path = REFERENCE / "bounds_mlp_eps0.1.npz"
    if not path.exists():
        pytest.skip(f"reference bounds not found at {path} (set ROBEVAL_SHARED to the shared folder)")
    return dict(numpy.load(path))


@pytest.fixture(scope="session")
def reference_onnx():
    path = REFERENCE / "mlp.onnx"
    if not path.exists():
        pytest.skip(f"reference model not found at {path} (set ROBEVAL_SHARED to the shared folder)")
    return path


@pytest.fixture(scope="session")
def mnist_path():
    if not MNIST.exists():
        pytest.skip(f"MNIST not found at {MNIST} (set ROBEVAL_TEST_MNIST)")
    return MNIST


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    if request.param == "numpy":
        return numpy
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (GPU tests run only with CuPy and a GPU)")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception as exc:  # no driver
        pytest.skip(f"no usable CUDA device: {exc}")
    return cupy
