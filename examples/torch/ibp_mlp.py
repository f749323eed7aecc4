"""IBP certified training of a 784-100-100-100-10 MLP on MNIST (after the Aidge tutorial).

Two warm-up epochs at eps = 0, a linear ramp of eps to the target while the clean-loss weight
kappa goes from 1 to 0.5, then epochs at the target; IBP initialisation (Shi et al. 2021).
Reports clean accuracy and IBP-certified accuracy at eps = 0.01 (the tutorial: ~96% / ~93%).
With ``--bound crown-ibp`` the robust loss uses CROWN-IBP (Zhang et al. 2020) mixed with IBP by a
weight beta that goes from 1 to 0 over the ramp, and CROWN-IBP-certified accuracy is reported too.

    ROBEVAL_DATA=/path/to/mnist.npz python examples/torch/ibp_mlp.py [--epochs 10] [--bound crown-ibp] [--quick]
"""

from __future__ import annotations

import torch
from _shared import Timer, mnist, parse_args, report
from torch import nn

from robeval.training.torch import (
    EpsilonSchedule,
    IBPLoss,
    KappaSchedule,
    Trainer,
    accuracy,
    certified_accuracy,
    ibp_init_,
)


def build() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
        nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10),
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=20,
                      eps=(float, 0.01, "certified radius (L-inf) to train and test for"),
                      train_eps=(float, 0.015, "radius used in training (above --eps)"),
                      warmup=(int, 2, "epochs at eps = 0"), ramp=(int, 10, "epochs of the eps ramp"),
                      lr=(float, 1e-3, "Adam learning rate (divided by 5 for the last 3 epochs)"),
                      bound=(str, "ibp", "margin bound trained on: ibp or crown-ibp"))
    timer = Timer()
    xtr, ytr, xva, yva, xte, yte = mnist(args.quick)
    epochs, warmup, ramp = (2, 0, 1) if args.quick else (args.epochs, args.warmup, args.ramp)
    model = ibp_init_(build())
    loss = IBPLoss(EpsilonSchedule(args.train_eps, warmup=warmup, ramp=ramp),
                   KappaSchedule(start=1.0, end=0.5, warmup=warmup, ramp=ramp),
                   bound=args.bound, beta=KappaSchedule(start=1.0, end=0.0, warmup=warmup, ramp=ramp))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(epochs - 3, 1)], gamma=0.2)
    trainer = Trainer(model, opt, loss, seed=args.seed, epochs=epochs, batch_size=256, scheduler=sched,
                      metrics={f"certified@{args.eps}": lambda m, x, y: certified_accuracy(m, x, y, args.eps)},
                      checkpoint=f"{args.out}/ibp_mlp.pt", onnx_path=f"{args.out}/ibp_mlp.onnx",
                      progress=not args.quick)
    trainer.fit((xtr, ytr), val=(xva[:2000], yva[:2000]))
    model.eval()
    rows = {
        "clean accuracy": accuracy(model, xte, yte),
        f"IBP-certified accuracy, eps={args.eps}": certified_accuracy(model, xte, yte, args.eps),
        "IBP-certified accuracy, eps=0.1": certified_accuracy(model, xte, yte, 0.1),
    }
    if args.bound == "crown-ibp":
        rows[f"CROWN-IBP-certified accuracy, eps={args.eps}"] = certified_accuracy(
            model, xte, yte, args.eps, bound="crown-ibp")
    report(f"ibp_mlp ({args.bound}, {epochs} epochs, {len(xtr)} training images)", rows, timer())


if __name__ == "__main__":
    main()
