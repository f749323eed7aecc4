"""The training code's bounds against robeval's own certifiers on the exported ONNX models.

Skipped (with a reason) where the ONNX adapter or the certifiers are not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
adapters_onnx = pytest.importorskip("robeval.adapters.onnx", reason="robeval's ONNX adapter is not available")
cert_ibp = pytest.importorskip("robeval.certifiers.ibp", reason="robeval's IBP certifier is not available")
from torch import nn  # noqa: E402

from robeval.training.torch import (  # noqa: E402
    LBDN,
    GroupSort,
    SpectralConv2d,
    SpectralLinear,
    export_onnx,
    ibp_init_,
    ibp_margin_bounds,
    lipschitz_bound,
)

torch.set_num_threads(1)

# float(loss) on a tensor that carries a graph is intended in these checks
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def _load(model, tmp_path, name, sample):
    path = export_onnx(model, tmp_path / f"{name}.onnx", sample)
    return adapters_onnx.load_onnx(str(path))


def _ibp_nets():
    torch.manual_seed(0)
    mlp = ibp_init_(nn.Sequential(nn.Flatten(), nn.Linear(36, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                                  nn.Linear(20, 5)))
    torch.manual_seed(1)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16, 5))
    return {"mlp": mlp, "cnn": cnn}


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_ibp_margins_equal_the_certifiers_on_the_exported_model(name, tmp_path):
    """float64: the two computations agree to 1e-5 relative (the certifier's rounding terms are
    ~1e-14 there); float32: the certifier, which adds rigorous rounding terms, is never looser
    than 1e-4 of the bounds' scale away and never above the training bound by more than rounding."""
    model = _ibp_nets()[name].eval()
    torch.manual_seed(2)
    x, y = torch.rand(8, 1, 6, 6), torch.randint(0, 5, (8,))
    net = _load(model, tmp_path, name, x[:1])
    eps = 0.03
    ours64 = ibp_margin_bounds(model.double(), x.double(), y, eps).detach().numpy()
    theirs64 = np.asarray(cert_ibp.ibp_margin_bounds(net.astype(np.float64), x.double().numpy(), y.numpy(), eps))
    finite = np.isfinite(ours64)
    assert np.array_equal(finite, np.isfinite(theirs64))
    np.testing.assert_allclose(theirs64[finite], ours64[finite], rtol=1e-5, atol=1e-5 * np.abs(ours64[finite]).max())
    model.float()
    ours32 = ibp_margin_bounds(model, x, y, eps).detach().numpy()
    theirs32 = np.asarray(cert_ibp.ibp_margin_bounds(net, x.numpy(), y.numpy(), eps))
    scale = np.abs(ours32[finite]).max()
    assert np.all(np.abs(theirs32[finite] - ours32[finite]) <= 1e-4 * scale)


def _spectral_nets():
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Flatten(), SpectralLinear(36, 16), GroupSort(2), SpectralLinear(16, 8), GroupSort(2),
                          SpectralLinear(8, 3))
    conv = nn.Sequential(SpectralConv2d(1, 4, 3, padding=1), GroupSort(2), SpectralConv2d(4, 4, 3), GroupSort(2),
                         nn.Flatten(), SpectralLinear(64, 3))
    for net in (dense, conv):
        for m in net:
            if hasattr(m, "weight") and m.weight.dim() > 1:
                with torch.no_grad():
                    m.weight.normal_()
    return {"dense": dense.eval(), "conv": conv.eval()}


@pytest.mark.parametrize("name", ["dense", "conv"])
def test_layer_bounds_are_at_least_the_certifiers_global_bound(name, tmp_path):
    """Spectral nets: product of our layer bounds >= certifier's bound (the certifier uses exact
    dense norms and the exact FFT norm of stride-1 convolutions, tighter than our sqrt(k*k)
    factor) >= the largest Jacobian norm seen at sampled points."""
    model = _spectral_nets()[name]
    x = torch.rand(6, 1, 6, 6)
    net = _load(model, tmp_path, name, x[:1])
    ours, theirs = lipschitz_bound(model), float(net.lipschitz_bound())
    assert ours >= theirs
    jac = max(
        float(torch.linalg.matrix_norm(
            torch.autograd.functional.jacobian(lambda z: model(z[None])[0], xi).reshape(3, -1).double(), 2))
        for xi in x
    )
    assert theirs >= jac


def test_lbdn_bound_is_gamma_below_the_layerwise_product(tmp_path):
    """An exported LBDN is a plain MLP whose layer-wise norm product exceeds gamma: the sandwich
    theorem (gamma) is the tighter certificate, and both bound the sampled Jacobian norms."""
    torch.manual_seed(4)
    model = LBDN(36, (16, 16), 4, gamma=5.0)
    x = torch.rand(6, 1, 6, 6)
    net = _load(model, tmp_path, "lbdn", x[:1])
    ours, theirs = model.lipschitz_bound(), float(net.lipschitz_bound())
    assert ours <= 5.0 * (1 + 1e-5) and theirs >= ours
    jac = max(
        float(torch.linalg.matrix_norm(
            torch.autograd.functional.jacobian(lambda z: model(z[None])[0], xi).reshape(4, -1).double(), 2))
        for xi in x
    )
    assert jac <= ours
