"""Command line: `python -m launch primary|secondary|serve|plan|check` (pixi: serve-primary, ...).

Usage, the guide's way (same positional arguments as its two scripts)::

    python -m launch primary   NODE1_IP RPC_PORT MODEL TOTAL_DP LOCAL_DP API_SERVERS [options] [-- vllm args]
    python -m launch secondary NODE1_IP RPC_PORT MODEL TOTAL_DP LOCAL_DP START_RANK  [options] [-- vllm args]

or from a deploy file that describes the whole cluster (every node runs the same file)::

    python -m launch serve --deploy cluster.yaml [--node-rank N]    # role and ranks from the file
    python -m launch plan cluster.yaml                               # every node's env + command
    python -m launch plan cluster.yaml --format shell --out plans/   # one runnable script per node
    python -m launch check cluster.yaml                              # argv through vLLM's own parser

Variables the launcher sets on every node: PYTHONPATH and LD_LIBRARY_PATH (the stack's, put before
yours), GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME / NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME (one interface for
all three), the transport's NCCL/NVSHMEM/libfabric settings, VLLM_ALL2ALL_BACKEND for vLLM < 0.11.1
(newer versions get --all2all-backend), then the deploy file's `env`.

Failure modes: bad input exits 2 with one line naming the file or argument, the field and what was
expected; a missing interface or vLLM binary is refused before anything starts; once vLLM runs, the exit
code is vLLM's, and SIGTERM / SIGINT stop vLLM's whole process group (see launch/supervise.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from env.paths import joined, stack_paths
from env.pins import active_profile
from launch import netif, plan as planning, render
from launch.config import ConfigError, DeployConfig, Network, Node, dump_deploy, load_deploy, parse_deploy_text
from launch.layout import NodeLayout, layouts
from launch.netif import AutoIfname
from launch.plan import NodePlan
from launch.vllm_versions import resolve_target

GUIDE_ARGS = {
    "primary": ("NODE1_IP", "RPC_PORT", "MODEL", "TOTAL_DP", "LOCAL_DP", "API_SERVERS"),
    "secondary": ("NODE1_IP", "RPC_PORT", "MODEL", "TOTAL_DP", "LOCAL_DP", "START_RANK"),
}


class UsageError(ConfigError):
    """Bad command-line input (same one-line treatment as a bad deploy file)."""


class NodeDown(Exception):
    """A node this one depends on never came up (exit code 3)."""


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", description="vLLM expert-parallel launcher")
    sub = parser.add_subparsers(dest="command", required=True)

    for role in ("primary", "secondary"):
        p = sub.add_parser(role, help=f"run vLLM on the {role} node")
        p.add_argument("guide", nargs="*", metavar=" ".join(GUIDE_ARGS[role]), help="the guide's positional arguments")
        _deploy_options(p)
        _serve_options(p)
        _vllm_options(p)

    p = sub.add_parser("serve", help="run this node's part of a deploy file (role from its rank)")
    _deploy_options(p)
    _serve_options(p)
    _vllm_options(p)

    for group in ("prefill", "decode"):
        p = sub.add_parser(group, help=f"run this node's part of the {group} group (deploy file with disaggregation)")
        _deploy_options(p)
        _serve_options(p)
        _vllm_options(p)

    p = sub.add_parser("proxy", help="run vllm-router in front of prefill and decode, once both are healthy")
    _deploy_options(p)
    p.add_argument("--dry-run", action="store_true", help="print the router's command instead of running it")
    p.add_argument("--wait-for-groups", type=float, default=1800.0, metavar="SECONDS",
                   help="how long to wait for both groups' /health before giving up (default 1800)")
    p.add_argument("--router-bin", default=None, help="the vllm-router executable (default: vllm-router on PATH)")

    p = sub.add_parser("plan", help="print every node's environment and command without running")
    p.add_argument("deploy_file", nargs="?", help="deploy file (YAML); default: $EP_DEPLOY")
    p.add_argument("--node-rank", type=int, help="only this node")
    p.add_argument("--format", choices=("text", "shell", "json", "slurm", "k8s"), default="text",
                   help="text: exports + command per node; shell: one runnable script per node in --out; json; "
                        "slurm: one sbatch script for the whole job; k8s: LeaderWorkerSet manifests")
    p.add_argument("--out", help="folder for --format shell scripts (node-RANK.sh); file for slurm / k8s (default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite files in --out that differ")
    p.add_argument("--group", choices=("prefill", "decode"), help="only this group (deploy file with disaggregation)")
    _vllm_options(p)

    p = sub.add_parser("bench", help="`vllm bench serve` against the deploy file's API (the guide's defaults), recorded")
    p.add_argument("deploy_file", nargs="?", help="deploy file (YAML); default: $EP_DEPLOY")
    p.add_argument("--out", help="run folder (default: bench-results/UTC-TIME)")
    p.add_argument("--logs", nargs="+", help="the servers' vLLM logs: verified and kept with the result")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="print two runs side by side instead")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("--vllm-bin", default=None, help="the vllm executable (default: vllm on PATH)")
    p.set_defaults(node_rank=None)
    _vllm_options(p)

    p = sub.add_parser("verify", help="read vLLM logs: what ran (all2all, MoE, attention, EP ranks) vs what was asked")
    p.add_argument("logs", nargs="+", help="vLLM log files (primary and secondaries)")
    p.add_argument("--deploy", help="deploy file whose backend, EP size and DeepGEMM setting are expected")
    p.add_argument("--all2all-backend", help="the backend that was asked for (default: the deploy file's, else vLLM's default)")
    p.add_argument("--ep-size", type=int, help="expected EP ranks (default: the deploy file's DP x TP)")

    p = sub.add_parser("slurm-step", help="inside a Slurm job (the script `plan --format slurm` writes): place the "
                                         "deploy file on the allocation, then run STEP as this node")
    p.add_argument("step", choices=("allocation", "preflight", "serve", "plan", "check", "proxy"),
                   help="allocation: check and print where the nodes are (batch host); proxy: the P/D router")
    p.add_argument("--group", choices=("prefill", "decode"), help="this component's group (heterogeneous P/D job)")
    p.add_argument("--deploy", help="deploy file (default: the copy the job script carries, $EP_DEPLOY_TEXT)")

    p = sub.add_parser("lws-step", help="inside a LeaderWorkerSet pod (`plan --format k8s`): place the deploy file on "
                                       "the group, then run STEP as this pod")
    p.add_argument("step", choices=("preflight", "serve"))
    p.add_argument("--deploy", help="deploy file (default: $EP_DEPLOY)")
    p.add_argument("--resolve-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for the leader's DNS name to resolve (default 300)")

    p = sub.add_parser("status", help="poll every group's /health and /metrics: one line per node (up, running and "
                       "waiting requests, KV-cache use, what failed), exit 1 when one is down")
    p.add_argument("deploy", help="the deploy file")
    p.add_argument("--timeout", type=float, default=10.0, help="bound on the whole poll, seconds (default: 10)")
    p.add_argument("--ranks", action="store_true", help="also one line per data parallel rank")

    p = sub.add_parser("check", help="parse every node's argv with the installed vLLM's own parser")
    p.add_argument("deploy_file", nargs="?", help="deploy file (YAML); default: $EP_DEPLOY")
    p.add_argument("--node-rank", type=int, help="only this node")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds vLLM's parser may take (default 120)")
    p.add_argument("--group", choices=("prefill", "decode"), help="only this group (deploy file with disaggregation)")
    p.add_argument("--python", default=os.environ.get("EP_VLLM_PYTHON") or sys.executable,
                   help="the Python whose vLLM parses (default: $EP_VLLM_PYTHON, else this one)")
    _vllm_options(p)
    return parser


# ---- option groups ---------------------------------------------------------------------------
def _deploy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deploy file")
    g.add_argument("--deploy", help="deploy file (YAML) describing the whole cluster; default: $EP_DEPLOY")
    g.add_argument("--node-rank", type=int, help="this node's index in the deploy file (default: found from this machine's addresses)")


def _serve_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running")
    g.add_argument("--dry-run", action="store_true", help="print this node's environment and command instead of running it")
    g.add_argument("--log-file", help="also write vLLM's output to this file")
    g.add_argument("--stop-timeout", type=float, default=30.0, help="seconds vLLM gets to stop after SIGTERM before SIGKILL")
    g.add_argument("--vllm-bin", default=None, help="the vllm executable (default: vllm on PATH)")
    g.add_argument("--wait-for-primary", type=float, default=600.0, metavar="SECONDS",
                   help="secondaries: wait this long for the primary's coordination port before starting (0: do not wait)")
    g.add_argument("--health-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="primary: report when the API answers /health, or that it did not within this bound")
    g.add_argument("--wait-for-nodes", type=float, default=600.0, metavar="SECONDS",
                   help="primary with data_parallel_backend ray: wait this long for every node to join the Ray cluster")


def _vllm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM (named as vLLM names them)")
    g.add_argument("--all2all-backend", help="e.g. deepep_low_latency, deepep_high_throughput, allgather_reducescatter")
    g.add_argument("--port", type=int, help="API port on the primary")
    g.add_argument("--host", help="address the API binds to")
    g.add_argument("--tensor-parallel-size", type=int)
    g.add_argument("--vllm-version", help="target vLLM version (default: installed, else the stack's pin)")
    g = p.add_argument_group("network")
    g.add_argument("--transport", choices=("ib", "roce", "efa", "tcp"))
    g.add_argument("--socket-ifname", help="interface for NCCL/Gloo/NVSHMEM bootstrap, or auto")


# ---- arguments -> config + layouts -------------------------------------------------------------
def _int(name: str, text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name}: expected an integer, got {text!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise UsageError(f"{name}: {value} is out of range (expected {bound})")
    return value


def config_from_guide(role: str, values: list[str], args: argparse.Namespace) -> tuple[DeployConfig, NodeLayout]:
    """The guide's six positional arguments as a config (common settings) and this node's layout."""
    names = GUIDE_ARGS[role]
    if len(values) != len(names):
        raise UsageError(f"{role}: expected {len(names)} arguments {' '.join(names)} (or --deploy FILE), got {len(values)}")
    node1_ip, rpc_port, model, total_dp, local_dp, last = values
    rpc = _int("RPC_PORT", rpc_port, 1, 65535)
    total = _int("TOTAL_DP", total_dp, 1)
    local = _int("LOCAL_DP", local_dp, 1)
    if local > total:
        raise UsageError(f"LOCAL_DP: {local} is larger than TOTAL_DP {total} (expected LOCAL_DP <= TOTAL_DP)")
    tp = args.tensor_parallel_size or 1
    try:
        config = DeployConfig(
            model=model,
            nodes=[Node(address=node1_ip, gpus=local * tp)],
            tensor_parallel_size=tp,
            rpc_port=rpc,
            trust_remote_code=True,  # the guide's scripts always pass it
            network=Network(transport=args.transport or "ib", socket_ifname=args.socket_ifname or "auto"),
        )
    except Exception as exc:  # pydantic's message, reduced to one line
        raise UsageError(f"{role}: {str(exc).splitlines()[-2].strip() if len(str(exc).splitlines()) > 1 else exc}") from None
    if role == "primary":
        layout = NodeLayout("primary", 0, node1_ip, rpc, total, local, 0, _int("API_SERVERS", last, 1), node1_ip)
    else:
        start = _int("START_RANK", last, 0)
        if start + local > total or start == 0:
            raise UsageError(
                f"START_RANK: {start} with LOCAL_DP {local} is outside TOTAL_DP {total} "
                f"(expected 1..{total - local} for a secondary)"
            )
        layout = NodeLayout("secondary", 1, node1_ip, rpc, total, local, start, None, None)
    return config, layout


def _groups(config: DeployConfig, role: str | None, path: str) -> list[tuple[str | None, DeployConfig]]:
    """The deployments a command acts on: the cluster, or the prefill / decode group(s)."""
    if config.disaggregation is None:
        if role in ("prefill", "decode"):
            raise UsageError(f"{path}: disaggregation: missing (serve-{role} needs prefill and decode groups in the deploy file)")
        return [(None, config)]
    if role in ("prefill", "decode"):
        return [(role, config.group(role))]
    if role is not None:
        raise UsageError(f"{path}: has prefill and decode groups (expected serve-prefill / serve-decode / serve-proxy, not {role})")
    return [("prefill", config.group("prefill")), ("decode", config.group("decode"))]


def _deploy_path(args: argparse.Namespace) -> str | None:
    return getattr(args, "deploy", None) or getattr(args, "deploy_file", None) or os.environ.get("EP_DEPLOY")


def _with_overrides(config: DeployConfig, args: argparse.Namespace) -> DeployConfig:
    """Named options win over the deploy file."""
    changes: dict = {}
    if args.port is not None:
        changes["port"] = args.port
    if args.host is not None:
        changes["host"] = args.host
    if args.tensor_parallel_size is not None:
        changes["tensor_parallel_size"] = args.tensor_parallel_size
    network = {}
    if args.transport:
        network["transport"] = args.transport
    if args.socket_ifname:
        network["socket_ifname"] = args.socket_ifname
    if network:
        changes["network"] = config.network.model_validate({**config.network.model_dump(), **network})
    if not changes:
        return config
    return DeployConfig.model_validate({**config.model_dump(), **{k: v for k, v in changes.items() if k != "network"},
                                        "network": changes.get("network", config.network).model_dump()})


def _backend(args: argparse.Namespace, config: DeployConfig, notes: list[str]) -> str | None:
    if args.all2all_backend:
        return args.all2all_backend
    if config.all2all_backend:
        return config.all2all_backend
    exported = os.environ.get("VLLM_ALL2ALL_BACKEND")
    if exported:
        notes.append(f"all2all backend {exported} taken from VLLM_ALL2ALL_BACKEND in the environment")
        return exported
    return None


@contextmanager
def _naming(source: str | None):
    """Prefixes a ConfigError with the file the offending value came from."""
    try:
        yield
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(f"{source}: {exc}") from None


def node_rank(config: DeployConfig, given: int | None, source: str) -> int:
    if given is not None:
        if not 0 <= given < len(config.nodes):
            raise UsageError(f"--node-rank: {given} is not a node of {source} (expected 0..{len(config.nodes) - 1})")
        return given
    missing = [r for r, n in enumerate(config.nodes) if n.address is None]
    if missing:
        raise UsageError(f"{source}: nodes[{missing[0]}].address: missing (pass --node-rank N; a file without addresses "
                         f"is placed by a scheduler: plan --format slurm or k8s)")
    mine = netif.own_rank([n.address for n in config.nodes])
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise UsageError(f"{source}: no node address belongs to this machine (pass --node-rank N)")
    raise UsageError(f"{source}: nodes {mine} all belong to this machine (pass --node-rank N)")


def make_plans(args: argparse.Namespace, passthrough: list[str], *, role: str | None = None,
               loaded: DeployConfig | None = None) -> list[NodePlan]:
    """Parses everything the user gave into node plans (all nodes, or the one asked for)."""
    path = _deploy_path(args)
    guide = getattr(args, "guide", None) or []
    if guide and path and getattr(args, "deploy", None):
        raise UsageError(f"{role}: give either the guide's positional arguments or --deploy, not both")
    if guide or (role and not path):
        if role not in GUIDE_ARGS:
            raise UsageError(f"{role}: needs a deploy file (pass --deploy FILE or set EP_DEPLOY)")
        config, layout = config_from_guide(role, guide, args)
        config = _with_overrides(config, args)
        source = "arguments"
        pairs = [(None, config, layout)]
    else:
        if not path:
            raise UsageError("deploy file: none given (pass FILE, --deploy FILE, or set EP_DEPLOY)")
        config = _with_overrides(loaded or load_deploy(path), args)
        source = path
        groups = _groups(config, role or getattr(args, "group", None), path)
        pairs = []
        for gname, cfg in groups:
            all_layouts = layouts(cfg)
            wanted = args.node_rank
            if role is not None:  # serving: exactly this node
                wanted = node_rank(cfg, args.node_rank, path)
                actual = all_layouts[wanted].role
                if role in ("primary", "secondary") and actual != role:
                    raise UsageError(f"--node-rank: node {wanted} of {path} is the {actual}, not a {role} (expected {'0' if role == 'primary' else '1..'})")
            elif wanted is not None:
                node_rank(cfg, wanted, path)
            pairs += [(gname, cfg, lay) for lay in all_layouts if wanted is None or lay.node_rank == wanted]
        for gname, cfg, lay in pairs:
            for rank in sorted({0, lay.node_rank}):
                if cfg.nodes[rank].address is None:
                    where = f"disaggregation.{gname}." if gname else ""
                    raise UsageError(f"{path}: {where}nodes[{rank}].address: missing (needed to plan or run nodes directly; "
                                     f"a file without addresses is placed by a scheduler: plan --format slurm or k8s)")
    # Errors about values that came from the deploy file name the file.
    in_file = source if source != "arguments" else None
    with _naming(in_file if not args.vllm_version else None):
        target = resolve_target(args.vllm_version, config.vllm_version)
    notes: list[str] = []
    backends: dict[str | None, str | None] = {}
    for gname, cfg, _ in pairs:
        if gname not in backends:  # one backend per deployment (prefill and decode may differ)
            backends[gname] = backend = _backend(args, cfg, notes)
            if backend:
                with _naming(in_file if backend == cfg.all2all_backend and not args.all2all_backend else None):
                    target.check_backend(backend)
    stack = stack_paths(active_profile())
    plans = []
    for gname, cfg, lay in pairs:
        p = planning.build(cfg, lay, target, stack, all2all_backend=backends[gname], passthrough=passthrough)
        plans.append(replace(p, group=gname, notes=p.notes + notes + ([f"from {source}"] if source != "arguments" else [])))
    return plans


# ---- actions -------------------------------------------------------------------------------------
def resolve_on_node(plan: NodePlan) -> NodePlan:
    """Fills in what can only be known on the node: the interface; refuses one that is not there."""
    env = dict(plan.env)
    for name, value in plan.env.items():
        if isinstance(value, AutoIfname):
            found = netif.find(value)
            if not found:
                raise UsageError(
                    f"socket_ifname: auto found no {value.what()} on this machine "
                    f"(expected this node's address on one of: {', '.join(netif.interfaces())}; set --socket-ifname)"
                )
            env[name] = found
        elif name in planning.IFNAME_VARS and value not in netif.interfaces():
            raise UsageError(
                f"socket_ifname: interface {value!r} does not exist on this machine (expected one of: {', '.join(netif.interfaces())})"
            )
    return replace(plan, env=env)


def child_environment(plan: NodePlan) -> dict[str, str]:
    env = dict(os.environ)
    for name, entries in plan.path_prepend.items():
        env[name] = joined(entries, os.environ.get(name))
    for name, value in plan.env.items():
        assert isinstance(value, str), "resolve_on_node first"
        env[name] = value
    return env


def cmd_serve(args: argparse.Namespace, passthrough: list[str]) -> int:
    role = args.command
    (plan,) = make_plans(args, passthrough, role=role)
    plan = resolve_on_node(plan)
    if args.log_file:
        plan = replace(plan, log_file=args.log_file)
    if args.dry_run:
        sys.stdout.write(render.shell(plan))
        return 0
    argv = list(plan.argv)
    env = child_environment(plan)
    if argv[0] == "ray":  # a Ray worker of data_parallel_backend ray
        argv[0] = _executable(None, "ray", RAY_FIX, path=env.get("PATH"))
    else:
        argv[0] = _executable(args.vllm_bin, argv[0], VLLM_FIX, path=env.get("PATH"))
    for line in render.summary(plan):
        print(f"[launch] {line}", file=sys.stderr)
    from launch import supervise, wait

    lay = plan.layout
    if lay.role == "secondary" and args.wait_for_primary > 0:
        port = int(argv[argv.index("--address") + 1].rsplit(":", 1)[1]) if "--address" in argv else lay.rpc_port
        what = f"the primary's {'Ray head' if '--address' in argv else 'coordination port'} {lay.primary_address}:{port}"
        try:
            took = wait.until(lambda: wait.port_open(lay.primary_address, port), what, args.wait_for_primary, say=_say)
        except wait.WaitTimeout as exc:
            raise NodeDown(f"primary: {exc} (start serve-primary on {lay.primary_address} first; check the address and "
                           f"firewall; --wait-for-primary 0 starts without waiting)") from None
        _say(f"{what} accepts connections (after {took:.1f} s): starting {'the Ray worker' if '--address' in argv else 'vLLM'}")
    health = None
    if lay.role == "primary":
        port = next((int(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a == "--port"), 8000)
        host = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--host"), None)
        health = f"http://{'127.0.0.1' if host in (None, '0.0.0.0', '::', '') else host}:{port}/health"
    if not plan.ray_head:
        return supervise.run(argv, env, log_file=plan.log_file, stop_timeout=args.stop_timeout,
                             health_url=health, health_timeout=args.health_timeout,
                             what="the Ray worker" if plan.argv[0] == "ray" else "vLLM")
    from launch import ray_cluster

    head = [_executable(None, "ray", RAY_FIX, path=env.get("PATH")), *plan.ray_head[1:]]
    try:
        with ray_cluster.head(head, env, plan.ray_nodes, args.wait_for_nodes, say=_say):
            return supervise.run(argv, env, log_file=plan.log_file, stop_timeout=args.stop_timeout,
                                 health_url=health, health_timeout=args.health_timeout)
    except wait.WaitTimeout as exc:
        raise NodeDown(f"ray: {exc} (start serve on every secondary; they join with `ray start --address`)") from None
    except ray_cluster.Stopped as exc:
        _say(f"{exc}: stopped before vLLM started")
        return 143 if str(exc) == "SIGTERM" else 130


VLLM_FIX = "install the stack with `pixi install`, or pass --vllm-bin"
RAY_FIX = "data_parallel_backend ray needs Ray in the stack's environment (pip install 'ray[default]')"


def _executable(given: str | None, name: str, fix: str, path: str | None = None) -> str:
    exe = given or shutil.which(name, path=path)
    if not exe:
        raise UsageError(f"{name}: not found on PATH ({fix})")
    return exe


def _say(message: str) -> None:
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def cmd_proxy(args: argparse.Namespace) -> int:
    from launch import router, supervise, wait

    path = _deploy_path(args)
    if not path:
        raise UsageError("deploy file: none given (pass --deploy FILE or set EP_DEPLOY)")
    config = load_deploy(path)
    if config.disaggregation is None:
        raise UsageError(f"{path}: disaggregation: missing (serve-proxy fronts a prefill and a decode group)")
    command = router.argv(config)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    exe = _executable(args.router_bin, "vllm-router", "pip install vllm-router, or pass --router-bin")
    deadline = time.monotonic() + args.wait_for_groups
    for name, url in router.health_urls(config).items():
        what = f"the {name} group's API at {url}"
        try:
            took = wait.until(lambda u=url: wait.healthy(u), what, max(0.0, deadline - time.monotonic()), say=_say)
        except wait.WaitTimeout:
            raise NodeDown(f"{name}: {what} not ready within {args.wait_for_groups:g} s "
                           f"(start serve-{name} on its nodes first)") from None
        _say(f"{name} is healthy at {url} (after {took:.1f} s)")
    return supervise.run([exe, *command[1:]], os.environ, stop_timeout=10, what="vllm-router")


def cmd_plan(args: argparse.Namespace) -> int:
    if args.format in ("slurm", "k8s"):
        return cmd_plan_scheduler(args)
    plans = make_plans(args, [])
    config = load_deploy(_deploy_path(args)) if _deploy_path(args) else None
    if args.format == "text":
        sys.stdout.write("\n".join(render.shell(p) for p in plans))
        if config is not None and config.disaggregation is not None and args.node_rank is None:
            from launch import router

            sys.stdout.write(f"\n# router (on {router.address(config)}), once prefill and decode answer /health\n"
                             f"{shlex.join(router.argv(config))}\n")
    elif args.format == "json":
        json.dump([_plan_json(p) for p in plans], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if not args.out:
            raise UsageError("--out: --format shell writes one script per node (expected --out FOLDER)")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        scripts = {out / f"node-{p.layout.node_rank}.sh": render.script(p) for p in plans}
        clashes = [str(f) for f, text in scripts.items() if f.exists() and f.read_text() != text]
        if clashes and not args.force:
            raise UsageError(f"--out: {clashes[0]} exists and differs (expected a new folder, or --force to overwrite)")
        for file, text in scripts.items():
            file.write_text(text)
            file.chmod(0o755)
            print(file)
    return 0


def cmd_plan_scheduler(args: argparse.Namespace) -> int:
    """--format slurm / k8s: what the scheduler runs, carrying the deploy file itself."""
    path = _deploy_path(args)
    if not path:
        raise UsageError("deploy file: none given (pass FILE or set EP_DEPLOY)")
    given = [f"--{name.replace('_', '-')}" for name in ("port", "host", "tensor_parallel_size", "transport", "socket_ifname",
                                                         "node_rank", "all2all_backend", "vllm_version", "group")
             if getattr(args, name, None) is not None]
    if given:
        raise UsageError(f"{given[0]}: not taken with --format {args.format} (expected the value in {path}: the job carries the deploy file)")
    config = load_deploy(path)
    text = Path(path).read_text(encoding="utf-8")
    from launch.placement import GROUPS, group_nodes

    _refuse_for_scheduler(config, path, args.format)
    listed = [n for g in (GROUPS if config.disaggregation else (None,)) for n in group_nodes(config, g) if n.address]
    if listed:
        where = "the allocation's" if args.format == "slurm" else "the pods'"
        _say(f"note: {path} lists node addresses; with --format {args.format} they are replaced by {where} at run time")
    # Every node's plan must build before the job is submitted: plan it on stand-in addresses.
    make_plans(args, [], loaded=_stand_in_addresses(config))
    if args.format == "slurm":
        from launch import slurm

        out = slurm.script(config, text, Path(path).name)
    else:
        import yaml

        from launch import k8s

        class Literal(yaml.SafeDumper):
            """Multi-line strings (the deploy file in the ConfigMap) as readable | blocks."""

        Literal.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))
        out = yaml.dump_all(k8s.manifests(config, text, Path(path).name), Dumper=Literal, sort_keys=False)
    if not args.out:
        sys.stdout.write(out)
        return 0
    target = Path(args.out)
    if target.is_dir():
        raise UsageError(f"--out: {target} is a folder (expected a file name for --format {args.format})")
    if not target.parent.is_dir():
        raise UsageError(f"--out: folder {target.parent} does not exist (expected a file in an existing folder)")
    if target.exists() and target.read_text() != out and not args.force:
        raise UsageError(f"--out: {target} exists and differs (expected a new file, or --force to overwrite)")
    target.write_text(out)
    print(target)
    return 0


def _refuse_for_scheduler(config: DeployConfig, path: str, fmt: str) -> None:
    """What a scheduler-placed file cannot carry: fixed GPU ids (the scheduler assigns GPUs) and secrets
    (the file travels in the job script or a ConfigMap)."""
    from launch.config import is_secret
    from launch.placement import GROUPS, group_nodes

    prefixes = [("", None)] if config.disaggregation is None else [(f"disaggregation.{g}.", g) for g in GROUPS]
    for prefix, group in prefixes:
        for rank, node in enumerate(group_nodes(config, group)):
            if node.gpu_ids is not None:
                raise UsageError(f"{path}: {prefix}nodes[{rank}].gpu_ids: not taken with --format {fmt} (expected none: "
                                 f"the scheduler assigns each node's GPUs and sets CUDA_VISIBLE_DEVICES)")
    envs = [("env", config.env)] + [(f"{p}nodes[{r}].env", n.env) for p, g in prefixes for r, n in enumerate(group_nodes(config, g))]
    if config.disaggregation is not None:
        envs += [(f"disaggregation.{g}.env", getattr(config.disaggregation, g).env) for g in GROUPS]
    for field, env in envs:
        for name in env:
            if is_secret(name):
                fix = (f"export {name} before sbatch: the job passes your environment to every node" if fmt == "slurm"
                       else "a Kubernetes Secret named in kubernetes.env_from_secret")
                where = "the job script" if fmt == "slurm" else "a ConfigMap"
                raise UsageError(f"{path}: {field}.{name}: a secret would be written into {where} (expected it out of the "
                                 f"deploy file: {fix})")


def _stand_in_addresses(config: DeployConfig) -> DeployConfig:
    """Documentation-range addresses (RFC 5737) where the scheduler will put real ones."""
    from launch.placement import with_addresses

    if config.disaggregation is None:
        return with_addresses(config, {None: {r: f"192.0.2.{r + 1}" for r in range(len(config.nodes))}})
    d = config.disaggregation
    return with_addresses(config, {"prefill": {r: f"198.51.100.{r + 1}" for r in range(len(d.prefill.nodes))},
                                   "decode": {r: f"203.0.113.{r + 1}" for r in range(len(d.decode.nodes))}})


def _scheduled_deploy(args: argparse.Namespace) -> tuple[DeployConfig, str]:
    """The deploy file a scheduled step runs: --deploy, else the copy the job script carries."""
    path = args.deploy or (None if os.environ.get("EP_DEPLOY_TEXT") else os.environ.get("EP_DEPLOY"))
    if path:
        return load_deploy(path), path
    text = os.environ.get("EP_DEPLOY_TEXT")
    if not text:
        raise UsageError("deploy file: none given (pass --deploy FILE; in a job from `plan --format slurm`, EP_DEPLOY_TEXT carries it)")
    source = os.environ.get("EP_DEPLOY_NAME") or "EP_DEPLOY_TEXT"
    return parse_deploy_text(text, source), source


def _placed_file(config: DeployConfig, name: str) -> str:
    """The placed deploy file, node-local (steps are separate processes that read a file)."""
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"vllm-ep-{os.getuid()}"
    path = folder / f"{name}.yaml"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(dump_deploy(config))
    except OSError as exc:
        raise UsageError(f"{path}: cannot write the placed deploy file ({exc.strerror or exc}; expected a writable "
                         f"temporary folder: set TMPDIR)") from None
    return str(path)


def _run_step(step: str, placed: str, rank: int, group: str | None, extra: list[str]) -> int:
    """Replaces this process with the step, so the scheduler's signals reach it directly."""
    where = ["--node-rank", str(rank)]
    argv = {
        "preflight": ["-m", "preflight", "--deploy", placed, *where, *(["--group", group] if group else []), *extra],
        "serve": ["-m", "launch", group or "serve", "--deploy", placed, *where, *extra],
        "plan": ["-m", "launch", "plan", placed, *where, *(["--group", group] if group else []), *extra],
        "check": ["-m", "launch", "check", placed, *where, *(["--group", group] if group else []), *extra],
        "proxy": ["-m", "launch", "proxy", "--deploy", placed, *extra],
    }[step]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])
    return 1  # not reached


