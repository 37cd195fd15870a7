"""distffn starts mpiexec itself for scaling.backend: mpi."""
from __future__ import annotations

from helpers import assert_same_model, needs_mpi, run_mpi


@needs_mpi
def test_distffn_launches_mpiexec_itself(reference, tmp_path):
    r, out, _ = run_mpi(tmp_path, 2, "allreduce", under_mpiexec=False)
    assert r.returncode == 0, r.stderr
    assert_same_model(reference, out)
