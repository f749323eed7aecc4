"""A restricted unpickler for the CIFAR python batches: never runs code from a data file.

The official batch files are Python-2 pickles of dicts holding bytes, lists of ints/bytes and one
uint8 numpy array. Rebuilding that array needs exactly three globals (numpy's ``_reconstruct``,
``ndarray`` and ``dtype``); ``find_class`` refuses every other global, so a file whose pickle
would call ``os.system`` (or anything else) fails before any of it runs."""

from __future__ import annotations

import io
import pickle

from ..errors import RobevalError

_RECONSTRUCT_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


class UnsafePickleError(RobevalError):
    """A pickle asked for something other than the plain data a CIFAR batch holds."""


class RestrictedUnpickler(pickle.Unpickler):
    """Allows numpy's array reconstruction (``_reconstruct``, ``ndarray``, ``dtype``), nothing else."""

    def find_class(self, module: str, name: str):
        import numpy
        from numpy._core import multiarray

        if module in _RECONSTRUCT_MODULES and name == "_reconstruct":
            return multiarray._reconstruct
        if module == "numpy" and name == "ndarray":
            return numpy.ndarray
        if module == "numpy" and name == "dtype":
            return numpy.dtype
        raise UnsafePickleError(f"refused to unpickle the global {module}.{name}: a CIFAR batch holds only dicts, "
                                "lists, bytes and numpy arrays; this file is not a genuine batch (get the "
                                "official tarball, or convert the data to .npz)")

    def persistent_load(self, pid):
        raise UnsafePickleError("refused a persistent id in a data pickle; this is not a CIFAR batch file")


def safe_loads(data: bytes, source: str):
    """Unpickle ``data`` (bytes as bytes, as the Python-2 batches need) with the restricted unpickler."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{source}: {exc}") from None
    except Exception as exc:  # truncated or corrupt: say which file
        raise RobevalError(f"{source} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); "
                           "download the official tarball again") from None
