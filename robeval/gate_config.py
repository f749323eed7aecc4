"""Gate configuration: reading and checking robeval.toml and the baseline report it compares with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .gate_checks import Check, GateUsageError, parse_check

MODEL_KEYS = {"name": str, "path": str, "data": str, "data_path": str, "limit": int, "split": str, "checks": list,
              "baseline": str}
TOP_KEYS = {"models": list, "baseline": str, "tolerance": (int, float), "profile": str, "seed": int, "device": str,
            "batch_size": int}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: Path
    data: str
    checks: tuple[Check, ...]
    limit: int | None = None
    data_path: Path | None = None
    split: str = "test"
    baseline: Path | None = None


@dataclass(frozen=True)
class GateConfig:
    models: tuple[ModelConfig, ...]
    tolerance: float = 0.01
    profile: str = "quick"
    seed: int = 0
    device: str = "cpu"
    batch_size: int | None = None


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise GateUsageError("reading robeval.toml needs Python 3.11+ or the tomli package (pip install tomli)") \
                from None
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise GateUsageError(f"config file {path} does not exist; write one (see docs/gate.md) or pass --config")\
            from None
    except tomllib.TOMLDecodeError as exc:
        raise GateUsageError(f"{path} is not valid TOML: {exc}") from None


def _check_keys(table: dict, allowed: dict, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise GateUsageError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(allowed)}")
    for key, kind in allowed.items():
        if key in table and (not isinstance(table[key], kind) or isinstance(table[key], bool)):
            raise GateUsageError(f"{where}: {key} = {table[key]!r} has the wrong type; expected "
                                 f"{getattr(kind, '__name__', 'a number')}")


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p


def load_config(path: str | Path, baseline: str | None = None, tolerance: float | None = None) -> GateConfig:
    """Read and check a gate config; ``baseline`` and ``tolerance`` (the CLI's) override the file's.
    Relative paths in the file are relative to the file's folder."""
    from .auditor import PROFILES

    path = Path(path)
    raw = _load_toml(path)
    _check_keys(raw, TOP_KEYS, str(path))
    models = raw.get("models")
    if not models:
        raise GateUsageError(f"{path}: no [[models]] tables; add at least one with path, data and checks")
    base = path.resolve().parent
    top_baseline = _resolve(Path.cwd(), baseline) if baseline else _resolve(base, raw.get("baseline"))
    tol = tolerance if tolerance is not None else raw.get("tolerance", 0.01)
    if not tol >= 0:
        raise GateUsageError(f"tolerance = {tol!r}; expected a number >= 0 (0.01 allows one point of accuracy)")
    profile = raw.get("profile", "quick")
    if profile not in PROFILES:
        raise GateUsageError(f"{path}: profile = {profile!r}; expected one of {', '.join(PROFILES)}")
    parsed = [_model(m, i, base, path, top_baseline, baseline is not None) for i, m in enumerate(models)]
    names = [m.name for m in parsed]
    if len(set(names)) != len(names):
        raise GateUsageError(f"{path}: model names {names} are not unique; set name = \"...\" in each [[models]]")
    if raw.get("batch_size") is not None and raw["batch_size"] < 1:
        raise GateUsageError(f"{path}: batch_size must be >= 1")
    return GateConfig(tuple(parsed), float(tol), profile, raw.get("seed", 0), raw.get("device", "cpu"),
                      raw.get("batch_size"))


def _model(m: Any, i: int, base: Path, path: Path, top_baseline: Path | None, cli_baseline: bool) -> ModelConfig:
    where = f"{path}: [[models]] #{i + 1}"
    if not isinstance(m, dict):
        raise GateUsageError(f"{where} is not a table")
    _check_keys(m, MODEL_KEYS, where)
    for key in ("path", "data", "checks"):
        if key not in m:
            raise GateUsageError(f"{where} has no {key!r}; e.g. path = \"model.onnx\", data = \"mnist\", "
                                 "checks = [\"clean_accuracy >= 0.98\"]")
    if not m["checks"] or not all(isinstance(c, str) for c in m["checks"]):
        raise GateUsageError(f"{where}: checks must be a non-empty list of strings")
    if "limit" in m and m["limit"] < 1:
        raise GateUsageError(f"{where}: limit = {m['limit']}; expected a positive number of samples")
    if m.get("split", "test") not in ("test", "train"):
        raise GateUsageError(f"{where}: split = {m['split']!r}; expected 'test' or 'train'")
    data = m["data"]
    if data.lower() not in ("mnist", "digits", "cifar10", "cifar100"):
        data = str(_resolve(base, data))
    own = None if cli_baseline else _resolve(base, m.get("baseline"))
    return ModelConfig(name=m.get("name") or Path(m["path"]).stem, path=_resolve(base, m["path"]), data=data,
                       checks=tuple(parse_check(c) for c in m["checks"]), limit=m.get("limit"),
                       data_path=_resolve(base, m.get("data_path")), split=m.get("split", "test"),
                       baseline=own or top_baseline)


def load_baseline(path: Path) -> dict:
    """A report.json (schema 1.x) to compare with; a missing or foreign file is a usage error."""
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GateUsageError(f"baseline report {path} does not exist; write one with `robeval audit MODEL --out DIR`")\
            from None
    except (OSError, ValueError) as exc:
        raise GateUsageError(f"baseline report {path} cannot be read as JSON: {exc}") from None
    version = str(payload.get("schema_version", "")) if isinstance(payload, dict) else ""
    if not version.startswith("1.") or not isinstance(payload.get("metrics"), list):
        raise GateUsageError(f"baseline {path} is not a robeval report (schema_version {version or 'missing'}; "
                             "expected 1.x with a 'metrics' list)")
    return payload
