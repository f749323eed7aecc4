"""Keras 3 models (TensorFlow backend) behind the robeval adapter interface (see ``base.ModelAdapter``).

Accepted: a ``keras.Model`` object (Sequential or functional), a ``.keras`` file loaded with
``keras.models.load_model(path, safe_mode=True)`` (which refuses Lambda layers' Python bytecode)
and a legacy ``.h5`` file where Keras 3 can read it.

Layout: Keras image models are channels-last. The adapter's interface stays NCHW like the rest of
robeval: ``input_shape`` is NCHW, ``channels_last`` is True, data are transposed to NHWC on the way
into the native model and gradients back (``layout.py``), and the converted Network is NCHW. A
Keras Flatten of an (H, W, C) map orders features h, w, c; the conversion inserts a transpose
before the flatten and then folds it into the next Dense layer's columns (``layout.fold_flatten``).

Conversion walks Sequential layers in order and functional graphs node by node (by depth), with
the ``LAYERS`` table keyed by layer class; ``activation=`` of Dense/Conv2D becomes its own node."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy
import tensorflow as tf

from ..errors import InputShapeError, InvalidParameterError, ModelLoadError, RobevalError, UnsupportedOpError
from ..ir.graph import Network, Node
from . import layout
from .classifier import class_count, with_binary_head
from .gradients import LOSSES

FRAMEWORK = "Keras"
BATCH_SIZE = 1024


class KerasModel:
    """A Keras 3 model with an NCHW interface.

    Args:
        model: a keras.Model (built, or buildable with ``input_shape``).
        input_shape: per-sample NCHW shape; needed only for an unbuilt model.
        batch_size: samples per native call.

    >>> # adapter = KerasModel(keras.models.load_model("m.keras"))
    >>> # adapter.input_shape, adapter.channels_last   -> (1, 28, 28), True
    """

    framework = FRAMEWORK

    def __init__(self, model: Any, input_shape: tuple[int, ...] | None = None, batch_size: int = BATCH_SIZE,
                 source: str | None = None):
        base = getattr(model, "base_model", None)  # robeval's training wrappers: certify the wrapped model
        if isinstance(base, keras.Model) and type(model).__module__.startswith("robeval.training.keras"):
            model = base
        if not isinstance(model, keras.Model):
            raise ModelLoadError(f"KerasModel needs a keras.Model, not {type(model).__module__}.{type(model).__name__}")
        if not model.built or not getattr(model, "inputs", None):
            if input_shape is None:
                raise InvalidParameterError("this Keras model is not built, so its input size is unknown; pass "
                                            "input_shape=(C, H, W) (NCHW, per sample) or start it with keras.Input")
            model.build((None,) + _keras_shape(tuple(input_shape)))
        keras_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        self.model = model
        self.keras_shape = keras_shape
        self.channels_last = len(keras_shape) in (2, 3) and not _any_channels_first(model)
        self.input_shape = _nchw_shape(keras_shape, self.channels_last)
        if input_shape is not None and tuple(input_shape) != self.input_shape:
            raise InputShapeError(f"input_shape={tuple(input_shape)} but the model takes {keras_shape} per "
                                  f"sample, which is {self.input_shape} in NCHW; pass input_shape="
                                  f"{self.input_shape} or omit it")
        self.source = source or type(model).__name__
        self.num_classes = class_count(tuple(model.outputs[0].shape[1:]), self.source)
        self.binary = self.num_classes == 1  # a single logit z: presented as the scores [0, z]
        if self.binary:
            last = _last_layer(model)
            if _activation_name(getattr(last, "activation", None)) == "sigmoid":
                raise ModelLoadError(f"{self.source} has one output with a sigmoid activation ('{last.name}'); "
                                     "robeval needs the logit of a binary classifier: use activation=None on the "
                                     "last layer (class 1 when the logit > 0)")
            self.num_classes = 2
        self.outputs_probabilities = _ends_in_softmax(model)
        self.batch_size = int(batch_size)
        self.dtype = numpy.dtype(model.inputs[0].dtype)
        self._network: Network | None = None

    @classmethod
    def from_file(cls, path: str | Path, input_shape: tuple[int, ...] | None = None, **options) -> KerasModel:
        """Load a .keras (zip) or legacy .h5 file with ``safe_mode=True``; the content decides the format."""
        from .base import sniff_format

        path = Path(path)
        fmt = sniff_format(path)
        _register_training_layers()
        suffix = {"keras": ".keras", "h5": ".h5"}.get(fmt)
        if suffix is None:
            raise ModelLoadError(f"{path} is a {fmt} file, not a Keras model (.keras or .h5)")
        try:
            if path.suffix.lower() in ((suffix, ".hdf5") if fmt == "h5" else (suffix,)):
                model = keras.models.load_model(path, safe_mode=True, compile=False)
            else:  # Keras goes by the extension: give it a link with the right one
                with tempfile.TemporaryDirectory() as tmp:
                    link = Path(tmp) / f"model{suffix}"
                    try:
                        os.symlink(path.resolve(), link)
                    except OSError:
                        shutil.copyfile(path, link)
                    model = keras.models.load_model(link, safe_mode=True, compile=False)
        except Exception as exc:
            raise ModelLoadError(f"Keras cannot load {path} ({type(exc).__name__}: {str(exc)[:300]}); a model with "
                                 "Lambda layers is refused by safe_mode (they hold Python code): rebuild it without "
                                 "them, or pass a keras.Model object you built yourself") from exc
        if not isinstance(model, keras.Model):
            raise ModelLoadError(f"{path} holds a {type(model).__name__}, not a keras.Model")
        return cls(model, input_shape=input_shape, source=f"{fmt}:{path.name}", **options)

    # -- native runtime
    def _to_keras(self, x) -> numpy.ndarray:
        x = layout.check_batch(x, self.input_shape).astype(self.dtype, copy=False)
        if len(self.keras_shape) == 2:
            return x.reshape((len(x),) + self.keras_shape)
        return layout.to_nhwc(x) if self.channels_last else x

    # Eager calls on purpose: in graph mode (tf.function, and so model.predict) TF 2.21's grappler
    # fuses Conv2D+BiasAdd+Add+LeakyReLU into a oneDNN kernel that ignores the slope (uses 0.2),
    # so graph-mode outputs are not the model's function. Eager mode runs each layer as written.
    def _forward(self, x):
        out = self.model(x, training=False)
        if self.binary:
            out = tf.reshape(out, (-1, 1))
            return tf.concat([tf.zeros_like(out), out], axis=1)
        return out

    def _logits_and_gradient(self, x, y, loss: str):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = self._forward(x)
            logits = tf.math.log(tf.maximum(out, 1e-30)) if self.outputs_probabilities else out
            total = tf.reduce_sum(tf_loss(logits, y, loss))
        return logits, tape.gradient(total, x)

    def predict(self, x) -> numpy.ndarray:
        """The model's output (logits, or probabilities when ``outputs_probabilities``) for NCHW inputs."""
        xk = self._to_keras(x)
        outs = [self._forward(tf.constant(xk[i:i + self.batch_size])).numpy()
                for i in range(0, len(xk), self.batch_size)]
        return _out(numpy.concatenate(outs)) if outs else numpy.zeros((0, self.num_classes), numpy.float32)

    def input_gradient(self, x, y, loss: str = "ce") -> numpy.ndarray:
        """dL/dx by tf.GradientTape, NCHW; each row the gradient of that sample's own loss on the logits."""
        return self.logits_and_gradient(x, y, loss)[1]

    def logits_and_gradient(self, x, y, loss: str = "ce") -> tuple[numpy.ndarray, numpy.ndarray]:
        """(logits, dL/dx) from one forward and one backward pass; log-probabilities for a softmax output."""
        if loss not in LOSSES:
            raise InvalidParameterError(f"loss={loss!r} is not known; expected one of {LOSSES}")
        xk = self._to_keras(x)
        y = numpy.asarray(y, dtype=numpy.int64)
        parts = [self._logits_and_gradient(tf.constant(xk[i:i + self.batch_size]),
                                           tf.constant(y[i:i + self.batch_size]), loss)
                 for i in range(0, len(xk), self.batch_size)]
        if not parts:
            return (numpy.zeros((0, self.num_classes), numpy.float32),
                    numpy.zeros((0,) + self.input_shape, numpy.float32))
        logits = _out(numpy.concatenate([z.numpy() for z, _ in parts]))
        g = _out(numpy.concatenate([g.numpy() for _, g in parts]))
        if len(self.keras_shape) == 2:
            return logits, g.reshape((len(g),) + self.input_shape)
        return logits, (layout.to_nchw(g) if self.channels_last else g)

    # -- conversion
    def to_network(self) -> Network:
        """The robeval Network (NCHW) computing what the model computes (cached)."""
        if self._network is None:
            cv = _Converter(self.dtype, self.channels_last)
            x = _V("input", self.keras_shape)
            if len(self.keras_shape) == 2:  # (H, W) grayscale: the network takes (1, H, W)
                x = _V(cv.add("reshape", [x], "input_hw", attrs={"shape": self.keras_shape}), self.keras_shape)
            (out,) = cv.model(self.model, [x], "")
            if cv.problems:
                raise UnsupportedOpError(cv.problems, FRAMEWORK)
            net = Network(cv.nodes, self.input_shape, output_name=out.name,
                          meta={"framework": FRAMEWORK, "source": self.source, "channels_last": self.channels_last})
            net = layout.fold_flatten(net)
            self._network = with_binary_head(net, self.source) if self.binary else net
        return self._network


