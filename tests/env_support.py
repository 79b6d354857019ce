"""Helpers the env tests share: `python -m env` in a subprocess and a one-component pins file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT


def run_env(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> dict:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for var in (
        "EP_STACK_PROFILE",
        "EP_STACK_PREFIX",
        "EP_STACK_CACHE",
        "TORCH_CUDA_ARCH_LIST",
        "CUDA_HOME",
        "CXX",
        "NVSHMEM_DIR",
    ):
        if var not in (env or {}):
            full_env.pop(var, None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "env", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT
    )
    return {
        "code": proc.returncode,
        "out": proc.stdout,
        "err": proc.stderr,
        "seconds": round(time.monotonic() - start, 2),
    }


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def pins_file(tmp_path: Path, **fields: object) -> Path:
    """A `test` profile with one component; `fields` override the defaults (TOML values)."""
    comp = {
        "name": "tinyext",
        "kind": "git",
        "url": str(tmp_path / "nowhere.git"),
        "ref": COMMIT,
        "source": "tests",
        "build": "pip",
        "cuda": False,
        "needs_torch": False,
    }
    comp.update(fields)
    lines = ["[profiles.test]", 'description = "bad input"', "[[profiles.test.components]]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in comp.items() if v is not None]
    path = tmp_path / "pins.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def build(tmp_path: Path, pins: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
    return run_env(
        "build",
        "--pins",
        str(pins),
        "--profile",
        "test",
        "--prefix",
        str(tmp_path / "stack"),
        "--cache",
        str(tmp_path / "cache"),
        *extra,
        env=env,
    )


def one_line(result: dict) -> str:
    assert "Traceback" not in result["err"], result["err"]
    lines = result["err"].strip().splitlines()
    assert len(lines) == 1, result["err"]
    return lines[0]
