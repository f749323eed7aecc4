"""ONNX models: ``load_onnx`` converts a model (opset 13+; older opsets are upgraded on load) into a
robeval Network, and ``OnnxModel`` wraps it as an adapter that predicts with onnxruntime when installed.

The import walks the graph once in its (topological) order. A node whose inputs are all constants,
or a Shape/Size of an input-dependent tensor, is folded (see onnx_fold); any other node goes through
the converter table of onnx_ops, keyed by ``(op_type, since_version)``. Unsupported nodes are
collected and reported together (the nodes after one are still checked, on the shapes ONNX shape
inference gives its outputs). Afterwards the graph is cleaned (dead nodes, pass-throughs, reshuffles
that cancel, constant adds folded into biases), an NHWC image input whose first use is a transpose to
NCHW is made an NCHW input (Keras/tf2onnx models), and MaxMin activations written out as
max/min/pool ops are fused into ``groupsort`` nodes.
"""

from __future__ import annotations

import os
from typing import Any

import numpy

from ..backend import Array, asnumpy
from ..errors import InputShapeError, InvalidParameterError, ModelLoadError, UnsupportedOpError
from ..ir import Network, Node, get_op
from . import onnx_fold as fold
from .classifier import binary_scores, classifier_network
from .fidelity import check_fidelity
from .gradients import LOSSES, loss_and_cotangent
from .layout import to_nhwc
from .onnx_ops import CONVERTERS, Unsupported, attrs

#: The oldest default-domain opset the converters are written for.
MIN_OPSET = 13
#: Op types that are folded rather than converted (listed in errors as supported).
FOLDED_OPS = ("Constant", "Shape", "Size")


def load_onnx(model: Any, input_shape: tuple[int, ...] | None = None, channels_last: bool | None = None) -> Network:
    """Convert an ONNX model (a path or an ``onnx.ModelProto``) into a robeval Network.

    Args:
        model: path to a ``.onnx`` (or gzip-compressed ``.onnx.gz``) file, or a loaded ModelProto.
        input_shape: per-sample shape of the ONNX input as the file declares it (no batch axis);
            needed only when it has symbolic dimensions beyond the batch axis, checked otherwise.
        channels_last: None (auto) gives a network taking NCHW inputs when the model takes NHWC
            images and immediately turns them to NCHW (tf2onnx/Keras exports); False keeps the
            model's own input layout. ``meta["channels_last"]`` says which happened.
    Returns:
        A Network over the model's single graph input (axis 0 is the batch axis).

    >>> net = load_onnx("mlp.onnx")  # doctest: +SKIP
    >>> net.forward(x).shape         # doctest: +SKIP
    (100, 10)
    """
    proto, source = read_model(model)
    return _Importer(proto, source, input_shape).run(channels_last)


def read_model(model: Any):
    """(ModelProto, description) for a path or a ModelProto; refuses missing, corrupt and old models."""
    try:
        import onnx
    except ImportError as exc:
        raise ModelLoadError("reading ONNX models needs the onnx package: pip install 'robeval[onnx]'") from exc
    if isinstance(model, onnx.ModelProto):
        proto, source = model, "the given ModelProto"
    else:
        path = os.fspath(model)
        source = f"'{path}'"
        if os.path.isdir(path):
            raise ModelLoadError(f"{source} is a directory; pass the .onnx file inside it")
        if not os.path.isfile(path):
            raise ModelLoadError(f"no such file: {source}; check the path")
        try:
            proto = onnx.load_from_string(gunzip_file(path)) if is_gzip(path) else onnx.load(path)
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{source} is not a valid ONNX model ({type(exc).__name__}: {exc}); "
                                 "re-export it or check that the file is complete") from exc
    # no onnx.checker here: it refuses runnable models over details (an output without a shape)
    if not proto.graph.node or not proto.graph.output or not proto.opset_import:
        raise ModelLoadError(f"{source} is not a valid ONNX model (no graph, outputs or opset); "
                             "re-export it or check that the file is complete")
    opset = default_opset(proto)
    if opset < MIN_OPSET:
        proto = convert_opset(proto, opset, source)
    return proto, source


