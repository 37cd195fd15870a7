"""Writing the files distffn owns (run folders, job records, sweep results): atomically, and
never through a symbolic link that someone else planted where a file of ours belongs.

A whole-file write goes to a new temp file beside the target (``O_EXCL``: created, never
opened through a link) and is renamed over it, which replaces a link rather than following
it, so readers see the old file or the new one. Appends (``metrics.jsonl``) open the file
with ``O_NOFOLLOW``.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile

from .errors import StorageFailed


def write_atomic(path: str, data, mode: int = 0o644) -> None:
    """``data`` (str or bytes) as the file ``path``, atomically, with permissions ``mode``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        raise StorageFailed(f"cannot write {path}: {e.strerror or e}") from None


def write_figure(fig, path: str, dpi: int) -> str:
    """A matplotlib figure as the PNG ``path``, atomically (rendered to memory first)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)        # an Agg canvas of its own: no GUI backend is ever touched
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())
    return path


def write_json(path: str, obj, mode: int = 0o644) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    write_atomic(path, json.dumps(obj, indent=2), mode)


def _open_no_follow(path: str, flags: int, mode: int = 0o644) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StorageFailed(f"{path} is a symbolic link; distffn writes its own files only, "
                                f"never through a link (remove it)") from None
        raise StorageFailed(f"cannot write {path}: {e.strerror or e}") from None


def append_line(path: str, line: str) -> None:
    """``line`` and a newline appended to ``path`` (created if missing), one ``write``."""
    fd = _open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + "\n").encode())
    except OSError as e:
        raise StorageFailed(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def drop_torn_tail(path: str) -> int:
    """Cut an unfinished last line (a process killed mid-write) off ``path``, so the next
    append starts a line of its own instead of joining it; the bytes dropped (0: none)."""
    if not os.path.lexists(path):
        return 0
    fd = _open_no_follow(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return 0
        # the last newline, read backwards in blocks
        end, keep = size, 0
        while end > 0:
            start = max(0, end - 65536)
            cut = os.pread(fd, end - start, start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        os.ftruncate(fd, keep)
        return size - keep
    finally:
        os.close(fd)
