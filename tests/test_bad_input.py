"""Bad input: one line on stderr naming the file (or argument), the field and what was expected.
Exit code 2, no traceback, nothing written."""

from __future__ import annotations

import pytest

from tests.support import assert_one_line_error

GOOD = """\
model: deepseek-ai/DeepSeek-V3-0324
nodes:
  - {address: 10.1.59.30, gpus: 8}
  - {address: 10.1.60.57, gpus: 8}
"""

CASES = {
    "wrong type": (
        GOOD.replace("gpus: 8}\n  - {address: 10.1.60.57", "gpus: eight}\n  - {address: 10.1.60.57"),
        "nodes[0].gpus: input should be a valid integer, got 'eight'",
    ),
    "unknown key": (GOOD + "all2all_backnd: pplx\n", "all2all_backnd: unknown key (expected one of: model, nodes,"),
    "unknown nested key": (
        GOOD + "network: {transprt: ib}\n",
        "network.transprt: unknown key (expected one of: transport, socket_ifname,",
    ),
    "local DP larger than GPUs": (
        GOOD.replace(
            "gpus: 8}\n  - {address: 10.1.60.57", "gpus: 8, data_parallel_size_local: 9}\n  - {address: 10.1.60.57"
        ),
        "nodes[0].data_parallel_size_local: 9 ranks x tensor_parallel_size 1 need more than the 8 GPUs listed (expected at most 8)",
    ),
    "missing model": (GOOD.replace("model: deepseek-ai/DeepSeek-V3-0324\n", ""), "model: missing (required)"),
    "port out of range": (GOOD + "port: 70000\n", "port: input should be less than or equal to 65535, got 70000"),
    "duplicated addresses": (
        GOOD.replace("10.1.60.57", "10.1.59.30"),
        "nodes[1].address: '10.1.59.30' is already nodes[0]'s address (expected one entry per node)",
    ),
    "API bind address that is no address": (
        GOOD + "host: 'a$(x)'\n",
        "host: 'a$(x)' is neither an IP address nor a host name (expected e.g. 10.0.0.1 or gpu-01.cluster)",
    ),
    "socket interface that is no interface name": (
        GOOD + "network: {socket_ifname: 'eth0;ls'}\n",
        "network.socket_ifname: 'eth0;ls' is not a network interface name (expected auto, or one name of at most 15",
    ),
    "a node's socket interface that is a list": (
        GOOD.replace("gpus: 8}", "gpus: 8, socket_ifname: '^docker,lo'}", 1),
        "nodes[0].socket_ifname: '^docker,lo' is not a network interface name",
    ),
    "YAML that does not parse": (GOOD + "env: {A: [1\n", "not valid YAML"),
    "not a mapping": ("- just\n- a list\n", "expected a mapping at the top"),
    "DP size that does not add up": (
        GOOD + "data_parallel_size: 24\n",
        "data_parallel_size: 24 but the nodes add up to 16 ranks",
    ),
    "TP that does not divide the GPUs": (
        GOOD + "tensor_parallel_size: 3\n",
        "nodes[0].gpus: 8 GPUs do not divide by tensor_parallel_size 3",
    ),
    "API port equal to the RPC port": (GOOD + "port: 13345\n", "port: 13345 is also rpc_port"),
    "env name that is no variable": (GOOD + "env: {'MY-VAR': x}\n", "env.MY-VAR: expected a shell variable name"),
    "EFA settings on InfiniBand": (
        GOOD + "network: {transport: ib, efa: {FI_PROVIDER: efa}}\n",
        "network: efa settings given but transport is 'ib'",
    ),
    "NCCL setting without its prefix": (
        GOOD + "network: {nccl: {IB_HCA: mlx5}}\n",
        "network.nccl: expected variable names starting with NCCL_, got 'IB_HCA'",
    ),
    "backend the target does not have yet": (
        GOOD + "vllm_version: 0.16.0\nall2all_backend: nixl_ep\n",
        "all2all_backend: 'nixl_ep' needs vLLM >= 0.18.0, the target is 0.16.0",
    ),
    "unknown backend": (
        GOOD + "all2all_backend: deepep_fast\n",
        "all2all_backend: unknown backend 'deepep_fast' (expected one of:",
    ),
    "backend newer than the target": (
        GOOD + "vllm_version: 0.10.1.1\nall2all_backend: deepep_v2\n",
        "all2all_backend: 'deepep_v2' needs vLLM >= ",
    ),
    "version that is no version": (GOOD + "vllm_version: latest\n", "vllm_version: 'latest' is not a version"),
    # gpu_ids: which GPUs of the node, each once, as many as `gpus`, on every node (not only in P/D groups)
    "GPU listed twice": (
        GOOD.replace("gpus: 8}\n  - {address: 10.1.60.57", "gpus: 2, gpu_ids: [0, 0]}\n  - {address: 10.1.60.57"),
        "nodes[0].gpu_ids: GPU 0 is listed twice (expected each GPU once)",
    ),
    "negative GPU id": (
        GOOD.replace("gpus: 8}\n  - {address: 10.1.60.57", "gpus: 2, gpu_ids: [-1, 0]}\n  - {address: 10.1.60.57"),
        "nodes[0].gpu_ids: -1 is negative (expected GPU indices 0, 1, ...)",
    ),
    "fewer GPU ids than GPUs": (
        GOOD.replace("gpus: 8}\n  - {address: 10.1.60.57", "gpus: 4, gpu_ids: [0, 1]}\n  - {address: 10.1.60.57"),
        "nodes[0].gpu_ids: 2 GPUs for gpus: 4 (expected 4 ids)",
    ),
    # an address is an IP address or an RFC 1123 host name
    "address that is no host name": (
        GOOD.replace("10.1.60.57", "gpu_02!"),
        "nodes[1].address: 'gpu_02!' is neither an IP address nor a host name",
    ),
    # preflight thresholds are a typed section: a misspelled key is refused, with the known ones
    "misspelled threshold": (
        GOOD + "preflight: {shm_min_gb: 16}\n",
        "preflight.shm_min_gb: unknown key (expected one of: shm_min_gib,",
    ),
    "negative threshold": (
        GOOD + "preflight: {shm_min_gib: -1}\n",
        "preflight.shm_min_gib: input should be greater than or equal to 0",
    ),
    # a flag the launcher sets has its field: not doubled through vllm_args
    "owned flag in vllm_args": (
        GOOD + "vllm_args: [--port, '9000']\n",
        "vllm_args: --port: set by the launcher (expected port: in the deploy file, not in vllm_args)",
    ),
    "derived flag in vllm_args": (
        GOOD + "vllm_args: [--data-parallel-size, '4']\n",
        "vllm_args: --data-parallel-size: set by the launcher (expected it from the nodes' gpus",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_deploy_file_is_one_line(name, launch, write_yaml):
    text, expected = CASES[name]
    path = write_yaml(text)
    before = path.read_bytes()
    res = launch("plan", str(path))
    assert_one_line_error(res, f"{path}: ", expected)
    assert path.read_bytes() == before


def test_missing_file(launch, tmp_path):
    assert_one_line_error(launch("plan", str(tmp_path / "nope.yaml")), "nope.yaml: cannot read the deploy file")


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["secondary", "10.1.59.30", "13345", "m", "16", "8", "16"],
            "START_RANK: 16 with LOCAL_DP 8 is outside TOTAL_DP 16 (expected 1..8 for a secondary)",
        ),
        (
            ["secondary", "10.1.59.30", "13345", "m", "16", "8", "0"],
            "START_RANK: 0 with LOCAL_DP 8 is outside TOTAL_DP 16",
        ),
        (["primary", "10.1.59.30", "13345", "m", "8", "16", "8"], "LOCAL_DP: 16 is larger than TOTAL_DP 8"),
        (
            ["primary", "10.1.59.30", "99999", "m", "16", "8", "8"],
            "RPC_PORT: 99999 is out of range (expected 1..65535)",
        ),
        (
            ["primary", "10.1.59.30", "13345", "m", "16", "8"],
            "primary: expected 6 arguments NODE1_IP RPC_PORT MODEL TOTAL_DP LOCAL_DP API_SERVERS",
        ),
        (["primary", "10.1.59.30", "13345", "m", "sixteen", "8", "8"], "TOTAL_DP: expected an integer, got 'sixteen'"),
        (
            ["primary", "127.0.0.1", "13345", "m", "2", "1", "1", "--socket-ifname", "nosuch0"],
            "socket_ifname: interface 'nosuch0' does not exist on this machine (expected one of:",
        ),
        (
            [
                "primary",
                "127.0.0.1",
                "13345",
                "m",
                "2",
                "1",
                "1",
                "--all2all-backend",
                "moonep",
                "--vllm-version",
                "0.26.0",
            ],
            "--all2all-backend: 'moonep' needs vLLM >= 0.31.0",
        ),
    ],
)
def test_bad_arguments_are_one_line(args, expected, launch):
    assert_one_line_error(launch(*args, "--dry-run"), expected)


