"""Evaluation on the held-out split, written once for every backend: the :class:`Evaluator`
extension during training, and ``distffn eval`` for a saved checkpoint."""
from __future__ import annotations

import os

import numpy as np

from .. import kernels
from ..data.byte_images import ByteImages
from ..data.prepare import prepare_data
from ..data.sharding import shard_bounds
from ..errors import UserError
from ..jobspec import apply_overrides, from_stored, load_job
from ..nn.model import MLP
from ..parallel.backend import Totals
from .checkpoint import load_checkpoint, newest_valid_checkpoint, unpack_state
from .extension import PRIORITY_EVALUATE, Extension
from .triggers import AnyTrigger, end_of_training, steps_or_epoch


class SplitEvaluator:
    """Exact loss and correct-count totals of a parameter vector on one split (``x``, ``t``,
    ``labels``), in chunks of ``chunk`` rows.

    With several trainer processes (MPI ranks), each takes its share of the rows and the
    totals are summed with ``sum_over_processes``.
    """

    def __init__(self, model_cfg, x, t, labels, chunk: int, xp=np,
                 process_index: int = 0, process_count: int = 1, sum_over_processes=None,
                 kernels: str = "numpy"):
        lo, hi = shard_bounds(x.shape[0], process_count, process_index)
        # 8-bit images stay bytes on the host: the model decodes a chunk at a time
        self.x = x[lo:hi] if isinstance(x, ByteImages) and xp is np else xp.asarray(x[lo:hi])
        self.t = xp.asarray(t[lo:hi])
        self.labels = None if labels is None else xp.asarray(labels[lo:hi])
        self.model = MLP(model_cfg, xp, kernels=kernels)
        self.chunk = chunk
        self.sum = sum_over_processes or (lambda values: values)

    def __call__(self, theta) -> Totals:
        loss, correct = self.model.evaluate(self.model.layout.views(theta), self.x, self.t,
                                            self.labels, self.chunk)
        total = self.sum(np.array([loss, correct or 0, self.x.shape[0]], np.float64))
        out = Totals()
        out.add(total[0], int(round(total[1])), int(round(total[2])))
        return out


class Evaluator(Extension):
    """Test (and validation) loss and accuracy of the current Θ, every ``training.eval_every``
    steps (by default at the end of every epoch) and after the last step, early stops
    included; the results go into ``trainer.observation["test"]`` (and ``["validation"]``)."""

    priority = PRIORITY_EVALUATE

    def __init__(self, job, data, backend):
        self.trigger = AnyTrigger(steps_or_epoch(job.training.eval_every), end_of_training)
        self.split = SplitEvaluator(job.model, data.x_test, data.t_test, data.labels_test,
                                    job.training.eval_batch_size, backend.array_module,
                                    backend.process_index, backend.process_count,
                                    backend.sum_over_processes,
                                    kernels.resolve(job.scaling.kernels, job.scaling.use_gpu))
        self.validation = None if data.x_val is None else SplitEvaluator(
            job.model, data.x_val, data.t_val, data.labels_val, job.training.eval_batch_size,
            backend.array_module, backend.process_index, backend.process_count, backend.sum_over_processes,
            kernels.resolve(job.scaling.kernels, job.scaling.use_gpu))
        self.backend = backend
        self.last_step = None

    def __call__(self, trainer):
        theta = self.backend.params()
        trainer.observation["test"] = self.split(theta)
        if self.validation is not None:
            trainer.observation["validation"] = self.validation(theta)
        trainer.observation["test_step"] = self.last_step = trainer.state.step

    def finalize(self, trainer):
        if self.last_step != trainer.state.step:     # a resumed run that had nothing left to do
            self(trainer)


def checkpoint_with_job(path: str, job_path: str | None = None, overrides=None):
    """``(path, arrays, meta, job)`` of a checkpoint file, or of a run folder's newest valid
    one; the job spec is the checkpoint's own unless ``job_path`` is given (to point at the
    data elsewhere, say)."""
    if os.path.isdir(path):
        folder = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        found = newest_valid_checkpoint(folder)
        if found is None:
            raise UserError(f"{path}: a folder without a valid checkpoint; expected a run folder "
                            f"(with checkpoints/step-*.npz) or a checkpoint file")
        path, arrays, meta = found
    else:
        arrays, meta = load_checkpoint(path)
    if job_path:
        job = load_job(job_path, overrides)
    else:
        if "job" not in meta:
            raise UserError(f"{path}: the checkpoint carries no job spec; pass --job JOB.yaml")
        job = from_stored(apply_overrides(meta["job"], overrides), source=f"{path} (job spec)")
    return path, arrays, meta, job


def evaluate_checkpoint(path: str, job_path: str | None = None, overrides=None) -> dict:
    """Exact test-split totals of the parameters in ``path``: a checkpoint file, or a run
    folder (its newest valid checkpoint).

    The job spec comes from the checkpoint unless ``job_path`` is given (to point at the data
    elsewhere, say); either way the checkpoint's parameters must fit the spec's model.
    """
    path, arrays, meta, job = checkpoint_with_job(path, job_path, overrides)
    _, data, model = prepare_data(job)
    theta, _ = unpack_state(model.layout, arrays, (), path)
    test = SplitEvaluator(job.model, data.x_test, data.t_test, data.labels_test,
                          job.training.eval_batch_size,
                          kernels=kernels.resolve(job.scaling.kernels, job.scaling.use_gpu))(theta)
    classifies = data.classifies
    return {"checkpoint": path, "step": meta.get("step"), "test_loss": test.loss_sum / test.count, "test_count": test.count,
            "test_correct": test.correct if classifies else None,
            "test_accuracy": test.correct / test.count if classifies else None}
