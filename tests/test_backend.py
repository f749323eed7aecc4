"""Array-backend selection, device errors, and imports that stay light."""

from __future__ import annotations

import subprocess
import sys

import numpy
import pytest

from robeval.backend import gamma, get_xp, unit_roundoff, xp_for_device
from robeval.errors import BackendError, InvalidParameterError


def test_get_xp_numpy_and_mixed():
    assert get_xp(numpy.zeros(2), numpy.ones(3)) is numpy
    assert get_xp() is numpy

    class FakeCupy:
        shape = (1,)

    FakeCupy.__module__ = "cupy._core"
    with pytest.raises(BackendError, match="to_device"):
        get_xp(numpy.zeros(1), FakeCupy())


def test_cuda_without_cupy_is_a_clear_error():
    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"pip install 'robeval\[cuda\]'"):
            xp_for_device("cuda")
    else:
        pytest.skip("CuPy is installed here; the message for a missing CuPy cannot be checked")


def test_unknown_device():
    with pytest.raises(InvalidParameterError, match="device='tpu'"):
        xp_for_device("tpu")


def test_certifier_on_cuda_fails_cleanly_without_cupy():
    pytest.importorskip("numpy")
    from robeval.certifiers import IBP

    try:
        import cupy  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError):
            IBP(device="cuda")
    else:
        pytest.skip("CuPy is installed")


def test_rounding_constants():
    assert unit_roundoff(numpy.float64) == 2.0**-53
    assert gamma(10, numpy.float64) == pytest.approx(10 * 2.0**-53, rel=1e-12)
    with pytest.raises(InvalidParameterError):
        gamma(2**30, numpy.float32)


def test_import_robeval_imports_no_framework():
    code = ("import sys, robeval, robeval.certifiers, robeval.data, robeval.cli; "
            "heavy = [m for m in ('torch', 'tensorflow', 'keras', 'onnx', 'onnxruntime', 'cupy') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing robeval pulled in {out.stdout.strip()}"
