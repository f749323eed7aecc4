"""GroupSort: sort consecutive groups of ``group_size`` entries along axis 1, ascending
(group_size 2 is MaxMin up to order). Sorting is 1-Lipschitz in L2 and monotone in every input."""

from __future__ import annotations

from ..registry import MonotoneOp, register


@register("groupsort")
class GroupSort(MonotoneOp):
    """attrs: group_size (divides the size of axis 1)."""

    def _grouped(self, node, x):
        k = int(node.attrs["group_size"])
        return x.reshape((x.shape[0], x.shape[1] // k, k) + x.shape[2:]), k

    def forward(self, xp, node, x):
        grouped, _ = self._grouped(node, x)
        return xp.sort(grouped, axis=2).reshape(x.shape)

    def vjp(self, xp, node, xs, g):
        x = xs[0]
        grouped, _ = self._grouped(node, x)
        order = xp.argsort(grouped, axis=2)
        gg, _ = self._grouped(node, g)
        inverse = xp.argsort(order, axis=2)  # where each input entry went
        return (xp.take_along_axis(gg, inverse, axis=2).reshape(x.shape),)

    def lipschitz(self, node, in_lips, in_shapes):
        return in_lips[0]
