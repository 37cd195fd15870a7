"""The α-β cost of a link: ``alpha`` seconds per message, ``beta`` seconds per byte, for the
network presets a projection or an adaptive batch's ``goodput`` rule plans for
(:data:`NETWORKS`), and the time to sum ΔΘ over N workers on one of them:

    allreduce(N) = 2(N−1)·α + 2(N−1)/N · n·β        (ring; each worker sends and receives
                                                     2(N−1)/N of the n bytes of ΔΘ)
    central(N)   = 2·α + 2N · n·β                     (one aggregator receives N gradients
                                                     and sends Θ back N times)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..registry import Registry


@dataclass(frozen=True)
class Network:
    """A link: ``alpha`` seconds per message, ``beta`` seconds per byte."""
    alpha: float
    beta: float


NETWORKS = Registry("network", "network")


def _register(name: str, alpha: float, gbit_per_s: float, doc: str):
    NETWORKS.register(name, Network(alpha, 8.0 / (gbit_per_s * 1e9)), doc=doc)


# Line rates from the standards; latencies are typical one-way MPI small-message latencies
# (kernel TCP for Ethernet). Real links reach 70-95 % of the line rate, so these projections
# are optimistic about bandwidth.
_register("10gbe", 20e-6, 10, "10 Gb/s Ethernet: α = 20 µs, β = 0.8 ns/B (IEEE 802.3ae line rate; "
          "α: MPI over kernel TCP, typical)")
_register("25gbe", 15e-6, 25, "25 Gb/s Ethernet: α = 15 µs, β = 0.32 ns/B (IEEE 802.3by line rate; "
          "α: MPI over kernel TCP, typical)")
_register("100gbe", 10e-6, 100, "100 Gb/s Ethernet: α = 10 µs, β = 0.08 ns/B (IEEE 802.3ba line rate; "
          "α: MPI over kernel TCP, typical)")
_register("ib-hdr", 1e-6, 200, "InfiniBand HDR: α = 1 µs, β = 0.04 ns/B (200 Gb/s per port, IBTA HDR; "
          "α: NVIDIA ConnectX-6 datasheet, < 1 µs MPI latency)")
_register("nvlink", 3e-6, 2400, "NVLink 3 (A100, in one node): α = 3 µs, β = 0.0033 ns/B (300 GB/s "
          "per direction, NVIDIA A100 datasheet; α: NCCL's small-message latency, typical)")
# Measured, not a line rate: two test hosts of cluster/test-hosts.sh (network namespaces on one
# machine, a veth pair each to a Linux bridge), TCP between them over eth0
_register("veth-local", 5.8e-6, 10.8, "two test hosts' veth link (network namespaces on a Linux bridge, "
          "cluster/test-hosts.sh): α = 5.8 µs, β = 0.74 ns/B (measured 2026-12-04 by python bench/bench_hosts.py: "
          "half the median TCP round trip of 64 B; the median bulk TCP stream, 1.35 GB/s)")


def communication_seconds(n_bytes: float, workers: int, net: Network, aggregation: str = "allreduce") -> float:
    """Seconds to sum ΔΘ of ``n_bytes`` over ``workers`` and hand every worker the result."""
    n = workers
    if n <= 1:
        return 0.0
    if aggregation == "central":
        return 2 * net.alpha + 2 * n * n_bytes * net.beta
    return 2 * (n - 1) * net.alpha + 2 * (n - 1) / n * n_bytes * net.beta
