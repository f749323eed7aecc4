"""Loading PyTorch files safely: TorchScript, .pt2 and state_dicts; pickles only when trusted."""

from __future__ import annotations

import importlib
import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError


def load_torch_file(path: Path, fmt: str, model_class: str | None = None, model_kwargs: dict | None = None,
                    trust_pickle: bool = False) -> Any:
    """The model object in a PyTorch file; pickled Python objects only with ``trust_pickle``."""
    if fmt == "torchscript":
        return torch.jit.load(str(path), map_location="cpu")
    if fmt == "pt2":
        unsafe = _unsafe_pt2_members(path)
        if unsafe and not trust_pickle:
            raise ModelLoadError(f"{path} holds pickled objects ({', '.join(unsafe[:3])}) that torch.export.load "
                                 "unpickles without restriction, which can run arbitrary code; robeval refuses "
                                 "them. Fix: re-export without custom objects, or pass trust_pickle=True "
                                 "(CLI --trust-pickle) if you trust the file")
        with open(path, "rb") as fh:  # a file object: torch wants the .pt2 suffix on paths only
            return torch.export.load(fh)
    if fmt != "torch":
        raise ModelLoadError(f"{path}: format {fmt!r} is not a PyTorch format (torch, torchscript, pt2)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            reason = next((line for line in str(exc).splitlines() if "GLOBAL" in line), "").strip()
            raise ModelLoadError(
                f"{path} holds pickled Python objects, not only tensors (a whole pickled module?); unpickling "
                f"runs code named by the file, so robeval refuses it by default ({reason or 'not weights-only'}). "
                "Fix: save model.state_dict() and load it with model_class='package.module:Class', or save with "
                "torch.export.save / torch.jit.save; if you trust this file, opt in with trust_pickle=True "
                "(CLI --trust-pickle)") from None
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        state = obj.get("state_dict", obj.get("model_state_dict", obj))
        if model_class is None:
            raise ModelLoadError(f"{path} holds a state_dict (weights only, {len(state)} tensors); give the model "
                                 "class that they belong to: model_class='package.module:Class' (CLI --model-class)")
        model = import_class(model_class)(**(model_kwargs or {}))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"the state_dict in {path} does not fit {model_class}: {exc}") from exc
        return model
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}; expected a state_dict or a module")


def import_class(spec: str) -> type:
    """The nn.Module subclass named by 'package.module:Class' (the module is imported: trusted code)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep:
        mod_name, _, attr = spec.rpartition(".")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ModelLoadError(f"model_class={spec!r} cannot be imported ({exc}); expected 'package.module:Class' "
                             "importable from the current environment") from exc
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ModelLoadError(f"model_class={spec!r} is a {type(obj).__name__}, not an nn.Module subclass")
    return obj


def _unsafe_pt2_members(path: Path) -> list[str]:
    """Members of a .pt2 archive that torch.export.load would unpickle without weights_only."""
    unsafe = []
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        for name in names:
            folder = name.rpartition("/")[0]
            if name.endswith("_config.json") and "/data/" in name:
                for entry in json.loads(z.read(name)).get("config", {}).values():
                    member = f"{folder}/{entry.get('path_name', '')}"
                    if "custom_obj" in member or "opaque_obj" in member:
                        unsafe.append(member)
                    elif entry.get("use_pickle") and not _weights_only(z.read(member)):
                        unsafe.append(member)
            elif "/sample_inputs/" in name and not _weights_only(z.read(name)):
                unsafe.append(name)
    return sorted(unsafe)


def _weights_only(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), weights_only=True)
        return True
    except Exception:
        return False
