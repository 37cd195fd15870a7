"""The training loop: epochs of global mini-batches on any backend. Everything else a run
does — evaluation, checkpoints, metrics, progress, the divergence guard — is an extension
fired by its trigger (:mod:`.extension`)."""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Callable, Optional

import numpy as np

from ..data.prepare import prepare_data
from ..data.sharding import Batch, batch_bounds, steps_per_epoch
from ..errors import Interrupted, StorageFailed, WorkerFailed
from ..files import drop_torn_tail, write_atomic
from ..kernel_warmup import warm_up
from ..optim import OPTIMIZERS, learning_rate
from ..parallel import make_backend
from ..parallel.backend import Totals
from ..parallel.devices import check_gpu_fits
from ..parallel.launch import RESTARTED_BY_LAUNCHER
from ..parallel.resources import check_memory, note, workers_on_this_node
from .adaptive import AdaptiveBatch
from .checkpointer import Checkpointer, RunState
from .early_stop import EarlyStop
from .evaluation import Evaluator
from .extension import Extension
from .metrics import DivergenceGuard, MetricsLog, TrainTotals
from .noise_scale import NoiseScaleLog
from .progress import ProgressReport
from .run_folder import JOB_FILE, check_run_dir

DUPLICATE_SIGNAL_S = 2.0    # a signal this soon after the first is the same request, delivered twice


