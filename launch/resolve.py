"""One resolution: a Request (deploy file or the guide's arguments, plus overrides) -> deployments -> node plans.

    Request -> config (file or guide, overrides validated by the file's own model)
            -> deployments (the cluster, or the prefill / decode groups with their KV transfer)
            -> layouts (roles, ranks) -> the nodes asked for (all, --node-rank, or this machine)
            -> target vLLM, all2all backend -> NodePlan per node (launch/plan.py)

Every consumer calls :func:`resolve`: `plan` prints its plans, `check` hands their argvs to vLLM's
parser, `serve` runs one, preflight (preflight/context.py) checks one, `bench` records them. So an
exported VLLM_ALL2ALL_BACKEND, an override or a group choice gives all of them the same plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from env.paths import StackPaths, stack_paths
from launch import eplb_dbo, netif, plan as planning
from launch.config import DeployConfig, load_deploy, parse_deploy, parse_deploy_text
from launch.errors import ConfigError
from launch.layout import NodeLayout, layouts
from launch.plan import NodePlan
from launch.request import GUIDE_ARGS, Overrides, Request
from launch.vllm_versions import Target, resolve_target

GROUPS = ("prefill", "decode")
_GROUP_FIELDS = ("tensor_parallel_size", "api_server_count", "all2all_backend", "port")
"""Overrides that land in each group's own section of a file with disaggregation."""


@dataclass(frozen=True)
class Deployment:
    """One vLLM deployment: the whole cluster, or one group of a prefill / decode pair."""

    group: str | None
    config: DeployConfig
    """The deployment as a deploy config of its own (a group's nodes, sizes and ports)."""
    kv_transfer: dict | None = None
    """vLLM's --kv-transfer-config for a group (None without disaggregation)."""
    backend: str | None = None
    """The all2all backend: --all2all-backend, else the deploy file's, else VLLM_ALL2ALL_BACKEND."""
    layouts: tuple[NodeLayout, ...] = ()


@dataclass(frozen=True)
class Resolution:
    config: DeployConfig
    """The whole deploy file with the overrides applied (or the config the guide's arguments make)."""
    source: str
    """The deploy file's name, or ``arguments`` for the guide's positional arguments."""
    deployments: tuple[Deployment, ...]
    target: Target
    plans: tuple[NodePlan, ...]


def load(request: Request) -> tuple[DeployConfig, str]:
    """The deploy file the request names (a path, or a scheduler job's copy), not yet overridden."""
    if request.deploy:
        return load_deploy(request.deploy), request.deploy
    if request.deploy_text:
        return parse_deploy_text(request.deploy_text, request.deploy_name), request.deploy_name
    raise ConfigError("deploy file: none given (pass FILE, --deploy FILE, or set EP_DEPLOY)")


def resolve(request: Request, *, loaded: DeployConfig | None = None, stack: StackPaths | None = None) -> Resolution:
    """The plans a request asks for. Serving commands get exactly this node's plan (--node-rank, else the
    node whose address this machine holds); `plan` / `check` every node, or the one --node-rank names.
    ``loaded`` replaces reading the file (scheduler stand-ins); ``stack`` the stack paths (tests)."""
    if request.guide and request.deploy:
        raise ConfigError(f"{request.command}: give either the guide's positional arguments or --deploy, not both")
    guide = request.guide or (request.role in GUIDE_ARGS and not request.deploy and not request.deploy_text)
    if guide:
        config, layout = config_from_guide(request)
        deployments = [Deployment(None, config, layouts=(layout,))]
        source = "arguments"
    else:
        if request.role is not None and request.role not in GUIDE_ARGS and not (request.deploy or request.deploy_text):
            raise ConfigError(f"{request.role}: needs a deploy file (pass --deploy FILE or set EP_DEPLOY)")
        config, source = (loaded, request.deploy or request.deploy_name) if loaded is not None else load(request)
        config = with_overrides(config, request.overrides, source, _group_asked(request))
        deployments = [_pick_nodes(d, request, source) for d in deployments_of(config, request, source)]
    with _naming(source if source != "arguments" and not request.overrides.vllm_version else None):
        target = resolve_target(request.overrides.vllm_version, config.vllm_version)
    notes: list[str] = []
    resolved = []
    for d in deployments:
        backend = request.overrides.all2all_backend or d.config.all2all_backend
        if backend is None and request.exported_backend:
            backend = request.exported_backend
            if not notes:
                notes.append(f"all2all backend {backend} taken from VLLM_ALL2ALL_BACKEND in the environment")
        if backend:
            _check_backend(target, backend, request, source if backend == d.config.all2all_backend else None)
        resolved.append(replace(d, backend=backend))
    stack = stack or stack_paths(request.profile)
    plans = []
    origin = [f"from {source}"] if source != "arguments" else []
    for d in resolved:
        with _naming(source if source != "arguments" else None):
            where = f"disaggregation.{d.group}." if d.group else ""
            dp = d.layouts[0].data_parallel_size if d.layouts else 1
            features = eplb_dbo.args(d.config, target, d.backend, dp, where)
        for lay in d.layouts:
            p = planning.build(
                d.config,
                lay,
                target,
                stack,
                all2all_backend=d.backend,
                passthrough=list(request.vllm_args),
                kv_transfer=d.kv_transfer,
                feature_args=features,
                group=d.group,
            )
            plans.append(replace(p, group=d.group, profile=request.profile, notes=[*p.notes, *notes, *origin]))
    return Resolution(config, source, tuple(resolved), target, tuple(plans))


