"""``scoring.warmup``: the first run says the kernels are compiling, step by step, and how long it
took; a run with numba's cache says nothing."""

from __future__ import annotations

import pytest
from numba import config

from scoring import warmup


@pytest.fixture
def steps(monkeypatch):
    """Two stand-in steps that record being called (compiling for real takes a minute)."""
    called = []
    monkeypatch.setattr(warmup, "STEPS", (("pick", lambda: called.append("pick")),
                                          ("assign", lambda: called.append("assign"))))  # fmt: skip
    monkeypatch.setattr(config, "DISABLE_JIT", False)
    return called


def test_a_first_run_says_it_compiles_where_it_caches_each_step_and_the_time(
    steps, monkeypatch, tmp_path
):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "empty"))
    lines: list[str] = []
    took = warmup.compile_kernels(lines.append)
    assert steps == ["pick", "assign"]
    assert lines[0].startswith("Compiling the engine's kernels (first run only")
    assert str(tmp_path / "empty") in lines[0]
    assert lines[1].startswith("  [1/2] pick: ") and lines[1].endswith(" s")
    assert lines[2].startswith("  [2/2] assign: ")
    assert lines[3] == f"Kernels compiled in {took:.1f} s." and len(lines) == 4


def test_a_run_with_the_cache_compiles_quietly(steps, monkeypatch, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "_kernels._pick-1.py311.nbi").write_bytes(b"")
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))
    assert warmup.is_cached() and warmup.cache_dir() == tmp_path
    lines: list[str] = []
    warmup.compile_kernels(lines.append)
    assert steps == ["pick", "assign"] and lines == []


def test_a_slow_run_with_a_partial_cache_says_how_long_it_took(steps, monkeypatch, tmp_path):
    (tmp_path / "x.nbi").write_bytes(b"")
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(warmup, "QUIET_S", 0.0)
    lines: list[str] = []
    took = warmup.compile_kernels(lines.append)
    assert lines == [f"Kernels compiled in {took:.1f} s."]


def test_nothing_compiles_with_the_jit_off(steps, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(config, "DISABLE_JIT", True)
    lines: list[str] = []
    assert warmup.compile_kernels(lines.append) == 0.0 and lines == [] and steps == []


def test_the_steps_run_the_public_calls():
    for _, step in warmup.STEPS:
        step()  # each on its own throwaway fleet; compiled already or plain Python
