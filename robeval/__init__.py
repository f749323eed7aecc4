"""robeval: a framework-agnostic robustness evaluator and verifier for image classifiers.

Importing robeval imports no deep-learning framework; adapters import theirs on demand.

>>> import robeval
>>> # model = robeval.load_model("model.onnx"); robeval.certify(model, data, method="ibp", eps=0.1)
"""

from __future__ import annotations

from .errors import (
    DataNotFoundError,
    DataRangeError,
    InputShapeError,
    InvalidParameterError,
    ModelLoadError,
    RobevalError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__", "certify", "attack", "sweep", "audit", "verify", "load_model", "load_dataset", "Network", "Node",
    "RobevalError", "InvalidParameterError", "InputShapeError", "DataRangeError", "DataNotFoundError",
    "ModelLoadError", "UnsupportedOpError",
]


def __getattr__(name):  # lazy re-exports keep `import robeval` light
    if name == "certify":
        from .api import certify

        return certify
    if name == "audit":
        from .auditor import audit

        return audit
    if name in ("attack", "sweep"):
        from . import certifiers

        return getattr(certifiers, name)
    if name == "verify":  # the subpackage, callable as robeval.verify.verify(model, spec, ...)
        import importlib

        return importlib.import_module(".verify", __name__)
    if name == "load_model":
        from .adapters.base import load_model

        return load_model
    if name == "load_dataset":
        from .data import load_dataset

        return load_dataset
    if name in ("Network", "Node"):
        from . import ir

        return getattr(ir, name)
    raise AttributeError(f"module 'robeval' has no attribute {name!r}")
