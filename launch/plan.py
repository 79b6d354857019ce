"""The per-node plan: what one node runs, as typed facts, and the environment it runs with. Pure: no I/O.

    request -> resolve (launch/resolve.py) -> NodePlan per node -> printed | checked | run

A plan keeps its facts as fields (kind, API endpoint, coordinator, all2all backend, KV transfer, Ray
head); the `vllm serve` / `ray start` argv is derived from them, so nothing downstream parses it back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from packaging.version import Version

from env.paths import StackPaths
from launch import eplb_dbo, fabric, matrix, vllm_flags
from launch.config import DeployConfig
from launch.fabric import fabric_env, kv_over_ucx
from launch.layout import NodeLayout, api_server_note
from launch.netif import AutoIfname
from launch.peers import WatchPlan, plan_for
from launch.vllm_versions import Target

EnvValue = str | AutoIfname

ENGINE_READY_SINCE = Version("0.14.0")
"""First release whose vllm/envs.py reads VLLM_ENGINE_READY_TIMEOUT_S (read in the 0.10.1.1 .. 0.34.0 wheels:
absent up to 0.13.0; 0.14.0 envs.py line 619, used by v1/engine/core_client.py)."""
IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")
"""One interface for all three bootstraps: a mismatch is the classic multi-node hang."""

Kind = Literal["vllm", "ray-worker"]
"""vllm: `vllm serve` (primary, or a headless secondary); ray-worker: `ray start --address` lending this node's
GPUs to the primary's Ray cluster (data_parallel_backend ray)."""
_ANY = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Endpoint:
    """host:port, and where a client on the node reaches it."""

    host: str
    port: int

    def url(self, path: str = "") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RayHead:
    """data_parallel_backend ray, primary: the Ray head started before vLLM, and the nodes it waits for."""

    address: str
    port: int
    nodes: int

    @property
    def argv(self) -> list[str]:
        return ["ray", "start", "--head", "--port", str(self.port), "--node-ip-address", self.address, "--block"]

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.address, self.port)


