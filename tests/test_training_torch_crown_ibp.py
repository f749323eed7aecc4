"""CROWN-IBP certified training in PyTorch: sound, equal to the certifier's crown-ibp, differentiable."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from robeval.errors import InvalidParameterError  # noqa: E402
from robeval.training.torch import (  # noqa: E402
    EpsilonSchedule,
    IBPLoss,
    KappaSchedule,
    certified_accuracy,
    crown_ibp_margin_bounds,
    ibp_init_,
    ibp_margin_bounds,
    mixed_margin_bounds,
)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _mlp():
    torch.manual_seed(0)
    return ibp_init_(nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(),
                                   nn.Linear(16, 5)))


def _cnn():
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), bn, nn.Conv2d(4, 6, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5)).eval()


def _data(n=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _sampled_margin_min(model, x, y, eps, draws=400):
    """Smallest z_y - z_j seen over random points and random corners of the clipped box."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    g = torch.Generator().manual_seed(3)
    worst = torch.full((x.shape[0], 5), math.inf, dtype=x.dtype)
    true = nn.functional.one_hot(y, 5).bool()
    with torch.no_grad():
        for i in range(draws):
            u = torch.rand(x.shape, generator=g, dtype=x.dtype)
            if i % 2:
                u = (u > 0.5).to(x.dtype)  # a corner
            z = model(lo + (hi - lo) * u)
            margin = (z.gather(1, y[:, None]) - z).masked_fill(true, math.inf)
            worst = torch.minimum(worst, margin)
    return worst


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_crown_ibp_bounds_are_sound_on_sampled_points(make):
    model = make().double()
    x, y = _data()
    x = x.double()
    for eps in (0.0, 0.02, 0.1):
        lower = crown_ibp_margin_bounds(model, x, y, eps).detach()
        worst = _sampled_margin_min(model, x, y, eps)
        finite = torch.isfinite(lower)
        assert torch.all(lower[finite] <= worst[finite] + 1e-9)
        if eps == 0:  # a point: the bound is the margin itself
            torch.testing.assert_close(lower[finite], worst[finite], rtol=1e-9, atol=1e-9)


