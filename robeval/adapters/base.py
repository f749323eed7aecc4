"""The adapter protocol shared by PyTorch, Keras and ONNX models, and ``load_model`` dispatch.

Framework modules are imported only inside their own adapter, on demand: dispatch looks at
``type(obj).__module__`` or the file's content, never imports a framework just to ask."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import ModelLoadError
from ..ir.graph import Network


@runtime_checkable
class ModelAdapter(Protocol):
    """What every adapter offers. Arrays are NumPy, NCHW, float32, values in the model's domain."""

    input_shape: tuple[int, ...]  # per sample, NCHW
    num_classes: int
    channels_last: bool  # whether the native model takes NHWC (the adapter transposes)
    outputs_probabilities: bool  # whether the native output is a softmax

    def predict(self, x: Any) -> Any: ...

    def input_gradient(self, x: Any, y: Any, loss: str = "ce") -> Any: ...

    def to_network(self) -> Network: ...


class NetworkModel:
    """Adapter over a robeval Network itself (predict and gradients on NumPy/CuPy)."""

    channels_last = False

    def __init__(self, network: Network):
        from .classifier import classifier_network

        self.network, self.num_classes, self.binary = classifier_network(network, "the network")
        network = self.network
        self.input_shape = network.input_shape
        self.outputs_probabilities = network.nodes[-1].op == "softmax" if network.nodes else False

    def predict(self, x):
        return self.network.forward(self.network.check_input(x))

    def input_gradient(self, x, y, loss: str = "ce"):
        from .gradients import loss_gradient_network

        return loss_gradient_network(self.network, x, y, loss)

    def to_network(self) -> Network:
        return self.network


def sniff_format(path: Path) -> str:
    """'onnx' (also gzip-compressed), 'keras' (zip with config.json), 'h5', 'torchscript' / 'pt2' /
    'torch' (zip archives)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "h5"
    if head[:1] == b"\x80":  # a bare pickle: torch.save's legacy (non-zip) format
        return "torch"
    if head.startswith(b"PK"):
        import zipfile

        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile as exc:
            raise ModelLoadError(f"{path}: looks like a zip archive but cannot be read ({exc})") from exc
        if "config.json" in names and any(n.endswith(".weights.h5") or n == "model.weights.h5" for n in names):
            return "keras"
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json")
               for n in names) or any("archive_format" in n for n in names):
            return "pt2"
        return "torch"
    if head.startswith(b"\x1f\x8b"):  # gzip: VNN-COMP ships ONNX nets as .onnx.gz
        import gzip

        try:
            with gzip.open(path, "rb") as fh:
                inner = fh.read(1)
        except (OSError, EOFError) as exc:
            raise ModelLoadError(f"{path}: looks gzip-compressed but cannot be decompressed ({exc})") from exc
        if path.name.lower().endswith(".onnx.gz") or inner == b"\x08":
            return "onnx"
        raise ModelLoadError(f"{path}: a gzip-compressed file that is not an ONNX model (first byte {inner!r}); "
                             "robeval reads gzip-compressed ONNX (.onnx.gz) only: decompress other models first")
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":
        return "onnx"
    raise ModelLoadError(f"{path}: unknown model format (first bytes {head!r}); expected an ONNX, Keras "
                         "(.keras/.h5) or PyTorch (.pt/.pt2) file")


def load_model(model: Any, input_shape: tuple[int, ...] | None = None, **options) -> Any:
    """Wrap whatever the user has — a path, an nn.Module, a keras.Model, an ONNX ModelProto, a
    Network — in an adapter with predict / input_gradient / to_network."""
    if isinstance(model, Network):
        return NetworkModel(model)
    if hasattr(model, "to_network") and hasattr(model, "predict"):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.exists():
            raise ModelLoadError(f"no such model file: {path}")
        if path.is_dir():
            raise ModelLoadError(f"{path} is a directory; pass a model file (.onnx, .pt, .pt2, .keras, .h5)")
        fmt = sniff_format(path)
        return _load_path(path, fmt, input_shape, **options)
    root = type(model).__module__.partition(".")[0]
    if root == "onnx":
        from .onnx import OnnxModel

        return OnnxModel(model, input_shape=input_shape)
    if root == "torch" or _has_base(model, "torch.nn.modules.module"):
        from .torch import TorchModel

        return TorchModel(model, input_shape=input_shape, **options)
    if root in ("keras", "tf_keras") or _has_base(model, "keras"):
        from .keras import KerasModel

        return KerasModel(model, input_shape=input_shape, **options)
    raise ModelLoadError(f"cannot load a {type(model).__module__}.{type(model).__name__}; expected a path, a "
                         "torch.nn.Module, a keras.Model, an onnx.ModelProto or a robeval Network")


def _has_base(obj: Any, module_prefix: str) -> bool:
    return any(c.__module__.startswith(module_prefix) for c in type(obj).__mro__)


def _load_path(path: Path, fmt: str, input_shape, **options):
    if fmt == "onnx":
        from .onnx import OnnxModel

        return OnnxModel(path, input_shape=input_shape)
    if fmt in ("keras", "h5"):
        from .keras import KerasModel

        return KerasModel.from_file(path, input_shape=input_shape, **options)
    from .torch import TorchModel

    return TorchModel.from_file(path, fmt=fmt, input_shape=input_shape, **options)