def _out(a: numpy.ndarray) -> numpy.ndarray:
    """float32 results (float64 for a float64 model)."""
    return a if a.dtype == numpy.float64 else a.astype(numpy.float32)


def tf_loss(logits, y, loss: str):
    """Per-sample cross-entropy or margin max_{j != y} z_j - z_y, as in ``gradients.py``."""
    if loss == "ce":
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
    mask = tf.one_hot(y, tf.shape(logits)[1]) > 0
    others = tf.where(mask, tf.constant(-math.inf, logits.dtype), logits)
    return tf.reduce_max(others, axis=1) - tf.gather(logits, y, batch_dims=1)


def _keras_shape(nchw: tuple[int, ...]) -> tuple[int, ...]:
    return layout.nhwc_shape(nchw) if keras.config.image_data_format() == "channels_last" else nchw


def _nchw_shape(keras_shape, channels_last) -> tuple[int, ...]:
    if len(keras_shape) == 2:
        return (1,) + keras_shape
    return layout.nchw_shape(keras_shape) if channels_last else keras_shape


def _layers(model) -> list:
    out = []
    for layer in model.layers:
        out += [layer] + (_layers(layer) if isinstance(layer, keras.Model) else [])
    return out


def _any_channels_first(model) -> bool:
    return any(getattr(layer, "data_format", None) == "channels_first" for layer in _layers(model))


