"""Adversarial regularisation for Keras (Goodfellow et al. 2015, in the form of Neural Structured
Learning): loss(x) + multiplier * loss(x_adv), with x_adv a gradient-sign (FGSM) or projected-gradient
(PGD) perturbation of x against the model being trained, treated as a constant input. The twin of
``robeval.training.torch.AdversarialRegularizer``: same settings, same values.

>>> # base = keras.Sequential([...])                                  # logits out
>>> # model = AdversarialRegularization(base, multiplier=0.2, adv_step_size=0.2, adv_grad_norm="infinity")
>>> # model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
>>> # model.fit(x_train, y_train, batch_size=32, epochs=5)
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from ._shared import AdversarialConfig, make_adv_reg_config
from .layers import PACKAGE
from .model import RobustModel, cross_entropy

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (y_true, logits) -> scalar, Keras order


def _per_sample(fn, g: tf.Tensor) -> tf.Tensor:
    flat = tf.reshape(g, (tf.shape(g)[0], -1))
    return tf.reshape(fn(flat), tf.shape(g))


def step_direction(grad: tf.Tensor, norm: str) -> tf.Tensor:
    """sign(grad) for 'linf'; grad / ||grad||_2 per sample for 'l2'."""
    if norm == "linf":
        return tf.sign(grad)
    return _per_sample(lambda f: f / tf.maximum(tf.norm(f, axis=1, keepdims=True), 1e-12), grad)


def project(delta: tf.Tensor, eps, norm: str) -> tf.Tensor:
    """The nearest point of the eps-ball (per sample) to ``delta``."""
    if norm == "linf":
        return tf.clip_by_value(delta, -eps, eps)
    return _per_sample(lambda f: f * tf.minimum(eps / tf.maximum(tf.norm(f, axis=1, keepdims=True), 1e-12), 1.0),
                       delta)


def input_gradient(model, x, y, loss_fn: LossFn = cross_entropy, training=False) -> tf.Tensor:
    """d loss(y, model(x)) / d x."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = loss_fn(y, model(x, training=training))
    return tape.gradient(loss, x)


def perturb(model, x, y, config: AdversarialConfig, loss_fn: LossFn = cross_entropy, grad=None, eps=None,
            training=False) -> tf.Tensor:
    """Adversarial inputs (constants) for ``config``; ``grad`` is d loss / d x at x if known.

    ``eps`` overrides ``config.adv_step_size`` (a float or a scalar tensor, e.g. a scheduled variable).
    """
    x = tf.stop_gradient(tf.convert_to_tensor(x))
    eps = config.adv_step_size if eps is None else eps
    norm, clip = config.norm, config.clip

    def clip_box(v):
        return v if clip is None else tf.clip_by_value(v, clip[0], clip[1])

    if config.method == "fgsm":
        g = input_gradient(model, x, y, loss_fn, training) if grad is None else grad
        return tf.stop_gradient(clip_box(x + eps * step_direction(g, norm)))
    step = config.pgd_step_size if config.pgd_step_size is not None else 2.5 * eps / config.pgd_iterations
    adv = x
    for _ in range(config.pgd_iterations):
        adv = adv + step * step_direction(input_gradient(model, adv, y, loss_fn, training), norm)
        adv = tf.stop_gradient(clip_box(x + project(adv - x, eps, norm)))
    return adv


def adversarial_losses(model, x, y, config: AdversarialConfig, loss_fn: LossFn = cross_entropy,
                       training=False, eps=None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(clean outputs, clean loss, adversarial loss), differentiable with respect to the weights.

    One forward pass gives both the clean loss and, for FGSM, the input gradient of it.
    """
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y_pred = model(x, training=training)
        clean = loss_fn(y, y_pred)
    grad = tape.gradient(clean, x) if config.method == "fgsm" else None
    adv = perturb(model, x, y, config, loss_fn, grad=grad, eps=eps, training=training)
    return y_pred, clean, loss_fn(y, model(adv, training=training))


@keras.saving.register_keras_serializable(package=PACKAGE)
class AdversarialRegularization(RobustModel):
    """Wraps ``base_model``; trains on loss + multiplier * loss on adversarial neighbours.

    The labelled loss is the one given to ``compile`` (cross-entropy on logits if none); layer
    regularisers count once, on the clean pass. Reports ``adversarial_loss`` (scaled by the
    multiplier, as NSL's ``scaled_adversarial_loss``). Data are (x, y) pairs, not NSL's dicts.

    Args:
        base_model: the network (logits out).
        adv_config: an ``AdversarialConfig`` (``make_adv_reg_config(...)``); or give its fields as
            keywords: multiplier=0.2, adv_step_size=0.2, adv_grad_norm="infinity" ("l2"),
            method="fgsm" ("pgd"), pgd_iterations=10, pgd_step_size=None, clip=(0.0, 1.0).

    ``eps_variable`` holds the step size used in training, so ``EpsilonScheduler`` can ramp it.
    """

    def __init__(self, base_model, adv_config: AdversarialConfig | dict | None = None,
                 name="adversarial_regularization", **config):
        super().__init__(base_model, name=name)
        if isinstance(adv_config, dict):
            adv_config = make_adv_reg_config(**adv_config)
        self.adv_config = adv_config if adv_config is not None else make_adv_reg_config(**config)
        self.eps_variable = keras.Variable(self.adv_config.adv_step_size, trainable=False, name="adv_step_size",
                                           dtype="float32")
        self.adversarial_loss_tracker = keras.metrics.Mean(name="adversarial_loss")

    def objective(self, x, y, sample_weight=None, training=True):
        loss_fn = lambda yt, yp: self.labeled_loss(yt, yp, sample_weight)  # noqa: E731
        y_pred, clean, adv = adversarial_losses(self, x, y, self.adv_config, loss_fn, training,
                                                eps=self.eps_variable)
        scaled = self.adv_config.multiplier * adv
        self.adversarial_loss_tracker.update_state(scaled)
        return y_pred, clean + self.regularization_loss() + scaled

    def perturb_on_batch(self, x, y) -> tf.Tensor:
        """Adversarial neighbours of (x, y) against the current weights, in inference mode (as NSL's)."""
        return perturb(self, x, y, self.adv_config, lambda yt, yp: self.labeled_loss(yt, yp),
                       eps=self.eps_variable, training=False)

    def get_config(self):
        return {**super().get_config(), "adv_config": self.adv_config.to_dict()}
