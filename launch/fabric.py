"""What NCCL, NVSHMEM, libfabric and UCX need from the environment on each transport, beyond their defaults.

The rule is to set as little as possible: every library here picks its NICs, GIDs and providers itself, and
a variable copied from an old recipe can outlive the reason it was needed (or break a newer version). What
is set, and why, with the owner's document it comes from:

InfiniBand / RoCE, every backend
  NCCL_IB_HCA=<=names>   only with ``network.hcas``. NCCL treats each name as a prefix (``mlx5_1`` also
                         selects ``mlx5_10``) unless the list starts with ``=``.
                         NVIDIA/nccl docs/userguide/source/env.rst, section NCCL_IB_HCA.
  NCCL_IB_GID_INDEX=N    RoCE only, only with ``network.gid_index``; left unset NCCL picks a RoCE v2 GID of
                         an IPv4 address itself (default -1; NCCL_IB_ADDR_FAMILY / NCCL_IB_ROCE_VERSION_NUM).
                         NVIDIA/nccl docs/userguide/source/env.rst, sections NCCL_IB_GID_INDEX, NCCL_IB_ADDR_FAMILY.

InfiniBand / RoCE, NVSHMEM across nodes (DeepEP v1 high-throughput / low-latency, pplx)
  NVSHMEM_IB_ENABLE_IBGDA=1   DeepEP v1 only. DeepEP's Buffer sets it itself across nodes or in low-latency mode
                              (deepseek-ai/DeepEP deep_ep/buffer.py at c18eabd, the "Enable IBGDA" branch under
                              `get_num_rdma_ranks() > 1 or low_latency_mode`); set here too so that preflight
                              judges the node for IBGDA.
  (no NVSHMEM_IBGDA_NIC_HANDLER)  its default ``auto`` uses the GPU and falls back to the CPU-assisted path
                              (NVIDIA/nvshmem src/modules/transport/common/env_defs.h at v3.4.5-0, IBGDA_NIC_HANDLER).
                              DeepEP stopped forcing ``gpu`` for that reason: deepseek-ai/DeepEP commit e6b4f52
                              "buffer.py: Do not force the NIC handler to GPU" (in every pinned DeepEP commit).
  NVSHMEM_HCA_LIST=<names>    only with ``network.hcas``. NVSHMEM compares names exactly (strcmp) and has no
                              ``=`` syntax: a leading ``=`` would become part of the first name. Its IB
                              transports filter on it while enumerating devices (src/modules/transport/ibgda/
                              ibgda.cpp and ibrc/ibrc.cpp, the HCA_LIST branches, v3.4.5-0). NVSHMEM_ENABLE_NIC_PE_
                              MAPPING is NOT set: it replaces NVSHMEM's nearest-NIC choice with a round robin over
                              local PEs (src/host/transport/transport.cpp, nvshmemi_options.ENABLE_NIC_PE_MAPPING).
  NVSHMEM_IB_GID_INDEX=N      RoCE only, with ``network.gid_index`` (the same index as NCCL's); default -1: NVSHMEM
                              picks one as NCCL does (env_defs.h, IB_GID_INDEX / IB_ADDR_FAMILY / IB_ROCE_VERSION_NUM).

InfiniBand / RoCE, a UCX KV connector (NIXL)
  UCX_NET_DEVICES=<name:port>  only with ``network.hcas``. UCX compares each entry with a resource's exact
                              ``dev_name``, which carries the port (``mlx5_0:1``): openucx/ucx src/ucp/core/
                              ucp_context.c, ucp_is_resource_in_device_list / ucp_str_array_search. A bare
                              ``mlx5_0`` matches only in UCX releases with openucx/ucx PR #11142 (2026), so a name
                              given without a port is written with port 1 (a ConnectX NIC's one port).

AWS EFA (aws/aws-ofi-nccl doc/efa-env-var.md, "EFA Cheatsheet")
  nothing for NCCL: FI_EFA_USE_DEVICE_RDMA "do not set for libfabric>=1.18.0 and aws-ofi-nccl>=1.7.0";
  FI_EFA_FORK_SAFE "not needed anymore" (the plugin sets it); FI_PROVIDER=efa only "for aws-ofi-nccl<=1.5.0";
  FI_EFA_ENABLE_SHM_TRANSFER "not needed" for NCCL (the plugin turns SHM off through FI_OPT_CUDA_API_PERMITTED).
  NVSHMEM over libfabric (pplx across nodes):
  NVSHMEM_REMOTE_TRANSPORT=libfabric, NVSHMEM_LIBFABRIC_PROVIDER=efa   NVSHMEM's default provider is cxi
                              (env_defs.h, LIBFABRIC_PROVIDER "cxi, efa, verbs"; compared in lower case:
                              src/modules/transport/libfabric/libfabric.cpp, strcmp(..., "efa"), v3.4.5-0).
  FI_EFA_ENABLE_SHM_TRANSFER=0  "the user is responsible for ensuring that the libfabric environment variable
                              FI_EFA_ENABLE_SHM_TRANSFER is set to 0 before launching" with the EFA provider:
                              NVSHMEM 3.3.24 release notes, Limitations (https://docs.nvidia.com/nvshmem/
                              release-notes-install-guide/prior-releases/release-3324.html).

TCP
  NCCL_IB_DISABLE=1      "prevents the IB/RoCE transport from being used by NCCL. Instead, NCCL will fall back to
                         using IP sockets" (NVIDIA/nccl docs/userguide/source/env.rst, section NCCL_IB_DISABLE).

Deploy-file values (network.nccl / nvshmem / efa, env) are applied after these and win; the variables that
``network.hcas`` and ``network.gid_index`` own may not also be given by hand, so the libraries cannot disagree.
"""

