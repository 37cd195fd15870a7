"""Every CUDA source of the package compiles with NVRTC (no GPU, no CuPy needed), with the
options CuPy compiles it with, and declares exactly the entry points it has; sources compiled
with ``--fmad=false`` hold no fused float32 multiply-add, so their float32 arithmetic rounds
as NumPy's."""
from __future__ import annotations

import functools
import re

import pytest
from nvrtc import compile_ptx, library_path

from distffn.cuda import CUPY_OPTIONS, all_sources

SOURCES = all_sources()


@functools.lru_cache(maxsize=None)
def ptx_of(name: str) -> str:
    src = SOURCES[name]
    return compile_ptx(src.code, (*src.options, *CUPY_OPTIONS), f"{name}.cu")


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_compiles_and_has_exactly_its_entry_points(name):
    entries = re.findall(r"^\.(?:visible\s+)?\.entry\s+(\w+)", ptx_of(name), re.MULTILINE)
    assert sorted(entries) == sorted(SOURCES[name].kernels), \
        f"{name}: PTX entry points {entries}, declared {SOURCES[name].kernels}"


@pytest.mark.parametrize("name", sorted(n for n, s in SOURCES.items() if "--fmad=false" in s.options))
def test_no_fused_float32_multiply_add(name):
    # fma.rn[.ftz].f32 rounds a*b+c once where NumPy rounds twice; CUDA's expf/logf bring their own
    fma = re.compile(r"\bfma\.rn(\.ftz)?(\.sat)?\.f32\b")
    lines = [line.strip() for line in ptx_of(name).splitlines() if fma.search(line)]
    assert not lines, f"{name}: {len(lines)} fused float32 multiply-adds, e.g. {lines[:3]}"


def test_a_missing_libnvrtc_fails_naming_the_dev_extras(monkeypatch, tmp_path):
    import site
    import sys
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(tmp_path)])
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path))
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(AssertionError, match=r"install the dev extras"):
        library_path()
