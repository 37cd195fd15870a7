"""Scaling experiments (``distffn sweep``): steps to a target against batch size with the
learning rate tuned per batch size, step times against workers, the critical-batch fit,
the measured gradient noise scale and the α-β projection to cluster scale."""
from ..parallel.links import NETWORKS
from .spec import LR_RULES, SweepSpec, load_sweep

__all__ = ["LR_RULES", "NETWORKS", "SweepSpec", "load_sweep"]
