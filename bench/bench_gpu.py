#!/usr/bin/env python
"""GPU training speed of distffn against PyTorch eager and PyTorch with its step in a CUDA graph.

Per case (model, batch size), in one process, rounds of timed blocks, contenders alternating
within each round, medians over rounds:

  distffn graph   LocalBackend.train_step with scaling.cuda_graph: true (the step replayed from
                  a CUDA graph), K consecutive full batches of the epoch order, then
                  train_totals() (the trainer's stats sync)
  distffn eager   the same with scaling.cuda_graph: false (kernel by kernel)
  torch eager     the same model, initial weights and optimizer (SGD momentum 0.9, lr 0.05, fused)
                  as a plain PyTorch loop: index_select, zero_grad(set_to_none=True), forward,
                  CrossEntropyLoss, backward, step; the loss summed on the device, read once a block
  torch graphed   the whole torch step (gather, forward, backward, optimizer step, loss sum)
                  captured once in a torch.cuda.CUDAGraph (warm-up on a side stream; the batch's
                  indices copied into a static index tensor before each replay; lr a device tensor)

Both sides keep the data on the device: the 8-bit images uploaded once as uint8, each batch
gathered and normalised there ((code / 255 − mean) / std in float32). A block is timed with a
device synchronisation at both ends. ms/step = seconds / K; samples/s = K·B / seconds; the
ratios are distffn samples/s ÷ torch samples/s (above 1: distffn is faster).

Then the whole job (jobs/fashion-mnist-mlp.yaml, 20 epochs, cosine lr, one evaluation per
epoch) as fresh processes timed from start to exit: `python -m distffn run JOB --set
scaling.use_gpu=true` (cuda_graph auto, and false), against this script's own PyTorch job
(``--torch-job eager|graphed``: the same schedule, distffn's initial weights, data on the
device); each reports its final test accuracy.

    python bench/bench_gpu.py --json runs/bench_gpu.json      # full run on a GPU, ~2-3 min on an H200
    python bench/bench_gpu.py --smoke --device cpu            # CPU smoke test of the PyTorch eager parts
    python bench/bench_gpu.py --cases 784-1024-10:128 784-8192-8192-10:4096:tf32 --no-jobs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib
from benchlib import JOB, log

# "layers:batch[:tf32]"; tf32 turns TF32 products on for both sides in that case
CASES = ["784-1024-10:128", "784-1024-10:1024", "784-1024-10:8192", "784-8192-8192-10:4096"]
SMOKE_CASES = ["784-1024-10:128", "784-256-256-10:256"]
SMOKE_LIMIT_TRAIN = 2000


# ---------------------------------------------------------------- cases and environment

class Case:
    """One model and batch size: ``784-1024-10:128``, optionally ``:tf32``."""

    def __init__(self, spec: str):
        parts = spec.split(":")
        bad = ValueError(f"--cases: expected LAYERS:BATCH[:tf32] such as 784-1024-10:128, got {spec!r}")
        try:
            self.layers = [int(x) for x in parts[0].split("-")]
            self.batch = int(parts[1])
        except (IndexError, ValueError):
            raise bad from None
        if len(self.layers) < 2 or parts[2:] not in ([], ["tf32"]):
            raise bad
        self.tf32 = parts[2:] == ["tf32"]
        self.spec = spec

    @property
    def model_name(self) -> str:
        return "-".join(map(str, self.layers)) + (" tf32" if self.tf32 else "")


def has_scaling_field(name: str) -> bool:
    """Whether distffn's job spec knows ``scaling.<name>`` (the GPU fields arrive separately)."""
    from distffn.jobspec import ScalingConfig
    return name in getattr(ScalingConfig, "__dataclass_fields__", {})


