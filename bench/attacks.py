"""PGD-40 on 1,000 MNIST test images: robeval's PyTorch path against torchattacks in the same run, and
robeval's NumPy path (the converted Network, as for ONNX models) as a multiple of the PyTorch path.

    python bench/attacks.py [--n 1000] [--steps 40] [--eps 0.1] [--threads 1] [--profile]

A small CNN is trained for one pass over 20,000 training images (cached in /tmp). Both runs use
random_start=False and the same step size; robeval additionally runs without early stopping so
that every method computes exactly ``steps`` gradients per image. Targets: torch path / torchattacks
<= 1.05; NumPy path / torch path <= 2. Threads are pinned (default 1) for a fair, repeatable timing
on shared machines; MNIST comes from $ROBEVAL_DATA (default /work/shared/data/mnist.npz).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

THREADS = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), "1")
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, THREADS)  # before numpy is imported

import numpy  # noqa: E402
import torch  # noqa: E402

from robeval.adapters.base import NetworkModel  # noqa: E402
from robeval.certifiers.attacks import PGD  # noqa: E402
from robeval.data import load_dataset  # noqa: E402

CACHE = "/tmp/robeval_bench_mnist_cnn.pt"


def make_cnn() -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))


def trained_cnn(path: str | None) -> torch.nn.Sequential:
    net = make_cnn()
    if os.path.exists(CACHE):
        net.load_state_dict(torch.load(CACHE, weights_only=True))
        return net.eval()
    train = load_dataset("mnist", split="train", limit=20000, path=path)
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = torch.as_tensor(train.x), torch.as_tensor(train.y)
    for start in range(0, len(x), 128):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[start:start + 128]), y[start:start + 128]).backward()
        opt.step()
    torch.save(net.state_dict(), CACHE)
    return net.eval()


def timed(fn):
    """(wall seconds, CPU seconds of this process, result) of one run."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best is kept")
    ap.add_argument("--profile", action="store_true", help="profile the NumPy path's ops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = os.environ.get("ROBEVAL_DATA", "/work/shared/data/mnist.npz")
    net = trained_cnn(path)
    test = load_dataset("mnist", split="test", limit=args.n, path=path)
    x, y = test.x, test.y
    alpha = 2.5 * args.eps / args.steps
    print(f"PGD-{args.steps}, eps={args.eps}, alpha={alpha:g}, {len(x)} MNIST test images, {args.threads} thread(s), "
          f"torch {torch.__version__}, numpy {numpy.__version__}")

    try:
        from robeval.adapters.torch import TorchModel
        adapter = TorchModel(net, input_shape=(1, 28, 28))
    except ImportError:
        sys.exit("robeval.adapters.torch is missing")
    pgd = PGD(steps=args.steps, step_size=alpha, random_start=False, early_stop=False)
    early = PGD(steps=args.steps, step_size=alpha, random_start=False)
    numpy_model = NetworkModel(adapter.to_network())
    methods = {}
    try:
        import torchattacks

        ref = torchattacks.PGD(net, eps=args.eps, alpha=alpha, steps=args.steps, random_start=False)
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)

        def run_ref():
            adv = ref(xt, yt)
            with torch.no_grad():
                return float((net(adv).argmax(1).numpy() == y).mean())

        methods["torchattacks"] = run_ref
    except ImportError:
        print("torchattacks is not installed: pip install --no-deps torchattacks")
    methods["robeval torch (TorchModel)"] = lambda: pgd(adapter, x, y, args.eps).robust_accuracy
    methods["robeval torch, early stop"] = lambda: early(adapter, x, y, args.eps).robust_accuracy
    methods["robeval numpy (Network)"] = lambda: pgd(numpy_model, x, y, args.eps).robust_accuracy
    rows = {name: (float("inf"), float("inf"), None) for name in methods}
    for _ in range(args.repeat):  # interleaved rounds, best of each: shared machines drift
        for name, fn in methods.items():
            wall, cpu, acc = timed(fn)
            rows[name] = (min(wall, rows[name][0]), min(cpu, rows[name][1]), acc)

    for name, (wall, cpu, acc) in rows.items():
        print(f"{name:40s} wall {wall:7.2f} s   cpu {cpu:7.2f} s   robust accuracy {acc:.3f}")
    for clock, k in (("wall", 0), ("cpu", 1)):  # with one thread, CPU time is robust to other load
        torch_s = rows["robeval torch (TorchModel)"][k]
        if "torchattacks" in rows:
            print(f"[{clock}] torch path / torchattacks: {torch_s / rows['torchattacks'][k]:.2f}; target <= 1.05")
        numpy_s = rows["robeval numpy (Network)"][k]
        print(f"[{clock}] numpy path / torch path: {numpy_s / torch_s:.2f}; target <= 2")
    if args.profile:
        profile_ops(numpy_model, x[:200], y[:200])


def profile_ops(model, x, y) -> None:
    """Seconds per op for forward and vjp of the NumPy path (one gradient call on x)."""
    from robeval.ir.registry import get_op

    net, _ = model.network.strip_output_squashers()
    fwd, bwd = {}, {}
    values = {net.input_name: x}
    for node in net.nodes:
        t0 = time.perf_counter()
        values[node.name] = get_op(node.op).forward(numpy, node, *[values[n] for n in node.inputs])
        fwd[node.name] = time.perf_counter() - t0
    g = numpy.ones_like(values[net.output_name])
    grads = {net.output_name: g}
    for node in reversed(net.nodes):
        t0 = time.perf_counter()
        gins = get_op(node.op).vjp(numpy, node, [values[n] for n in node.inputs], grads.pop(node.name))
        bwd[node.name] = time.perf_counter() - t0
        grads.update({n: gi for n, gi in zip(node.inputs, gins)})
    total = sum(fwd.values()) + sum(bwd.values())
    print(f"NumPy path profile on {len(x)} images ({total:.3f} s per gradient call):")
    for node in net.nodes:
        print(f"  {node.name:12s} {node.op:10s} forward {fwd[node.name]:.4f} s   vjp {bwd[node.name]:.4f} s")


if __name__ == "__main__":
    main()
