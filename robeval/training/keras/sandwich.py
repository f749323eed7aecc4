"""Sandwich layers and LBDN networks (Wang & Manchester 2023) for Keras: the twins of
``robeval.training.torch.sandwich`` with the same parameters and the same math.

A sandwich layer computes h -> sqrt(2) A^T Psi relu(sqrt(2) Psi^-1 B h + b), where Q = [A B] has
orthonormal rows by construction (Cayley transform of a free matrix) and Psi is a positive diagonal;
every parameter value gives a 1-Lipschitz layer (``_common.sandwich_bound``). An LBDN scales its
input and output by sqrt(gamma) around such layers, so it is gamma-Lipschitz.

The free matrix is stored as PyTorch stores it, ``weight`` of shape (out, out + in), so weights copy
across frameworks unchanged; the exported plain Dense kernels are (in, out) as usual in Keras.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from ...errors import InvalidParameterError
from .. import _common
from .layers import PACKAGE


def cayley(x: tf.Tensor) -> tf.Tensor:
    """Map a free (n, n + m) matrix to Q = [A B] (A: n x n, B: n x m) with Q Q^T = I."""
    n = x.shape[0]
    u, v = tf.transpose(x[:, :n]), tf.transpose(x[:, n:])
    eye = tf.eye(n, dtype=x.dtype)
    z = u - tf.transpose(u) + tf.matmul(v, v, transpose_a=True)
    inv = tf.linalg.inv(eye + z)
    top = tf.matmul(inv, eye - z)
    bottom = -2.0 * tf.matmul(v, inv)
    return tf.transpose(tf.concat((top, bottom), axis=0))


class _CayleyBase(keras.layers.Layer):
    """A free (out, out + in) matrix and its weight-normalisation scale alpha, mapped by ``cayley``."""

    def __init__(self, units, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.units = _common.check_int("units", units, 1)
        self.scale = _common.check_positive("scale", scale)

    def _add_cayley(self, in_features: int) -> None:
        self.in_features = int(in_features)
        self.weight = self.add_weight(name="weight", shape=(self.units, self.units + self.in_features),
                                      initializer="glorot_normal")
        norm = float(np.linalg.norm(keras.ops.convert_to_numpy(self.weight)))
        # alpha scales the normalised weight (weight normalisation), as in the authors' code
        self.alpha = self.add_weight(name="alpha", shape=(1,), initializer=keras.initializers.Constant(norm))

    def q_matrix(self) -> tf.Tensor:
        """Q = [A B] of shape (out, out + in) with orthonormal rows."""
        return cayley(self.alpha * self.weight / tf.norm(self.weight))

    def _q_numpy(self) -> np.ndarray:
        return keras.ops.convert_to_numpy(self.q_matrix()).astype(np.float64)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "scale": self.scale}


@keras.saving.register_keras_serializable(package=PACKAGE)
class SandwichLayer(_CayleyBase):
    """One 1-Lipschitz sandwich layer with a ReLU inside, mapping ``in`` features to ``units``.

    Args:
        units: output size.
        scale: factor applied to the input (sqrt(gamma) for the first layer of an LBDN).

    ``export()`` returns a built ``keras.Sequential([Dense(units, relu), Dense(units, no bias)])`` with
    kernels (scale sqrt(2) Psi^-1 B)^T and (sqrt(2) A^T Psi)^T.
    """

    def build(self, input_shape):
        self._add_cayley(input_shape[-1])
        self.psi = self.add_weight(name="psi", shape=(self.units,), initializer="zeros")
        self.bias = self.add_weight(name="bias", shape=(self.units,),
                                    initializer=keras.initializers.RandomUniform(-0.1, 0.1))

    def matrices(self) -> tuple[tf.Tensor, tf.Tensor]:
        """(W1, W2) in PyTorch layout: W1 (units, in), W2 (units, units); y = W2 relu(W1 x + b)."""
        q = self.q_matrix()
        a, b = q[:, :self.units], q[:, self.units:]
        w1 = (self.scale * math.sqrt(2.0)) * tf.exp(-self.psi)[:, None] * b
        w2 = math.sqrt(2.0) * tf.transpose(a) * tf.exp(self.psi)[None, :]
        return w1, w2

    def call(self, inputs):
        w1, w2 = self.matrices()
        h = tf.nn.relu(tf.matmul(inputs, w1, transpose_b=True) + self.bias)
        return tf.matmul(h, w2, transpose_b=True)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def export(self) -> keras.Sequential:
        w1, w2 = (keras.ops.convert_to_numpy(w) for w in self.matrices())
        first = keras.layers.Dense(self.units, activation="relu", name=f"{self.name}_in")
        second = keras.layers.Dense(self.units, use_bias=False, name=f"{self.name}_out")
        model = keras.Sequential([keras.Input((self.in_features,)), first, second], name=self.name)
        first.set_weights([w1.T, keras.ops.convert_to_numpy(self.bias)])
        second.set_weights([w2.T])
        return model

    def lipschitz_bound(self) -> float:
        """scale * ||Q||^2 (= scale up to rounding); see ``_common.sandwich_bound``."""
        return self.scale * _common.sandwich_bound(self._q_numpy())


@keras.saving.register_keras_serializable(package=PACKAGE)
class SandwichDense(_CayleyBase):
    """Affine output layer y = scale * B h + b with ||B||_2 <= 1 (B from the Cayley transform);
    the twin of PyTorch's ``SandwichLinear``."""

    def __init__(self, units, scale=1.0, use_bias=True, **kwargs):
        super().__init__(units, scale, **kwargs)
        self.use_bias = bool(use_bias)

    def build(self, input_shape):
        self._add_cayley(input_shape[-1])
        self.bias = self.add_weight(name="bias", shape=(self.units,), initializer="zeros") if self.use_bias else None

    def matrix(self) -> tf.Tensor:
        """scale * B, shape (units, in) (PyTorch layout)."""
        return self.scale * self.q_matrix()[:, self.units:]

    def call(self, inputs):
        y = tf.matmul(inputs, self.matrix(), transpose_b=True)
        return y + self.bias if self.bias is not None else y

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    def export(self) -> keras.layers.Dense:
        out = keras.layers.Dense(self.units, use_bias=self.use_bias, name=self.name)
        out.build((None, self.in_features))
        weights = [keras.ops.convert_to_numpy(self.matrix()).T]
        out.set_weights(weights + ([keras.ops.convert_to_numpy(self.bias)] if self.bias is not None else []))
        return out

    def lipschitz_bound(self) -> float:
        return _common.spectral_norm(self.export().get_weights()[0])

    def get_config(self):
        return {**super().get_config(), "use_bias": self.use_bias}


