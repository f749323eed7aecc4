"""IBP time over plain-forward time on the same representation, MLP and CNN with max-pooling,
over MNIST test images. Both passes run in float64 on the same batches, side by side.

    python bench/ibp.py [--limit 10000] [--device cpu]     # MNIST from $ROBEVAL_DATA
"""

from __future__ import annotations

import argparse
import os
import time

import numpy

from robeval.backend import to_device, xp_for_device
from robeval.certifiers.ibp import ibp_margin_bounds
from robeval.data import load_dataset
from robeval.ir import Network, Node


def mlp(rng):
    sizes = (784, 100, 100, 100, 10)
    nodes, prev = [Node("flat", "flatten", ("input",))], "flat"
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        nodes.append(Node(f"fc{i}", "dense", (prev,), {"weight": rng.normal(size=(b, a)) / a**0.5,
                                                      "bias": rng.normal(size=b) * 0.1}))
        prev = f"fc{i}"
        if i < len(sizes) - 2:
            nodes.append(Node(f"relu{i}", "relu", (prev,)))
            prev = f"relu{i}"
    return Network(nodes, (1, 28, 28))


def cnn(rng):
    """conv 16@3x3 -> relu -> maxpool 2 -> conv 32@3x3 -> relu -> maxpool 2 -> dense 100 -> dense 10."""
    def conv(name, src, cin, cout):
        return Node(name, "conv", (src,), {"weight": rng.normal(size=(cout, cin, 3, 3)) / (3 * cin**0.5),
                                           "bias": rng.normal(size=cout) * 0.1}, {"padding": (1, 1, 1, 1)})
    nodes = [conv("c1", "input", 1, 16), Node("r1", "relu", ("c1",)),
             Node("p1", "maxpool", ("r1",), attrs={"kernel": (2, 2)}),
             conv("c2", "p1", 16, 32), Node("r2", "relu", ("c2",)),
             Node("p2", "maxpool", ("r2",), attrs={"kernel": (2, 2)}), Node("f", "flatten", ("p2",)),
             Node("fc1", "dense", ("f",), {"weight": rng.normal(size=(100, 1568)) / 40, "bias": numpy.zeros(100)}),
             Node("r3", "relu", ("fc1",)),
             Node("fc2", "dense", ("r3",), {"weight": rng.normal(size=(10, 100)) / 10, "bias": numpy.zeros(10)})]
    return Network(nodes, (1, 28, 28))


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    xp = xp_for_device(args.device)
    ds = load_dataset("mnist", limit=args.limit, path=os.environ.get("ROBEVAL_DATA"))
    x = to_device(ds.x.astype(numpy.float64), xp)
    y = to_device(ds.y, xp)
    rng = numpy.random.default_rng(0)
    print(f"{len(ds)} MNIST test images, batches of {args.batch}, float64, device {args.device}")
    print(f"{'model':<6} {'forward s':>10} {'IBP s':>10} {'IBP/forward':>12}")
    for name, net in (("mlp", mlp(rng)), ("cnn", cnn(rng))):
        net = net.to(args.device, dtype=numpy.float64)
        batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(ds), args.batch)]

        def forward(net=net, batches=batches):
            for xb, _ in batches:
                net.forward(xb)

        def ibp(net=net, batches=batches):
            for xb, yb in batches:
                ibp_margin_bounds(net, xb, yb, args.eps)

        tf, ti = timed(forward), timed(ibp)
        print(f"{name:<6} {tf:>10.3f} {ti:>10.3f} {ti / tf:>11.2f}x")


if __name__ == "__main__":
    main()
