"""Where a scheduler put the nodes: the deploy file with the allocation's addresses filled in, and this
node's rank, read from the scheduler's own variables.

A deploy file for Slurm or Kubernetes describes the nodes' shape (GPUs, local DP, interface, env) and
may leave their addresses out. At run time each node places it:

- Slurm: the job's node list (``SLURM_JOB_NODELIST``, or ``SLURM_JOB_NODELIST_HET_GROUP_N`` per
  prefill/decode component of a heterogeneous job) in Slurm's order, each host's ``NodeAddr`` from
  ``scontrol``; this node's rank is ``SLURM_NODEID``, cross-checked against ``SLURMD_NODENAME``.
- LeaderWorkerSet: the leader (``LWS_LEADER_ADDRESS``, a cluster DNS name, resolved within a bound) is
  the primary; this pod is ``LWS_WORKER_INDEX`` of ``LWS_GROUP_SIZE`` at ``EP_POD_IP`` (downward API).
  With prefill/decode each group is a LeaderWorkerSet of its own (``--group``), and the router's pod reaches
  the groups' leaders through the Services named in ``EP_PREFILL_API`` / ``EP_DECODE_API``.

The placed deploy file then goes through the same plan -> run path as a hand-written one.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from launch.config import ConfigError, DeployConfig

GROUPS = ("prefill", "decode")
"""Component order of a heterogeneous prefill/decode job (SLURM_JOB_NODELIST_HET_GROUP_0, _1)."""

Run = Callable[[list[str]], str]


class SchedulerError(ConfigError):
    """The scheduler's variables or allocation do not fit the deploy file (one line, exit 2)."""


class LeaderNotFound(Exception):
    """The LeaderWorkerSet leader's name did not resolve within the bound (a node down: exit 3)."""


@dataclass(frozen=True)
class Placement:
    config: DeployConfig
    """The deploy file with the allocation's addresses filled in."""
    node_rank: int
    """This node's index in its group's node list."""
    group: str | None

    def describe(self) -> str:
        nodes = group_nodes(self.config, self.group)
        me = nodes[self.node_rank].address
        group = f"{self.group} " if self.group else ""
        role = "primary" if self.node_rank == 0 else "secondary"
        return f"{group}node {self.node_rank} of {len(nodes)} ({role}, {me}); primary at {nodes[0].address}"


def _need(environ: Mapping[str, str], name: str, where: str) -> str:
    value = environ.get(name, "").strip()
    if not value:
        raise SchedulerError(f"{name}: not set (expected {where})")
    return value


def _whole(environ: Mapping[str, str], name: str, where: str) -> int:
    text = _need(environ, name, where)
    if not text.isdigit():
        raise SchedulerError(f"{name}: {text!r} is not a whole number (expected {where})")
    return int(text)


def group_nodes(config: DeployConfig, group: str | None):
    if group is None:
        return config.nodes
    assert config.disaggregation is not None
    return getattr(config.disaggregation, group).nodes


def _field(group: str | None) -> str:
    return f"disaggregation.{group}.nodes" if group else "nodes"


def with_addresses(config: DeployConfig, addresses: Mapping[str | None, Mapping[int, str]]) -> DeployConfig:
    """The same deploy file with the given node addresses (per group, by rank) filled in."""
    data = config.model_dump()
    for group, by_rank in addresses.items():
        nodes = data["disaggregation"][group]["nodes"] if group else data["nodes"]
        for rank, address in by_rank.items():
            nodes[rank]["address"] = address
    return DeployConfig.model_validate(data)


def resolve(name: str) -> str:
    """An IP address for a host name (IPv4 first); an address stays as it is."""
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    found = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    found.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(found[0][4][0])


# ---- Slurm -------------------------------------------------------------------------------------------
SLURM_STEP = "inside a Slurm job step: srun from the script `plan --format slurm` writes"


