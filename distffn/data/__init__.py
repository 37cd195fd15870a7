"""Data: datasets by name (one registry), seeded splits, the arrays a job trains on, and
which samples each worker sees of every global batch (sharding)."""
from .dataset import DATASETS, Dataset
from .load import load_dataset
from .prepare import PreparedData, prepare_data

__all__ = ["DATASETS", "Dataset", "PreparedData", "load_dataset", "prepare_data"]