def cmd_slurm_step(args: argparse.Namespace, passthrough: list[str]) -> int:
    from launch import placement

    config, source = _scheduled_deploy(args)
    job = os.environ.get("SLURM_JOB_ID", "?")
    if args.step in ("allocation", "proxy"):
        placed, hosts = placement.slurm_allocation(config, source)
        if args.step == "proxy":
            return _run_step("proxy", _placed_file(placed, f"slurm-{job}-router"), 0, None, passthrough)
        for group, names in hosts.items():
            for rank, (host, node) in enumerate(zip(names, placement.group_nodes(placed, group), strict=True)):
                role = "primary" if rank == 0 else "secondary"
                print(f"[launch] slurm job {job}: {group + ' ' if group else ''}node {rank} ({role}) = {host} {node.address}")
        if placed.disaggregation is not None:
            from launch import router

            api = f"{router.address(placed)}:{placed.disaggregation.router.port} (vllm-router)"
        else:
            api = f"{placed.nodes[0].address}:{placed.port}"
        print(f"[launch] slurm job {job}: the API will answer at http://{api} once every node is up")
        return 0
    p = placement.slurm(config, source, args.group)
    _say(f"slurm job {job}: {p.describe()}")
    placed = _placed_file(p.config, f"slurm-{job}-{args.group or 'node'}-{p.node_rank}")
    extra = [*(config.slurm.preflight_args if args.step == "preflight" else []), *passthrough]
    return _run_step(args.step, placed, p.node_rank, args.group, extra)


