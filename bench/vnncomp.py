"""A VNN-COMP benchmark folder run by ``robeval.verify``, side by side with a published results CSV.

    python bench/vnncomp.py [--benchmark ../shared/vnncomp/mnist_fc] [--timeout T] [--limit N]
                            [--reference alpha_beta_crown_2022.csv] [--out results.csv]

Every instance runs under its own time limit (capped by --timeout), one progress line each. The
table gives the counts of unsat / sat / unknown / timeout / error for robeval and the reference over
the instances run, and the per-instance time. An instance where one side says sat and the other
unsat is a soundness bug of one of them: it is listed loudly and the script exits 1. Threads are
pinned to 1 per BLAS (set --threads) for repeatable timings on shared machines.
"""

from __future__ import annotations

import argparse
import os
import sys

THREADS = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), "1")
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, THREADS)  # before numpy is imported

from pathlib import Path  # noqa: E402

from robeval.verify.vnncomp import ResultRow, read_results, run_benchmark, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ROBEVAL_SHARED", ROOT.parent / "shared"))
RESULTS = ("unsat", "sat", "unknown", "timeout", "error")


def compare(ours: list[ResultRow], reference: list[ResultRow]) -> tuple[list[str], list[str]]:
    """(table lines, contradiction lines) over the instances both ran."""
    ref = {r.key(): r for r in reference}
    matched = [(o, ref.get(o.key())) for o in ours]
    lines = [f"{'result':<10} {'robeval':>8} {'reference':>10}"]
    for res in RESULTS:
        n_ours = sum(o.result == res for o, _ in matched)
        n_ref = sum(r is not None and r.result == res for _, r in matched)
        lines.append(f"{res:<10} {n_ours:>8} {n_ref:>10}")
    missing = sum(r is None for _, r in matched)
    if missing:
        lines.append(f"({missing} instance(s) have no reference row)")
    solved = [(o, r) for o, r in matched if r is not None]
    lines.append(f"{'solved':<10} {sum(o.result in ('sat', 'unsat') for o, _ in solved):>8} "
                 f"{sum(r.result in ('sat', 'unsat') for _, r in solved):>10}")
    lines.append("")
    lines.append(f"{'onnx':<24} {'vnnlib':<22} {'robeval':>8} {'time':>8} {'reference':>10} {'time':>8}")
    bad = []
    for o, r in matched:
        onnx, prop = o.key()
        flag = ""
        if r is not None and {o.result, r.result} == {"sat", "unsat"}:
            flag = "   <-- CONTRADICTION"
            bad.append(f"{onnx} {prop}: robeval says {o.result}, the reference {r.result}")
        ref_res, ref_t = (r.result, f"{r.run_time:.2f}") if r is not None else ("-", "-")
        lines.append(f"{onnx[:24]:<24} {prop[:22]:<22} {o.result:>8} {o.run_time:>8.2f} {ref_res:>10} {ref_t:>8}"
                     + flag)
    return lines, bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default=str(SHARED / "vnncomp" / "mnist_fc"))
    parser.add_argument("--timeout", type=float, default=None, help="cap on each instance's time limit (s)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N instances")
    parser.add_argument("--instances", default=None, help="instances CSV if not BENCHMARK/instances.csv")
    parser.add_argument("--reference", default=None,
                        help="published results CSV (default: the one *_2022.csv in the folder, if any)")
    parser.add_argument("--out", default=None, help="also write robeval's results CSV here")
    parser.add_argument("--threads", default=THREADS, help="BLAS threads (read before numpy loads)")
    args = parser.parse_args(argv)
    bench = Path(args.benchmark)
    ref_path = Path(args.reference) if args.reference else next(iter(sorted(bench.glob("*_20*.csv"))), None)
    reference = read_results(ref_path) if ref_path else []

    def report(i, n, inst, row, note):
        print(f"[{i}/{n}] {inst.onnx} {inst.vnnlib}: {row.result} in {row.run_time:.2f}s ({note})",
              file=sys.stderr, flush=True)

    rows = list(run_benchmark(bench, timeout=args.timeout, limit=args.limit, instances=args.instances,
                              report=report))
    if args.out:
        write_results(rows, args.out)
    print(f"benchmark: {bench}   instances: {len(rows)}   timeout cap: {args.timeout}   "
          f"reference: {ref_path or 'none'}")
    lines, bad = compare(rows, reference)
    print("\n".join(lines))
    total = sum(r.run_time for r in rows)
    print(f"\nrobeval total time {total:.1f}s, mean {total / max(len(rows), 1):.2f}s per instance")
    if bad:
        print("\n" + "!" * 78)
        print(f"SOUNDNESS BUG: {len(bad)} instance(s) where robeval and the reference contradict (sat vs unsat):")
        for b in bad:
            print("  " + b)
        print("!" * 78)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
