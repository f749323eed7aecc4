"""Interval bound propagation (IBP) for certified training in Keras (Gowal et al. 2018; Shi et al.
2021); the twin of ``robeval.training.torch.ibp`` with the same bounds and losses.

Boxes travel as (centre, radius) through the layers of a chain model (``keras.Sequential`` or a
functional model without branches), in TensorFlow, so gradients flow through the bounds. The last
Dense is folded into the margin specification: for label y the rows W_y - W_j give z_y - z_j
directly. Images are NHWC. Dropout-like layers are identities and BatchNormalization uses its
moving statistics (its inference map), also while training.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from ...errors import InputShapeError, InvalidParameterError
from .. import _common
from .._common import EpsilonSchedule, KappaSchedule
from ._shared import MONOTONE_ACTIVATIONS, check_clip
from .export import PASS_THROUGH, flat_layers
from .layers import PACKAGE, GroupSort, SpectralConv2D, SpectralDense
from .model import RobustModel, cross_entropy, sparse_labels
from .sandwich import LBDN, SandwichDense, SandwichLayer

Box = tuple[tf.Tensor, tf.Tensor]  # (centre, radius)
L = keras.layers


def _activation(fn, c, r, layer) -> Box:
    name = keras.activations.serialize(fn) if fn is not None else "linear"
    if name == "linear":
        return c, r
    if name not in MONOTONE_ACTIVATIONS:
        raise InvalidParameterError(f"layer '{layer.name}': activation '{name}' is not monotone, so IBP has no rule "
                                    f"for it; use one of {sorted(MONOTONE_ACTIVATIONS)}")
    lo, hi = fn(c - r), fn(c + r)
    return (hi + lo) / 2, (hi - lo) / 2


def _affine(kernel, bias, c, r) -> Box:
    """x @ kernel + bias on a box; kernel (in, out)."""
    centre = tf.matmul(c, kernel)
    return (centre + bias if bias is not None else centre), tf.matmul(r, tf.abs(kernel))


def _dense(layer, c, r) -> Box:
    return _activation(layer.activation, *_affine(layer.kernel, layer.bias if layer.use_bias else None, c, r), layer)


def _spectral_dense(layer, c, r) -> Box:
    return _activation(layer.activation, *_affine(layer.constrained_kernel(), layer.bias, c, r), layer)


def _conv_with(kernel, layer, c, r, dilation=(1, 1)) -> Box:
    kw = dict(strides=tuple(layer.strides), padding=layer.padding.upper(), dilations=tuple(dilation))
    centre = tf.nn.conv2d(c, kernel, **kw)
    if getattr(layer, "bias", None) is not None:
        centre = centre + layer.bias
    return _activation(layer.activation, centre, tf.nn.conv2d(r, tf.abs(kernel), **kw), layer)


def _conv(layer, c, r) -> Box:
    if layer.groups != 1 or layer.data_format != "channels_last" or layer.padding not in ("valid", "same"):
        raise InvalidParameterError(f"layer '{layer.name}': IBP supports channels_last Conv2D with groups=1 and "
                                    f"'valid'/'same' padding (got groups={layer.groups}, {layer.data_format}, "
                                    f"padding={layer.padding!r})")
    return _conv_with(layer.kernel, layer, c, r, layer.dilation_rate)


def _spectral_conv(layer, c, r) -> Box:
    return _conv_with(layer.constrained_kernel(), layer, c, r)


def _batchnorm(layer, c, r) -> Box:
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if [a % len(c.shape) for a in axes] != [len(c.shape) - 1]:
        raise InvalidParameterError(f"layer '{layer.name}': BatchNormalization over axis {layer.axis}; IBP supports "
                                    "the last (channel) axis only")
    scale = tf.math.rsqrt(layer.moving_variance + layer.epsilon)
    if layer.scale:
        scale = scale * layer.gamma
    shift = -layer.moving_mean * scale + (layer.beta if layer.center else 0.0)
    return c * scale + shift, r * tf.abs(scale)


def _rescaling(layer, c, r) -> Box:
    scale = tf.cast(layer.scale, c.dtype)
    return c * scale + tf.cast(layer.offset, c.dtype), r * tf.abs(scale)


def _linear_nonneg(layer, c, r) -> Box:
    """Linear maps with non-negative weights (average pooling): apply to centre and radius."""
    return layer(c), layer(r)


def _reshape(layer, c, r) -> Box:
    return layer(c), layer(r)


def _monotone(layer, c, r) -> Box:
    """Elementwise non-decreasing maps (ReLU, max pooling, sorted groups): bounds map to bounds."""
    lo, hi = layer(c - r), layer(c + r)
    return (hi + lo) / 2, (hi - lo) / 2


def _leaky(layer, c, r) -> Box:
    if float(layer.negative_slope) < 0:
        raise InvalidParameterError(f"layer '{layer.name}': negative slope {layer.negative_slope} is not monotone")
    return _monotone(layer, c, r)


def _activation_layer(layer, c, r) -> Box:
    return _activation(layer.activation, c, r, layer)


def _identity(layer, c, r) -> Box:
    return c, r


def _sandwich(layer, c, r) -> Box:
    w1, w2 = layer.matrices()
    c, r = _affine(tf.transpose(w1), layer.bias, c, r)
    lo, hi = tf.nn.relu(c - r), tf.nn.relu(c + r)
    return _affine(tf.transpose(w2), None, (hi + lo) / 2, (hi - lo) / 2)


def _sandwich_dense(layer, c, r) -> Box:
    return _affine(tf.transpose(layer.matrix()), layer.bias, c, r)


def _lbdn(layer, c, r) -> Box:
    c, r = (tf.reshape(t, (tf.shape(t)[0], layer.in_features)) for t in (c, r))
    for sub in layer.sandwiches:
        c, r = _sandwich(sub, c, r)
    return _sandwich_dense(layer.output_layer, c, r)


#: Layer class -> rule(layer, centre, radius) -> (centre, radius); looked up along the class's MRO.
RULES: dict[type, Callable[..., Box]] = {
    L.Dense: _dense,
    SpectralDense: _spectral_dense,
    L.Conv2D: _conv,
    SpectralConv2D: _spectral_conv,
    L.BatchNormalization: _batchnorm,
    L.Rescaling: _rescaling,
    L.AveragePooling2D: _linear_nonneg,
    L.GlobalAveragePooling2D: _linear_nonneg,
    L.Flatten: _reshape,
    L.Reshape: _reshape,
    L.ReLU: _monotone,
    L.LeakyReLU: _leaky,
    L.MaxPooling2D: _monotone,
    L.GlobalMaxPooling2D: _monotone,
    L.Activation: _activation_layer,
    GroupSort: _monotone,
    SandwichLayer: _sandwich,
    SandwichDense: _sandwich_dense,
    LBDN: _lbdn,
    **{cls: _identity for cls in PASS_THROUGH if cls not in (L.Flatten, L.Reshape)},
}


def _rule(layer):
    for cls in type(layer).__mro__:
        if cls in RULES:
            return RULES[cls]
    raise InvalidParameterError(f"layer '{layer.name}' ({type(layer).__name__}) has no IBP rule; supported: "
                                + ", ".join(sorted(c.__name__ for c in RULES)))


def _checked_layers(model) -> list:
    layers = flat_layers(model)
    for layer in layers:
        _rule(layer)  # report an unsupported layer before any work
    return layers


def input_box(x, eps, clip: tuple[float, float] | None = (0.0, 1.0)) -> Box:
    """Centre and radius of the L-inf ball of radius eps around x, intersected with ``clip``."""
    if isinstance(eps, (int, float)):
        _common.check_positive("eps", eps, allow_zero=True)
    x = tf.convert_to_tensor(x)
    eps = tf.cast(eps, x.dtype)
    lo, hi = x - eps, x + eps
    if clip is not None:
        lo, hi = tf.clip_by_value(lo, *clip), tf.clip_by_value(hi, *clip)
    return (hi + lo) / 2, (hi - lo) / 2


def propagate(layers: list, centre, radius) -> Box:
    """Push a box (centre, radius) through ``layers`` in order."""
    for layer in layers:
        try:
            centre, radius = _rule(layer)(layer, centre, radius)
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            if isinstance(e, InvalidParameterError):
                raise
            raise InputShapeError(f"layer '{layer.name}' ({type(layer).__name__}) on input shape "
                                  f"{tuple(centre.shape)}: {e}") from e
    return centre, radius


def interval_bounds(model, x, eps, clip: tuple[float, float] | None = (0.0, 1.0)) -> tuple[tf.Tensor, tf.Tensor]:
    """(lower, upper) bounds of ``model``'s outputs on the L-inf ball of radius eps around x (clipped)."""
    c, r = propagate(_checked_layers(model), *input_box(x, eps, check_clip(clip)))
    return c - r, c + r


