"""The network: activations, output/loss pairs, initialisers, the flat parameter layout, the
model's forward and backward passes, and the central-difference gradient check."""
from .model import MLP

__all__ = ["MLP"]
