"""scaling.kernels: the registry, ``auto``, the errors, and numba's cache folder."""
from __future__ import annotations

import pytest

from distffn import kernels
from distffn.errors import UserError
from distffn.jobspec import from_dict


def test_choices_and_auto(monkeypatch):
    assert kernels.choices() == ["auto", "numpy", "numba"]
    assert kernels.resolve("numpy") == "numpy" and kernels.resolve("numba") == "numba"
    assert kernels.resolve("auto", use_gpu=True) == "numpy"
    monkeypatch.setattr(kernels, "numba_available", lambda: False)
    assert kernels.resolve("auto") == "numpy"
    monkeypatch.setattr(kernels, "numba_available", lambda: True)
    assert kernels.resolve("auto") == "numba"


def test_job_spec_field_is_checked(monkeypatch):
    assert from_dict({}).scaling.kernels == "auto"
    assert from_dict({"scaling": {"kernels": "numpy"}}).scaling.kernels == "numpy"
    with pytest.raises(UserError, match=r"^scaling.kernels: expected one of numpy, numba; got 'fast'$"):
        from_dict({"scaling": {"kernels": "fast"}})
    with pytest.raises(UserError, match="numba kernels run on the CPU"):
        from_dict({"scaling": {"kernels": "numba", "use_gpu": True}})
    monkeypatch.setattr(kernels, "numba_available", lambda: False)
    with pytest.raises(UserError, match="numba is not installed"):
        from_dict({"scaling": {"kernels": "numba"}})
    assert from_dict({"scaling": {"kernels": "auto"}}).scaling.kernels == "auto"


def test_cache_folder_falls_back_when_nothing_is_writable(monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(kernels, "_writable", lambda folder: False)
    assert kernels._cache_dir().startswith(__import__("tempfile").gettempdir())
    monkeypatch.setattr(kernels, "_writable", lambda folder: folder.endswith("__pycache__"))
    assert kernels._cache_dir() is None                 # numba's own __pycache__ works
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere")
    assert kernels._cache_dir() is None                 # the user's choice stands


def test_numba_is_imported_only_when_chosen():
    import subprocess
    import sys
    code = ("import sys, numpy as np; from distffn.parallel import make_backend; "
            "from distffn.nn.model import MLP; from distffn.jobspec import ModelConfig; "
            "MLP(ModelConfig(), kernels='numpy'); "
            "print(sys.modules.get('numba') is not None or 'distffn.nn.layer_kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
