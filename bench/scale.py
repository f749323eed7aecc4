"""Wall time of the local, process and Ray executors with 1 and 2 workers: IBP over 10,000 MNIST test
images and CROWN over 1,000, on the reference MNIST MLP (784-100-100-100-10), as ratios to the local
one-pass run; every sharded result is checked equal to the local sharded run's. Also the fixed cost
of each executor (pool / cluster start) and the overhead per shard (many near-empty shards). Columns:
wall seconds, their ratio to the one-pass run (no executor) and to the local executor's sharded run.

    ROBEVAL_DATA=/work/shared/data python bench/scale.py [--ibp 10000] [--crown 1000] [--shard-size 1000]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a Ray started here listens on loopback only

from robeval.adapters.base import load_model  # noqa: E402
from robeval.certifiers import get_certifier  # noqa: E402
from robeval.data import load_dataset  # noqa: E402
from robeval.executors import get_executor  # noqa: E402
from robeval.executors.base import Sharding  # noqa: E402

SHARED = Path(os.environ.get("ROBEVAL_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def timed(method, net, x, y, eps, sharding=None):
    t0 = time.perf_counter()
    r = get_certifier(method, sharding=sharding).certify(net, x, y, eps)
    return time.perf_counter() - t0, r


def same(a, b) -> bool:
    return bool(numpy.array_equal(a.bound, b.bound) and numpy.array_equal(a.verdicts, b.verdicts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ibp", type=int, default=10000, help="images for IBP")
    ap.add_argument("--crown", type=int, default=1000, help="images for CROWN")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--crown-shard-size", type=int, default=250)
    ap.add_argument("--model", default=str(SHARED / "reference" / "mlp.onnx"))
    args = ap.parse_args()

    net = load_model(args.model).to_network()
    ds = load_dataset("mnist", limit=max(args.ibp, args.crown))
    x, y = ds.x.astype(numpy.float64), numpy.asarray(ds.y)
    eps = [0.01, 0.03]
    print(f"model {Path(args.model).name}; {len(os.sched_getaffinity(0))} CPU core(s); eps {eps}; float64; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print("process times include starting the pool (spawned workers import robeval), per run; every shard "
          "runs BLAS on one thread (workers are the parallelism), the one-pass run on all cores")

    executors = [("process", 1), ("process", 2), ("ray", 1), ("ray", 2)]
    ray = None
    for method, n, size in (("ibp", args.ibp, args.shard_size), ("crown", args.crown, args.crown_shard_size)):
        xs, ys = x[:n], y[:n]
        base, one = timed(method, net, xs, ys, eps)
        t_local, local = timed(method, net, xs, ys, eps, Sharding(get_executor("local"), shard_size=size))
        shards = -(-n // size)
        print(f"\n{method.upper()} over {n} images, {shards} shards of {size}  (one pass: {base:.2f}s, "
              f"{n / base:.0f} images/s; local sharded equal to one pass: {same(one, local)})")
        print(f"  {'executor':<10} {'workers':>7} {'wall s':>8} {'/one pass':>9} {'/local':>7} {'images/s':>9}  "
              "equal to local")
        print(f"  {'local':<10} {1:>7} {t_local:>8.2f} {t_local / base:>8.2f}x {1:>6.2f}x {n / t_local:>9.0f}  "
              "(reference)")
        for name, w in executors:
            if name == "ray" and ray is None:
                import ray as ray_module

                t0 = time.perf_counter()
                ray_module.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                                runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
                ray = ray_module
                start = time.perf_counter() - t0
                t0 = time.perf_counter()
                timed("ibp", net, x[:4], y[:4], eps, Sharding(get_executor("ray", workers=2), shard_size=1))
                print(f"  (Ray cluster start {start:.2f}s and first tasks (worker processes) "
                      f"{time.perf_counter() - t0:.2f}s, once per cluster, not counted below)")
            t, r = timed(method, net, xs, ys, eps, Sharding(get_executor(name, workers=w), shard_size=size))
            print(f"  {name:<10} {w:>7} {t:>8.2f} {t / base:>8.2f}x {t / t_local:>6.2f}x {n / t:>9.0f}  "
                  f"{same(local, r)}")

    # per-shard overhead: 40 one-image shards vs one 40-image shard, IBP (the work itself is ~nothing)
    print("\nper-shard overhead (40 one-image IBP shards minus one 40-image shard, per shard; 2 workers for "
          "process/ray, pool start included for process)")
    for name in ("local", "process", "ray"):
        ex = get_executor(name, workers=None if name == "local" else 2)
        t_many, _ = timed("ibp", net, x[:40], y[:40], eps, Sharding(ex, shard_size=1))
        t_one, _ = timed("ibp", net, x[:40], y[:40], eps, Sharding(ex, shard_size=40))
        print(f"  {name:<8} {1000 * (t_many - t_one) / 39:8.2f} ms/shard   (one shard: {t_one:.2f}s, "
              f"40 shards: {t_many:.2f}s)")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    if ray is not None:
        ray.shutdown()


if __name__ == "__main__":
    main()
