"""The acceptance test on real GPUs: two GPUs of one machine play two nodes.

    EP_GPU_RESULTS=results/ python -m pytest -m gpu tests/gpu -s

Needs 2 NVIDIA GPUs, vLLM importable and `vllm` on PATH (tests/gpu/run-on-2-gpus.sh stages it).
Node 0 (primary) runs on GPU0, node 1 (headless secondary) on GPU1, both on loopback. Every step goes
through the project's own entry points (`python -m preflight`, `python -m launch serve`); the client
is vLLM's own `vllm bench serve`. Figures land in $EP_GPU_RESULTS as JSON for docs/results.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.gpu

# Settings the 2 x H200 machine needs in every process (no NVLink SHARP / multicast there).
MACHINE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
}
API_PORT = 8000
ROUNDS = 3  # bench rounds per server: one round of 200 requests lasts ~2 s, so single runs are noisy
HEALTH_TIMEOUT_S = 600
STOP_TIMEOUT_S = 60


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


@pytest.fixture(scope="module", autouse=True)
def two_gpus():
    if gpu_count() < 2:
        pytest.skip("needs 2 NVIDIA GPUs")
    if not shutil.which("vllm"):
        pytest.skip("needs vllm on PATH (tests/gpu/run-on-2-gpus.sh stages it)")


@pytest.fixture(scope="module")
def results() -> Path:
    out = Path(os.environ.get("EP_GPU_RESULTS", ROOT / "gpu-results"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-moe")
    subprocess.run([sys.executable, str(ROOT / "tests" / "gpu" / "tiny_moe.py"), str(out)], check=True, timeout=300)
    return out


def host_interface() -> tuple[str, str]:
    """The first interface with a non-loopback IPv4 address: both "nodes" bind it, as real nodes would
    (preflight refuses loopback for traffic between nodes)."""
    from launch import netif

    for name, addrs in netif.interfaces().items():
        for addr in addrs:
            if name != "lo" and "." in addr and not addr.startswith("127."):
                return name, addr
    pytest.skip("needs an interface with a non-loopback IPv4 address")


def deploy_text(model: Path, **extra: str) -> str:
    ifname, address = host_interface()
    env = "\n".join(f'  {k}: "{v}"' for k, v in MACHINE_ENV.items())
    more = "".join(f"{k}: {v}\n" for k, v in extra.items())
    return f"""\
model: {model}
nodes:
  - {{address: {address}, gpus: 1, env: {{CUDA_VISIBLE_DEVICES: "0"}}}}
  - {{address: 127.0.0.2, gpus: 1, env: {{CUDA_VISIBLE_DEVICES: "1"}}}}
