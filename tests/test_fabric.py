"""Golden fabric settings: for each transport and backend family, every variable the launcher sets for NCCL,
NVSHMEM, libfabric and UCX, and the absence of each where it does not belong (launch/fabric.py cites the owner's
document for each one)."""

from __future__ import annotations

import pytest
from packaging.version import Version

from env.paths import StackPaths
from launch import plan as planning
from launch.config import parse_deploy
from launch.fabric import hca_lists, kv_over_ucx
from launch.layout import layouts
from launch.vllm_versions import Target
from preflight import rdma
from tests.conftest import ROOT

# Every variable launch/fabric.py may set, and those it must never set again: NVSHMEM's NIC handler (DeepEP
# stopped forcing it), and the EFA variables aws-ofi-nccl's doc/efa-env-var.md calls unneeded with current versions.
FABRIC_VARS = (
    "NCCL_IB_HCA",
    "NCCL_IB_GID_INDEX",
    "NCCL_IB_DISABLE",
    "NVSHMEM_IB_ENABLE_IBGDA",
    "NVSHMEM_HCA_LIST",
    "NVSHMEM_IB_GID_INDEX",
    "NVSHMEM_ENABLE_NIC_PE_MAPPING",
    "NVSHMEM_REMOTE_TRANSPORT",
    "NVSHMEM_LIBFABRIC_PROVIDER",
    "FI_EFA_ENABLE_SHM_TRANSFER",
    "UCX_NET_DEVICES",
    "NVSHMEM_IBGDA_NIC_HANDLER",
    "FI_PROVIDER",
    "FI_EFA_USE_DEVICE_RDMA",
    "FI_EFA_FORK_SAFE",
)

HCAS = ["mlx5_0", "mlx5_1"]
IBGDA = {"NVSHMEM_IB_ENABLE_IBGDA": "1"}
NCCL_HCA = {"NCCL_IB_HCA": "=mlx5_0,mlx5_1"}
NVSHMEM_HCA = {"NVSHMEM_HCA_LIST": "mlx5_0,mlx5_1"}
NVSHMEM_EFA = {
    "NVSHMEM_REMOTE_TRANSPORT": "libfabric",
    "NVSHMEM_LIBFABRIC_PROVIDER": "efa",
    "FI_EFA_ENABLE_SHM_TRANSFER": "0",
}
NO_IB = {"NCCL_IB_DISABLE": "1"}

# (transport, backend, nodes, network extras, vLLM version) -> the fabric variables of every node's plan.
# Versions are ones that really have the backend (pplx: 0.10.1.1; deepep_v2: 0.33.0).
GOLDEN = {
    "ib, default backend": (("ib", None, 2, {}, "0.33.0"), {}),
    "ib, default backend, hcas": (("ib", None, 2, {"hcas": HCAS}, "0.33.0"), NCCL_HCA),
    "ib, deepep_low_latency": (("ib", "deepep_low_latency", 2, {}, "0.33.0"), IBGDA),
    "ib, deepep_high_throughput, hcas": (
        ("ib", "deepep_high_throughput", 2, {"hcas": HCAS}, "0.26.0"),
        NCCL_HCA | IBGDA | NVSHMEM_HCA,
    ),
    "ib, deepep_low_latency, one node": (("ib", "deepep_low_latency", 1, {"hcas": HCAS}, "0.33.0"), NCCL_HCA),
    "ib, deepep_v2, hcas": (("ib", "deepep_v2", 2, {"hcas": HCAS}, "0.33.0"), NCCL_HCA),
    "ib, pplx, hcas": (("ib", "pplx", 2, {"hcas": HCAS}, "0.10.1.1"), NCCL_HCA | NVSHMEM_HCA),
    "roce, default backend, auto GID": (("roce", None, 2, {}, "0.33.0"), {}),
    "roce, default backend, gid_index": (("roce", None, 2, {"gid_index": 3}, "0.33.0"), {"NCCL_IB_GID_INDEX": "3"}),
    "roce, deepep_low_latency, auto GID": (("roce", "deepep_low_latency", 2, {}, "0.33.0"), IBGDA),
    "roce, deepep_low_latency, gid_index, hcas": (
        ("roce", "deepep_low_latency", 2, {"gid_index": 3, "hcas": HCAS}, "0.33.0"),
        NCCL_HCA | {"NCCL_IB_GID_INDEX": "3"} | IBGDA | NVSHMEM_HCA | {"NVSHMEM_IB_GID_INDEX": "3"},
    ),
    "roce, deepep_v2, gid_index": (("roce", "deepep_v2", 2, {"gid_index": 5}, "0.33.0"), {"NCCL_IB_GID_INDEX": "5"}),
    "efa, default backend": (("efa", None, 2, {}, "0.33.0"), {}),
    "efa, allgather_reducescatter": (("efa", "allgather_reducescatter", 2, {}, "0.26.0"), {}),
    "efa, pplx": (("efa", "pplx", 2, {}, "0.10.1.1"), NVSHMEM_EFA),
    "efa, pplx, one node": (("efa", "pplx", 1, {}, "0.10.1.1"), {}),
    "efa, deepep_low_latency, one node": (("efa", "deepep_low_latency", 1, {}, "0.33.0"), {}),
    "tcp, default backend": (("tcp", None, 2, {}, "0.33.0"), NO_IB),
    "tcp, deepep_high_throughput, one node": (("tcp", "deepep_high_throughput", 1, {}, "0.33.0"), NO_IB),
}