def _last_layer(model):
    if isinstance(model, keras.Sequential):
        layer = model.layers[-1]
    else:
        layer = model.outputs[0]._keras_history[0]
    return _last_layer(layer) if isinstance(layer, keras.Model) else layer


def _ends_in_softmax(model) -> bool:
    layer = _last_layer(model)
    return isinstance(layer, keras.layers.Softmax) or _activation_name(getattr(layer, "activation", None)) == "softmax"


def _activation_name(fn) -> str | None:
    if fn is None:
        return None
    if isinstance(fn, str):
        return fn
    return getattr(fn, "__name__", type(fn).__name__)


def _np(v) -> numpy.ndarray:
    return numpy.asarray(keras.ops.convert_to_numpy(v), dtype=numpy.float64)


# ---------------------------------------------------------------------------------------------- converting
UNCONVERTED = "<unconverted>"  # stands for a layer's output that could not be converted


@dataclass
class _V:
    """A value of the network: the node computing it and its per-sample shape as Keras sees it."""

    name: str
    shape: tuple[int, ...]


class _Converter:
    """Collects nodes and problems; knows whether Keras images are channels-last (ours are NCHW)."""

    def __init__(self, dtype, channels_last: bool):
        self.nodes: list[Node] = []
        self.problems: list[tuple[str, str]] = []
        self.dtype = numpy.dtype(dtype)
        self.channels_last = channels_last
        self._used = {"input"}

    def add(self, op, inputs, name, params=None, attrs=None) -> str:
        name = "".join(ch if ch.isalnum() or ch in "._" else "_" for ch in name) or op
        base, k = name, 1
        while name in self._used:
            name, k = f"{base}_{k}", k + 1
        self._used.add(name)
        params = {key: numpy.asarray(v, dtype=numpy.float64).astype(self.dtype)
                  for key, v in (params or {}).items() if v is not None}
        self.nodes.append(Node(name, op, tuple(v.name if isinstance(v, _V) else v for v in inputs), params,
                               dict(attrs or {})))
        return name

    def problem(self, what: str, where: str) -> None:
        self.problems.append((what, where))

    def is_image(self, shape) -> bool:
        """Whether a Keras tensor of this per-sample shape is an (H, W, C) map held as (C, H, W)."""
        return self.channels_last and len(shape) == 3

    def const(self, values, shape) -> numpy.ndarray:
        """A constant broadcast against a Keras tensor of per-sample ``shape``, in our layout."""
        v = numpy.asarray(values, dtype=numpy.float64)
        if v.size == 1:
            return v.reshape(())
        if v.ndim == len(shape) + 1:
            v = v[0]
        v = numpy.broadcast_to(v, shape)
        return v.transpose(2, 0, 1) if self.is_image(shape) else v

    # -- graph walks
    def model(self, model, ins: list[_V], path: str) -> list[_V]:
        if isinstance(model, keras.Sequential):
            x = ins[0]
            for layer in model.layers:
                out_shape = tuple(layer.compute_output_shape((None,) + x.shape)[1:])
                x = self.layer(layer, [x], out_shape, path)
            return [x]
        env = {id(t): v for t, v in zip(model.inputs, ins)}
        for depth in sorted(model._nodes_by_depth, reverse=True):  # Keras: depth 0 is the output
            for node in model._nodes_by_depth[depth]:
                if node.is_input:
                    continue
                args = [env[id(t)] for t in node.input_tensors]
                outs = node.outputs
                if isinstance(node.operation, keras.Model):
                    values = self.model(node.operation, args, _join(path, node.operation.name))
                else:
                    values = [self.layer(node.operation, args, tuple(outs[0].shape[1:]), path)]
                for t, v in zip(outs, values):
                    env[id(t)] = v
        return [env[id(t)] for t in model.outputs]

    def layer(self, layer, ins: list[_V], out_shape, path: str) -> _V:
        """Convert one layer; after a problem the walk goes on (with a stand-in value) so that every
        problem of the model is found in one pass."""
        where = _join(path, layer.name)
        ctx = _Ctx(where, f"{where} ({type(layer).__name__})", out_shape)
        if isinstance(layer, keras.Model):
            return self.model(layer, ins, where)[0]
        if hasattr(layer, "group_size"):
            return _V(self.add("groupsort", ins, where, attrs={"group_size": int(layer.group_size)}), out_shape)
        if callable(getattr(layer, "export", None)):
            exported = layer.export()
            if isinstance(exported, keras.Model):
                return self.model(exported, ins, where)[0]
            return self.layer(exported, ins, out_shape, path)
        fn = LAYERS.get(type(layer))
        if fn is None:
            self.problem(type(layer).__name__, where)
            return _V(UNCONVERTED, out_shape)
        if not self.channels_last and getattr(layer, "data_format", None) == "channels_last" and \
                any(len(v.shape) == 3 for v in ins):
            self.problem(f"{type(layer).__name__} in channels_last inside a channels_first model", where)
            return _V(UNCONVERTED, out_shape)
        name = fn(self, layer, ins, ctx)
        if name is None:
            return _V(UNCONVERTED, out_shape)
        return _V(name, out_shape) if isinstance(name, str) else name

    def activation(self, fn, x: str, ctx, shape) -> str | None:
        """The node(s) for ``activation=`` (or an Activation layer) after ``x``."""
        name = _activation_name(fn)
        where = f"{ctx.name}_{name}"
        if name in (None, "linear"):
            return x
        if name in ACTIVATIONS:
            return self.add(ACTIVATIONS[name], [x], where)
        if name == "leaky_relu":
            return self.add("leaky_relu", [x], where, attrs={"alpha": 0.2})
        if name == "relu6":
            return self.add("clip", [x], where, attrs={"low": 0.0, "high": 6.0})
        if name in ("softmax", "log_softmax"):  # over the last Keras axis
            axis = layout.nchw_axis(-1, len(shape) + 1) if self.is_image(shape) else len(shape)
            return self.add(name, [x], where, attrs={"axis": axis})
        self.problem(f"activation '{name}'", ctx.where)
        return None