def test_node_rank_outside_the_file(launch, write_yaml):
    path = write_yaml(GOOD)
    assert_one_line_error(
        launch("serve", "--deploy", str(path), "--node-rank", "5", "--dry-run"),
        f"--node-rank: 5 is not a node of {path} (expected 0..1)",
    )


def test_role_that_does_not_match_the_rank(launch, write_yaml):
    path = write_yaml(GOOD)
    assert_one_line_error(
        launch("primary", "--deploy", str(path), "--node-rank", "1", "--dry-run"),
        "node 1 of",
        "is the secondary, not a primary",
    )


def test_machine_that_is_no_node_of_the_file(launch, write_yaml):
    path = write_yaml(GOOD.replace("10.1.59.30", "198.51.100.1").replace("10.1.60.57", "198.51.100.2"))
    assert_one_line_error(
        launch("serve", "--deploy", str(path), "--dry-run"),
        "no node address belongs to this machine (pass --node-rank N)",
    )


def test_shell_scripts_are_not_overwritten(launch, tmp_path):
    from tests.conftest import EXAMPLES

    out = tmp_path / "plans"
    out.mkdir()
    (out / "node-0.sh").write_text("my own script\n")
    res = launch("plan", str(EXAMPLES / "4node-ib.yaml"), "--format", "shell", "--out", str(out))
    assert_one_line_error(res, "node-0.sh exists and differs (expected a new folder, or --force to overwrite)")
    assert (out / "node-0.sh").read_text() == "my own script\n"
