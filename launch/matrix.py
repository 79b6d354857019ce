"""Which all2all backend runs on which transport, at which scale and for which vLLM: checked when the plan is
made, so that plan, serve, check and preflight refuse the same deployments before anything starts.

Each refusal is one line that names what works instead (exit code 2, as for any bad input):

backend                     one node      across nodes: ib / roce     across nodes: efa / tcp
deepep_high_throughput,     NVLink        yes (NVSHMEM IBGDA)         no: DeepEP v1 drives mlx5 NICs from the GPU
deepep_low_latency
deepep_v2                   NVLink        yes (NCCL GIN)              efa yes (GIN through aws-ofi-nccl), tcp no
pplx                        NVLink        yes (NVSHMEM)               efa yes (NVSHMEM libfabric), tcp no
allgather_reducescatter,    yes           yes                         yes (NCCL collectives on any transport)
naive, others

Sources: DeepEP v1 needs "InfiniBand GPUDirect Async (IBGDA) support" across nodes and "NVLink" within one
(deepseek-ai/DeepEP docs/nvshmem.md, Prerequisites). deepep_v2 runs on NCCL's GIN (DeepEP README at d4f41e4,
"V2 has also switched from the NVSHMEM backend to the more lightweight NCCL Gin backend"; "NCCL 2.30.4 and
above"); GIN needs "NVIDIA NICs: CX4 or newer" (NVIDIA/nccl docs/userguide/source/usage/deviceapi.rst,
Requirements) or a net plugin that offers it: on EFA aws-ofi-nccl from 1.21.0, with NCCL >= 2.31.2 and
GDRCopy >= 2.5 (runtime and gdrdrv), in proxy mode by default (aws/aws-ofi-nccl doc/gin-getting-started.md,
Requirements). vLLM asks NCCL for the GIN type and refuses only "0" ("DeepEPv2 requires NCCL GIN",
vllm/distributed/device_communicators/all2all.py, DeepEPV2All2AllManager._check_gin_support, 0.33.0 wheel),
and DeepEP v2 asserts the same (csrc/kernels/backend/nccl.cu, "NCCL GIN is unavailable"); plain sockets offer
no GIN. pplx-kernels' transports are "NVLink, IBGDA, IBRC, EFA" (ppl-ai/pplx-kernels README.md at 12cecfd).

deepep_v2 also needs NCCL >= 2.30.4 where torch loads it (vllm/utils/import_utils.py,
DEEPEP_V2_MIN_NCCL_VERSION_RAW = 23004, read from the runtime library), and >= 2.31.2 across nodes on EFA. A
plan cannot see the node's NCCL: it refuses a stack profile that pins an older one (env/pins.py), and
preflight reads the loaded library.

A low-latency backend (deepep_low_latency, nixl_ep) without a prefill/decode split is planned with a warning:
from vLLM 0.20.0 such a deployment defaults max_num_batched_tokens to 256
(vllm/config/parallel.py ParallelConfig.use_batched_dp_moe and vllm/engine/arg_utils.py
_set_default_max_num_seqs_and_batched_tokens_args, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS_FOR_BATCHED_DP
= 256; read in the 0.20.0, 0.26.0 and 0.33.0 wheels, absent from 0.19.1), so every prompt longer than that
prefills in 256-token chunks.
"""

from __future__ import annotations

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from env.pins import PROFILES, active_profile
from launch.config import ConfigError, DeployConfig
from launch.fabric import DEEPEP_V1
from launch.layout import NodeLayout
from launch.vllm_versions import Target

DEEPEP_V2_MIN_NCCL = Version("2.30.4")
"""DeepEP README (d4f41e4) "NCCL 2.30.4 and above"; vLLM's DEEPEP_V2_MIN_NCCL_VERSION_RAW = 23004."""
GIN_ON_EFA_MIN_NCCL = Version("2.31.2")
"""aws-ofi-nccl doc/gin-getting-started.md, Requirements: "NCCL 2.31.2-1 or later" (with plugin 1.21.0)."""
GIN_ON_EFA = (
    f"NCCL >= {GIN_ON_EFA_MIN_NCCL}, aws-ofi-nccl >= 1.21.0 and GDRCopy >= 2.5 (libgdrapi and gdrdrv) on every node"
)
"""What a deepep_v2 plan across EFA nodes needs beyond NCCL (aws-ofi-nccl doc/gin-getting-started.md)."""
LOW_LATENCY = ("deepep_low_latency", "nixl_ep")
"""The backends vLLM's ParallelConfig.use_batched_dp_moe names (0.20.0 .. 0.33.0 wheels)."""
BATCHED_DP_DEFAULT_SINCE = Version("0.20.0")
"""First release whose engine defaults max_num_batched_tokens to 256 for LOW_LATENCY (0.19.1 does not)."""
RDMA = ("ib", "roce")
NVSHMEM_IBGDA_PREFIXES = ("NVSHMEM_IB_ENABLE_IBGDA", "NVSHMEM_IBGDA_")


def across_nodes(config: DeployConfig, layout: NodeLayout) -> bool:
    """Whether the deployment spans nodes: more than one in the file, or (the guide's positional arguments, which
    describe this node only) more data parallel ranks than this node holds."""
    return len(config.nodes) > 1 or layout.data_parallel_size > layout.data_parallel_size_local


