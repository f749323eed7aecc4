"""Small random networks built directly in the representation, for certifier tests."""

from __future__ import annotations

import numpy

from robeval.ir import Network, Node


def random_mlp(rng, sizes=(12, 16, 16, 5), act="relu", input_shape=None):
    """Flatten -> (dense -> act)* -> dense on inputs of shape input_shape (default (1, sizes[0]))."""
    input_shape = input_shape or (1, sizes[0])
    nodes = [Node("flat", "flatten", ("input",))]
    prev = "flat"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = rng.normal(size=(b, a)) / numpy.sqrt(a)
        nodes.append(Node(f"fc{i}", "dense", (prev,), {"weight": w, "bias": rng.normal(size=b) * 0.1}))
        prev = f"fc{i}"
        if i < len(sizes) - 2:
            attrs = {"alpha": 0.1} if act == "leaky_relu" else {}
            # PReLU: one learned slope per feature, of either sign (negative ones: |x|-like)
            params = {"slope": rng.uniform(-2.0, 2.0, size=b)} if act == "prelu" else {}
            nodes.append(Node(f"act{i}", act, (prev,), params, attrs))
            prev = f"act{i}"
    return Network(nodes, input_shape)


def random_cnn(rng, channels=(1, 3, 4), hw=8, classes=4, pool="maxpool"):
    """conv(3x3, pad 1) -> relu -> pool(2) -> conv(3x3, stride 1) -> relu -> flatten -> dense."""
    c0, c1, c2 = channels
    nodes = [
        Node("c1", "conv", ("input",),
             {"weight": rng.normal(size=(c1, c0, 3, 3)) / 3, "bias": rng.normal(size=c1) * .1},
             {"stride": (1, 1), "padding": (1, 1, 1, 1)}),
        Node("r1", "relu", ("c1",)),
        Node("p1", pool, ("r1",), attrs={"kernel": (2, 2), "stride": (2, 2)}),
        Node("c2", "conv", ("p1",), {"weight": rng.normal(size=(c2, c1, 3, 3)) / 3, "bias": rng.normal(size=c2) * .1},
             {"stride": (1, 1), "padding": (0, 0, 0, 0)}),
        Node("r2", "relu", ("c2",)),
        Node("f", "flatten", ("r2",)),
    ]
    d = c2 * (hw // 2 - 2) ** 2
    nodes.append(Node("fc", "dense", ("f",), {"weight": rng.normal(size=(classes, d)) / numpy.sqrt(d),
                                             "bias": rng.normal(size=classes) * .1}))
    return Network(nodes, (c0, hw, hw))
