"""Branch-and-bound throughput by optimiser dtype, measured side by side on one VNN-COMP instance.

    python bench/bab.py [NET.onnx.gz PROP.vnnlib.gz] [--seconds 60] [--dtypes float32,float64]

Runs ``prove_case`` (CROWN, alpha-CROWN, then beta-CROWN branch and bound; no falsifier) once per
dtype under the same time limit and prints domains bounded, domains per second and the ratio to
the first dtype. The verdicts always come from the float64 rigorous engine; only the optimiser's
arithmetic changes. Threads are pinned to 1 per BLAS (--threads N to change). The default instance
is mnist_fc 256x4 prop_8_0.03, a hard unsat case that neither dtype finishes in 60 s.
"""

from __future__ import annotations

import argparse
import os
import sys

THREADS = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), "1")
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, THREADS)  # before numpy is imported

import time  # noqa: E402
from pathlib import Path  # noqa: E402

from robeval.adapters.onnx import load_onnx  # noqa: E402
from robeval.verify import read_vnnlib  # noqa: E402
from robeval.verify.bab import BabSettings  # noqa: E402
from robeval.verify.prove import prove_case  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ROBEVAL_SHARED", ROOT.parent / "shared"))
BENCH = SHARED / "vnncomp" / "mnist_fc"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("net", nargs="?", default=str(BENCH / "onnx" / "mnist-net_256x4.onnx.gz"))
    p.add_argument("prop", nargs="?", default=str(BENCH / "vnnlib" / "prop_8_0.03.vnnlib.gz"))
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per dtype (default 60)")
    p.add_argument("--dtypes", default="float32,float64", help="comma-separated optimiser dtypes")
    p.add_argument("--threads", default=THREADS, help="BLAS threads (default 1)")
    p.add_argument("--refine", default="on", help="per-domain intermediate bounds: on, off or on,off")
    args = p.parse_args()
    for path in (args.net, args.prop):
        if not Path(path).is_file():
            print(f"error: {path} not found (set ROBEVAL_SHARED or give NET and PROP)", file=sys.stderr)
            return 2
    net = load_onnx(args.net, channels_last=False)
    spec = read_vnnlib(args.prop)
    print(f"{Path(args.net).name} {Path(args.prop).name}: {len(spec.cases)} case(s), {args.seconds:g} s per dtype")
    first = None
    runs = [(d, r) for r in args.refine.split(",") for d in args.dtypes.split(",")]
    for dtype, refine in runs:
        start = time.perf_counter()
        domains, verdicts, lowest = 0, [], []
        settings = BabSettings(dtype=dtype, refine=refine == "on")
        for case in spec.cases:
            status, detail = prove_case(net, case, start + args.seconds, settings=settings)
            domains += detail.get("domains", 0)
            verdicts.append(status)
            lowest.append(detail.get("open_lowest", float("nan")))
        wall = time.perf_counter() - start
        rate = domains / wall
        first = first or rate
        print(f"{dtype:>8} refine {refine:>3}: {'/'.join(verdicts):<8} {domains:>8} domains in {wall:6.1f} s"
              f" = {rate:7.1f} domains/s ({rate / first:.2f}x the first); lowest open bound"
              f" {min(lowest):.4f}, open {detail.get('open', 0)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
