"""``distffn eval``: test loss and accuracy of a saved checkpoint."""
from __future__ import annotations

import numpy as np

from .checkpoint import load_checkpoint
from .config import apply_overrides, from_dict, load_job
from .errors import UserError


def evaluate_checkpoint(path: str, job_path: str | None = None, overrides=None) -> dict:
    """Exact test-split totals of the parameters in ``path``.

    The job spec comes from the checkpoint unless ``job_path`` is given (to point at the data
    elsewhere, say); either way the checkpoint's parameters must fit the spec's model.
    """
    from .trainer import prepare_data

    arrays, meta = load_checkpoint(path)
    if job_path:
        job = load_job(job_path, overrides)
    else:
        if "job" not in meta:
            raise UserError(f"{path}: the checkpoint carries no job spec; pass --job JOB.yaml")
        job = from_dict(apply_overrides(meta["job"], overrides), source=f"{path} (job spec)")
    ds, data, model = prepare_data(job)
    theta = np.empty(model.num_params, np.float32)
    model.layout.from_arrays(arrays, theta, path)
    loss, correct = model.evaluate(model.layout.views(theta), data.x_test, data.t_test,
                                   data.labels_test, job.training.eval_batch_size)
    n = data.x_test.shape[0]
    return {"step": meta.get("step"), "test_loss": loss / n, "test_count": n,
            "test_correct": correct, "test_accuracy": None if correct is None else correct / n}