def check(
    config: DeployConfig,
    layout: NodeLayout,
    target: Target,
    backend: str | None,
    passthrough: list[str] | None = None,
    kv_transfer: dict | None = None,
) -> list[str]:
    """Warnings for the plan's notes; raises ConfigError (one line) for a combination that cannot run.
    ``kv_transfer``: the group's KV transfer config (a prefill / decode group is split by design)."""
    if not backend:
        return []
    transport = config.network.transport
    where = f"across nodes on {transport}"
    if across_nodes(config, layout) and transport not in RDMA:
        if backend in DEEPEP_V1:
            raise ConfigError(
                f"all2all_backend: {backend} cannot run {where}: DeepEP v1 drives InfiniBand / RoCE NICs from the GPU "
                f"(NVSHMEM IBGDA) (expected {_portable(target, transport)} on {transport}; DeepEP needs transport ib or roce)"
            )
        if backend == "deepep_v2" and transport == "tcp":
            raise ConfigError(
                f"all2all_backend: deepep_v2 cannot run {where}: NCCL GIN needs NVIDIA InfiniBand / RoCE NICs or "
                f"EFA's net plugin (expected {_portable(target, transport)} on tcp; deepep_v2 needs transport ib, roce "
                f"or efa)"
            )
        if backend == "pplx" and transport == "tcp":
            raise ConfigError(
                f"all2all_backend: pplx cannot run {where}: pplx-kernels reach other nodes over IBGDA, IBRC or EFA only "
                f"(expected {_portable(target, transport)} on tcp)"
            )
    notes = []
    if backend == "deepep_v2":
        on_efa = transport == "efa" and across_nodes(config, layout)
        _deepep_v2_requirements(config, target, GIN_ON_EFA_MIN_NCCL if on_efa else DEEPEP_V2_MIN_NCCL)
        if on_efa:
            notes.append(f"deepep_v2 across EFA nodes runs on NCCL GIN through the net plugin: needs {GIN_ON_EFA}")
    args = list(config.vllm_args) + list(passthrough or [])
    return notes + _low_latency_warning(config, layout, target, backend, args, split=kv_transfer is not None)


def _portable(target: Target, transport: str) -> str:
    """What runs on any transport for this vLLM: its NCCL-collective backend (and pplx on EFA, where it exists)."""
    # Only names this release builds as themselves: one its config rewrites (pplx from 0.17) is not an answer.
    have = [b for b in target.backends() if target.choose_backend(b).used == b]
    names = [b for b in ("allgather_reducescatter", "naive") if b in have][:1]
    if transport == "efa" and "deepep_v2" in have:
        names.append("deepep_v2 (NCCL GIN through aws-ofi-nccl >= 1.21)")
    if transport == "efa" and "pplx" in have:
        names.append("pplx (NVSHMEM over libfabric)")
    return " or ".join(names) or "the default backend (leave all2all_backend out)"


def _deepep_v2_requirements(config: DeployConfig, target: Target, floor: Version) -> None:
    # Known at plan time only where the active stack profile is the one for this vLLM; the node's real NCCL is
    # judged by preflight ("NCCL loaded with torch").
    for profile in [PROFILES[active_profile()]]:
        if Version(profile.vllm) != target.version:
            continue
        if not nccl_reaches(profile, floor):
            raise ConfigError(
                f"all2all_backend: deepep_v2 needs NCCL >= {floor} where torch loads it, the stack profile "
                f"{profile.name} for vLLM {target.version} pins NCCL {nccl_allowed(profile)} (expected a profile with nvidia-nccl >= "
                f"{floor}, or another backend: {', '.join(b for b in target.backends() if b != 'deepep_v2')})"
            )
    sources = {f"network.nvshmem.{k}": k for k in config.network.nvshmem}
    sources |= {f"env.{k}": k for k in config.env}
    sources |= {f"nodes[{i}].env.{k}": k for i, n in enumerate(config.nodes) for k in n.env}
    for field, name in sources.items():
        if name.startswith(NVSHMEM_IBGDA_PREFIXES):
            raise ConfigError(
                f"{field}: deepep_v2 runs on NCCL GIN, not NVSHMEM (expected no NVSHMEM IBGDA settings "
                f"with deepep_v2; they belong to deepep_high_throughput / deepep_low_latency)"
            )


def nccl_allowed(profile) -> SpecifierSet | None:
    """The NCCL versions a profile's `nccl` component allows (``==2.28.9``, conda's ``2.27.7.*``, ``>=2.30.4``),
    or None where it has no such component (torch's own NCCL) or its pin cannot be read."""
    for component in profile.components:
        if component.name != "nccl":
            continue
        ref = component.ref.strip()
        try:
            return SpecifierSet(ref if ref[:1] in "=<>~!" else f"=={ref}")
        except InvalidSpecifier:
            return None
    return None


def nccl_reaches(profile, floor: Version) -> bool:
    """Whether the profile's NCCL pin lets the solver pick ``floor`` or newer."""
    allowed = nccl_allowed(profile)
    return allowed is None or any(allowed.contains(v) for v in (floor, Version("999")))


def _low_latency_warning(
    config: DeployConfig, layout: NodeLayout, target: Target, backend: str, args: list[str], *, split: bool
) -> list[str]:
    dp = layout.data_parallel_size
    chosen = any(a == "--max-num-batched-tokens" or a.startswith("--max-num-batched-tokens=") for a in args)
    if (
        backend not in LOW_LATENCY
        or split
        or chosen
        or not config.enable_expert_parallel
        or dp < 2
        or target.version < BATCHED_DP_DEFAULT_SINCE
    ):
        return []
    both = (
        "deepep_v2"
        if "deepep_v2" in target.backends() and (config.network.transport != "tcp" or not across_nodes(config, layout))
        else _portable(target, config.network.transport)
    )
    return [
        f"warning: {backend} without a prefill/decode split: vLLM {target.version} then defaults "
        f"max_num_batched_tokens to 256, so long prompts prefill in 256-token chunks (for prefill and decode on the "
        f"same engines use {both}; or split them with disaggregation; or pass --max-num-batched-tokens)"
    ]
