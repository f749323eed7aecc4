"""CROWN-IBP for certified training in Keras (Zhang et al. 2020); the twin of
``robeval.training.torch.crown_ibp``, with the same bounds.

IBP bounds every ReLU's input; then linear bounds travel backwards from the margin rows W_y - W_j
of the last Dense to the input box: through each affine map by its transpose, through each ReLU by
CROWN's adaptive relaxation (chord above; below the line x if u > -l, else 0). Layers with a
built-in activation are split into their affine part and the activation. Supported: Dense,
SpectralDense, Conv2D, SpectralConv2D, BatchNormalization (moving statistics), Rescaling, average
pooling, Flatten/Reshape, Dropout-like layers, and ReLU as a layer or an activation. Images NHWC.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import keras
import tensorflow as tf

from ...errors import InputShapeError, InvalidParameterError
from ._shared import check_clip
from .export import PASS_THROUGH
from .ibp import _batchnorm, input_box, margin_problem
from .layers import SpectralConv2D, SpectralDense

L = keras.layers


class Affine(NamedTuple):
    """z -> L z + b as ``forward`` (with b) and ``magnitude`` (r -> |L| r, no b); ``kernel``: the Dense
    kernel (in, out) when the map is a matrix product, for a direct transpose; ``reshape``: L only
    reshapes, so its transpose reshapes back."""

    forward: object
    magnitude: object
    kernel: object = None
    reshape: bool = False


RELU = "relu"


def _unsupported(layer, what: str) -> InvalidParameterError:
    return InvalidParameterError(
        f"layer '{layer.name}' ({type(layer).__name__}): {what} has no linear relaxation in CROWN-IBP training, "
        "which supports ReLU between affine layers (Dense, Conv2D, BatchNormalization, Rescaling, average "
        "pooling, Flatten); train this model with bound='ibp'")


def _activation_steps(layer, fn) -> list:
    name = keras.activations.serialize(fn) if fn is not None else "linear"
    if name == "linear":
        return []
    if name == "relu":
        return [RELU]
    raise _unsupported(layer, f"activation '{name}'")


def _dense_steps(kernel, bias, layer) -> list:
    def forward(z):
        out = tf.matmul(z, kernel)
        return out + bias if bias is not None else out

    steps = [Affine(forward, lambda r: tf.matmul(r, tf.abs(kernel)), kernel)]
    return steps + _activation_steps(layer, layer.activation)


def _conv_steps(kernel, layer, dilation) -> list:
    kw = dict(strides=tuple(layer.strides), padding=layer.padding.upper(), dilations=tuple(dilation))
    bias = getattr(layer, "bias", None)

    def forward(z):
        out = tf.nn.conv2d(z, kernel, **kw)
        return out + bias if bias is not None else out

    steps = [Affine(forward, lambda r: tf.nn.conv2d(r, tf.abs(kernel), **kw))]
    return steps + _activation_steps(layer, layer.activation)


def _steps(layer) -> list:
    """The affine maps and ReLUs that ``layer`` computes, in order."""
    if isinstance(layer, SpectralDense):
        return _dense_steps(layer.constrained_kernel(), layer.bias, layer)
    if isinstance(layer, L.Dense):
        return _dense_steps(layer.kernel, layer.bias if layer.use_bias else None, layer)
    if isinstance(layer, SpectralConv2D):
        return _conv_steps(layer.constrained_kernel(), layer, (1, 1))
    if isinstance(layer, L.Conv2D):
        _check_conv(layer)
        return _conv_steps(layer.kernel, layer, layer.dilation_rate)
    if isinstance(layer, L.BatchNormalization):
        def bn(z):
            return _batchnorm(layer, z, z)[0]

        return [Affine(bn, lambda r: _batchnorm(layer, r, r)[1])]
    if isinstance(layer, L.Rescaling):
        def rescale(z):
            return z * tf.cast(layer.scale, z.dtype) + tf.cast(layer.offset, z.dtype)

        return [Affine(rescale, lambda r: r * tf.abs(tf.cast(layer.scale, r.dtype)))]
    if isinstance(layer, (L.Flatten, L.Reshape)):
        return [Affine(layer, layer, reshape=True)]
    if isinstance(layer, (L.AveragePooling2D, L.GlobalAveragePooling2D)):
        return [Affine(layer, layer)]  # linear, with non-negative weights and no offset
    if isinstance(layer, PASS_THROUGH):
        return []
    if isinstance(layer, L.ReLU):
        plain = layer.max_value is None and float(layer.negative_slope) == 0 and float(layer.threshold) == 0
        if not plain:
            raise _unsupported(layer, "a ReLU with max_value, negative_slope or threshold")
        return [RELU]
    if isinstance(layer, L.Activation):
        return _activation_steps(layer, layer.activation)
    raise _unsupported(layer, "this layer")


def _check_conv(layer) -> None:
    if layer.groups != 1 or layer.data_format != "channels_last" or layer.padding not in ("valid", "same"):
        raise InvalidParameterError(f"layer '{layer.name}': CROWN-IBP supports channels_last Conv2D with groups=1 "
                                    f"and 'valid'/'same' padding (got groups={layer.groups}, {layer.data_format}, "
                                    f"padding={layer.padding!r})")


def _affine_back(step: Affine, lam, in_shape):
    """(L^T lam, lam . b) for lam (N, K, *out_shape)."""
    if step.reshape:
        return tf.reshape(lam, tf.concat([tf.shape(lam)[:2], in_shape], 0)), tf.zeros_like(lam[:, :, 0])
    if step.kernel is not None:
        grad = tf.einsum("nko,io->nki", lam, step.kernel)
    else:
        n, k = tf.shape(lam)[0], lam.shape[1]
        zero = tf.zeros(tf.concat([[n * k], in_shape], 0), dtype=lam.dtype)
        with tf.GradientTape() as tape:
            tape.watch(zero)
            out = step.forward(zero)
        flat = tf.reshape(lam, tf.shape(out))
        grad = tf.reshape(tape.gradient(out, zero, output_gradients=flat), tf.concat([[n, k], in_shape], 0))
    offset = step.forward(tf.zeros([1] + list(in_shape), dtype=lam.dtype))[0]
    const = tf.reduce_sum(tf.reshape(lam * offset, tf.concat([tf.shape(lam)[:2], [-1]], 0)), axis=-1)
    return grad, const


def _relu_back(lam, lo, hi):
    unstable = tf.logical_and(lo < 0, hi > 0)
    width = tf.where(unstable, hi - lo, tf.ones_like(hi))
    active = tf.cast(lo >= 0, lo.dtype)
    up_slope = tf.where(unstable, hi / width, active)
    up_icpt = tf.where(unstable, -hi * lo / width, tf.zeros_like(hi))
    low_slope = tf.where(unstable, tf.cast(hi > -lo, lo.dtype), active)
    pos, neg = tf.maximum(lam, 0.0), tf.minimum(lam, 0.0)
    coeff = pos * low_slope[:, None] + neg * up_slope[:, None]
    prod = neg * up_icpt[:, None]
    const = tf.reduce_sum(tf.reshape(prod, tf.concat([tf.shape(prod)[:2], [-1]], 0)), axis=-1)
    return coeff, const


def _both_bounds(model, x, y, eps, clip):
    """(IBP, CROWN-IBP) lower bounds of z_y - z_j, each (N, K) with +inf at the true class."""
    body, (w, b), x, y = margin_problem(model, x, y)
    steps = [step for layer in body for step in _steps(layer)]
    k = w.shape[0]
    c0, r0 = input_box(x, eps, check_clip(clip))
    c, r = c0, r0
    boxes, shapes = [], []
    for step in steps:
        shapes.append(list(c.shape[1:]))
        if step == RELU:
            boxes.append((c - r, c + r))
            lo, hi = tf.nn.relu(c - r), tf.nn.relu(c + r)
            c, r = (hi + lo) / 2, (hi - lo) / 2
        else:
            boxes.append(None)
            try:
                c, r = step.forward(c), step.magnitude(r)
            except (tf.errors.InvalidArgumentError, ValueError) as e:
                raise InputShapeError(f"CROWN-IBP on input shape {tuple(x.shape)}: {e}") from e
    n = tf.shape(c)[0]
    spec = tf.gather(w, y)[:, None, :] - w[None, :, :]         # (N, K, H): rows W_y - W_j
    const = tf.zeros_like(spec[:, :, 0])
    if b is not None:
        const = const + (tf.gather(b, y)[:, None] - b[None, :])
    ibp = (const + tf.einsum("nkh,nh->nk", spec, tf.reshape(c, (n, -1)))
           - tf.einsum("nkh,nh->nk", tf.abs(spec), tf.reshape(r, (n, -1))))
    lam = tf.reshape(spec, tf.concat([[n, k], c.shape[1:]], 0))
    for step, box, shape in zip(reversed(steps), reversed(boxes), reversed(shapes)):
        lam, added = _relu_back(lam, *box) if step == RELU else _affine_back(step, lam, shape)
        const = const + added
    flat = tf.reshape(lam, (n, k, -1))
    crown = (const + tf.einsum("nkd,nd->nk", flat, tf.reshape(c0, (n, -1)))
             - tf.einsum("nkd,nd->nk", tf.abs(flat), tf.reshape(r0, (n, -1))))
    true = tf.one_hot(y, k) > 0
    inf = tf.constant(math.inf, ibp.dtype)
    return tf.where(true, inf, ibp), tf.where(true, inf, crown)


def crown_ibp_margin_bounds(model, x, y, eps, clip: tuple[float, float] | None = (0.0, 1.0)) -> tf.Tensor:
    """CROWN-IBP lower bounds of z_y - z_j over the eps-box, shape (N, K), +inf at the true class.

    Differentiable with respect to the weights; equal to the PyTorch twin and to
    ``robeval certify --method crown-ibp`` on the converted model.
    """
    return _both_bounds(model, x, y, eps, clip)[1]


def mixed_margin_bounds(model, x, y, eps, beta, clip: tuple[float, float] | None = (0.0, 1.0)) -> tf.Tensor:
    """beta * CROWN-IBP + (1 - beta) * IBP lower bounds (Zhang et al. 2020, eq. 9), beta in [0, 1]."""
    if isinstance(beta, (int, float)) and not 0.0 <= beta <= 1.0:
        raise InvalidParameterError(f"beta={beta!r}; expected a weight in [0, 1]")
    ibp, crown = _both_bounds(model, x, y, eps, clip)
    true = tf.math.is_inf(ibp)
    beta = tf.cast(beta, ibp.dtype)
    zero = tf.zeros_like(ibp)
    mixed = beta * tf.where(true, zero, crown) + (1.0 - beta) * tf.where(true, zero, ibp)
    return tf.where(true, tf.constant(math.inf, ibp.dtype), mixed)