def plans(transport, backend, nodes, network, version, kv_transfer=None, **extra):
    config = parse_deploy(
        {
            "model": "deepseek-ai/DeepSeek-V3-0324",
            "all2all_backend": backend,
            "nodes": [{"address": f"10.0.0.{i + 1}", "gpus": 8} for i in range(nodes)],
            "network": {"transport": transport, **network},
            **extra,
        },
        "golden.yaml",
    )
    target = Target(Version(version), "given")
    return [
        planning.build(config, lay, target, StackPaths(prefix=ROOT), kv_transfer=kv_transfer) for lay in layouts(config)
    ]


def fabric_of(plan) -> dict[str, str]:
    return {k: v for k, v in plan.env.items() if k in FABRIC_VARS}


@pytest.mark.parametrize("case", GOLDEN.values(), ids=GOLDEN.keys())
def test_fabric_variables_per_transport_and_backend(case):
    args, expected = case
    for plan in plans(*args):
        assert fabric_of(plan) == expected


def test_one_hca_list_for_every_library_and_mlx5_1_never_selects_mlx5_10():
    lists = hca_lists(["mlx5_1", "mlx5_2:1"])
    assert lists == {
        "NCCL_IB_HCA": "=mlx5_1,mlx5_2:1",
        "NVSHMEM_HCA_LIST": "mlx5_1,mlx5_2:1",
        "UCX_NET_DEVICES": "mlx5_1:1,mlx5_2:1",  # UCX matches "device:port" exactly (before PR #11142)
    }
    # NCCL reads names as prefixes unless the list starts with '=' (env.rst, NCCL_IB_HCA).
    assert rdma.nccl_uses("mlx5_1", "mlx5_10", 1)
    assert not rdma.nccl_uses(lists["NCCL_IB_HCA"], "mlx5_10", 1)
    assert rdma.nccl_uses(lists["NCCL_IB_HCA"], "mlx5_1", 1) and not rdma.nccl_uses(lists["NCCL_IB_HCA"], "mlx5_2", 2)


def test_ucx_gets_the_list_only_where_nixl_runs_over_ucx():
    ucx = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"backends": ["UCX"]}}
    libfabric = {**ucx, "kv_connector_extra_config": {"backends": ["LIBFABRIC"]}}
    assert kv_over_ucx(ucx) and kv_over_ucx({"kv_connector": "NixlConnector"})  # UCX is NIXL's default
    assert not kv_over_ucx(libfabric) and not kv_over_ucx(None)
    (decode, *_) = plans("ib", "deepep_low_latency", 2, {"hcas": HCAS}, "0.33.0", kv_transfer=ucx)
    assert decode.env["UCX_NET_DEVICES"] == "mlx5_0:1,mlx5_1:1"
    (decode, *_) = plans("ib", "deepep_low_latency", 2, {"hcas": HCAS}, "0.33.0", kv_transfer=libfabric)
    assert "UCX_NET_DEVICES" not in decode.env


def test_the_disaggregated_example_hands_one_list_to_nccl_nvshmem_and_ucx(launch):
    res = launch("plan", "docs/examples/pd-2p2d.yaml")
    assert res.code == 0, res.err
    exports = [line for line in res.out.splitlines() if line.startswith("export ")]
    for line in (
        "export NCCL_IB_HCA==mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7",
        "export NVSHMEM_HCA_LIST=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7",
        "export UCX_NET_DEVICES=mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1,mlx5_4:1,mlx5_5:1,mlx5_6:1,mlx5_7:1",
    ):
        assert exports.count(line) == 4  # two prefill nodes, two decode nodes


