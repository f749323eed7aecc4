"""The margin specification: logit[y] - logit[j] for every j != y, folded into the last affine layer
(rows W_y - W_j), which is tighter than subtracting independent logit bounds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..ir.graph import Network, Node


@dataclass(frozen=True)
class MarginHead:
    """A network split into a body and its final dense layer (``head`` is None when the network
    does not end in one; margins then come from differences of logit bounds)."""

    body: Network
    head: Node | None

    @property
    def num_classes(self) -> int:
        if self.head is not None:
            return int(self.head.params["weight"].shape[0])
        return int(self.body.shapes()[self.body.output_name][0])


def split_margin_head(net: Network) -> MarginHead:
    """Split off the final dense layer when it is the output and nothing else reads its input."""
    last = net.nodes[-1] if net.nodes else None
    if (last is None or last.name != net.output_name or last.op != "dense"
            or (last.inputs[0] != net.input_name and net.consumers(last.inputs[0]) != [last])):
        return MarginHead(net, None)
    return MarginHead(net.prefix(last.inputs[0]), last)


def margin_weights(xp, head: Node, y: Any) -> tuple[Any, Any]:
    """Per-sample folded weights (N, K, d) = W[y] - W and biases (N, K) = b[y] - b."""
    weight = head.params["weight"]
    bias = head.params.get("bias")
    w = weight[y][:, None, :] - weight[None, :, :]
    b = None if bias is None else bias[y][:, None] - bias[None, :]
    return w, b


def mask_true_class(xp, values: Any, y: Any) -> Any:
    """Set column y of each row to +inf (the margin of a class against itself is not a constraint)."""
    values = values.copy()
    values[xp.arange(values.shape[0]), y] = xp.inf
    return values
