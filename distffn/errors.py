"""The exceptions that end a run with a message instead of a traceback, one per outcome."""


class UserError(Exception):
    """A problem with the job spec, data or checkpoint that the user can fix.

    The CLI prints its message on one line and exits with code 2; no traceback.
    """


class RunFailed(RuntimeError):
    """The run cannot go on; the message names what failed. Exit code 1."""


class WorkerFailed(RunFailed):
    """A worker raised or stopped answering; the message names it."""


class StorageFailed(RunFailed):
    """A checkpoint or log could not be written; the message names the path."""


class Interrupted(Exception):
    """SIGTERM or SIGINT ended the run after a checkpoint. Exit code 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
