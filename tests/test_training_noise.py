"""Gaussian noise augmentation (torch and Keras): the objective's value against direct computation."""

from __future__ import annotations

import numpy
import pytest

from robeval.errors import InvalidParameterError


def test_torch_noise_loss_values():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from robeval.training.torch import GaussianNoiseLoss

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.rand(16, 1, 2, 2), torch.randint(0, 3, (16,))
    loss = GaussianNoiseLoss(net, sigma=0.5, copies=3, consistency=2.0, generator=torch.Generator().manual_seed(1))
    noisy = GaussianNoiseLoss(net, sigma=0.5, copies=3, generator=torch.Generator().manual_seed(1)).noisy(x)
    assert noisy.shape == (48, 1, 2, 2)
    assert float((noisy - x.repeat(3, 1, 1, 1)).std()) == pytest.approx(0.5, rel=0.2)
    logits = net(noisy)
    ce = F.cross_entropy(logits, y.repeat(3))
    p = F.softmax(logits, 1).reshape(3, 16, 3)
    p_bar = p.mean(0)
    kl = (p_bar * (p_bar.log() - p.log())).sum(-1).mean()
    got = loss(x, y)
    assert float(got) == pytest.approx(float(ce + 2.0 * kl), rel=1e-5)
    got.backward()
    assert net[1].weight.grad is not None and float(kl) > 0
    with pytest.raises(InvalidParameterError):
        GaussianNoiseLoss(net, sigma=0.25, copies=1, consistency=1.0)
    with pytest.raises(InvalidParameterError):
        GaussianNoiseLoss(net, sigma=0.0)


def test_keras_noise_training_fits_and_roundtrips(tmp_path):
    pytest.importorskip("tensorflow")
    import keras
    import tensorflow as tf

    from robeval.training.keras import GaussianNoiseTraining

    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model = GaussianNoiseTraining(base, sigma=1e-6, copies=2, consistency=0.5, seed=3)
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = numpy.random.default_rng(0).uniform(0, 1, (8, 4)).astype("float32")
    y = numpy.arange(8) % 3
    _, loss = model.objective(tf.constant(x), tf.constant(y), training=False)
    clean = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, base(x))
    assert float(loss) == pytest.approx(float(clean), abs=1e-4)  # tiny sigma: CE on clean inputs, KL ~ 0
    history = model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert numpy.isfinite(history.history["loss"][0])
    cfg = model.get_config()
    assert (cfg["sigma"], cfg["copies"], cfg["consistency"], cfg["seed"]) == (1e-6, 2, 0.5, 3)
