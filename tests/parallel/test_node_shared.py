"""MPI ranks on one node share one copy of the data: the first rank's arrays, read-only."""
from __future__ import annotations

import json
import os
import sys

from helpers import MPIEXEC, needs_mpi, run_group

SCRIPT = r"""
import json, sys
import numpy as np
from mpi4py import MPI
from distffn.parallel.node_shared import share_on_node
rank = MPI.COMM_WORLD.Get_rank()
x = np.full((5, 3), rank, np.float32)           # each rank loaded "its" data
out = share_on_node(MPI.COMM_WORLD, {"x": x, "t": np.arange(7) + 10 * rank, "none": None})
# the same pages: rank 1 sees a write rank 0 makes after sharing
if rank == 0:
    out["x"].flags.writeable = True             # only to prove the memory is one
    out["x"][0, 0] = 42
MPI.COMM_WORLD.Barrier()
open(f"{sys.argv[1]}.{rank}", "w").write(json.dumps({"rank": rank, "x": out["x"].tolist(), "t": out["t"].tolist(), "none": out["none"],
                  "writeable": bool(out["t"].flags.writeable), "dtype": str(out["t"].dtype)}))
"""


@needs_mpi
def test_ranks_read_the_first_ranks_arrays_from_one_window(tmp_path):
    script = tmp_path / "share.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    r = run_group([MPIEXEC, "-n", "2", sys.executable, str(script), str(tmp_path / "out")], 60, env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    for row in rows:
        assert row["x"] == [[42.0, 0.0, 0.0]] + [[0.0] * 3] * 4
        assert row["t"] == list(range(7)) and row["dtype"] == "int64"
        assert row["none"] is None and row["writeable"] is False