@dataclass
class _Ctx:
    name: str
    where: str
    out_shape: tuple[int, ...]


def _join(path, name):
    return f"{path}/{name}" if path else name


ACTIVATIONS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def _same_pads(hw, kernel, strides, dilation=(1, 1)) -> tuple[int, int, int, int]:
    """TensorFlow's 'same' padding: the output has ceil(n / s) entries, any odd pixel goes bottom/right."""
    pads = []
    for n, k, s, d in zip(hw, kernel, strides, dilation):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return (pads[0][0], pads[1][0], pads[0][1], pads[1][1])


def _spatial(cv, shape) -> tuple[int, int]:
    return tuple(shape[:2]) if cv.channels_last else tuple(shape[1:])


def _pads(cv, layer, shape, kernel, dilation=(1, 1)):
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        return _same_pads(_spatial(cv, shape), kernel, layer.strides, dilation)
    return None


# -- layer converters: (converter, layer, inputs, ctx) -> node name, _V, or None (reported)
def _dense(cv, layer, ins, ctx):
    (x,) = ins
    if len(x.shape) != 1:
        return cv.problem(f"Dense on a tensor of rank {len(x.shape)} (flatten first)", ctx.where)
    y = cv.add("dense", [x], ctx.name, {"weight": _np(layer.kernel).T,
                                        "bias": _np(layer.bias) if layer.use_bias else None})
    return cv.activation(layer.activation, y, ctx, ctx.out_shape)


