"""Benchmark: `python -m launch status` on a 128-node deploy file (8 GPUs each: 1024 DP ranks) against a stand-in
vLLM API server whose /metrics carries all 1024 ranks, as a real primary's does, and 127 stand-in launchers that
answer on their watch ports (addresses 127.0.0.2 .. 127.0.0.128), as every secondary's launcher does.

    python tests/bench_status.py [--nodes 128] [--runs 5]

Prints the wall time of each run (process start-up included) and the poll time `status` reports itself."""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch.config import WATCH_PORT_OFFSET  # noqa: E402
from tests.support import FAKE_VLLM, free_port, stand_in_launcher, vllm_metrics  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "metrics.txt"
        metrics.write_text(vllm_metrics({r: (r % 7, r % 3, (r % 10) / 10) for r in range(8 * args.nodes)}))
        deploy = Path(tmp) / "deploy.yaml"
        rpc = next(p for p in iter(free_port, None) if p + WATCH_PORT_OFFSET <= 65535)  # its watch port exists
        nodes = "".join(f"  - {{address: 127.0.{i // 250}.{i % 250 + 1}, gpus: 8}}\n" for i in range(1, args.nodes))
        deploy.write_text(
            f"model: m\nport: {port}\nrpc_port: {rpc}\nnodes:\n  - {{address: 127.0.0.1, gpus: 8}}\n{nodes}"
        )
        launchers = [
            stand_in_launcher(f"127.0.{i // 250}.{i % 250 + 1}", i, rpc + WATCH_PORT_OFFSET)
            for i in range(1, args.nodes)
        ]
        env = {**os.environ, "FAKE_VLLM_DELAY": "0", "FAKE_VLLM_METRICS": str(metrics)}
        server = subprocess.Popen([sys.executable, str(FAKE_VLLM), "--port", str(port)], env=env)
        try:
            time.sleep(1.0)
            walls, polls = [], []
            for _ in range(args.runs):
                start = time.monotonic()
                out = subprocess.run(
                    [sys.executable, "-m", "launch", "status", str(deploy)],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                    timeout=60,
                )
                walls.append(time.monotonic() - start)
                polls.append(float(re.search(r"in ([\d.]+) s", out.stdout).group(1)))
                assert out.returncode == 0, out.stdout + out.stderr
            lines = out.stdout.count("\n")
        finally:
            server.terminate()
            server.wait(5)
            for listening in launchers:
                listening.close()
    print(
        f"# launch status: {args.nodes} nodes, {8 * args.nodes} DP ranks, metrics {metrics_size(args.nodes)} KB, {lines} lines out"
    )
    print(f"wall s per run : {' '.join(f'{w:.2f}' for w in walls)}  (median {statistics.median(walls):.2f})")
    print(f"poll s per run : {' '.join(f'{p:.2f}' for p in polls)}  (median {statistics.median(polls):.2f}, bound 10)")
    return 0


def metrics_size(nodes: int) -> int:
    return len(vllm_metrics({r: (r % 7, r % 3, (r % 10) / 10) for r in range(8 * nodes)})) // 1024


if __name__ == "__main__":
    raise SystemExit(main())
