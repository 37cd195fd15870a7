"""The one exception type for mistakes in a user's input."""


class UserError(Exception):
    """A problem with the job spec, data or checkpoint that the user can fix.

    The CLI prints its message on one line and exits with code 2; no traceback.
    """


class WorkerFailed(RuntimeError):
    """A worker raised or stopped answering; the message names it. Exit code 1."""
