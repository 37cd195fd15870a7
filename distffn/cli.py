"""``distffn`` command line: run, eval, plot, sweep and noise-scale.

Exit codes: 0 success, 1 a worker failed or stalled (named), 2 a user error (one message on
stderr, no traceback), 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback

from . import __version__
from .errors import Interrupted, RunFailed, UserError
from .parallel.launch import RESTARTED_BY_LAUNCHER
from .parallel.mpi_env import MPI_RESULT_ENV, launcher_rank, under_mpi, world
from .parallel.watchdog import die_with_parent

EPILOG = """\
examples (in this order, from the project folder):
  distffn run jobs/digits-mlp.yaml
  distffn eval runs/digits-mlp
  distffn plot runs/digits-mlp
  distffn run jobs/digits-mlp.yaml --set optimizer.lr=0.005 --out runs/digits-lr0.005
  distffn plot runs/digits-mlp runs/digits-lr0.005 --x samples --out cmp.png
  distffn noise-scale runs/digits-mlp --batches 100 --json
  distffn run jobs/fashion-mnist-mlp.yaml --set training.epochs=5 --out runs/quick
  distffn run jobs/fashion-mnist-mlp.yaml --set scaling.backend=ray --set scaling.num_workers=2
  distffn submit jobs/fashion-mnist-mlp.yaml --cluster cluster/ray-local.yaml --out runs/fm-ray
  distffn status fashion-mnist-mlp-3fa9c1
  distffn logs fashion-mnist-mlp-3fa9c1 --follow
  distffn stop fashion-mnist-mlp-3fa9c1
  distffn submit jobs/fashion-mnist-mlp.yaml --cluster cluster/ray-local.yaml --out runs/fm-ray --resume
  distffn jobs
  distffn sweep jobs/digits-sweep.yaml --out sweeps/digits
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distffn", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Data-parallel mini-batch SGD for feed-forward networks: train from a YAML "
                    "job spec on 1 or N workers (local, Ray or MPI), evaluate checkpoints, "
                    "plot learning curves.")
    p.add_argument("--version", action="version", version=f"distffn {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="train a job spec and write its run directory",
                         description="Train the network described by JOB.yaml. Writes OUT/job.yaml "
                                     "(the resolved spec), metrics.jsonl (one line per epoch), "
                                     "summary.json and checkpoints/step-XXXXXXXX.npz.")
    run.add_argument("job", metavar="JOB.yaml", help="the job spec")
    run.add_argument("--out", metavar="DIR", help="run directory (default: runs/<name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one field of the job spec, e.g. --set training.epochs=5 "
                          "(repeatable; VALUE is read as YAML)")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest valid checkpoint in the run directory; the result "
                          "equals an uninterrupted run (the worker count may change)")
    run.add_argument("--no-progress", action="store_true", help="never draw the progress bar")

    ev = sub.add_parser("eval", help="print the test loss and accuracy of a checkpoint",
                        description="Evaluate CHECKPOINT.npz (or a run folder's newest valid checkpoint) "
                                    "on its job's held-out test split.")
    ev.add_argument("checkpoint", metavar="CHECKPOINT.npz|RUN_DIR")
    ev.add_argument("--job", metavar="JOB.yaml",
                    help="take the data section from this spec instead of the checkpoint's own "
                         "(its model section must match the checkpoint)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one field of the job spec (e.g. data.path=...)")

    pl = sub.add_parser("plot", help="write PNG learning curves of one run or several runs overlaid",
                        description="One run: RUN_DIR/curves.png (train/test loss and accuracy per "
                                    "epoch) and, for image data, RUN_DIR/weights.png. With --x or --out, "
                                    "or several runs: one figure overlaying them (test loss and accuracy, "
                                    "training loss, learning rate) against epochs, steps or samples seen.")
    pl.add_argument("run_dirs", metavar="RUN_DIR", nargs="+")
    pl.add_argument("--x", choices=["epoch", "step", "samples"], default=None,
                    help="x-axis of the comparison figure (default: step)")
    pl.add_argument("--out", metavar="FILE.png", help="where to write the comparison figure "
                    "(needed for several runs; one run: RUN_DIR/curves-<x>.png)")

    sb = sub.add_parser("submit", help="send a job spec to a cluster (Ray Jobs or SLURM); prints its id",
                        description="Validate JOB.yaml here, then start it on the cluster that PROFILE.yaml "
                                    "describes (kind: ray or slurm; see cluster/). The job id is the "
                                    "last line on stdout; status, logs and stop take it.")
    sb.add_argument("job", metavar="JOB.yaml", help="the job spec")
    sb.add_argument("--cluster", required=True, metavar="PROFILE.yaml", help="the cluster profile")
    sb.add_argument("--out", metavar="DIR", help="run directory, on a filesystem the cluster shares "
                                                 "(default: <profile's runs>/<job id>)")
    sb.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one field of the job spec (repeatable)")
    sb.add_argument("--resume", action="store_true",
                    help="continue the newest checkpoint in --out (a stopped job's run directory)")

    st = sub.add_parser("status", help="a submitted job's state (PENDING RUNNING SUCCEEDED FAILED STOPPED "
                                       "UNKNOWN) and progress",
                        description="The state word first, then step, epoch and the newest metrics from "
                                    "the job's run directory. UNKNOWN: the cluster's controller or job "
                                    "server does not answer (the job may still run there).")
    st.add_argument("id", metavar="ID")
    st.add_argument("--json", action="store_true", help="one JSON object instead")

    lg = sub.add_parser("logs", help="a submitted job's output", description="What the job has printed; "
                        "with --follow, everything it prints until it ends.")
    lg.add_argument("id", metavar="ID")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")

    sp = sub.add_parser("stop", help="stop a submitted job (it checkpoints first)",
                        description="Ask the cluster to stop the job: SIGTERM, the run writes a checkpoint "
                                    "and exits; waits until the cluster reports it ended. "
                                    "`distffn submit ... --out RUN_DIR --resume` continues it.")
    sp.add_argument("id", metavar="ID")

    jb = sub.add_parser("jobs", help="the jobs submitted from here, newest first",
                        description="A table of the jobs submitted from this machine ($DISTFFN_HOME, "
                                    "default ~/.distffn): id, state (each cluster asked, 5 s at most; "
                                    "UNKNOWN where it does not answer), cluster, submitted, run directory.")
    jb.add_argument("--json", action="store_true", help="a JSON list instead")
    sw = sub.add_parser("sweep", help="scaling experiment: steps to a target vs batch size and workers",
                        description="Run (or resume) the scaling experiment SWEEP.yaml describes: a "
                                    "convergence trial per batch size × learning rate (× momentum), "
                                    "timed runs per batch size × workers, the critical-batch fit, the "
                                    "measured gradient noise scale and the α-β projection. Writes "
                                    "results.csv, summary.json, steps_vs_batch.png, time_vs_workers.png, "
                                    "lr_vs_batch.png, steps_vs_samples.png and every run under DIR.")
    sw.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep spec")
    sw.add_argument("--out", metavar="DIR", help="sweep folder (default: sweeps/<name>); the same "
                    "command again skips the finished trials")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a sweep key (max_epochs=5, target.value=0.9) or, as job.SECTION.KEY=VALUE, "
                         "a field of the base job (repeatable; VALUE is read as YAML)")
    sw.add_argument("--no-progress", action="store_true", help="never draw the progress bar")

    ns = sub.add_parser("noise-scale", help="estimate the gradient noise scale B_simple at a checkpoint",
                        description="Estimate B_simple = tr(Σ)/|G|² (McCandlish et al. 2018) at the "
                                    "checkpoint's fixed parameters from random batch pairs of the training "
                                    "split, with standard errors.")
    ns.add_argument("checkpoint", metavar="CHECKPOINT.npz|RUN_DIR")
    ns.add_argument("--job", metavar="JOB.yaml", help="take the data from this spec instead of the checkpoint's own")
    ns.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one field of the job spec (e.g. data.path=...)")
    ns.add_argument("--batches", type=int, default=50, metavar="K", help="batch pairs drawn (default 50)")
    ns.add_argument("--small", type=int, metavar="B", help="the small batch (default: training.batch_size)")
    ns.add_argument("--big", type=int, metavar="B", help="the big batch (default: 8 × the small one)")
    ns.add_argument("--seed", type=int, default=0, help="seed of the batch draws (default 0)")
    ns.add_argument("--json", action="store_true", help="print the estimates as JSON")
    return p