def _last_affine(layer) -> tuple[tf.Tensor, tf.Tensor | None]:
    """(W (K, H), b (K,) or None) of the final affine layer."""
    if isinstance(layer, SpectralDense):
        kernel, bias = layer.constrained_kernel(), layer.bias
    elif isinstance(layer, SandwichDense):
        return layer.matrix(), layer.bias
    else:
        kernel, bias = layer.kernel, (layer.bias if layer.use_bias else None)
    return tf.transpose(kernel), bias


def _split_last_dense(model) -> tuple[list, object]:
    layers = _checked_layers(model)
    while layers and isinstance(layers[-1], PASS_THROUGH) and not isinstance(layers[-1], (L.Flatten, L.Reshape)):
        layers.pop()
    last = layers[-1] if layers else None
    ok = isinstance(last, (L.Dense, SpectralDense, SandwichDense))
    if ok and not isinstance(last, SandwichDense):
        ok = keras.activations.serialize(last.activation) == "linear"
    if not ok:
        raise InvalidParameterError(
            "the margin specification is folded into the last layer, which must be a Dense (or SpectralDense) "
            f"without activation; this model ends with {type(last).__name__ if last else 'nothing'}")
    return layers[:-1], last


def margin_problem(model, x, y) -> tuple[list, tuple, tf.Tensor, tf.Tensor]:
    """(body layers, (W, b) of the last Dense, x as a tensor, y as class indices), shapes checked."""
    body, last = _split_last_dense(model)
    w, b = _last_affine(last)
    y = sparse_labels(y, w.shape[0])
    x = tf.convert_to_tensor(x)
    if y.shape[0] is not None and x.shape[0] is not None and y.shape[0] != x.shape[0]:
        raise InputShapeError(f"labels have shape {tuple(y.shape)}; expected ({x.shape[0]},) class indices")
    return body, (w, b), x, y


