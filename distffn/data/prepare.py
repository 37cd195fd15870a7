"""From a job spec to the arrays the workers train on: the dataset, checked against the
model, with targets in the form the model's output/loss pair needs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..nn.model import MLP
from .dataset import Dataset
from .load import load_dataset


@dataclass
class PreparedData:
    """Inputs, loss targets and class ids (None for regression) of both splits."""
    x_train: np.ndarray
    t_train: np.ndarray
    labels_train: object
    x_test: np.ndarray
    t_test: np.ndarray
    labels_test: object

    @property
    def classifies(self) -> bool:
        return self.labels_train is not None


def prepare_data(job) -> tuple[Dataset, PreparedData, MLP]:
    """Load ``job``'s dataset, check it fits the model and the batch size, and build the
    targets the loss needs."""
    model = MLP(job.model)
    ds = load_dataset(job.data, job.training.seed)
    model.check_data(ds.num_features, job.data.dataset)
    n = ds.x_train.shape[0]
    if job.training.batch_size > n:
        raise UserError(f"training.batch_size: {job.training.batch_size} is larger than the {n:,} "
                        f"training samples of data.dataset {job.data.dataset!r}")
    where = f"data.dataset {job.data.dataset!r}"
    obj = model.objective
    labels = ds.kind == "classification"
    data = PreparedData(
        x_train=ds.x_train, t_train=obj.prepare_targets(ds.y_train, f"{where} (training labels)"),
        labels_train=ds.y_train if labels else None,
        x_test=ds.x_test, t_test=obj.prepare_targets(ds.y_test, f"{where} (test labels)"),
        labels_test=ds.y_test if labels else None,
    )
    return ds, data, model
