"""What distffn's MPI launcher says when mpiexec will not start or a rank dies: mpiexec's own
report, read and said in one line (texts as MPICH's and Open MPI's sources print them)."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys

import pytest

from distffn.cli import main
from distffn.parallel.mpi_reports import SAID_MAX, MpiexecReport

from helpers import MPIEXEC, needs_mpi, user_error, write_job

DASHES = "-" * 74 + "\n"
# Open MPI 4.x, orterun.c (mpirun names itself by argv[0])
OMPI_ROOT = DASHES + """mpirun has detected an attempt to run as root.

Running as root is *strongly* discouraged as any mistake (e.g., in
defining TMPDIR) or bug can result in catastrophic damage to the OS
file system, leaving your system in an unusable state.

We strongly suggest that you run mpirun as a non-root user.

You can override this protection by adding the --allow-run-as-root option
to the cmd line or by setting two environment variables in the following way:
the variable OMPI_ALLOW_RUN_AS_ROOT=1 to indicate the desire to override this
protection, and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 to confirm the choice and
add one more layer of certainty that you want to do so.
We reiterate our advice against doing so - please proceed at your own risk.
""" + DASHES
# Open MPI 5.x, PRRTE's prte_schizo_base_root_error_msg: no opening dashes
PRTE_ROOT = """prterun has detected an attempt to run as root.

Running as root is *strongly* discouraged as any mistake (e.g., in
defining TMPDIR) or bug can result in catastrophic damage to the OS
file system, leaving your system in an unusable state.

We strongly suggest that you run prterun as a non-root user.

You can override this protection by adding the --allow-run-as-root
option to your command line.  However, we reiterate our strong advice
against doing so - please do so at your own risk.
""" + DASHES
# help-orterun.txt [orterun:proc-aborted-strsignal]; PRRTE's help-prun.txt, wrapped as prterun prints it
OMPI_SEGV = DASHES + ("mpirun noticed that process rank 1 with PID 1234 on node nodeA exited on signal 11 "
                      "(Segmentation fault).\n") + DASHES
PRTE_SEGV = DASHES + """prterun noticed that process rank 1 with PID 1617008 on node cpu155 exited on
signal 11 (Segmentation fault).
""" + DASHES
# help-errmgr-base.txt [normal-termination-but] and help-orterun.txt [orterun:non-zero-exit]
OMPI_NONZERO = "-" * 55 + """
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
""" + "-" * 55 + "\n" + DASHES + """mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[56171,1],1]
  Exit code:    3
""" + DASHES
# help-mpi-api.txt [mpi-abort], then mpirun's note on help texts it did not repeat
OMPI_ABORT = DASHES + """MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD
with errorcode 1.

