"""The deploy file: one YAML document that describes the whole cluster.

Every node runs the same file with its own ``--node-rank``; everything that can be derived (data
parallel size, start ranks, local sizes, API server count) is computed from the node list, never typed.
Loading either returns a validated :class:`DeployConfig` or raises :class:`ConfigError` whose message
is one line: ``FILE: FIELD: what was expected``.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from launch import vllm_flags, yaml_safe
from launch.errors import ConfigError

Transport = Literal["ib", "roce", "efa", "tcp"]
"""How the nodes reach each other: InfiniBand, RoCE, AWS EFA, or plain TCP sockets."""

SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "API_KEY", "PRIVATE_KEY", "CREDENTIAL")
"""An environment variable whose name contains one of these is shown as ``***`` in plans and logs."""


RAY_WORKER_PORTS = (10002, 19999)
"""Ray's default --min-worker-port / --max-worker-port: its head refuses a port of its own in there."""


_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> bool:
    """No control characters. Deploy-file strings land on #SBATCH lines, in comments and in scripts, where a
    newline would start a line of its own."""
    return not _CONTROL.search(text)


def _env_names(value: dict[str, str]) -> dict[str, str]:
    """Keys become `export NAME=...` lines and process environments: shell variable names only."""
    for key in value:
        if not _ENV_NAME.fullmatch(key):
            raise _FieldError(key, "expected a shell variable name ([A-Za-z_][A-Za-z0-9_]*)")
    return value


EnvVars = Annotated[dict[str, str], AfterValidator(_env_names)]
"""Environment variables a deploy file sets: names a shell can export."""


def _refuse_control(data: Any, where: str) -> None:
    """Every key and string value of the parsed file is one line of printable text (see ``printable``)."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        path = f"{where}[{key}]" if isinstance(data, list) else f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and not printable(key):
            raise _FieldError(path, "a key with control characters (expected one line of printable text)")
        if isinstance(value, str) and not printable(value):
            shown = "the value" if isinstance(key, str) and is_secret(key) else yaml_safe.excerpt(value)
            raise _FieldError(path, f"{shown} has control characters (expected one line of printable text)")
        _refuse_control(value, path)


def _is_address(value: str) -> bool:
    """An IPv4 / IPv6 address, or a host name as RFC 1123 section 2.1 allows (labels of letters, digits
    and inner hyphens, at most 63 characters each, 253 in all)."""
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    name = value.removesuffix(".")
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split("."))


def _address(value: str) -> str:
    if not _is_address(value):
        raise ValueError(
            f"{value!r} is neither an IP address nor a host name (expected e.g. 10.0.0.1 or gpu-01.cluster)"
        )
    return value


Address = Annotated[str, AfterValidator(_address)]
"""An IP address or a host name (node addresses, the API's and the router's bind addresses)."""
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,14}")


def _ifname(value: str) -> str:
    if value != "auto" and not _IFNAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a network interface name (expected auto, or one name of at most 15 letters, digits "
            "and . _ - : @, e.g. eth0 or ens8f0np0)"
        )
    return value


Ifname = Annotated[str, AfterValidator(_ifname)]
"""One interface name (GLOO_SOCKET_IFNAME takes exactly one), or ``auto``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Node(_Strict):
    """One machine of the cluster."""

    address: Address | None = None
    """The address the other nodes reach this node at (IPv4/IPv6 or a host name). Left out when a scheduler
    places the nodes (`plan --format slurm` / `k8s`): the allocation's addresses are filled in at run time."""
    gpus: int = Field(default=8, ge=1, le=64)
    """GPUs this node has."""
    data_parallel_size_local: int | None = Field(default=None, ge=1)
    """Data parallel ranks on this node; default: gpus / tensor_parallel_size."""
    socket_ifname: Ifname | None = None
    """Overrides network.socket_ifname for this node (nodes whose NIC names differ)."""
    env: EnvVars = {}
    """Extra environment for this node only (applied after the cluster-wide env)."""
    gpu_ids: list[int] | None = None
    """Which GPUs of the node this entry uses (CUDA_VISIBLE_DEVICES); needed when two groups share a node."""

    @model_validator(mode="after")
    def _gpu_ids(self) -> Node:
        ids = self.gpu_ids
        if ids is None:
            return self
        if any(i < 0 for i in ids):
            raise _FieldError("gpu_ids", f"{min(ids)} is negative (expected GPU indices 0, 1, ...)")
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise _FieldError("gpu_ids", f"GPU {twice[0]} is listed twice (expected each GPU once)")
        if len(ids) != self.gpus:
            raise _FieldError("gpu_ids", f"{len(ids)} GPUs for gpus: {self.gpus} (expected {self.gpus} ids)")
        return self


