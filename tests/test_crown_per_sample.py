"""CROWN bounds each sample's own unstable neurons (``_Batch.per_sample``) when they are much fewer
than the union over the batch: the bounds are those of the batch-wide selection, and sound."""

from __future__ import annotations

import numpy

from robeval.certifiers.crown import _Batch, crown_margin_bounds

from nets import random_cnn, random_mlp
from reference_helpers import relative_error


def spread_batch(rng, net, n=12):
    """Inputs far apart, so that each sample has its own few unstable neurons."""
    return rng.random((n,) + net.input_shape)


def test_per_sample_rows_give_each_neurons_bound_of_the_shared_rows():
    rng = numpy.random.default_rng(3)
    net = random_mlp(rng, sizes=(20, 40, 40, 6))
    x = spread_batch(rng, net)
    run = _Batch(net, x, 0.05, "linf", (0.0, 1.0))
    size = 40
    shared = run.neuron_bounds("fc1", numpy.arange(size), 4 * size)  # every neuron for every sample
    picks = numpy.stack([rng.permutation(size)[:7] for _ in range(len(x))])  # (B, 7), its own per sample
    lo, hi = run.neuron_bounds("fc1", picks, 4 * size)
    rows = numpy.arange(len(x))[:, None]
    assert relative_error(lo, shared[0][rows, picks]) <= 1e-12
    assert relative_error(hi, shared[1][rows, picks]) <= 1e-12
    chunked = run.neuron_bounds("fc1", picks, 6)  # three neurons a pass
    assert relative_error(chunked[0], lo) <= 1e-12


def test_per_sample_selection_is_taken_only_when_it_saves_rows():
    rng = numpy.random.default_rng(4)
    net = random_mlp(rng, sizes=(20, 40, 40, 6))
    run = _Batch(net, spread_batch(rng, net, 4), 0.05, "linf", (0.0, 1.0))
    few = numpy.zeros((4, 40), bool)
    for b in range(4):
        few[b, 10 * b:10 * b + 3] = True  # 3 each, 12 in the union
    idx = numpy.nonzero(few.any(0))[0]
    picked = run.per_sample(few, idx)
    assert picked.shape == (4, 3)
    assert all(set(picked[b]) == set(numpy.nonzero(few[b])[0]) for b in range(4))
    same = numpy.zeros((4, 40), bool)
    same[:, :5] = True  # every sample the same five: the shared rows are as few
    assert run.per_sample(same, numpy.arange(5)).shape == (5,)
    assert run.per_sample(None, numpy.arange(40)).shape == (40,)  # every neuron (crown-pure)


def test_margins_equal_the_batch_wide_selection_and_hold_on_samples(monkeypatch):
    rng = numpy.random.default_rng(5)
    cases = [(random_mlp(rng, sizes=(20, 40, 40, 40, 6)), 6), (random_cnn(rng, pool="avgpool"), 4)]
    used, real = [], _Batch.per_sample
    for net, classes in cases:
        x = spread_batch(rng, net, 16)
        y = rng.integers(0, classes, len(x))

        def spy(self, unstable, idx, real=real):
            out = real(self, unstable, idx)
            used.append(out.ndim == 2)
            return out

        for eps in (0.002, 0.02):
            monkeypatch.setattr(_Batch, "per_sample", spy)
            ours = crown_margin_bounds(net, x, y, eps)
            monkeypatch.setattr(_Batch, "per_sample_rows", False)  # the switch bench/crown.py turns off
            calls = len(used)
            shared = crown_margin_bounds(net, x, y, eps)
            assert len(used) == calls  # switched off, the selection is the batch's union
            monkeypatch.setattr(_Batch, "per_sample_rows", True)
            finite = numpy.isfinite(shared)
            assert relative_error(ours[finite], shared[finite]) <= 1e-9
            # soundness: no sampled point of the box has a margin below the bound
            pts = numpy.clip(x[None] + rng.uniform(-eps, eps, (200,) + x.shape), 0.0, 1.0)
            logits = net.forward(pts.reshape((-1,) + x.shape[1:])).reshape(200, len(x), classes)
            margins = logits[:, numpy.arange(len(x)), y][..., None] - logits
            assert (margins[:, finite] >= ours[finite][None] - 1e-12).all()
    assert any(used), "the per-sample selection was never taken"
