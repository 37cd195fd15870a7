"""What a run folder may be before a run writes into it, checked before anything is written
there: a new or empty folder, or one a distffn run wrote (its ``job.yaml`` or checkpoints); with
``--resume``, one holding a checkpoint. A folder of someone else's files, or one where a file
of the run's is a symbolic link, is refused: nothing in it is written or deleted."""
from __future__ import annotations

import fnmatch
import os
import stat

from .. import bounded_yaml
from ..errors import UserError
from . import checkpoint as ckpt

JOB_FILE = "job.yaml"
CHECKPOINTS = "checkpoints"
# what may lie in a folder before its run writes anything: the run's lock, a sweep trial's
# description, and the output file SLURM opens for the batch job before the run starts
_BEFORE_A_RUN = (".lock", "trial.json", "slurm-*.out")


def is_run_folder(path: str) -> bool:
    """Whether ``path`` holds a ``job.yaml`` that a distffn run wrote (a resolved job spec), or
    distffn checkpoints (which carry their job spec)."""
    if ckpt.list_checkpoints(os.path.join(path, CHECKPOINTS)):
        return True
    job = os.path.join(path, JOB_FILE)
    try:
        if not stat.S_ISREG(os.lstat(job).st_mode):
            return False
        spec = bounded_yaml.load_file(job, "job spec")
    except (OSError, UserError):
        return False
    return isinstance(spec, dict) and {"name", "model", "training"} <= spec.keys()


def _links_in(folder: str) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.path for e in entries if e.is_symlink())
    except OSError:
        return []


def check_run_dir(out_dir: str, resume, require_checkpoint: bool = True, elsewhere_ok: bool = False):
    """Refuse (:class:`UserError`) a run folder this run must not write into. Read only, so
    every process may check before any engine starts.

    ``resume``: continue the newest checkpoint there; with ``require_checkpoint`` (an explicit
    ``--resume``) a folder without one is refused instead of silently starting over (a restart
    the launcher or SLURM makes by itself may find none yet). ``elsewhere_ok``: the folder may
    exist only where the job runs (a cluster without a filesystem shared with here)."""
    try:
        st = os.lstat(out_dir)
    except FileNotFoundError:
        if resume and require_checkpoint and not elsewhere_ok:
            raise UserError(f"{out_dir}: no such run folder to --resume (check --out)") from None
        return
    except OSError as e:
        raise UserError(f"{out_dir}: cannot read the run folder: {e.strerror or e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise UserError(f"{out_dir}: is a symbolic link; give the run folder's own path as --out "
                        f"({os.path.realpath(out_dir)})")
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(f"{out_dir}: exists and is not a folder; --out names a run folder")
    try:
        names = os.listdir(out_dir)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot read the run folder: {e.strerror or e}") from None
    foreign = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in _BEFORE_A_RUN)]
    if foreign and not is_run_folder(out_dir):
        raise UserError(f"{out_dir}: holds files that are not a distffn run's (no {JOB_FILE} written by "
                        f"distffn; e.g. {sorted(foreign)[0]}); give --out a new or empty folder")
    links = _links_in(out_dir) + _links_in(os.path.join(out_dir, CHECKPOINTS))
    if links:
        raise UserError(f"{links[0]}: is a symbolic link; a run folder holds only the run's own files, "
                        f"and distffn never writes through a link (remove it)")
    if os.path.lexists(os.path.join(out_dir, CHECKPOINTS)) and \
            not os.path.isdir(os.path.join(out_dir, CHECKPOINTS)):
        raise UserError(f"{os.path.join(out_dir, CHECKPOINTS)}: is not a folder; expected the run's checkpoints")
    found = ckpt.list_checkpoints(os.path.join(out_dir, CHECKPOINTS))
    if not resume and found:
        raise UserError(f"{out_dir}: already holds a run's checkpoints; pass --resume to "
                        f"continue it, or --out to start a new run elsewhere")
    if resume and require_checkpoint and not found:
        raise UserError(f"{out_dir}: holds no checkpoint to --resume from; drop --resume to start a new "
                        f"run there, or check --out")
