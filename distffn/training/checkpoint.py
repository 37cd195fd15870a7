"""Checkpoints: npz files written atomically, loaded without pickle, verified by checksum.

Layout of ``step-XXXXXXXX.npz`` (format version 2): parameters (``W0, b0, W1, b1, ...`` and
extras such as ``alpha0`` for PReLU slopes), the optimizer's buffers per parameter as
``<buffer>.<name>`` (``velocity.W0``; Adam's ``exp_avg.W0``, ``exp_avg_sq.W0``), ``meta`` (a
JSON string: step, epoch, optimizer, job spec, RNG state, format version) and ``checksum``
(SHA-256 over every other entry). Version 1 (before optimizers owned their state) kept the
momentum buffers as ``v_<name>``; it is read as momentum's ``velocity``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import tempfile
import zipfile
from typing import Optional

import numpy as np

from ..errors import UserError

FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
_NAME = re.compile(r"step-(\d{8})\.npz$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.npz"


def _digest(arrays: dict, meta_json: str) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(meta_json.encode())
    return h.hexdigest()


def save_checkpoint(path: str, arrays: dict, meta: dict) -> str:
    """Write ``arrays`` and ``meta`` to ``path`` atomically: temp file, fsync, rename.

    A crash at any point leaves either the old file or the complete new one.
    """
    meta = dict(meta, format_version=FORMAT_VERSION)
    meta_json = json.dumps(meta, sort_keys=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    for reserved in ("meta", "checksum"):
        if reserved in arrays:
            raise ValueError(f"array name {reserved!r} is reserved")
    payload = dict(arrays, meta=np.array(meta_json), checksum=np.array(_digest(arrays, meta_json)))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # fsync the folder so the rename itself survives a power loss
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """Read a checkpoint; returns ``(arrays, meta)``. Any damage is a :class:`UserError`."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):
        if path.endswith(".npz"):
            raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt: not a zip archive)")
        raise UserError(f"{path}: not a checkpoint; expected RUN_DIR/checkpoints/step-XXXXXXXX.npz "
                        f"or a run folder")
    try:
        # open the file ourselves: np.load leaks its handle when the zip is damaged
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            files = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt: {e})") from None
    if "meta" not in files or "checksum" not in files:
        raise UserError(f"{path}: not a distffn checkpoint (no meta/checksum entries)")
    meta_json = str(files.pop("meta"))
    checksum = str(files.pop("checksum"))
    if _digest(files, meta_json) != checksum:
        raise UserError(f"{path}: checksum mismatch; the file was modified or damaged")
    meta = json.loads(meta_json)
    version = meta.get("format_version")
    if version not in READS_VERSIONS:
        raise UserError(f"{path}: checkpoint format version {version!r}; this distffn reads "
                        f"versions {', '.join(map(str, READS_VERSIONS))} (written by a newer distffn?)")
    if version == 1:
        files, meta = _upgrade_v1(files, meta)
    return files, meta


def _upgrade_v1(files: dict, meta: dict) -> tuple[dict, dict]:
    """Version 1 held momentum SGD's velocity as ``v_<name>``."""
    files = {(f"velocity.{k[2:]}" if k.startswith("v_") else k): v for k, v in files.items()}
    meta = dict(meta, format_version=FORMAT_VERSION, upgraded_from=1,
                optimizer={"name": "momentum", "buffers": ["velocity"]})
    return files, meta


def pack_state(layout, theta, optimizer_state: dict | None) -> dict:
    """Θ and the optimizer's flat buffers as named per-parameter arrays for :func:`save_checkpoint`."""
    arrays = layout.to_arrays(theta)
    for buffer, flat in (optimizer_state or {}).items():
        arrays.update({f"{buffer}.{name}": a for name, a in layout.to_arrays(flat).items()})
    return arrays


def unpack_state(layout, arrays: dict, buffers, source: str) -> tuple[np.ndarray, dict]:
    """Θ and the optimizer buffers named ``buffers`` as flat float32 vectors, every name and
    shape checked against ``layout``."""
    theta = np.empty(layout.size, np.float32)
    layout.from_arrays(arrays, theta, source)
    state = {}
    for buffer in buffers:
        state[buffer] = np.empty(layout.size, np.float32)
        layout.from_arrays(arrays, state[buffer], source, prefix=f"{buffer}.")
    return theta, state


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every checkpoint in ``folder``, oldest first."""
    found = []
    for p in glob.glob(os.path.join(folder, "step-*.npz")):
        m = _NAME.search(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def newest_valid_checkpoint(folder: str, warn=None) -> Optional[tuple[str, dict, dict]]:
    """The newest checkpoint that loads and verifies: ``(path, arrays, meta)`` or None.

    Damaged files (a crash mid-copy, a full disk) are skipped, not fatal, so ``--resume``
    falls back to the previous good one; ``warn(line)`` is told about each one skipped.
    """
    for _, path in reversed(list_checkpoints(folder)):
        try:
            arrays, meta = load_checkpoint(path)
        except UserError as e:
            if warn is not None:
                warn(f"skipping a damaged checkpoint: {e}")
            continue
        return path, arrays, meta
    return None


def remove_leftovers(folder: str) -> list[str]:
    """Delete the temporary files of checkpoint writes that never finished (a kill mid-write)."""
    doomed = glob.glob(os.path.join(folder, ".tmp-*.npz"))
    for p in doomed:
        os.unlink(p)
    return doomed


def prune_checkpoints(folder: str, num_to_keep: int) -> list[str]:
    """Delete all but the newest ``num_to_keep``; step 0 (the initial parameters) is never pruned."""
    ckpts = [(s, p) for s, p in list_checkpoints(folder) if s != 0]
    doomed = ckpts[:-num_to_keep] if num_to_keep > 0 else ckpts
    for _, p in doomed:
        os.unlink(p)
    return [p for _, p in doomed]
