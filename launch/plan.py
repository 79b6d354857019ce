"""The per-node plan: the exact environment and `vllm serve` argv one node runs. Pure: no I/O.

deploy file / guide arguments -> DeployConfig + NodeLayout -> NodePlan -> printed | checked | run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from env.paths import StackPaths
from launch import matrix
from launch.config import DeployConfig
from launch.fabric import fabric_env, kv_over_ucx
from launch.layout import NodeLayout, api_server_note
from launch.netif import AutoIfname
from launch.vllm_versions import Target

EnvValue = str | AutoIfname

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")
"""One interface for all three bootstraps: a mismatch is the classic multi-node hang."""

@dataclass(frozen=True)
class NodePlan:
    layout: NodeLayout
    target: Target
    argv: list[str]
    env: dict[str, EnvValue]
    path_prepend: dict[str, list[str]] = field(default_factory=dict)
    """PYTHONPATH / LD_LIBRARY_PATH entries put before whatever the node already has."""
    notes: list[str] = field(default_factory=list)
    log_file: str | None = None
    group: str | None = None
    """prefill / decode in a disaggregated deployment."""
    ray_head: list[str] | None = None
    """data_parallel_backend ray, primary: the Ray head started before vLLM (vLLM waits for every node)."""
    ray_nodes: int = 0
    """data_parallel_backend ray, primary: how many nodes the Ray cluster must have before vLLM starts."""

    @property
    def title(self) -> str:
        lay = self.layout
        ranks = f"{lay.start_rank}..{lay.start_rank + lay.data_parallel_size_local - 1}"
        where = f" {lay.node_address}" if lay.node_address else ""
        group = f"{self.group} " if self.group else ""
        return f"{group}node {lay.node_rank} ({lay.role}{where}): DP ranks {ranks} of {lay.data_parallel_size}"


def build(
    config: DeployConfig,
    layout: NodeLayout,
    target: Target,
    stack: StackPaths,
    *,
    all2all_backend: str | None = None,
    passthrough: list[str] | None = None,
) -> NodePlan:
    """The plan for one node. ``all2all_backend`` overrides the deploy file's (an exported VLLM_ALL2ALL_BACKEND)."""
    notes: list[str] = [f"target {target.describe()}"]
    backend = all2all_backend or config.all2all_backend
    if backend:  # a name vLLM's config silently replaces is planned as what it becomes
        choice = target.choose_backend(backend)
        backend = choice.used
        notes += [choice.note] if choice.note else []
    notes += matrix.check(config, layout, target, backend, passthrough)
    if note := api_server_note(layout, target):
        notes.append(note)

    env: dict[str, EnvValue] = {}
    env.update(stack.env)
    chosen = config.ifname(layout.node_rank) if layout.node_rank < len(config.nodes) else config.network.socket_ifname
    iface: EnvValue
    if chosen == "auto":
        iface = AutoIfname(layout.node_address, towards=False) if layout.node_address else AutoIfname(layout.primary_address, towards=True)
    else:
        iface = chosen
    for var in IFNAME_VARS:
        env[var] = iface

    env.update(fabric_env(config.network, backend, across_nodes=matrix.across_nodes(config, layout),
                          ucx=kv_over_ucx(config.vllm_args)))
    env.update(config.network.nccl)
    env.update(config.network.nvshmem)
    env.update(config.network.efa)
    if backend and not target.all2all_as_flag:
        env["VLLM_ALL2ALL_BACKEND"] = backend
    env.update(config.env)
    if layout.node_rank < len(config.nodes):
        env.update(config.nodes[layout.node_rank].env)

    log_file = f"{config.log_dir}/node-{layout.node_rank}.log" if config.log_dir else None
    ray = config.data_parallel_backend == "ray"
    if ray and layout.role == "secondary":
        # With Ray, vLLM runs on the primary only; this node lends its GPUs to the primary's Ray cluster.
        argv = ["ray", "start", "--address", f"{layout.primary_address}:{config.ray_port}", "--block"]
        if layout.node_address:
            argv[-1:-1] = ["--node-ip-address", layout.node_address]
        notes.append("Ray worker: vLLM's data parallel engines are placed here by the primary's Ray cluster")
        return NodePlan(layout, target, argv, env, stack.as_prepend(), notes, log_file)
    argv = ["vllm", "serve", config.model, *_parallel_args(config, layout)]
    if backend and target.all2all_as_flag:
        argv += ["--all2all-backend", backend]
    if layout.role == "primary":
        if config.host:
            argv += ["--host", config.host]
        if config.port != 8000:
            argv += ["--port", str(config.port)]
    if config.trust_remote_code:
        argv.append("--trust-remote-code")
    argv += list(config.vllm_args) + list(passthrough or [])

    head = None
    if ray:
        # vLLM hands its own NCCL_*, UCX_*, VLLM_*, HF_* variables to every engine it places through Ray (its
        # ray_env carry-over, logged at start): those must suit every node, interface names included.
        notes.append("Ray: vLLM copies this node's NCCL_*, UCX_*, VLLM_* and HF_* variables to every engine it places")
        head = ["ray", "start", "--head", "--port", str(config.ray_port), "--node-ip-address", layout.primary_address, "--block"]
    return NodePlan(layout, target, argv, env, stack.as_prepend(), notes, log_file,
                    ray_head=head, ray_nodes=len(config.nodes) if ray else 0)


def _parallel_args(config: DeployConfig, layout: NodeLayout) -> list[str]:
    # Same order as the guide's scripts, so plans diff cleanly against them.
    args = ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.enable_expert_parallel:
        args.append("--enable-expert-parallel")
    args += ["--data-parallel-size", str(layout.data_parallel_size),
             "--data-parallel-size-local", str(layout.data_parallel_size_local)]
    if config.data_parallel_backend == "ray":
        args += ["--data-parallel-backend", "ray"]
    if layout.role == "secondary":
        # Only headless secondaries get a start rank: on a node with API servers it would switch on
        # vLLM's hybrid load balancing instead.
        args += ["--data-parallel-start-rank", str(layout.start_rank)]
    args += ["--data-parallel-address", layout.primary_address,
             "--data-parallel-rpc-port", str(layout.rpc_port)]
    if layout.role == "primary":
        args += ["--api-server-count", str(layout.api_server_count)]
    else:
        args.append("--headless")
    return args
