"""The guide's layout in miniature, as far as CPUs go: two nodes of two GPUs each. Planned (DP 4, local
DP 2, start rank 2), accepted by real vLLM's parser, and preflight's cross-node run with two ranks per
node (a world of 4, gloo) between two network-namespace nodes. The same layout on four real GPUs needs
a 4-GPU machine (docs/results.md says what ran)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from env.paths import StackPaths
from launch import check, plan as planning
from launch.config import load_deploy
from launch.layout import layouts
from launch.vllm_versions import resolve_target
from tests.conftest import EXAMPLES, ROOT

LAYOUT = EXAMPLES / "2x2-gpus.yaml"


def plans():
    config = load_deploy(LAYOUT)
    target = resolve_target("0.26.0", None)
    return [planning.build(config, lay, target, StackPaths(prefix=ROOT)) for lay in layouts(config)]


def test_two_nodes_of_two_gpus_are_planned_like_the_guide():
    primary, secondary = plans()
    assert primary.argv[3:16] == [
        "--tensor-parallel-size",
        "1",
        "--enable-expert-parallel",
        "--data-parallel-size",
        "4",
        "--data-parallel-size-local",
        "2",
        "--data-parallel-address",
        "10.77.0.1",
        "--data-parallel-rpc-port",
        "13345",
        "--api-server-count",
        "2",
    ]
    at = secondary.argv.index("--data-parallel-size-local")
    assert secondary.argv[at : at + 5] == [
        "--data-parallel-size-local",
        "2",
        "--data-parallel-start-rank",
        "2",
        "--data-parallel-address",
    ]
    assert "--headless" in secondary.argv and "--api-server-count" not in secondary.argv


@pytest.mark.vllm
def test_the_miniature_is_accepted_by_vllm():
    from tests.support import PARSER_PYTHON as PYTHON, parser_of

    folder = parser_of("0.26.0")
    answer = check.parse([p.argv[1:] for p in plans()], python=str(PYTHON), pythonpath=[str(folder)], timeout=300)
    assert not answer.problem, answer.problem
    assert [r.ok for r in answer.results] == [True, True], answer.results


def test_cross_node_preflight_with_two_ranks_per_node(two_hosts, tmp_path):
    deploy = tmp_path / "mini.yaml"
    deploy.write_text(LAYOUT.read_text() + "preflight: {rendezvous_timeout_s: 30, collective_timeout_s: 60}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLOO_", "NCCL_"))}
    env.update(PYTHONPATH=str(ROOT), EP_PREFLIGHT_BACKEND="gloo", EP_PREFLIGHT_NPROCS="2")
    procs = [
        subprocess.Popen(
            host.cmd(
                sys.executable,
                "-m",
                "preflight",
                "-m",
                "multinode",
                "--deploy",
                str(deploy),
                "--preflight-json",
                str(tmp_path / f"n{rank}.json"),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for rank, host in enumerate(two_hosts)
    ]  # each node finds its rank from its own address
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for rank, (proc, out, host) in enumerate(zip(procs, outs, two_hosts, strict=True)):
        assert proc.returncode == 0, out
        report = json.loads((tmp_path / f"n{rank}.json").read_text())
        assert report["verdict"] == "READY"
        across = [c for c in report["checks"] if c["name"] == "all-reduce across nodes"][0]
        assert f"(4 ranks on 2 nodes, gloo, GLOO_SOCKET_IFNAME={host.ifname}, 0 wrong)" in across["value"]
