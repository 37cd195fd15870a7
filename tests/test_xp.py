"""Array modules: NumPy by default, a clear error when a GPU is asked for and missing."""
from __future__ import annotations

import pytest

from helpers import user_error, write_job


def test_use_gpu_without_cupy_is_a_clear_error(tmp_path, capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    user_error(capsys, ["run", write_job(tmp_path, scaling={"use_gpu": True})], "scaling.use_gpu", "CuPy")