def is_gzip(path) -> bool:
    """Whether a file starts with the gzip magic bytes (VNN-COMP ships its nets as ``.onnx.gz``)."""
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def gunzip_file(path: str) -> bytes:
    """The decompressed content of a gzip file, with a clear error for a truncated or corrupt one."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ModelLoadError(f"'{path}' is gzip-compressed but cannot be decompressed ({exc}); "
                             "check that the file is complete") from exc


#: metadata key recording the opset a model had before ``convert_opset`` upgraded it.
CONVERTED_FROM = "robeval.converted_from_opset"


def convert_opset(proto, opset: int, source: str):
    """The model upgraded to MIN_OPSET with onnx.version_converter (older exporters, VNN-COMP and ERAN
    nets use opset 9); a model the converter cannot upgrade is refused with its reason."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, MIN_OPSET)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{source} uses ONNX opset {opset} and onnx.version_converter cannot upgrade it to "
                             f"opset {MIN_OPSET} ({first}); re-export the model with opset {MIN_OPSET} or newer"
                             ) from exc
    entry = onnx.StringStringEntryProto(key=CONVERTED_FROM, value=str(opset))
    converted.metadata_props.append(entry)
    return converted


def default_opset(proto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ModelLoadError("the model imports no default-domain (ai.onnx) opset; it is not a standard ONNX model")


def supported_ops() -> list[str]:
    """ONNX op types the importer converts (any op with only constant inputs is folded as well)."""
    return sorted({op for op, _ in CONVERTERS} | set(FOLDED_OPS))


class _Importer:
    """One conversion: the state the converters see through the ``cx`` interface of onnx_ops."""

    def __init__(self, proto, source: str, input_shape):
        import onnx
        from onnx import numpy_helper

        self.proto, self.source = proto, source
        self.graph = proto.graph
        self.opset = default_opset(proto)
        inits = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.consts: dict[str, tuple] = {k: (v, v) for k, v in inits.items()}
        inputs = [i for i in self.graph.input if i.name not in inits]
        if len(inputs) != 1 or len(self.graph.output) != 1:
            raise ModelLoadError(f"{source} has inputs {[i.name for i in inputs]} and outputs "
                                 f"{[o.name for o in self.graph.output]}; robeval imports models with exactly "
                                 "one input tensor and one output tensor")
        self.input = inputs[0]
        elem = self.input.type.tensor_type.elem_type
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            raise ModelLoadError(f"input '{self.input.name}' has element type "
                                 f"{onnx.TensorProto.DataType.Name(elem)}; robeval imports float32/float64 models")
        self.dtype = numpy.dtype(numpy.float32 if elem == onnx.TensorProto.FLOAT else numpy.float64)
        self.per_sample, self.fixed_batch = self._input_shape(input_shape)
        self.shapes: dict[str, tuple[int, ...]] = {self.input.name: self.per_sample}
        self.dyn: dict[str, str] = {self.input.name: self.input.name}  # ONNX tensor -> robeval node
        self.nodes: list[Node] = []
        self.problems: list[tuple[str, str]] = []
        self.poisoned: set[str] = set()
        self.taken = {self.input.name} | set(inits) | {o for n in self.graph.node for o in n.output}
        self.used = {i for n in self.graph.node for i in n.input} | {self.graph.output[0].name}
        self._inferred: dict | None = None  # onnx.shape_inference's value_info, computed on the first problem

    # ------------------------------------------------------------------ input
    def _input_shape(self, given):
        tt = self.input.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim] \
            if tt.HasField("shape") else None
        name = self.input.name
        if given is not None:
            given = tuple(int(d) for d in given)
            if dims is not None and (len(dims) != len(given) + 1 or
                                     any(m is not None and m != g for m, g in zip(dims[1:], given))):
                raise InputShapeError(f"input_shape={given} does not match the model's input '{name}' of shape "
                                      f"{_show(dims)}; give the per-sample shape without the batch axis")
            return given, (dims[0] if dims else None)
        if dims is None or len(dims) < 2 or any(d is None for d in dims[1:]):
            raise InputShapeError(f"the model's input '{name}' has shape {_show(dims)}: the per-sample shape is "
                                  "not fixed; pass it, e.g. load_onnx(path, input_shape=(1, 28, 28))")
        return tuple(dims[1:]), dims[0]

    # ------------------------------------------------------------------ the cx interface
    def dynamic(self, name: str) -> bool:
        return name in self.dyn

    def src(self, name: str) -> str:
        if name not in self.dyn:
            raise Unsupported(f"'{name}' is a constant where an input-dependent tensor is expected")
        return self.dyn[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[self.src(name)]

    def worlds(self, name: str):
        return self.consts[name]

    def const(self, name: str, what: str, allow_batch_rows: bool = False):
        if name in self.dyn:
            raise Unsupported(f"{what} ('{name}') depends on the input; it must be a constant")
        pair = self.consts[name]
        if fold.same_in_worlds(pair):
            return pair[0]
        row = fold.batch_constant(pair) if allow_batch_rows else None
        if row is None:
            raise Unsupported(f"{what} ('{name}') depends on the batch size")
        return row

    def param(self, array) -> numpy.ndarray:
        return numpy.array(array, dtype=self.dtype, order="C")  # a writable copy, not a view of the proto

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}{k}", k + 1
        self.taken.add(name)
        return name

    # ------------------------------------------------------------------ the walk
    def run(self, channels_last: bool | None = None) -> Network:
        for node in self.graph.node:
            self._visit(node)
        out = self.graph.output[0].name
        if self.problems:
            raise UnsupportedOpError(self.problems, framework="ONNX", supported=supported_ops())
        if out not in self.dyn:
            raise ModelLoadError(f"the output '{out}' of {self.source} does not depend on the input")
        name = self.input.name
        nodes = fold.prune(self.nodes, self.dyn[out])
        in_shape = self.per_sample
        nhwc = channels_last is not False and fold.takes_nhwc(nodes, name, in_shape)
        if nhwc:
            nodes, in_shape = fold.take_nchw(nodes, name, in_shape, self.fresh(name + "::to_nhwc"), self.shapes)
        nodes = fold.cancel_shuffles(nodes, name, self.dyn[out], self.shapes)
        nodes, output = fold.remove_identities(nodes, name, self.dyn[out])
        nodes = fold.merge_bias(nodes, output)
        nodes, notes = fold.fuse_maxmin(nodes, name, output, self.shapes)
        converted = {p.key: p.value for p in self.proto.metadata_props}.get(CONVERTED_FROM)
        meta = {"source": "onnx", "file": self.source, "opset": self.opset, "channels_last": nhwc,
                "opset_converted_from": int(converted) if converted else None,
                "producer": f"{self.proto.producer_name} {self.proto.producer_version}".strip(),
                "onnx_input": name, "onnx_output": out}
        if notes:
            meta["fused"] = notes
        return Network(nodes, in_shape, name, output, meta)

    def _visit(self, node) -> None:
        label = node.name or f"{node.op_type} -> {node.output[0]}"
        ins = [i for i in node.input if i]
        if node.domain not in ("", "ai.onnx"):
            return self._fail(node, f"{node.domain}.{node.op_type}", label)
        if any(i in self.poisoned for i in ins):  # depends on an unconvertible node: report only unknown ops
            if not any(op == node.op_type for op, _ in CONVERTERS) and node.op_type not in FOLDED_OPS:
                self.problems.append((node.op_type, label))
            return self.poisoned.update(node.output)
        missing = [i for i in ins if i not in self.dyn and i not in self.consts]
        if missing:
            raise ModelLoadError(f"node '{label}' ({node.op_type}) reads {missing}, which no node defines")
        if all(i in self.consts for i in ins):
            return self._fold(node, label)
        if node.op_type in ("Shape", "Size") and ins[0] in self.dyn:
            self.consts[node.output[0]] = fold.fold_shape(node.op_type, self.shape(ins[0]), attrs(node))
            return None
        self._convert(node, label)

    def _fail(self, node, op: str, label: str, outputs=None, placeholder: bool = True) -> None:
        """Record a problem. The failed outputs stay usable as shape-only placeholders when ONNX shape
        inference knows their shapes, so that later nodes are still checked (and reported together)."""
        self.problems.append((op, label))
        for name in node.output if outputs is None else outputs:
            shape = self._inferred_shape(name) if placeholder and name else None
            if shape is None:
                self.poisoned.add(name)
            else:
                self.dyn[name], self.shapes[name] = name, shape

    def _inferred_shape(self, name: str) -> tuple[int, ...] | None:
        if self._inferred is None:
            from onnx import shape_inference

            try:
                graph = shape_inference.infer_shapes(self.proto, data_prop=True).graph
                self._inferred = {v.name: v for v in list(graph.value_info) + list(graph.output)}
            except Exception:
                self._inferred = {}
        info = self._inferred.get(name)
        if info is None or not info.type.tensor_type.HasField("shape"):
            return None
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in info.type.tensor_type.shape.dim]
        return tuple(dims[1:]) if len(dims) >= 2 and all(d > 0 for d in dims[1:]) else None

    def _fold(self, node, label: str) -> None:
        if node.op_type in fold.RANDOM_OPS:
            return self._fail(node, f"{node.op_type} (random values cannot be folded)", label, placeholder=False)
        try:
            values = fold.fold_node(node, [self.consts[i] if i else None for i in node.input], self.opset)
        except fold.FoldError as exc:
            return self._fail(node, f"{node.op_type} (constant folding failed: {exc})", label, placeholder=False)
        for name, pair in zip(node.output, values):
            if name:
                self.consts[name] = pair

    def _convert(self, node, label: str) -> None:
        from onnx import defs

        try:
            version = defs.get_schema(node.op_type, self.opset, "").since_version
        except Exception:
            version = None
        fn = CONVERTERS.get((node.op_type, version))
        if fn is None:
            known = sorted(v for op, v in CONVERTERS if op == node.op_type)
            op = node.op_type if not known else f"{node.op_type}-{version} (converters exist for versions {known})"
            return self._fail(node, op, label)
        try:
            new = fn(self, node)
        except Unsupported as exc:
            return self._fail(node, f"{node.op_type}: {exc}", label)
        for n in new:
            self._add(n, node, label)
        made = {n.name for n in new}
        for i, name in enumerate(node.output):
            if name in made:
                self.dyn[name] = name
            elif name and name in self.used:
                self._fail(node, f"{node.op_type}: output {i} ('{name}') is not supported", label, [name])

    def _add(self, n: Node, onnx_node, label: str) -> None:
        """Append a node and record its per-sample output shape from a forward on one zero sample."""
        self.taken.add(n.name)
        zeros = [numpy.zeros((1,) + self.shapes[i], self.dtype) for i in n.inputs]
        try:
            y = get_op(n.op).forward(numpy, n, *zeros)
        except Exception as exc:
            raise ModelLoadError(f"converting node '{label}' ({onnx_node.op_type}) failed at its robeval "
                                 f"{n.op} node on input shape(s) {[z.shape for z in zeros]}: "
                                 f"{type(exc).__name__}: {exc}") from exc
        if y.ndim == 0 or y.shape[0] != 1:
            raise ModelLoadError(f"converting node '{label}' ({onnx_node.op_type}) lost the batch axis")
        self.shapes[n.name] = tuple(y.shape[1:])
        self.nodes.append(n)


