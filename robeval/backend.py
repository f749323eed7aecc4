"""Array-module selection: one code path on NumPy (CPU) or CuPy (GPU), chosen once at an entry point."""

from __future__ import annotations

import sys
from typing import Any

import numpy

from .errors import BackendError, InvalidParameterError

Array = Any  # a numpy.ndarray or a cupy.ndarray

DEVICES = ("cpu", "cuda")


def get_xp(*arrays: Any, xp: Any = None) -> Any:
    """Return numpy or cupy for these arrays; never imports cupy just to ask."""
    if xp is not None:
        return xp
    libs = {type(a).__module__.partition(".")[0] for a in arrays if hasattr(a, "shape")}
    if libs <= {"numpy"}:
        return numpy
    if libs == {"cupy"}:
        return sys.modules["cupy"]
    raise BackendError(
        f"arrays come from {sorted(libs)}; put them on one device with robeval.backend.to_device()"
    )


def xp_for_device(device: str = "cpu") -> Any:
    """The array module for a device name: numpy for 'cpu', cupy for 'cuda'."""
    if device == "cpu":
        return numpy
    if device in ("cuda", "gpu") or device.startswith("cuda:"):
        try:
            import cupy
        except ImportError as exc:
            raise BackendError(
                "device='cuda' needs CuPy, which is not installed; "
                "install it with `pip install 'robeval[cuda]'` (CUDA 12) or use device='cpu'"
            ) from exc
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # cupy raises its own CUDARuntimeError without a driver
            raise BackendError(f"device='cuda' but CuPy finds no usable GPU ({exc}); use device='cpu'") from exc
        if count == 0:
            raise BackendError("device='cuda' but no CUDA device is visible; use device='cpu'")
        if ":" in device:
            cupy.cuda.Device(int(device.split(":")[1])).use()
        return cupy
    raise InvalidParameterError(f"device={device!r} is not known; expected one of {DEVICES}")


def to_device(array: Any, xp: Any) -> Any:
    """Copy an array onto the device of array module ``xp`` (no copy when already there)."""
    if xp is numpy:
        return asnumpy(array)
    return xp.asarray(array)


def asnumpy(array: Any) -> numpy.ndarray:
    """A NumPy copy of a NumPy or CuPy array (for reports and comparisons)."""
    if hasattr(array, "get") and type(array).__module__.startswith("cupy"):
        return array.get()
    return numpy.asarray(array)


def unit_roundoff(dtype: Any) -> float:
    """Unit roundoff u of a float dtype (half the machine epsilon): 2**-53 for float64."""
    return float(numpy.finfo(numpy.dtype(dtype)).eps) / 2.0


def gamma(n: int, dtype: Any) -> float:
    """Higham's gamma_n = n u / (1 - n u): bound on the relative error of an n-term dot product."""
    nu = n * unit_roundoff(dtype)
    if nu >= 0.5:
        raise InvalidParameterError(f"dot products of length {n} are too long for {numpy.dtype(dtype)} bounds")
    return nu / (1.0 - nu)
