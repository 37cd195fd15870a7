"""From a job spec to the arrays the workers train on: the dataset, checked against the
model, with targets in the form the model's output/loss pair needs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import UserError
from ..nn.model import MLP
from .dataset import Dataset
from .load import load_dataset


@dataclass
class PreparedData:
    """Inputs, loss targets and class ids (None for regression) of the splits; the
    validation split's are None unless ``data.validation_fraction`` carved one."""
    x_train: np.ndarray
    t_train: np.ndarray
    labels_train: object
    x_test: np.ndarray
    t_test: np.ndarray
    labels_test: object
    x_val: Optional[np.ndarray] = None
    t_val: Optional[np.ndarray] = None
    labels_val: object = None

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
    largest = job.training.largest_batch
    if largest > n:
        carved = " left after data.validation_fraction" if ds.x_val is not None else ""
        field = "training.adaptive.max" if job.training.is_adaptive else "training.batch_size"
        raise UserError(f"{field}: {largest} is larger than the {n:,} "
                        f"training samples{carved} of data.dataset {job.data.dataset!r}")
    where = f"data.dataset {job.data.dataset!r}"
    obj = model.objective
    labels = ds.kind == "classification"
    data = PreparedData(
        x_train=ds.x_train, t_train=obj.prepare_targets(ds.y_train, f"{where} (training labels)"),
        labels_train=ds.y_train if labels else None,
        x_test=ds.x_test, t_test=obj.prepare_targets(ds.y_test, f"{where} (test labels)"),
        labels_test=ds.y_test if labels else None,
    )
    if ds.x_val is not None:
        data.x_val, data.t_val = ds.x_val, obj.prepare_targets(ds.y_val, f"{where} (validation labels)")
        data.labels_val = ds.y_val if labels else None
    return ds, data, model
