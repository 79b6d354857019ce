"""What this node is supposed to be, from the same deploy file and plan the launcher uses.

Preflight checks the environment the launcher will set: the interface, the transport, the number of
GPUs this node's plan uses, the stack paths. Without a deploy file, the node is checked on its own
(single node, every GPU found, transport and interface as given on the command line).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from env.paths import stack_paths
from env.pins import active_profile
from launch import netif, plan as planning
from launch.config import ConfigError, DeployConfig, load_deploy
from launch.layout import layouts
from launch.netif import AutoIfname
from launch.plan import NodePlan
from launch.vllm_versions import resolve_target
from preflight.thresholds import Thresholds


@dataclass(frozen=True)
class NodeContext:
    """Everything a check may ask about the node it runs on."""

    config: DeployConfig | None
    plan: NodePlan | None
    thresholds: Thresholds
    ifname: str | None = None
    """The socket interface the plan binds (resolved on this node), or None when it cannot be found."""
    ifname_problem: str = ""
    """Why ``ifname`` is None."""
    primary_address: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.plan.layout.node_rank if self.plan else 0

    @property
    def nodes(self) -> int:
        return len(self.config.nodes) if self.config else 1

    @property
    def transport(self) -> str:
        return self.config.network.transport if self.config else self.extra.get("transport", "tcp")

    @property
    def expected_gpus(self) -> int | None:
        """GPUs this node's plan uses (local DP x TP), None without a deploy file."""
        if not self.config or not self.plan:
            return None
        return self.plan.layout.data_parallel_size_local * self.config.tensor_parallel_size

    @property
    def kv_connector(self) -> str | None:
        """The KV connector this node's vLLM gets (--kv-transfer-config), if any."""
        if not self.plan or "--kv-transfer-config" not in self.plan.argv:
            return None
        import json

        raw = self.plan.argv[self.plan.argv.index("--kv-transfer-config") + 1]
        try:
            return json.loads(raw).get("kv_connector")
        except (ValueError, AttributeError):
            return None

    @property
    def backend(self) -> str | None:
        if not self.plan:
            return None
        argv = self.plan.argv
        if "--all2all-backend" in argv:
            return argv[argv.index("--all2all-backend") + 1]
        value = self.plan.env.get("VLLM_ALL2ALL_BACKEND")
        return value if isinstance(value, str) else None

    def env(self) -> dict[str, str]:
        """The environment vLLM will get on this node (this process's, plus the plan's)."""
        out = dict(os.environ)
        if self.plan:
            for name, entries in self.plan.path_prepend.items():
                out[name] = os.pathsep.join([*entries, *([os.environ[name]] if os.environ.get(name) else [])])
            for name, value in self.plan.env.items():
                if isinstance(value, str):
                    out[name] = value
                elif self.ifname:
                    out[name] = self.ifname
        return out

    def describe(self) -> str:
        if not self.plan:
            return "single node (no deploy file)"
        lay = self.plan.layout
        where = f" {lay.node_address}" if lay.node_address else ""
        return f"node {lay.node_rank} of {self.nodes} ({lay.role}{where})"


def build(deploy: str | None, node_rank: int | None, ifname: str | None, transport: str | None,
          group: str | None = None) -> NodeContext:
    """Raises ConfigError (one line) for a bad deploy file or rank. ``group`` picks prefill or decode
    in a disaggregated deployment."""
    if not deploy:
        return NodeContext(config=None, plan=None, thresholds=Thresholds.defaults(), ifname=ifname,
                           extra={"transport": transport or "tcp"})
    config = load_deploy(deploy)
    if transport or ifname:
        network = config.network.model_dump() | ({"transport": transport} if transport else {}) | ({"socket_ifname": ifname} if ifname else {})
        config = DeployConfig.model_validate(config.model_dump() | {"network": network})
    if config.disaggregation is not None:
        if group not in ("prefill", "decode"):
            raise ConfigError(f"{deploy}: has prefill and decode groups (expected --group prefill or --group decode)")
        config = config.group(group)
    elif group:
        raise ConfigError(f"--group: {deploy} has no disaggregation section (expected no --group)")
    all_layouts = layouts(config)
    missing = [r for r, n in enumerate(config.nodes) if n.address is None and (r == 0 or node_rank in (None, r))]
    if missing:
        raise ConfigError(f"{deploy}: nodes[{missing[0]}].address: missing (a file without addresses is placed by a "
                          f"scheduler: run preflight through `launch slurm-step preflight` or `lws-step preflight`)")
    if node_rank is None:
        mine = netif.own_rank([n.address for n in config.nodes])
        if len(mine) != 1:
            raise ConfigError(f"{deploy}: cannot tell which node this is ({'none' if not mine else mine} of its addresses are here); pass --node-rank N")
        node_rank = mine[0]
    if not 0 <= node_rank < len(all_layouts):
        raise ConfigError(f"--node-rank: {node_rank} is not a node of {deploy} (expected 0..{len(all_layouts) - 1})")
    target = resolve_target(None, config.vllm_version)
    plan = planning.build(config, all_layouts[node_rank], target, stack_paths(active_profile()))
    thresholds = Thresholds.defaults().override(config.preflight, deploy)
    chosen = plan.env[planning.IFNAME_VARS[0]]
    found, problem = (chosen, "") if isinstance(chosen, str) else (netif.find(chosen), "")
    if isinstance(chosen, AutoIfname) and not found:
        problem = f"no {chosen.what()} on this machine"
    return replace(
        NodeContext(config=config, plan=plan, thresholds=thresholds, primary_address=config.nodes[0].address),
        ifname=found, ifname_problem=problem,
    )