def cmd_lws_step(args: argparse.Namespace, passthrough: list[str]) -> int:
    from launch import placement

    config, source = _scheduled_deploy(args)
    try:
        p = placement.lws(config, source, resolve_timeout=args.resolve_timeout, say=_say)
    except placement.LeaderNotFound as exc:
        raise NodeDown(str(exc)) from None
    _say(f"LeaderWorkerSet pod: {p.describe()}")
    if args.step == "serve":
        from launch import pod

        _say(f"/dev/shm: {pod.clear_shm()} entries left by an earlier run removed")
    placed = _placed_file(p.config, f"lws-{p.node_rank}-{args.step}")
    return _run_step(args.step, placed, p.node_rank, None, passthrough)


def _plan_json(p: NodePlan) -> dict:
    env = {}
    for name, value in p.env.items():
        env[name] = value.describe() if isinstance(value, AutoIfname) else (render.MASK if render.is_secret(name) else value)
    return {
        "node_rank": p.layout.node_rank, "role": p.layout.role, "node_address": p.layout.node_address,
        "data_parallel_size": p.layout.data_parallel_size, "data_parallel_size_local": p.layout.data_parallel_size_local,
        "start_rank": p.layout.start_rank, "target_vllm": str(p.target.version), "target_source": p.target.source,
        "path_prepend": p.path_prepend, "env": env, "argv": p.argv, "log_file": p.log_file,
    }  # fmt: skip