from __future__ import annotations

from launch.config import ConfigError, Network

DEEPEP_V1 = ("deepep_high_throughput", "deepep_low_latency")
"""DeepEP's NVSHMEM kernels (v1). deepep_v2 runs on NCCL's GIN and sets nothing of NVSHMEM's."""
NVSHMEM_BACKENDS = (*DEEPEP_V1, "pplx")
"""Backends whose kernels reach other nodes through NVSHMEM."""

HCA_VARS = ("NCCL_IB_HCA", "NVSHMEM_HCA_LIST", "UCX_NET_DEVICES")
"""What ``network.hcas`` sets: one list, in each library's syntax."""
GID_VARS = ("NCCL_IB_GID_INDEX", "NVSHMEM_IB_GID_INDEX")
"""What ``network.gid_index`` sets: one index for both libraries."""


EFA_ADVICE = {
    "FI_EFA_FORK_SAFE": "not needed anymore (the plugin sets it)",
    "FI_EFA_USE_DEVICE_RDMA": "do not set for libfabric >= 1.18.0 and aws-ofi-nccl >= 1.7.0",
    "FI_PROVIDER": "needed (efa) only for aws-ofi-nccl <= 1.5.0",
    "NCCL_PROTO": "needed (simple) only for aws-ofi-nccl <= 1.5.0",
    "NCCL_SOCKET_NTHREADS": "not applicable for EFA",
    "NCCL_NSOCKS_PERTHREAD": "not applicable for EFA",
    "NCCL_MIN_CHANNELS": "best left out: more channels than needed split messages until EFA starves for data",
    "NCCL_BUFFSIZE": "best left out: the default is recommended",
    "RDMAV_FORK_SAFE": "do not use (it can break things on newer kernels)",
}
"""Variables aws-ofi-nccl's EFA cheatsheet (doc/efa-env-var.md, section 1) says to leave unset with current
libfabric and plugin versions, with its words; every RDMAV_* is "Do not use" there too. FI_EFA_ENABLE_SHM_TRANSFER
is left out: NVSHMEM over libfabric needs it set to 0 (see above)."""


def efa_advice(settings: dict[str, dict[str, str]]) -> list[str]:
    """Warnings for variables the deploy file sets on EFA that aws-ofi-nccl's cheatsheet says to leave unset.
    ``settings``: where each group of variables comes from (network.nccl, env, nodes[1].env) -> variables."""
    notes = []
    for where, variables in settings.items():
        for name in variables:
            advice = EFA_ADVICE.get(name) or ("do not use" if name.startswith("RDMAV_") else None)
            if advice:
                notes.append(f"warning: {where}.{name} on EFA: {advice} (aws-ofi-nccl doc/efa-env-var.md)")
    return notes


def uses_nvshmem(backend: str | None, across_nodes: bool) -> bool:
    """Whether NVSHMEM carries traffic between nodes (within one node it uses NVLink and needs nothing here)."""
    return across_nodes and backend in NVSHMEM_BACKENDS


