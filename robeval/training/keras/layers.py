"""Lipschitz-bounded Keras layers: spectral Dense and Conv2D layers, GroupSort activations.

The twins of ``robeval.training.torch.layers`` with the same math: each spectral layer keeps a free
kernel and maps it on every call to a weight of spectral norm about 1 (power iteration from a kept
vector, then Björck orthonormalisation, as deel-lip does); the vector is updated only when
``training=True``. ``export()`` returns a plain, built ``keras.layers.Dense``/``Conv2D`` with that
weight frozen in, and ``lipschitz_bound()`` a float64 upper bound on its L2 Lipschitz constant.

Weights are kept in Keras layouts (Dense kernel (in, out), Conv2D kernel (kh, kw, in, out)); the
matrix that is normalised is the PyTorch one, (out, in) and (out, in*kh*kw), so both frameworks
compute the same numbers from the same weights. Images are channels-last (NHWC).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from ...errors import InputShapeError, InvalidParameterError
from .. import _common
from .._common import SpectralConfig
from ._shared import ACTIVATION_LIPSCHITZ

PACKAGE = "robeval"


def _normalize(v: tf.Tensor) -> tf.Tensor:
    """v / max(||v||, 1e-12), as torch's F.normalize."""
    return v / tf.maximum(tf.norm(v), 1e-12)


