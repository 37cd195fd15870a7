"""What mpiexec itself says when ranks end badly or when it will not start, read from its output
so that distffn's launcher can say it in one line instead of leaving it above a bare exit code.

Read here: MPICH's ``mpiexec.gforker`` (one line per rank: ``[0]1:Return code = 0, signaled
with Segmentation fault``) and hydra (a block of ``=`` lines: ``BAD TERMINATION OF ONE OF YOUR
APPLICATION PROCESSES`` / ``PID 1234 RUNNING AT host`` / ``EXIT CODE: 139``; Intel MPI's hydra
adds ``RANK n`` and prints ``KILLED BY SIGNAL: 9 (Killed)``); Open MPI's ``mpirun`` (4.x, ORTE)
and ``prterun`` (5.x, PRRTE): help texts between lines of dashes (PRRTE wraps them at about 76
columns, so a block is read as one text), such as ``mpirun noticed that process rank 1 with PID
1234 on node HOST exited on signal 11 (Segmentation fault).`` and the refusal to run as root.
"""
from __future__ import annotations

import re
import signal
import socket
from dataclasses import dataclass

# strsignal()'s text for each signal, as gforker prints it ("Segmentation fault" -> SIGSEGV)
_SIGNAL_BY_TEXT: dict[str, str] = {}
for _sig in signal.Signals:
    _SIGNAL_BY_TEXT.setdefault(signal.strsignal(_sig) or _sig.name, _sig.name)

# gforker's line for each rank that ended
_GFORKER_ENDED = re.compile(r"^\[\d+\](\d+):Return code = (-?\d+)(?:, signaled with (.+?))?\s*$")
_GFORKER_OWN = {"SIGQUIT", "SIGINT", "SIGTERM"}     # how gforker ends the survivors itself

_DASHES = re.compile(r"^-{40,}$")                  # Open MPI frames its help texts with these
_EQUALS = re.compile(r"^={40,}$")                  # hydra frames its report with these
_MAX_BLOCK = 60                                    # lines held back before a block counts as output

# Open MPI (ORTE: help-orterun.txt, orterun.c; PRRTE: help-prun.txt, schizo) -- "%s" is the tool
_ROOT = re.compile(r"(\S+) has detected an attempt to run as root")
_SIGNALLED = re.compile(r"(\S+) noticed that process rank (\d+) with PID (\d+) on node \"?([^\s\"]+?)\"? "
                        r"exited on signal (\d+)")
_NONZERO = re.compile(r"detected that one or more processes exited with non-zero status.*?Process name:\s*"
                      r"(?:\[\[\d+,\d+\],(\d+)\]|\[[^\],]+,(\d+)\])\s*Exit code:\s*(-?\d+)")
_MPI_ABORT = re.compile(r"MPI_ABORT was invoked on rank (\d+) in communicator \S+ with errorcode (-?\d+)")
_PRIMARY_JOB = re.compile(r"terminated normally, but \d+ process(?:es)? returned")
# Open MPI's one-line notes about help texts it did not repeat
_OMPI_NOTES = re.compile(r"^\[[^\]]*\] (?:\d+ more process(?:es)? ha(?:s|ve) sent help message|"
                         r"Set MCA parameter \"\w+_base_help_aggregate\")")

# MPICH hydra (pmiserv_cb.c, mpiexec.c) and Intel MPI's hydra
_HYDRA_BAD = "BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES"
_HYDRA_WHO = re.compile(r"(?:RANK (\d+) )?PID (\d+) RUNNING AT (\S+)")
_HYDRA_KILLED = re.compile(r"KILLED BY SIGNAL: (\d+)")
_HYDRA_CODE = re.compile(r"EXIT CODE: (-?\d+)")
_HYDRA_TRAILER = ("YOUR APPLICATION TERMINATED WITH THE EXIT STRING:",
                  "This typically refers to a problem with your application.",
                  "Please see the FAQ page for debugging suggestions")

SAID_MAX = 240                                     # characters of mpiexec's words in an error line