def _conv(cv, layer, ins, ctx, depthwise=False):
    (x,) = ins
    if depthwise:
        k = _np(layer.kernel)  # (kh, kw, Cin, mult)
        kh, kw, cin, mult = k.shape
        weight, groups = k.transpose(2, 3, 0, 1).reshape(cin * mult, 1, kh, kw), cin
    else:
        weight, groups = _np(layer.kernel).transpose(3, 2, 0, 1), int(layer.groups)  # (kh, kw, Cin/g, Cout)
    pads = _pads(cv, layer, x.shape, weight.shape[2:], layer.dilation_rate)
    if pads is None:
        return cv.problem(f"padding='{layer.padding}'", ctx.where)
    y = cv.add("conv", [x], ctx.name, {"weight": weight, "bias": _np(layer.bias) if layer.use_bias else None},
               {"stride": tuple(layer.strides), "padding": pads, "dilation": tuple(layer.dilation_rate),
                "groups": groups})
    return cv.activation(layer.activation, y, ctx, ctx.out_shape)


def _batchnorm(cv, layer, ins, ctx):
    (x,) = ins
    rank = len(x.shape) + 1
    channel_axis = rank - 1 if (cv.channels_last or rank == 2) else 1
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if [a % rank for a in axes] != [channel_axis]:
        return cv.problem(f"BatchNormalization over axis {layer.axis} (only the channel axis)", ctx.where)
    mean, var = _np(layer.moving_mean), _np(layer.moving_variance)
    stats = {"gamma": _np(layer.gamma) if layer.scale else numpy.ones_like(mean),
             "beta": _np(layer.beta) if layer.center else numpy.zeros_like(mean), "mean": mean, "var": var}
    shape = (-1,) + (1,) * (rank - 2)
    return cv.add("batchnorm", [x], ctx.name, {k: v.reshape(shape) for k, v in stats.items()},
                  {"eps": float(layer.epsilon)})


