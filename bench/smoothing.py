"""Randomized-smoothing throughput: images certified per second at n = 10,000 estimation draws
(plus n0 = 100 selection draws), and the ratio to one plain forward pass per draw on the same
backend (the same number of rows, in the same batch size, without noise, counting or statistics).

NumPy (the network representation), torch (an adapter-style predict through ``certify_fn``) and,
when CuPy and a GPU exist, CuPy; a backend that is missing is reported as skipped.

    python bench/smoothing.py [--images 4] [--draws 10000] [--rows 4096] [--model mlp|cnn]
"""

from __future__ import annotations

import argparse
import time

import numpy

from robeval.certifiers.smoothing import Smoothing
from robeval.ir import Network, Node


def mlp(rng):
    """CIFAR-shaped MLP: flatten 3x32x32 -> dense 256 -> relu -> dense 256 -> relu -> dense 10."""
    sizes, nodes, prev = (3072, 256, 256, 10), [Node("flat", "flatten", ("input",))], "flat"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        nodes.append(Node(f"fc{i}", "dense", (prev,), {"weight": rng.normal(size=(b, a)) / a**0.5,
                                                      "bias": rng.normal(size=b) * 0.1}))
        prev = f"fc{i}"
        if i < len(sizes) - 2:
            nodes.append(Node(f"relu{i}", "relu", (prev,)))
            prev = f"relu{i}"
    return Network(nodes, (3, 32, 32))


def cnn(rng):
    """conv 16@4x4 s2 -> relu -> conv 32@4x4 s2 -> relu -> dense 100 -> relu -> dense 10 on 3x32x32."""
    nodes = [Node("c1", "conv", ("input",), {"weight": rng.normal(size=(16, 3, 4, 4)) / 7, "bias": numpy.zeros(16)},
                  {"stride": (2, 2), "padding": (1, 1, 1, 1)}), Node("r1", "relu", ("c1",)),
             Node("c2", "conv", ("r1",), {"weight": rng.normal(size=(32, 16, 4, 4)) / 16, "bias": numpy.zeros(32)},
                  {"stride": (2, 2), "padding": (1, 1, 1, 1)}), Node("r2", "relu", ("c2",)),
             Node("f", "flatten", ("r2",)),
             Node("fc1", "dense", ("f",), {"weight": rng.normal(size=(100, 2048)) / 45, "bias": numpy.zeros(100)}),
             Node("r3", "relu", ("fc1",)),
             Node("fc2", "dense", ("r3",), {"weight": rng.normal(size=(10, 100)) / 10, "bias": numpy.zeros(10)})]
    return Network(nodes, (3, 32, 32))


def plain_seconds(forward, x_rows, total_rows: int, sync=lambda: None) -> float:
    """Time of ``total_rows`` rows through ``forward`` in batches of len(x_rows), no noise or counting."""
    done, t0 = 0, time.perf_counter()
    while done < total_rows:
        m = min(len(x_rows), total_rows - done)
        forward(x_rows[:m])
        done += m
    sync()
    return time.perf_counter() - t0


def torch_predict(net):
    """A torch.nn model computing the same function, and a host predict for certify_fn."""
    import torch

    layers = []
    for node in net.nodes:
        p = {k: torch.as_tensor(numpy.asarray(v), dtype=torch.float32) for k, v in node.params.items()}
        if node.op == "flatten":
            layers.append(torch.nn.Flatten())
        elif node.op == "relu":
            layers.append(torch.nn.ReLU())
        elif node.op == "dense":
            lin = torch.nn.Linear(p["weight"].shape[1], p["weight"].shape[0])
            lin.weight.data, lin.bias.data = p["weight"], p["bias"]
            layers.append(lin)
        else:  # conv
            conv = torch.nn.Conv2d(p["weight"].shape[1], p["weight"].shape[0], 4, stride=2, padding=1)
            conv.weight.data, conv.bias.data = p["weight"], p["bias"]
            layers.append(conv)
    model = torch.nn.Sequential(*layers).eval()

    def predict(x):
        with torch.no_grad():
            return model(torch.from_numpy(numpy.ascontiguousarray(x, dtype=numpy.float32))).numpy()

    return predict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--draws", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=4096, help="noisy inputs per forward call")
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    args = ap.parse_args()
    rng = numpy.random.default_rng(0)
    net = (mlp if args.model == "mlp" else cnn)(rng)
    x = rng.uniform(0, 1, (args.images, 3, 32, 32)).astype(numpy.float32)
    y = numpy.zeros(args.images, dtype=numpy.int64)
    total = args.images * (100 + args.draws)
    rows = []

    def run(label, certify, forward, x_rows, sync=lambda: None):
        certify()  # warm-up (allocations, kernel compilation)
        t0 = time.perf_counter()
        certify()
        sync()
        seconds = time.perf_counter() - t0
        base = plain_seconds(forward, x_rows, total, sync)
        rows.append((label, args.images / seconds, seconds, base, seconds / base))

    cert = Smoothing(sigma=0.25, n0=100, n=args.draws, batch_size=args.rows)
    net32 = net.to("cpu", dtype=numpy.float32)
    x_rows = numpy.repeat(x[:1], args.rows, axis=0)
    run("numpy (representation)", lambda: cert.certify(net, x, y, [0.5]), net32.forward, x_rows)
    skipped = []
    try:
        predict = torch_predict(net)
        run("torch (certify_fn)", lambda: cert.certify_fn(predict, x, y, [0.5], 10), predict, x_rows)
    except ImportError:
        skipped.append("torch: not installed")
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
        gpu = Smoothing(sigma=0.25, n0=100, n=args.draws, batch_size=args.rows, device="cuda")
        net_gpu = net.to("cuda", dtype=numpy.float32)
        sync = cupy.cuda.Stream.null.synchronize
        run("cupy (representation)", lambda: gpu.certify(net, x, y, [0.5]), net_gpu.forward, cupy.asarray(x_rows),
            sync)
    except Exception as exc:  # ImportError, no driver, no device
        skipped.append(f"cupy: {type(exc).__name__}: {exc}"[:120])
    print(f"model: {args.model}, {args.images} images, n0=100, n={args.draws}, {args.rows} rows per forward")
    print(f"{'backend':<24} {'images/s':>10} {'smoothing s':>12} {'plain fwd s':>12} {'ratio':>7}")
    for label, ips, s, b, r in rows:
        print(f"{label:<24} {ips:>10.3f} {s:>12.3f} {b:>12.3f} {r:>7.2f}")
    for s in skipped:
        print(f"skipped: {s}")


if __name__ == "__main__":
    main()
