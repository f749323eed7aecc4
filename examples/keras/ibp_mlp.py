"""IBP certified training of a 784-100-100-100-10 MLP on MNIST in Keras (after the Aidge tutorial).

``IBPTraining`` wraps the MLP; the ``EpsilonScheduler`` callback keeps eps at 0 for two warm-up
epochs, then ramps it linearly to the training radius while the clean-loss weight kappa goes from 1
to 0.5 (the same schedules as the PyTorch example); IBP initialisation (Shi et al. 2021); Adam, the
learning rate divided by 5 for the last 3 epochs. Reports clean accuracy and IBP-certified accuracy
at eps = 0.01 (the tutorial: ~96% / ~93%), from the training code and from robeval.certify on the
saved .keras file.

    python examples/keras/ibp_mlp.py [--epochs 20] [--quick]          # ROBEVAL_DATA=/path/to/mnist.npz
"""

from __future__ import annotations

import numpy as np
from _shared import Timer, mnist, parse_args, report


def build():
    import keras

    L = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)), L.Flatten(),
        L.Dense(100, activation="relu"), L.Dense(100, activation="relu"), L.Dense(100, activation="relu"),
        L.Dense(10),
    ])


def robeval_certified(model, x, y, eps: list[float]) -> list[float] | None:
    try:
        import robeval
        from robeval.adapters.keras import KerasModel  # noqa: F401
    except ImportError:
        return None
    return list(robeval.certify(model, (x.transpose(0, 3, 1, 2), y), method="ibp", eps=eps).certified_accuracy)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], epochs=20,
                      eps=(float, 0.01, "certified radius (L-inf) to train and test for"),
                      train_eps=(float, 0.015, "radius used in training (above --eps)"),
                      warmup=(int, 2, "epochs at eps = 0"), ramp=(int, 10, "epochs of the eps ramp"),
                      lr=(float, 1e-3, "Adam learning rate (divided by 5 for the last 3 epochs)"))
    import keras

    from robeval.training.keras import (
        EpsilonSchedule,
        EpsilonScheduler,
        IBPTraining,
        KappaSchedule,
        certified_accuracy,
        ibp_init,
    )

    timer = Timer()
    xtr, ytr, xva, yva, xte, yte = mnist(args.quick)
    epochs, warmup, ramp = (2, 0, 1) if args.quick else (args.epochs, args.warmup, args.ramp)
    model = IBPTraining(ibp_init(build(), seed=args.seed), eps=0.0, kappa=1.0)
    model.compile(optimizer=keras.optimizers.Adam(args.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    last = max(epochs - 3, 1)
    callbacks = [
        EpsilonScheduler(EpsilonSchedule(args.train_eps, warmup=warmup, ramp=ramp),
                         KappaSchedule(start=1.0, end=0.5, warmup=warmup, ramp=ramp)),
        keras.callbacks.LearningRateScheduler(lambda epoch: args.lr * (0.2 if epoch >= last else 1.0)),
    ]
    model.fit(xtr, ytr, batch_size=256, epochs=epochs, shuffle=True, callbacks=callbacks,
              validation_data=(xva[:2000], yva[:2000]), verbose=2)
    path = f"{args.out}/ibp_mlp.keras"
    model.base_model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    clean = float(np.mean(np.argmax(loaded.predict(xte, batch_size=1000, verbose=0), 1) == yte))
    rows: dict[str, float | str] = {
        "clean accuracy": clean,
        f"IBP-certified accuracy, eps={args.eps}": certified_accuracy(loaded, xte, yte, args.eps),
        "IBP-certified accuracy, eps=0.1": certified_accuracy(loaded, xte, yte, 0.1),
    }
    theirs = robeval_certified(loaded, xte, yte, [args.eps, 0.1])
    for e, acc in zip([args.eps, 0.1], theirs or []):
        rows[f"robeval.certify ibp, eps={e}"] = float(acc)
    report(f"ibp_mlp keras ({epochs} epochs, {len(xtr)} training images)", rows, timer())


if __name__ == "__main__":
    main()
