"""Node roles and data parallel ranks: who is primary, who starts at which rank.

Both the deploy file and the guide's positional arguments end up here, as one :class:`NodeLayout` per
node, so that everything after this point (plan, check, serve) has a single input shape.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Literal

from launch.config import ConfigError, DeployConfig
from launch.vllm_versions import Target

Role = Literal["primary", "secondary"]

LOCAL_RULE = "the primary's local data parallel size"
"""The toolkit's API server count when none is given: one per engine on the primary, where vLLM runs them
all. vLLM >= 0.15 itself starts one per engine of the whole cluster in this layout (its internal load
balancing; the facts table has the line), which grows the primary's front-end processes with the node
count on a host whose CPUs also drive its own engines; before 0.15 it starts one, which bottlenecks a
multi-node DP group at its single front end. Local DP is the guide's choice and the same for every
version; `api_server_count` in the deploy file takes vLLM's or any other number."""


@dataclass(frozen=True)
class NodeLayout:
    """Where one node sits in the data parallel group."""

    role: Role
    node_rank: int
    primary_address: str
    """--data-parallel-address: where every node finds the coordinator."""
    rpc_port: int
    data_parallel_size: int
    data_parallel_size_local: int
    start_rank: int
    """First global data parallel rank on this node (0 on the primary)."""
    api_server_count: int | None
    """Only the primary runs API servers; None on secondaries."""
    node_address: str | None = None
    """This node's own address, when known (deploy file); the guide's secondaries do not say it."""
    api_server_rule: str = "given"
    """Where api_server_count comes from: "given" (deploy file, the guide's API_SERVERS) or LOCAL_RULE."""

    def __post_init__(self) -> None:
        if not 0 <= self.start_rank < self.data_parallel_size:
            raise ConfigError(
                f"start rank: {self.start_rank} is outside data parallel size {self.data_parallel_size} "
                f"(expected 0..{self.data_parallel_size - 1})"
            )
        if self.start_rank + self.data_parallel_size_local > self.data_parallel_size:
            raise ConfigError(
                f"local data parallel size: ranks {self.start_rank}..{self.start_rank + self.data_parallel_size_local - 1} "
                f"go past data parallel size {self.data_parallel_size} (expected start rank + local size <= {self.data_parallel_size})"
            )
        if self.role == "primary" and self.start_rank != 0:
            raise ConfigError(f"start rank: the primary starts at rank 0, got {self.start_rank}")
        if self.role == "secondary" and self.start_rank == 0:
            raise ConfigError("start rank: a secondary cannot start at rank 0 (that is the primary's)")


def layouts(config: DeployConfig) -> list[NodeLayout]:
    """One layout per node of the deploy file; start ranks are the running sum of local sizes."""
    total = sum(config.local_dp(rank) for rank in range(len(config.nodes)))
    primary = config.nodes[0]
    out, start = [], 0
    for rank, node in enumerate(config.nodes):
        local = config.local_dp(rank)
        out.append(
            NodeLayout(
                role="primary" if rank == 0 else "secondary",
                node_rank=rank,
                primary_address=primary.address,
                rpc_port=config.rpc_port,
                data_parallel_size=total,
                data_parallel_size_local=local,
                start_rank=start,
                api_server_count=(config.api_server_count or local) if rank == 0 else None,
                node_address=node.address,
                api_server_rule="given" if config.api_server_count else LOCAL_RULE,
            )
        )
        start += local
    return out


def api_server_note(layout: NodeLayout, target: Target) -> str | None:
    """The plan's line on the API server count: the rule used, and what the target vLLM alone would start."""
    if layout.api_server_count is None:
        return None
    expr, where = target.api_server_default()
    alone = _evaluate(
        expr,
        {"data_parallel_size": layout.data_parallel_size, "data_parallel_size_local": layout.data_parallel_size_local},
    )
    why = (
        "as given" if layout.api_server_rule == "given" else f"{LOCAL_RULE} (the toolkit's rule, docs/vllm-versions.md)"
    )
    return (
        f"api servers: {layout.api_server_count}, {why}; vLLM {target.version} alone would start {alone} "
        f"({expr} when --api-server-count is unset, {where})"
    )


def _evaluate(expr: str, sizes: dict[str, int]) -> int:
    """The facts table's default expressions: a number, a size, or `a or b` of those."""
    node = ast.parse(expr, mode="eval").body
    if isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
        return next((v for v in (_evaluate(ast.unparse(x), sizes) for x in node.values) if v), 0)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name) and node.id in sizes:
        return sizes[node.id]
    raise ValueError(f"api_server_count default {expr!r}: not a number, a size or an 'or' of those")