def test_deploy_file_settings_still_win():
    (plan, _) = plans(
        "efa", None, 2, {"efa": {"FI_EFA_USE_HUGE_PAGE": "0"}, "nccl": {"NCCL_BUFFSIZE": "8388608"}}, "0.33.0"
    )
    assert plan.env["FI_EFA_USE_HUGE_PAGE"] == "0" and plan.env["NCCL_BUFFSIZE"] == "8388608"


REFUSED = {
    "hcas and NCCL_IB_HCA": (
        "  transport: ib\n  hcas: [mlx5_0]\n  nccl: {NCCL_IB_HCA: mlx5}\n",
        "network.nccl.NCCL_IB_HCA: also set by network.hcas",
    ),
    "hcas on efa": (
        "  transport: efa\n  hcas: [mlx5_0]\n",
        "network.hcas: names InfiniBand / RoCE devices, the transport is efa",
    ),
    "gid_index on ib": (
        "  transport: ib\n  gid_index: 3\n",
        "network.gid_index: a RoCE GID index, the transport is ib",
    ),
    "NCCL's GID only": (
        "  transport: roce\n  nccl: {NCCL_IB_GID_INDEX: '3'}\n",
        "network.nccl.NCCL_IB_GID_INDEX: set for one library only (NVSHMEM_IB_GID_INDEX would pick its own GID; "
        "expected network.gid_index: 3, which sets both)",
    ),
    "two GIDs": (
        "  transport: roce\n  nccl: {NCCL_IB_GID_INDEX: '3'}\n  nvshmem: {NVSHMEM_IB_GID_INDEX: '1'}\n",
        "network.nvshmem.NVSHMEM_IB_GID_INDEX: 1, but network.nccl.NCCL_IB_GID_INDEX is 3",
    ),
    "hca name with a comma": (
        "  transport: ib\n  hcas: ['mlx5_0,mlx5_1']\n",
        "network.hcas: 'mlx5_0,mlx5_1' is not a device name (expected e.g. mlx5_0 or mlx5_0:1, one per entry)",
    ),
}


@pytest.mark.parametrize("network, message", REFUSED.values(), ids=REFUSED.keys())
def test_settings_that_would_let_libraries_disagree_are_refused_in_one_line(launch, write_yaml, network, message):
    path = write_yaml(
        "model: m\nvllm_version: 0.33.0\nnodes: [{address: 10.0.0.1}, {address: 10.0.0.2}]\nnetwork:\n" + network
    )
    res = launch("plan", str(path))
    assert res.code == 2 and res.out == ""
    assert len(res.err.splitlines()) == 1 and message in res.err, res.err


def test_efa_variables_the_plugins_cheatsheet_says_to_leave_unset_are_warned_about(launch):
    """The guide's own file sets NCCL_BUFFSIZE on EFA; aws-ofi-nccl's doc/efa-env-var.md recommends the default.
    A warning, not a refusal: the guide ran with it."""
    res = launch("plan", "docs/examples/guide-2node.yaml")
    assert res.code == 0, res.err
    warning = (
        "# warning: network.nccl.NCCL_BUFFSIZE on EFA: best left out: the default is recommended "
        "(aws-ofi-nccl doc/efa-env-var.md)"
    )
    assert res.out.splitlines().count(warning) == 2  # one per node


def test_efa_advice_names_where_each_variable_was_set():
    from launch.fabric import efa_advice

    notes = efa_advice({"network.efa": {"FI_EFA_FORK_SAFE": "1"}, "nodes[1].env": {"RDMAV_HUGEPAGES_SAFE": "1"}})
    assert notes == [
        "warning: network.efa.FI_EFA_FORK_SAFE on EFA: not needed anymore (the plugin sets it) "
        "(aws-ofi-nccl doc/efa-env-var.md)",
        "warning: nodes[1].env.RDMAV_HUGEPAGES_SAFE on EFA: do not use (aws-ofi-nccl doc/efa-env-var.md)",
    ]
    assert efa_advice({"network.nccl": {"NCCL_NET_PLUGIN": "/opt/amazon/ofi-nccl/lib/libnccl-net.so"}}) == []
