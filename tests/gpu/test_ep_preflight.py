"""The EP checks on one real GPU, through `python -m preflight -m ep`, with DeepEP built in EP_STACK_PREFIX.

    EP_STACK_PREFIX=... EP_GPU_RESULTS=results/ python -m pytest -m gpu tests/gpu/test_ep_preflight.py -s

(tests/gpu/run-ep-preflight.sh sets the machine's variables and runs this.) A one-node deploy file with
deepep_low_latency and a config-only Qwen3-30B-A3B (hidden 2048: a size DeepEP's low-latency kernels are
built for) makes preflight create a single-rank low-latency buffer, dispatch and combine exactly, and time
them; the high-throughput kernels need 2+ ranks and are not run here. The budget table is also printed for
DeepSeek-V3's config (config only, no weights) on two 8-GPU nodes. With EP_DEEPEP_TESTS pointing at a
DeepEP checkout's tests/ (or tests/legacy/ for v2), DeepEP's own tests/test_low_latency.py runs on the same
GPU with the same environment, for the figures side by side. Everything lands in $EP_GPU_RESULTS/ep.json.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.recorded import DEEPSEEK_V3, QWEN3_30B_A3B

pytestmark = pytest.mark.gpu

PREFLIGHT_TIMEOUT_S = 600
DEEPEP_FIGURE = re.compile(r"Dispatch \+ combine bandwidth: ([0-9.]+) GB/s, avg_t=([0-9.]+) us")


def deepep_figures(text: str) -> list[tuple[float, float]]:
    """(GB/s, us) of every rank's "Dispatch + combine bandwidth" line of DeepEP's tests/test_low_latency.py."""
    return [(float(g), float(t)) for g, t in DEEPEP_FIGURE.findall(text)]


def test_deepep_figures_are_read_from_its_own_line():
    line = "[rank 0] Dispatch + combine bandwidth: 18.70 GB/s, avg_t=64.12 us, min_t=60.01 us, max_t=70.00 us"
    assert deepep_figures(f"Allocating buffer size: 8.520064 MB ...\n{line}\n") == [(18.70, 64.12)]


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


@pytest.fixture(scope="module")
def results() -> Path:
    out = Path(os.environ.get("EP_GPU_RESULTS", ROOT / "gpu-results"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_deploy(
    tmp: Path, name: str, config: dict, nodes: str, backend: str = "deepep_low_latency", transport: str = "tcp"
) -> Path:
    folder = tmp / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"model: {folder}\nnodes:\n{nodes}all2all_backend: {backend}\nvllm_version: '0.26.0'\n"
        f"network: {{transport: {transport}, socket_ifname: lo}}\n"
    )
    return path


def test_ep_checks_pass_on_one_gpu(tmp_path, results):
    if gpu_count() < 1:
        pytest.skip("needs an NVIDIA GPU")
    if not os.environ.get("EP_STACK_PREFIX"):
        pytest.skip("needs EP_STACK_PREFIX: the stack prefix where `python -m env build` built DeepEP")
    deploy = write_deploy(tmp_path, "qwen3-30b-a3b", QWEN3_30B_A3B, "  - {address: 127.0.0.1, gpus: 1}\n")
    report = tmp_path / "ep-report.json"
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preflight",
            "--deploy",
            str(deploy),
            "--node-rank",
            "0",
            "-m",
            "ep",
            "--preflight-json",
            str(report),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=PREFLIGHT_TIMEOUT_S,
    )
    wall = time.monotonic() - start
    print(proc.stdout, proc.stderr, sep="\n")
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    record = {
        "device": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip(),
        "wall_s": round(wall, 1),
        "preflight": proc.stdout,
        "checks": checks,
    }

    deepep_tests = os.environ.get("EP_DEEPEP_TESTS")
    if deepep_tests:  # DeepEP's own test on the same GPU, with the environment the plan gives vLLM
        # Through the same generated paths as vLLM (`eval "$(python -m env paths)"`), at the check's own shape.
        shape = [
            "--num-processes",
            "1",
            "--num-tokens",
            "128",
            "--hidden",
            "2048",
            "--num-topk",
            "8",
            "--num-experts",
            "128",
        ]
        script = (
            f'eval "$({shlex.join([sys.executable, "-m", "env", "paths"])})" && cd {shlex.quote(deepep_tests)} && '
            f"{shlex.join([sys.executable, 'test_low_latency.py', *shape])}"
        )
        own = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=PREFLIGHT_TIMEOUT_S
        )
        record["deepep_test"] = {
            "rc": own.returncode,
            "figures": deepep_figures(own.stdout),
            "tail": (own.stdout + own.stderr)[-2000:],
        }

    table = subprocess.run(
        [
            sys.executable,
            "-m",
            "preflight.ep_memory",
            "--deploy",
            str(
                write_deploy(
                    tmp_path,
                    "deepseek-v3",
                    DEEPSEEK_V3,
                    "  - {address: 10.0.0.1, gpus: 8}\n  - {address: 10.0.0.2, gpus: 8}\n",
                    transport="ib",  # DeepEP across nodes needs InfiniBand or RoCE (launch/matrix.py)
                )
            ),
            "--node-rank",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    print(table.stdout, table.stderr)
    record["deepseek_v3_budget"] = table.stdout
    (results / "ep.json").write_text(json.dumps(record, indent=2) + "\n")

    assert checks["EP dispatch + combine exact"]["outcome"] == "PASS", checks["EP dispatch + combine exact"]
    assert checks["EP dispatch + combine bandwidth"]["outcome"] == "PASS", checks["EP dispatch + combine bandwidth"]
    assert checks["EP memory budget fits a GPU"]["outcome"] == "PASS", checks["EP memory budget fits a GPU"]
    assert proc.returncode == 0 and "Traceback" not in proc.stdout + proc.stderr
    assert table.returncode == 0 and "# EP memory budget per GPU" in table.stdout
