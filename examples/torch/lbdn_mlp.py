"""LBDN (sandwich layers, Lipschitz bound gamma = 5) vs a plain MLP on MNIST, 784-64-64-10
(after the RobustNeuralNetworks.jl tutorial).

Both networks are trained the same way (cross-entropy, Adam 1e-3 then 1e-4, mini-batches of
128); then uniform noise U[-e, e] is added to the test images (not clipped, as in the tutorial)
for e from 0 to 200/255. Reports clean accuracy (tutorial: 97.24% LBDN, 96.61% plain MLP) and the
accuracy of both networks at each noise level; saves a PNG plot when matplotlib is installed.

    ROBEVAL_DATA=/path/to/mnist.npz python examples/torch/lbdn_mlp.py [--epochs 20] [--quick]
"""

from __future__ import annotations

import numpy as np
import torch
from _shared import Timer, mnist, parse_args, plot_curves, report
from torch import nn

from robeval.training.torch import LBDN, Trainer, accuracy


def plain_mlp() -> nn.Sequential:
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 10))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
    return net


def train(model: nn.Module, data, epochs: int, out: str, name: str, progress: bool, seed: int = 0) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(epochs * 3 // 4, 1)], gamma=0.1)
    Trainer(model, opt, seed=seed, epochs=epochs, batch_size=128, scheduler=sched, checkpoint=f"{out}/{name}.pt",
            onnx_path=f"{out}/{name}.onnx", progress=progress).fit(data[:2], val=data[2:4])


def noisy_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, e: float, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    noise = (2 * torch.rand(x.shape, generator=g) - 1) * e
    return accuracy(model, x + noise, y)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=20, gamma=(float, 5.0, "Lipschitz bound"))
    timer = Timer()
    data = mnist(args.quick)
    epochs = 1 if args.quick else args.epochs
    lbdn = LBDN(784, (64, 64), 10, gamma=args.gamma)
    dense = plain_mlp()
    train(lbdn, data, epochs, args.out, "lbdn_mlp", not args.quick, args.seed)
    train(dense, data, epochs, args.out, "dense_mlp", not args.quick, args.seed)
    xte, yte = data[4], data[5]
    levels = np.linspace(0, 200, 10) / 255
    curves = {f"LBDN (gamma={args.gamma:g})": [], "plain MLP": []}
    for e in levels:
        curves[f"LBDN (gamma={args.gamma:g})"].append(noisy_accuracy(lbdn, xte, yte, e, args.seed))
        curves["plain MLP"].append(noisy_accuracy(dense, xte, yte, e, args.seed))
    rows: dict[str, float | str] = {"LBDN Lipschitz bound": f"{lbdn.lipschitz_bound():.4f}"}
    for label, acc in curves.items():
        for e, a in zip(levels, acc):
            rows[f"{label}, noise {e * 255:.0f}/255"] = a
    path = plot_curves(levels, curves, f"{args.out}/lbdn_mnist_robust.png", "noise level e (uniform in [-e, e])")
    rows["plot"] = path or "matplotlib not installed"
    report(f"lbdn_mlp ({epochs} epochs, {len(data[0])} training images)", rows, timer())


if __name__ == "__main__":
    main()