def cmd_run(args) -> int:
    from .jobspec import load_job
    from .training.run_folder import check_run_dir
    from .training.run_lock import HELD_ENV, RunLock, check_not_busy

    job = load_job(args.job, args.overrides)
    out = args.out or os.path.join("runs", job.name)
    # an explicit --resume needs a checkpoint; a restart that distffn's launcher or SLURM's
    # requeue makes by itself may come before the first one was written
    args.require_checkpoint = not (os.environ.get(RESTARTED_BY_LAUNCHER)
                                   or os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"))
    # one run per folder: this process holds the lock, unless distffn's own launcher does
    lock = None
    if os.environ.get(HELD_ENV) != os.path.abspath(out) and launcher_rank() in (None, "0"):
        check_not_busy(out)
        check_run_dir(out, args.resume, args.require_checkpoint)     # before anything is created there
        lock = RunLock(out).acquire()
    try:
        return _run(job, out, args, lock)
    finally:
        if lock is not None:
            lock.release()


def _run(job, out, args, lock) -> int:
    from .parallel.launch import maybe_relaunch_under_mpi
    from .submit.scheduler import RESUME_COMMAND_ENV
    from .training import Trainer
    from .training.run_folder import check_run_dir
    from .training.run_lock import HELD_ENV

    relaunched = maybe_relaunch_under_mpi(job, args.argv,
                                          checks=[lambda: check_run_dir(out, args.resume, args.require_checkpoint)],
                                          env={HELD_ENV: os.path.abspath(out)} if lock else {})
    if relaunched is not None:
        return relaunched
    progress = False if args.no_progress else (sys.stdout.isatty() and sys.stderr.isatty())
    # a submitted run is continued by submitting it again; the submitter says how
    resume_command = os.environ.get(RESUME_COMMAND_ENV) or shlex.join(
        ["distffn", "run", args.job, "--out", out, *(x for o in args.overrides for x in ("--set", o)), "--resume"])
    trainer = Trainer(job, out, resume=args.resume, progress=progress, resume_command=resume_command,
                      require_checkpoint=args.require_checkpoint)
    summary = trainer.run()
    if trainer.is_root:
        acc = summary.get("test_accuracy")
        acc_text = "" if acc is None else f", test accuracy {100 * acc:.2f}%"
        print(f"done: {summary['step']} steps in {summary['wall_time_s']:.1f} s, test loss "
              f"{summary['test_loss']:.4f}{acc_text}; run directory {out}")
    return 0


def cmd_eval(args) -> int:
    from .training import evaluate_checkpoint

    r = evaluate_checkpoint(args.checkpoint, args.job, args.overrides)
    acc = "" if r["test_accuracy"] is None else \
        f"  test accuracy {100 * r['test_accuracy']:.2f}% ({r['test_correct']}/{r['test_count']})"
    print(f"{r['checkpoint']}: step {r['step']}  test loss {r['test_loss']:.4f}{acc}")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_comparison, plot_run

    runs = args.run_dirs
    if len(runs) == 1 and args.x is None and args.out is None:
        for path in plot_run(runs[0]):
            print(path)
        return 0
    if len(runs) > 1 and args.out is None:
        raise UserError("--out: comparing several runs needs the figure's path, e.g. --out cmp.png")
    x = args.x or "step"
    print(plot_comparison(runs, args.out or os.path.join(runs[0], f"curves-{x}.png"), x))
    return 0


def cmd_submit(args) -> int:
    from .submit import submit_job
    from .submit.jobs import scheduler_of

    record = submit_job(args.job, args.cluster, args.out, args.overrides, args.resume)
    native = scheduler_of(record).native_name(record.native_id)
    print(f"submitted {record.id} to {record.kind} ({record.profile_path}) as {native}; "
          f"run directory {record.run_dir}", file=sys.stderr)
    print(f"  distffn status {record.id}  |  distffn logs {record.id} --follow  |  distffn stop {record.id}",
          file=sys.stderr)
    print(record.id)
    return 0


def cmd_status(args) -> int:
    import json

    from .submit import job_status

    status = job_status(args.id)
    print(json.dumps(status, indent=2) if args.json else "\n".join(_status_lines(status)))
    return 0


def _status_lines(s: dict) -> list[str]:
    """``RUNNING  ID  detail``, then the progress the run directory shows."""
    lines = [f"{s['state']}  {s['id']}  ({s['detail']})"]
    if not os.path.isdir(s["run_dir"]):
        lines.append(f"  run directory {s['run_dir']} is not visible from here (progress needs a "
                     f"filesystem shared with the cluster)")
    elif s.get("step") is None:
        lines.append(f"  no progress written yet to {s['run_dir']}")
    else:
        spe, epochs = s.get("steps_per_epoch"), s.get("epochs")
        total = f"/{spe * epochs}" if spe and epochs else ""
        m = s.get("metrics", {})
        parts = [f"step {s['step']}{total}", f"epoch {_epoch(s['epoch'])}" + (f"/{epochs}" if epochs else "")]
        for key, label in (("train_loss", "train loss"), ("test_loss", "test loss")):
            if m.get(key) is not None:
                parts.append(f"{label} {m[key]:.4f}")
        if m.get("test_accuracy") is not None:
            parts.append(f"test accuracy {100 * m['test_accuracy']:.2f}%")
        if m.get("samples_per_s"):
            parts.append(f"{m['samples_per_s']:,.0f} samples/s")
        if s.get("updated"):
            parts.append(f"(written {max(0, time.time() - s['updated']):.0f} s ago)")
        lines.append("  " + "  ".join(parts))
        lines.append(f"  run directory {s['run_dir']}")
    return lines


def _epoch(epoch) -> str:
    """An epoch as a user counts them: ``2`` at an epoch's end, ``1.97`` within one (cut, not
    rounded, so it never shows an end before it is reached)."""
    if epoch is None:
        return "?"
    if abs(epoch - round(epoch)) < 1e-9:
        return f"{round(epoch)}"
    return f"{int(epoch * 100) / 100:.2f}"


def cmd_logs(args) -> int:
    from .submit.jobs import job_logs

    for chunk in job_logs(args.id, args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cmd_stop(args) -> int:
    from .submit import stop_job

    state = stop_job(args.id)
    print(f"{state.state}  {args.id}  ({state.detail})")
    return 0


def cmd_jobs(args) -> int:
    import json

    from .submit import list_jobs
    from .submit.jobs import job_states

    rows = job_states(list_jobs())
    if not rows and not args.json:
        from .submit.records import jobs_dir
        print(f"no jobs submitted from here (records in {jobs_dir()})", file=sys.stderr)
        return 0
    if args.json:
        print(json.dumps([{"id": r.id, "state": state.state, "detail": state.detail, "cluster": label,
                           "kind": r.kind, "native_id": r.native_id, "submitted": r.submitted,
                           "run_dir": r.run_dir} for r, state, label in rows], indent=2))
        return 0
    table = [("ID", "STATE", "CLUSTER", "SUBMITTED", "RUN DIR")]
    table += [(r.id, state.state, label, r.submitted, r.run_dir) for r, state, label in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    return 0


def cmd_sweep(args) -> int:
    from .sweep import load_sweep
    from .sweep.runner import run_sweep

    spec, base = load_sweep(args.sweep, args.overrides)
    out = args.out or os.path.join("sweeps", spec.name)
    progress = False if args.no_progress else sys.stderr.isatty()
    command = shlex.join(["distffn", "sweep", args.sweep, "--out", out,
                          *(x for o in args.overrides for x in ("--set", o))])
    summary = run_sweep(spec, base, out, command, progress=progress)
    figures = [os.path.basename(p) for p in summary.get("plots") or [] if p]
    print(f"sweep folder {out}: {', '.join(['results.csv', 'summary.json', *figures])}")
    if summary.get("errors"):
        # the measurements are kept, but a figure the sweep exists for is missing: exit 1, so
        # that a script or a batch scheduler does not take the sweep as complete
        raise RunFailed(f"sweep {out}: the {' and '.join(summary['errors'])} stage failed; the rest is "
                        f"written (summary.json \"errors\"), and the same command again redoes only what is missing")
    return 0


def cmd_noise_scale(args) -> int:
    import json

    from .training.noise_scale import estimate_checkpoint

    r = estimate_checkpoint(args.checkpoint, args.job, args.overrides, batches=args.batches,
                            small=args.small, big=args.big, seed=args.seed)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    b = "not positive: |G|² is lost in the noise (more --batches or a larger --big)" if r["b_simple"] is None \
        else f"{r['b_simple']:.4g} ± {r['b_simple_se']:.2g}"
    print(f"{r['checkpoint']}: step {r['step']}  B_simple {b}  tr(Σ) {r['trace_sigma']:.4g} ± "
          f"{r['trace_sigma_se']:.2g}  |G|² {r['grad_norm_sq']:.4g} ± {r['grad_norm_sq_se']:.2g}  "
          f"({r['batches']} pairs of batches {r['b_small']} and {r['b_big']} from {r['n_train']:,} training samples)")
    return 0


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "plot": cmd_plot, "sweep": cmd_sweep, "noise-scale": cmd_noise_scale,
            "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop, "jobs": cmd_jobs}


def _abort_mpi_world(code: int):
    """One failing rank ends every rank at once, instead of leaving them blocked in a collective."""
    if under_mpi():
        comm = world().COMM_WORLD
        if comm.Get_size() > 1:
            sys.stderr.flush()
            # mpiexec forwards each rank's output asynchronously; aborting at once can kill the
            # forwarders before they pass the message on (seen in CI: exit 1, empty stderr)
            time.sleep(0.5)
            comm.Abort(code)


def _rank_prefix() -> str:
    rank = launcher_rank()
    return f"(rank {rank}) " if rank not in (None, "0") else ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if under_mpi() and os.environ.get(RESTARTED_BY_LAUNCHER):
        die_with_parent()                        # a rank of distffn's own mpiexec ends with it
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return _end(COMMANDS[args.command](args))
    except UserError as e:
        print(f"distffn: error: {_rank_prefix()}{e}", file=sys.stderr)
        return _end(2)
    except Interrupted as e:                     # SIGTERM/SIGINT after a checkpoint
        if not _rank_prefix():                   # every rank stops alike; rank 0 says so once
            print(f"distffn: {e}", file=sys.stderr)
        return _end(e.exit_code, abort=False)
    except BrokenPipeError:                      # `distffn logs ID | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        again = ("the same distffn sweep command (finished trials are kept)" if args.command == "sweep"
                 else "`distffn run JOB.yaml --resume`")
        print(f"distffn: interrupted; continue with {again}", file=sys.stderr)
        return _end(130, abort=False)
    except RunFailed as e:                       # a worker or the storage failed: name it, end fast
        print(f"distffn: error: {_rank_prefix()}{e}", file=sys.stderr)
        return _end(1)
    except Exception as e:
        if not under_mpi():
            raise                                # a bug: keep the traceback
        # under MPI an unexpected error on any rank would leave the others blocked in a
        # collective: report it (rank 0 with its traceback) and end every rank at once
        if _rank_prefix():
            print(f"distffn: error: {_rank_prefix()}{type(e).__name__}: {e}", file=sys.stderr)
        else:
            traceback.print_exc()
        return _end(1)


def _end(code: int, abort: bool = True) -> int:
    """Rank 0 of distffn's own mpiexec leaves its exit code for the launcher (mpiexec's own does
    not tell a finished run from one whose ranks were killed); a failing rank ends the world."""
    result = os.environ.get(MPI_RESULT_ENV)
    if result and launcher_rank() == "0":
        with open(result, "w") as f:
            f.write(str(code))
    if code and abort:
        _abort_mpi_world(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