def power_iteration(w: tf.Tensor, u: tf.Tensor, steps: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Estimate sigma_max of a 2-D ``w`` from the left vector ``u``; returns (sigma, u).

    The vectors carry no gradient; sigma = u^T w v carries it to ``w``. The estimate is a lower
    bound of sigma_max, so it only normalises; bounds use a float64 SVD.
    """
    w_const, u = tf.stop_gradient(w), tf.stop_gradient(tf.convert_to_tensor(u, w.dtype))
    v = u
    for _ in range(steps):
        v = _normalize(tf.linalg.matvec(w_const, u, transpose_a=True))
        u = _normalize(tf.linalg.matvec(w_const, v))
    v, u = tf.stop_gradient(v), tf.stop_gradient(u)
    return tf.tensordot(u, tf.linalg.matvec(w, v), 1), u


def bjorck(w: tf.Tensor, iterations: int = 15, beta: float = 0.5) -> tf.Tensor:
    """Björck orthonormalisation W <- (1 + beta) W - beta W W^T W, on the smaller Gram matrix."""
    rows, cols = w.shape
    for _ in range(iterations):
        if rows <= cols:
            w = (1 + beta) * w - beta * tf.matmul(tf.matmul(w, w, transpose_b=True), w)
        else:
            w = (1 + beta) * w - beta * tf.matmul(w, tf.matmul(w, w, transpose_a=True))
    return w


def orthonormal_weight(w: tf.Tensor, u: tf.Tensor, config: SpectralConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """Divide a 2-D ``w`` by its estimated sigma_max, then orthonormalise it; returns (W, u)."""
    sigma, u = power_iteration(w, u, config.power_iterations)
    w = w / tf.maximum(sigma, 1e-12)
    return bjorck(w, config.bjorck_iterations, config.bjorck_beta), u


def _spectral_config(value) -> SpectralConfig:
    if value is None:
        return SpectralConfig()
    if isinstance(value, SpectralConfig):
        return value
    if isinstance(value, dict):
        return SpectralConfig(**value)
    raise InvalidParameterError(f"spectral_config={value!r}; expected a SpectralConfig, a dict of its fields or None")


def _activation_name(activation) -> str:
    name = keras.activations.serialize(activation)
    return name if isinstance(name, str) else getattr(activation, "__name__", str(activation))


def activation_lipschitz(activation, where: str) -> float:
    """L2 Lipschitz constant of an elementwise activation, or raise naming the layer."""
    name = _activation_name(activation)
    if name not in ACTIVATION_LIPSCHITZ:
        raise InvalidParameterError(
            f"{where}: activation '{name}' has no known Lipschitz constant; use one of "
            f"{sorted(ACTIVATION_LIPSCHITZ)} or a GroupSort layer"
        )
    return ACTIVATION_LIPSCHITZ[name]


def _unit_vector(shape, dtype=None):
    return _normalize(tf.random.normal(shape, dtype=dtype or "float32"))


class _SpectralBase(keras.layers.Layer):
    """A free kernel, the kept power-iteration vector ``u`` and the mapping to a unit-norm matrix."""

    def __init__(self, use_bias=True, activation=None, spectral_config=None, **kwargs):
        super().__init__(**kwargs)
        self.use_bias = bool(use_bias)
        self.activation = keras.activations.get(activation)
        self.spectral_config = _spectral_config(spectral_config)
        activation_lipschitz(self.activation, type(self).__name__)

    def _add_state(self, kernel_shape, rows: int) -> None:
        self.kernel = self.add_weight(name="kernel", shape=kernel_shape, initializer="orthogonal")
        self.bias = self.add_weight(name="bias", shape=(rows,), initializer="zeros") if self.use_bias else None
        self.u = self.add_weight(name="u", shape=(rows,), initializer=_unit_vector, trainable=False)

    def _matrix(self) -> tf.Tensor:
        """The free kernel (..., in, out) as the (out, in * ...) matrix, in torch's (out, in, kh, kw) order."""
        rank = len(self.kernel.shape)
        order = (rank - 1, rank - 2) + tuple(range(rank - 2))
        return tf.reshape(tf.transpose(self.kernel, order), (self.kernel.shape[-1], -1))

    def weight_matrix(self, training=False) -> tf.Tensor:
        """The constrained (out, in...) matrix; ``training=True`` also updates ``u``."""
        w, u = orthonormal_weight(self._matrix(), self.u, self.spectral_config)
        if training:
            self.u.assign(u)
        return w

    def _finish(self, y):
        if self.bias is not None:
            y = y + self.bias
        return self.activation(y)

    def get_config(self):
        cfg = super().get_config()
        sc = self.spectral_config
        cfg.update(use_bias=self.use_bias, activation=keras.activations.serialize(self.activation),
                   spectral_config={"power_iterations": sc.power_iterations,
                                    "bjorck_iterations": sc.bjorck_iterations, "bjorck_beta": sc.bjorck_beta})
        return cfg

    def _set_plain(self, layer, kernel: np.ndarray):
        weights = [kernel] + ([keras.ops.convert_to_numpy(self.bias)] if self.bias is not None else [])
        layer.set_weights(weights)
        return layer


@keras.saving.register_keras_serializable(package=PACKAGE)
class SpectralDense(_SpectralBase):
    """Dense layer whose weight is orthonormalised (spectral norm 1) at every call.

    Args:
        units: output size.
        use_bias: add a learned bias (it does not change the Lipschitz constant).
        activation: a plain elementwise activation ("relu", None, ...); use ``GroupSort`` layers for
            gradient-norm-preserving networks.
        spectral_config: ``SpectralConfig`` (or a dict of its fields): power and Björck iterations.

    >>> layer = SpectralDense(32)
    >>> layer.build((None, 784))
    >>> round(layer.lipschitz_bound(), 3)
    1.0
    """

    def __init__(self, units, use_bias=True, activation=None, spectral_config=None, **kwargs):
        super().__init__(use_bias, activation, spectral_config, **kwargs)
        self.units = _common.check_int("units", units, 1)

    def build(self, input_shape):
        self.in_features = int(input_shape[-1])
        self._add_state((self.in_features, self.units), self.units)

    def constrained_kernel(self, training=False) -> tf.Tensor:
        """The (in, out) kernel the layer multiplies by."""
        return tf.transpose(self.weight_matrix(training))

    def call(self, inputs, training=None):
        return self._finish(tf.matmul(inputs, self.constrained_kernel(bool(training))))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def export(self) -> keras.layers.Dense:
        """A built plain ``keras.layers.Dense`` with the constrained kernel frozen in."""
        out = keras.layers.Dense(self.units, activation=self.activation, use_bias=self.use_bias, name=self.name)
        out.build((None, self.in_features))
        return self._set_plain(out, keras.ops.convert_to_numpy(self.constrained_kernel()))

    def lipschitz_bound(self) -> float:
        """float64 sigma_max of the exported kernel times the activation's constant."""
        k = self.export().get_weights()[0]
        return _common.spectral_norm(k) * activation_lipschitz(self.activation, self.name)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SpectralConv2D(_SpectralBase):
    """2-D convolution (NHWC) with an L2 Lipschitz bound of about 1.

    The kernel, as the (C_out, C_in*kh*kw) matrix, is orthonormalised and divided by
    sqrt(ceil(kh/sh) * ceil(kw/sw)): every output position is that matrix times one input patch and
    every input pixel lies in at most that many patches under zero padding ('valid' or 'same'), so
    ||conv(x)|| <= sqrt(overlap) ||W|| ||x|| (``_common.conv_lipschitz_factor``). Safe but loose.

    Args:
        filters, kernel_size, strides, padding ("valid" or "same"), use_bias, activation: as in
            ``keras.layers.Conv2D`` (channels-last, no dilation or groups).
        spectral_config: power and Björck iteration settings.
    """

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", use_bias=True, activation=None,
                 spectral_config=None, **kwargs):
        super().__init__(use_bias, activation, spectral_config, **kwargs)
        self.filters = _common.check_int("filters", filters, 1)
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        if str(padding).lower() not in ("valid", "same"):
            raise InvalidParameterError(f"padding={padding!r}; expected 'valid' or 'same' (zero padding)")
        self.padding = str(padding).lower()
        self.factor = _common.conv_lipschitz_factor(self.kernel_size, self.strides)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise InputShapeError(f"{self.name}: input shape {tuple(input_shape)}; expected (N, H, W, C) (NHWC)")
        self.in_channels = int(input_shape[-1])
        self._add_state(self.kernel_size + (self.in_channels, self.filters), self.filters)

    def constrained_kernel(self, training=False) -> tf.Tensor:
        """The (kh, kw, in, out) kernel the convolution uses."""
        w = self.weight_matrix(training) / self.factor
        w = tf.reshape(w, (self.filters, self.in_channels) + self.kernel_size)
        return tf.transpose(w, (2, 3, 1, 0))

    def call(self, inputs, training=None):
        y = tf.nn.conv2d(inputs, self.constrained_kernel(bool(training)), self.strides, self.padding.upper())
        return self._finish(y)

    def compute_output_shape(self, input_shape):
        conv = keras.layers.Conv2D(self.filters, self.kernel_size, self.strides, self.padding)
        return conv.compute_output_shape(input_shape)

    def export(self) -> keras.layers.Conv2D:
        """A built plain ``keras.layers.Conv2D`` with the constrained kernel frozen in."""
        out = keras.layers.Conv2D(self.filters, self.kernel_size, self.strides, self.padding,
                                  activation=self.activation, use_bias=self.use_bias, name=self.name)
        out.build((None, None, None, self.in_channels))
        return self._set_plain(out, keras.ops.convert_to_numpy(self.constrained_kernel()))

    def lipschitz_bound(self) -> float:
        """sqrt(overlap) * float64 sigma_max of the exported (C_out, C_in*kh*kw) matrix * activation's."""
        k = self.export().get_weights()[0]
        matrix = k.transpose(3, 2, 0, 1).reshape(self.filters, -1)
        return self.factor * _common.spectral_norm(matrix) * activation_lipschitz(self.activation, self.name)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": list(self.kernel_size),
                "strides": list(self.strides), "padding": self.padding}


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and i >= 1 for i in t):
        raise InvalidParameterError(f"{name}={v!r}; expected a positive int or a pair of them")
    return t  # type: ignore[return-value]


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupSort(keras.layers.Layer):
    """Sort consecutive groups of ``group_size`` features of the last axis in ascending order.

    A permutation of each group: 1-Lipschitz in L2, gradient-norm preserving (Anil et al. 2019),
    and monotone in every input. On NHWC images the groups run along channels, which is axis 1
    once robeval converts the model to NCHW, where its ``groupsort`` op sorts.

    >>> GroupSort()(np.array([[3.0, 1.0, -1.0, 2.0]], "float32")).numpy().tolist()
    [[1.0, 3.0, -1.0, 2.0]]
    """

    def __init__(self, group_size=2, **kwargs):
        super().__init__(**kwargs)
        self.group_size = _common.check_int("group_size", group_size, 1)

    def build(self, input_shape):
        c = input_shape[-1]
        if c is not None and c % self.group_size:
            raise InputShapeError(
                f"{self.name}: GroupSort(group_size={self.group_size}) got {c} features on the last axis; "
                f"use a width divisible by {self.group_size}"
            )

    def call(self, inputs):
        g = self.group_size
        shape = tf.shape(inputs)
        grouped = tf.reshape(inputs, tf.concat([shape[:-1], [inputs.shape[-1] // g, g]], 0))
        if g == 2:
            a, b = grouped[..., 0], grouped[..., 1]
            out = tf.stack((tf.minimum(a, b), tf.maximum(a, b)), axis=-1)
        else:
            out = tf.sort(grouped, axis=-1)
        return tf.reshape(out, shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def export(self) -> GroupSort:
        return GroupSort(self.group_size, name=self.name)

    def lipschitz_bound(self) -> float:
        return 1.0

    def get_config(self):
        return {**super().get_config(), "group_size": self.group_size}


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaxMin(GroupSort):
    """GroupSort with groups of 2: each pair becomes (min, max)."""

    def __init__(self, **kwargs):
        kwargs.pop("group_size", None)
        super().__init__(2, **kwargs)

    def export(self) -> GroupSort:
        return GroupSort(2, name=self.name)

    def get_config(self):
        cfg = super().get_config()
        cfg.pop("group_size")
        return cfg
