"""VNN-COMP benchmark folders: the instances CSV, running every instance, and the results CSV.

A benchmark folder holds ``instances.csv`` with rows ``onnx_path,vnnlib_path,timeout`` (paths
relative to the folder; a file listed without ``.gz`` may be shipped as ``.gz``). The results CSV
has the competition's layout, one row per instance and no header:
``benchmark,onnx,vnnlib,prepare_time,result,run_time`` with the paths written as
``./benchmarks/<benchmark>/<path as listed>`` and result one of sat / unsat / unknown / timeout /
error, as in the published per-tool results.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError, RobevalError, SpecError
from .vnnlib import read_vnnlib

#: Results a row may carry.
RESULTS = ("sat", "unsat", "unknown", "timeout", "error")


@dataclass(frozen=True)
class Instance:
    """One benchmark instance: the paths as listed, the files found for them, and the time limit."""

    onnx: str
    vnnlib: str
    timeout: float
    onnx_file: Path
    vnnlib_file: Path


@dataclass(frozen=True)
class ResultRow:
    """One row of a results CSV."""

    benchmark: str
    onnx: str
    vnnlib: str
    prepare_time: float
    result: str
    run_time: float

    def key(self) -> tuple[str, str]:
        """(onnx, vnnlib) file names without folders and ``.gz``: how rows of two CSVs are matched."""
        return _base(self.onnx), _base(self.vnnlib)


def _base(path: str) -> str:
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name[:-3] if name.endswith(".gz") else name


def find_instances_csv(benchmark: Path, instances: str | Path | None = None) -> Path:
    """``instances`` (relative to the folder, or absolute), else ``instances.csv``, else the one
    ``*instances.csv`` in the folder."""
    if instances is not None:
        path = Path(instances)
        path = path if path.is_absolute() or path.exists() else benchmark / path
        if not path.is_file():
            raise SpecError(f"no instances file '{instances}' (looked in {benchmark})")
        return path
    if not benchmark.is_dir():
        raise SpecError(f"benchmark folder '{benchmark}' does not exist")
    default = benchmark / "instances.csv"
    if default.is_file():
        return default
    found = sorted(benchmark.glob("*instances.csv"))
    if len(found) == 1:
        return found[0]
    raise SpecError(f"{benchmark} has {'no' if not found else len(found)} instances CSV file(s) "
                    f"{[f.name for f in found]}; name one with --instances")


def _existing(root: Path, listed: str, what: str, where: str) -> Path:
    path = root / listed
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    raise SpecError(f"{where}: the {what} file '{listed}' does not exist (nor '{listed}.gz') under {root}")


def read_instances(benchmark: str | Path, instances: str | Path | None = None) -> list[Instance]:
    """The instances of a benchmark folder, with their files checked to exist."""
    root = Path(benchmark)
    path = find_instances_csv(root, instances)
    out = []
    with open(path, newline="") as fh:
        for line, row in enumerate(csv.reader(fh), 1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            where = f"{path}:{line}"
            if len(row) != 3:
                raise SpecError(f"expected 3 columns onnx_path,vnnlib_path,timeout, got {len(row)}: {row}", str(path),
                                line)
            onnx, vnnlib, limit = (c.strip() for c in row)
            try:
                timeout = float(limit)
            except ValueError:
                raise SpecError(f"timeout {limit!r} is not a number", str(path), line) from None
            if not timeout > 0 or not math.isfinite(timeout):
                raise SpecError(f"timeout {limit!r} must be a positive number of seconds", str(path), line)
            out.append(Instance(onnx, vnnlib, timeout, _existing(root, onnx, "ONNX", where),
                                _existing(root, vnnlib, "VNN-LIB", where)))
    return out


def _listed(benchmark: str, path: str) -> str:
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return f"./benchmarks/{benchmark}/{path}"


def run_benchmark(benchmark: str | Path, *, timeout: float | None = None, limit: int | None = None,
                  instances: str | Path | None = None, seed: int = 0, counterexamples: Path | None = None,
                  report: Callable[[int, int, Instance, ResultRow, str], None] | None = None,
                  executor: Any = None, workers: int | None = None, address: str | None = None,
                  ) -> Iterator[ResultRow]:
    """Verify every instance (the first ``limit``), yielding one ``ResultRow`` each as it finishes.

    Args:
        timeout: caps every instance's own limit when given.
        counterexamples: a folder for ``<onnx>__<vnnlib>.counterexample`` files of sat results.
        report: called as ``report(i, n, instance, row, note)`` after each instance.
        executor: None or 'local' runs the instances one after another here; 'process' or 'ray' (or
            an Executor) runs ``workers`` instances at once, each under its own time limit, with
            BLAS held to one thread per worker. Rows are then yielded in the order they finish;
            ``i`` in ``report`` is the instance's place in the list.
    """
    root = Path(benchmark)
    todo = read_instances(root, instances)[:limit]
    shared = {"root": str(root), "name": root.resolve().name, "todo": todo, "timeout": timeout, "seed": seed,
              "blas_threads": None}
    if executor is None or executor == "local":
        if workers not in (None, 1):
            raise InvalidParameterError(f"workers={workers} needs executor='process' or 'ray'")
        outcomes = ((i, True, _instance_task(shared, None, i)) for i in range(len(todo)))
    else:
        from ..executors import get_executor

        runner = get_executor(executor, workers, address=address)
        shared["blas_threads"] = 1 if runner.capacity > 1 else None
        outcomes = _in_parallel(runner, shared, len(todo))
    for i, ok, value in outcomes:
        inst = todo[i]
        if ok:
            row, note, cex = value
        else:  # the worker died or could not run the task: an error, never a verdict
            row = ResultRow(shared["name"], _listed(shared["name"], inst.onnx), _listed(shared["name"], inst.vnnlib),
                            0.0, "error", 0.0)
            note, cex = f"error: {value}", None
        if cex is not None and counterexamples is not None:
            counterexamples.mkdir(parents=True, exist_ok=True)
            file = counterexamples / f"{_base(inst.onnx).removesuffix('.onnx')}__" \
                                     f"{_base(inst.vnnlib).removesuffix('.vnnlib')}.counterexample"
            file.write_text(cex)
            note += f"; counterexample: {file}"
        if report is not None:
            report(i + 1, len(todo), inst, row, note)
        yield row


def _in_parallel(runner, shared, n: int):
    """(index, ok, value) of every instance as it finishes, at most ``runner.capacity`` at once."""
    from ..executors import Shard

    session = runner.session(shared)
    try:
        queue, running = list(range(n)), 0
        while queue or running:
            while queue and running < runner.capacity:
                i = queue.pop(0)
                session.submit(_instance_task, Shard(i, i, i + 1), i)
                running += 1
            for shard, ok, value in session.wait():
                running -= 1
                yield shard.index, ok, value
    finally:
        session.close()


_MODELS: dict = {}  # prepared models of this process, by ONNX path (each worker keeps its own)


def _instance_task(shared: dict, shard: Any, i: int):
    """Verify instance ``i``: (ResultRow, note, counterexample text or None). A module-level function,
    so that process and Ray workers can run it."""
    import contextlib

    from .verifier import prepare_model, verify

    inst, name = shared["todo"][i], shared["name"]
    limits = contextlib.nullcontext()
    if shared["blas_threads"]:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=shared["blas_threads"], user_api="blas")
        # and one search thread (BabSettings.workers): N workers on N cores, not N x cores threads
        os.environ.setdefault("ROBEVAL_THREADS", "1")
    t0 = time.perf_counter()
    note, result, prepare, run, cex = "", "error", 0.0, 0.0, None
    with limits:
        try:
            key = str(inst.onnx_file)
            if key not in _MODELS:
                _MODELS[key] = prepare_model(inst.onnx_file)
            prepare = time.perf_counter() - t0
            t1 = time.perf_counter()
            timeout = shared["timeout"]
            limit_s = inst.timeout if timeout is None else min(inst.timeout, float(timeout))
            spec = read_vnnlib(inst.vnnlib_file)
            res = verify(_MODELS[key], spec, timeout=limit_s, seed=shared["seed"])
            run = time.perf_counter() - t1
            result = res.vnncomp
            note = f"limit {limit_s:g}s"
            if res.counterexample is not None:
                cex = res.counterexample.to_vnncomp()
        except RobevalError as exc:
            run = time.perf_counter() - t0 - prepare
            note = f"error: {str(exc).splitlines()[0]}"
    return ResultRow(name, _listed(name, inst.onnx), _listed(name, inst.vnnlib), prepare, result, run), note, cex


def write_results(rows: list[ResultRow], path: str | Path) -> None:
    """The competition's results CSV (no header)."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        for r in rows:
            writer.writerow([r.benchmark, r.onnx, r.vnnlib, f"{r.prepare_time:.9f}", r.result, f"{r.run_time:.9f}"])


def read_results(path: str | Path) -> list[ResultRow]:
    """Rows of a results CSV in the competition's layout (a header row, if any, is skipped)."""
    rows = []
    with open(path, newline="") as fh:
        for line, row in enumerate(csv.reader(fh), 1):
            if not row or row[0] == "benchmark":
                continue
            if len(row) < 6:
                raise SpecError(f"expected benchmark,onnx,vnnlib,prepare_time,result,run_time, got {row}",
                                str(path), line)
            result = row[4].strip().lower()
            if result not in RESULTS:
                raise SpecError(f"unknown result {row[4]!r}; expected one of {RESULTS}", str(path), line)
            try:
                rows.append(ResultRow(row[0], row[1], row[2], float(row[3]), result, float(row[5])))
            except ValueError:
                raise SpecError(f"times {row[3]!r}, {row[5]!r} are not numbers", str(path), line) from None
    return rows