class Network(_Strict):
    """How the nodes talk: transport and the socket interface NCCL, Gloo and NVSHMEM bootstrap use."""

    transport: Transport = "ib"
    socket_ifname: Ifname = "auto"
    """Interface name, or ``auto``: the interface that holds the node's address, found on the node."""
    nccl: EnvVars = {}
    """Extra NCCL_* variables, applied after the transport's defaults."""
    nvshmem: EnvVars = {}
    """Extra NVSHMEM_* variables, applied after the transport's defaults."""
    efa: EnvVars = {}
    """Extra FI_* (libfabric) variables; only for transport efa."""
    hcas: list[str] = []
    """InfiniBand / RoCE devices to use, exact names (``mlx5_0`` or ``mlx5_0:1``); one list for NCCL, NVSHMEM and
    UCX (launch/fabric.py writes each library's syntax). Default: each library picks its own."""
    gid_index: int | None = Field(default=None, ge=0)
    """RoCE: the GID index NCCL and NVSHMEM both use. Default: both pick a RoCE v2 GID themselves."""

    @field_validator("hcas")
    @classmethod
    def _device_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+(:[0-9]+)?", name):
                raise ValueError(f"{name!r} is not a device name (expected e.g. mlx5_0 or mlx5_0:1, one per entry)")
        return value

    @field_validator("nccl", "nvshmem", "efa")
    @classmethod
    def _prefixed(cls, value: dict[str, str], info: pydantic.ValidationInfo) -> dict[str, str]:
        prefix = {"nccl": "NCCL_", "nvshmem": "NVSHMEM_", "efa": "FI_"}[info.field_name]
        for key in value:
            if not key.startswith(prefix):
                raise ValueError(f"expected variable names starting with {prefix}, got {key!r}")
        return value

    @model_validator(mode="after")
    def _efa_only_on_efa(self) -> Network:
        if self.efa and self.transport != "efa":
            raise ValueError(f"efa settings given but transport is {self.transport!r} (expected transport: efa)")
        return self


class Preflight(_Strict):
    """Preflight threshold overrides; a value left out is the check's default, or derived from the GPU model /
    transport by the check (preflight/thresholds.py lists the defaults)."""

    shm_min_gib: float | None = Field(default=None, ge=0)
    """/dev/shm size (vLLM's API servers and NCCL's shared memory transport use it)."""
    gpu_memory_used_max_mib: float | None = Field(default=None, ge=0)
    """Memory in use on a GPU before vLLM starts (another process holds it otherwise)."""
    ib_rate_min_gbps: float | None = Field(default=None, ge=0)
    """Rate of every active InfiniBand / RoCE port."""
    intra_allreduce_busbw_min_gbps: float | None = Field(default=None, ge=0)
    """All-reduce bus bandwidth between this node's GPUs at the largest size."""
    intra_alltoall_busbw_min_gbps: float | None = Field(default=None, ge=0)
    """All-to-all bus bandwidth between this node's GPUs at the largest size."""
    inter_allreduce_busbw_min_gbps: float | None = Field(default=None, ge=0)
    """All-reduce bus bandwidth across nodes at the largest size."""
    inter_alltoall_busbw_min_gbps: float | None = Field(default=None, ge=0)
    """All-to-all bus bandwidth across nodes at the largest size."""
    collective_timeout_s: float | None = Field(default=None, ge=0)
    """Longest a collective check may take before it counts as hung."""
    rendezvous_timeout_s: float | None = Field(default=None, ge=0)
    """Longest the primary waits for every node to join."""
    ep_timeout_s: float | None = Field(default=None, ge=0)
    """Longest the EP kernel check may take (NVSHMEM start, DeepEP v2's kernel compilation included)."""
    ep_bandwidth_min_gbps: float | None = Field(default=None, ge=0)
    """EP dispatch + combine bandwidth per rank, as DeepEP's tests compute it."""
    ep_memory_reserve_gib: float | None = Field(default=None, ge=0)
    """GPU memory the EP budget keeps for CUDA graphs and activations it does not count."""

    def given(self) -> dict[str, float]:
        return self.model_dump(exclude_none=True)


class Connector(_Strict):
    """How decode gets the prefill's KV cache."""

    name: Literal["NixlConnector"]
    backend: Literal["UCX", "LIBFABRIC"] = "UCX"
    """NIXL's transport: UCX (InfiniBand / RoCE / TCP), LIBFABRIC (AWS EFA)."""
    side_channel_port: int = Field(default=5600, ge=1, le=65000)
    """NIXL's handshake port (VLLM_NIXL_SIDE_CHANNEL_PORT); decode uses this + 64 where groups share a node."""
    ucx_net_devices: str | None = None
    ucx_tls: str | None = None