@dataclass(frozen=True)
class NodePlan:
    layout: NodeLayout
    target: Target
    kind: Kind
    model: str
    env: dict[str, EnvValue]
    stack: StackPaths | None = None
    """The stack's PYTHONPATH / LD_LIBRARY_PATH (put before whatever the node has) and its variables (NVSHMEM_DIR,
    CUDA_HOME), as computed where the plan is made. Rendered scripts compute them on the node instead
    (`python -m env paths`); `serve` makes its plan on the node."""
    notes: list[str] = field(default_factory=list)
    log_file: str | None = None
    group: str | None = None
    """prefill / decode in a disaggregated deployment."""
    all2all_backend: str | None = None
    """Given to vLLM as --all2all-backend, or as VLLM_ALL2ALL_BACKEND where the target predates the flag."""
    api: Endpoint | None = None
    """The OpenAI API on the primary: where it binds (host) and where a client on the node reaches it."""
    api_bind: str | None = None
    """--host: the address the API binds to; None: vLLM's default."""
    coordinator: Endpoint | None = None
    """What this node joins: the data parallel coordinator (--data-parallel-address / -rpc-port) or, for a
    Ray worker, the primary's Ray head."""
    kv_transfer: dict | None = None
    """vLLM's --kv-transfer-config (a prefill / decode group)."""
    ray_head: RayHead | None = None
    node_address: str | None = None
    profile: str = "current"
    """The stack profile (EP_STACK_PROFILE) whose paths the node gets."""
    tensor_parallel_size: int = 1
    expert_parallel: bool = True
    trust_remote_code: bool = False
    data_parallel_backend: str = "mp"
    feature_args: tuple[str, ...] = ()
    """EPLB and dual-batch overlap as the target's flags (launch/eplb_dbo.py)."""
    vllm_args: tuple[str, ...] = ()
    """Extra `vllm serve` arguments, last: the deploy file's vllm_args, then those after `--`."""
    watch: WatchPlan | None = None
    """Where this node's launcher answers while vLLM runs, and the nodes it watches (launch/peers.py)."""

    @property
    def unset(self) -> tuple[str, ...]:
        """Inherited variables that would override the plan. vLLM 0.14-0.15 let an exported VLLM_ALL2ALL_BACKEND
        win over --all2all-backend (vllm/config/parallel.py, `envs.is_set`; see launch/vllm_facts.json)."""
        if self.all2all_backend and self.target.all2all_as_flag and self.target.reads_all2all_env:
            return ("VLLM_ALL2ALL_BACKEND",)
        return ()

    @property
    def path_prepend(self) -> dict[str, list[str]]:
        return self.stack.as_prepend() if self.stack else {}

    @property
    def ray_nodes(self) -> int:
        return self.ray_head.nodes if self.ray_head else 0

    @property
    def argv(self) -> list[str]:
        """The command, derived from the fields."""
        if self.kind == "ray-worker":
            assert self.coordinator is not None
            argv = ["ray", "start", "--address", str(self.coordinator)]
            if self.node_address:
                argv += ["--node-ip-address", self.node_address]
            return [*argv, "--block"]
        argv = ["vllm", "serve", self.model, *self._parallel_args()]
        if self.all2all_backend and self.target.all2all_as_flag:
            argv += ["--all2all-backend", self.all2all_backend]
        argv += list(self.feature_args)
        if self.api is not None:
            if self.api_bind is not None:
                argv += ["--host", self.api_bind]
            if self.api.port != 8000:  # vLLM's default (vllm/entrypoints/openai/cli_args.py: port: int = 8000)
                argv += ["--port", str(self.api.port)]
        if self.trust_remote_code:
            argv.append("--trust-remote-code")
        argv += list(self.vllm_args)
        if self.kv_transfer is not None:
            argv += ["--kv-transfer-config", json.dumps(self.kv_transfer, separators=(",", ":"))]
        return argv

    def _parallel_args(self) -> list[str]:
        # Same order as the guide's scripts, so plans diff cleanly against them.
        lay = self.layout
        args = ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.expert_parallel:
            args.append("--enable-expert-parallel")
        args += [
            "--data-parallel-size",
            str(lay.data_parallel_size),
            "--data-parallel-size-local",
            str(lay.data_parallel_size_local),
        ]
        if self.data_parallel_backend == "ray":
            args += ["--data-parallel-backend", "ray"]
        if lay.role == "secondary":
            # Only headless secondaries get a start rank: on a node with API servers it would switch on
            # vLLM's hybrid load balancing instead.
            args += ["--data-parallel-start-rank", str(lay.start_rank)]
        args += ["--data-parallel-address", lay.primary_address, "--data-parallel-rpc-port", str(lay.rpc_port)]
        if lay.role == "primary":
            args += ["--api-server-count", str(lay.api_server_count)]
        else:
            args.append("--headless")
        return args

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
    kv_transfer: dict | None = None,
    feature_args: list[str] | None = None,
    group: str | None = None,
) -> NodePlan:
    """The plan for one node. ``all2all_backend`` overrides the deploy file's (an exported VLLM_ALL2ALL_BACKEND);
    ``passthrough`` are the arguments after ``--`` (launcher-owned flags already taken out by launch/request.py);
    ``feature_args`` the eplb: / dbo: flags when already made (launch/resolve.py makes them once per deployment,
    naming the file in errors), else made here from ``config``; ``group`` the prefill / decode group it serves."""
    notes: list[str] = [f"target {target.describe()}"]
    backend = all2all_backend or config.all2all_backend
    if backend:  # a name vLLM's config silently replaces is planned as what it becomes
        choice = target.choose_backend(backend)
        backend = choice.used
        notes += [choice.note] if choice.note else []
    notes += matrix.check(config, layout, target, backend, passthrough, kv_transfer)
    if config.network.transport == "efa":
        mine = config.nodes[layout.node_rank].env if layout.node_rank < len(config.nodes) else {}
        notes += fabric.efa_advice(
            {"network.nccl": config.network.nccl, "network.efa": config.network.efa, "env": config.env}
            | {f"nodes[{layout.node_rank}].env": mine}
        )
    if note := api_server_note(layout, target):
        notes.append(note)

    env: dict[str, EnvValue] = {}
    chosen = config.ifname(layout.node_rank) if layout.node_rank < len(config.nodes) else config.network.socket_ifname
    iface: EnvValue
    if chosen == "auto":
        iface = (
            AutoIfname(layout.node_address, towards=False)
            if layout.node_address
            else AutoIfname(layout.primary_address, towards=True)
        )
    else:
        iface = chosen
    for var in IFNAME_VARS:
        env[var] = iface

    env.update(
        fabric_env(
            config.network, backend, across_nodes=matrix.across_nodes(config, layout), ucx=kv_over_ucx(kv_transfer)
        )
    )
    env.update(config.network.nccl)
    env.update(config.network.nvshmem)
    env.update(config.network.efa)
    if backend and not target.all2all_as_flag:
        env["VLLM_ALL2ALL_BACKEND"] = backend
    if config.engine_ready_timeout_s:
        if target.version < ENGINE_READY_SINCE:
            notes.append(
                f"warning: engine_ready_timeout_s: vLLM {target.version} does not read VLLM_ENGINE_READY_TIMEOUT_S "
                f"(read from {ENGINE_READY_SINCE}): set, but without effect"
            )
        env["VLLM_ENGINE_READY_TIMEOUT_S"] = str(config.engine_ready_timeout_s)
    env.update(config.env)
    if layout.node_rank < len(config.nodes):
        env.update(config.nodes[layout.node_rank].env)
    # A secret given as a vLLM flag travels as the variable vLLM reads it from (launch/vllm_flags.py); a flag
    # took precedence over the variable in vLLM, so it does here too.
    secrets, args = vllm_flags.secrets_to_env(list(config.vllm_args), "vllm_args")
    given, more = vllm_flags.secrets_to_env(list(passthrough or ()), "--")
    env.update({**secrets, **given})
    args += more

    # a prefill and a decode group both have a node 0: each group's nodes log to their own files
    log_file = f"{config.log_dir}/{group + '-' if group else ''}node-{layout.node_rank}.log" if config.log_dir else None
    watch = plan_for(config, layout)
    notes += [watch.note] if watch else []
    common = dict(
        layout=layout,
        target=target,
        model=config.model,
        env=env,
        stack=stack,
        log_file=log_file,
        node_address=layout.node_address,
        all2all_backend=backend,
        watch=watch,
    )
    ray = config.data_parallel_backend == "ray"
    if ray and layout.role == "secondary":
        # With Ray, vLLM runs on the primary only; this node lends its GPUs to the primary's Ray cluster.
        notes.append("Ray worker: vLLM's data parallel engines are placed here by the primary's Ray cluster")
        return NodePlan(
            kind="ray-worker", notes=notes, coordinator=Endpoint(layout.primary_address, config.ray_port), **common
        )
    api = bind = None
    if layout.role == "primary":
        bind = config.host
        api = Endpoint("127.0.0.1" if bind in (None, *_ANY) else bind, config.port)
    head = None
    if ray:
        # vLLM hands its own NCCL_*, UCX_*, VLLM_*, HF_* variables to every engine it places through Ray (its
        # ray_env carry-over, logged at start): those must suit every node, interface names included.
        notes.append("Ray: vLLM copies this node's NCCL_*, UCX_*, VLLM_* and HF_* variables to every engine it places")
        head = RayHead(layout.primary_address, config.ray_port, len(config.nodes))
    return NodePlan(
        kind="vllm",
        notes=notes,
        api=api,
        api_bind=bind,
        coordinator=Endpoint(layout.primary_address, layout.rpc_port),
        kv_transfer=kv_transfer,
        ray_head=head,
        tensor_parallel_size=config.tensor_parallel_size,
        expert_parallel=config.enable_expert_parallel,
        trust_remote_code=config.trust_remote_code,
        data_parallel_backend=config.data_parallel_backend,
        feature_args=tuple(
            feature_args
            if feature_args is not None
            else eplb_dbo.args(config, target, all2all_backend or config.all2all_backend, layout.data_parallel_size)
        ),
        vllm_args=tuple(args),
        **common,
    )
