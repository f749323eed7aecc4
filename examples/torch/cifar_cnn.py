"""A small CNN on CIFAR-10 in PyTorch: IBP/CROWN-IBP certified training at L-inf eps = 2/255, or
Gaussian noise training for randomized smoothing (--objective noise), then robeval certificates.

CNN: Conv(32, 3x3) -> ReLU -> Conv(32, 4x4, s2) -> ReLU -> Conv(64, 3x3) -> ReLU ->
Conv(64, 4x4, s2) -> ReLU -> Linear(4096, 256) -> ReLU -> Linear(256, 10), inputs in [0, 1] (pixel
space, so 2/255 is a pixel radius). --objective ibp|crown-ibp: ``IBPLoss`` with an eps ramp
(IBP initialisation), certified with robeval IBP (and CROWN-IBP) at --eps on the test set.
--objective noise: ``GaussianNoiseLoss`` at --sigma, certified with robeval smoothing at L2 radii
0.25 and 0.5 on --certify test images.

CIFAR-10 is read with ``robeval.data.load_dataset("cifar10", path=--data-path)`` (the official
python tarball, its folder, or $ROBEVAL_DATA; see robeval/data/cifar.py). The last 5,000 training images are
the validation split. --quick trains one epoch on a few hundred images (a smoke test).

    python examples/torch/cifar_cnn.py --data-path /path/to/cifar-10-python.tar.gz [--objective noise]
"""

from __future__ import annotations

import json
import sys

import torch
from _shared import Timer, parse_args, report
from torch import nn

from robeval.api import certify
from robeval.data import load_dataset
from robeval.training.torch import (
    EpsilonSchedule,
    GaussianNoiseLoss,
    IBPLoss,
    KappaSchedule,
    Trainer,
    accuracy,
    certified_accuracy,
    export_onnx,
    ibp_init_,
)


def build() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10),
    )


def cifar(path: str | None, quick: bool):
    limit_train, limit_test = (600, 100) if quick else (None, None)
    train = load_dataset("cifar10", split="train", path=path or None, limit=limit_train)
    test = load_dataset("cifar10", split="test", path=path or None, limit=limit_test)
    n_val = max(1, len(train) // 10) if quick else 5000
    cut = len(train) - n_val
    t = torch.from_numpy
    return (t(train.x[:cut]), t(train.y[:cut]), t(train.x[cut:]), t(train.y[cut:]), t(test.x), t(test.y))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=60,
                      objective=(str, "ibp", "ibp, crown-ibp or noise"),
                      data_path=(str, "", "CIFAR-10 tarball or folder (default: $ROBEVAL_DATA, then the cache)"),
                      eps=(float, 2 / 255, "certified L-inf radius (ibp, crown-ibp)"),
                      sigma=(float, 0.25, "noise level (noise)"),
                      certify_n=(int, 500, "test images to certify with smoothing (noise)"),
                      draws=(int, 10_000, "smoothing estimation draws per image"),
                      batch=(int, 128, "batch size"), lr=(float, 1e-3, "Adam learning rate"))
    if args.objective not in ("ibp", "crown-ibp", "noise"):
        raise SystemExit(f"--objective {args.objective!r}; expected ibp, crown-ibp or noise")
    timer = Timer()
    xtr, ytr, xva, yva, xte, yte = cifar(args.data_path, args.quick)
    epochs = 1 if args.quick else args.epochs
    model = build()
    if args.objective == "noise":
        loss = GaussianNoiseLoss(model, sigma=args.sigma, generator=torch.Generator().manual_seed(args.seed))
        metrics = {}
    else:
        ibp_init_(model)
        warmup, ramp = (0.0, 1.0) if args.quick else (1.0, epochs / 2)
        loss = IBPLoss(EpsilonSchedule(1.1 * args.eps, warmup=warmup, ramp=ramp, shape="smooth"),
                       KappaSchedule(start=1.0, end=0.0, warmup=warmup, ramp=ramp), bound=args.objective)
        metrics = {f"certified@{args.eps:.4g}": lambda m, x, y: certified_accuracy(m, x, y, args.eps)}
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=args.lr), loss, seed=args.seed, epochs=epochs,
                      batch_size=args.batch, metrics=metrics, progress=not args.quick)
    trainer.fit((xtr, ytr), val=(xva[:1000], yva[:1000]))
    train_seconds = timer()
    model.eval()
    onnx_path = f"{args.out}/cifar_cnn_{args.objective}.onnx"
    export_onnx(model, onnx_path, xte[:1])
    rows: dict[str, float | str] = {"clean accuracy": accuracy(model, xte, yte)}
    data = (xte.numpy(), yte.numpy())
    if args.objective == "noise":
        n = min(len(xte), 10 if args.quick else args.certify_n)
        res = certify(onnx_path, (data[0][:n], data[1][:n]), method="smoothing", eps=[0.25, 0.5], norm="l2",
                      sigma=args.sigma, n=200 if args.quick else args.draws, seed=args.seed)
        rows[f"smoothed accuracy ({n} images)"] = res.clean_accuracy
        rows.update({f"smoothing certified (p>=0.999), L2 r={r}": a for r, a in zip(res.eps, res.certified_accuracy)})
    else:
        for method in ("ibp", "crown-ibp"):
            res = certify(onnx_path, data, method=method, eps=[args.eps])
            rows[f"robeval {method} certified, eps={args.eps:.4g}"] = res.certified_accuracy[0]
    rows["training time (s)"] = f"{train_seconds:.1f}"
    report(f"cifar_cnn {args.objective} ({epochs} epochs, {len(xtr)} training images)", rows, timer())
    with open(onnx_path.replace(".onnx", ".json"), "w") as f:
        json.dump({"command": " ".join(["python"] + sys.argv), "epochs": epochs, "training_images": len(xtr),
                   **{k: v for k, v in rows.items()}, "training_time_s": round(train_seconds, 1)}, f, indent=1)


if __name__ == "__main__":
    main()