def versions(device: str) -> dict:
    """GPU name, driver, CUDA, CuPy and PyTorch versions (None where not found)."""
    import numpy as np
    import torch
    v = {"device": device, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
         "numpy": np.__version__, "gpu": None, "driver": None, "cupy": None, "cupy_cuda_runtime": None}
    try:
        import cupy
        v["cupy"] = cupy.__version__
        if device == "cuda":
            v["cupy_cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    except Exception as e:
        v["cupy_error"] = repr(e)[:200]
    if device == "cuda":
        v["gpu"] = torch.cuda.get_device_name(0)
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            line = q.stdout.strip().splitlines()[0]
            v["gpu"], v["driver"], v["gpu_memory"] = [s.strip() for s in line.split(",")][:3]
        except Exception as e:
            v["nvidia_smi_error"] = repr(e)[:200]
    return v


def version_line(v: dict) -> str:
    return (f"  GPU {v['gpu']}   driver {v['driver']}   CUDA (torch) {v['torch_cuda']}   CUDA runtime "
            f"(CuPy) {v['cupy_cuda_runtime']}   CuPy {v['cupy']}   PyTorch {v['torch']}   NumPy {v['numpy']}")


def make_sync(device: str):
    """A function that waits for all work on the device (every stream: CuPy's and torch's)."""
    if device != "cuda":
        return lambda: None
    try:
        import cupy
        dev = cupy.cuda.Device()
        return dev.synchronize
    except Exception:
        import torch
        return torch.cuda.synchronize


def set_torch_tf32(on: bool):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


# ---------------------------------------------------------------- data and model on the torch side

class TorchData:
    """The training (or test) split on the torch device: uint8 codes (or float32 rows where the
    dataset is not 8-bit), int64 labels, and the normalisation distffn applies."""

    def __init__(self, x, labels, device: str):
        import numpy as np
        import torch

        from distffn.data.byte_images import ByteImages
        self.torch = torch
        if isinstance(x, ByteImages):
            self.codes = torch.from_numpy(np.require(x.codes, requirements=["C", "W"])).to(device)
            self.mean, self.std = float(x.mean), float(x.std)
        else:
            self.codes = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
            self.mean, self.std = None, None
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(device)
        self.n = self.codes.shape[0]

    def gather(self, idx):
        """(inputs, labels) of rows ``idx``, decoded on the device (float32, as distffn does)."""
        xb = self.codes.index_select(0, idx)
        if self.mean is not None:
            xb = xb.to(self.torch.float32).div_(255.0).sub_(self.mean).div_(self.std)
        return xb, self.labels.index_select(0, idx)


def torch_net(layer_arrays: dict, sizes: list, device: str):
    """Linear/ReLU stack of ``sizes`` started from distffn's initial weights (W{i} is (in, out))."""
    import numpy as np
    import torch
    nn = torch.nn
    mods = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    net = nn.Sequential(*mods)
    with torch.no_grad():
        for i, lin in enumerate(m for m in mods if isinstance(m, nn.Linear)):
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(layer_arrays[f"W{i}"].T)))
            lin.bias.copy_(torch.from_numpy(layer_arrays[f"b{i}"]))
    return net.to(device)


class TorchTrainer:
    """A PyTorch model, optimizer and step on ``device``: eager, or (``graphed``) the whole step
    captured in one CUDA graph, replayed for full batches of ``B`` (other sizes run eagerly)."""

    def __init__(self, data: TorchData, layer_arrays, sizes, B, lr, momentum, device, graphed):
        import torch
        self.torch, self.data, self.B, self.device, self.graphed = torch, data, B, device, graphed
        self.net = torch_net(layer_arrays, sizes, device)
        self.loss_fn = torch.nn.CrossEntropyLoss()
        cuda = device == "cuda"
        # a device tensor lr: a captured step reads it at each replay, so a schedule can change it
        self.lr = torch.tensor(lr, dtype=torch.float32, device=device) if graphed else lr
        self.opt = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=momentum, fused=cuda)
        self.loss_sum = torch.zeros((), device=device)
        self.graph = None
        if graphed:
            self._capture(lr)

    def set_lr(self, lr: float):
        if self.graphed:
            self.lr.fill_(lr)
        else:
            for g in self.opt.param_groups:
                g["lr"] = lr

    def _body(self, idx):
        xb, yb = self.data.gather(idx)
        loss = self.loss_fn(self.net(xb), yb)
        loss.backward()
        self.opt.step()
        self.loss_sum += loss.detach()

    def eager_step(self, idx):
        self.opt.zero_grad(set_to_none=True)
        self._body(idx)

    def _capture(self, lr):
        """Warm up on a side stream (the optimizer makes its momentum buffers), capture one
        step, then put back the initial weights, zero momentum and a zero loss sum, so the
        graphed run starts where the eager one does."""
        torch = self.torch
        params = list(self.net.parameters())
        initial = [p.detach().clone() for p in params]
        self.idx = torch.arange(self.B, device=self.device) % self.data.n
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.eager_step(self.idx)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)    # the captured backward writes fresh gradients
        with torch.cuda.graph(self.graph):
            self._body(self.idx)
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
            for p in params:
                self.opt.state[p]["momentum_buffer"].zero_()
            self.loss_sum.zero_()
        self.lr.fill_(lr)
        torch.cuda.synchronize()

    def step(self, idx):
        """One step on rows ``idx`` (a replay when graphed and ``idx`` is a full batch)."""
        if self.graph is not None and idx.shape[0] == self.B:
            self.idx.copy_(idx)
            self.graph.replay()
        else:
            self.eager_step(idx)

    def take_loss(self) -> float:
        v = self.loss_sum.item()
        self.loss_sum.zero_()
        return v


