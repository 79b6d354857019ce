"""Locked memory for RDMA: unlimited `ulimit -l`, or CAP_IPC_LOCK, which lifts the limit (what a Kubernetes pod
gets from `capabilities: add: [IPC_LOCK]`, since pods cannot raise ulimits). The same 1 MiB limit passes with the
capability and fails without it (util-linux prlimit and setpriv set both up for real)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def locked_memory_line(*wrapper: str) -> str:
    proc = subprocess.run(
        [*wrapper, sys.executable, "-m", "preflight", "-k", "locked_memory"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    return next(ln for ln in proc.stdout.splitlines() if "ulimit -l" in ln)


@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("prlimit") and shutil.which("setpriv")),
    reason="needs root, prlimit and setpriv",
)
def test_cap_ipc_lock_lifts_a_low_memlock_limit():
    limited = ["prlimit", "--memlock=1048576"]
    assert locked_memory_line(*limited).startswith("PASS") and "1 MiB, but CAP_IPC_LOCK lifts it" in locked_memory_line(
        *limited
    )
    without = locked_memory_line(*limited, "setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock")
    assert without.startswith("FAIL") and "1 MiB (expected unlimited, or CAP_IPC_LOCK)" in without
    assert "Kubernetes: capabilities add IPC_LOCK" in without