EplbSettings = dict[str, int | float | bool | str]
"""EPLB's settings by the names of the target release's EPLBConfig (num_redundant_experts, window_size,
step_interval, log_balancedness, ...; docs/vllm-versions.md lists them per release)."""


class DualBatchOverlap(_Strict):
    """vLLM's dual-batch overlap (--enable-dbo): two micro-batches, one computing while the other communicates."""

    decode_token_threshold: int | None = Field(default=None, ge=1)
    """Batches of at least this many tokens are split when decoding (--dbo-decode-token-threshold)."""
    prefill_token_threshold: int | None = Field(default=None, ge=1)
    """The same for batches holding a prefill (--dbo-prefill-token-threshold)."""


def _switch(value: Any) -> Any:
    """`eplb: true` / `dbo: true`: on with vLLM's defaults; false: off."""
    return {} if value is True else None if value is False else value


class Group(_Strict):
    """One vLLM deployment of the disaggregated pair (prefill or decode): its own nodes and layout."""

    nodes: list[Node] = Field(min_length=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    api_server_count: int | None = Field(default=None, ge=1)
    all2all_backend: str | None = None
    port: int = Field(ge=1, le=65535)
    rpc_port: int = Field(ge=1, le=65535)
    vllm_args: list[str] = []
    env: EnvVars = {}
    eplb: EplbSettings | None = None
    dbo: DualBatchOverlap | None = None

    _switches = field_validator("eplb", "dbo", mode="before")(lambda cls, value: _switch(value))


class Router(_Strict):
    """vllm-router in front of both groups."""

    port: int = Field(default=8000, ge=1, le=65535)
    address: Address | None = None
    """The machine it runs on; default: the prefill group's primary."""
    host: Address = "0.0.0.0"
    policy: str = "round_robin"
    metrics_port: int | None = Field(default=29000, ge=1, le=65535)
    """vllm-router's Prometheus endpoint (--prometheus-port), bound on ``host`` like its API so that a scraper
    on another machine reaches it; null: vllm-router's own default, 127.0.0.1:29000 (this machine only)."""


class Disaggregation(_Strict):
    connector: Connector | None = None
    prefill: Group
    decode: Group
    router: Router = Router()


def _command_line(value: str) -> str:
    try:
        words = shlex.split(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} does not split into words ({exc})") from None
    if not words:
        raise ValueError("empty (expected how to run Python, e.g. python)")
    return value


SlurmStep = Literal["preflight", "serve", "plan", "check"]


class Slurm(_Strict):
    """What `plan --format slurm` writes into the sbatch script."""

    job_name: str = Field(default="vllm-ep", pattern=r"^[A-Za-z0-9._-]+$")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    """sbatch --time (e.g. 12:00:00 or 2-00:00:00); default: the partition's."""
    gpus_per_node: int | None = Field(default=None, ge=0)
    """sbatch --gpus-per-node; default: the most GPUs any node lists; 0: ask for none (CPU-only test clusters)."""
    exclusive: bool = True
    """Whole nodes: EP needs every GPU, NIC and the shared memory of the node."""
    output: str = "%x-%j.out"
    sbatch: list[str] = []
    """More sbatch options, one per entry (e.g. --constraint=h200, --reservation=ep)."""
    steps: list[SlurmStep] = Field(default=["preflight", "serve"], min_length=1)
    """What every node runs, in order; a step that fails on any node ends the job."""
    preflight_args: list[str] = []
    """Extra `python -m preflight` arguments for the preflight step (e.g. -m "not model")."""
    python: str = "python"
    """How nodes run the toolkit's Python, e.g. `pixi run --frozen --manifest-path /shared/ep/pixi.toml python`."""

    _python = field_validator("python")(lambda cls, value: _command_line(value))


class Kubernetes(_Strict):
    """What `plan --format k8s` writes: a LeaderWorkerSet (leader = primary, workers = secondaries)."""

    name: str = Field(default="vllm-ep", pattern=r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
    """Name of the LeaderWorkerSet, its ConfigMap and Service (a DNS label, at most 40 characters)."""
    namespace: str | None = None
    image: str | None = None
    """Container image holding the toolkit and its stack (required for --format k8s)."""
    python: str = "python"
    """How the container runs the toolkit's Python."""

    _python = field_validator("python")(lambda cls, value: _command_line(value))
    host_network: bool = True
    """Use the node's network (NICs, RDMA, EFA) directly, as EP needs; False needs an RDMA CNI."""
    rdma_resources: dict[str, int] = {}
    """Extended resources per pod, e.g. {rdma/ib: 1} or {vpc.amazonaws.com/efa: 32}."""
    shm_size: str = Field(default="64Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)?$")
    """Size of /dev/shm (a memory-backed emptyDir)."""
    model_cache: str | None = None
    """A host path mounted at the same path and used as HF_HOME (model weights stay on the node)."""
    node_selector: dict[str, str] = {}
    service_account: str | None = None
    preflight: bool = True
    """Run the node checks (cross-node ones included) in an init container before vLLM starts."""
    restart_policy: Literal["RecreateGroupOnPodRestart", "Default"] = "RecreateGroupOnPodRestart"
    """RecreateGroupOnPodRestart: one failed pod restarts its whole group (an EP group cannot lose a rank)."""
    preflight_args: list[str] = []
    """Extra `python -m preflight` arguments for the init container (e.g. -k "not model")."""
    cpu: str | None = None
    """CPU request and limit per pod (e.g. "96"); with memory, the pod is Guaranteed instead of BestEffort."""
    memory: str | None = None
    """Memory request and limit per pod (e.g. 1500Gi); the memory-backed /dev/shm counts against it."""
    env_from_secret: str | None = None
    """A Secret whose keys become environment variables (HF_TOKEN, ...): secrets stay out of the ConfigMap."""
    pod_annotations: dict[str, str] = {}
    """E.g. k8s.v1.cni.cncf.io/networks for an RDMA network through Multus (host_network: false)."""
    tolerations: list[dict[str, str | int]] = []
    """E.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}] for tainted GPU nodes."""
    termination_grace_s: int = Field(default=120, ge=30)
    """Seconds between SIGTERM and SIGKILL: vLLM's stop (30 s) and, with Ray, the head's drain (up to 45 s)."""
    startup_timeout_s: int = Field(default=3600, ge=60)
    """How long every pod's startup probe waits for the group to serve (weights, compilation, CUDA graphs) before
    Kubernetes restarts it; DeepSeek-size models take tens of minutes."""
    jit_cache: str | None = None
    """A host path kept across restarts for compiled kernels: vLLM's cache (torch.compile), CUDA's, Triton's,
    FlashInfer's, DeepGEMM's and DeepEP v2's JIT caches (each in a folder of its own)."""
    metrics_annotations: bool = True
    """prometheus.io/scrape, /port, /path annotations on the leader pod: vLLM's /metrics on the API port."""

    @field_validator("rdma_resources")
    @classmethod
    def _positive(cls, value: dict[str, int]) -> dict[str, int]:
        bad = [k for k, n in value.items() if n < 1]
        if bad:
            raise ValueError(f"{bad[0]}: {value[bad[0]]} (expected a count of at least 1)")
        return value


class Watch(_Strict):
    """Bare metal: while vLLM runs, every node's launcher answers on a watch port (rpc_port + 1000); the
    primary's launcher watches every secondary's, each secondary's the primary's, and a node that stops
    answering stops the group (launch/peers.py). Jobs placed by Slurm or Kubernetes run without it: they stop
    the group themselves (docs/operations.md)."""

    enabled: bool = True
    startup_grace_s: float = Field(default=900, gt=0)
    """How long a node that has not answered yet may take to start its launcher (nodes start at different times)."""
    lost_after_s: float = Field(default=30, gt=0)
    """How long a node that answered may stay silent before it counts as gone and the group is stopped."""


WATCH_PORT_OFFSET = 1000
"""The watch port is rpc_port + this: derived, so that every node finds every other node's without a setting,
and far enough from rpc_port that the consecutive rpc ports of two groups on one node do not meet there."""


class DeployConfig(_Strict):
    """The whole cluster: model, nodes and how vLLM runs on them."""

    model: str = Field(min_length=1)
    """Hugging Face model id or local path, as `vllm serve` takes it."""
    nodes: list[Node] = []
    """The nodes; the first is the primary (API servers, data parallel coordinator). Left out with
    `disaggregation`, whose groups list their own."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    data_parallel_size: int | None = Field(default=None, ge=1)
    """Optional cross-check: must equal the sum of the nodes' local data parallel sizes."""
    api_server_count: int | None = Field(default=None, ge=1)
    """API server processes on the primary; default: the primary's local data parallel size."""
    rpc_port: int = Field(default=13345, ge=1, le=65535)
    """The primary's data parallel coordination port (--data-parallel-rpc-port)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """The primary's OpenAI-compatible API port."""
    host: Address | None = None
    """Address the API binds to (--host); default: vLLM's own."""
    all2all_backend: str | None = None
    """vLLM's all2all backend (deepep_low_latency, deepep_high_throughput, ...); default: vLLM's."""
    enable_expert_parallel: bool = True
    trust_remote_code: bool = False
    """Pass --trust-remote-code (the guide's scripts always did)."""
    vllm_version: str | None = None
    """The vLLM version the plan targets when vLLM is not installed where the plan is made."""
    network: Network = Network()
    vllm_args: list[str] = []
    """Extra arguments appended to `vllm serve`."""
    env: EnvVars = {}
    """Extra environment for every node (secrets are shown as ***)."""
    eplb: EplbSettings | None = None
    """vLLM's expert-parallel load balancer (--enable-eplb) with these settings; `eplb: true` for its defaults."""
    dbo: DualBatchOverlap | None = None
    """Dual-batch overlap (--enable-dbo); `dbo: true` for vLLM's thresholds. Needs a DeepEP or NIXL EP backend."""
    preflight: Preflight = Preflight()
    """Preflight threshold overrides by name (see preflight/thresholds.py)."""
    log_dir: str | None = None
    """Where serve writes each node's log (node-RANK.log); default: the terminal only."""
    engine_ready_timeout_s: int | None = Field(default=None, ge=60)
    """VLLM_ENGINE_READY_TIMEOUT_S on every node: how long vLLM's front end waits for its engines to start
    (vLLM's default, 600 s, is short for DeepSeek-size models loading on many nodes; read from vLLM 0.14.0).
    Default: vLLM's own on bare metal and Slurm, 3000 s on Kubernetes (inside its start-up probes' budget)."""
    disaggregation: Disaggregation | None = None
    """Prefill and decode as two groups joined by a KV connector, behind vllm-router."""
    data_parallel_backend: Literal["mp", "ray"] = "mp"
    """mp: vLLM on every node (secondaries --headless); ray: vLLM on the primary only, the other nodes join its
    Ray cluster (`ray start`), and vLLM places the data parallel engines through Ray."""
    ray_port: int = Field(default=6379, ge=1, le=65535)
    """The Ray head's port on the primary (data_parallel_backend: ray)."""
    slurm: Slurm = Slurm()
    kubernetes: Kubernetes = Kubernetes()
    watch: Watch = Watch()
    """Launchers watch each other while vLLM runs; a node that stops answering stops the group."""

    _switches = field_validator("eplb", "dbo", mode="before")(lambda cls, value: _switch(value))

    @model_validator(mode="after")
    def _one_engine_bound(self) -> DeployConfig:
        if self.engine_ready_timeout_s is None:
            return self
        given = [("env", self.env)] + [(f"nodes[{i}].env", n.env) for i, n in enumerate(self.nodes)]
        for where, env in given:
            if "VLLM_ENGINE_READY_TIMEOUT_S" in env:
                raise _FieldError(
                    f"{where}.VLLM_ENGINE_READY_TIMEOUT_S",
                    "also set by engine_ready_timeout_s (expected one of the two)",
                )
        return self

    @model_validator(mode="after")
    def _cross_checks(self) -> DeployConfig:
        _check_vllm_args(self.vllm_args, "vllm_args")
        if self.disaggregation is not None:
            if self.nodes:
                raise _FieldError(
                    "nodes",
                    "given together with disaggregation (expected the nodes under disaggregation.prefill / .decode)",
                )
            # Each group has its own sizes, ports and backend: a top-level one would be read by neither.
            # (compared with the defaults, not "was it typed": a placed or overridden copy is dumped in full)
            for name in sorted(n for n in GROUP_OWNED if getattr(self, n) != DeployConfig.model_fields[n].default):
                raise _FieldError(
                    name,
                    f"set at the top of a file with disaggregation, where no group reads it (expected "
                    f"disaggregation.prefill.{name} and disaggregation.decode.{name})",
                )
            _check_disaggregation(self.disaggregation, self.watch.enabled)
            return self
        if not self.nodes:
            raise _FieldError("nodes", "missing (required: at least one node, or a disaggregation section)")
        seen: dict[str, int] = {}
        for rank, node in enumerate(self.nodes):
            if node.address is None:
                pass
            elif node.address in seen:
                raise _FieldError(
                    f"nodes[{rank}].address",
                    f"{node.address!r} is already nodes[{seen[node.address]}]'s address (expected one entry per node)",
                )
            else:
                seen[node.address] = rank
            if node.gpus % self.tensor_parallel_size:
                raise _FieldError(
                    f"nodes[{rank}].gpus",
                    f"{node.gpus} GPUs do not divide by tensor_parallel_size {self.tensor_parallel_size}",
                )
            most = node.gpus // self.tensor_parallel_size
            if node.data_parallel_size_local is not None and node.data_parallel_size_local > most:
                raise _FieldError(
                    f"nodes[{rank}].data_parallel_size_local",
                    f"{node.data_parallel_size_local} ranks x tensor_parallel_size {self.tensor_parallel_size} "
                    f"need more than the {node.gpus} GPUs listed (expected at most {most})",
                )
        total = sum(self.local_dp(rank) for rank in range(len(self.nodes)))
        if self.data_parallel_size is not None and self.data_parallel_size != total:
            raise _FieldError(
                "data_parallel_size",
                f"{self.data_parallel_size} but the nodes add up to {total} ranks (expected {total}, or leave it out)",
            )
        if self.port == self.rpc_port:
            raise _FieldError("port", f"{self.port} is also rpc_port (expected two different ports)")
        if self.watch.enabled and (taken := _watch_clash(self.watch_port, {"port": self.port, **self._ray_port()})):
            raise _FieldError("rpc_port", taken)
        if self.data_parallel_backend == "ray" and self.ray_port in (self.port, self.rpc_port):
            raise _FieldError("ray_port", f"{self.ray_port} is also port or rpc_port (expected a third port)")
        if self.data_parallel_backend == "ray" and RAY_WORKER_PORTS[0] <= self.ray_port <= RAY_WORKER_PORTS[1]:
            low, high = RAY_WORKER_PORTS
            raise _FieldError(
                "ray_port",
                f"{self.ray_port} is inside Ray's worker port range {low}-{high} (expected a port outside it, e.g. 6379)",
            )
        return self

    def group(self, name: str) -> DeployConfig:
        """The prefill or decode group as a deploy config of its own (what plan, check and serve take)."""
        d = self.disaggregation
        assert d is not None and d.connector is not None
        group: Group = getattr(d, name)
        connector = d.connector
        offset = 0 if name == "prefill" else 64  # per-rank side-channel ports of two groups never meet
        nixl_env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(connector.side_channel_port + offset)}
        if connector.ucx_net_devices:
            nixl_env["UCX_NET_DEVICES"] = connector.ucx_net_devices
        if connector.ucx_tls:
            nixl_env["UCX_TLS"] = connector.ucx_tls
        nodes = []
        for node in group.nodes:
            node_env = {**({"VLLM_NIXL_SIDE_CHANNEL_HOST": node.address} if node.address else {}), **node.env}
            if node.gpu_ids is not None:
                node_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, node.gpu_ids))
            nodes.append(node.model_copy(update={"env": node_env}))
        return DeployConfig.model_validate(
            {
                **self.model_dump(exclude={"disaggregation", "nodes"}),
                "nodes": [n.model_dump() for n in nodes],
                "tensor_parallel_size": group.tensor_parallel_size,
                "api_server_count": group.api_server_count,
                "all2all_backend": group.all2all_backend,
                "port": group.port,
                "rpc_port": group.rpc_port,
                "vllm_args": [*group.vllm_args, *self.vllm_args],
                "eplb": group.eplb,
                "dbo": group.dbo.model_dump() if group.dbo else None,
                "env": {**self.env, **nixl_env, **group.env},
            }
        )

    def kv_transfer(self) -> dict | None:
        """vLLM's --kv-transfer-config for either group (both sides send and receive: kv_both)."""
        d = self.disaggregation
        if d is None or d.connector is None:
            return None
        return {
            "kv_connector": d.connector.name,
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"backends": [d.connector.backend]},
        }

    @property
    def watch_port(self) -> int:
        """Where every node's launcher answers while vLLM runs (launch/peers.py)."""
        return self.rpc_port + WATCH_PORT_OFFSET

    def _ray_port(self) -> dict[str, int]:
        return {"ray_port": self.ray_port} if self.data_parallel_backend == "ray" else {}

    def local_dp(self, rank: int) -> int:
        node = self.nodes[rank]
        return node.data_parallel_size_local or node.gpus // self.tensor_parallel_size

    def ifname(self, rank: int) -> str:
        return self.nodes[rank].socket_ifname or self.network.socket_ifname