rpc_port: 13345
port: {API_PORT}
network: {{transport: tcp, socket_ifname: {ifname}}}
vllm_args: [--max-model-len, "1024", --gpu-memory-utilization, "0.25"]
env:
{env}
{more}"""


@pytest.fixture(scope="module")
def deploy(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("deploy") / "two-gpus.yaml"
    path.write_text(deploy_text(tiny_model, preflight="{rendezvous_timeout_s: 20}"))
    return path


def env_with(**more: str) -> dict[str, str]:
    return {
        **os.environ,
        **MACHINE_ENV,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **more,
    }


def run_preflight(deploy: Path, rank: int, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "preflight",
            "--deploy",
            str(deploy),
            "--node-rank",
            str(rank),
            "--preflight-json",
            str(out),
            *extra,
        ],
        env=env_with(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )


# ---- 1. preflight --------------------------------------------------------------------------------
def test_preflight_single_node_suite_passes(deploy, results):
    t0 = time.monotonic()
    proc = run_preflight(deploy, 0, results / "preflight-node0.json", "-m", "not multinode")
    out, _ = proc.communicate(timeout=600)
    took = time.monotonic() - t0
    (results / "preflight-node0.txt").write_text(out + f"\n# wall time {took:.1f} s\n")
    report = json.loads((results / "preflight-node0.json").read_text())
    failed = [c for c in report["checks"] if c["outcome"] in ("FAIL", "ERROR")]
    assert not failed, out
    skipped = {c["group"] for c in report["checks"] if c["outcome"] == "SKIP"}
    assert "interconnect" in skipped or "efa" in skipped  # no IB / EFA on this machine: skipped, not failed


def test_preflight_two_nodes_rendezvous_and_cross_node_collectives(deploy, results):
    procs = [
        run_preflight(deploy, rank, results / f"preflight-multinode-{rank}.json", "-m", "multinode") for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    (results / "preflight-multinode.txt").write_text("\n".join(outs))
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)


def test_preflight_missing_secondary_fails_within_the_bound(deploy, results):
    t0 = time.monotonic()
    proc = run_preflight(deploy, 0, results / "preflight-missing.json", "-m", "multinode")
    out, _ = proc.communicate(timeout=300)
    took = time.monotonic() - t0
    assert proc.returncode != 0
    assert "rank(s) 1 (127.0.0.2) did not join" in out, out
    assert took < 120


def test_preflight_wrong_interface_fails_fast(deploy):
    t0 = time.monotonic()
    proc = run_preflight(deploy, 0, Path(os.devnull), "--socket-ifname", "nosuch0", "-k", "system")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "nosuch0" in out
    assert time.monotonic() - t0 < 60


# ---- 2. serve: primary + headless secondary, DP 2 + EP ----------------------------------------------
def wait_healthy(url: str, procs: list[subprocess.Popen], timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a launcher exited with {p.returncode} before {url} was healthy")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not healthy within {timeout} s")


def bench(model: Path, out: Path, name: str, seed: int = 0) -> dict:
    # A new seed per round: the same prompts twice would hit vLLM's prefix cache and measure that instead.
    cmd = [
        "vllm",
        "bench",
        "serve",
        "--seed",
        str(seed),
        "--base-url",
        f"http://127.0.0.1:{API_PORT}",
        "--model",
        str(model),
        "--dataset-name",
        "random",
        "--random-input-len",
        "128",
        "--random-output-len",
        "128",
        "--num-prompts",
        "200",
        "--ignore-eos",
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        f"{name}.json",
    ]
    proc = subprocess.run(cmd, env=env_with(), capture_output=True, text=True, timeout=600)
    (out / f"{name}.txt").write_text(proc.stdout[-20000:] + proc.stderr[-5000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / f"{name}.json").read_text())


def gpu_processes() -> list[str]:
    proc = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return [line for line in proc.stdout.splitlines() if line.strip()]


def stop(procs: list[subprocess.Popen]) -> float:
    t0 = time.monotonic()
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=STOP_TIMEOUT_S + 30)
    while gpu_processes() and time.monotonic() - t0 < STOP_TIMEOUT_S:
        time.sleep(1)
    return time.monotonic() - t0


def test_serve_dp2_ep_through_the_launcher(deploy, tiny_model, results):
    logs = [results / "serve-node0.log", results / "serve-node1.log"]
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch",
                "serve",
                "--deploy",
                str(deploy),
                "--node-rank",
                str(rank),
                "--log-file",
                str(logs[rank]),
            ],
            env=env_with(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
        )
        for rank in (0, 1)
    ]
    try:
        healthy_after = wait_healthy(f"http://127.0.0.1:{API_PORT}/health", procs, HEALTH_TIMEOUT_S)
        rounds = [bench(tiny_model, results, f"bench-launcher-{i}", seed=i) for i in range(ROUNDS)]
        result = rounds[0]
    finally:
        stopped_after = stop(procs)
    codes = [p.returncode for p in procs]
    left = gpu_processes()
    summary = {
        "healthy_after_s": round(healthy_after, 1),
        "stop_s": round(stopped_after, 1),
        "exit_codes": codes,
        "gpu_processes_after_stop": left,
        "completed": result.get("completed"),
        "failed": result.get("failed"),
        "output_throughput": [r.get("output_throughput") for r in rounds],
        "request_throughput": [r.get("request_throughput") for r in rounds],
        "total_s": round(time.monotonic() - t0, 1),
    }
    (results / "serve-launcher-summary.json").write_text(json.dumps(summary, indent=2))
    assert result["completed"] == 200
    assert not result.get("failed")
    assert left == []
    primary, secondary = (log.read_text() for log in logs)
    assert "all2all manager" in primary + secondary
    assert "EP Rank 0/2" in primary + secondary and "EP Rank 1/2" in primary + secondary


def test_hand_written_vllm_serve_side_by_side(deploy, tiny_model, results):
    """The same flags and environment, typed by hand: throughput must match the launcher's (ratio ~1.0)."""
    summary = results / "serve-launcher-summary.json"
    if not summary.exists():
        pytest.skip("run test_serve_dp2_ep_through_the_launcher first")
    launcher = json.loads(summary.read_text())["output_throughput"]
    plan = json.loads(
        subprocess.run(
            [sys.executable, "-m", "launch", "plan", str(deploy), "--format", "json"],
            env=env_with(),
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            timeout=60,
        ).stdout
    )
    procs = []
    for node in plan:
        paths = {k: os.pathsep.join([*v, os.environ.get(k, "")]) for k, v in node["path_prepend"].items()}
        env = env_with(**node["stack_env"], **paths, **node["env"])
        log = open(results / f"hand-node{node['node_rank']}.log", "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(node["argv"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
    try:
        healthy_after = wait_healthy(f"http://127.0.0.1:{API_PORT}/health", procs, HEALTH_TIMEOUT_S)
        hands = [bench(tiny_model, results, f"bench-hand-{i}", seed=i) for i in range(ROUNDS)]
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    hand = [r["output_throughput"] for r in hands]
    ratio = statistics.median(launcher) / statistics.median(hand)
    (results / "side-by-side.json").write_text(
        json.dumps(
            {
                "launcher_output_tok_s": launcher,
                "hand_output_tok_s": hand,
                "ratio_of_medians": round(ratio, 3),
                "hand_healthy_after_s": round(healthy_after, 1),
            },
            indent=2,
        )
    )
    assert all(r["completed"] == 200 for r in hands)
    assert 0.8 < ratio < 1.25  # one run each: noise, not a slowdown, is what this bound allows


# ---- 3. data_parallel_backend: ray ---------------------------------------------------------------------
def test_serve_dp2_ep_with_ray_as_the_data_parallel_backend(tiny_model, tmp_path, results):
    """vLLM on node 0 only; node 1's GPU joins through `ray start`; the launcher starts vLLM once both Ray
    nodes are there, and stops vLLM and the Ray head on SIGTERM."""
    if not shutil.which("ray"):
        pytest.skip("needs ray on PATH")
    deploy = tmp_path / "ray.yaml"
    deploy.write_text(deploy_text(tiny_model, data_parallel_backend="ray", ray_port="6379"))
    logs = [results / "ray-node0.log", results / "ray-node1.log"]
    t0 = time.monotonic()
    procs = []
    for rank in (1, 0):  # the worker may start first: it waits for the head's port
        out = open(results / f"ray-launcher{rank}.txt", "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "launch",
                    "serve",
                    "--deploy",
                    str(deploy),
                    "--node-rank",
                    str(rank),
                    "--log-file",
                    str(logs[rank]),
                ],
                env=env_with(RAY_USAGE_STATS_ENABLED="0"),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        )
    try:
        healthy_after = wait_healthy(f"http://127.0.0.1:{API_PORT}/health", procs, HEALTH_TIMEOUT_S)
        result = bench(tiny_model, results, "bench-ray", seed=7)
    finally:
        stopped_after = stop(procs[::-1])
    summary = {
        "healthy_after_s": round(healthy_after, 1),
        "stop_s": round(stopped_after, 1),
        "exit_codes": [p.returncode for p in procs[::-1]],
        "gpu_processes_after_stop": gpu_processes(),
        "completed": result.get("completed"),
        "failed": result.get("failed"),
        "output_throughput": result.get("output_throughput"),
        "total_s": round(time.monotonic() - t0, 1),
    }
    (results / "serve-ray-summary.json").write_text(json.dumps(summary, indent=2))
    assert result["completed"] == 200 and not result.get("failed")
    assert summary["gpu_processes_after_stop"] == []
    # vLLM's exit code through the primary's launcher; a Ray worker stopped while its head is going away
    # exits 1 (Ray's drain cannot reach the GCS any more), which is Ray's to report.
    assert summary["exit_codes"][0] == 0
    launcher0 = (results / "ray-launcher0.txt").read_text()
    assert "2 nodes in the Ray cluster at" in launcher0, launcher0[-3000:]
    primary = logs[0].read_text()
    assert "EP Rank 0/2" in primary and "EP Rank 1/2" in primary  # both engines report through the primary's log
