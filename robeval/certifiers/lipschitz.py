"""Lipschitz-margin certificates (Tsuzuku et al. 2018) in L2: with L_yj an upper bound of the
Lipschitz constant of logit_y - logit_j, no perturbation of L2 norm below (z_y - z_j) / L_yj can
flip the decision. L_yj = ||W_y - W_j||_2 x (bound of the layers below the last dense layer)."""

from __future__ import annotations

import math

import numpy

from ..backend import asnumpy, get_xp, to_device
from .base import Certifier
from .spec import split_margin_head

#: Relative safety on margins computed in floating point (the float64 forward rounds at ~1e-15).
MARGIN_SLACK = 1e-9


def pairwise_lipschitz(net) -> numpy.ndarray:
    """(K, K) upper bounds of the L2 Lipschitz constants of logit_y - logit_j (diagonal 0)."""
    split = split_margin_head(net)
    if split.head is None:
        total = net.lipschitz_bounds()[net.output_name]
        k = split.num_classes
        return (numpy.ones((k, k)) - numpy.eye(k)) * math.sqrt(2.0) * total
    below = split.body.lipschitz_bounds()[split.body.output_name]
    w = numpy.asarray(asnumpy(split.head.params["weight"]), dtype=numpy.float64)
    diffs = w[:, None, :] - w[None, :, :]
    norms = numpy.sqrt((diffs**2).sum(axis=-1)) * (1 + 1e-12)
    return norms * below


def certified_radii(net, x, y, pairwise=None):
    """Certified L2 radius per sample (0 where the prediction is wrong)."""
    xp = get_xp(x)
    lyj = to_device(pairwise if pairwise is not None else pairwise_lipschitz(net), xp)
    z = net.forward(x)
    idx = xp.arange(x.shape[0])
    zy = z[idx, y]
    margins = zy[:, None] - z
    margins = margins - MARGIN_SLACK * (xp.abs(zy)[:, None] + xp.abs(z))
    ratios = margins / xp.where(lyj[y] > 0, lyj[y], xp.inf)
    ratios[idx, y] = xp.inf
    radius = ratios.min(axis=1)
    return xp.maximum(radius, 0.0)


class LipschitzMargin(Certifier):
    """Certified L2 radius from a global Lipschitz bound; 'linf' uses ||d||_2 <= sqrt(n) ||d||_inf."""

    name = "lipschitz"
    rule = "lipschitz"

    def radii(self, net, x, y):
        if self._pairwise is None:
            self._pairwise = pairwise_lipschitz(net)
        r = certified_radii(net, x, y, self._pairwise)
        if self.norm == "linf":
            r = r / math.sqrt(math.prod(net.input_shape))
        return r

    def certify(self, network, x, y, eps):
        self._pairwise = None
        return super().certify(network, x, y, eps)

    def global_facts(self, net):
        return {"lipschitz_bound": net.lipschitz_bounds()[net.output_name]}

    def bytes_per_sample(self, net):
        from .ibp import workspace_floats

        return 8 * 2 * workspace_floats(net)
