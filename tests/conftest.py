"""Shared helpers: run the real command line in a subprocess, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
SHARED = ROOT.parent / "shared"
"""What may lie beside a checkout (source mirrors, GPU facts); tests that read it skip when it is absent."""
FIXTURES = ROOT / "tests" / "fixtures"
VLLM_LOGS = FIXTURES / "vllm-logs"
"""Real vLLM logs, vendored with their provenance (tests/fixtures/vllm-logs/README.md)."""


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> Result:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("VLLM_ALL2ALL_BACKEND", None) if "VLLM_ALL2ALL_BACKEND" not in (env or {}) else None
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or ROOT,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def launch():
    """`python -m launch ...` in a subprocess."""
    return lambda *args, **kw: run_module("launch", *args, **kw)


@pytest.fixture
def write_yaml(tmp_path):
    def write(text: str, name: str = "deploy.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


# Two network namespaces as two "nodes", shared by every module (one definition, one set of names).
from tests.netns import two_hosts  # noqa: E402, F401
