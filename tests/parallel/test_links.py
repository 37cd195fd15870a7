"""The α-β cost of a link: the ring allreduce's and a central aggregator's formulas, and the
network presets."""
from __future__ import annotations

import pytest

from distffn.parallel.links import NETWORKS, Network, communication_seconds


def test_ring_allreduce_and_central_costs():
    net = Network(alpha=1e-5, beta=1e-9)
    n = 4_000_000
    assert communication_seconds(n, 1, net) == 0.0
    assert communication_seconds(n, 2, net) == pytest.approx(2 * 1e-5 + n * 1e-9)
    assert communication_seconds(n, 8, net) == pytest.approx(14 * 1e-5 + 2 * 7 / 8 * n * 1e-9)
    # the ring's bandwidth term approaches 2·n·β; a central aggregator's grows with N
    assert communication_seconds(n, 1024, net) < 2 * n * 1e-9 + 2048 * 1e-5
    assert communication_seconds(n, 8, net, "central") == pytest.approx(2e-5 + 16 * n * 1e-9)


def test_every_network_preset_is_documented_with_positive_alpha_and_beta():
    assert set(NETWORKS) >= {"10gbe", "25gbe", "100gbe", "ib-hdr", "nvlink", "veth-local"}
    for name, net in NETWORKS.items():
        assert net.alpha > 0 and net.beta > 0 and "β" in NETWORKS.doc(name) and "α" in NETWORKS.doc(name)
    # faster links move a byte faster
    betas = [NETWORKS.get(n).beta for n in ("10gbe", "25gbe", "100gbe", "ib-hdr", "nvlink")]
    assert betas == sorted(betas, reverse=True)
