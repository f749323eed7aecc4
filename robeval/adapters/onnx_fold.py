"""Constant and shape folding for the ONNX importer, and graph clean-ups after conversion.

Exporters compute shapes inside the graph (Shape -> Gather -> Unsqueeze -> Concat -> Reshape is how
torch.onnx and tf2onnx write a Flatten). Such subgraphs depend only on the input's *shape*, and that
shape is known except for the batch size. We fold them by evaluating every constant-only node twice,
in two "worlds" where the batch size is ``BATCH_WORLDS[0]`` and ``BATCH_WORLDS[1]``: a value equal in
both worlds is a true constant; a value that differs depends on the batch size (a Reshape target
``[N, 784]``, say), and the converter that consumes it decides what that means by checking both
worlds (a Reshape is accepted when it maps batch N to batch N in each). Two concrete worlds are more
robust than a symbolic marker: every op, including ones we never thought about (Range, Where,
Equal, ...), is run by ``onnx.reference`` on ordinary integers, and no sentinel can leak into
arithmetic and come out as a plausible size.

After conversion, ``simplify`` removes dead nodes and pass-throughs and merges a constant Add into
the bias of the dense/conv node before it (Keras' MatMul + Add).
"""

from __future__ import annotations

import math

import numpy

from ..ir import Node

#: Batch sizes of the two folding worlds (distinct, and unlike the sizes a model computes with).
BATCH_WORLDS = (2, 3)

#: Ops whose output differs from run to run: never folded.
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                        "Bernoulli", "Multinomial"})

Worlds = tuple  # (value in world 0, value in world 1), numpy arrays


class FoldError(Exception):
    """A constant-only node that onnx.reference could not evaluate."""


def fold_node(node, inputs: list[Worlds | None], opset: int) -> list[Worlds]:
    """Evaluate one ONNX node whose inputs are all constants, in both batch worlds.

    ``inputs`` holds one pair per entry of ``node.input`` (None for an absent optional input).
    Returns one pair per output; when the inputs agree in both worlds it is computed once."""
    from onnx.reference import ReferenceEvaluator

    try:
        evaluator = ReferenceEvaluator(node, opsets={"": opset})
    except Exception as exc:
        raise FoldError(f"{type(exc).__name__}: {exc}") from exc

    def run(world: int) -> list:
        feeds = {name: pair[world] for name, pair in zip(node.input, inputs) if name and pair is not None}
        try:
            return [numpy.asarray(v) for v in evaluator.run(None, feeds)]
        except Exception as exc:
            raise FoldError(f"{type(exc).__name__}: {exc}") from exc

    first = run(0)
    same = all(p is None or p[0] is p[1] or _equal(p[0], p[1]) for p in inputs)
    second = first if same else run(1)
    return [(a, a) if same else (a, b) for a, b in zip(first, second)]


def fold_shape(op_type: str, per_sample: tuple[int, ...], attrs: dict) -> Worlds:
    """Shape or Size of an input-dependent tensor, whose batch size is the world's."""
    values = []
    for batch in BATCH_WORLDS:
        full = numpy.array((batch,) + tuple(per_sample), dtype=numpy.int64)
        if op_type == "Size":
            values.append(numpy.array(math.prod(full.tolist()), dtype=numpy.int64))
        else:  # Shape-15 takes start/end, clamped like Python slices
            values.append(full[attrs.get("start", 0): attrs.get("end", len(full))])
    return tuple(values)