def cmd_verify(args: argparse.Namespace) -> int:
    from launch import verify

    missing = [log for log in args.logs if not Path(log).is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: no such log file (expected vLLM's output, e.g. from --log-file)")
    backend, ep_size, deep_gemm = args.all2all_backend, args.ep_size, False
    if args.deploy:
        config = load_deploy(args.deploy)
        backend = backend or config.all2all_backend
        if ep_size is None and config.enable_expert_parallel:
            ep_size = sum(config.local_dp(r) for r in range(len(config.nodes))) * config.tensor_parallel_size
        deep_gemm = config.env.get("VLLM_USE_DEEP_GEMM") == "1"
    found = verify.read([Path(log) for log in args.logs])
    for line in found.lines():
        print(line)
    problems = verify.problems(found, backend=backend, ep_size=ep_size, deep_gemm=deep_gemm)
    for problem in problems:
        print(f"MISMATCH {problem}")
    print(f"# verdict: {'MISMATCH' if problems else 'as planned'}")
    return 1 if problems else 0


def cmd_bench(args: argparse.Namespace, passthrough: list[str]) -> int:
    from launch import benchmark, supervise

    if args.compare:
        try:
            a, b = (benchmark.load_result(Path(run)) for run in args.compare)
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--compare: {exc}") from None
        print("\n".join(benchmark.compare(a, b, (Path(args.compare[0]).name, Path(args.compare[1]).name))))
        return 0
    path = _deploy_path(args)
    if not path:
        raise UsageError("deploy file: none given (pass FILE or set EP_DEPLOY)")
    config = _with_overrides(load_deploy(path), args)
    if config.disaggregation is None and config.nodes[0].address is None and config.host in (None, "", "0.0.0.0", "::"):
        raise UsageError(f"{path}: nodes[0].address: missing (expected the primary's address to reach its API; "
                         f"a scheduler-placed deployment prints it: slurm-step allocation)")
    out = Path(args.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    command = benchmark.argv(config, out, passthrough)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    exe = _executable(args.vllm_bin, "vllm", VLLM_FIX)
    benchmark.record(out, command, [_plan_json(p) for p in make_plans(args, [])])
    _say(f"benchmark run folder: {out}")
    code = supervise.run([exe, *command[1:]], os.environ, stop_timeout=10)
    if args.logs:
        from launch import verify

        found = verify.read([Path(log) for log in args.logs])
        problems = verify.problems(found, backend=config.all2all_backend)
        (out / "verify.txt").write_text("\n".join(found.lines() + [f"MISMATCH {p}" for p in problems]) + "\n")
    if (out / "result.json").exists():
        print("\n".join(benchmark.summary(benchmark.load_result(out))))
    return code


def cmd_status(args: argparse.Namespace) -> int:
    from launch import status

    if not 0 < args.timeout <= 600:
        raise UsageError(f"--timeout: {args.timeout:g} is out of range (expected 0 < seconds <= 600)")
    lines, healthy = status.report(load_deploy(args.deploy), args.deploy, args.timeout, args.ranks)
    print("\n".join(lines))
    return 0 if healthy else 1


def cmd_check(args: argparse.Namespace) -> int:
    from launch import check

    plans = make_plans(args, [])
    return check.report(plans, timeout=args.timeout, python=args.python)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "bench":
            return cmd_bench(args, passthrough)
        if args.command == "proxy":
            return cmd_proxy(args)
        if args.command == "slurm-step":
            return cmd_slurm_step(args, passthrough)
        if args.command == "lws-step":
            return cmd_lws_step(args, passthrough)
        return cmd_serve(args, passthrough)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NodeDown as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