GROUP_OWNED = frozenset(
    {
        "tensor_parallel_size",
        "api_server_count",
        "all2all_backend",
        "port",
        "rpc_port",
        "data_parallel_size",
        "eplb",
        "dbo",
    }
)
"""Top-level fields that a prefill / decode group sets for itself (disaggregation.GROUP.FIELD)."""


def _check_vllm_args(args: list[str], where: str) -> None:
    """A flag the launcher sets has its own field: refuse it here rather than pass it twice."""
    try:
        taken, _ = vllm_flags.split(list(args), where)
    except ConfigError as exc:
        raise _FieldError(where, str(exc).removeprefix(f"{where}: ")) from None
    if taken:
        name = next(iter(taken))
        flag = next(f for f, o in vllm_flags.TAKEN.items() if o.field == name)
        raise _FieldError(where, f"{flag}: set by the launcher (expected {name}: in the deploy file, not in {where})")


def _gpus_of(node: Node) -> set[int]:
    return set(node.gpu_ids) if node.gpu_ids is not None else set(range(node.gpus))


def _check_disaggregation(d: Disaggregation, watch: bool) -> None:
    where = "disaggregation"
    if d.connector is None:
        raise _FieldError(
            f"{where}.connector",
            "missing (expected {name: NixlConnector, backend: UCX or LIBFABRIC}: decode needs the prefill's KV cache)",
        )
    groups = {"prefill": d.prefill, "decode": d.decode}
    used: dict[str, list[tuple[str, set[int]]]] = {}
    for gname, group in groups.items():
        _check_vllm_args(group.vllm_args, f"{where}.{gname}.vllm_args")
        seen: set[str] = set()
        for i, node in enumerate(group.nodes):
            field = f"{where}.{gname}.nodes[{i}]"
            if node.address is not None and node.address in seen:
                raise _FieldError(
                    f"{field}.address", f"{node.address!r} twice in the {gname} group (expected one entry per node)"
                )
            seen.add(node.address)
            if node.gpus % group.tensor_parallel_size:
                raise _FieldError(
                    f"{field}.gpus",
                    f"{node.gpus} GPUs do not divide by tensor_parallel_size {group.tensor_parallel_size}",
                )
            if node.address is None:  # placed by a scheduler: a node of its own
                continue
            for other, ids in used.get(node.address, []):
                clash = sorted(ids & _gpus_of(node))
                if clash:
                    raise _FieldError(
                        f"{field}.gpu_ids",
                        f"GPUs {clash} of {node.address} are also used by {other} (expected disjoint gpu_ids per node)",
                    )
            used.setdefault(node.address, []).append((field, _gpus_of(node)))
    p, q = d.prefill, d.decode
    shared = p.nodes[0].address is not None and p.nodes[0].address == q.nodes[0].address
    if shared and p.port == q.port:
        raise _FieldError(
            f"{where}.decode.port",
            f"{q.port} is also the prefill API port on {p.nodes[0].address} (expected another port)",
        )
    if ({n.address for n in p.nodes} & {n.address for n in q.nodes}) - {None} and p.rpc_port == q.rpc_port:
        raise _FieldError(
            f"{where}.decode.rpc_port",
            f"{q.rpc_port} is also the prefill rpc_port on a shared node (expected another port)",
        )
    if watch:  # a group's launchers answer on its rpc_port + 1000, which no other port on their nodes may use
        shared = ({n.address for n in p.nodes} & {n.address for n in q.nodes}) - {None}
        for gname, group in groups.items():
            oname, other = ("decode", q) if gname == "prefill" else ("prefill", p)
            taken = {"port": group.port}
            if shared:
                taken |= {f"the {oname} rpc_port": other.rpc_port, f"the {oname} API port": other.port}
            if why := _watch_clash(group.rpc_port + WATCH_PORT_OFFSET, taken):
                raise _FieldError(f"{where}.{gname}.rpc_port", why)
    router_at = d.router.address or p.nodes[0].address
    if d.router.metrics_port == d.router.port:
        raise _FieldError(
            f"{where}.router.metrics_port", f"{d.router.port} is also router.port (expected its own port, e.g. 29000)"
        )
    for gname, group in groups.items():
        if router_at is not None and group.nodes[0].address == router_at and group.port == d.router.metrics_port:
            raise _FieldError(
                f"{where}.router.metrics_port",
                f"{d.router.metrics_port} is also the {gname} API port on {router_at} (expected a free port)",
            )
        if router_at is not None and group.nodes[0].address == router_at and group.port == d.router.port:
            raise _FieldError(
                f"{where}.router.port",
                f"{d.router.port} is also the {gname} API port on {router_at} (expected a free port)",
            )