# ---------------------------------------------------------------- contenders (one case)

class DistffnContender:
    """One distffn LocalBackend at the case's batch size; keeps its place in the epochs."""

    def __init__(self, name, job, data, theta0, sync):
        from distffn.optim.schedules import learning_rate
        from distffn.parallel.local import LocalBackend
        self.name, self.job, self.sync, self.B = name, job, sync, job.training.batch_size
        self.full = len(data.x_train) // self.B
        self.backend = LocalBackend(job, data)
        self.backend.start(theta0.copy(), None, 0)          # None: fresh (zero) velocity
        self.lr = learning_rate(job.optimizer, 0, 10 ** 9)  # constant schedule
        self.epoch = self.batch = self.step = 0

    def run(self, k: int) -> dict:
        from distffn.data.sharding import Batch
        be, B = self.backend, self.B
        self.sync()
        t0 = time.perf_counter()
        for _ in range(k):
            be.train_step(Batch(self.epoch, self.batch * B, (self.batch + 1) * B, self.step), self.lr)
            self.step += 1
            self.batch += 1
            if self.batch == self.full:
                self.epoch, self.batch = self.epoch + 1, 0
        tot = be.train_totals()
        self.sync()
        dt = time.perf_counter() - t0
        return {"seconds": dt, "mean_loss": tot.loss_sum / tot.count if tot.count else None}

    def close(self):
        self.backend.close()


class TorchContender:
    """A TorchTrainer walking per-epoch device permutations of the training split."""

    def __init__(self, name, trainer: TorchTrainer, sync, seed: int):
        import torch
        self.name, self.t, self.sync, self.torch = name, trainer, sync, torch
        self.n, self.B = trainer.data.n, trainer.B
        self.full = self.n // self.B
        self.gen = torch.Generator(device=trainer.device).manual_seed(seed)
        self.perm = torch.randperm(self.n, device=trainer.device, generator=self.gen)
        self.batch = 0

    def run(self, k: int) -> dict:
        t, B = self.t, self.B
        self.sync()
        t0 = time.perf_counter()
        for _ in range(k):
            if self.batch == self.full:
                self.perm = self.torch.randperm(self.n, device=t.device, generator=self.gen)
                self.batch = 0
            t.step(self.perm[self.batch * B:(self.batch + 1) * B])
            self.batch += 1
        loss = t.take_loss()                # .item(): the stats sync
        self.sync()
        dt = time.perf_counter() - t0
        return {"seconds": dt, "mean_loss": loss / k}

    def close(self):
        pass


