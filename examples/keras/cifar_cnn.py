"""A small CNN on CIFAR-10 in Keras: IBP/CROWN-IBP certified training at L-inf eps = 2/255, or
Gaussian noise training for randomized smoothing (--objective noise), then robeval certificates.
The twin of examples/torch/cifar_cnn.py (same CNN, channels-last; inputs in [0, 1], pixel space).

--objective ibp|crown-ibp: ``IBPTraining`` with the ``EpsilonScheduler`` ramp (IBP initialisation),
certified with robeval IBP and CROWN-IBP at --eps on the saved .keras file. --objective noise:
``GaussianNoiseTraining`` at --sigma, certified with robeval smoothing at L2 radii 0.25 and 0.5.
CIFAR-10 comes from ``robeval.data.load_dataset("cifar10", path=--data-path)``; the last 5,000
training images are the validation split. --quick: one epoch on a few hundred images.

    python examples/keras/cifar_cnn.py --data-path /path/to/cifar-10-python.tar.gz [--objective noise]
"""

from __future__ import annotations

import numpy as np
from _shared import Timer, parse_args, report

import robeval
from robeval.data import load_dataset


def build():
    import keras

    L = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        L.Conv2D(32, 3, padding="same", activation="relu"),
        L.Conv2D(32, 4, strides=2, padding="same", activation="relu"),  # pads 1 each side, as torch's padding=1
        L.Conv2D(64, 3, padding="same", activation="relu"),
        L.Conv2D(64, 4, strides=2, padding="same", activation="relu"),
        L.Flatten(), L.Dense(256, activation="relu"), L.Dense(10),
    ])


def cifar(path: str | None, quick: bool):
    limit_train, limit_test = (600, 100) if quick else (None, None)
    train = load_dataset("cifar10", split="train", path=path or None, limit=limit_train).to_layout("NHWC")
    test = load_dataset("cifar10", split="test", path=path or None, limit=limit_test).to_layout("NHWC")
    cut = len(train) - (max(1, len(train) // 10) if quick else 5000)
    return train.x[:cut], train.y[:cut], train.x[cut:], train.y[cut:], test.x, test.y


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=60,
                      objective=(str, "ibp", "ibp, crown-ibp or noise"),
                      data_path=(str, "", "CIFAR-10 tarball or folder (default: $ROBEVAL_DATA, then the cache)"),
                      eps=(float, 2 / 255, "certified L-inf radius (ibp, crown-ibp)"),
                      sigma=(float, 0.25, "noise level (noise)"),
                      certify_n=(int, 500, "test images to certify with smoothing (noise)"),
                      draws=(int, 10_000, "smoothing estimation draws per image"),
                      lr=(float, 1e-3, "Adam learning rate"))
    if args.objective not in ("ibp", "crown-ibp", "noise"):
        raise SystemExit(f"--objective {args.objective!r}; expected ibp, crown-ibp or noise")
    import keras

    from robeval.training.keras import (
        EpsilonSchedule,
        EpsilonScheduler,
        GaussianNoiseTraining,
        IBPTraining,
        KappaSchedule,
        ibp_init,
    )

    timer = Timer()
    xtr, ytr, xva, yva, xte, yte = cifar(args.data_path, args.quick)
    epochs = 1 if args.quick else args.epochs
    callbacks = []
    if args.objective == "noise":
        model = GaussianNoiseTraining(build(), sigma=args.sigma, seed=args.seed)
    else:
        model = IBPTraining(ibp_init(build(), seed=args.seed), eps=0.0, kappa=1.0, bound=args.objective)
        warmup, ramp = (0, 1) if args.quick else (1, epochs // 2)
        callbacks.append(EpsilonScheduler(EpsilonSchedule(1.1 * args.eps, warmup=warmup, ramp=ramp),
                                          KappaSchedule(start=1.0, end=0.0, warmup=warmup, ramp=ramp)))
    model.compile(optimizer=keras.optimizers.Adam(args.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(xtr, ytr, batch_size=128, epochs=epochs, shuffle=True, callbacks=callbacks,
              validation_data=(xva[:1000], yva[:1000]), verbose=0 if args.quick else 2)
    train_seconds = timer()
    path = f"{args.out}/cifar_cnn_{args.objective}.keras"
    model.base_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    clean = float(np.mean(np.argmax(loaded.predict(xte, batch_size=500, verbose=0), 1) == yte))
    rows: dict[str, float | str] = {"clean accuracy": clean}
    nchw = np.ascontiguousarray(xte.transpose(0, 3, 1, 2))
    if args.objective == "noise":
        n = min(len(xte), 10 if args.quick else args.certify_n)
        res = robeval.certify(loaded, (nchw[:n], yte[:n]), method="smoothing", eps=[0.25, 0.5], norm="l2",
                              sigma=args.sigma, n=200 if args.quick else args.draws, seed=args.seed)
        rows[f"smoothed accuracy ({n} images)"] = res.clean_accuracy
        rows.update({f"smoothing certified (p>=0.999), L2 r={r}": a for r, a in zip(res.eps, res.certified_accuracy)})
    else:
        for method in ("ibp", "crown-ibp"):
            res = robeval.certify(loaded, (nchw, yte), method=method, eps=[args.eps])
            rows[f"robeval {method} certified, eps={args.eps:.4g}"] = res.certified_accuracy[0]
    rows["training time (s)"] = f"{train_seconds:.1f}"
    report(f"cifar_cnn keras {args.objective} ({epochs} epochs, {len(xtr)} training images)", rows, timer())


if __name__ == "__main__":
    main()