@dataclass
class Ending:
    """How one rank ended, as mpiexec reported it: a signal name or an exit code."""
    rank: int | None                               # None: hydra named only its PID
    host: str | None
    pid: int | None = None
    signal: str | None = None
    code: int | None = None
    aborted: bool = False                          # it called MPI_Abort

    def describe(self) -> str:
        """``worker 1 (MPI rank 1 on HOST) was killed by SIGSEGV``."""
        host = self.host or socket.gethostname()   # distffn's own mpiexec runs on this node
        who = (f"worker {self.rank} (MPI rank {self.rank} on {host})" if self.rank is not None
               else f"an MPI rank (PID {self.pid} on {host})")
        if self.signal:
            return f"{who} was killed by {self.signal}"
        if self.aborted:
            return f"{who} aborted the MPI job with error code {self.code}"
        return f"{who} exited with code {self.code}"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class MpiexecReport:
    """mpiexec's own words, collected from its output as it runs (:meth:`stream` for each pipe)."""

    def __init__(self):
        self.endings: list[Ending] = []             # Open MPI's and hydra's, in the order said
        self.gforker: dict[int, str] = {}           # rank -> signal name or exit code
        self.refused_as_root: str | None = None     # the tool's own sentence
        self.last_said: str | None = None           # the last thing said on stderr

    def stream(self, is_stderr: bool) -> "_Stream":
        return _Stream(self, is_stderr)

    def refusal(self, mpiexec: str) -> str | None:
        """One line saying why mpiexec would not start the ranks, with the fix; None if it did not refuse."""
        if self.refused_as_root:
            return (f"{mpiexec} will not start the MPI ranks as root (it says: \"{self.refused_as_root}\"); "
                    "run distffn as a non-root user, or, in a container where root is expected, export "
                    "OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 (Open MPI's override)")
        return None

    def lost_rank(self) -> str | None:
        """``worker 1 (MPI rank 1 on HOST) was killed by SIGSEGV`` for the first rank that mpiexec
        reported ending badly (for gforker, not one it ended itself); None if it named none."""
        if self.endings:
            return self.endings[0].describe()
        # a rank killed by a signal is the cause; the survivors that gforker interrupted may
        # exit with a code of their own after it
        for rank, how in sorted(self.gforker.items(), key=lambda kv: (kv[1].lstrip("-").isdigit(), kv[0])):
            if how in _GFORKER_OWN or how == "0":
                continue
            ending = (Ending(rank, None, code=int(how)) if how.lstrip("-").isdigit()
                      else Ending(rank, None, signal=how))
            return ending.describe()
        return None

    def unexplained(self, code: int) -> str:
        """An error for an mpiexec that ended with ``code`` and no report read here: its last words."""
        if self.last_said:
            said = self.last_said if len(self.last_said) <= SAID_MAX else self.last_said[:SAID_MAX - 3] + "..."
            return f"mpiexec said \"{said}\" (its last line on stderr) and ended with exit code {code}"
        return f"mpiexec wrote nothing on stderr and ended with exit code {code}"

    # ------------------------------------------------------------ reading a block of text
    def _read_ompi(self, text: str) -> bool:
        """Record an Open MPI help text; whether it was one read here (and so is not shown)."""
        m = _ROOT.search(text)
        if m:
            self.refused_as_root = f"{m.group(1)} has detected an attempt to run as root."
            return True
        m = _SIGNALLED.search(text)
        if m:
            self.endings.append(Ending(int(m.group(2)), m.group(4), pid=int(m.group(3)),
                                      signal=_signal_name(int(m.group(5)))))
            return True
        m = _NONZERO.search(text)
        if m:
            self.endings.append(Ending(int(m.group(1) or m.group(2)), None, code=int(m.group(3))))
            return True
        m = _MPI_ABORT.search(text)
        if m:
            self.endings.append(Ending(int(m.group(1)), None, code=int(m.group(2)), aborted=True))
            return True
        return bool(_PRIMARY_JOB.search(text))     # its details follow in the next block

    def _read_hydra(self, text: str) -> bool:
        if _HYDRA_BAD not in text:
            return False
        who = _HYDRA_WHO.search(text)
        rank = int(who.group(1)) if who and who.group(1) else None
        ending = Ending(rank, who.group(3) if who else None, pid=int(who.group(2)) if who else None)
        killed, code = _HYDRA_KILLED.search(text), _HYDRA_CODE.search(text)
        if killed:
            ending.signal = _signal_name(int(killed.group(1)))
        elif code:
            # MPICH prints this block only for a process that did not exit (!WIFEXITED), and
            # "EXIT CODE" is then its raw wait status: the signal, plus 128 if it dumped core
            status = int(code.group(1))
            if status & 0x7F:
                ending.signal = _signal_name(status & 0x7F)
            else:
                ending.code = status
        # MPICH's hydra names the first process of a node that did not exit, which can be one it
        # killed itself while cleaning up after another: its PID is all there is to go on
        self.endings.append(ending)
        return True


class _Stream:
    """One of mpiexec's pipes, line by line: :meth:`feed` returns the lines to show now; mpiexec's
    reports that :class:`MpiexecReport` reads are kept back, anything else passes through."""

    def __init__(self, report: MpiexecReport, is_stderr: bool):
        self.report, self.is_stderr = report, is_stderr
        self.block: list[str] | None = None         # lines held back: a framed text being read
        self.kind = None                            # "ompi" or "hydra"

    def feed(self, line: str) -> list[str]:
        bare = line.strip()
        if self.block is not None:
            self.block.append(line)
            closing = (_DASHES if self.kind == "ompi" else _EQUALS).match(bare)
            if closing:
                return self._close()
            return self._release() if len(self.block) > _MAX_BLOCK else []
        m = _GFORKER_ENDED.match(bare)
        if m:
            how = m.group(3)
            self.report.gforker[int(m.group(1))] = (_SIGNAL_BY_TEXT.get(how, f"a signal ({how})") if how
                                                    else m.group(2))
            return []
        if _DASHES.match(bare) or _ROOT.search(bare):  # PRRTE's root refusal has no opening dashes
            self.block, self.kind = [line], "ompi"
            return []
        if _EQUALS.match(bare):
            self.block, self.kind = [line], "hydra"
            return []
        if bare.startswith(_HYDRA_TRAILER) or _OMPI_NOTES.match(bare):
            return []
        if bare and self.is_stderr:
            self.report.last_said = bare
        return [line]

    def close(self) -> list[str]:
        """The end of the pipe: a block never closed is read as it is (PRRTE may leave off a frame)."""
        return self._close() if self.block is not None else []

    def _close(self) -> list[str]:
        frame = _DASHES if self.kind == "ompi" else _EQUALS
        inner = [ln.strip().lstrip("=").strip() if self.kind == "hydra" else ln.strip()
                 for ln in self.block if not frame.match(ln.strip())]
        text = " ".join(" ".join(inner).split())
        read = self.report._read_ompi(text) if self.kind == "ompi" else self.report._read_hydra(text)
        if read:
            self.block = None
            return []
        if self.is_stderr and text:
            # its first paragraph is the headline (the last line is often advice cut mid-sentence)
            lines = inner[next(i for i, ln in enumerate(inner) if ln):]
            self.report.last_said = " ".join(lines[:lines.index("")] if "" in lines else lines)
        return self._release()

    def _release(self) -> list[str]:
        lines, self.block = self.block, None
        return lines