# ---- the guide's positional arguments ------------------------------------------------------------------
def _int(name: str, text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name}: {value} is out of range (expected {bound})")
    return value


def config_from_guide(request: Request) -> tuple[DeployConfig, NodeLayout]:
    """The guide's six positional arguments as a config (common settings) and this node's layout."""
    role, values = request.role, request.guide
    names = GUIDE_ARGS[role]
    if len(values) != len(names):
        raise ConfigError(
            f"{role}: expected {len(names)} arguments {' '.join(names)} (or --deploy FILE), got {len(values)}"
        )
    node1_ip, rpc_port, model, total_dp, local_dp, last = values
    rpc = _int("RPC_PORT", rpc_port, 1, 65535)
    total = _int("TOTAL_DP", total_dp, 1)
    local = _int("LOCAL_DP", local_dp, 1)
    if local > total:
        raise ConfigError(f"LOCAL_DP: {local} is larger than TOTAL_DP {total} (expected LOCAL_DP <= TOTAL_DP)")
    o = request.overrides
    tp = o.tensor_parallel_size if o.tensor_parallel_size is not None else 1
    if tp < 1:
        raise ConfigError(f"{o.options['tensor_parallel_size']}: input should be greater than or equal to 1, got {tp}")
    data = {
        "model": model,
        "nodes": [{"address": node1_ip, "gpus": local * tp}],
        "tensor_parallel_size": tp,
        "rpc_port": rpc,
        "trust_remote_code": True,  # the guide's scripts always pass it
    }
    options = {"nodes[0].address": "NODE1_IP", "nodes[0].gpus": "LOCAL_DP x tensor parallel size", "model": "MODEL"}
    config = with_overrides(parse_deploy(data, "arguments", options=options), o, "arguments", None)
    if role == "primary":
        layout = NodeLayout("primary", 0, node1_ip, rpc, total, local, 0, _int("API_SERVERS", last, 1), node1_ip)
    else:
        start = _int("START_RANK", last, 0)
        if start + local > total or start == 0:
            raise ConfigError(
                f"START_RANK: {start} with LOCAL_DP {local} is outside TOTAL_DP {total} "
                f"(expected 1..{total - local} for a secondary)"
            )
        layout = NodeLayout("secondary", 1, node1_ip, rpc, total, local, start, None, None)
    return config, layout


# ---- overrides ------------------------------------------------------------------------------------------
def with_overrides(config: DeployConfig, o: Overrides, source: str, group: str | None) -> DeployConfig:
    """Named options win over the deploy file, validated by the same model: an error names the option.

    In a file with disaggregation, a group's own setting (port, tensor_parallel_size, ...) lands in the group
    asked for (--group, serve prefill / decode), or in both groups; the API port only with a group."""
    given = {k: v for k, v in o.given().items() if k != "vllm_version"}
    if not given:
        return config
    data = config.model_dump()
    options: dict[str, str] = {}
    for name, value in given.items():
        flag = o.options.get(name, f"--{name.replace('_', '-')}")
        if name in ("transport", "socket_ifname"):
            data["network"][name] = value
            options[f"network.{name}"] = flag
        elif config.disaggregation is not None and name in _GROUP_FIELDS:
            if name == "port" and group is None:
                raise ConfigError(
                    f"{flag}: {source} has prefill and decode groups, each with its own API port "
                    f"(expected --group prefill or --group decode, or disaggregation.GROUP.port in the file)"
                )
            for g in (group,) if group else GROUPS:
                data["disaggregation"][g][name] = value
                options[f"disaggregation.{g}.{name}"] = flag
        else:
            data[name] = value
            options[name] = flag
    return parse_deploy(data, source, options=options)


