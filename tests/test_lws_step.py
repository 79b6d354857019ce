"""Inside a LeaderWorkerSet pod (`plan --format k8s`), `python -m launch lws-step STEP` places the deploy file on
the group: the leader (LWS_LEADER_ADDRESS, a DNS name resolved within a bound) is the primary, the pod's
LWS_WORKER_INDEX is its node rank, EP_POD_IP its own address. Then it runs the same preflight / serve as a
hand-started node. Two network namespaces play two pods, each resolving the leader's name through its own
hosts file (what `ip netns exec` mounts), as cluster DNS would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import placement
from launch.config import parse_deploy
from tests.conftest import ROOT, run_module

LEADER = "vllm-ep-0.vllm-ep.default"
TWO = {"model": "m", "nodes": [{"gpus": 2}, {"gpus": 2}], "vllm_version": "0.26.0"}


def lws_env(index: int, size: int = 2, leader: str = "127.0.0.1", pod_ip: str = "127.0.0.2") -> dict[str, str]:
    return {
        "LWS_WORKER_INDEX": str(index),
        "LWS_GROUP_SIZE": str(size),
        "LWS_LEADER_ADDRESS": leader,
        "EP_POD_IP": pod_ip,
    }


def test_the_leader_is_the_primary_and_the_worker_index_the_rank():
    config = parse_deploy(TWO, "deploy.yaml")
    worker = placement.lws(config, "deploy.yaml", lws_env(1, leader="localhost", pod_ip="10.1.2.3"))
    assert worker.node_rank == 1 and worker.config.nodes[0].address in ("127.0.0.1", "::1")
    assert worker.config.nodes[1].address == "10.1.2.3"
    leader = placement.lws(config, "deploy.yaml", lws_env(0, pod_ip="10.1.2.9"))
    assert leader.node_rank == 0 and leader.config.nodes[0].address == "10.1.2.9"  # its own IP, no DNS needed
    assert leader.describe() == "node 0 of 2 (primary, 10.1.2.9); primary at 10.1.2.9"


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {},
            "LWS_WORKER_INDEX: not set (expected inside a pod of the LeaderWorkerSet that `plan --format k8s` writes)",
        ),
        (
            {**lws_env(1), "EP_POD_IP": ""},
            "EP_POD_IP: not set (expected inside a pod of the LeaderWorkerSet that `plan --format k8s` "
            "writes (env from the downward API: status.podIP))",
        ),
        (
            lws_env(1, size=3),
            "DEPLOY: nodes: 2 nodes but the LeaderWorkerSet group has LWS_GROUP_SIZE=3 (expected "
            "leaderWorkerTemplate.size 2: render with `plan --format k8s`)",
        ),
        (
            {**lws_env(1), "LWS_WORKER_INDEX": "one"},
            "LWS_WORKER_INDEX: 'one' is not a whole number (expected inside a pod of the "
            "LeaderWorkerSet that `plan --format k8s` writes)",
        ),
    ],
)
def test_missing_or_wrong_lws_variables_are_one_line(tmp_path, env, message):
    deploy = tmp_path / "d.yaml"
    deploy.write_text("model: m\nnodes: [{gpus: 2}, {gpus: 2}]\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LWS_", "EP_"))}
    res = subprocess.run(
        [sys.executable, "-m", "launch", "lws-step", "serve", "--deploy", str(deploy)],
        capture_output=True,
        text=True,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: {message.replace('DEPLOY', str(deploy))}"
    ]


def test_a_leader_name_that_never_resolves_is_a_node_down_within_the_bound(tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text("model: m\nnodes: [{gpus: 2}, {gpus: 2}]\n")
    res = run_module(
        "launch",
        "lws-step",
        "serve",
        "--deploy",
        str(deploy),
        "--resolve-timeout",
        "2",
        env=lws_env(1, leader="nothing-here.invalid"),
    )
    assert res.code == 3, res.err
    assert res.err.strip().splitlines()[-1] == (
        "error: LWS_LEADER_ADDRESS: the leader's address nothing-here.invalid (LWS_LEADER_ADDRESS) to resolve not ready within 2 s "
        "(expected the LeaderWorkerSet's headless service in cluster DNS; with hostNetwork the pod needs dnsPolicy: "
        "ClusterFirstWithHostNet)"
    )


def hosts_file(ns: str, text: str) -> Path:
    """`ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts: this pod's view of DNS."""
    folder = Path("/etc/netns") / ns
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts").write_text(text)
    return folder


@pytest.mark.netns
def test_two_pods_place_themselves_run_cross_node_preflight_and_plan(two_hosts, tmp_path):
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(
        "model: tiny-moe\nnodes: [{gpus: 2}, {gpus: 2}]\nrpc_port: 13345\nvllm_version: 0.26.0\n"
        "network: {transport: tcp, socket_ifname: auto}\npreflight: {rendezvous_timeout_s: 30, collective_timeout_s: 60}\n"
    )
    folders = [hosts_file(h.ns, f"127.0.0.1 localhost\n{two_hosts[0].address} {LEADER}\n") for h in two_hosts]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LWS_", "EP_", "GLOO_"))}
    env.update(PYTHONPATH=str(ROOT), EP_PREFLIGHT_BACKEND="gloo")

    def pod(host, index: int, *step: str) -> subprocess.Popen:
        return subprocess.Popen(
            host.cmd(sys.executable, "-m", "launch", "lws-step", step[0], "--deploy", str(deploy), *step[1:]),
            env={**env, **lws_env(index, leader=LEADER, pod_ip=host.address)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    try:
        # the init containers: cross-node preflight, both pods at once
        outs = [
            p.communicate(timeout=120)[0]
            for p in [pod(h, i, "preflight", "--", "-m", "multinode") for i, h in enumerate(two_hosts)]
        ]
        for index, (out, host) in enumerate(zip(outs, two_hosts, strict=True)):
            role = "primary" if index == 0 else "secondary"
            assert (
                f"[launch] LeaderWorkerSet pod: node {index} of 2 ({role}, {host.address}); primary at {two_hosts[0].address}"
                in out
            )
            allreduce = next(ln for ln in out.splitlines() if "all-reduce across nodes" in ln)
            assert allreduce.startswith("PASS") and f"GLOO_SOCKET_IFNAME={host.ifname}" in allreduce, out
            assert "# verdict: READY (10 passed)" in out, out
        # the vllm containers, as a dry run: the secondary's command points at the leader
        out = pod(two_hosts[1], 1, "serve", "--", "--dry-run").communicate(timeout=60)[0]
        assert f"export GLOO_SOCKET_IFNAME={two_hosts[1].ifname}" in out, out
        command = out.strip().splitlines()[-1]
        assert command.startswith("vllm serve tiny-moe ") and "--data-parallel-start-rank 2" in command
        assert f"--data-parallel-address {two_hosts[0].address} --data-parallel-rpc-port 13345 --headless" in command
    finally:
        for folder in folders:
            (folder / "hosts").unlink()
            folder.rmdir()
