"""The guide's two scripts, transcribed, against what the launcher plans for the same cluster.

The guide (launch_vllm_node1.sh / launch_vllm_node2.sh) takes NODE1_IP RPC_PORT MODEL TOTAL_DP LOCAL_DP
and API_SERVERS (primary) or START_RANK (secondary), exports its variables by hand and runs `vllm serve`.
Its flag lines carry trailing comments after the line continuations, which break the commands as
written; the argv below is the one its authors meant (every flag, in the script's order).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from env.paths import StackPaths
from launch import plan as planning
from launch.cli import get_args_parser
from launch.config import load_deploy
from launch.layout import layouts
from launch.request import from_args
from launch.resolve import resolve
from launch.vllm_versions import resolve_target
from tests.conftest import EXAMPLES, ROOT

MODEL = "deepseek-ai/DeepSeek-V3-0324"


def guide_argv(role, node1_ip, rpc_port, model, total_dp, local_dp, last):
    """The `vllm serve` line of the guide's scripts, with its positional arguments filled in."""
    argv = [
        "vllm",
        "serve",
        model,
        "--tensor-parallel-size",
        "1",
        "--enable-expert-parallel",
        "--data-parallel-size",
        str(total_dp),
        "--data-parallel-size-local",
        str(local_dp),
    ]
    if role == "primary":
        argv += [
            "--data-parallel-address",
            node1_ip,
            "--data-parallel-rpc-port",
            str(rpc_port),
            "--api-server-count",
            str(last),
        ]  # the script writes --api-server-count=N
    else:
        argv += [
            "--data-parallel-start-rank",
            str(last),
            "--data-parallel-address",
            node1_ip,
            "--data-parallel-rpc-port",
            str(rpc_port),
            "--headless",
        ]
    return argv + ["--trust-remote-code"]


# The guide's exports (both scripts), minus PYTHONPATH / LD_LIBRARY_PATH, which point at its own
# folders (/path/to/DeepEP, ...) and are generated here from the stack instead.
GUIDE_ENV = {
    "VLLM_ALL2ALL_BACKEND": "allgather_reducescatter",
    "VLLM_USE_DEEP_GEMM": "1",
    "GLOO_SOCKET_IFNAME": "eth0",
    "NCCL_SOCKET_IFNAME": "eth0",
    "NCCL_NET_PLUGIN": "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu/libnccl-net.so",
    "NCCL_P2P_NET_CHUNKSIZE": "524288",
    "NCCL_BUFFSIZE": "8388608",
}
GUIDE_ENV_SECONDARY = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}

# What the launcher changes on purpose, for the guide's EFA cluster and vLLM 0.10.1.1:
CORRECTED_ENV = {
    # vLLM 0.10.1.1 has no allgather_reducescatter ("Unknown all2all backend" as soon as DP > 1); DeepEP cannot
    # cross nodes on EFA; naive, that version's default, runs on any transport.
    "VLLM_ALL2ALL_BACKEND": "naive",
}
ADDED_ENV = {
    "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "eth0",  # NVSHMEM's bootstrap on the same interface as NCCL/Gloo
}
# Nothing of libfabric's: aws-ofi-nccl's doc/efa-env-var.md says FI_PROVIDER, FI_EFA_USE_DEVICE_RDMA and
# FI_EFA_FORK_SAFE are not needed with current versions, and no backend here runs NVSHMEM over libfabric.
# TP_SOCKET_IFNAME, also exported by the guide, is read by no vLLM version: not generated.

NO_STACK = StackPaths(prefix=EXAMPLES)  # no built stack, no CUDA wheels: only the guide's own variables


def plans_of(path):
    config = load_deploy(path)
    target = resolve_target(None, config.vllm_version)
    return [planning.build(config, lay, target, NO_STACK) for lay in layouts(config)]


def test_two_node_deploy_file_runs_what_the_guide_ran():
    primary, secondary = plans_of(EXAMPLES / "guide-2node.yaml")
    assert primary.argv == guide_argv("primary", "10.1.59.30", 13345, MODEL, 16, 8, 8)
    assert secondary.argv == guide_argv("secondary", "10.1.59.30", 13345, MODEL, 16, 8, 8)
    assert primary.env == GUIDE_ENV | CORRECTED_ENV | ADDED_ENV
    assert secondary.env == GUIDE_ENV | CORRECTED_ENV | ADDED_ENV | GUIDE_ENV_SECONDARY