def default_steps(B: int) -> int:
    """Timed steps per block: ~128k samples, 10 to 500 steps."""
    return max(10, min(500, 131072 // B))


def build_contenders(case: Case, args, data, tdata, sync) -> list:
    """The contenders of ``case``; one that cannot be built is left out with a printed line."""
    from distffn.jobspec import load_job
    from distffn.nn.model import MLP
    gpu = args.device == "cuda"
    base = benchlib.job_overrides(args.limit_train, [
        f"model.layers=[{','.join(map(str, case.layers))}]", f"training.batch_size={case.batch}",
        f"scaling.use_gpu={'true' if gpu else 'false'}"])
    if case.tf32 and gpu and has_scaling_field("tf32"):
        base.append("scaling.tf32=true")
    job = load_job(args.job, base)
    model = MLP(job.model)
    theta0 = benchlib.initial_theta(model, job.training.seed)
    arrays = model.layout.to_arrays(theta0)
    set_torch_tf32(case.tf32 and gpu)
    out, lr, mom = [], job.optimizer.lr, job.optimizer.momentum
    if gpu and has_scaling_field("cuda_graph"):
        variants = [("distffn graph", ["scaling.cuda_graph=true"]),
                    ("distffn eager", ["scaling.cuda_graph=false"])]
    else:
        variants = [("distffn", [])]
    for name, extra in variants:
        try:
            out.append(DistffnContender(name, load_job(args.job, base + extra), data, theta0, sync))
        except Exception as e:
            log(f"  {case.spec}: {name} left out: {type(e).__name__}: {e}")
    out.append(TorchContender("torch eager", TorchTrainer(tdata, arrays, case.layers, case.batch, lr, mom,
                                                          args.device, graphed=False), sync, job.training.seed))
    if gpu:
        try:
            out.append(TorchContender("torch graphed", TorchTrainer(
                tdata, arrays, case.layers, case.batch, lr, mom, args.device, graphed=True),
                sync, job.training.seed))
        except Exception as e:
            log(f"  {case.spec}: torch graphed left out: {type(e).__name__}: {e}")
    return out


# ---------------------------------------------------------------- summary

def summarize(blocks: list, cases: list) -> dict:
    summary = {}
    for case in cases:
        rows = [r for r in blocks if r["case"] == case.spec]
        if not rows:
            continue
        names = list(dict.fromkeys(r["contender"] for r in rows))
        sps = {c: {r["round"]: r["samples_per_s"] for r in rows if r["contender"] == c} for c in names}
        ms = {c: statistics.median(r["ms_per_step"] for r in rows if r["contender"] == c) for c in names}
        med = {c: statistics.median(v.values()) for c, v in sps.items()}
        ratios = {}
        for d in (c for c in names if c.startswith("distffn")):
            for t in (c for c in names if c.startswith("torch")):
                common = sorted(set(sps[d]) & set(sps[t]))
                ratios[f"{d} / {t}"] = {
                    "ratio_of_medians": med[d] / med[t],
                    "per_round_median": statistics.median(sps[d][i] / sps[t][i] for i in common)}
        summary[case.spec] = {
            "layers": case.layers, "batch_size": case.batch, "tf32": case.tf32,
            "rounds": len({r["round"] for r in rows}), "steps": rows[0]["steps"],
            "ms_per_step_median": ms, "samples_per_s_median": med,
            "samples_per_s_range": {c: [min(v.values()), max(v.values())] for c, v in sps.items()},
            "ratios": ratios}
    return summary


def print_cases(summary: dict):
    p = print
    hdr = f"{'model':<22} {'batch':>5} {'steps':>5}  {'contender':<14} {'ms/step':>9} {'samples/s':>13}  {'range (samples/s)':<25}"
    p(hdr)
    p("-" * len(hdr))
    for s in summary.values():
        model = "-".join(map(str, s["layers"])) + (" tf32" if s["tf32"] else "")
        for i, (c, v) in enumerate(s["samples_per_s_median"].items()):
            lo, hi = s["samples_per_s_range"][c]
            p(f"{model if i == 0 else '':<22} {s['batch_size'] if i == 0 else '':>5} "
              f"{s['steps'] if i == 0 else '':>5}  {c:<14} {s['ms_per_step_median'][c]:>9.4f} "
              f"{v:>13,.0f}  {lo:,.0f}–{hi:,.0f}")
        for k, r in s["ratios"].items():
            p(f"{'':<36}{k:<32} {r['ratio_of_medians']:>6.2f}×  (per-round median {r['per_round_median']:.2f}×)")
    p("")
    p("ms/step and samples/s: medians over rounds; ratio = distffn samples/s ÷ torch samples/s "
      "(above 1: distffn faster), of medians and the median of per-round ratios.")


# ---------------------------------------------------------------- the whole job, fresh processes

def job_commands(args, tmp: str) -> list:
    """(name, argv, run folder or None) of each whole-job contender."""
    py, here = sys.executable, os.path.abspath(__file__)
    gpu = args.device == "cuda"
    common = [f"scaling.use_gpu={'true' if gpu else 'false'}"]
    if args.smoke:
        common += ["training.epochs=1", f"data.limit_train={SMOKE_LIMIT_TRAIN}"]
    sets = [x for s in common for x in ("--set", s)]
    out = []
    variants = [("distffn", [])]
    if gpu and has_scaling_field("cuda_graph"):
        variants = [("distffn graph", ["--set", "scaling.cuda_graph=auto"]),
                    ("distffn eager", ["--set", "scaling.cuda_graph=false"])]
    for name, extra in variants:
        run_dir = os.path.join(tmp, name.replace(" ", "-"))
        out.append((name, [py, "-m", "distffn", "run", args.job, *sets, *extra, "--out", run_dir,
                           "--no-progress"], run_dir))
    torch_modes = ["eager", "graphed"] if gpu else ["eager"]
    for mode in torch_modes:
        out.append((f"torch {mode}", [py, here, "--torch-job", mode, "--device", args.device,
                                      "--job", args.job] + (["--smoke"] if args.smoke else []), None))
    return out


def run_jobs(args, deadline: float) -> list:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_jobs-") as tmp:
        for name, argv, run_dir in job_commands(args, tmp):
            left = deadline - time.perf_counter()
            if left < 10:
                log(f"job {name}: skipped, the time budget (--budget-s) is spent")
                results.append({"contender": name, "skipped": "time budget"})
                continue
            log(f"job {name}: {' '.join(argv)}")
            t0 = time.perf_counter()
            try:
                p = subprocess.run(argv, capture_output=True, text=True, timeout=left,
                                   cwd=benchlib.REPO, env=child_env())
                rc, stdout, stderr = p.returncode, p.stdout, p.stderr
            except subprocess.TimeoutExpired as e:
                rc, stdout, stderr = "timeout", _text(e.stdout), _text(e.stderr)
            wall = time.perf_counter() - t0
            r = {"contender": name, "returncode": rc, "wall_s": wall, "test_accuracy": None}
            if rc == 0 and run_dir:
                with open(os.path.join(run_dir, "summary.json")) as f:
                    s = json.load(f)
                r.update(test_accuracy=s.get("test_accuracy"), steps=s.get("step"),
                         reported_wall_time_s=s.get("wall_time_s"), train_time_s=s.get("train_time_s"))
            elif rc == 0:
                s = json.loads(stdout.strip().splitlines()[-1])
                r.update(test_accuracy=s["test_accuracy"], steps=s["steps"], train_time_s=s["train_time_s"])
            else:
                r["log_tail"] = (stdout + stderr)[-2000:]
                log(f"job {name}: FAILED ({rc}):\n{r['log_tail']}")
            acc = "—" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%"
            log(f"job {name}: {wall:.1f} s start to exit, test accuracy {acc}")
            results.append(r)
    return results


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def child_env() -> dict:
    """The environment of a job process: the repository importable (the GPU machine has no
    installed distffn), output unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([benchlib.REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def print_jobs(jobs: list, job_path: str, smoke: bool):
    print("")
    print(f"whole job: {os.path.relpath(job_path, benchlib.REPO)}"
          + (f" (smoke: 1 epoch, {SMOKE_LIMIT_TRAIN} samples)" if smoke else "")
          + ", each a fresh process, wall seconds from start to exit")
    hdr = f"  {'contender':<14} {'wall s':>8} {'train s':>8} {'steps':>6} {'test acc':>9}  exit"
    print(hdr)
    for r in jobs:
        if r.get("skipped"):
            print(f"  {r['contender']:<14} skipped ({r['skipped']})")
            continue
        acc = "—" if r["test_accuracy"] is None else f"{100 * r['test_accuracy']:.2f}%"
        tr = "—" if r.get("train_time_s") is None else f"{r['train_time_s']:.2f}"
        print(f"  {r['contender']:<14} {r['wall_s']:>8.2f} {tr:>8} {str(r.get('steps', '—')):>6} {acc:>9}  {r['returncode']}")


def torch_job(args) -> int:
    """The PyTorch twin of `distffn run JOB`: the job's data (loaded by distffn, then on the
    device), model, initial weights, batch, schedule (distffn's learning_rate) and epochs, one
    test evaluation per epoch; prints one JSON line with the final test accuracy."""
    import torch

    from distffn.data.sharding import steps_per_epoch
    from distffn.optim.schedules import learning_rate
    t_start = time.perf_counter()
    extra = ["training.epochs=1"] if args.smoke else []
    job, data, model = benchlib.load_data(args.job, extra + ([f"data.limit_train={SMOKE_LIMIT_TRAIN}"]
                                                           if args.smoke else []))
    torch.manual_seed(job.training.seed)
    dev, graphed = args.device, args.torch_job == "graphed"
    train = TorchData(data.x_train, data.labels_train, dev)
    test = TorchData(data.x_test, data.labels_test, dev)
    theta0 = benchlib.initial_theta(model, job.training.seed)
    B, n = job.training.batch_size, train.n
    spe = steps_per_epoch(n, B, job.training.drop_last)
    total = spe * job.training.epochs
    opt = job.optimizer
    t = TorchTrainer(train, model.layout.to_arrays(theta0), job.model.layers, B,
                     learning_rate(opt, 0, total), opt.momentum, dev, graphed)
    gen = torch.Generator(device=dev).manual_seed(job.training.seed)
    step, acc, t_train = 0, None, time.perf_counter()
    for epoch in range(job.training.epochs):
        perm = torch.randperm(n, device=dev, generator=gen)
        for b in range(spe):
            t.set_lr(learning_rate(opt, step, total))
            t.step(perm[b * B:min(n, (b + 1) * B)])
            step += 1
        with torch.no_grad():               # one evaluation per epoch, as distffn's job does
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            for s in range(0, test.n, 8192):
                idx = torch.arange(s, min(test.n, s + 8192), device=dev)
                xb, yb = test.gather(idx)
                correct += (t.net(xb).argmax(1) == yb).sum()
            acc = correct.item() / test.n
        log(f"torch {args.torch_job} epoch {epoch + 1}/{job.training.epochs}: train loss "
            f"{t.take_loss() / spe:.4f} test acc {100 * acc:.2f}%")
    print(json.dumps({"test_accuracy": acc, "steps": step, "train_time_s": time.perf_counter() - t_train,
                      "in_process_s": time.perf_counter() - t_start}), flush=True)
    return 0


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a smoke test of the PyTorch eager parts and distffn's CPU path "
                         "(no CUDA graphs)")
    ap.add_argument("--cases", nargs="+", default=None,
                    help="LAYERS:BATCH[:tf32] (default: " + " ".join(CASES) + ")")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per block (default ~128k samples: 10 to 500 steps)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps before every block")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--no-jobs", action="store_true", help="skip the whole-job runs")
    ap.add_argument("--budget-s", type=float, default=210.0,
                    help="time budget: no new round past half of it, no job started past it "
                         "(a job is killed at its end)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny and quick: 2 rounds, 20 steps, small cases, 2000 samples, 1-epoch jobs")
    ap.add_argument("--job", default=JOB)
    ap.add_argument("--json", default=None)
    ap.add_argument("--torch-job", choices=["eager", "graphed"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cmd = benchlib.command_line(argv, "bench_gpu.py")
    t_start = time.perf_counter()           # the budget counts torch's import and CUDA's start
    if args.smoke:
        args.rounds, args.steps, args.warmup = min(args.rounds, 2), args.steps or 20, min(args.warmup, 3)
        args.limit_train = args.limit_train or SMOKE_LIMIT_TRAIN
    try:
        cases = [Case(s) for s in (args.cases or (SMOKE_CASES if args.smoke else CASES))]
    except ValueError as e:
        ap.error(str(e))

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: error: --device cuda: PyTorch sees no CUDA device "
              "(use --device cpu for a smoke test)", file=sys.stderr)
        return 3
    if args.torch_job:
        return torch_job(args)
    deadline = t_start + args.budget_s
    sync = make_sync(args.device)
    env = benchlib.base_environment(git=benchlib.git_rev(), cpu_model=benchlib.cpu_model())
    env.update(versions(args.device))
    fields = {f: has_scaling_field(f) for f in ("cuda_graph", "tf32")}
    print("distffn GPU benchmark: distffn (LocalBackend, 1 worker) against PyTorch eager and "
          "CUDA-graphed, SGD momentum 0.9, lr 0.05, data on the device")
    print(benchlib.machine_line(env))
    print(version_line(env))
    print(f"  device {args.device}   rounds {args.rounds}   warm-up {args.warmup} steps a block   "
          f"job fields: " + ", ".join(f"scaling.{f} {'yes' if v else 'missing'}" for f, v in fields.items()))
    print(f"  command: {cmd}")
    sys.stdout.flush()
    if args.device != "cuda":
        print("  torch graphed: skipped (CUDA graphs need --device cuda)")
    set_torch_tf32(False)
    torch.backends.cudnn.benchmark = False

    job0, data, _ = benchlib.load_data(args.job, benchlib.job_overrides(args.limit_train))
    tdata = TorchData(data.x_train, data.labels_train, args.device)   # uploaded once, shared
    log(f"loaded {job0.data.dataset}: {tdata.n} training samples ({time.perf_counter() - t_start:.1f} s)")

    result = {"command": cmd, "environment": env, "config": {
        "cases": [c.spec for c in cases], "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
        "limit_train": args.limit_train, "job": args.job, "device": args.device, "budget_s": args.budget_s,
        "job_fields": fields, "overrides": benchlib.job_overrides(args.limit_train)},
        "blocks": [], "failures": [], "summary": {}, "jobs": []}

    def save():
        if args.json:
            env["loadavg_end"] = list(os.getloadavg())
            result["bench_seconds"] = time.perf_counter() - t_start
            benchlib.write_json(args.json, result, indent=2)

    contenders = {}
    for c in cases:
        t0 = time.perf_counter()
        contenders[c.spec] = build_contenders(c, args, data, tdata, sync)
        log(f"{c.spec}: {', '.join(x.name for x in contenders[c.spec])} ready "
            f"({time.perf_counter() - t0:.1f} s)")
    blocks = result["blocks"]
    for rnd in range(args.rounds):
        if rnd > 0 and time.perf_counter() - t_start > args.budget_s / 2:
            log(f"time budget: stopping after {rnd} rounds (half of --budget-s {args.budget_s:.0f} s spent)")
            break
        for c in cases:
            k = args.steps or default_steps(c.batch)
            rs = contenders[c.spec]
            order = rs[rnd % len(rs):] + rs[:rnd % len(rs)]      # each contender leads a round in turn
            line = []
            for r in order:
                set_torch_tf32(c.tf32 and args.device == "cuda")
                try:
                    r.run(args.warmup)
                    res = r.run(k)
                except Exception as e:      # e.g. cuda_graph: true refusing a replay that differs
                    log(f"  {c.spec}: {r.name} failed and is left out from now on: {type(e).__name__}: {e}")
                    result["failures"].append({"case": c.spec, "contender": r.name, "round": rnd,
                                               "error": f"{type(e).__name__}: {e}"[:2000]})
                    contenders[c.spec].remove(r)
                    continue
                res.update(case=c.spec, contender=r.name, round=rnd, steps=k, batch_size=c.batch,
                           ms_per_step=1e3 * res["seconds"] / k, samples_per_s=k * c.batch / res["seconds"])
                blocks.append(res)
                line.append(f"{r.name} {res['ms_per_step']:.4f} ms")
            log(f"[round {rnd + 1}/{args.rounds}] {c.spec}: " + ", ".join(line)
                + f"   ({time.perf_counter() - t_start:.0f} s)")
    for rs in contenders.values():
        for r in rs:
            r.close()
    del contenders
    result["summary"] = summarize(blocks, cases)
    print("")
    print_cases(result["summary"])
    sys.stdout.flush()
    save()

    if not args.no_jobs:
        result["jobs"] = run_jobs(args, deadline)
        print_jobs(result["jobs"], args.job, args.smoke)
        save()
    failed = [r["contender"] for r in result["jobs"] if r.get("returncode") not in (0, None)]
    failed += [f"{f['case']} {f['contender']}" for f in result["failures"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