def ibp_margin_bounds(model, x, y, eps, clip: tuple[float, float] | None = (0.0, 1.0)) -> tf.Tensor:
    """Lower bounds of z_y - z_j over the eps-box, shape (N, K), +inf at the true class.

    The last Dense is applied to the box as the K rows W_y - W_j (biases b_y - b_j), so margins are
    bounded as affine functions of the penultimate box: a positive entry j certifies that class j
    cannot overtake y. Differentiable with respect to the weights (and eps).
    """
    body, (w, b), x, y = margin_problem(model, x, y)
    k = w.shape[0]
    c, r = propagate(body, *input_box(x, eps, check_clip(clip)))
    n = tf.shape(c)[0]
    c, r = tf.reshape(c, (n, -1)), tf.reshape(r, (n, -1))
    diff = tf.gather(w, y)[:, None, :] - w[None, :, :]  # (N, K, H): rows W_y - W_j
    centre = tf.einsum("nkh,nh->nk", diff, c)
    if b is not None:
        centre = centre + (tf.gather(b, y)[:, None] - b[None, :])
    lower = centre - tf.einsum("nkh,nh->nk", tf.abs(diff), r)
    true = tf.one_hot(y, k) > 0
    return tf.where(true, tf.constant(math.inf, lower.dtype), lower)


def robust_cross_entropy(margin_lower, y) -> tf.Tensor:
    """Cross-entropy of the worst-case logits -margin_lower (0 for the true class).

    It bounds the cross-entropy of every input in the box from above: softmax cross-entropy depends on
    the logits only through z_j - z_y <= -margin_lower_j.
    """
    k = margin_lower.shape[-1]
    y = sparse_labels(y, k)
    worst = tf.where(tf.one_hot(y, k) > 0, tf.zeros_like(margin_lower), -margin_lower)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=worst))


