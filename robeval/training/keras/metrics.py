"""Keras metrics for robust training: the KR estimate and hinge term of the HKR loss, accuracy for
{-1, +1} (or {0, 1}) labels on one output, and certified accuracy from a Lipschitz bound.

Each is a mean over batches (``keras.metrics.MeanMetricWrapper``), as deel-lip reports them.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from .. import _common
from .layers import PACKAGE
from .losses import hinge_margin, kr_estimate, signed_targets


def correct(y_true, y_pred) -> tf.Tensor:
    """Boolean (N,): binary outputs are right when their sign matches the label's; else argmax."""
    out, sign = signed_targets(y_pred, y_true)
    if out.shape[-1] == 1:
        return (out[:, 0] > 0) == (sign[:, 0] > 0)
    return tf.argmax(out, axis=1) == tf.argmax(sign, axis=1)


def certified_radius(y_true, y_pred, lipschitz: float = 1.0) -> tf.Tensor:
    """Certified L2 radius per sample (0 where wrong) of a network with L2 Lipschitz bound ``lipschitz``.

    One output f: |f| / L (the sign cannot change closer than that). K outputs: the margin
    z_y - max_{j != y} z_j over sqrt(2) L, since each difference z_y - z_j is sqrt(2) L-Lipschitz.
    """
    out, sign = signed_targets(y_pred, y_true)
    if out.shape[-1] == 1:
        margin = sign[:, 0] * out[:, 0]
        scale = lipschitz
    else:
        z_y = tf.reduce_sum(tf.where(sign > 0, out, 0.0), axis=1)
        others = tf.reduce_max(tf.where(sign > 0, tf.constant(-math.inf, out.dtype), out), axis=1)
        margin = z_y - others
        scale = math.sqrt(2.0) * lipschitz
    return tf.maximum(margin / scale, 0.0)


class _Wrapper(keras.metrics.MeanMetricWrapper):
    """A MeanMetricWrapper whose config holds its own parameters (not the function)."""

    _params: tuple[str, ...] = ()

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, **{p: getattr(self, p) for p in self._params}}


@keras.saving.register_keras_serializable(package=PACKAGE)
class KREstimate(_Wrapper):
    """Batch mean of the Kantorovich-Rubinstein estimate E[f | pos] - E[f | neg]."""

    def __init__(self, name="kr", dtype=None):
        super().__init__(fn=kr_estimate, name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class HingeMargin(_Wrapper):
    """Batch mean of the hinge term relu(min_margin - y f)."""

    _params = ("min_margin",)

    def __init__(self, min_margin=_common.HKR_MIN_MARGIN, name="hinge_margin", dtype=None):
        self.min_margin = _common.check_positive("min_margin", min_margin)
        super().__init__(fn=lambda y, p: hinge_margin(y, p, self.min_margin), name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SignAccuracy(_Wrapper):
    """Accuracy for one output with {-1, 1} or {0, 1} labels (sign of the output), argmax for several."""

    def __init__(self, name="accuracy", dtype=None):
        super().__init__(fn=lambda y, p: tf.cast(correct(y, p), "float32"), name=name, dtype=dtype)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CertifiedAccuracy(_Wrapper):
    """Fraction of samples classified correctly with a certified L2 radius above ``radius``.

    Args:
        radius: L2 radius.
        lipschitz: L2 Lipschitz bound of the network (e.g. ``lipschitz_bound(model)``; about 1 for
            a network of spectral layers and GroupSort).
    """

    _params = ("radius", "lipschitz")

    def __init__(self, radius, lipschitz=1.0, name=None, dtype=None):
        self.radius = _common.check_positive("radius", radius, allow_zero=True)
        self.lipschitz = _common.check_positive("lipschitz", lipschitz)
        fn = lambda y, p: tf.cast(certified_radius(y, p, self.lipschitz) > self.radius, "float32")  # noqa: E731
        super().__init__(fn=fn, name=name or f"certified_{self.radius:g}", dtype=dtype)