def scontrol(argv: list[str], timeout: float = 30.0) -> str:
    try:
        proc = subprocess.run(["scontrol", *argv], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SchedulerError("scontrol: not found on PATH (expected Slurm's client commands on every node)") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(
            f"scontrol {' '.join(argv)}: no answer within {timeout:g} s (is slurmctld reachable?)"
        ) from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SchedulerError(f"scontrol {' '.join(argv)}: exited with {proc.returncode}: {tail}")
    return proc.stdout


def slurm_hosts(nodelist: str, run: Run = scontrol) -> list[str]:
    """Slurm's host list expression (``gpu[01-04]``) as host names, in Slurm's node-id order."""
    return run(["show", "hostnames", nodelist]).split()


def slurm_addresses(nodelist: str, run: Run = scontrol) -> dict[str, str]:
    """Each host's NodeAddr as Slurm knows it (what slurmctld itself uses to reach the node)."""
    found: dict[str, str] = {}
    for line in run(["show", "node", "--oneliner", nodelist]).splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if "NodeName" in fields:
            found[fields["NodeName"]] = fields.get("NodeAddr") or fields["NodeName"]
    return found


def slurm_allocation(
    config: DeployConfig, source: str, environ: Mapping[str, str] = os.environ, run: Run = scontrol
) -> tuple[DeployConfig, dict[str | None, list[str]]]:
    """The deploy file placed on the job's nodes; a short allocation is refused in one line."""
    if config.disaggregation is not None:
        lists = {g: f"SLURM_JOB_NODELIST_HET_GROUP_{i}" for i, g in enumerate(GROUPS)}
        where = "a heterogeneous job from `plan --format slurm` (component 0: prefill, 1: decode)"
    else:
        lists = {None: "SLURM_JOB_NODELIST"}
        where = "inside a Slurm job from `plan --format slurm`"
    hosts: dict[str | None, list[str]] = {}
    for group, var in lists.items():
        nodelist = _need(environ, var, where)
        names = slurm_hosts(nodelist, run)
        want = len(group_nodes(config, group))
        if len(names) < want:
            raise SchedulerError(
                f"{source}: {_field(group)}: {want} nodes but the allocation has {len(names)} ({var}={nodelist}) "
                f"(expected an allocation of {want} nodes: sbatch the script `plan --format slurm` writes, without -N)"
            )
        hosts[group] = names[:want]
    addresses = slurm_addresses(",".join(h for names in hosts.values() for h in names), run)
    placed: dict[str | None, dict[int, str]] = {}
    for group, names in hosts.items():
        placed[group] = {}
        for rank, host in enumerate(names):
            try:
                placed[group][rank] = resolve(addresses.get(host, host))
            except OSError as exc:
                raise SchedulerError(
                    f"{host}: its NodeAddr {addresses.get(host, host)!r} does not resolve ({exc})"
                ) from None
    return with_addresses(config, placed), hosts


def slurm(
    config: DeployConfig, source: str, group: str | None, environ: Mapping[str, str] = os.environ, run: Run = scontrol
) -> Placement:
    """This node's place in the job: the placed deploy file and its rank (SLURM_NODEID)."""
    check_group(config, source, group)
    node_id = _whole(environ, "SLURM_NODEID", SLURM_STEP)
    me = _need(environ, "SLURMD_NODENAME", SLURM_STEP)
    placed, hosts = slurm_allocation(config, source, environ, run)
    names = hosts[group]
    if node_id >= len(names):
        raise SchedulerError(
            f"SLURM_NODEID: {node_id} is not a node of {source}'s {len(names)} (expected srun --nodes={len(names)})"
        )
    if names[node_id] != me:
        raise SchedulerError(
            f"SLURM_NODEID: {node_id} is {names[node_id]} in the allocation, but this is {me} "
            f"(expected one task per node: srun --ntasks-per-node=1)"
        )
    return Placement(placed, node_id, group)


def check_group(config: DeployConfig, source: str, group: str | None) -> None:
    if config.disaggregation is not None and group not in GROUPS:
        raise SchedulerError(f"{source}: has prefill and decode groups (expected --group prefill or --group decode)")
    if config.disaggregation is None and group is not None:
        raise SchedulerError(f"{source}: disaggregation: missing (--group {group} needs prefill and decode groups)")


# ---- LeaderWorkerSet -------------------------------------------------------------------------------------
LWS_POD = "inside a pod of the LeaderWorkerSet that `plan --format k8s` writes"


def lws(
    config: DeployConfig,
    source: str,
    environ: Mapping[str, str] = os.environ,
    *,
    group: str | None = None,
    resolve_timeout: float = 300.0,
    say: Callable[[str], None] = lambda _: None,
) -> Placement:
    """This pod's place in its group (the deployment, or with prefill/decode the LeaderWorkerSet of ``group``):
    the leader is the primary, worker index = node rank."""
    check_group(config, source, group)
    nodes = group_nodes(config, group)
    index = _whole(environ, "LWS_WORKER_INDEX", LWS_POD)
    size = _whole(environ, "LWS_GROUP_SIZE", LWS_POD)
    leader = _need(environ, "LWS_LEADER_ADDRESS", LWS_POD)
    own = _need(environ, "EP_POD_IP", LWS_POD + " (env from the downward API: status.podIP)")
    if size != len(nodes):
        raise SchedulerError(
            f"{source}: {_field(group)}: {len(nodes)} nodes but the LeaderWorkerSet group has LWS_GROUP_SIZE={size} "
            f"(expected leaderWorkerTemplate.size {len(nodes)}: render with `plan --format k8s`)"
        )
    if index >= size:
        raise SchedulerError(f"LWS_WORKER_INDEX: {index} is outside the group of {size} (expected 0..{size - 1})")
    primary = own if index == 0 else _resolve_within(leader, resolve_timeout, say)
    placed = with_addresses(config, {group: {0: primary, index: own}})
    return Placement(placed, index, group)


ROUTER_POD = "inside the router pod that `plan --format k8s` writes for prefill/decode"
GROUP_API = {"prefill": "EP_PREFILL_API", "decode": "EP_DECODE_API"}
"""The variables that name each group's API Service (its leader) in the router's pod."""


def k8s_router(config: DeployConfig, source: str, environ: Mapping[str, str] = os.environ) -> DeployConfig:
    """The deploy file as the router's pod sees it: each group's primary is its API Service's name (cluster DNS
    resolves it to the leader pod; the Service stays while the pods behind it are recreated)."""
    if config.disaggregation is None:
        raise SchedulerError(f"{source}: disaggregation: missing (the router fronts a prefill and a decode group)")
    return with_addresses(config, {g: {0: _need(environ, var, ROUTER_POD)} for g, var in GROUP_API.items()})


def _resolve_within(name: str, timeout: float, say: Callable[[str], None]) -> str:
    """The leader's address; its DNS record may appear a little after this pod starts."""
    from launch import wait

    found: list[str] = []

    def resolved() -> bool:
        try:
            found.append(resolve(name))
            return True
        except OSError:
            return False

    try:
        wait.until(resolved, f"the leader's address {name} (LWS_LEADER_ADDRESS) to resolve", timeout, say=say)
    except wait.WaitTimeout as exc:
        raise LeaderNotFound(
            f"LWS_LEADER_ADDRESS: {exc} (expected the LeaderWorkerSet's headless service in cluster DNS; "
            f"with hostNetwork the pod needs dnsPolicy: ClusterFirstWithHostNet)"
        ) from None
    return found[-1]
