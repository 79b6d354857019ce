"""The two-GPU runs' deploy files (tests/gpu/deploy/), proved on the CPU before a GPU is lent: each plans through
`python -m launch plan --format json`, vLLM 0.26.0's own parser accepts every argv, each plan's environment is
what its backend needs where both ranks share one host, `launch verify` reads the manager line vLLM 0.26.0
logs for each backend, and the EP memory budget of every DeepEP file fits an H200. What the GPUs add (kernels,
throughput, stop) is tests/gpu/test_two_gpus.py's.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from launch import check
from tests.conftest import ROOT, VLLM_LOGS, run_module
from tests.support import PARSER_PYTHON, parser_of, wheel_text

DEPLOY = ROOT / "tests" / "gpu" / "deploy"
FILES = sorted(DEPLOY.glob("*.yaml"))
TWO_NODES = {f"two-nodes-{b}": b for b in ("deepep_low_latency", "deepep_high_throughput", "deepep_v2")} | {
    "two-nodes-allgather_reducescatter": "allgather_reducescatter"
}
ONE_NODE = {f"one-node-{b}": b for b in ("deepep_low_latency", "deepep_high_throughput", "deepep_v2")}
NIC_VARS = ("NCCL_IB_HCA", "NVSHMEM_HCA_LIST", "UCX_NET_DEVICES", "NCCL_IB_GID_INDEX", "NVSHMEM_IB_GID_INDEX")
"""Variables that name a NIC or a GID: none belongs on a machine whose GPUs talk over NVLink only."""


def plan(launch, path, *more: str) -> list[dict]:
    res = launch("plan", str(path), "--format", "json", *more)
    assert res.code == 0, res.err
    return json.loads(res.out)


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_the_suite_has_every_file_the_two_gpu_run_needs():
    assert {f.stem for f in FILES} == {*TWO_NODES, *ONE_NODE, "pd-two-gpus"}


@pytest.mark.parametrize("name", sorted(TWO_NODES))
def test_two_nodes_on_one_host_plan_as_primary_gpu0_and_headless_secondary_gpu1(launch, name):
    primary, secondary = plan(launch, DEPLOY / f"{name}.yaml")
    assert (primary["role"], secondary["role"]) == ("primary", "secondary")
    assert [primary["env"]["CUDA_VISIBLE_DEVICES"], secondary["env"]["CUDA_VISIBLE_DEVICES"]] == ["0", "1"]
    assert primary["node_address"] == "127.0.0.1" and secondary["node_address"] == "127.0.0.2"
    for node in (primary, secondary):
        argv = node["argv"]
        assert argv[:2] == ["vllm", "serve"] and "--enable-expert-parallel" in argv
        assert flag(argv, "--data-parallel-size") == "2" and flag(argv, "--data-parallel-size-local") == "1"
        assert flag(argv, "--data-parallel-address") == "127.0.0.1"
        assert flag(argv, "--all2all-backend") == TWO_NODES[name] == node["all2all_backend"]
        assert node["target_vllm"] == "0.26.0"
    assert "--headless" in secondary["argv"] and flag(secondary["argv"], "--data-parallel-start-rank") == "1"
    assert "--headless" not in primary["argv"]


@pytest.mark.parametrize("name", sorted(TWO_NODES))
def test_the_files_differ_only_in_the_backend(name):
    """The ratio against allgather_reducescatter compares backends, not deployments."""
    data = yaml.safe_load((DEPLOY / f"{name}.yaml").read_text())
    base = yaml.safe_load((DEPLOY / "two-nodes-allgather_reducescatter.yaml").read_text())
    assert {**data, "all2all_backend": None} == {**base, "all2all_backend": None}


@pytest.mark.parametrize("backend", ["deepep_low_latency", "deepep_high_throughput", "deepep_v2"])
def test_deepep_across_two_entries_on_tcp_is_refused_so_the_files_say_ib(launch, backend):
    """Two entries are two nodes to the backend matrix (launch/matrix.py), even on one host: DeepEP across nodes
    needs ib or roce. vLLM itself finds both ranks on one node (in_the_same_node_as) and DeepEP uses NVLink."""
    res = launch("plan", str(DEPLOY / f"two-nodes-{backend}.yaml"), "--transport", "tcp")
    assert res.code == 2 and "Traceback" not in res.err
    assert len(res.err.strip().splitlines()) == 1
    assert f"all2all_backend: {backend} cannot run across nodes on tcp" in res.err
    # DeepEP v1 drives mlx5 NICs; v2's NCCL GIN also runs through EFA's net plugin
    assert ("transport ib, roce or efa" if backend == "deepep_v2" else "transport ib or roce") in res.err


@pytest.mark.parametrize("name", sorted(ONE_NODE))
def test_one_node_of_two_gpus_sets_nothing_of_infiniband(launch, name):
    """Within one node DeepEP runs over NVLink (launch/matrix.py's table): the plan forces no IBGDA, names no NIC,
    and keeps NCCL off InfiniBand (transport tcp)."""
    (node,) = plan(launch, DEPLOY / f"{name}.yaml")
    env = node["env"]
    assert not [k for k in env if k.startswith(("NVSHMEM_IB", "NVSHMEM_IBGDA"))], env
    assert not [k for k in NIC_VARS if k in env], env
    assert env["NCCL_IB_DISABLE"] == "1"
    assert flag(node["argv"], "--data-parallel-size-local") == "2" and "CUDA_VISIBLE_DEVICES" not in env


@pytest.mark.parametrize("name", sorted(TWO_NODES))
def test_two_nodes_on_one_host_name_no_nic_and_force_ibgda_only_where_deepep_does(launch, name):
    """transport ib (for the matrix) must not put a NIC into a machine that has none. DeepEP v1 gets
    NVSHMEM_IB_ENABLE_IBGDA=1 (launch/fabric.py, across nodes): inert here, because DeepEP's Buffer sets the same
    itself in low-latency mode, and in high-throughput mode starts NVSHMEM only when it has RDMA ranks, which two
    GPUs of one host never are (deep_ep/buffer.py, the `get_num_rdma_ranks() > 1 or low_latency_mode` branch,
    73b6ea4). deepep_v2 runs on NCCL and gets nothing of NVSHMEM's; allgather_reducescatter nothing either."""
    backend = TWO_NODES[name]
    for node in plan(launch, DEPLOY / f"{name}.yaml"):
        env = node["env"]
        assert not [k for k in NIC_VARS if k in env], env
        ib_nvshmem = {k: v for k, v in env.items() if k.startswith(("NVSHMEM_IB", "NVSHMEM_IBGDA"))}
        if backend in ("deepep_low_latency", "deepep_high_throughput"):
            assert ib_nvshmem == {"NVSHMEM_IB_ENABLE_IBGDA": "1"}
        else:
            assert ib_nvshmem == {}
        assert (env["NCCL_NVLS_ENABLE"], env["NVSHMEM_DISABLE_NVLS"]) == ("0", "1")  # no NVLink SHARP there


def test_prefill_on_gpu0_decode_on_gpu1_each_with_its_backend_and_nixl(launch):
    prefill, decode = plan(launch, DEPLOY / "pd-two-gpus.yaml")
    assert (prefill["group"], decode["group"]) == ("prefill", "decode")
    assert (prefill["env"]["CUDA_VISIBLE_DEVICES"], decode["env"]["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    assert (prefill["all2all_backend"], decode["all2all_backend"]) == ("deepep_high_throughput", "deepep_low_latency")
    for node, port in ((prefill, "8100"), (decode, "8200")):
        assert json.loads(flag(node["argv"], "--kv-transfer-config"))["kv_connector"] == "NixlConnector"
        assert flag(node["argv"], "--port") == port
        # DP 1 per group: vLLM 0.26.0 builds no all2all manager (base_device_communicator.py, use_all2all needs DP > 1)
        assert flag(node["argv"], "--data-parallel-size") == "1"
        assert node["env"]["VLLM_NIXL_SIDE_CHANNEL_HOST"] == node["node_address"]
        assert not [k for k in node["env"] if k.startswith("NVSHMEM_IB")]
    assert prefill["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"] != decode["env"]["VLLM_NIXL_SIDE_CHANNEL_PORT"]


# ---- vLLM 0.26.0 itself -------------------------------------------------------------------------------------------
@pytest.mark.vllm
def test_vllm_0_26_0_parses_every_argv_of_every_file(launch):
    folder = parser_of("0.26.0")
    nodes = [(f.stem, node) for f in FILES for node in plan(launch, f)]
    answer = check.parse(
        [node["argv"][1:] for _, node in nodes], python=str(PARSER_PYTHON), pythonpath=[str(folder)], timeout=300
    )
    assert not answer.problem, answer.problem
    assert answer.version == "0.26.0"
    pairs = zip(nodes, answer.results, strict=True)
    rejected = [(name, n["role"], n["group"], r.error) for (name, n), r in pairs if not r.ok]
    assert rejected == []
    assert len(answer.results) == 2 * len(TWO_NODES) + len(ONE_NODE) + 2


def manager_class(source: str, backend: str) -> str:
    """The class vLLM's CudaCommunicator builds for ``backend``: the first `self.all2all_manager = X(` after the
    branch that names it (vllm/distributed/device_communicators/cuda_communicator.py)."""
    branches = source[source.index("if self.use_all2all:") :]
    at = branches.index(f'"{backend}"')
    return re.compile(r"self\.all2all_manager = (\w+)\(").search(branches, at).group(1)


@pytest.mark.vllm
@pytest.mark.parametrize("backend", sorted(TWO_NODES.values()))
def test_launch_verify_names_the_manager_vllm_0_26_0_logs_for_each_backend(launch, backend, tmp_path):
    """The manager line is written from vLLM 0.26.0's own source ("Using %s all2all manager." with the class its
    branch builds) into the real two-node logs of a 0.26.0 run (tests/fixtures/vllm-logs/dp2-ep), in place of the
    AgRsAll2AllManager that run logged; verify then reads it against each deploy file."""
    source = wheel_text("0.26.0", "vllm/distributed/device_communicators/cuda_communicator.py")
    assert '"Using %s all2all manager."' in source
    cls = manager_class(source, backend)
    logs = []
    for name in ("primary.log", "secondary.log"):
        text = (VLLM_LOGS / "dp2-ep" / name).read_text()
        log = tmp_path / name
        log.write_text(text.replace("Using AgRsAll2AllManager all2all manager.", f"Using {cls} all2all manager."))
        logs.append(str(log))
    assert f"Using {cls} all2all manager." in (tmp_path / "primary.log").read_text()  # logged once, by the primary
    res = launch("verify", *logs, "--deploy", str(DEPLOY / f"two-nodes-{backend}.yaml"))
    assert res.code == 0, res.out + res.err
    assert re.search(rf"^all2all manager +: {cls} \({backend}\)$", res.out, re.M), res.out
    assert "# verdict: as planned" in res.out
    if backend != "allgather_reducescatter":  # the untouched logs: vLLM used its default, not what was asked
        res = launch(
            "verify",
            *(str(VLLM_LOGS / "dp2-ep" / n) for n in ("primary.log", "secondary.log")),
            "--deploy",
            str(DEPLOY / f"two-nodes-{backend}.yaml"),
        )
        assert res.code == 1
        assert f"MISMATCH all2all backend: asked for {backend}, vLLM used AgRsAll2AllManager" in res.out, res.out


# ---- the EP memory budget, the one EP check that needs no GPU ------------------------------------------------------
TINY_MOE_2048 = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 2048,
    "hidden_size": 2048,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "max_position_embeddings": 4096,
    "torch_dtype": "bfloat16",
}
"""The config.json tests/gpu/tiny_moe.py writes with HIDDEN 2048 (its Qwen3MoeConfig arguments)."""
H200_GIB = 140.4
"""NVML's total memory of one H200 on the lent machines (docs/results.md, EP preflight on one H200)."""


@pytest.mark.parametrize("name", sorted(ONE_NODE) + [n for n in sorted(TWO_NODES) if "deepep" in n])
def test_ep_memory_budget_of_every_deepep_file_fits_an_h200(name, tmp_path):
    model = tmp_path / "tiny-moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_MOE_2048))
    data = yaml.safe_load((DEPLOY / f"{name}.yaml").read_text())
    deploy = tmp_path / f"{name}.yaml"
    deploy.write_text(yaml.safe_dump({**data, "model": str(model)}, sort_keys=False))
    for rank in range(len(data["nodes"])):
        res = run_module(
            "preflight.ep_memory", "--deploy", str(deploy), "--node-rank", str(rank), "--gpu-memory-gib", str(H200_GIB)
        )
        assert res.code == 0, res.err
        assert f"{data['all2all_backend']}, EP 2" in res.out
        total = next(line for line in res.out.splitlines() if line.strip().startswith("total"))
        assert total.endswith(": fits"), res.out
        heap = next(line for line in res.out.splitlines() if "NVSHMEM symmetric heap" in line)
        if name == "one-node-deepep_high_throughput":  # vLLM 0.26.0 passes num_rdma_bytes=0 within a node
            assert "no RDMA buffer (one node, NVLink only)" in heap, heap
