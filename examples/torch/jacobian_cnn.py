"""Jacobian regularisation of a small CNN on MNIST vs the same CNN trained without it (after
the MATLAB example "Train robust deep learning network with Jacobian regularization").

CNN: conv5x5(20)-BN-ReLU, conv3x3(20)-BN-ReLU, conv3x3(20)-BN-ReLU, dense 10; SGD with momentum
0.9, learning rate 0.01 (0.001 for the last --decay-epochs), batch 32, 15 epochs; loss =
cross-entropy + 1/2 x (random-projection estimate of ||J||_F^2 of the softmax probabilities, as
MATLAB's network ends in softmax), one projection. MATLAB trains on its 5,000-image digit set;
here the first --train-size MNIST training images are used. Test images have a proportion p of their
pixels replaced by uniform random grey values, p = 0, 0.05, ..., 0.5; the same curve on the held-out
validation images is what any choice of settings (e.g. --decay-epochs) is made on. With --seeds N both networks
are trained N times (each pair from the same initial weights) and the mean and standard deviation
of each accuracy are reported and plotted: one reference run can land far from another at high noise.

    ROBEVAL_DATA=/path/to/mnist.npz python examples/torch/jacobian_cnn.py [--epochs 15] [--seeds 3] [--quick]
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from _shared import Timer, mnist, parse_args, plot_curves, report
from torch import nn

from robeval.training.torch import JacobianRegularizer, Trainer, accuracy


def build() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.BatchNorm2d(20), nn.ReLU(),
        nn.Conv2d(20, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
        nn.Conv2d(20, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
        nn.Flatten(), nn.Linear(20 * 24 * 24, 10),
    )


def salt_noise(x: torch.Tensor, proportion: float, seed: int) -> torch.Tensor:
    """Replace each pixel with probability ``proportion`` by a uniform random grey value."""
    g = torch.Generator().manual_seed(seed)
    noise, pick = torch.rand(x.shape, generator=g), torch.rand(x.shape, generator=g) < proportion
    return torch.where(pick, noise, x)


def train_pair(xtr, ytr, xva, yva, args, seed: int, epochs: int) -> dict[str, nn.Sequential]:
    """The regularised and the reference CNN, both from the same initial weights and batch order."""
    torch.manual_seed(seed)
    start = build()
    nets = {"Jacobian-regularised": start, "reference": copy.deepcopy(start)}
    for name, net in nets.items():
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        sched = None
        if args.decay_epochs and not args.quick:  # a settled end point instead of wherever the last step lands
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(epochs - args.decay_epochs, 1)],
                                                         gamma=0.1)
        loss = None
        if name != "reference":
            loss = JacobianRegularizer(net, coefficient=args.coefficient, outputs="probabilities")
        tag = "jacobian" if loss is not None else "reference"
        trainer = Trainer(net, opt, loss, epochs=epochs, batch_size=32, scheduler=sched, seed=seed,
                          checkpoint=f"{args.out}/{tag}_cnn_seed{seed}.pt", progress=not args.quick)
        trainer.fit((xtr, ytr), val=(xva, yva))
    return nets


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=15,
                      coefficient=(float, 1.0, "Jacobian regularisation coefficient"),
                      train_size=(int, 5000, "number of MNIST training images used"),
                      decay_epochs=(int, 3, "last epochs at learning rate 0.001 (0: constant 0.01, as MATLAB)"),
                      seeds=(int, 1, "training runs (seeds seed, seed+1, ...); mean and sd are reported"))
    timer = Timer()
    xtr, ytr, xva, yva, xte, yte = mnist(args.quick, n_train=1000 + 500, n_val=500 if args.quick else None)
    xtr, ytr = xtr[: args.train_size], ytr[: args.train_size]
    epochs = 1 if args.quick else args.epochs
    levels = np.round(np.arange(0, 0.51, 0.05), 2)
    noisy = [salt_noise(xte, float(p), args.seed) for p in levels]  # the same noisy test sets for every net
    noisy_val = [salt_noise(xva, float(p), args.seed + 1) for p in levels]  # for choices: never the test set
    curves = {"Jacobian-regularised": [], "reference": []}
    val_curves = {"Jacobian-regularised": [], "reference": []}
    for seed in range(args.seed, args.seed + args.seeds):
        for name, net in train_pair(xtr, ytr, xva, yva, args, seed, epochs).items():
            val_curves[name].append([accuracy(net, xn, yva) for xn in noisy_val])
            curves[name].append([accuracy(net, xn, yte) for xn in noisy])
            for split, acc in (("validation", val_curves[name][-1]), ("test", curves[name][-1])):
                print(f"seed {seed} {name:>22s} {split:>10s}: " + " ".join(f"{a * 100:.2f}" for a in acc), flush=True)
    curves = {name: np.array(acc) for name, acc in curves.items()}
    rows: dict[str, object] = {}
    for split, table in (("validation", val_curves), ("test", curves)):
        for i, p in enumerate(levels):
            for name, acc in table.items():
                acc = np.asarray(acc)
                sd = f" +- {acc[:, i].std(ddof=1) * 100:.2f}" if len(acc) > 1 else ""
                rows[f"{name}, {split}, noise proportion {p:.2f}"] = f"{acc[:, i].mean() * 100:.2f}%{sd}"
    path = plot_curves(levels, curves, f"{args.out}/jacobian_mnist_noise.png", "proportion of noisy pixels")
    rows["plot"] = path or "matplotlib not installed"
    report(f"jacobian_cnn ({epochs} epochs, {len(xtr)} training images, {args.seeds} seed(s))", rows, timer())


if __name__ == "__main__":
    main()