def certified_fraction(margin_lower) -> tf.Tensor:
    """Fraction of rows whose margin lower bounds are all positive."""
    return tf.reduce_mean(tf.cast(tf.reduce_all(margin_lower > 0, axis=1), tf.float32))


def certified_accuracy(model, x, y, eps: float, clip: tuple[float, float] | None = (0.0, 1.0),
                       batch_size: int = 1000, bound: str = "ibp") -> float:
    """Fraction of samples whose margin lower bounds (``bound``: "ibp" or "crown-ibp") are all positive."""
    x, y = np.asarray(x), np.asarray(y)
    beta = 1.0 if _common.check_bound(bound) == "crown-ibp" else 0.0
    hits = 0
    for i in range(0, len(x), batch_size):
        lb = margin_lower(model, x[i:i + batch_size], y[i:i + batch_size], eps, clip, bound, beta)
        hits += int(tf.reduce_sum(tf.cast(tf.reduce_all(lb > 0, axis=1), tf.int32)))
    return hits / max(len(x), 1)


def margin_lower(model, x, y, eps, clip=(0.0, 1.0), bound: str = "ibp", beta=1.0) -> tf.Tensor:
    """The margin lower bounds trained on: IBP, or beta * CROWN-IBP + (1 - beta) * IBP."""
    if _common.check_bound(bound) == "ibp":
        return ibp_margin_bounds(model, x, y, eps, clip)
    from .crown_ibp import mixed_margin_bounds

    return mixed_margin_bounds(model, x, y, eps, beta, clip)


def ibp_loss(model, x, y, eps, kappa=0.5, clip: tuple[float, float] | None = (0.0, 1.0),
             training=False, bound: str = "ibp", beta=1.0) -> tf.Tensor:
    """kappa * CE(model(x)) + (1 - kappa) * robust CE at radius eps (the clean CE alone when the
    robust term cannot count: eps == 0 or kappa == 1, given as Python numbers). ``bound`` and
    ``beta`` as in ``margin_lower``."""
    clean = cross_entropy(y, model(x, training=training))
    if isinstance(eps, (int, float)) and isinstance(kappa, (int, float)) and (eps == 0 or kappa == 1):
        return clean
    robust = robust_cross_entropy(margin_lower(model, x, y, eps, clip, bound, beta), y)
    return kappa * clean + (1 - kappa) * robust


class IBPLoss:
    """kappa(t) * CE(clean) + (1 - kappa(t)) * robust CE at eps(t), t in epochs (for custom loops).

    The same object as ``robeval.training.torch.IBPLoss``: ``loss(model, x, y, t)``, with
    ``bound="ibp"`` or ``"crown-ibp"`` and the CROWN-IBP weight ``beta`` (fixed or a schedule).
    """

    def __init__(self, eps: float | EpsilonSchedule, kappa: float | KappaSchedule = 0.5,
                 clip: tuple[float, float] | None = (0.0, 1.0), bound: str = "ibp",
                 beta: float | KappaSchedule = 1.0):
        self.eps = eps if callable(eps) else EpsilonSchedule(target=_common.check_positive("eps", eps, True))
        self.kappa = _common.weight_schedule("kappa", kappa)
        self.clip = check_clip(clip)
        self.bound = _common.check_bound(bound)
        self.beta = _common.weight_schedule("beta", beta)

    def __call__(self, model, x, y, t: float = math.inf, training=False) -> tf.Tensor:
        return ibp_loss(model, x, y, float(self.eps(t)), float(self.kappa(t)), self.clip, training,
                        self.bound, float(self.beta(t)))


def ibp_init(model, seed: int | None = None):
    """IBP initialisation (Shi et al. 2021): kernels ~ N(0, 2 pi / fan_in^2), the last layer kept.

    Every plain ``Dense`` and ``Conv2D`` of a chain model except the last one is re-drawn (biases
    unchanged), as ``robeval.training.torch.ibp_init_`` does; see ``_common.ibp_init_std``. Returns
    ``model``.
    """
    affine = [layer for layer in flat_layers(model) if isinstance(layer, (L.Dense, L.Conv2D))]
    rng = np.random.default_rng(seed)
    for layer in affine[:-1]:
        shape = tuple(layer.kernel.shape)
        fan_in = int(np.prod(shape[:-1]))  # Dense (in, out); Conv2D (kh, kw, in, out)
        layer.kernel.assign(rng.normal(0.0, _common.ibp_init_std(fan_in), shape).astype(layer.kernel.dtype))
    return model