def _watch_clash(watch_port: int, taken: dict[str, int]) -> str | None:
    """Why an rpc_port leaves no watch port (rpc_port + WATCH_PORT_OFFSET) for the launchers, or None."""
    rpc, off = watch_port - WATCH_PORT_OFFSET, "or watch: {enabled: false}"
    if watch_port > 65535:
        most = 65535 - WATCH_PORT_OFFSET
        return f"{rpc} leaves no watch port (rpc_port + {WATCH_PORT_OFFSET}; expected at most {most}, {off})"
    name = next((n for n, port in taken.items() if port == watch_port), None)
    if name:
        return f"{rpc} + {WATCH_PORT_OFFSET} (the launchers' watch port) is also {name} (expected another port, {off})"
    return None


class _FieldError(ValueError):
    """A cross-field error that names its own field (pydantic would name the whole model)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    """Turns one pydantic error into (field path, what was expected)."""
    loc = list(error["loc"])
    # pydantic puts the literal/union branch into loc; drop those (they are not fields).
    loc = [p for p in loc if not (isinstance(p, str) and (p.startswith("function-") or p in ("int", "str", "none")))]
    field = ""
    for part in loc:
        field += f"[{part}]" if isinstance(part, int) else (f".{part}" if field else str(part))
    kind, msg = error["type"], error["msg"]
    given = error.get("input")
    if kind == "extra_forbidden":
        return field, "unknown key"
    if kind == "missing":
        return field, "missing (required)"
    if kind == "value_error":
        return field, msg.removeprefix("Value error, ")
    if kind.startswith("assertion"):
        return field, msg
    shown = "***" if any(isinstance(p, str) and is_secret(p) for p in loc) else yaml_safe.excerpt(given)
    return field, f"{msg[0].lower()}{msg[1:]}, got {shown}"


def _known_keys(config_error_field: str) -> str:
    """Lists the keys allowed where an unknown key was found, for the error message."""
    model: type[BaseModel] = DeployConfig
    for part in config_error_field.split("."):
        part = part.split("[")[0]
        info = model.model_fields.get(part)
        if info is None:
            break
        inner = info.annotation
        args = getattr(inner, "__args__", ())
        nested = [a for a in (inner, *args) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return ", ".join(model.model_fields)


def parse_deploy(data: Any, source: str, *, options: dict[str, str] | None = None) -> DeployConfig:
    """Validates an already-parsed YAML document; ``source`` names it in errors. ``options`` maps a field
    path (``port``, ``disaggregation.decode.port``) to the command-line option that set it, so that an error
    in a value given on the command line names the option instead of the file."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top (model:, nodes:, ...), got {type(data).__name__}")
    try:
        _refuse_control(data, "")
    except _FieldError as exc:
        option = (options or {}).get(exc.field)
        raise ConfigError(
            yaml_safe.shorten(f"{option or source}: {'' if option else exc.field + ': '}{exc.message}")
        ) from None
    try:
        return DeployConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        ctx_error = (first.get("ctx") or {}).get("error")
        field, expected = _describe(first)
        if isinstance(ctx_error, _FieldError):
            field = f"{field}.{ctx_error.field}" if field else ctx_error.field
            expected = ctx_error.message
        elif expected == "unknown key":
            parent = field.rsplit(".", 1)[0] if "." in field else ""
            allowed = _known_keys(parent) if parent else ", ".join(DeployConfig.model_fields)
            expected = f"unknown key (expected one of: {allowed})"
        option = (options or {}).get(field)
        if option:
            raise ConfigError(f"{option}: {yaml_safe.shorten(expected.replace(f'{field}: ', ''))}") from None
        where = field or "(top)"
        raise ConfigError(f"{source}: {yaml_safe.shorten(f'{where}: {expected}')}") from None


