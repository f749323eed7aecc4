"""Adapter throughput on 10,000 MNIST test images: predict and input_gradient through each
framework's own runtime (native) against the converted robeval Network on NumPy (representation).

    python bench/adapters.py [--n 10000] [--batch 1000] [--threads 1] [--repeat 2] [--skip-keras]

Models are an MLP (784-256-256-10) and a CNN (conv16-pool-conv32-pool-fc100-fc10), randomly
initialised with a fixed seed (throughput does not depend on the weights), built the same way in
PyTorch and Keras. Both paths run in batches of ``--batch``; threads are pinned (default 1) so that
timings are repeatable on a shared machine, and the best of ``--repeat`` interleaved rounds is kept.
Printed: images per second for each path and the ratio representation / native time (> 1 means the
NumPy representation is slower). MNIST comes from $ROBEVAL_DATA (default /work/shared/data/mnist.npz).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

THREADS = next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), "1")
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
            "TF_NUM_INTEROP_THREADS"):
    os.environ.setdefault(var, THREADS)  # before numpy / torch / tensorflow are imported
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy  # noqa: E402

from robeval.adapters.gradients import loss_gradient_network  # noqa: E402
from robeval.data import load_dataset  # noqa: E402


def torch_models():
    import torch
    from torch import nn

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))
    return {"mlp": mlp.eval(), "cnn": cnn.eval()}


def keras_models():
    import keras

    L = keras.layers
    keras.utils.set_random_seed(0)
    mlp = keras.Sequential([keras.Input((28, 28, 1)), L.Flatten(), L.Dense(256, activation="relu"),
                            L.Dense(256, activation="relu"), L.Dense(10)])
    cnn = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(16, 3, padding="same", activation="relu"),
                            L.MaxPooling2D(2), L.Conv2D(32, 3, padding="same", activation="relu"),
                            L.MaxPooling2D(2), L.Flatten(), L.Dense(100, activation="relu"), L.Dense(10)])
    return {"mlp": mlp, "cnn": cnn}


def batched(fn, x, y, size):
    return numpy.concatenate([fn(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)])


def best_of(fns: dict, repeat: int) -> dict:
    """Best (wall, CPU) seconds of each function over interleaved rounds (shared machines drift;
    with one thread, this process's CPU time hardly depends on other load)."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[name] = (min(wall, best[name][0]), min(cpu, best[name][1]))
    return best


def bench(framework: str, adapter, x, y, batch: int, repeat: int) -> list[tuple]:
    net = adapter.to_network()
    adapter.batch_size = batch
    fns = {
        ("predict", "native"): lambda: adapter.predict(x),
        ("predict", "network"): lambda: batched(lambda a, b: net.forward(a), x, y, batch),
        ("input_gradient", "native"): lambda: adapter.input_gradient(x, y),
        ("input_gradient", "network"): lambda: batched(lambda a, b: loss_gradient_network(net, a, b), x, y, batch),
    }
    fns[("predict", "native")]()  # warm-up: lazy initialisation of the framework
    times = best_of(fns, repeat)
    rows = []
    for what in ("predict", "input_gradient"):
        (native, native_cpu), (network, network_cpu) = times[(what, "native")], times[(what, "network")]
        rows.append((framework, what, len(x) / native_cpu, len(x) / network_cpu, network_cpu / native_cpu,
                     network / native))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-keras", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    path = os.environ.get("ROBEVAL_DATA", "/work/shared/data/mnist.npz")
    test = load_dataset("mnist", split="test", limit=args.n, path=path)
    x, y = test.x, test.y
    rows = []
    if not args.skip_torch:
        import torch

        from robeval.adapters.torch import TorchModel

        torch.set_num_threads(args.threads)
        for name, model in torch_models().items():
            rows += bench(f"torch {name}", TorchModel(model, input_shape=(1, 28, 28)), x, y, args.batch, args.repeat)
    if not args.skip_keras:
        from robeval.adapters.keras import KerasModel

        for name, model in keras_models().items():
            rows += bench(f"keras {name}", KerasModel(model), x, y, args.batch, args.repeat)
    print(f"{len(x)} MNIST test images, batches of {args.batch}, {args.threads} thread(s), best of {args.repeat}")
    print("img/s per CPU second; ratios: network time / native time (> 1: the NumPy network is slower)")
    print(f"{'model':12s} {'call':15s} {'native img/s':>13s} {'network img/s':>14s} {'ratio (cpu)':>12s} "
          f"{'ratio (wall)':>13s}")
    for framework, what, native, network, ratio, ratio_wall in rows:
        print(f"{framework:12s} {what:15s} {native:13.0f} {network:14.0f} {ratio:12.2f} {ratio_wall:13.2f}")


if __name__ == "__main__":
    main()