@keras.saving.register_keras_serializable(package=PACKAGE)
class LBDN(keras.layers.Layer):
    """Lipschitz-bounded MLP: sqrt(gamma) * input -> sandwich layers -> sqrt(gamma) * B h + b.

    Inputs with more than one feature axis are flattened.

    Args:
        hidden: widths of the sandwich layers, e.g. (64, 64).
        units: number of outputs (logits).
        gamma: L2 Lipschitz bound of the whole network.

    >>> net = LBDN((64, 64), 10, gamma=5.0)
    >>> net.build((None, 28, 28, 1))
    >>> net.lipschitz_bound() <= 5.0 * (1 + 1e-4)
    True
    """

    def __init__(self, hidden: Sequence[int], units: int, gamma: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden = [_common.check_int("hidden width", h, 1) for h in hidden]
        if not self.hidden:
            raise InvalidParameterError("hidden=(); give at least one hidden width, e.g. (64, 64)")
        self.units = _common.check_int("units", units, 1)
        self.gamma = _common.check_positive("gamma", gamma)
        s = _common.lbdn_scale(gamma)
        self.sandwiches = [SandwichLayer(h, scale=s if i == 0 else 1.0, name=f"sandwich_{i}")
                           for i, h in enumerate(self.hidden)]
        self.output_layer = SandwichDense(self.units, scale=s, name="output")

    def build(self, input_shape):
        self.input_dims = tuple(int(d) for d in input_shape[1:])
        self.in_features = int(np.prod(self.input_dims))
        width = self.in_features
        for layer in self.sandwiches:
            layer.build((None, width))
            width = layer.units
        self.output_layer.build((None, width))

    def call(self, inputs):
        h = tf.reshape(inputs, (tf.shape(inputs)[0], self.in_features))
        for layer in self.sandwiches:
            h = layer(h)
        return self.output_layer(h)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.units)

    def export(self, merge: bool = True) -> keras.Sequential:
        """A plain ``Flatten, Dense(relu), ..., Dense`` Sequential computing the same function.

        With ``merge=True`` the bias-free Dense ending one sandwich layer is multiplied into the
        Dense starting the next, so a 784-64-64-10 LBDN exports to a plain 784-64-64-10 MLP.
        """
        dense: list[keras.layers.Dense] = []
        for layer in self.sandwiches:
            dense.extend(layer.export().layers)
        dense.append(self.output_layer.export())
        if merge:
            dense = _merge_dense(dense)
        flatten = keras.layers.Flatten(name=f"{self.name}_flatten")
        return keras.Sequential([keras.Input(self.input_dims), flatten, *dense], name=self.name)

    def lipschitz_bound(self) -> float:
        """Product of the layer bounds: gamma up to rounding."""
        bound = 1.0
        for layer in self.sandwiches:
            bound *= layer.lipschitz_bound()
        return bound * self.output_layer.lipschitz_bound()

    def get_config(self):
        return {**super().get_config(), "hidden": list(self.hidden), "units": self.units, "gamma": self.gamma}


def _merge_dense(layers: list) -> list:
    """Fuse each bias-free linear Dense with the Dense after it: (h K1) K2 + b2 = h (K1 K2) + b2."""
    out: list = []
    for layer in layers:
        prev = out[-1] if out else None
        if prev is not None and not prev.use_bias and _activation(prev) == "linear":
            k1 = np.asarray(prev.get_weights()[0], np.float64)
            w = layer.get_weights()
            fused = keras.layers.Dense(layer.units, activation=layer.activation, use_bias=layer.use_bias,
                                       name=layer.name)
            fused.build((None, k1.shape[0]))
            fused.set_weights([(k1 @ np.asarray(w[0], np.float64)).astype(np.float32)] + w[1:])
            out[-1] = fused
        else:
            out.append(layer)
    return out


def _activation(layer) -> str:
    name = keras.activations.serialize(layer.activation)
    return name if isinstance(name, str) else str(name)
