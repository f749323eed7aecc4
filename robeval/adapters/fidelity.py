"""Does the converted network compute what the native model computes? Certifying the
representation is only meaningful when both give the same outputs on real data.

>>> # diff = check_fidelity(adapter, x[:64])     # raises FidelityError when they disagree
"""

from __future__ import annotations

from typing import Any

import numpy

from ..backend import asnumpy
from ..errors import FidelityError

#: How many samples ``robeval.certify`` compares before certifying.
FIDELITY_SAMPLES = 64


def max_difference(native: numpy.ndarray, converted: numpy.ndarray) -> tuple[float, tuple[int, ...]]:
    """Largest absolute difference and where it is (NaN counts as infinitely different)."""
    diff = numpy.abs(native.astype(numpy.float64) - converted.astype(numpy.float64))
    diff[numpy.isnan(diff)] = numpy.inf
    where = numpy.unravel_index(int(numpy.argmax(diff)), diff.shape)
    return float(diff[where]), tuple(int(i) for i in where)


def check_fidelity(adapter: Any, x: Any, atol: float = 1e-4, rtol: float = 1e-5, network: Any = None) -> float:
    """Compare ``adapter.predict(x)`` (the framework's own runtime) with the converted network.

    Args:
        adapter: a ModelAdapter (TorchModel, KerasModel, OnnxModel, ...).
        x: (N, *input_shape) NCHW inputs; rows with NaN/inf are skipped (the certifier refuses them).
        atol, rtol: allowed |native - network| <= atol + rtol * max|native|.
        network: the converted network, if already at hand (else ``adapter.to_network()``).
    Returns:
        The largest absolute difference found.
    Raises:
        FidelityError: naming the difference, the sample and output where it is, and what to do.
    """
    from .base import NetworkModel

    if isinstance(adapter, NetworkModel):
        return 0.0  # the representation is the model
    net = network if network is not None else adapter.to_network()
    x = numpy.asarray(asnumpy(x))
    x = x[numpy.isfinite(x.reshape(len(x), -1)).all(axis=1)]
    if len(x) == 0:
        return 0.0
    native = numpy.asarray(adapter.predict(x))
    converted = numpy.asarray(asnumpy(net.forward(x.astype(net.dtype, copy=False))))
    if native.shape != converted.shape:
        raise FidelityError(f"the native model returns shape {native.shape} but the converted network "
                            f"{converted.shape} on the same {len(x)} inputs; the conversion is wrong. "
                            "Fix: export the model to ONNX and load the .onnx file, and report this model")
    diff, where = max_difference(native, converted)
    tol = atol + rtol * float(numpy.abs(native).max(initial=0.0))
    if not diff <= tol:
        i, rest = where[0], where[1:]
        raise FidelityError(
            f"the converted network disagrees with the native model by up to {diff:.3g} (allowed {tol:.3g}) "
            f"at sample {i}, output {rest}: native {native[where]:.6g}, network {converted[where]:.6g}; "
            "certifying it would certify a different model. Likely causes: a layer behaves differently in "
            "training mode, a custom layer whose parameters the converter misread, or a layout mismatch "
            "(NHWC data given to an NCHW model). Fix: check the model runs in inference mode, export it to "
            "ONNX and certify the .onnx file, or report the model with `robeval info MODEL`")
    return diff