def _pool(cv, layer, ins, ctx):
    (x,) = ins
    kernel = tuple(layer.pool_size)
    pads = _pads(cv, layer, x.shape, kernel)
    if pads is None:
        return cv.problem(f"padding='{layer.padding}'", ctx.where)
    attrs = {"kernel": kernel, "stride": tuple(layer.strides), "padding": pads}
    if isinstance(layer, keras.layers.AveragePooling2D):
        attrs["count_include_pad"] = False  # TF averages over the pixels inside the image only
        return cv.add("avgpool", [x], ctx.name, attrs=attrs)
    return cv.add("maxpool", [x], ctx.name, attrs=attrs)


def _global_pool(cv, layer, ins, ctx):
    (x,) = ins
    if isinstance(layer, keras.layers.GlobalAveragePooling2D):
        y = cv.add("global_avgpool", [x], ctx.name)
    else:
        y = cv.add("maxpool", [x], ctx.name, attrs={"kernel": _spatial(cv, x.shape), "stride": (1, 1)})
    return y if layer.keepdims else cv.add("flatten", [y], ctx.name + "_flat")


def _flatten(cv, layer, ins, ctx):
    (x,) = ins
    if len(x.shape) <= 1:
        return x
    name = x.name
    if cv.is_image(x.shape):  # order the features h, w, c as Keras does (folded into the next Dense later)
        name = cv.add("transpose", [x], ctx.name + "_nhwc", attrs={"perm": layout.TO_NHWC})
    return cv.add("flatten", [name], ctx.name)


def _reshape(cv, layer, ins, ctx):
    (x,) = ins
    name = x.name
    if cv.is_image(x.shape):
        name = cv.add("transpose", [x], ctx.name + "_nhwc", attrs={"perm": layout.TO_NHWC})
    name = cv.add("reshape", [name], ctx.name, attrs={"shape": tuple(ctx.out_shape)})
    if cv.is_image(ctx.out_shape):
        name = cv.add("transpose", [name], ctx.name + "_nchw", attrs={"perm": layout.TO_NCHW})
    return name


def _relu(cv, layer, ins, ctx):
    (x,) = ins
    slope, top, threshold = float(layer.negative_slope), layer.max_value, float(layer.threshold)
    if threshold != 0 or (slope != 0 and top is not None):
        return cv.problem(f"ReLU(negative_slope={slope}, max_value={top}, threshold={threshold})", ctx.where)
    if top is not None:
        return cv.add("clip", [x], ctx.name, attrs={"low": 0.0, "high": float(top)})
    if slope != 0:
        return cv.add("leaky_relu", [x], ctx.name, attrs={"alpha": slope})
    return cv.add("relu", [x], ctx.name)


def _prelu(cv, layer, ins, ctx):
    """PReLU's learned slopes (shape: the per-sample input shape, 1 on shared axes) moved to NCHW."""
    (x,) = ins
    alpha = _np(layer.alpha)
    if cv.is_image(x.shape) and cv.channels_last and alpha.ndim == 3:
        alpha = alpha.transpose(2, 0, 1)
    elif alpha.ndim != len(x.shape):
        return cv.problem(f"PReLU with slopes of shape {alpha.shape} on input of shape {x.shape}", ctx.where)
    return cv.add("prelu", [x], ctx.name, {"slope": alpha})


def _softmax(cv, layer, ins, ctx):
    (x,) = ins
    rank = len(x.shape) + 1
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if len(axes) != 1:
        return cv.problem(f"Softmax over axes {layer.axis}", ctx.where)
    axis = layout.nchw_axis(axes[0], rank) if cv.is_image(x.shape) else axes[0] % rank
    return cv.add("softmax", [x], ctx.name, attrs={"axis": axis})