def _show(dims) -> str:
    return "unknown" if dims is None else "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


class OnnxModel:
    """Adapter for an ONNX classifier: predictions from onnxruntime (or the converted network when
    onnxruntime is missing), gradients and bounds from the converted robeval Network.

    Args:
        model: path to a ``.onnx`` file or an ``onnx.ModelProto``.
        input_shape: per-sample input shape, when the model leaves it symbolic.
        batch_size: samples per onnxruntime call.
        channels_last: see ``load_onnx``; when the network takes NCHW for an NHWC model,
            ``channels_last`` is True and ``predict`` transposes its NCHW inputs for onnxruntime.

    >>> model = OnnxModel("mlp.onnx")        # doctest: +SKIP
    >>> model.predict(x).argmax(1)           # doctest: +SKIP
    """

    framework = "onnx"

    def __init__(self, model: Any, input_shape: tuple[int, ...] | None = None, batch_size: int = 256,
                 channels_last: bool | None = None):
        self._proto, self.source = read_model(model)
        self.path = None if self.source.startswith("the given") else os.fspath(model)
        network = _Importer(self._proto, self.source, input_shape).run(channels_last)
        #: a single-logit binary model is presented as the scores [0, z] (see ``classifier``)
        self.network, self._num_classes, self.binary = classifier_network(network, self.source)
        #: whether the ONNX model takes NHWC images (predict then transposes the NCHW inputs it gets)
        self.channels_last = bool(self.network.meta["channels_last"])
        self.batch_size = int(batch_size)
        self._session = None
        self._logits_nets: dict = {}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.network.input_shape

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def outputs_probabilities(self) -> bool:
        """True when the graph ends in a Softmax (the network's outputs are probabilities)."""
        return self.network.node(self.network.output_name).op == "softmax"

    def to_network(self) -> Network:
        return self.network

    # ------------------------------------------------------------------ predictions
    def _ort(self):
        if self._session is None:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3
            blob = self.path if self.path and not is_gzip(self.path) else self._proto.SerializeToString()
            self._session = onnxruntime.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        return self._session

    def _check(self, x) -> numpy.ndarray:
        x = numpy.asarray(asnumpy(x))
        if x.dtype.kind != "f":
            raise InvalidParameterError(f"input has dtype {x.dtype}; expected floats (e.g. x.astype('float32'))")
        return self.network.check_input(x)

    def predict(self, x: Array) -> numpy.ndarray:
        """Model outputs for a batch x of shape (N, *input_shape), via onnxruntime when installed."""
        x = self._check(x).astype(self.network.dtype, copy=False)
        try:
            session = self._ort()
        except ImportError:
            return asnumpy(self.network.forward(x))
        return self._run_ort(session, x)

    def _run_ort(self, session, x: numpy.ndarray) -> numpy.ndarray:
        if self.channels_last:
            x = to_nhwc(x)
        meta = session.get_inputs()[0]
        fixed = meta.shape[0] if isinstance(meta.shape[0], int) and meta.shape[0] > 0 else None
        step = fixed or self.batch_size
        outs = []
        for i in range(0, len(x), step):
            chunk = x[i:i + step]
            n = len(chunk)
            if fixed and n < fixed:  # a model exported with a fixed batch size: pad the last chunk
                chunk = numpy.concatenate([chunk, numpy.zeros((fixed - n,) + chunk.shape[1:], chunk.dtype)])
            outs.append(session.run(None, {meta.name: chunk})[0][:n])
        if not outs:
            return numpy.zeros((0,) + self.network.shapes()[self.network.output_name])
        out = numpy.concatenate(outs)
        return binary_scores(out.reshape(len(out), 1)) if self.binary else out

    def check_fidelity(self, x: Array, atol: float = 1e-5) -> float:
        """Largest |onnxruntime - network| over the outputs for x; raises FidelityError above atol."""
        try:
            self._ort()
        except ImportError as exc:
            raise ModelLoadError("check_fidelity needs onnxruntime: pip install onnxruntime") from exc
        x = self._check(x).astype(self.network.dtype, copy=False)
        return check_fidelity(self, x, atol=atol, rtol=0.0, network=self.network)

    # ------------------------------------------------------------------ gradients
    def _logits_net(self, dtype) -> Network:
        key = numpy.dtype(dtype).name
        if key not in self._logits_nets:
            net, _ = self.network.strip_output_squashers()
            self._logits_nets[key] = net if net.dtype == dtype else net.astype(dtype)
        return self._logits_nets[key]

    def input_gradient(self, x: Array, y: Array, loss: str = "ce") -> numpy.ndarray:
        """Gradient of a per-sample loss on the logits w.r.t. x, through the network's vjp (a trailing
        Softmax/LogSoftmax is stripped first, so "ce" is the cross-entropy of the logits).

        Args:
            x: inputs (N, *input_shape); float64 inputs get a float64 gradient.
            y: labels (N,) in [0, num_classes).
            loss: "ce" or "margin" (max_{j != y} logit_j - logit_y), as in ``adapters.gradients``:
                both grow towards misclassification.
        Returns:
            dL/dx with x's shape.
        """
        if loss not in LOSSES:
            raise InvalidParameterError(f"loss={loss!r} is not known; expected one of {LOSSES}")
        x = self._check(x)
        dtype = numpy.float64 if x.dtype == numpy.float64 else self.network.dtype
        x = x.astype(dtype, copy=False)
        net = self._logits_net(dtype)
        logits = asnumpy(net.forward(x))
        z = logits.reshape(len(x), -1)
        y = numpy.asarray(asnumpy(y)).reshape(-1)
        if y.shape != (len(x),) or y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() >= z.shape[1])):
            raise InvalidParameterError(f"labels have shape {y.shape}, dtype {y.dtype} and range "
                                        f"[{y.min(initial=0)}, {y.max(initial=0)}]; expected ({len(x)},) integers "
                                        f"in [0, {z.shape[1]})")
        _, g = loss_and_cotangent(numpy, z, y, loss)
        return asnumpy(net.vjp(x, g.reshape(logits.shape).astype(dtype)))
