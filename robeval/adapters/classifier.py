"""What robeval evaluates: classifiers returning one vector of class scores per sample.

A model with one output logit z is a binary classifier (class 1 when z > 0). Every adapter presents
it as the two scores [0, z]: the predicted class is then the argmax as for any classifier, the
margin of class 1 is z and that of class 0 is -z, and a Lipschitz bound L of z gives the radius
|z| / L. The network gets the same two scores from an appended exact dense layer (weights 0 and 1),
so certificates, attacks, sweeps, audits and the gate all see one kind of model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy

from ..errors import InputShapeError, ModelLoadError
from ..ir.graph import Network, Node

#: Name of the dense node that turns a single logit z into the scores [0, z].
BINARY_HEAD = "binary_scores"


def class_count(out_shape: Sequence[int], source: str = "the model") -> int:
    """K for a per-sample output shape (K,); a clear one-line error for anything else."""
    shape = tuple(int(d) for d in out_shape)
    if len(shape) != 1 or shape[0] < 1:
        raise InputShapeError(
            f"{source} returns an output of shape {shape} per sample; robeval evaluates classifiers that "
            "return one vector of class scores (logits) per sample, shape (K,): give a model that ends in its "
            "classification layer (e.g. Flatten + Dense), not a per-pixel or sequence output")
    return shape[0]


def binary_scores(z: numpy.ndarray) -> numpy.ndarray:
    """(N, 1) logits -> (N, 2) scores [0, z]."""
    return numpy.concatenate([numpy.zeros_like(z), z], axis=1)


def with_binary_head(net: Network, source: str = "the model") -> Network:
    """The network followed by the exact dense layer z -> [0, z]; refuses a single squashed output
    (a sigmoid probability is not a logit: export the model without its final sigmoid)."""
    last = net.node(net.output_name) if net.nodes else None
    if last is not None and last.op in ("sigmoid", "softmax", "log_softmax"):
        raise ModelLoadError(
            f"{source} has one output that ends in a {last.op} ('{last.name}'); robeval needs the logit of a "
            "binary classifier: export the model without its final sigmoid (class 1 when the logit > 0)")
    weight = numpy.array([[0.0], [1.0]], dtype=net.dtype)
    name = BINARY_HEAD
    while any(n.name == name for n in net.nodes):
        name += "_"
    nodes = list(net.nodes) + [Node(name, "dense", (net.output_name,), {"weight": net.xp.asarray(weight)})]
    return Network(nodes, net.input_shape, net.input_name, name, dict(net.meta, binary=True))


def classifier_network(net: Network, source: str = "the model") -> tuple[Network, int, bool]:
    """(network with class scores, number of classes, whether it was a single-logit binary model)."""
    k = class_count(net.shapes()[net.output_name], source)
    if k == 1 and not net.meta.get("binary"):
        return with_binary_head(net, source), 2, True
    return net, k, bool(net.meta.get("binary"))
