"""Verification of general properties: specifications (``Spec``, VNN-LIB), falsification, ``verify``.

The package is callable: ``robeval.verify(model, spec)`` is ``robeval.verify.verify(model, spec)``
(the subpackage and the function share the name ``robeval.verify``).

>>> from robeval.verify import read_vnnlib, verify   # doctest: +SKIP
>>> verify("net.onnx.gz", read_vnnlib("prop.vnnlib.gz"), timeout=60).status   # doctest: +SKIP
'holds'
"""

from __future__ import annotations

import importlib
import sys
import types

# the function ``falsify`` shadows its module's name here; the module stays importable by its full name
from .falsify import Counterexample, Replayer, falsify, replay
from .spec import Case, Disjunct, Spec, robustness_spec
from .vnnlib import read_vnnlib

__all__ = ["Case", "Disjunct", "Spec", "robustness_spec", "read_vnnlib", "verify", "VerifyResult",
           "falsify", "replay", "Replayer", "Counterexample"]


def __getattr__(name):  # the verifier (and the bound computations it uses) load only when used
    if name in ("verify", "VerifyResult"):
        return getattr(importlib.import_module(".verifier", __name__), name)
    raise AttributeError(f"module 'robeval.verify' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """This package, callable as ``verify``."""

    def __call__(self, *args, **kwargs):
        return self.verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
