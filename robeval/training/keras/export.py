"""Whole-model utilities: the layer chain of a model, its plain export, its Lipschitz bound, and a
two-logit head that lets robeval's multiclass certifiers read a one-output (binary) network."""

from __future__ import annotations

import keras
import numpy as np

from ...errors import InvalidParameterError
from .. import _common
from .layers import activation_lipschitz

#: Layers that leave values as they are at inference (or only reorder them): Lipschitz constant 1.
PASS_THROUGH = (keras.layers.InputLayer, keras.layers.Flatten, keras.layers.Reshape, keras.layers.Dropout,
                keras.layers.SpatialDropout2D, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
                keras.layers.Identity)


def flat_layers(model) -> list:
    """The layers of a chain model in order: a ``keras.Sequential`` or a functional model without
    branches; nested chains are spliced in and InputLayers left out."""
    if not isinstance(model, keras.Model):
        return [model]
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not isinstance(model, keras.Sequential):
        _check_chain(model, layers)
    out: list = []
    for layer in layers:
        out.extend(flat_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return out


def _check_chain(model, layers) -> None:
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InvalidParameterError(f"model '{model.name}' has {len(model.inputs)} inputs and {len(model.outputs)} "
                                    "outputs; expected a chain of layers with one input and one output")
    prev = model.inputs[0]
    for layer in layers:
        nodes = [n for n in layer._inbound_nodes if n.operation is layer]
        if len(nodes) != 1 or len(nodes[0].input_tensors) != 1 or nodes[0].input_tensors[0] is not prev:
            raise InvalidParameterError(
                f"layer '{layer.name}' of model '{model.name}' does not simply follow the layer before it; "
                "robeval's training utilities need a chain (keras.Sequential, or a functional model without "
                "branches or shared layers)")
        prev = nodes[0].output_tensors[0]


def _copy(layer):
    """A new plain layer with the same config (its weights are set once it is built)."""
    return layer.__class__.from_config(layer.get_config())


def export_model(model) -> keras.Sequential:
    """A plain ``keras.Sequential`` computing what ``model`` (a chain) computes.

    robeval training layers are replaced by their ``export()`` (a Sequential result is spliced in);
    plain layers are copied with their weights.
    """
    if not isinstance(model, keras.Model):
        if hasattr(model, "export"):
            out = model.export()
            return out if isinstance(out, keras.Sequential) else keras.Sequential([out])
        raise InvalidParameterError(f"export_model needs a keras.Model or a layer with export(), got "
                                    f"{type(model).__name__}")
    layers, copies = [], []
    for layer in flat_layers(model):
        if hasattr(layer, "export"):
            new = layer.export()
            layers.extend(flat_layers(new) if isinstance(new, keras.Model) else [new])
        else:
            new = _copy(layer)
            copies.append((new, layer))
            layers.append(new)
    plain = keras.Sequential([keras.Input(tuple(model.inputs[0].shape[1:])), *layers], name=f"{model.name}_plain")
    for new, old in copies:
        new.set_weights(old.get_weights())
    return plain


def _activation_factor(layer) -> float:
    fn = getattr(layer, "activation", None)
    return 1.0 if fn is None else activation_lipschitz(fn, f"layer '{layer.name}'")


def lipschitz_bound(model) -> float:
    """Product of per-layer L2 bounds of a chain model (robeval layers and 1-Lipschitz plain ones).

    Plain ``Dense`` layers count with their float64 spectral norm; any other layer without a
    ``lipschitz_bound()`` raises, naming it.
    """
    if not isinstance(model, keras.Model):
        return float(model.lipschitz_bound())
    bound = 1.0
    for layer in flat_layers(model):
        if hasattr(layer, "lipschitz_bound"):
            bound *= float(layer.lipschitz_bound())
        elif isinstance(layer, keras.layers.Dense):
            bound *= _common.spectral_norm(np.asarray(layer.get_weights()[0], np.float64)) * _activation_factor(layer)
        elif isinstance(layer, keras.layers.Activation):
            bound *= _activation_factor(layer)
        elif isinstance(layer, (keras.layers.ReLU, keras.layers.LeakyReLU)):
            bound *= max(1.0, abs(float(layer.negative_slope)))
        elif not isinstance(layer, PASS_THROUGH):
            raise InvalidParameterError(
                f"layer '{layer.name}' ({type(layer).__name__}) has no lipschitz_bound(); use robeval's Lipschitz "
                "layers (SpectralDense, SpectralConv2D, GroupSort, SandwichLayer, LBDN) or plain Dense layers")
    return bound


def binary_as_two_logits(model) -> keras.Sequential:
    """The plain export of a one-output network f followed by logits (-f/2, f/2).

    Class 1 wins where f > 0, the margin logit_1 - logit_0 is f and the head's row difference has
    norm 1, so robeval's Lipschitz certifier gives exactly the radius |f| / L of the binary network.
    Use labels 1 for f > 0 and 0 otherwise (``(y > 0).astype(int)`` for {-1, +1} labels).
    """
    plain = export_model(model)
    if plain.outputs[0].shape[-1] != 1:
        raise InvalidParameterError(f"binary_as_two_logits needs a model with one output, got "
                                    f"{plain.outputs[0].shape[-1]}")
    head = keras.layers.Dense(2, use_bias=False, name="two_logits")
    plain.add(head)
    head.set_weights([np.array([[-0.5, 0.5]], np.float32)])
    return plain
