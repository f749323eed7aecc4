"""Losses for Lipschitz networks in Keras: Kantorovich-Rubinstein (KR), hinge margin, their HKR sum
(Serrurier et al. 2021, as in deel-lip) and cross-entropy with a temperature; the twins of
``robeval.training.torch.losses``, with the same values on the same outputs and labels.

Label conventions (as in the PyTorch twin):
- binary: outputs (N,) or (N, 1); labels in {-1, +1} or {0, 1} (0 is the negative class).
- multiclass: outputs (N, K), K >= 2; class indices (N,) or (N, 1), or one-hot labels (N, K). Each
  class is one-vs-all: output k should be high on class k and low elsewhere, as in deel-lip.

KR and HKR are batch quantities (class means), so ``call`` returns one scalar per batch and sample
weights are not supported. Labels are checked where values are known (eager calls); inside
``model.fit`` (a compiled graph) only shapes are.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from ...errors import InputShapeError, InvalidParameterError
from .. import _common
from .layers import PACKAGE


def _eager_values(t) -> np.ndarray | None:
    """The values of an eager tensor, None inside a traced graph."""
    return t.numpy() if tf.executing_eagerly() and hasattr(t, "numpy") else None


def _class_indices(y_true: tf.Tensor, k: int) -> tf.Tensor:
    values = _eager_values(y_true)
    if values is not None and values.size and (
            np.any(values != np.round(values)) or values.min() < 0 or values.max() >= k):
        raise InvalidParameterError(f"class labels must be integers in [0, {k}); got values in "
                                    f"[{values.min()}, {values.max()}]")
    return tf.cast(tf.reshape(y_true, (-1,)), tf.int32)


def signed_targets(y_pred, y_true) -> tuple[tf.Tensor, tf.Tensor]:
    """Return (outputs, signs), both (N, K): sign +1 where the output should be high, -1 elsewhere."""
    y_pred, y_true = tf.convert_to_tensor(y_pred), tf.convert_to_tensor(y_true)
    out = tf.reshape(y_pred, (-1, 1)) if y_pred.shape.rank == 1 else y_pred
    if out.shape.rank != 2:
        raise InputShapeError(f"outputs have shape {tuple(y_pred.shape)}; expected (N,), (N, 1) or (N, K)")
    k = out.shape[-1]
    if k == 1:
        values = _eager_values(y_true)
        if values is not None and not np.all(np.isin(values, (-1, 0, 1))):
            raise InvalidParameterError("binary labels must be in {-1, 1} or {0, 1}; map your two classes to them")
        y = tf.cast(tf.reshape(y_true, (-1,)), out.dtype)
        return out, tf.where(y > 0, 1.0, -1.0)[:, None]
    if y_true.shape.rank == 2 and y_true.shape[-1] == k:
        onehot = y_true > 0
    elif y_true.shape.rank == 1 or (y_true.shape.rank == 2 and y_true.shape[-1] == 1):
        onehot = tf.one_hot(_class_indices(y_true, k), k) > 0
    else:
        raise InputShapeError(f"labels have shape {tuple(y_true.shape)} for outputs {tuple(out.shape)}; give (N,) "
                              "class indices or (N, K) one-hot labels")
    return out, tf.cast(onehot, out.dtype) * 2 - 1


def kr_estimate(y_true, y_pred) -> tf.Tensor:
    """Kantorovich-Rubinstein estimate E[f | positive] - E[f | negative], averaged over outputs.

    For a 1-Lipschitz f its supremum is the Wasserstein-1 distance between the two classes.
    A class missing from the batch contributes 0 to its mean. (Keras argument order: labels first.)
    """
    out, sign = signed_targets(y_pred, y_true)
    pos, neg = tf.cast(sign > 0, out.dtype), tf.cast(sign < 0, out.dtype)
    mean_pos = tf.reduce_sum(out * pos, 0) / tf.maximum(tf.reduce_sum(pos, 0), 1.0)
    mean_neg = tf.reduce_sum(out * neg, 0) / tf.maximum(tf.reduce_sum(neg, 0), 1.0)
    return tf.reduce_mean(mean_pos - mean_neg)


def hinge_margin(y_true, y_pred, min_margin: float = _common.HKR_MIN_MARGIN) -> tf.Tensor:
    """Mean over samples and outputs of relu(min_margin - sign * f)."""
    out, sign = signed_targets(y_pred, y_true)
    return tf.reduce_mean(tf.nn.relu(min_margin - sign * out))


def _check_no_weights(sample_weight, name):
    if sample_weight is not None:
        raise InvalidParameterError(f"{name} is a batch quantity (class means) and takes no sample_weight; "
                                    "resample the data instead")


class _BatchLoss(keras.losses.Loss):
    """A loss whose ``call`` returns one scalar per batch."""

    def __call__(self, y_true, y_pred, sample_weight=None):
        _check_no_weights(sample_weight, type(self).__name__)
        return super().__call__(y_true, y_pred)


@keras.saving.register_keras_serializable(package=PACKAGE)
class KRLoss(_BatchLoss):
    """Loss = -KR estimate (minimising it maximises the KR distance the network sees)."""

    def __init__(self, name="kr_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return -kr_estimate(y_true, y_pred)


@keras.saving.register_keras_serializable(package=PACKAGE)
class HingeMarginLoss(_BatchLoss):
    """Hinge loss relu(min_margin - y f(x)) averaged over samples and (one-vs-all) outputs."""

    def __init__(self, min_margin=_common.HKR_MIN_MARGIN, name="hinge_margin_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.min_margin = _common.check_positive("min_margin", min_margin)

    def call(self, y_true, y_pred):
        return hinge_margin(y_true, y_pred, self.min_margin)

    def get_config(self):
        return {**super().get_config(), "min_margin": self.min_margin}


@keras.saving.register_keras_serializable(package=PACKAGE)
class HKRLoss(_BatchLoss):
    """Hinge-regularised KR loss: alpha * hinge(min_margin) - KR.

    ``alpha=0`` gives ``KRLoss``; ``alpha=math.inf`` gives ``HingeMarginLoss`` (the limit of
    HKR / alpha). With a 1-Lipschitz binary network, |f(x)| is a certified L2 radius.

    Args:
        alpha: weight of the hinge term (>= 0, may be ``math.inf``); 10 in deel-lip's tutorial.
        min_margin: margin of the hinge term (> 0).

    >>> float(HKRLoss(alpha=10.0, min_margin=1.0)(np.array([1.0, -1.0]), np.array([2.0, -2.0])))
    -4.0
    """

    def __init__(self, alpha=_common.HKR_ALPHA, min_margin=_common.HKR_MIN_MARGIN, name="hkr_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.alpha = _common.check_positive("alpha", alpha, allow_zero=True, allow_inf=True)
        self.min_margin = _common.check_positive("min_margin", min_margin)

    def call(self, y_true, y_pred):
        if math.isinf(self.alpha):
            return hinge_margin(y_true, y_pred, self.min_margin)
        kr = kr_estimate(y_true, y_pred)
        if self.alpha == 0:
            return -kr
        return self.alpha * hinge_margin(y_true, y_pred, self.min_margin) - kr

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "min_margin": self.min_margin}


@keras.saving.register_keras_serializable(package=PACKAGE)
class TauCrossEntropyLoss(keras.losses.Loss):
    """Cross-entropy of tau * logits, divided by tau (labels: class indices or one-hot).

    Lipschitz networks give logits of bounded scale, so plain cross-entropy saturates; tau sets how
    large a margin keeps being rewarded (small tau: wide margins, close to a hinge).
    """

    def __init__(self, tau=1.0, name="tau_cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.tau = _common.check_positive("tau", tau)

    def call(self, y_true, y_pred):
        logits = self.tau * y_pred
        if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == y_pred.shape[-1]:
            ce = tf.nn.softmax_cross_entropy_with_logits(labels=y_true, logits=logits)
        else:
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=_class_indices(y_true, y_pred.shape[-1]),
                                                                logits=logits)
        return ce / self.tau

    def get_config(self):
        return {**super().get_config(), "tau": self.tau}