def _rescaling(cv, layer, ins, ctx):
    (x,) = ins
    return cv.add("scale", [x], ctx.name, {"scale": cv.const(layer.scale, x.shape),
                                           "shift": cv.const(layer.offset, x.shape)})


def _normalization(cv, layer, ins, ctx):
    (x,) = ins
    if layer.invert:
        return cv.problem("Normalization(invert=True)", ctx.where)
    # Keras computes (x - mean) / max(sqrt(variance), epsilon): the same two steps with the stored
    # constants, the division by std folded with its rounding bounded (the scale op's ``divisor``)
    std = numpy.maximum(numpy.sqrt(_np(layer.variance)), keras.config.epsilon())
    mean = _np(layer.mean)
    centred = cv.add("scale", [x], ctx.name + "_centre", {"scale": cv.const(numpy.ones_like(mean), x.shape),
                                                          "shift": cv.const(-mean, x.shape)})
    return cv.add("scale", [centred], ctx.name, {"divisor": cv.const(std, x.shape),
                                                 "shift": cv.const(numpy.zeros_like(mean), x.shape)})


def _merge(op):
    def convert(cv, layer, ins, ctx):
        if any(v.shape != ins[0].shape for v in ins):
            return cv.problem(f"{type(layer).__name__} of tensors of shapes {[v.shape for v in ins]}", ctx.where)
        name = ins[0].name
        for i, v in enumerate(ins[1:]):
            name = cv.add(op, [name, v], ctx.name if i == len(ins) - 2 else f"{ctx.name}_{i}")
        if isinstance(layer, keras.layers.Average):
            name = cv.add("scale", [name], ctx.name + "_mean", {"scale": numpy.array(1.0 / len(ins)),
                                                                "shift": numpy.array(0.0)})
        return name

    return convert


def _concatenate(cv, layer, ins, ctx):
    rank = len(ins[0].shape) + 1
    axis = layout.nchw_axis(layer.axis, rank) if cv.is_image(ins[0].shape) else layer.axis % rank
    if axis == 0:
        return cv.problem("Concatenate along the batch axis", ctx.where)
    return cv.add("concat", ins, ctx.name, attrs={"axis": axis})


def _alias(cv, layer, ins, ctx):
    return ins[0]


L = keras.layers
#: Layer class -> converter(converter, layer, inputs, context) -> output (None: reported).
LAYERS = {
    L.InputLayer: _alias,
    L.Dense: _dense,
    L.Conv2D: _conv,
    L.DepthwiseConv2D: lambda cv, layer, ins, ctx: _conv(cv, layer, ins, ctx, depthwise=True),
    L.BatchNormalization: _batchnorm,
    L.MaxPooling2D: _pool,
    L.AveragePooling2D: _pool,
    L.GlobalAveragePooling2D: _global_pool,
    L.GlobalMaxPooling2D: _global_pool,
    L.Flatten: _flatten,
    L.Reshape: _reshape,
    L.Activation: lambda cv, layer, ins, ctx: cv.activation(layer.activation, ins[0].name, ctx, ctx.out_shape),
    L.ReLU: _relu,
    L.LeakyReLU: lambda cv, layer, ins, ctx: cv.add("leaky_relu", ins, ctx.name,
                                                    attrs={"alpha": float(layer.negative_slope)}),
    L.PReLU: _prelu,
    L.Softmax: _softmax,
    L.Rescaling: _rescaling,
    L.Normalization: _normalization,
    L.Add: _merge("add"),
    L.Subtract: _merge("sub"),
    L.Average: _merge("add"),
    L.Maximum: _merge("max"),
    L.Minimum: _merge("min"),
    L.Concatenate: _concatenate,
    **{cls: _alias for cls in (L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.GaussianNoise,
                               L.GaussianDropout, L.AlphaDropout, L.ActivityRegularization, L.Identity)},
}


def _register_training_layers() -> None:
    """Import robeval's Keras training layers so that files containing them deserialise (they are
    registered Keras serializables); harmless when that plugin cannot load on this Keras backend."""
    try:
        import robeval.training.keras  # noqa: F401
    except (ImportError, RobevalError):
        pass
