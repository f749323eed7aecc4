"""`robeval verify NET PROP` and `robeval vnncomp run --benchmark DIR`: VNN-LIB properties.

`verify` exit codes: 0 the property holds, 1 it does not hold or could not be decided (violated,
unknown, timeout: the verdict line says which), 2 usage error, 3 any evaluation error. `vnncomp run`
exits 0 when every instance ran (whatever the verdicts), 3 when an instance hit an error or nothing
could be run."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import EXIT_ERROR, reports_errors, write_json


def verdict_line(result) -> str:
    """'holds (unsat) in 1.23s', with the case and disjunct of a counterexample."""
    line = f"{result.status} ({result.vnncomp}) in {result.time:.2f}s"
    if result.counterexample is not None:
        cex = result.counterexample
        line += f": counterexample in case {cex.case}, disjunct {cex.disjunct}, replayed on the model"
    return line


@click.command("verify")
@click.argument("net", type=click.Path(dir_okay=False))
@click.argument("prop", type=click.Path(dir_okay=False))
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="seconds for the whole verification")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="write the result (per-case detail, counterexample) as JSON to this file ('-' for stdout)")
@click.option("--counterexample", "cex_path", type=click.Path(dir_okay=False), default=None,
              help="write the VNN-COMP result file here: 'sat' and the counterexample, else the verdict word")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the falsifier's random starts")
@click.option("--progress/--no-progress", default=False,
              help="progress lines on stderr: each stage, each hidden-layer pass, branch and bound every 10 s")
@reports_errors
def verify(net, prop, timeout, json_path, cex_path, seed, progress):
    """Verify the VNN-LIB property PROP (.vnnlib or .vnnlib.gz) on the network NET (.onnx, .onnx.gz
    or any model robeval loads): print holds / violated / unknown / timeout and the time taken.
    Inputs X_i are NET's input tensor flattened in row-major order; outputs Y_j its output."""
    from ..verify import read_vnnlib
    from ..verify import verify as verify_api
    from ..verify.verifier import prepare_model

    model = prepare_model(net)
    spec = read_vnnlib(prop)
    result = verify_api(model, spec, timeout=timeout, seed=seed, progress=progress)
    click.echo(verdict_line(result))
    if cex_path:
        text = result.counterexample.to_vnncomp() if result.counterexample is not None else result.vnncomp + "\n"
        Path(cex_path).write_text(text)
        click.echo(f"wrote {cex_path}", err=True)
    write_json({"net": net, "property": prop, **result.to_dict()}, json_path)
    sys.exit(0 if result.status == "holds" else 1)


@click.group("vnncomp")
def vnncomp():
    """Run VNN-COMP benchmark folders (instances.csv, ONNX nets, VNN-LIB properties)."""


@vnncomp.command("run")
@click.option("--benchmark", "benchmark", type=click.Path(file_okay=False), required=True,
              help="the benchmark folder (with instances.csv, onnx/ and vnnlib/ as the competition ships them)")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="cap on every instance's time limit, in seconds (default: each instance's own)")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="the results CSV to write (benchmark,onnx,vnnlib,prepare_time,result,run_time)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="run only the first N instances")
@click.option("--instances", default=None, help="the instances CSV, if not DIR/instances.csv")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--executor", type=click.Choice(["local", "process", "ray"]), default="local", show_default=True,
              help="where instances run: here one at a time, or --workers at once on a process pool or Ray "
                   "(each under its own time limit, BLAS at one thread per worker)")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="instances at once with --executor process/ray (default: the CPU count, or the cluster's)")
@click.option("--ray-address", default=None, help="an existing Ray cluster to join (default: start a local one)")
@reports_errors
def run(benchmark, timeout, out_path, limit, instances, seed, executor, workers, ray_address):
    """Verify every instance of --benchmark and write the competition's results CSV to --out, with
    one progress line per instance on stderr and the counterexamples of sat results in
    OUT_counterexamples/ beside it."""
    from ..verify.vnncomp import run_benchmark, write_results

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    cex_dir = out.with_name(out.stem + "_counterexamples")
    rows, errors = [], 0
    order = {}  # rows finish in any order on several workers; the CSV keeps the instances' order


    def report(i, n, inst, row, note):
        nonlocal errors
        errors += row.result == "error"
        order[id(row)] = i
        click.echo(f"[{i}/{n}] {inst.onnx} {inst.vnnlib}: {row.result} in {row.run_time:.2f}s "
                   f"(prepare {row.prepare_time:.2f}s; {note})", err=True)

    for row in run_benchmark(benchmark, timeout=timeout, limit=limit, instances=instances, seed=seed,
                             counterexamples=cex_dir, report=report, executor=executor, workers=workers,
                             address=ray_address):
        rows.append(row)
        # rewritten after each instance: a long run keeps what it finished
        write_results(sorted(rows, key=lambda r: order[id(r)]), out)
    counts = {r: sum(row.result == r for row in rows) for r in ("unsat", "sat", "unknown", "timeout", "error")}
    click.echo(f"{len(rows)} instance(s): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    click.echo(f"wrote {out}", err=True)
    if errors or not rows:
        sys.exit(EXIT_ERROR)