# ---- deployments and nodes ------------------------------------------------------------------------------
def _group_asked(request: Request) -> str | None:
    return request.role if request.role in GROUPS else request.group


def deployments_of(config: DeployConfig, request: Request, source: str) -> list[Deployment]:
    """The deployments a command acts on: the cluster, or the prefill / decode group(s)."""
    role, group = request.role, _group_asked(request)
    if config.disaggregation is None:
        if role in GROUPS:
            raise ConfigError(
                f"{source}: disaggregation: missing (serve-{role} needs prefill and decode groups in the deploy file)"
            )
        if group:
            raise ConfigError(f"--group: {source} has no disaggregation section (expected no --group)")
        return [Deployment(None, config, layouts=tuple(layouts(config)))]
    if request.serving and role not in GROUPS:
        raise ConfigError(
            f"{source}: has prefill and decode groups (expected serve-prefill / serve-decode / serve-proxy, "
            f"not {request.command})"
        )
    if request.one_node and group is None:
        raise ConfigError(f"{source}: has prefill and decode groups (expected --group prefill or --group decode)")
    out = []
    for name in (group,) if group else GROUPS:
        cfg = config.group(name)
        out.append(Deployment(name, cfg, config.kv_transfer(), layouts=tuple(layouts(cfg))))
    return out


def _pick_nodes(d: Deployment, request: Request, source: str) -> Deployment:
    cfg = d.config
    wanted = request.node_rank
    if request.one_node:  # exactly this node
        wanted = this_node(cfg, request.node_rank, source, d.group)
        actual = d.layouts[wanted].role
        if request.role in GUIDE_ARGS and actual != request.role:
            raise ConfigError(
                f"--node-rank: node {wanted} of {source} is the {actual}, not a {request.role} "
                f"(expected {'0' if request.role == 'primary' else '1..'})"
            )
    elif wanted is not None:
        this_node(cfg, wanted, source, d.group)
    chosen = tuple(lay for lay in d.layouts if wanted is None or lay.node_rank == wanted)
    for lay in chosen:
        for rank in sorted({0, lay.node_rank}):
            if cfg.nodes[rank].address is None:
                where = f"disaggregation.{d.group}." if d.group else ""
                raise ConfigError(
                    f"{source}: {where}nodes[{rank}].address: missing (needed to plan or run nodes directly; "
                    f"a file without addresses is placed by a scheduler: plan --format slurm or k8s)"
                )
    return replace(d, layouts=chosen)


def this_node(config: DeployConfig, given: int | None, source: str, group: str | None = None) -> int:
    """The rank --node-rank gives, else the one node whose address this machine holds."""
    if given is not None:
        if not 0 <= given < len(config.nodes):
            raise ConfigError(f"--node-rank: {given} is not a node of {source} (expected 0..{len(config.nodes) - 1})")
        return given
    where = f"disaggregation.{group}." if group else ""
    missing = [r for r, n in enumerate(config.nodes) if n.address is None]
    if missing:
        raise ConfigError(
            f"{source}: {where}nodes[{missing[0]}].address: missing (pass --node-rank N; a file without "
            f"addresses is placed by a scheduler: plan --format slurm or k8s)"
        )
    mine = netif.own_rank([n.address for n in config.nodes])
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise ConfigError(f"{source}: no node address belongs to this machine (pass --node-rank N)")
    raise ConfigError(f"{source}: nodes {mine} all belong to this machine (pass --node-rank N)")


def _check_backend(target, backend: str, request: Request, file: str | None) -> None:
    """Refuses a backend the target lacks, naming where the name came from: the option, the exported
    VLLM_ALL2ALL_BACKEND, or the deploy file."""
    option = request.overrides.options.get("all2all_backend") if request.overrides.all2all_backend else None
    origin = option or (file if file and file != "arguments" else None)
    if origin is None and not request.overrides.all2all_backend and backend == request.exported_backend:
        origin = "VLLM_ALL2ALL_BACKEND"
    try:
        target.check_backend(backend)
    except ConfigError as exc:
        if origin is None:
            raise
        text = str(exc) if origin == file else str(exc).removeprefix("all2all_backend: ")
        raise ConfigError(f"{origin}: {text}") from None


@contextmanager
def _naming(source: str | None) -> Iterator[None]:
    """Prefixes a ConfigError with the file the offending value came from."""
    try:
        yield
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(f"{source}: {exc}") from None