def _check_kappa(kappa, name: str = "kappa") -> float:
    if not 0 <= kappa <= 1:
        raise InvalidParameterError(f"{name}={kappa!r}; expected a weight in [0, 1]")
    return float(kappa)


@keras.saving.register_keras_serializable(package=PACKAGE)
class IBPTraining(RobustModel):
    """Wraps ``base_model``; trains on kappa * loss(clean) + (1 - kappa) * robust CE at radius eps.

    The clean loss is the one given to ``compile`` (cross-entropy on logits if none). ``eps`` and
    ``kappa`` live in ``eps_variable`` and ``kappa_variable``; ramp them with ``EpsilonScheduler``.
    Reports ``robust_loss`` and ``certified_accuracy`` (IBP, at the current eps) in training and
    evaluation. While eps is 0 the bounds are not computed (the robust term equals the clean CE).

    Args:
        base_model: a chain model ending in a Dense layer without activation (logits).
        eps: initial L-inf radius.
        kappa: initial weight of the clean loss (0.5 in Gowal et al.'s end state).
        clip: input domain the box is clipped to.
        bound: ``"ibp"``, or ``"crown-ibp"`` to train on beta * CROWN-IBP + (1 - beta) * IBP bounds
            (ReLU networks; beta in ``beta_variable``, ramped by ``EpsilonScheduler(..., beta=...)``).
        beta: initial weight of CROWN-IBP.

    >>> # model = IBPTraining(base, eps=0.0, kappa=1.0)
    >>> # model.compile("adam", metrics=["accuracy"])
    >>> # model.fit(x, y, epochs=20, callbacks=[EpsilonScheduler(EpsilonSchedule(0.1, 2, 10),
    >>> #                                                        KappaSchedule(1.0, 0.5, 2, 10))])
    """

    def __init__(self, base_model, eps=0.0, kappa=0.5, clip=(0.0, 1.0), bound="ibp", beta=1.0, name="ibp_training",
                 **kwargs):
        super().__init__(base_model, name=name, **kwargs)
        self.clip = check_clip(clip)
        self.bound = _common.check_bound(bound)
        self.beta_variable = keras.Variable(_check_kappa(beta, "beta"), trainable=False, name="beta", dtype="float32")
        self.eps_variable = keras.Variable(_common.check_positive("eps", eps, True), trainable=False, name="eps",
                                           dtype="float32")
        self.kappa_variable = keras.Variable(_check_kappa(kappa), trainable=False, name="kappa", dtype="float32")
        self.robust_loss_tracker = keras.metrics.Mean(name="robust_loss")
        self.certified_tracker = keras.metrics.Mean(name="certified_accuracy")

    def objective(self, x, y, sample_weight=None, training=True):
        x = tf.convert_to_tensor(x)
        y_pred = self(x, training=training)
        clean = self.labeled_loss(y, y_pred, sample_weight)

        def bounds():
            lower = margin_lower(self.base_model, x, y, self.eps_variable, self.clip, self.bound, self.beta_variable)
            return robust_cross_entropy(lower, y), certified_fraction(lower)

        def exact():  # eps = 0: the margins are the clean ones
            labels = sparse_labels(y, y_pred.shape[-1])
            hits = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(y_pred, 1, output_type=tf.int32), labels), tf.float32))
            return cross_entropy(y, y_pred), hits

        robust, certified = tf.cond(self.eps_variable > 0, bounds, exact)
        self.robust_loss_tracker.update_state(robust)
        self.certified_tracker.update_state(certified)
        kappa = self.kappa_variable
        return y_pred, kappa * clean + (1 - kappa) * robust + self.regularization_loss()

    def get_config(self):
        return {**super().get_config(), "eps": float(self.eps_variable.numpy()),
                "kappa": float(self.kappa_variable.numpy()), "clip": None if self.clip is None else list(self.clip),
                "bound": self.bound, "beta": float(self.beta_variable.numpy())}