NOTE: invoking MPI_ABORT causes Open MPI to kill all MPI processes.
You may or may not see output from other processes, depending on
exactly when Open MPI kills them.
""" + DASHES + """[nodeA:01234] 1 more process has sent help message help-mpi-api.txt / mpi-abort
[nodeA:01234] Set MCA parameter "orte_base_help_aggregate" to 0 to see all help / error messages
"""
# MPICH hydra, pmiserv_cb.c and mpiexec.c (stdout); Intel MPI's hydra names the rank and signal
HYDRA = """
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 20160 RUNNING AT gn59
=   EXIT CODE: 139
=   CLEANING UP REMAINING PROCESSES
=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES
===================================================================================
YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Segmentation fault (signal 11)
This typically refers to a problem with your application.
Please see the FAQ page for debugging suggestions
"""
INTEL_HYDRA = """
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   RANK 1 PID 5491 RUNNING AT gn59
=   KILLED BY SIGNAL: 9 (Killed)
===================================================================================
"""
# MPICH gforker: one line per rank; it interrupts the survivors itself
GFORKER = "[0]0:Return code = 0, signaled with Interrupt\n[0]1:Return code = 0, signaled with Segmentation fault\n"


def read(text, is_stderr=True):
    """(the report, what passed through) for ``text`` written by mpiexec on one pipe."""
    report = MpiexecReport()
    stream, shown = report.stream(is_stderr), []
    for line in text.splitlines(keepends=True):
        shown += stream.feed(line)
    shown += stream.close()
    return report, "".join(shown)


@pytest.mark.parametrize("text", [OMPI_ROOT, PRTE_ROOT], ids=["openmpi4", "openmpi5"])
def test_open_mpis_refusal_to_run_as_root_becomes_the_fix(text):
    report, shown = read(text)
    assert shown == ""                              # said in distffn's one line instead
    assert report.lost_rank() is None
    refusal = report.refusal("/usr/bin/mpiexec")
    tool = text.split()[0] if text[0] != "-" else "mpirun"
    assert f'"{tool} has detected an attempt to run as root."' in refusal
    assert "OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1" in refusal and "non-root" in refusal


@pytest.mark.parametrize("text, is_stderr, lost", [
    (OMPI_SEGV, True, "worker 1 (MPI rank 1 on nodeA) was killed by SIGSEGV"),
    (PRTE_SEGV, True, "worker 1 (MPI rank 1 on cpu155) was killed by SIGSEGV"),
    (OMPI_NONZERO, True, f"worker 1 (MPI rank 1 on {socket.gethostname()}) exited with code 3"),
    (OMPI_ABORT, True, f"worker 1 (MPI rank 1 on {socket.gethostname()}) aborted the MPI job with error code 1"),
    (HYDRA, False, "an MPI rank (PID 20160 on gn59) was killed by SIGSEGV"),
    (INTEL_HYDRA, False, "worker 1 (MPI rank 1 on gn59) was killed by SIGKILL"),
    (GFORKER, False, f"worker 1 (MPI rank 1 on {socket.gethostname()}) was killed by SIGSEGV"),
], ids=["openmpi4", "openmpi5", "openmpi-exit-code", "openmpi-abort", "mpich-hydra", "intel-hydra", "mpich-gforker"])
def test_each_launchers_report_names_the_lost_worker(text, is_stderr, lost):
    report, shown = read("a line from a rank\n" + text, is_stderr)
    assert report.lost_rank() == lost
    assert shown.strip() == "a line from a rank"    # the report is read, not shown
    assert report.refusal("mpiexec") is None


def test_an_unknown_complaint_is_quoted_not_reduced_to_an_exit_code():
    report, shown = read("a line from a rank\nmpiexec: cannot attach to /dev/xpmem: " + "x" * 400 + "\n")
    assert report.lost_rank() is None and "cannot attach" in shown
    said = report.unexplained(3)
    assert said.startswith('mpiexec said "mpiexec: cannot attach') and said.endswith("ended with exit code 3")
    assert len(said) < SAID_MAX + 80
    # an Open MPI help text it does not know is shown, and its headline is quoted
    report, shown = read(DASHES + "There are not enough slots available in the system to satisfy the 2\n"
                         "slots that were requested by the application:\n\n  python3\n\nEither request fewer "
                         "slots for your application, or make more slots\navailable for use.\n" + DASHES)
    assert "Either request fewer" in shown
    assert report.unexplained(1).startswith('mpiexec said "There are not enough slots available in the system '
                                            'to satisfy the 2 slots that were requested by the application:"')


@needs_mpi
@pytest.mark.parametrize("launcher, n, lost", [
    ("mpiexec.gforker", 2, f"worker 1 (MPI rank 1 on {socket.gethostname()}) was killed by SIGSEGV"),
    ("mpiexec.hydra", 1, f"an MPI rank (PID {{pid}} on {socket.gethostname()}) was killed by SIGSEGV"),
])
def test_mpichs_real_launchers_reports_are_read(tmp_path, launcher, n, lost):
    """The embedded MPICH's own launchers, a rank that dies of SIGSEGV (the last rank; the
    others sleep until the launcher ends them)."""
    pid_file = tmp_path / "pid"
    code = ("import os, signal, time\n"
            f"if os.environ['PMI_RANK'] == '{n - 1}':\n"
            f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "    os.kill(os.getpid(), signal.SIGSEGV)\n"
            "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
            "time.sleep(60)\n")
    r = subprocess.run([os.path.join(os.path.dirname(MPIEXEC), launcher), "-n", str(n), sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60)      # (gforker exits 0 even so)
    report = read(r.stdout, False)[0]
    stream = report.stream(True)
    for line in r.stderr.splitlines(keepends=True):
        stream.feed(line)
    assert report.lost_rank() == lost.format(pid=pid_file.read_text()), r.stdout + r.stderr


# ---------------------------------------------------------------- distffn run with a stand-in mpiexec
@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """``write(script)``: an executable ``mpiexec`` that find_mpiexec picks (beside the Python it
    is told the ranks run, the only one on PATH); returns the file its runs are counted in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", str(bin_dir))
    runs = tmp_path / "runs"

    def write(body):
        path = bin_dir / "mpiexec"
        path.write_text(f"#!/bin/sh\necho run >> '{runs}'\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return runs
    return write


def _argv(tmp_path, **failure):
    job = write_job(tmp_path, failure=failure) if failure else write_job(tmp_path)
    return ["run", job, "--no-progress", "--out", str(tmp_path / "out"),
            "--set", "scaling.backend=mpi", "--set", "scaling.num_workers=2"]


def test_open_mpi_refusing_root_exits_2_with_the_fix_and_is_not_retried(tmp_path, stand_in, capsys):
    runs = stand_in(f"/bin/cat >&2 <<'EOF'\n{OMPI_ROOT}EOF\nexit 1")
    err = user_error(capsys, _argv(tmp_path, max_failures=3),
                     '"mpirun has detected an attempt to run as root."', "OMPI_ALLOW_RUN_AS_ROOT=1",
                     "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1", "non-root user")
    assert "a rank was lost" not in err and "restart" not in err
    assert runs.read_text().split() == ["run"]      # failure.max_failures: 3 does not retry it


def test_a_rank_killed_under_open_mpi_is_named_with_its_signal(tmp_path, stand_in, capsys):
    stand_in(f"echo 'a line from a rank'\n/bin/cat >&2 <<'EOF'\n{OMPI_SEGV}EOF\nexit 139")
    assert main(_argv(tmp_path)) == 1
    out, err = capsys.readouterr()
    assert "a line from a rank" in out
    assert err.splitlines() == ["distffn: error: worker 1 (MPI rank 1 on nodeA) was killed by SIGSEGV "
                                "before the run finished"], err


def test_rank_0_stopped_by_open_mpi_after_a_lost_rank_is_not_taken_for_the_users_stop(tmp_path, stand_in, capsys):
    """Open MPI ends the survivors of a lost rank with SIGTERM; rank 0 then leaves 143 (128 +
    SIGTERM) as its exit code. Not the user's stop: the lost worker is named, exit 1."""
    stand_in(f"echo 143 > \"$DISTFFN_MPI_RESULT\"\n/bin/cat >&2 <<'EOF'\n{OMPI_SEGV}EOF\nexit 143")
    assert main(_argv(tmp_path)) == 1
    assert capsys.readouterr().err.splitlines() == [
        "distffn: error: worker 1 (MPI rank 1 on nodeA) was killed by SIGSEGV before the run finished"]


def test_an_unread_mpiexec_failure_quotes_its_last_words(tmp_path, stand_in, capsys):
    stand_in("echo 'mpiexec: no such launcher: ssh' >&2\nexit 0")
    assert main(_argv(tmp_path)) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ('distffn: error: mpiexec said "mpiexec: no such launcher: ssh" (its last line on stderr) '
                       'and ended with exit code 0 before the run finished'), err


def test_a_user_error_under_open_mpi_stays_one_line(tmp_path, stand_in, capsys):
    """Rank 0 names the problem, leaves exit code 2 and aborts the MPI job (cli._end); Open MPI's
    notice of that abort is not shown under it."""
    stand_in("echo 'distffn: error: data.path: no such file' >&2\necho 2 > \"$DISTFFN_MPI_RESULT\"\n"
             f"/bin/cat >&2 <<'EOF'\n{OMPI_ABORT.replace('rank 1', 'rank 0').replace('errorcode 1', 'errorcode 2')}EOF\n"
             "exit 2")
    user_error(capsys, _argv(tmp_path), "data.path: no such file")
