"""Jacobian regularisation for Keras (Hoffman, Roberts & Yaida 2019): penalise the squared Frobenius
norm of the input-output Jacobian, estimated with random projections (one extra backward pass each);
the twin of ``robeval.training.torch.jacobian``.

For v uniform on the unit sphere of R^C, E[v v^T] = I / C, hence ||J||_F^2 = C * E[||v^T J||^2].
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ...errors import InvalidParameterError
from .. import _common
from ._shared import JACOBIAN_OUTPUTS
from .layers import PACKAGE
from .model import RobustModel


def _unit_rows(v: tf.Tensor) -> tf.Tensor:
    return v / tf.maximum(tf.norm(v, axis=1, keepdims=True), 1e-12)


def projected_estimate(tape: tf.GradientTape, z: tf.Tensor, x: tf.Tensor, n_projections: int = 1,
                       directions=None, seed=None) -> tf.Tensor:
    """Per-sample estimate C/P * sum_p ||v_p^T dz/dx||^2 from a tape that watched ``x`` and computed
    ``z`` (N, C) (flatten other outputs inside the tape).

    ``directions`` (P, N, C) fixes the projections (they are normalised per row); otherwise they are
    drawn from N(0, I) and normalised, with ``seed`` (an int or a ``keras.random.SeedGenerator``).
    The tape must be persistent when P > 1.
    """
    c = z.shape[-1]
    total = tf.zeros((tf.shape(z)[0],), z.dtype)
    for i in range(n_projections):
        v = directions[i] if directions is not None else keras.random.normal(tf.shape(z), dtype=z.dtype, seed=seed)
        g = tape.gradient(z, x, output_gradients=_unit_rows(tf.cast(v, z.dtype)))
        total = total + tf.reduce_sum(tf.square(tf.reshape(g, (tf.shape(g)[0], -1))), axis=1)
    return total * (c / n_projections)


def _check(n_projections, outputs, directions):
    n = _common.check_int("n_projections", n_projections, 1)
    if outputs not in JACOBIAN_OUTPUTS:
        raise InvalidParameterError(f"outputs={outputs!r}; expected one of {JACOBIAN_OUTPUTS}")
    if directions is not None:
        n = len(directions)
    return n


def jacobian_frobenius_sq(model, x, n_projections: int = 1, directions=None, seed=None, outputs: str = "logits",
                          training=False) -> tf.Tensor:
    """Per-sample unbiased estimate of ||d model(x) / dx||_F^2, shape (N,).

    Args:
        model: maps (N, ...) inputs to (N, C) outputs; samples must not interact (BatchNorm in
            training mode couples them).
        x: inputs.
        n_projections: random unit directions averaged (ignored when ``directions`` is given).
        directions: (P, N, C) projection vectors to use instead of random ones.
        seed: int or ``keras.random.SeedGenerator`` for the random directions.
        outputs: "logits", or "probabilities" (the Jacobian of the softmax).
    Call it inside a ``tf.GradientTape`` to differentiate the estimate with respect to the weights.
    """
    n = _check(n_projections, outputs, directions)
    x = tf.convert_to_tensor(x)
    with tf.GradientTape(persistent=n > 1) as tape:
        tape.watch(x)
        z = model(x, training=training)
        if outputs == "probabilities":
            z = tf.nn.softmax(z, axis=-1)
        z = tf.reshape(z, (tf.shape(z)[0], -1))
    return projected_estimate(tape, z, x, n, directions, seed)


@keras.saving.register_keras_serializable(package=PACKAGE)
class JacobianRegularization(RobustModel):
    """Wraps ``base_model``; trains on loss + coefficient / 2 * batch mean of ||J(x)||_F^2.

    Args:
        base_model: the network (logits out).
        coefficient: weight lambda of the Jacobian term (1 in the MATLAB example).
        n_projections: random projections per step (1 suffices in practice).
        outputs: "logits" (Hoffman et al.) or "probabilities" (the MATLAB example's softmax output).
        seed: seed of the projection directions.

    Reports ``jacobian_penalty`` (the weighted term).
    """

    def __init__(self, base_model, coefficient=1.0, n_projections=1, outputs="logits", seed=None,
                 name="jacobian_regularization", **kwargs):
        super().__init__(base_model, name=name, **kwargs)
        self.coefficient = _common.check_positive("coefficient", coefficient, allow_zero=True)
        self.n_projections = _check(n_projections, outputs, None)
        self.outputs, self.seed = outputs, seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.penalty_tracker = keras.metrics.Mean(name="jacobian_penalty")

    def objective(self, x, y, sample_weight=None, training=True):
        x = tf.convert_to_tensor(x)
        with tf.GradientTape(persistent=self.n_projections > 1) as tape:
            tape.watch(x)
            y_pred = self(x, training=training)
            z = tf.nn.softmax(y_pred, axis=-1) if self.outputs == "probabilities" else y_pred
        est = projected_estimate(tape, z, x, self.n_projections, seed=self.seed_generator)
        penalty = 0.5 * self.coefficient * tf.reduce_mean(est)
        self.penalty_tracker.update_state(penalty)
        loss = self.labeled_loss(y, y_pred, sample_weight) + self.regularization_loss()
        return y_pred, loss + penalty

    def get_config(self):
        return {**super().get_config(), "coefficient": self.coefficient, "n_projections": self.n_projections,
                "outputs": self.outputs, "seed": self.seed}
