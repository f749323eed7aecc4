"""Gaussian noise augmentation for randomized smoothing in Keras: the twin of
``robeval.training.torch.GaussianNoiseLoss`` (same settings, same objective).

loss = the compiled loss on ``copies`` noisy copies x + sigma * e_i (unclipped, as the smoothed
classifier adds them), plus ``consistency`` * mean_i KL(p_bar || p_i) (Jeong & Shin 2020). The
metrics given to ``compile`` are computed on the clean outputs.

>>> # model = GaussianNoiseTraining(base, sigma=0.25)              # base: logits out
>>> # model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
>>> # model.fit(x_train, y_train, epochs=5); base.save("base.keras")  # certify the base model
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .. import _common
from .layers import PACKAGE
from .model import RobustModel


@keras.saving.register_keras_serializable(package=PACKAGE)
class GaussianNoiseTraining(RobustModel):
    """Wraps ``base_model``; trains it on Gaussian-noise copies of each batch.

    Args:
        base_model: the network (logits out). sigma: noise standard deviation.
        copies: noisy copies per input; consistency: weight of the KL term (needs copies >= 2).
        seed: seed of the noise generator (None: unseeded).
    """

    def __init__(self, base_model, sigma: float = 0.25, copies: int = 1, consistency: float = 0.0,
                 seed: int | None = None, name="gaussian_noise_training", **kwargs):
        super().__init__(base_model, name=name, **kwargs)
        self.sigma = _common.check_positive("sigma", sigma)
        self.copies = _common.check_int("copies", copies, 1)
        self.consistency = _common.check_positive("consistency", consistency, allow_zero=True)
        if self.consistency > 0 and self.copies < 2:
            raise _common.InvalidParameterError("the consistency term compares noisy copies: use copies >= 2")
        self.seed = seed
        self.noise_generator = keras.random.SeedGenerator(seed if seed is not None else 0)
        self.consistency_tracker = keras.metrics.Mean(name="consistency")

    def noisy(self, x):
        rep = tf.concat([x] * self.copies, axis=0)
        return rep + self.sigma * keras.random.normal(tf.shape(rep), dtype=rep.dtype, seed=self.noise_generator)

    def objective(self, x, y, sample_weight=None, training=True):
        x = tf.convert_to_tensor(x)
        y_pred = self(x, training=training)
        logits = self(self.noisy(x), training=training)
        y_rep = tf.concat([y] * self.copies, axis=0)
        w_rep = None if sample_weight is None else tf.concat([sample_weight] * self.copies, axis=0)
        loss = self.labeled_loss(y_rep, logits, w_rep) + self.regularization_loss()
        if self.consistency > 0:
            n = tf.shape(x)[0]
            logp = tf.reshape(tf.nn.log_softmax(logits, axis=1), (self.copies, n, -1))
            p_bar = tf.reduce_mean(tf.exp(logp), axis=0)
            kl = tf.reduce_sum(p_bar * (tf.math.log(tf.maximum(p_bar, 1e-12)) - logp), axis=-1)
            term = tf.reduce_mean(kl)
            self.consistency_tracker.update_state(term)
            loss = loss + self.consistency * term
        return y_pred, loss

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "copies": self.copies,
                "consistency": self.consistency, "seed": self.seed}
