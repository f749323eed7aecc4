"""Input normalisation (x - mean) / std as the first ops of a network, so that certificates,
attacks and smoothing radii are stated in pixel space (8/255 is a pixel radius) while the model
itself was trained on normalised inputs.

The normalisation is two exact-constant ``scale`` nodes: ``x + (-mean)`` (stored constants, used as
they are) and ``x / std`` (the divisor folded in float64 with a rounding bound, see
:mod:`robeval.ir.ops.scale`), so every certifier accounts for it soundly. Per-channel values act
on the channel axis (axis 0 of a per-sample (C, H, W) shape, or the last axis when only that one
has C entries); a single value applies to every input entry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy

from ..errors import InvalidParameterError
from .graph import Network, Node

NORM_SUB = "robeval_norm_sub"
NORM_DIV = "robeval_norm_div"


def channel_shape(input_shape: Sequence[int], count: int) -> tuple[int, ...]:
    """The broadcast shape (per sample) for ``count`` per-channel values, or an error naming the fix."""
    shape = tuple(int(d) for d in input_shape)
    if count == 1:
        return (1,) * len(shape)
    if len(shape) == 3 and shape[0] == count:
        return (count, 1, 1)
    if len(shape) == 3 and shape[-1] == count:
        return (1, 1, count)
    raise InvalidParameterError(
        f"{count} normalisation values for inputs of shape {shape}: expected one value, or one per channel "
        f"({shape[0] if len(shape) == 3 else 'the channel count'}); fix --mean/--std")


def check_mean_std(mean: Any, std: Any, input_shape: Sequence[int]) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(mean, std) as float64 arrays broadcastable to the per-sample shape; std must be > 0 and finite."""
    m = numpy.asarray(mean, dtype=numpy.float64).ravel()
    s = numpy.asarray(std, dtype=numpy.float64).ravel()
    if m.size == 0 or s.size == 0 or (len(m) != len(s) and 1 not in (len(m), len(s))):
        raise InvalidParameterError(f"mean has {m.size} value(s) and std {s.size}; give the same number "
                                    "(one per channel), or one of them as a single value")
    if not numpy.isfinite(m).all() or not numpy.isfinite(s).all() or (s <= 0).any():
        raise InvalidParameterError(f"mean={m.tolist()}, std={s.tolist()}: every value must be finite and every "
                                    "std > 0")
    count = max(len(m), len(s))
    shape = channel_shape(input_shape, count)
    return numpy.broadcast_to(m, (count,)).reshape(shape).copy(), numpy.broadcast_to(s, (count,)).reshape(shape).copy()


def prepend_normalisation(net: Network, mean: Any, std: Any) -> Network:
    """A network computing ``net((x - mean) / std)`` on inputs of the same shape."""
    m, s = check_mean_std(mean, std, net.input_shape)
    first = [Node(NORM_SUB, "scale", (net.input_name,), {"scale": numpy.ones_like(m), "shift": -m}),
             Node(NORM_DIV, "scale", (NORM_SUB,), {"divisor": s, "shift": numpy.zeros_like(s)})]
    taken = {n.name for n in net.nodes}
    if taken & {NORM_SUB, NORM_DIV}:
        raise InvalidParameterError("this network already starts with robeval's normalisation; do not apply it twice")
    nodes = first + [n.replace(inputs=tuple(NORM_DIV if i == net.input_name else i for i in n.inputs),
                               attrs={k: v for k, v in n.attrs.items() if k not in ("in_shape", "in_shapes")})
                     for n in net.nodes]
    meta = {**net.meta, "normalisation": {"mean": m.ravel().tolist(), "std": s.ravel().tolist()}}
    return Network(nodes, net.input_shape, net.input_name, net.output_name, meta)


class NormalisedAdapter:
    """An adapter that feeds ``(x - mean) / std`` to the wrapped adapter: ``predict``, gradients and
    ``to_network`` all take pixel-space inputs."""

    def __init__(self, inner: Any, mean: Any, std: Any):
        self.inner = inner
        self.mean, self.std = check_mean_std(mean, std, inner.input_shape)
        self._network = None

    def __getattr__(self, name: str) -> Any:  # input_shape, num_classes, channels_last, ...
        return getattr(self.inner, name)

    def normalise(self, x):
        return ((numpy.asarray(x, dtype=numpy.float64) - self.mean) / self.std).astype(numpy.float32)

    def predict(self, x):
        return self.inner.predict(self.normalise(x))

    def input_gradient(self, x, y, loss: str = "ce"):
        """Chain rule: d loss / d x = (d loss / d z) / std for z = (x - mean) / std."""
        g = numpy.asarray(self.inner.input_gradient(self.normalise(x), y, loss))
        return (g / self.std).astype(g.dtype)

    def to_network(self) -> Network:
        if self._network is None:
            self._network = prepend_normalisation(self.inner.to_network(), self.mean, self.std)
        return self._network
