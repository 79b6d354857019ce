"""data_parallel_backend: ray. vLLM runs on the primary only (`--data-parallel-backend ray`) and places its data
parallel engines through a Ray cluster: the primary runs the Ray head, every secondary runs
`ray start --address PRIMARY:ray_port --block`, and the primary starts vLLM only once every node has joined.

On two network namespaces with the real Ray (installed by .ci/run; EP_REQUIRE_RAY=1 makes its absence a
failure there), a stand-in for `vllm serve` reports how many Ray nodes it found when it started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.version import Version

from env.paths import StackPaths
from launch import plan as planning
from launch.config import parse_deploy
from launch.layout import layouts
from launch.vllm_versions import Target
from tests.conftest import ROOT, run_module

DEPLOY = {
    "model": "m",
    "nodes": [{"address": "10.0.0.1", "gpus": 8}, {"address": "10.0.0.2", "gpus": 8}],
    "data_parallel_backend": "ray",
    "vllm_version": "0.26.0",
}


def plans(**changes):
    config = parse_deploy({**DEPLOY, **changes}, "deploy.yaml")
    return [
        planning.build(config, lay, Target(Version("0.26.0"), "given"), StackPaths(prefix=ROOT))
        for lay in layouts(config)
    ]


def test_vllm_runs_on_the_primary_and_the_secondaries_join_its_ray_cluster():
    primary, secondary = plans()
    assert primary.argv[:2] == ["vllm", "serve"] and "--headless" not in primary.argv
    i = primary.argv.index("--data-parallel-backend")
    assert primary.argv[i + 1] == "ray"
    assert primary.argv[primary.argv.index("--data-parallel-size") + 1] == "16"
    assert primary.ray_head.argv == [
        "ray",
        "start",
        "--head",
        "--port",
        "6379",
        "--node-ip-address",
        "10.0.0.1",
        "--block",
    ]
    assert primary.ray_nodes == 2
    assert secondary.argv == ["ray", "start", "--address", "10.0.0.1:6379", "--node-ip-address", "10.0.0.2", "--block"]
    # the same interface and transport settings on every node: Ray's workers run vLLM's engines there
    assert secondary.env["NCCL_SOCKET_IFNAME"].describe() == primary.env["NCCL_SOCKET_IFNAME"].describe().replace(
        "10.0.0.1", "10.0.0.2"
    )


def test_the_ray_port_must_be_a_port_of_its_own(tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text("model: m\nnodes: [{address: 10.0.0.1}]\ndata_parallel_backend: ray\nray_port: 8000\n")
    res = run_module("launch", "plan", str(deploy))
    assert (
        res.code == 2
        and res.err.strip() == f"error: {deploy}: ray_port: 8000 is also port or rpc_port (expected a third port)"
    )
    deploy.write_text("model: m\nnodes: [{address: 10.0.0.1}]\ndata_parallel_backend: ray\nray_port: 16379\n")
    res = run_module("launch", "plan", str(deploy))
    assert res.code == 2 and res.err.strip() == (
        f"error: {deploy}: ray_port: 16379 is inside Ray's worker port range 10002-19999 "
        "(expected a port outside it, e.g. 6379)"
    )


def test_the_primarys_script_waits_for_every_node_before_vllm(tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text(
        "model: m\nnodes: [{address: 10.0.0.1}, {address: 10.0.0.2}, {address: 10.0.0.3}]\ndata_parallel_backend: ray\n"
        "vllm_version: 0.26.0\n"
    )
    assert run_module("launch", "plan", str(deploy), "--format", "shell", "--out", str(tmp_path / "plans")).code == 0
    script = (tmp_path / "plans" / "node-0.sh").read_text().splitlines()
    head = script.index("ray start --head --port 6379 --node-ip-address 10.0.0.1 --block &")
    vllm = next(i for i, ln in enumerate(script) if ln.startswith("vllm serve"))
    # the wait is the toolkit's own (launch ray-wait, bounded), run on the node
    assert head < vllm and any(
        ln.endswith("-m launch ray-wait 10.0.0.1:6379 --nodes 3 --timeout 600") for ln in script[head:vllm]
    )
    assert not script[vllm].startswith("exec")  # the script outlives vLLM to stop the head
    assert (tmp_path / "plans" / "node-2.sh").read_text().splitlines()[
        -1
    ] == "exec ray start --address 10.0.0.1:6379 --node-ip-address 10.0.0.3 --block"
    for node in range(3):
        assert subprocess.run(["bash", "-n", str(tmp_path / "plans" / f"node-{node}.sh")]).returncode == 0


def ray_bin() -> str:
    found = shutil.which("ray", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        if os.environ.get("EP_REQUIRE_RAY") == "1":
            pytest.fail("ray is not installed (pip install ray)")
        pytest.skip("ray is not installed (pip install ray)")
    return found


def in_ns(host, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        host.cmd(sys.executable, "-m", "launch", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.netns
def test_two_nodes_form_a_ray_cluster_before_vllm_starts(two_hosts, tmp_path):
    ray = ray_bin()
    primary, secondary = two_hosts
    deploy = tmp_path / "d.yaml"
    deploy.write_text(
        f"model: tiny-moe\nnodes: [{{address: {primary.address}, gpus: 2}}, {{address: {secondary.address}, gpus: 2}}]\n"
        "data_parallel_backend: ray\nray_port: 26379\nvllm_version: 0.26.0\nnetwork: {transport: tcp}\n"
    )
    stand_in = tmp_path / "vllm"
    stand_in.write_text(
        f'#!/bin/sh\necho "stand-in vllm $*"\n'
        f"echo \"ray nodes when vllm started: $(ray status --address {primary.address}:26379 | grep -c ' node_')\"\n"
    )
    stand_in.chmod(0o755)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{Path(ray).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    start = time.monotonic()
    head = in_ns(primary, "serve", "--deploy", str(deploy), "--node-rank", "0", "--vllm-bin", str(stand_in), env=env)
    worker = in_ns(secondary, "serve", "--deploy", str(deploy), "--node-rank", "1", env=env)
    try:
        out, _ = head.communicate(timeout=180)
        assert head.returncode == 0, out
        assert "2 nodes in the Ray cluster at 10.77.0.1:26379 (after" in out and "): starting vLLM" in out, out
        assert "ray nodes when vllm started: 2" in out, out
        assert "--data-parallel-backend ray --data-parallel-address 10.77.0.1" in out
        assert "stopping the Ray head" in out
        took = time.monotonic() - start
        worker.send_signal(signal.SIGTERM)
        wout, _ = worker.communicate(timeout=60)
        assert "the primary's Ray head 10.77.0.1:26379 accepts connections" in wout, wout
    finally:
        for proc in (head, worker):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    left = [
        pid
        for h in two_hosts
        for pid in subprocess.run(["ip", "netns", "pids", h.ns], capture_output=True, text=True).stdout.split()
    ]
    assert left == [], f"processes left in the namespaces: {left}"
    print(f"\nray head + 1 worker on two namespaces, stand-in vLLM after both joined: {took:.1f} s")