PARSERS = Path(os.environ.get("EP_VLLM_PARSERS", ROOT / ".cache" / "vllm-parsers"))


def dispatched_backends(version: str) -> set[str]:
    """The backends a vLLM release's CUDA communicator really dispatches, read in its installed wheel (the one
    tests/vllm/install-parsers.sh puts beside the project): `all2all_backend == "NAME"` branches."""
    source = PARSERS / f"vllm-{version}" / "vllm" / "distributed" / "device_communicators" / "cuda_communicator.py"
    if not source.is_file():
        if os.environ.get("EP_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM {version} is not installed in {PARSERS} (bash tests/vllm/install-parsers.sh)")
        pytest.skip(f"vLLM {version} is not installed in {PARSERS} (bash tests/vllm/install-parsers.sh)")
    return set(re.findall(r'all2all_backend == "(\w+)"', source.read_text()))


def test_the_guide_example_uses_a_backend_its_vllm_has():
    config = load_deploy(EXAMPLES / "guide-2node.yaml")
    assert config.vllm_version == "0.10.1.1"
    (primary, _) = plans_of(EXAMPLES / "guide-2node.yaml")
    backend = primary.env["VLLM_ALL2ALL_BACKEND"]
    assert backend in primary.target.backends()
    have = dispatched_backends("0.10.1.1")
    assert have == {"naive", "pplx", "deepep_high_throughput", "deepep_low_latency"}
    assert backend in have and "allgather_reducescatter" not in have


@pytest.mark.parametrize("role", ["primary", "secondary"])
def test_guide_positional_arguments_mean_what_they_meant(role, monkeypatch):
    """`serve-primary 10.1.59.30 13345 MODEL 16 8 8` with VLLM_ALL2ALL_BACKEND exported, as the guide did."""
    monkeypatch.setenv("VLLM_ALL2ALL_BACKEND", "naive")
    args = get_args_parser().parse_args(
        [role, "10.1.59.30", "13345", MODEL, "16", "8", "8", "--vllm-version", "0.10.1.1"]
    )
    (plan,) = resolve(from_args(args, [])).plans
    assert plan.argv == guide_argv(role, "10.1.59.30", 13345, MODEL, 16, 8, 8)
    assert plan.env["VLLM_ALL2ALL_BACKEND"] == "naive"
    assert any("from VLLM_ALL2ALL_BACKEND" in note for note in plan.notes)


def test_exported_backend_becomes_the_flag_on_newer_vllm(monkeypatch):
    monkeypatch.setenv("VLLM_ALL2ALL_BACKEND", "deepep_low_latency")
    args = get_args_parser().parse_args(
        ["primary", "10.1.59.30", "13345", MODEL, "16", "8", "8", "--vllm-version", "0.26.0"]
    )
    (plan,) = resolve(from_args(args, [])).plans
    assert plan.argv[-3:] == ["--all2all-backend", "deepep_low_latency", "--trust-remote-code"]
    assert "VLLM_ALL2ALL_BACKEND" not in plan.env


def test_four_nodes_start_where_the_guide_would_start_them():
    """4 x 8 GPUs: the guide's scripts with TOTAL_DP 32, LOCAL_DP 8, START_RANK 8/16/24."""
    plans = plans_of(EXAMPLES / "4node-ib.yaml")
    assert [p.layout.start_rank for p in plans] == [0, 8, 16, 24]
    tail = ["--all2all-backend", "deepep_v2", "--enable-eplb", "--eplb-config", '{"num_redundant_experts":32}']
    tail += ["--max-model-len", "32768", "--gpu-memory-utilization", "0.9"]
    for plan in plans:
        last = 8 if plan.layout.role == "primary" else plan.layout.start_rank
        expected = guide_argv(plan.layout.role, "10.0.0.1", 13345, MODEL, 32, 8, last)[:-1]  # no trust-remote-code
        assert plan.argv == expected + tail
        assert plan.env["NCCL_IB_HCA"] == "=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7"  # exact names
        assert not [k for k in plan.env if k.startswith("NVSHMEM_IB")]  # DeepEP v2 runs on NCCL GIN, not NVSHMEM


def test_passthrough_arguments_go_last():
    args = get_args_parser().parse_args(
        ["secondary", "10.0.0.1", "13345", MODEL, "32", "8", "8", "--vllm-version", "0.26.0"]
    )
    (plan,) = resolve(from_args(args, ["--max-num-seqs", "64"])).plans
    assert plan.argv[-2:] == ["--max-num-seqs", "64"]