def hca_lists(hcas: list[str]) -> dict[str, str]:
    """One list of device names (``mlx5_0`` or ``mlx5_0:1``) in the syntax of each library that selects NICs."""
    names = ",".join(hcas)
    ucx = ",".join(hca if ":" in hca else f"{hca}:1" for hca in hcas)
    return {"NCCL_IB_HCA": f"={names}", "NVSHMEM_HCA_LIST": names, "UCX_NET_DEVICES": ucx}


def kv_over_ucx(kv: dict | None) -> bool:
    """Whether a KV transfer config (vLLM's --kv-transfer-config) names NIXL with its UCX backend (the default
    when no backend is named)."""
    if not isinstance(kv, dict) or "nixl" not in str(kv.get("kv_connector", "")).lower():
        return False
    backends = (kv.get("kv_connector_extra_config") or {}).get("backends") or ["UCX"]
    return "UCX" in backends


def fabric_env(network: Network, backend: str | None, *, across_nodes: bool, ucx: bool = False) -> dict[str, str]:
    """The transport's variables for this deployment. ``across_nodes``: the deployment (the group, with
    prefill/decode) spans more than one node; ``ucx``: a NIXL connector over UCX moves the KV cache. Raises ConfigError (one line) when the
    deploy file sets a variable that ``network.hcas`` / ``network.gid_index`` own, or those on the wrong transport."""
    transport = network.transport
    _refuse_conflicts(network)
    nvshmem = uses_nvshmem(backend, across_nodes)
    env: dict[str, str] = {}
    if transport in ("ib", "roce"):
        lists = hca_lists(network.hcas) if network.hcas else {}
        if lists:
            env["NCCL_IB_HCA"] = lists["NCCL_IB_HCA"]
        if transport == "roce" and network.gid_index is not None:
            env["NCCL_IB_GID_INDEX"] = str(network.gid_index)
        if nvshmem:
            if backend in DEEPEP_V1:
                env["NVSHMEM_IB_ENABLE_IBGDA"] = "1"
            if lists:
                env["NVSHMEM_HCA_LIST"] = lists["NVSHMEM_HCA_LIST"]
            if transport == "roce" and network.gid_index is not None:
                env["NVSHMEM_IB_GID_INDEX"] = str(network.gid_index)
        if ucx and lists:
            env["UCX_NET_DEVICES"] = lists["UCX_NET_DEVICES"]
    elif transport == "efa":
        if nvshmem:
            env.update(
                {
                    "NVSHMEM_REMOTE_TRANSPORT": "libfabric",
                    "NVSHMEM_LIBFABRIC_PROVIDER": "efa",
                    "FI_EFA_ENABLE_SHM_TRANSFER": "0",
                }
            )
    else:  # tcp
        env["NCCL_IB_DISABLE"] = "1"
    return env


def _refuse_conflicts(network: Network) -> None:
    transport = network.transport
    if network.hcas and transport not in ("ib", "roce"):
        raise ConfigError(
            f"network.hcas: names InfiniBand / RoCE devices, the transport is {transport} "
            f"(expected transport ib or roce, or no hcas)"
        )
    if network.gid_index is not None and transport != "roce":
        raise ConfigError(
            f"network.gid_index: a RoCE GID index, the transport is {transport} (expected transport roce, or no gid_index)"
        )
    given = {**network.nccl, **network.nvshmem}
    if network.hcas:
        for var in HCA_VARS:
            if var in given:
                raise ConfigError(
                    f"network.{_section(var)}.{var}: also set by network.hcas (expected one of the two; "
                    f"network.hcas sets NCCL_IB_HCA, NVSHMEM_HCA_LIST and UCX_NET_DEVICES alike)"
                )
    gids = [var for var in GID_VARS if var in given]
    if gids and network.gid_index is not None:
        raise ConfigError(
            f"network.{_section(gids[0])}.{gids[0]}: also set by network.gid_index (expected one of the two)"
        )
    if len(gids) == 2 and given[gids[0]] != given[gids[1]]:
        raise ConfigError(
            f"network.nvshmem.{gids[1]}: {given[gids[1]]}, but network.nccl.{gids[0]} is {given[gids[0]]} "
            f"(expected one index for both: network.gid_index)"
        )
    if len(gids) == 1:
        other = GID_VARS[1 - GID_VARS.index(gids[0])]
        raise ConfigError(
            f"network.{_section(gids[0])}.{gids[0]}: set for one library only ({other} would pick its own GID; "
            f"expected network.gid_index: {given[gids[0]]}, which sets both)"
        )


def _section(var: str) -> str:
    return "nccl" if var.startswith("NCCL_") else "nvshmem"
