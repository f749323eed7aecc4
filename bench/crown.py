"""IBP, CROWN-IBP and CROWN: time and certified accuracy on MNIST test images, as ratios to a plain
float64 forward pass over the same images in the same run.

Models: the reference MLP 784-100-100-100-10 (``$ROBEVAL_SHARED/reference/mlp.onnx``, a plain, not
robustly trained classifier) and a small CNN (conv 8@4x4/2 -> relu -> conv 16@4x4/2 -> relu -> dense
100 -> relu -> dense 10), trained here for ``--cnn-steps`` Adam steps with torch when it is installed,
otherwise left with random weights (the output says which).

The CNN's CROWN is also run with each speed-up switched off beside the default, with the largest
difference between the two bounds: convolutions bounded by dense rows only (``_Batch.patches =
False``) against patches mode, and the batch's union of unstable neurons (``_Batch.per_sample_rows
= False``) against each sample's own.

    python bench/crown.py [--limit 10000] [--cnn-limit 1000] [--eps 0.01,0.1]   # MNIST: $ROBEVAL_DATA
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy

from robeval.certifiers import get_certifier
from robeval.certifiers.crown import thread_count
from robeval.data import load_dataset
from robeval.ir import Network, Node

SHARED = Path(os.environ.get("ROBEVAL_SHARED", Path(__file__).resolve().parents[2] / "shared"))
METHODS = ("ibp", "crown-ibp", "crown")


def reference_mlp(path: Path) -> Network:
    from robeval.adapters.onnx import load_onnx

    return load_onnx(str(path))


def cnn_nodes(params) -> Network:
    c1w, c1b, c2w, c2b, f1w, f1b, f2w, f2b = params
    def conv():  # a fresh dict per node: the network writes each node's input shape into its attrs
        return {"stride": (2, 2), "padding": (1, 1, 1, 1)}

    nodes = [Node("c1", "conv", ("input",), {"weight": c1w, "bias": c1b}, conv()), Node("r1", "relu", ("c1",)),
             Node("c2", "conv", ("r1",), {"weight": c2w, "bias": c2b}, conv()), Node("r2", "relu", ("c2",)),
             Node("f", "flatten", ("r2",)), Node("fc1", "dense", ("f",), {"weight": f1w, "bias": f1b}),
             Node("r3", "relu", ("fc1",)), Node("fc2", "dense", ("r3",), {"weight": f2w, "bias": f2b})]
    return Network(nodes, (1, 28, 28))


def small_cnn(steps: int, data_path) -> tuple[Network, str]:
    """The CNN with weights trained for ``steps`` Adam steps (torch), or random ones."""
    rng = numpy.random.default_rng(0)
    shapes = [(8, 1, 4, 4), (8,), (16, 8, 4, 4), (16,), (100, 784), (100,), (10, 100), (10,)]
    params = [rng.normal(size=s) / numpy.sqrt(numpy.prod(s[1:])) if len(s) > 1 else numpy.zeros(s) for s in shapes]
    try:
        import torch
    except ImportError:
        return cnn_nodes(params), "random weights (torch not installed)"
    if steps <= 0:
        return cnn_nodes(params), "random weights"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 4, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 4, 2, 1),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(784, 100), torch.nn.ReLU(),
                                torch.nn.Linear(100, 10))
    train = load_dataset("mnist", split="train", limit=128 * steps, path=data_path)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = torch.from_numpy(train.x), torch.from_numpy(train.y)
    for i in range(steps):
        xb, yb = xs[(i * 128) % len(xs):][:128], ys[(i * 128) % len(xs):][:128]
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = [p.detach().double().numpy() for p in model.parameters()]
    return cnn_nodes(params), f"trained {steps} Adam steps (batch 128, torch)"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(name, net, x, y, eps):
    net = net.astype(numpy.float64)
    t_fwd, _ = timed(lambda: [net.forward(x[i:i + 1000]) for i in range(0, len(x), 1000)])
    print(f"\n{name}: {len(x)} images, forward {t_fwd:.3f} s")
    print(f"{'method':<10} {'eps':>6} {'seconds':>9} {'x forward':>10} {'certified':>10} {'clean':>7}")
    for method in METHODS:
        seconds, res = timed(lambda m=method: get_certifier(m).certify(net, x, y, eps))
        for i, e in enumerate(res.eps):
            print(f"{method:<10} {e:>6g} {res.seconds[i]:>9.3f} {res.seconds[i] / t_fwd:>9.1f}x "
                  f"{res.certified_accuracy[i]:>10.4f} {res.clean_accuracy:>7.4f}")
        print(f"{'':<10} {'all':>6} {seconds:>9.3f} {seconds / t_fwd:>9.1f}x")


def ablation(net, x, y, eps, switch: str, off: str, on: str):
    """CROWN with the ``_Batch`` switch off against on (the default), side by side on the same images,
    with the largest difference between the two bounds."""
    from robeval.certifiers.crown import _Batch, crown_margin_bounds

    net = net.astype(numpy.float64)
    print(f"\nCROWN on the CNN, {on} against {off} ({len(x)} images; _Batch.{switch})")
    print(f"{'eps':>6} {'off s':>8} {'on s':>8} {'speed-up':>9} {'max |diff|':>11} {'certified':>10}")
    for e in eps:
        times, bounds = {}, {}
        for mode in (False, True):
            setattr(_Batch, switch, mode)
            times[mode], bounds[mode] = timed(lambda e=e: crown_margin_bounds(net, x, y, e, method="crown"))
        setattr(_Batch, switch, True)
        finite = numpy.isfinite(bounds[False])
        diff = float(numpy.abs(bounds[True][finite] - bounds[False][finite]).max())
        print(f"{e:>6g} {times[False]:>8.3f} {times[True]:>8.3f} {times[False] / times[True]:>8.2f}x "
              f"{diff:>11.1e} {(bounds[True].min(axis=1) > 0).mean():>10.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=10000, help="MNIST test images for the MLP")
    parser.add_argument("--cnn-limit", type=int, default=1000, help="MNIST test images for the CNN")
    parser.add_argument("--eps", default="0.01,0.1", help="comma-separated L-inf radii")
    parser.add_argument("--cnn-steps", type=int, default=300, help="training steps for the CNN (0: random)")
    parser.add_argument("--model", default=str(SHARED / "reference" / "mlp.onnx"))
    args = parser.parse_args()
    eps = [float(e) for e in args.eps.split(",")]
    data = os.environ.get("ROBEVAL_DATA") or (SHARED / "data" / "mnist.npz")
    ds = load_dataset("mnist", limit=max(args.limit, args.cnn_limit), path=data)
    x, y = ds.x.astype(numpy.float64), ds.y
    memory = os.environ.get("ROBEVAL_MEMORY_MB", "default")
    print(f"float64 on the CPU, {thread_count(numpy)} thread(s), $ROBEVAL_MEMORY_MB={memory}")
    run("reference MLP 784-100-100-100-10", reference_mlp(Path(args.model)), x[:args.limit], y[:args.limit], eps)
    cnn, how = small_cnn(args.cnn_steps, data)
    run(f"small CNN, {how}", cnn, x[:args.cnn_limit], y[:args.cnn_limit], eps)
    xc, yc = x[:args.cnn_limit], y[:args.cnn_limit]
    ablation(cnn, xc, yc, eps, "patches", "dense rows only", "patches mode")
    ablation(cnn, xc, yc, eps, "per_sample_rows", "the batch's union of unstable neurons",
             "per-sample neuron selection")


if __name__ == "__main__":
    main()