def _equal(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(numpy.array_equal(a, b))


def same_in_worlds(pair: Worlds) -> bool:
    """Whether a folded value does not depend on the batch size."""
    return pair[0] is pair[1] or _equal(pair[0], pair[1])


def batch_constant(pair: Worlds):
    """A constant that depends on the batch size only by repeating one row over the batch axis
    (``ConstantOfShape([N, 10])`` and the like): that row with a batch axis of 1; else None."""
    a, b = pair
    if a.ndim == 0 or a.shape[0] != BATCH_WORLDS[0] or b.shape[0] != BATCH_WORLDS[1]:
        return None
    if a.shape[1:] != b.shape[1:] or not (a == a[:1]).all() or not (b == b[:1]).all():
        return None
    return a[:1] if _equal(a[:1], b[:1]) else None


def reshape_target(in_shape: tuple[int, ...], target, allowzero: bool = False) -> tuple[int, ...]:
    """ONNX Reshape's output shape: 0 copies the input dimension (unless allowzero), -1 is inferred."""
    out = [int(t) for t in numpy.asarray(target).reshape(-1)]
    for i, t in enumerate(out):
        if t == 0 and not allowzero:
            if i >= len(in_shape):
                raise ValueError(f"target {out} copies dimension {i} (0), but the input has rank {len(in_shape)}")
            out[i] = in_shape[i]
    total = math.prod(in_shape)
    if out.count(-1) > 1:
        raise ValueError(f"target {out} has more than one -1")
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0 or total % known:
            raise ValueError(f"cannot infer -1 in {out} for an input of shape {in_shape}")
        out[out.index(-1)] = total // known
    if math.prod(out) != total or any(d < 0 for d in out):
        raise ValueError(f"cannot reshape {in_shape} ({total} entries) to {out}")
    return tuple(out)


# ---------------------------------------------------------------------------------- clean-ups
def prune(nodes: list[Node], output: str) -> list[Node]:
    """Drop nodes the output does not depend on (unused branches, Dropout masks...)."""
    needed = {output}
    keep = []
    for node in reversed(nodes):
        if node.name in needed:
            keep.append(node)
            needed.update(node.inputs)
    return keep[::-1]


def takes_nhwc(nodes: list[Node], input_name: str, in_shape: tuple[int, ...]) -> bool:
    """Whether the input is an (H, W, C) image that every use first turns into (C, H, W): a transpose
    (0, 3, 1, 2), or for one channel the equivalent reshape (what tf2onnx writes for Keras models)."""
    if len(in_shape) != 3:
        return False
    h, w, c = in_shape

    def to_nchw(node: Node) -> bool:
        if node.op == "transpose":
            return tuple(node.attrs["perm"]) == (0, 3, 1, 2)
        return node.op == "reshape" and c == 1 and tuple(node.attrs["shape"]) == (1, h, w)

    users = [n for n in nodes if input_name in n.inputs]
    return bool(users) and all(n.inputs == (input_name,) and to_nchw(n) for n in users)


def take_nchw(nodes: list[Node], input_name: str, in_shape, name: str, shapes: dict):
    """Make the network take (C, H, W): a transpose to the model's (H, W, C) comes first (and then
    cancels against the model's own transpose in ``cancel_shuffles``). Returns nodes and input shape."""
    h, w, c = in_shape
    first = Node(name, "transpose", (input_name,), attrs={"perm": (0, 2, 3, 1)})
    rest = [n.replace(inputs=tuple(name if i == input_name else i for i in n.inputs)) for n in nodes]
    shapes[name], shapes[input_name] = tuple(in_shape), (c, h, w)
    return [first] + rest, (c, h, w)


_SHUFFLES = ("reshape", "transpose", "flatten", "identity")


def cancel_shuffles(nodes: list[Node], input_name: str, output: str, shapes: dict) -> list[Node]:
    """Replace two consecutive reshuffles (reshape/transpose/flatten) that undo each other by an identity."""
    from ..ir import get_op

    users: dict[str, int] = {}
    for node in nodes:
        for name in node.inputs:
            users[name] = users.get(name, 0) + 1
    by_name = {n.name: n for n in nodes}
    removed: set[str] = set()
    out = []
    for node in nodes:
        first = by_name.get(node.inputs[0]) if node.op in _SHUFFLES and len(node.inputs) == 1 else None
        if first is not None and first.op in _SHUFFLES and users[first.name] == 1 and first.name != output:
            src = first.inputs[0]
            probe = numpy.arange(math.prod(shapes[src]), dtype=numpy.float64).reshape((1,) + tuple(shapes[src]))
            y = get_op(node.op).forward(numpy, node, get_op(first.op).forward(numpy, first, probe))
            if y.shape == probe.shape and numpy.array_equal(y, probe):
                removed.add(first.name)
                node = by_name[node.name] = Node(node.name, "identity", (src,))
            elif node.op in ("reshape", "flatten") and first.op in ("reshape", "flatten", "identity"):
                removed.add(first.name)  # a reshape of a reshape: one reshape of the original
                node = by_name[node.name] = Node(node.name, "reshape", (src,), attrs={"shape": y.shape[1:]})
        out.append(node)
    return [n for n in out if n.name not in removed]


def remove_identities(nodes: list[Node], input_name: str, output: str) -> tuple[list[Node], str]:
    """Rewire around identity nodes (Identity, Dropout, float Cast); returns nodes and output name."""
    alias: dict[str, str] = {}
    kept = []
    for node in nodes:
        node = node.replace(inputs=tuple(alias.get(i, i) for i in node.inputs))
        if node.op == "identity" and len(node.inputs) == 1:
            alias[node.name] = node.inputs[0]
            continue
        kept.append(node)
    output = alias.get(output, output)
    if output == input_name:  # an identity-only model keeps one node
        kept.append(Node(output + "::identity", "identity", (input_name,)))
        output = kept[-1].name
    return kept, output


def merge_bias(nodes: list[Node], output: str) -> list[Node]:
    """dense/conv followed by a constant Add (scale 1, shift b) -> one node with bias + b."""
    users: dict[str, int] = {}
    for node in nodes:
        for name in node.inputs:
            users[name] = users.get(name, 0) + 1
    by_name = {n.name: n for n in nodes}
    out = []
    drop = set()
    for node in nodes:
        src = by_name.get(node.inputs[0]) if node.op == "scale" else None
        if src is not None and src.op in ("dense", "conv") and users.get(src.name) == 1 and src.name != output:
            bias = _bias_from_shift(src, node)
            if bias is not None:
                drop.add(src.name)
                node = src.replace(name=node.name, params=dict(src.params, bias=bias))
        out.append(node)
    return [n for n in out if n.name not in drop]


def _bias_from_shift(src: Node, scale: Node):
    """The shift as a (Cout,) bias when it is constant per output feature/channel, else None."""
    if "scale" not in scale.params or not numpy.all(numpy.asarray(scale.params["scale"]) == 1):
        return None
    cout = src.params["weight"].shape[0]
    shift = numpy.asarray(scale.params["shift"])
    rank = 1 if src.op == "dense" else 3  # per-sample rank of the output
    if shift.ndim > rank:
        return None
    shift = shift.reshape((1,) * (rank - shift.ndim) + shift.shape)
    if shift.shape[0] not in (1, cout) or any(d != 1 for d in shift.shape[1:]):
        return None
    flat = numpy.broadcast_to(shift.reshape(-1), (cout,))
    old = src.params.get("bias")
    dtype = src.params["weight"].dtype
    return (flat if old is None else old + flat).astype(dtype)


# ---------------------------------------------------------------------------------- MaxMin fusion
#: Ops a MaxMin/GroupSort-2 activation is written with by exporters (plus scale by -1).
_PAIR_OPS = frozenset({"max", "min", "maxpool", "reshape", "transpose", "slice", "concat", "flatten", "identity"})


def _in_pair_region(node: Node) -> bool:
    if node.op == "scale":
        return bool("scale" in node.params and numpy.all(numpy.abs(node.params["scale"]) == 1)
                    and numpy.all(node.params["shift"] == 0))
    if node.op == "maxpool":  # only the max of separate pairs (not a 2x2 pooling layer after the activation)
        kernel = tuple(node.attrs["kernel"])
        return math.prod(kernel) == 2 and tuple(node.attrs.get("stride", kernel)) == kernel \
            and not any(node.attrs.get("padding", (0,)))
    return node.op in _PAIR_OPS


def fuse_maxmin(nodes: list[Node], input_name: str, output: str, shapes: dict) -> tuple[list[Node], list[str]]:
    """Replace each region computing a MaxMin (GroupSort with groups of 2) through max/min/maxpool,
    negations and reshuffles by one ``groupsort`` node between two reshuffles (reshape/transpose/
    slice/concat), so the Lipschitz bound is that of a sort (1) instead of the product of its parts.

    A region is a connected set of such nodes with one input tensor and one output tensor. It is
    probed, not pattern-matched: on distinct values the output must be a permutation of pairwise
    maxima and minima, and the rebuilt graph must reproduce the region exactly on random inputs.
    Regions that fail any check are left as they are (still exact, with a looser Lipschitz bound).
    ``shapes`` maps tensor names to per-sample shapes. Returns the nodes and a note per fusion."""
    users: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.inputs:
            users.setdefault(name, []).append(node.name)
    by_name = {n.name: n for n in nodes}
    done: set[str] = set()
    notes = []
    for seed in [n for n in nodes if n.op in ("max", "min", "maxpool")]:
        if seed.name in done or not _in_pair_region(seed):
            continue
        region = _grow(seed, by_name, users)
        done |= region
        if not any(by_name[n].op in ("min", "scale") for n in region):
            continue  # plain max pooling layers: nothing to fuse
        members = [n for n in nodes if n.name in region]
        ins = {i for n in members for i in n.inputs if i not in region}
        outs = [n.name for n in members if n.name == output or any(u not in region for u in users.get(n.name, []))]
        if len(ins) != 1 or len(outs) != 1:
            continue
        (src,), out = ins, outs[0]
        new = _fuse_region(members, src, out, shapes)
        if new is None:
            continue
        at = nodes.index(by_name[out])
        nodes = [n for n in nodes[:at] if n.name not in region] + new + \
            [n for n in nodes[at + 1:] if n.name not in region]
        notes.append(f"MaxMin activation fused into groupsort at '{out}' ({len(members)} nodes)")
    return nodes, notes


def _grow(seed: Node, by_name: dict, users: dict) -> set[str]:
    region, todo = {seed.name}, [seed.name]
    while todo:
        node = by_name[todo.pop()]
        for name in list(node.inputs) + users.get(node.name, []):
            if name in by_name and name not in region and _in_pair_region(by_name[name]):
                region.add(name)
                todo.append(name)
    return region


def _fuse_region(members: list[Node], src: str, out: str, shapes: dict) -> list[Node] | None:
    from ..ir import Network

    try:
        net = Network(members, shapes[src], input_name=src, output_name=out)
    except Exception:
        return None
    in_shape, out_shape = tuple(shapes[src]), tuple(shapes[out])
    d = math.prod(in_shape)
    if math.prod(out_shape) != d or d % 2:
        return None
    rng = numpy.random.default_rng(0)

    def f(t):
        return net.forward(t.reshape((1,) + in_shape)).reshape(-1)

    t = rng.permutation(d).astype(numpy.float64) + 1.0
    inverse = numpy.argsort(t)
    o1, o2 = f(t), -f(-t)  # under -t every max picks the pair's other member
    if not all(numpy.all((o == numpy.round(o)) & (o >= 1) & (o <= d)) for o in (o1, o2)):
        return None
    s1, s2 = inverse[o1.astype(int) - 1], inverse[o2.astype(int) - 1]
    partner = numpy.full(d, -1)
    partner[s1], partner[s2] = s2, s1
    is_max = t[s1] > t[s2]
    if (numpy.any(s1 == s2) or numpy.any(partner[partner] != numpy.arange(d))
            or numpy.any(partner[s1] != s2) or is_max.sum() * 2 != d):
        return None
    lows = numpy.minimum(numpy.arange(d), partner)
    pair_id = numpy.searchsorted(numpy.unique(lows), lows)
    q_in = 2 * pair_id + (numpy.arange(d) != lows)  # where input i goes in the sorted vector's input
    gather_in = numpy.argsort(q_in)
    for flip in (False, True):  # groupsort is ascending (min, max); flip makes it (max, min)
        gather_out = 2 * pair_id[s1] + (is_max != flip)
        view_in, view_out = axis_permutation(gather_in), axis_permutation(gather_out)
        if view_in is None or view_out is None:
            continue
        new = _groupsort_nodes(src, out, in_shape, out_shape, view_in, view_out, flip, net.dtype)
        if _same_function(net, new, src, out, in_shape, rng):
            return new
    return None


def axis_permutation(gather) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(shape, perm) with ``arange(D).reshape(shape).transpose(perm).ravel() == gather``, or None.

    Reads the mixed-radix structure from the innermost axis out: the index step at the start of each
    block is that axis' stride in the source, and its run length is the axis' size."""
    gather = numpy.asarray(gather)
    d = gather.size
    sizes, strides, block = [], [], 1
    while block < d:
        step = int(gather[block] - gather[0])
        n = 1
        while (n + 1) * block <= d and n * block < d and gather[n * block] == gather[0] + n * step:
            n += 1
        if step <= 0 or d % (block * n):
            return None
        sizes.insert(0, n)
        strides.insert(0, step)
        block *= n
    order = sorted(range(len(sizes)), key=lambda k: -strides[k])  # source axes, outermost first
    src_shape = tuple(sizes[k] for k in order)
    perm = tuple(order.index(k) for k in range(len(sizes)))  # output axis k is source axis perm[k]
    if not numpy.array_equal(numpy.arange(d).reshape(src_shape).transpose(perm).ravel(), gather):
        return None
    return src_shape, perm


def _groupsort_nodes(src, out, in_shape, out_shape, view_in, view_out, flip, dtype) -> list[Node]:
    """reshape/transpose into pairs -> groupsort(2) -> reshape/transpose out; with ``flip`` the sort runs
    between two negations, which orders each pair (max, min) and keeps every step 1-Lipschitz."""
    d = math.prod(in_shape)
    neg = ("scale", {"scale": numpy.array(-1.0, dtype), "shift": numpy.array(0.0, dtype)}, {})
    steps: list[tuple[str, dict, dict]] = []
    shape, perm = view_in  # the sorted vector's input is x.reshape(shape).transpose(perm).reshape(-1)
    steps.append(("reshape", {}, {"shape": shape}))
    if perm != tuple(range(len(perm))):
        steps.append(("transpose", {}, {"perm": (0,) + tuple(p + 1 for p in perm)}))
    steps.append(("reshape", {}, {"shape": (d,)}))
    steps += [neg, ("groupsort", {}, {"group_size": 2}), neg] if flip else [("groupsort", {}, {"group_size": 2})]
    shape, perm = view_out  # the output is sorted.reshape(shape).transpose(perm), then out_shape
    steps.append(("reshape", {}, {"shape": shape}))
    if perm != tuple(range(len(perm))):
        steps.append(("transpose", {}, {"perm": (0,) + tuple(p + 1 for p in perm)}))
    steps.append(("reshape", {}, {"shape": tuple(out_shape)}))
    merged: list[tuple[str, dict, dict]] = []
    current = tuple(in_shape)
    for step in steps:  # drop reshapes to the current shape and merge consecutive ones
        if step[0] == "reshape" and merged and merged[-1][0] == "reshape":
            merged[-1] = step
        elif step[0] != "reshape" or step[2]["shape"] != current:
            merged.append(step)
        if step[0] == "reshape":
            current = tuple(step[2]["shape"])
        elif step[0] == "transpose":
            current = tuple(current[p - 1] for p in step[2]["perm"][1:])
    if not merged:
        merged.append(("reshape", {}, {"shape": tuple(out_shape)}))
    nodes, prev = [], src
    for i, (op, params, at) in enumerate(merged):
        name = out if i == len(merged) - 1 else f"{out}::groupsort{i}"
        nodes.append(Node(name, op, (prev,), params=dict(params), attrs=dict(at)))
        prev = name
    return nodes


def _same_function(net, new: list[Node], src, out, in_shape, rng) -> bool:
    from ..ir import Network

    try:
        fused = Network(new, in_shape, input_name=src, output_name=out)
    except Exception:
        return False
    t = rng.normal(size=(4,) + tuple(in_shape))
    t[0] = numpy.round(t[0])  # ties too
    return bool(numpy.array_equal(fused.forward(t), net.forward(t)))
