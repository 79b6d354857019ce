"""Pass/fail limits of the checks. Each has a default (or is derived from the GPU model / transport by
its check when the default is None) and can be overridden in the deploy file::

    preflight:
      shm_min_gib: 16
      intra_allreduce_busbw_min_gbps: 250
"""

from __future__ import annotations

from dataclasses import dataclass, field

KNOWN: dict[str, tuple[float | None, str]] = {
    "shm_min_gib": (1.0, "/dev/shm size (vLLM's API servers and NCCL's shared memory transport use it)"),
    "gpu_memory_used_max_mib": (
        2048.0,
        "memory in use on a GPU before vLLM starts (another process holds it otherwise)",
    ),
    "ib_rate_min_gbps": (100.0, "rate of every active InfiniBand / RoCE port"),
    "intra_allreduce_busbw_min_gbps": (None, "all-reduce bus bandwidth between this node's GPUs at the largest size"),
    "intra_alltoall_busbw_min_gbps": (None, "all-to-all bus bandwidth between this node's GPUs at the largest size"),
    "inter_allreduce_busbw_min_gbps": (None, "all-reduce bus bandwidth across nodes at the largest size"),
    "inter_alltoall_busbw_min_gbps": (None, "all-to-all bus bandwidth across nodes at the largest size"),
    "collective_timeout_s": (60.0, "longest a collective check may take before it counts as hung"),
    "rendezvous_timeout_s": (120.0, "longest the primary waits for every node to join"),
    "ep_timeout_s": (
        300.0,
        "longest the EP kernel check may take (NVSHMEM start, DeepEP v2's kernel compilation included)",
    ),
    "ep_bandwidth_min_gbps": (None, "EP dispatch + combine bandwidth per rank, as DeepEP's tests compute it"),
    "ep_memory_reserve_gib": (2.0, "GPU memory the EP budget keeps for CUDA graphs and activations it does not count"),
}


FIX = "write a number >= 0 in the deploy file's preflight: section, or leave the line out for the default"


class BadThreshold(Exception):
    """A check read a threshold the deploy file gives but not as a valid number: that check fails with the
    one-line error (the plugin records it), every other check runs."""


@dataclass(frozen=True)
class Thresholds:
    values: dict[str, float | None] = field(default_factory=dict)
    overridden: frozenset[str] = frozenset()
    invalid: dict[str, str] = field(default_factory=dict)
    """{name: one-line error} for thresholds the deploy file gives but not validly (config.load_deploy's set_aside)."""

    @classmethod
    def defaults(cls) -> Thresholds:
        return cls({name: default for name, (default, _) in KNOWN.items()})

    @classmethod
    def of(cls, given: dict[str, float], invalid: dict[str, str]) -> Thresholds:
        """The defaults, with the deploy file's values over them (launch/config.py's Preflight model has checked
        each name and value); ``invalid``: those it set aside, {name: one-line error}."""
        return cls({**cls.defaults().values, **given}, frozenset(given), dict(invalid))

    def get(self, name: str, derived: float | None = None) -> float | None:
        """The deploy file's value if given, else the default, else ``derived`` (GPU / transport based). Raises
        BadThreshold where the file gives it but not validly."""
        if name in self.invalid:
            raise BadThreshold(self.invalid[name])
        if name in self.overridden:
            return self.values[name]
        value = self.values.get(name)
        return derived if value is None else value