def load_deploy(path: str | Path, *, set_aside: dict[str, str] | None = None) -> DeployConfig:
    """Reads and validates a deploy file. With ``set_aside`` (preflight's way), `preflight:` thresholds that are
    not valid are left out of the result and recorded there as {name: one-line error}, so that the suite can
    report them as one failed check and run the rest; every other command refuses them."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            text = f.read(yaml_safe.MAX_CHARS + 1)  # bounded: /dev/zero or a huge file is refused, not read
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the deploy file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: expected UTF-8 text (is this a YAML file?)") from None
    return parse_deploy_text(text, str(path), set_aside=set_aside)


def parse_deploy_text(text: str, source: str, *, set_aside: dict[str, str] | None = None) -> DeployConfig:
    """Validates a deploy file's YAML text; ``source`` names it in errors (``set_aside``: see load_deploy)."""
    if not printable(source):  # the name lands in comments of printed plans and rendered scripts
        raise ConfigError(f"{source!r}: a file name with control characters (expected one line of printable text)")
    try:
        data = yaml_safe.load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: {where}not valid YAML ({problem})") from None
    if set_aside is not None:
        data = _set_aside_thresholds(data, source, set_aside)
    return parse_deploy(data, source)


def _set_aside_thresholds(data: Any, source: str, bad: dict[str, str]) -> Any:
    thresholds = data.get("preflight") if isinstance(data, dict) else None
    if not isinstance(thresholds, dict):
        return data
    kept = {}
    for name, value in thresholds.items():
        try:
            Preflight.model_validate({name: value})
        except pydantic.ValidationError as exc:
            _, expected = _describe(exc.errors(include_url=False)[0])
            if expected == "unknown key":
                expected = f"unknown key (expected one of: {', '.join(Preflight.model_fields)})"
            bad[str(name)] = yaml_safe.shorten(f"{source}: preflight.{name}: {expected}")
            continue
        kept[name] = value
    return {**data, "preflight": kept}


def dump_deploy(config: DeployConfig) -> str:
    """A deploy file's YAML for ``config`` (only what differs from the defaults)."""
    return yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def is_secret(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS)
