"""Node roles and data parallel ranks: who is primary, who starts at which rank.

Both the deploy file and the guide's positional arguments end up here, as one :class:`NodeLayout` per
node, so that everything after this point (plan, check, serve) has a single input shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from launch.config import ConfigError, DeployConfig

Role = Literal["primary", "secondary"]


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
            )
        )
        start += local
    return out
