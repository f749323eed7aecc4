"""The framework-neutral network: a small DAG of typed nodes with weights as arrays (NCHW layout,
batch axis first), walked in topological order by every certifier with the op registry's rules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy

from ..backend import Array, asnumpy, get_xp, to_device, xp_for_device
from ..errors import DataRangeError, InputShapeError, NetworkError, RobevalError
from .registry import OPS, RULES, get_op

#: Ops that certifiers strip from the end of a network: margins are taken on logits.
OUTPUT_SQUASHERS = ("softmax", "log_softmax")


@dataclass
class Node:
    """One operation: ``op`` names a registered op, ``inputs`` names earlier nodes or the network
    input, ``params`` holds weight arrays and ``attrs`` plain settings (ints, tuples, floats)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    params: dict[str, Array] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes) -> Node:
        data = {"name": self.name, "op": self.op, "inputs": self.inputs, "params": self.params, "attrs": self.attrs}
        data.update(changes)
        return Node(**data)


class Network:
    """A DAG of nodes in topological order with one input and one output.

    Args:
        nodes: nodes in an order where every input is defined before use.
        input_shape: per-sample input shape, e.g. (1, 28, 28) (NCHW, no batch axis).
        input_name: name the first nodes use for the network input.
        output_name: the node whose value is the network output (defaults to the last node).
        meta: free-form facts (source framework, stripped layers, domain, ...).
    """

    def __init__(self, nodes: Sequence[Node], input_shape: Sequence[int], input_name: str = "input",
                 output_name: str | None = None, meta: dict | None = None,
                 shapes: dict[str, tuple[int, ...]] | None = None):
        self.nodes = list(nodes)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_name = input_name
        self.output_name = output_name or (self.nodes[-1].name if self.nodes else input_name)
        self.meta = dict(meta or {})
        self._check_structure()
        # ``shapes`` lets a sub-network of an annotated network skip the annotating forward pass
        self._shapes = self._annotate_shapes() if shapes is None else dict(shapes)

    # ------------------------------------------------------------------ structure
    def _check_structure(self) -> None:
        defined = {self.input_name}
        for i, node in enumerate(self.nodes):
            if node.op not in OPS:
                raise NetworkError(f"node {i} '{node.name}' uses op '{node.op}', which is not registered; "
                                   f"known ops: {', '.join(sorted(OPS))}")
            missing = [name for name in node.inputs if name not in defined]
            if missing:
                raise NetworkError(f"node {i} '{node.name}' ({node.op}) reads {missing} before they are defined; "
                                   "nodes must be in topological order")
            if node.name in defined:
                raise NetworkError(f"node name '{node.name}' is used twice")
            defined.add(node.name)
        if self.output_name not in defined:
            raise NetworkError(f"output '{self.output_name}' is not a node of this network")

    def _annotate_shapes(self) -> dict[str, tuple[int, ...]]:
        """Run one zero sample through the network and record each node's input shapes in its attrs
        (``in_shape``, ``in_shapes``), which transposed rules need without the input values."""
        xp = self.xp
        x = xp.zeros((1,) + self.input_shape, dtype=self.dtype)
        values = self.forward(x, keep=True)
        shapes = {name: tuple(int(d) for d in v.shape[1:]) for name, v in values.items()}
        for node in self.nodes:
            node.attrs["in_shapes"] = tuple(shapes[n] for n in node.inputs)
            node.attrs["in_shape"] = shapes[node.inputs[0]] if node.inputs else ()
        return shapes

    @property
    def xp(self):
        """The array module holding this network's weights (numpy unless moved with ``to``)."""
        arrays = [a for n in self.nodes for a in n.params.values()]
        return get_xp(*arrays)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node '{name}'")

    def consumers(self, name: str) -> list[Node]:
        return [n for n in self.nodes if name in n.inputs]

    def map_params(self, fn: Callable[[Array], Array]) -> Network:
        """A copy with ``fn`` applied to every weight array."""
        nodes = [n.replace(params={k: fn(v) for k, v in n.params.items()}) for n in self.nodes]
        return Network(nodes, self.input_shape, self.input_name, self.output_name, self.meta)

    def to(self, device: str = "cpu", dtype: Any = None) -> Network:
        """A copy with weights on ``device`` ('cpu' or 'cuda') and, if given, cast to ``dtype``."""
        xp = xp_for_device(device)

        def move(a):
            a = to_device(a, xp)
            return a.astype(dtype) if dtype is not None else a

        return self.map_params(move)

    def astype(self, dtype: Any) -> Network:
        return self.map_params(lambda a: a.astype(dtype))

    @property
    def dtype(self):
        for n in self.nodes:
            for a in n.params.values():
                return a.dtype
        return numpy.dtype(numpy.float32)

    def strip_output_squashers(self) -> tuple[Network, list[str]]:
        """The network without a trailing Softmax/LogSoftmax (and identities around it), plus what was removed."""
        by_name = {n.name: n for n in self.nodes}
        chain: list[Node] = []  # output-side chain of single-input pass-through / squasher nodes
        out = self.output_name
        while out in by_name and by_name[out].op in OUTPUT_SQUASHERS + ("identity",):
            node = by_name[out]
            readers = [n for n in self.nodes if out in n.inputs]
            if len(node.inputs) != 1 or any(r not in chain for r in readers):
                break
            chain.append(node)
            out = node.inputs[0]
        cut = max((i for i, n in enumerate(chain) if n.op in OUTPUT_SQUASHERS), default=None)
        if cut is None:
            return self, []
        removed = {n.name for n in chain[: cut + 1]}
        stripped = [f"{n.op} '{n.name}'" for n in reversed(chain[: cut + 1]) if n.op != "identity"]
        new_out = chain[cut].inputs[0]
        nodes = [n for n in self.nodes if n.name not in removed]
        meta = dict(self.meta, stripped=stripped)
        shapes = {k: v for k, v in self._shapes.items() if k not in removed}
        return Network(nodes, self.input_shape, self.input_name, new_out, meta, shapes), stripped

    def prefix(self, output_name: str) -> Network:
        """The sub-network that ends at node ``output_name`` (nodes after it dropped)."""
        names = [n.name for n in self.nodes]
        end = names.index(output_name) + 1 if output_name != self.input_name else 0
        keep = {self.input_name, *names[:end]}
        shapes = {k: v for k, v in self._shapes.items() if k in keep}
        return Network(self.nodes[:end], self.input_shape, self.input_name, output_name, self.meta, shapes)

    # ------------------------------------------------------------------ walking
    def check_input(self, x: Array) -> Array:
        """Validate a batch against the input shape; NaN/inf are refused."""
        shape = tuple(x.shape)
        if shape[1:] != self.input_shape:
            hint = ""
            if shape == self.input_shape:
                hint = "; add a batch axis: x[None]"
            elif len(shape) == 4 and len(self.input_shape) == 3 and shape[1:] == (
                    self.input_shape[1], self.input_shape[2], self.input_shape[0]):
                hint = "; the data look channels-last (NHWC): transpose to NCHW with x.transpose(0, 3, 1, 2)"
            elif len(shape) == len(self.input_shape) and shape[1:] == self.input_shape[1:]:
                hint = "; add a channel axis: x[:, None]"
            raise InputShapeError(f"input has shape {shape}; expected (N, {', '.join(map(str, self.input_shape))})"
                                  + hint)
        xp = get_xp(x)
        if not bool(xp.all(xp.isfinite(x))):
            bad = int((~xp.isfinite(x)).sum())
            raise DataRangeError(f"input contains {bad} NaN or infinite value(s); clean the data first")
        return x

    def walk(self, rule: Callable[[Any, Node, list], Any], inputs: Any, keep: bool = False) -> Any:
        """Apply ``rule(op, node, input_values)`` node by node from the network input value ``inputs``.

        Returns the output value, or a dict of every node's value when ``keep`` is set. Errors carry
        the failing node's index, name and op."""
        values = {self.input_name: inputs}
        remaining = self._use_counts() if not keep else None
        for i, node in enumerate(self.nodes):
            args = [values[name] for name in node.inputs]
            try:
                values[node.name] = rule(get_op(node.op), node, args)
            except RobevalError:
                raise  # already names the node or the value at fault
            except Exception as exc:
                shapes = [getattr(a, "shape", None) or [getattr(b, "shape", None) for b in a] for a in args]
                raise NetworkError(f"node {i} '{node.name}' ({node.op}) on input shape(s) {shapes}: "
                                   f"{type(exc).__name__}: {exc}") from exc
            if remaining is not None:
                for name in node.inputs:
                    remaining[name] -= 1
                    if remaining[name] == 0 and name != self.output_name:
                        del values[name]
        return values if keep else values[self.output_name]

    def _use_counts(self) -> dict[str, int]:
        counts = {self.input_name: 0}
        for node in self.nodes:
            counts[node.name] = 0
            for name in node.inputs:
                counts[name] += 1
        counts[self.output_name] += 1
        return counts

    def forward(self, x: Array, keep: bool = False) -> Array:
        """The network output for a batch x of shape (N, *input_shape)."""
        xp = get_xp(x)
        return self.walk(lambda op, node, a: op.forward(xp, node, *a), x, keep=keep)

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def vjp(self, x: Array, g: Array) -> Array:
        """Input cotangent g^T J(x) for an output cotangent g (batched, same leading axis as x)."""
        xp = get_xp(x)
        values = self.forward(x, keep=True)
        grads: dict[str, Any] = {self.output_name: g}
        for node in reversed(self.nodes):
            if node.name not in grads:
                continue
            gout = grads.pop(node.name)
            op = get_op(node.op)
            ins = [values[n] for n in node.inputs]
            try:
                gins = op.vjp(xp, node, ins, gout)
            except RobevalError:
                raise  # already names the node
            except Exception as exc:
                raise NetworkError(f"vjp of node '{node.name}' ({node.op}): {type(exc).__name__}: {exc}") from exc
            for name, gi in zip(node.inputs, gins):
                if gi is None:
                    continue
                grads[name] = gi if name not in grads else grads[name] + gi
        if self.input_name not in grads:
            return xp.zeros_like(x)
        return grads[self.input_name]

    def interval(self, lo: Array, hi: Array, keep: bool = False):
        """Interval bound propagation: sound elementwise (lo, hi) of the output for inputs in [lo, hi]."""
        xp = get_xp(lo, hi)
        return self.walk(lambda op, node, a: op.interval(xp, node, *a), (lo, hi), keep=keep)

    # ------------------------------------------------------------------ facts
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every node's output (the network input included)."""
        return dict(self._shapes)

    def param_count(self) -> int:
        return int(sum(int(numpy.prod(a.shape)) for n in self.nodes for a in n.params.values()))

    def unsupported(self, rule: str) -> list[tuple[str, str]]:
        """(op, node name) pairs whose op lacks ``rule``."""
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
        return [(n.op, n.name) for n in self.nodes if not get_op(n.op).supports(rule)]

    def lipschitz_bounds(self) -> dict[str, float]:
        """Upper bound of each node's L2 Lipschitz constant w.r.t. the network input."""
        shapes = self.shapes()
        lips = {self.input_name: 1.0}
        for node in self.nodes:
            op = get_op(node.op)
            lips[node.name] = float(op.lipschitz(node, [lips[n] for n in node.inputs],
                                                 [shapes[n] for n in node.inputs]))
        return lips

    def lipschitz_bound(self) -> float:
        """Upper bound of the global L2 Lipschitz constant of the output (logits, softmax stripped)."""
        net, _ = self.strip_output_squashers()
        return net.lipschitz_bounds()[net.output_name]

    def activation_size(self) -> int:
        """Floats per sample over all node outputs (used to choose batch sizes)."""
        return int(sum(math.prod(s) for s in self.shapes().values()))

    def summary(self) -> list[dict[str, Any]]:
        """One row per node: name, op, inputs, output shape, parameter count, attributes."""
        shapes = self.shapes()
        rows = []
        for n in self.nodes:
            rows.append({"name": n.name, "op": n.op, "inputs": list(n.inputs), "shape": shapes[n.name],
                         "params": int(sum(int(numpy.prod(a.shape)) for a in n.params.values())),
                         "attrs": {k: v for k, v in n.attrs.items()}})
        return rows

    def __repr__(self) -> str:
        ops = ", ".join(n.op for n in self.nodes)
        return f"Network(input_shape={self.input_shape}, {len(self.nodes)} nodes: {ops})"


def as_numpy_network(net: Network) -> Network:
    """The same network with NumPy weights (for reports and Lipschitz computations)."""
    return net.map_params(asnumpy)
