"""The suite's own set-up: how many pytest-xdist workers `-n auto` (pyproject.toml's addopts) starts."""

import os

from tests import conftest


def test_auto_workers_follow_the_cores_this_process_may_use_and_the_free_memory(monkeypatch, tmp_path):
    gib = 2**30
    pages = {"SC_PAGE_SIZE": 4096, "SC_AVPHYS_PAGES": 64 * gib // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(conftest, "CGROUP_CPU_MAX", tmp_path / "no-cgroup-v2")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert conftest.pytest_xdist_auto_num_workers(None) == 8
    (tmp_path / "cpu.max").write_text("max 100000\n")  # a cgroup without a quota
    monkeypatch.setattr(conftest, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    assert conftest.pytest_xdist_auto_num_workers(None) == 8
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # docker --cpus=2.5
    assert conftest.pytest_xdist_auto_num_workers(None) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # taskset -c 0,1
    assert conftest.pytest_xdist_auto_num_workers(None) == 2
    pages["SC_AVPHYS_PAGES"] = 4 * gib // 4096  # room for one worker's 3 GiB only
    assert conftest.pytest_xdist_auto_num_workers(None) == 1
    pages["SC_AVPHYS_PAGES"] = 0  # never fewer than one
    assert conftest.pytest_xdist_auto_num_workers(None) == 1
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")  # pytest-xdist reads it itself
    assert conftest.pytest_xdist_auto_num_workers(None) is None
