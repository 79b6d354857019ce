"""How long planning takes, and what the launcher adds before vLLM starts.

    python -m launch.plan_bench [--repeat N]

Prints, for deploy files of 2, 16 and 128 nodes (8 GPUs each): the median time to validate the file and
plan + render every node, in process; then the launcher's start-up overhead: the wall time of
`python -m launch primary ... --vllm-bin /bin/true` next to `/bin/true` alone, median of N runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from launch import render
from launch.request import Request
from launch.resolve import resolve


def deploy_file(nodes: int, folder: Path) -> Path:
    data = {
        "model": "deepseek-ai/DeepSeek-V3-0324",
        "nodes": [{"address": f"10.{i // 250}.{i % 250}.1", "gpus": 8} for i in range(nodes)],
        "all2all_backend": "deepep_low_latency",
        "network": {"transport": "ib", "socket_ifname": "auto"},
        "env": {"VLLM_USE_DEEP_GEMM": "1", "HF_TOKEN": "hf_x"},
    }
    path = folder / f"{nodes}-nodes.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def plan_all(path: Path) -> str:
    """What `python -m launch plan FILE` does after parsing its arguments: resolve, then render every node."""
    return "\n".join(render.shell(p) for p in resolve(Request("plan", deploy=str(path))).plans)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.plan_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(f"# python {sys.version.split()[0]}, {os.cpu_count()} CPUs, median of {args.repeat} runs")
    print(f"{'nodes':>6} {'plan ms':>9} {'per node ms':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for nodes in (2, 16, 128):
            path = deploy_file(nodes, Path(tmp))
            median = statistics.median(timed(lambda p=path: plan_all(p), args.repeat))
            print(f"{nodes:>6} {median * 1e3:>9.2f} {median * 1e3 / nodes:>12.3f}")
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    launcher = [
        sys.executable,
        "-m",
        "launch",
        "primary",
        "127.0.0.1",
        "13345",
        "m",
        "1",
        "1",
        "1",
        "--socket-ifname",
        "lo",
        "--vllm-bin",
        "/bin/true",
    ]
    runs = max(5, args.repeat // 2)
    with_launcher = statistics.median(
        timed(lambda: subprocess.run(launcher, env=env, check=True, capture_output=True), runs)
    )
    bare = statistics.median(timed(lambda: subprocess.run(["/bin/true"], check=True), runs))
    print(
        f"# launcher start-up, median of {runs}: {with_launcher * 1e3:.0f} ms through the launcher, "
        f"{bare * 1e3:.1f} ms bare: {(with_launcher - bare) * 1e3:.0f} ms added before vLLM starts"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