class Trainer:
    """Runs one job to completion; on MPI every rank runs it and rank 0 writes the files.

    The loop applies one update per global batch and, after each, fires the extensions whose
    triggers hold. ``extensions`` adds to the default set (evaluation, checkpoints, metrics,
    progress, divergence guard); an extension may end the run early with :meth:`stop`.
    """

    log_every = 50          # steps between pulls of the running loss (one host sync each)

    def __init__(self, job, out_dir: str, resume: bool = False,
                 echo: Callable[[str], None] = print, progress: Optional[bool] = None,
                 extensions: Optional[list[Extension]] = None, resume_command: Optional[str] = None,
                 require_checkpoint: bool = True):
        self.job, self.out_dir, self.resume = job, out_dir, resume
        self.require_checkpoint = require_checkpoint     # see run_folder.check_run_dir
        self.resume_command = resume_command or f"distffn run JOB.yaml --out {out_dir} --resume"
        self.echo, self.progress = echo, progress
        self.ckpt_dir = os.path.join(out_dir, "checkpoints")
        self.user_extensions = list(extensions or [])
        self.is_root = True
        self.summary: dict = {}

    def stop(self, reason: str):
        """End the run after the current step's extensions (early stopping)."""
        self.stop_reason = reason

    # ---------------------------------------------------------------- set-up
    def _prepare_dir(self):
        """The run folder's job.yaml (this run's spec) and checkpoints/, once the run is accepted;
        a metrics line that a killed run left unfinished is cut off before the next one."""
        try:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        except OSError as e:
            raise StorageFailed(f"cannot write the run folder {self.out_dir}: {e.strerror or e}") from None
        # the spec as asked for: how many workers each life of the run had is in metrics.jsonl
        asked = dataclasses.replace(self.job, scaling=dataclasses.replace(
            self.job.scaling, num_workers=getattr(self, "requested_workers", self.job.scaling.num_workers)))
        write_atomic(os.path.join(self.out_dir, JOB_FILE), asked.to_yaml())
        metrics = os.path.join(self.out_dir, "metrics.jsonl")
        torn = drop_torn_tail(metrics)
        if torn:
            note(f"{metrics}: dropped an unfinished last line ({torn} bytes) that an interrupted run left")

    def _extensions(self, data, checkpointer: Checkpointer) -> list[Extension]:
        every = self.log_every
        evaluator = Evaluator(self.job, data, self.backend)
        t = self.job.training
        exts = [TrainTotals(every), DivergenceGuard(every, self.ckpt_dir), evaluator, checkpointer,
                *([self.adaptive] if self.adaptive is not None else []),
                ProgressReport(every, self.progress), MetricsLog(self.out_dir, evaluator.trigger, self.echo),
                *([EarlyStop(self.job, evaluator.trigger)] if t.max_steps or t.target_metric else []),
                # an adaptive batch pulls the gradient norms itself (and logs the noise scale)
                *([NoiseScaleLog(self.job, every)] if self.job.metrics.noise_scale and self.adaptive is None else []),
                *self.user_extensions]
        # by priority, then in the order given (sorted is stable)
        return sorted(exts, key=lambda e: -e.priority)

    def run(self) -> dict:
        """Train to the end (or to an early stop) and return the summary."""
        job = self.job
        self.t_start = time.perf_counter()
        warm_up(job)                # numba's kernels load while the data does
        ds, data, self.model = prepare_data(job)
        self.classifies = data.classifies
        self.n_train, self.n_test = int(ds.x_train.shape[0]), int(ds.x_test.shape[0])
        self.n_validation = 0 if ds.x_val is None else int(ds.x_val.shape[0])
        self.data_source = ds.source
        del ds      # only data's arrays stay referenced (an MPI backend shares them on a node)
        # with an adaptive batch, the steps at the first batch (the schedule's base)
        self.steps_per_epoch = steps_per_epoch(self.n_train, job.training.first_batch, job.training.drop_last)
        self.total_steps = self.steps_per_epoch * job.training.epochs
        buffers = OPTIMIZERS.get(job.optimizer.name).buffers
        checkpointer = Checkpointer(job, self.ckpt_dir, self.model.layout, buffers)
        # everything that needs no engine is checked before one starts
        if job.scaling.use_gpu and job.scaling.backend == "local":
            # MPI's launcher checks before it starts the ranks; a rank must not touch a GPU
            # before it knows which one is its own
            check_gpu_fits(job, self.model, len(buffers), data, job.scaling.num_workers)
        check_memory(job, self.model, len(buffers), workers_on_this_node(job))
        check_run_dir(self.out_dir, self.resume, self.require_checkpoint)
        self.failures, limit = 0, job.failure.max_failures
        self.requested_workers = job.scaling.num_workers
        self.failure = None         # the failure this life of the run follows (its start record says what it cost)
        while True:
            try:
                return self._attempt(data, checkpointer)
            except WorkerFailed as e:
                # a lost worker: new workers continue from the newest checkpoint (bit for bit,
                # as any resume); only where this process owns every worker, not on MPI ranks
                if self.backend is not None and self.backend.process_count > 1:
                    if limit and not os.environ.get(RESTARTED_BY_LAUNCHER):
                        raise WorkerFailed(f"{e}; under an external mpiexec nothing restarts the ranks: "
                                           f"run the same command again with --resume") from None
                    raise                       # distffn's launcher restarts the ranks
                n, k = job.scaling.num_workers, job.failure.min_workers
                if k and k <= self.workers_left < n:
                    # elastic: the same global batch split over those left gives the same model
                    # (N workers train the model of 1), so nobody waits for a replacement
                    note(f"{e}; going on with the {self.workers_left} workers left of {n} "
                         f"(failure.min_workers: {k}) from the newest checkpoint; the global batch "
                         f"stays {job.training.batch_size}")
                    if job.training.is_adaptive and not job.training.adaptive.multiple:
                        job.training.adaptive.multiple = n      # the batches stay multiples of the count asked for
                    job.scaling.num_workers = self.workers_left
                else:
                    if limit != -1 and self.failures >= limit:
                        raise
                    self.failures += 1
                    note(f"{e}; restart {self.failures} of {'unlimited' if limit == -1 else limit} "
                         f"(failure.max_failures) from the newest checkpoint")
                state = getattr(self, "state", None)
                self.failure = {"error": str(e), "at": self.failed_at or time.monotonic(), "num_workers": n,
                                "step": state.step if state is not None else 0}
                self.resume = True

    def _attempt(self, data, checkpointer) -> dict:
        """One life of the backend: start (fresh or from the newest checkpoint), train, close."""
        job = self.job
        self.backend, self.workers_left, self.failed_at = None, 0, None
        self.backend = backend = make_backend(job, data)
        self.is_root = backend.is_root
        try:
            restored = None
            if self.is_root:
                # a checkpoint this spec may not continue is refused before anything is written
                restored = checkpointer.restore() if self.resume else None
                self._prepare_dir()
            if restored:
                self.echo(f"resuming from {restored.path} (step {restored.state.step})")
                theta, optimizer_state, state = restored.theta, restored.optimizer_state, restored.state
            else:
                theta = np.empty(self.model.num_params, np.float32)
                self.model.init_params(theta, job.training.seed)
                optimizer_state, state = None, RunState()
            self.resumed_from = backend.broadcast(restored.path if restored else None)
            self.state = backend.broadcast(state)            # rank 0 decides where to start
            if self.state.samples is None:                   # a checkpoint from before samples were kept
                self.state.samples = self._fixed_samples_seen()
            self.adaptive = None
            if job.training.is_adaptive:
                self.adaptive = AdaptiveBatch(job)
                self.adaptive.restore(self.state.adaptive)
            backend.start(theta, optimizer_state, self.state.step)
            self.extensions = self._extensions(data, checkpointer)
            # overflow is caught explicitly (TrainingDiverged), not by NumPy warnings on stderr
            previous = self._catch_signals()
            try:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    self._loop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                if self._signal is not None and previous:
                    # the stop request may still arrive again as srun's forwarded SIGUSR1 (scancel
                    # signals the batch script, srun and the ranks, in any order): it must not kill
                    # a rank that has checkpointed and is closing (by default SIGUSR1 terminates)
                    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            if self._signal is not None:
                raise Interrupted(f"stopped by {signal.Signals(self._signal).name} after step {self.state.step}, "
                                  f"which is checkpointed in {self.ckpt_dir}; continue with: "
                                  f"{self.resume_command}", self._signal)
            return self.summary
        except WorkerFailed:
            self.failed_at = time.monotonic()
            # who is left to go on with; on Ray this also waits until a lost node is known to be
            # gone, so that the workers placed next are not placed there
            limit = job.failure.max_failures
            if 0 < job.failure.min_workers < job.scaling.num_workers or limit == -1 or self.failures < limit:
                self.workers_left = backend.live_workers()
            raise
        finally:
            backend.close()

    # ---------------------------------------------------------------- signals
    def _catch_signals(self) -> dict:
        """SIGTERM (a scheduler's preemption, ``scancel``, ``ray job stop``) and SIGINT end the
        run after the current step, checkpointed; on MPI every rank stops after the same step
        (the backend agrees on it). A second signal acts at once."""
        self._signal, self._first_signal_at = None, None
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}

    def _on_signal(self, signum, frame):
        if signum == signal.SIGUSR1:            # a SIGTERM forwarded through srun (which would SIGKILL on TERM)
            signum = signal.SIGTERM
        now = time.monotonic()
        if self._first_signal_at is None:
            self._first_signal_at = now
            self.backend.request_stop(signum)
            return
        # batch systems signal a whole process tree (scancel: the batch script, the launcher and
        # the ranks), so one request often arrives twice within milliseconds: that is not a
        # second request
        if now - self._first_signal_at < DUPLICATE_SIGNAL_S:
            return
        if self.backend.process_count > 1:       # this rank stops where it is
            raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {self.state.step}; continue "
                              f"from the newest checkpoint in {self.ckpt_dir} with: {self.resume_command}", signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    # ---------------------------------------------------------------- loop
    def _loop(self):
        job, backend, state = self.job, self.backend, self.state
        epochs, n, drop_last = job.training.epochs, self.n_train, job.training.drop_last
        adaptive = self.adaptive
        self.observation: dict = {}
        self.stop_reason = None
        self.lr = self._learning_rate()
        self.steps_run = 0
        self.train_seconds, self.train_samples = 0.0, 0
        self.startup_seconds, self.startup_samples = 0.0, 0
        self._new_epoch()
        self.epoch_ended = False
        self.finished = state.epoch >= epochs
        for ext in self.extensions:
            ext.initialize(self)
        self._mark = time.perf_counter()
        while not self.finished and self.stop_reason is None:
            bs = self.batch_size
            batch = Batch(state.epoch, state.sample, min(state.sample + bs, n), state.step)
            self.lr = self._learning_rate()
            backend.train_step(batch, self.lr)
            if not self.steps_run:
                self._time_startup(len(batch))
            if adaptive is not None:
                adaptive.stepped()
            state.step += 1
            state.batch += 1
            state.sample = batch.stop
            state.samples += len(batch)
            self.steps_run += 1
            self.epoch_samples += len(batch)
            # the epoch ends with its last sample, or (training.drop_last) before a short batch
            self.epoch_ended = batch.stop == n or (drop_last and n - batch.stop < bs)
            if self.epoch_ended:
                state.epoch, state.batch, state.sample = state.epoch + 1, 0, 0
            self.finished = state.epoch >= epochs
            self._fire()
            if self.epoch_ended:
                self.train_seconds += self.epoch_seconds
                self.train_samples += self.epoch_samples
                self._new_epoch()
            if backend.stop_signal and self._signal is None:       # every process at the same step
                self._signal = backend.stop_signal
                self.stop(f"{signal.Signals(self._signal).name} received")
        self.train_seconds += self.epoch_seconds       # an early stop ends an epoch part-way
        self.train_samples += self.epoch_samples
        backend.sync()
        for ext in self.extensions:
            ext.finalize(self)

    def _new_epoch(self):
        self.epoch_totals = Totals()
        self.last_totals = Totals()
        self.epoch_seconds, self.epoch_samples = 0.0, 0
        self.epoch_startup = (0.0, 0)      # (seconds, samples) of the start-up step in this epoch

    @property
    def batch_size(self) -> int:
        """The global batch of the coming step."""
        return self.adaptive.batch_size if self.adaptive is not None else self.job.training.batch_size

    def _learning_rate(self) -> float:
        if self.adaptive is not None:
            return self.adaptive.learning_rate()
        return learning_rate(self.job.optimizer, self.state.step, self.total_steps)

    def samples_seen(self) -> int:
        """Training samples stepped through up to ``state.step``, before a resume included
        (``train_samples`` and ``epoch_samples`` count this life's only: they time throughput)."""
        return self.state.samples

    def epoch_progress(self) -> float:
        """Epochs done, as a fraction: steps over steps per epoch on a fixed batch, the place
        in the epoch's permutation on an adaptive one."""
        state = self.state
        if self.adaptive is None:
            return round(state.step / self.steps_per_epoch, 4)
        return round(state.epoch + state.sample / self.n_train, 4)

    def _fixed_samples_seen(self) -> int:
        bs, state = self.job.training.batch_size, self.state
        per_epoch = batch_bounds(self.n_train, bs, self.steps_per_epoch - 1)[1]
        return state.epoch * per_epoch + batch_bounds(self.n_train, bs, state.batch)[0]

    def _time_startup(self, samples: int):
        """The first step of a backend's life pays one-off costs (every worker and aggregator
        loading its kernels and allocating its buffers): it is timed apart, still counted in
        the training time, and left out of the samples/s figures, or a run resumed a few steps
        before an epoch's end reports a fraction of the real throughput for that epoch."""
        self.backend.sync()
        self.startup_seconds, self.startup_samples = time.perf_counter() - self._mark, samples
        self.epoch_startup = (self.startup_seconds, samples)

    def _fire(self):
        """Run the extensions due after this step. Training-time ones (the loss pull) run first;
        before the others the backend finishes its queued steps, and their time is excluded
        from the epoch's training time."""
        paused = False
        for ext in self.extensions:
            if not ext.trigger(self):
                continue
            if not ext.training_time and not paused:
                self.backend.sync()
                self.epoch_seconds += time.perf_counter() - self._mark
                paused = True
            ext(self)
        if not paused:
            return
        self._mark = time.perf_counter()
