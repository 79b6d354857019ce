"""What this node is supposed to be, from the same resolution the launcher uses (launch/resolve.py).

Preflight checks the environment the launcher will set: the interface, the transport, the number of
GPUs this node's plan uses, the all2all backend (an exported VLLM_ALL2ALL_BACKEND included), the stack
paths. Without a deploy file, the node is checked on its own (single node, every GPU found, transport
and interface as given on the command line).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from launch import netif, plan as planning
from launch.config import DeployConfig, load_deploy
from launch.netif import AutoIfname
from launch.plan import NodePlan
from launch.request import Request
from launch.resolve import resolve
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
    lone: bool = False
    """A node of a multi-node deploy file checked alone (the cross-node checks skipped)."""

    def alone(self, lone: bool) -> NodeContext:
        return replace(self, lone=lone)

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
        return self.plan.kv_transfer.get("kv_connector") if self.plan and self.plan.kv_transfer else None

    @property
    def backend(self) -> str | None:
        return self.plan.all2all_backend if self.plan else None

    def env(self) -> dict[str, str]:
        """The environment vLLM will get on this node (this process's, plus the plan's)."""
        out = dict(os.environ)
        if self.plan:
            out.update(self.plan.stack.env if self.plan.stack else {})
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
        scope = ", this node only (cross-node checks: --cross-node)" if self.lone else ""
        return f"node {lay.node_rank} of {self.nodes} ({lay.role}{where}){scope}"


def request(
    deploy: str | None,
    node_rank: int | None,
    ifname: str | None,
    transport: str | None,
    group: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Request:
    """Preflight's options as the launcher's Request, with the same environment fallbacks
    (EP_DEPLOY, VLLM_ALL2ALL_BACKEND, EP_STACK_PROFILE)."""
    import argparse

    from launch.request import from_args

    args = argparse.Namespace(
        command="preflight", deploy=deploy, node_rank=node_rank, group=group, socket_ifname=ifname, transport=transport
    )
    return from_args(args, [], environ)


def build(
    deploy: str | None,
    node_rank: int | None,
    ifname: str | None,
    transport: str | None,
    group: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeContext:
    """Raises ConfigError (one line) for a bad deploy file, rank or environment. ``group`` picks prefill or
    decode in a disaggregated deployment."""
    req = request(deploy, node_rank, ifname, transport, group, environ)
    if not req.deploy:
        return NodeContext(
            config=None,
            plan=None,
            thresholds=Thresholds.defaults(),
            ifname=ifname,
            extra={"transport": transport or "tcp"},
        )
    invalid: dict[str, str] = {}  # a bad threshold fails the checks that read it, not the whole suite
    resolution = resolve(req, loaded=load_deploy(req.deploy, set_aside=invalid))
    (deployment,) = resolution.deployments
    (plan,) = resolution.plans
    config = deployment.config
    thresholds = Thresholds.of(config.preflight.given(), invalid)
    chosen = plan.env[planning.IFNAME_VARS[0]]
    found, problem = (chosen, "") if isinstance(chosen, str) else (netif.find(chosen), "")
    if isinstance(chosen, AutoIfname) and not found:
        problem = f"no {chosen.what()} on this machine"
    return replace(
        NodeContext(config=config, plan=plan, thresholds=thresholds, primary_address=config.nodes[0].address),
        ifname=found,
        ifname_problem=problem,
    )