def test_linear_region_gives_the_exact_minimum():
    """All ReLUs active on the box: the network is affine there and CROWN-IBP is the exact minimum."""
    torch.manual_seed(4)
    lin1, lin2 = nn.Linear(4, 3), nn.Linear(3, 3)
    with torch.no_grad():
        lin1.weight.uniform_(-0.2, 0.2)
        lin1.bias.fill_(5.0)  # every hidden pre-activation stays positive
    model = nn.Sequential(nn.Flatten(), lin1, nn.ReLU(), lin2).double()
    x, y = torch.rand(5, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    eps = 0.05
    lower = crown_ibp_margin_bounds(model, x, y, eps).detach()
    a = lin2.weight.double() @ lin1.weight.double()                  # the affine map on the box
    b = lin2.weight.double() @ lin1.bias.double() + lin2.bias.double()
    lo, hi = (x - eps).clamp(0, 1).flatten(1), (x + eps).clamp(0, 1).flatten(1)
    c, r = (hi + lo) / 2, (hi - lo) / 2
    for i in range(5):
        for j in range(3):
            if j == y[i]:
                continue
            row = a[y[i]] - a[j]
            exact = row @ c[i] - row.abs() @ r[i] + b[y[i]] - b[j]
            assert float(lower[i, j].detach()) == pytest.approx(float(exact), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_equal_to_the_certifiers_crown_ibp_on_the_exported_model(make, tmp_path):
    pytest.importorskip("onnx")
    from robeval.adapters.onnx import load_onnx
    from robeval.certifiers.crown import crown_margin_bounds
    from robeval.training.torch import export_onnx

    model = make()
    x, y = _data()
    net = load_onnx(str(export_onnx(model, tmp_path / "m.onnx", x[:1]))).astype(np.float64)
    eps = 0.03
    ours = crown_ibp_margin_bounds(model.double(), x.double(), y, eps).detach().numpy()
    theirs = np.asarray(crown_margin_bounds(net, x.double().numpy(), y.numpy(), eps, method="crown-ibp"))
    finite = np.isfinite(ours)
    assert np.array_equal(finite, np.isfinite(theirs))
    np.testing.assert_allclose(theirs[finite], ours[finite], rtol=1e-5, atol=1e-5 * np.abs(ours[finite]).max())


@pytest.mark.parametrize("make", [_mlp, _cnn])
def test_certified_accuracy_counts_the_crown_ibp_bounds_without_gradients(make):
    model = make()
    x, y = _data(16, seed=8)
    lower = crown_ibp_margin_bounds(model, x, y, 0.02).detach()
    expected = float((lower > 0).all(dim=1).float().mean())
    assert expected > 0  # some samples certified: the count is not trivially 0
    assert certified_accuracy(model, x, y, 0.02, batch_size=5, bound="crown-ibp") == pytest.approx(expected)
    with torch.no_grad():
        torch.testing.assert_close(crown_ibp_margin_bounds(model, x, y, 0.02), lower)


def test_mixture_weights_and_checks():
    model = _mlp().double()
    x, y = _data()
    x = x.double()
    ibp = ibp_margin_bounds(model, x, y, 0.05).detach()
    crown = crown_ibp_margin_bounds(model, x, y, 0.05).detach()
    assert not torch.allclose(ibp, crown)
    torch.testing.assert_close(mixed_margin_bounds(model, x, y, 0.05, 0.0).detach(), ibp)
    half = mixed_margin_bounds(model, x, y, 0.05, 0.25).detach()
    finite = torch.isfinite(ibp)
    torch.testing.assert_close(half[finite], (0.25 * crown + 0.75 * ibp)[finite])
    assert torch.isinf(half[~finite]).all()
    with pytest.raises(InvalidParameterError, match="beta"):
        mixed_margin_bounds(model, x, y, 0.05, 1.5)
    with pytest.raises(InvalidParameterError, match="bound="):
        IBPLoss(0.1, bound="crown")


def test_unsupported_layer_names_the_fix():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 5))
    x, y = _data(2)
    with pytest.raises(InvalidParameterError, match=r"layer 2 \(MaxPool2d\).*bound='ibp'"):
        crown_ibp_margin_bounds(model, x, y, 0.1)


def test_gradient_through_the_bounds_matches_finite_differences():
    model = _mlp().double()
    x, y = _data(4)
    x = x.double()
    weight = model[3].weight

    def total():
        lower = crown_ibp_margin_bounds(model, x, y, 0.03)
        return lower.masked_fill(torch.isinf(lower), 0.0).sum()

    (grad,) = torch.autograd.grad(total(), weight)
    assert grad.abs().sum() > 0
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        direction = torch.randn(weight.shape, generator=g, dtype=weight.dtype)
        h = 1e-6
        with torch.no_grad():
            weight += h * direction
            up = float(total())
            weight -= 2 * h * direction
            down = float(total())
            weight += h * direction
        assert (up - down) / (2 * h) == pytest.approx(float((grad * direction).sum()), rel=1e-4, abs=1e-7)


def test_crown_ibp_training_raises_the_certified_bound():
    """A few steps of IBPLoss(bound='crown-ibp') lower the loss and raise the CROWN-IBP margins."""
    model = _cnn().train()
    for m in model:
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # fixed statistics: an affine map the bounds can use
    x, _ = _data(64, seed=6)
    y = (x.flatten(1) @ torch.randn(36, 5, generator=torch.Generator().manual_seed(7))).argmax(1)  # learnable
    loss_fn = IBPLoss(EpsilonSchedule(0.05), kappa=0.0, bound="crown-ibp",
                      beta=KappaSchedule(start=1.0, end=0.0, ramp=10))
    assert loss_fn.beta(0.0) == 1.0 and loss_fn.beta(5.0) == pytest.approx(0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = float(loss_fn(model, x, y, t=0.0))
    before = crown_ibp_margin_bounds(model, x, y, 0.05).detach()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(model, x, y, t=0.0)
        loss.backward()
        opt.step()
    after = crown_ibp_margin_bounds(model, x, y, 0.05).detach()
    assert float(loss_fn(model, x, y, t=0.0)) < 0.7 * first
    finite = torch.isfinite(before)
    assert after[finite].mean() > before[finite].mean()
