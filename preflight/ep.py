"""The EP kernels themselves: DeepEP's dispatch and combine, run on this node's GPUs with the buffer the
plan's vLLM backend will create, checked element by element, then timed the way DeepEP's tests time them.

NCCL passing says little about DeepEP: NVSHMEM's IBGDA start, its symmetric heap, the NIC it picks and the
kernels' own limits (hidden sizes) are below NCCL. This module runs one worker process per GPU
(``python -m preflight.ep --worker SPEC RANK``) with exactly the environment the launcher gives vLLM
(``NodeContext.env()``: stack paths, the plan's NVSHMEM / NCCL / fabric variables), in one process group
that the parent kills at the deadline, and says which rank did not finish, on which node, GPU and NIC.

The buffer, as vLLM 0.26.0 creates it (vllm/distributed/device_communicators/all2all.py):

- ``deepep_low_latency``: ``deep_ep.Buffer(group, num_nvl_bytes=VLLM_DEEPEP_BUFFER_SIZE_MB MiB,
  num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(tokens per rank, hidden, EP ranks, experts),
  low_latency_mode=True, num_qps_per_rank=experts / EP ranks, allow_nvlink_for_low_latency_mode=True,
  explicitly_destroy=True)`` (lines 283-325); dispatch ``low_latency_dispatch`` / ``low_latency_combine``;
- ``deepep_high_throughput``: ``deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes = the same across
  nodes else 0, low_latency_mode=False, num_qps_per_rank = 10 across nodes else 1)`` (lines 217-242);
  ``get_dispatch_layout`` + ``dispatch`` / ``combine``; DeepEP supports it on 2, 4 or 8 ranks per node;
- ``deepep_v2``: ``deep_ep.ElasticBuffer(device group, num_max_tokens_per_rank, hidden, num_topk,
  use_fp8_dispatch, allow_hybrid_mode / prefer_overlap_with_compute / allow_multiple_reduction from
  VLLM_DEEPEP_V2_*, explicitly_destroy=True)`` (lines 982-1001).

The data says who sent it and where it was: row t of rank s carries s in column 0, t in column 1 and
a pattern of (s, t, column) in the rest, all small integers, exact in BF16. Expert choices are a fixed
function of (s, t), so any rank can compute on the host what every other rank sent, what it must
receive and what combine must return (:func:`expected_rows`, :func:`expected_combined_ll`,
:func:`expected_combined_ht`); weights are powers of two, so the reference is exact too.

Bandwidth as DeepEP's tests compute it: low-latency (tests/test_low_latency.py, 73b6ea4) counts per
selected expert ``hidden + hidden / 128 * 4 + 16`` bytes of FP8 dispatch plus ``2 * hidden`` bytes of
BF16 combine, over the mean time of one FP8 dispatch + combine (first of 30 timed runs dropped, as its
``bench``); high-throughput (tests/test_intranode.py) counts the received BF16 rows, ``recv_x.numel() * 2``,
for dispatch and again for combine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

from preflight import collectives
from preflight.ep_memory import EP_BACKENDS

H200_LL_GBPS = 18.7
"""DeepEP's own tests/test_low_latency.py on one H200, one rank (64 tokens, hidden 2048, top-4, 8 experts):
dispatch + combine 18.7 GB/s with DeepEP 73b6ea4 (shared/facts/deepep-builds-1xH200)."""

LL_HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
"""Hidden sizes DeepEP's low-latency kernels are compiled for (csrc/kernels/launch.cuh:114-133, 73b6ea4;
the same list in v2's csrc/kernels/legacy/launch.cuh): any other fails with "Unsupported hidden"."""
HT_RANKS = (2, 4, 8)
"""Ranks per node DeepEP's intranode kernels support (tests/test_intranode.py: "Unsupported ranks")."""
QP_DEPTH_DEFAULT = 1024
"""NVSHMEM_QP_DEPTH when the plan does not set it: DeepEP's own default (deep_ep/buffer.py:111, 73b6ea4)."""
CHECK_TOKENS = 128
"""Tokens per rank in the check (fewer when the plan's buffer holds fewer): exact in BF16 as column 1."""
WARMUPS, ITERS = 10, 30
SENDER_MAX = 256  # column 0 holds the sender: integers above 256 are not exact in BF16


@dataclass(frozen=True)
class Shape:
    """What the kernels run: the model's shape and the plan's tokens per rank."""

    hidden: int
    experts: int
    topk: int
    max_tokens: int  # the buffer's tokens per rank (the plan's)

    @property
    def tokens(self) -> int:
        return min(CHECK_TOKENS, self.max_tokens)


def unsupported(backend: str, shape: Shape, world: int, ranks_per_node: int, qp_depth: int = QP_DEPTH_DEFAULT) -> str:
    """Why the kernels cannot run this shape on this many ranks (vLLM would fail the same way), or "".
    ``qp_depth``: NVSHMEM_QP_DEPTH as the plan sets it (DeepEP's default 1024)."""
    if backend not in EP_BACKENDS:
        return f"backend {backend!r} runs no EP kernel library (expected one of: {', '.join(EP_BACKENDS)})"
    if world > SENDER_MAX:
        return f"{world} ranks: more than the check's {SENDER_MAX}"
    if shape.experts % world:
        return f"{shape.experts} experts do not divide by {world} EP ranks"
    if shape.topk > shape.experts:
        return f"top-{shape.topk} of {shape.experts} experts"
    if backend == "deepep_low_latency" and shape.hidden not in LL_HIDDEN_SIZES:
        return (
            f"hidden size {shape.hidden} is not one DeepEP's low-latency kernels are built for "
            f"({', '.join(map(str, LL_HIDDEN_SIZES))})"
        )
    if backend == "deepep_low_latency" and qp_depth < (shape.max_tokens + 1) * 2:
        return (
            f"{shape.max_tokens} tokens per rank need NVSHMEM_QP_DEPTH >= {(shape.max_tokens + 1) * 2} "
            f"(DeepEP asserts it, deep_ep/buffer.py:601), it is {qp_depth}"
        )
    if backend == "deepep_high_throughput" and world > ranks_per_node and ranks_per_node != 8:
        return (
            f"across nodes DeepEP's high-throughput kernels need 8 GPUs per node (NUM_MAX_NVL_PEERS, "
            f"csrc/kernels/configs.cuh:3), this node has {ranks_per_node}"
        )
    if shape.hidden % 128:
        return f"hidden size {shape.hidden} is not a multiple of 128 (DeepEP's FP8 scales are per 128 channels)"
    return ""


def needs_more_ranks(backend: str, ranks_per_node: int) -> str:
    """Why this backend cannot run with this many ranks on one node (a skip, not a failure), or ""."""
    if backend == "deepep_high_throughput" and ranks_per_node not in HT_RANKS:
        return (
            f"high-throughput kernels need 2, 4 or 8 ranks on a node (DeepEP's intranode kernels), "
            f"this node has {ranks_per_node}"
        )
    return ""


# --- the data and its reference (pure; torch on any device) ---------------------------------------


def token_data(sender: int, tokens: int, hidden: int, device="cpu"):
    """Rank ``sender``'s tokens, BF16 [tokens, hidden]: sender, token index, then ((37s + 11t + c) % 61) - 30."""
    import torch

    t = torch.arange(tokens, dtype=torch.int32, device=device).view(-1, 1)
    c = torch.arange(hidden, dtype=torch.int32, device=device).view(1, -1)
    x = ((sender * 37 + t * 11 + c) % 61) - 30
    x[:, 0] = sender
    x[:, 1] = t.view(-1)
    return x.to(torch.bfloat16)


def routing(sender: int, tokens: int, experts: int, topk: int, device="cpu"):
    """Expert choices [tokens, topk] (int64): distinct experts per token, spread over all ranks; one
    slot of every seventh token is -1 (no expert), as DeepEP's own tests mask some."""
    import torch

    t = torch.arange(tokens, dtype=torch.int64, device=device).view(-1, 1)
    k = torch.arange(topk, dtype=torch.int64, device=device).view(1, -1)
    idx = (sender * 5 + t * 3 + k * (experts // topk)) % experts
    masked = (sender + t.view(-1)) % 7 == 3
    idx[masked, (t.view(-1)[masked] % topk)] = -1
    return idx


def weights(tokens: int, topk: int, device="cpu"):
    """Top-k weights [tokens, topk] (float32): 1/2, 1/4, ..., the last slot doubling the one before, so
    that every sum of products is exact in float32."""
    import torch

    w = torch.tensor(
        [2.0 ** -(k + 1) for k in range(topk - 1)] + [2.0 ** -(topk - 1)], dtype=torch.float32, device=device
    )
    return w.view(1, -1).expand(tokens, topk).contiguous()


def expert_scale(expert: int) -> int:
    """What expert ``expert`` multiplies its rows by before combine: 2 for every third expert, else 1
    (a power of two: exact in BF16), so a row combined from the wrong expert changes the sum."""
    return 2 if expert % 3 == 0 else 1


def owners(idx, local_experts: int):
    """The rank holding each chosen expert (-1 where no expert was chosen: -1 // n is -1)."""
    return idx.div(local_experts, rounding_mode="floor")


def expected_rows(rank: int, world: int, shape: Shape, expert: int | None = None) -> set[tuple[int, int]]:
    """(sender, token) pairs rank ``rank`` receives: for one of its experts (low-latency: one copy per
    expert), or for the rank as a whole (high-throughput and v2: one copy per rank)."""
    local = shape.experts // world
    out = set()
    for s in range(world):
        idx = routing(s, shape.tokens, shape.experts, shape.topk)
        hit = (idx == expert) if expert is not None else (owners(idx, local) == rank)
        out.update((s, int(t)) for t in hit.any(dim=1).nonzero().view(-1).tolist())
    return out


@functools.lru_cache(maxsize=64)
def _reference(sender: int, tokens: int, hidden: int):
    return token_data(sender, tokens, hidden)


def check_rows(rows, expected: set[tuple[int, int]], shape: Shape) -> tuple[int, str]:
    """(wrong elements, first problem) of received BF16 rows [n, hidden] against the (sender, token)
    pairs they must be: each row decoded from its first two columns, then compared whole."""
    import torch

    hidden = shape.hidden
    got = [(int(s), int(t)) for s, t in rows[:, :2].float().tolist()]
    wrong, problem = 0, ""
    seen = set()
    for i, (s, t) in enumerate(got):
        if (s, t) not in expected or (s, t) in seen:
            wrong += hidden
            problem = (
                problem
                or f"row {i} claims sender {s} token {t}: {'a duplicate' if (s, t) in seen else 'not sent to this rank'}"
            )
            continue
        seen.add((s, t))
        ref = _reference(s, shape.tokens, hidden)[t]
        bad = int((rows[i].to(torch.bfloat16) != ref).sum())
        if bad:
            wrong += bad
            problem = problem or f"row {i} (sender {s}, token {t}): {bad} of {hidden} elements differ"
    missing = expected - seen
    if missing:
        wrong += len(missing) * hidden
        s, t = min(missing)
        problem = problem or f"{len(missing)} rows never arrived (first: sender {s}, token {t})"
    return wrong, problem


def expected_combined_ll(rank: int, shape: Shape):
    """What low-latency combine returns to rank ``rank``: per token, the sum over its experts of
    weight x expert scale x the token (BF16, rounded once as DeepEP's float accumulation is)."""
    import torch

    x = token_data(rank, shape.tokens, shape.hidden).float()
    idx = routing(rank, shape.tokens, shape.experts, shape.topk)
    w = weights(shape.tokens, shape.topk)
    scale = torch.where(idx >= 0, 1 + (idx.remainder(3) == 0).long(), torch.zeros_like(idx)).float()
    factor = (w * scale).sum(dim=1, keepdim=True)
    return (x * factor).to(torch.bfloat16)


def expected_combined_ht(rank: int, world: int, shape: Shape):
    """What high-throughput / v2 combine returns: per token, its rows summed over the ranks that hold
    one of its experts (each sends its copy back unchanged)."""
    import torch

    x = token_data(rank, shape.tokens, shape.hidden).float()
    idx = routing(rank, shape.tokens, shape.experts, shape.topk)
    holders = owners(idx, shape.experts // world)
    copies = torch.stack([(holders == r).any(dim=1) for r in range(world)], dim=1).sum(dim=1, keepdim=True).float()
    return (x * copies).to(torch.bfloat16)


def compare(got, want) -> tuple[int, str]:
    import torch

    bad = got.to(torch.bfloat16) != want
    n = int(bad.sum())
    if not n:
        return 0, ""
    t = int(bad.any(dim=1).nonzero()[0])
    return (
        n,
        f"token {t}: {int(bad[t].sum())} of {want.shape[1]} elements differ (got {got[t, :4].float().tolist()}, want {want[t, :4].float().tolist()})",
    )


def ll_bytes(idx, hidden: int) -> tuple[int, int]:
    """(dispatch bytes, combine bytes) as DeepEP's low-latency test counts them: per selected expert,
    FP8 with per-128-channel scales and a 16-byte header, and BF16 back."""
    selections = int((idx != -1).sum())
    return int(selections * (hidden + hidden / 128 * 4 + 16)), selections * hidden * 2


def bandwidth_minimum(backend: str, gpu_names: Sequence[str], nodes: int) -> tuple[float | None, str]:
    """(minimum GB/s per rank, why) from what was measured on the same GPU, or (None, why) when nothing
    was: half of DeepEP's own figure, so a rank several times slower fails and noise does not."""
    names = set(gpu_names)
    if backend != "deepep_low_latency" or nodes > 1 or len(names) != 1:
        return None, "no figure measured for this backend / fabric: reported only (set preflight.ep_bandwidth_min_gbps)"
    if "H200" in next(iter(names)).upper().split():
        return H200_LL_GBPS / 2, f"half of DeepEP's own {H200_LL_GBPS} GB/s on one H200"
    return None, f"{next(iter(names))}: no figure measured: reported only (set preflight.ep_bandwidth_min_gbps)"


def judge_bandwidth(result: Result, minimum: float | None) -> tuple[bool, str]:
    """(passes, value): the slowest rank, named with its node and GPU, against ``minimum`` (None: reported only)."""
    slowest = result.slowest()
    value = (
        f"slowest rank {slowest.rank} ({slowest.host}, {slowest.gpu}): {slowest.gbps:.2f} GB/s, {slowest.time_us:.1f} us "
        f"per dispatch + combine ({result.world_size} ranks, {result.backend})"
    )
    return (minimum is None or slowest.gbps >= minimum), value


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / 1e9 / seconds if seconds > 0 else 0.0


# --- NVSHMEM's and DeepEP's own words, translated ----------------------------------------------------


@dataclass(frozen=True)
class Fix:
    said: str  # the line as printed
    cause: str
    fix: str


_REGKEYS = (
    "set the NVIDIA driver's options for GPU-initiated RDMA (options nvidia NVreg_EnableStreamMemOPs=1 "
    'NVreg_RegistryDwords="PeerMappingOverride=1;" in /etc/modprobe.d, then reload the driver)'
)
_PATTERNS: tuple[tuple[str, str, str], ...] = (
    (
        r"init failed for transport: IBGDA",
        "NVSHMEM could not start GPU-initiated RDMA (IBGDA)",
        f"{_REGKEYS}; or let the CPU ring the NIC: NVSHMEM_IBGDA_NIC_HANDLER=cpu with GDRCopy (gdrdrv loaded), or "
        "NVSHMEM_IBGDA_NIC_HANDLER=cpu_host_memory without it (NVSHMEM >= 3.4.5, env_defs.h:146); without a NIC "
        "(one node, NVLink only) the line is expected",
    ),
    (
        r"NVSHMEM_IBGDA_NIC_HANDLER=cpu requires GDRCopy",
        "the CPU-assisted IBGDA path was asked for without GDRCopy",
        "install GDRCopy and load gdrdrv (modprobe gdrdrv), or set NVSHMEM_IBGDA_NIC_HANDLER=cpu_host_memory",
    ),
    (
        r"nvshmem malloc failed|Out of memory in nvshmem_allocate|symmetric size",
        "DeepEP's RDMA buffer does not fit NVSHMEM's symmetric heap",
        "raise NVSHMEM_SYMMETRIC_SIZE above the EP memory budget's NVSHMEM row, or lower the tokens per rank "
        "(--max-num-batched-tokens) / VLLM_DEEPEP_BUFFER_SIZE_MB",
    ),
    (
        r"cuMemCreate failed|CUDA_ERROR_OUT_OF_MEMORY|CUDA out of memory|out of memory",
        "the GPU ran out of memory while allocating the EP buffers",
        "free the GPU (nvidia-smi: another process holds memory) or lower VLLM_DEEPEP_BUFFER_SIZE_MB / the tokens per rank; "
        "see the EP memory budget",
    ),
    (
        r"ibv_modify_qp|modify_qp.*fail|Invalid GID|gid.*(fail|invalid)",
        "the RDMA queue pair could not be connected (on RoCE: the wrong GID index)",
        "set network.nvshmem NVSHMEM_IB_GID_INDEX (and NCCL_IB_GID_INDEX) to the port's RoCE v2 GID index "
        "(the interconnect checks list it)",
    ),
    (
        r"ibv_reg_mr|Unable to register memory|mem_reg.*fail|nvidia.peermem",
        "the NIC cannot register GPU memory (GPUDirect RDMA)",
        "load nvidia_peermem (modprobe nvidia_peermem) or use a kernel and driver with DMA-BUF support",
    ),
    (
        r"not enumerated as an mlx5 device|No (IB|RDMA) devices? found|ibv_get_device_list|Unable to find.*(HCA|NIC)",
        "NVSHMEM found no usable Mellanox/NVIDIA NIC",
        "check ibv_devinfo (every port Active, link layer InfiniBand or Ethernet for RoCE); name the NICs in the "
        "deploy file's network.hcas (e.g. [mlx5_0, mlx5_1]), which sets NVSHMEM_HCA_LIST with NCCL's and UCX's lists",
    ),
    (
        r"bootstrap.*(fail|error)|NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME",
        "NVSHMEM's bootstrap between ranks failed",
        "set network.socket_ifname to the interface that carries traffic between nodes (the launcher sets "
        "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME to it)",
    ),
    (
        r"Unsupported hidden",
        "DeepEP's low-latency kernels are not built for this hidden size",
        f"use deepep_high_throughput, or a model whose hidden size is one of {', '.join(map(str, LL_HIDDEN_SIZES))}",
    ),
    (
        r"Unsupported number of EP ranks|Unsupported ranks",
        "DeepEP has no kernel configuration for this many ranks",
        "use 2, 4 or 8 GPUs per node (high-throughput), or deepep_low_latency",
    ),
    (
        r"DeepEP timeout|timeout check failed|CPU recv timeout",
        "a DeepEP kernel waited for a peer that never answered",
        "a rank is stuck or its NIC cannot reach the others: rerun with NVSHMEM_DEBUG=INFO and compare the NIC each rank picked",
    ),
    (
        r"Duplicate NCCL runtime found",
        "DeepEP v2 saw two NCCL libraries in one process",
        "put the NCCL that DeepEP v2 was built against first on PYTHONPATH/LD_LIBRARY_PATH so torch loads the same one",
    ),
    (
        r"undefined symbol: nccl",
        "DeepEP v2 needs NCCL >= 2.30.4 and found an older one",
        "install an NCCL >= 2.30.4 wheel and put it first on the stack's paths (python -m env build)",
    ),
)


def translate(text: str) -> list[Fix]:
    """NVSHMEM / DeepEP lines in a worker's output -> (cause, fix), each pattern once, in output order."""
    found: list[Fix] = []
    used: set[int] = set()
    for line in text.splitlines():
        for i, (pattern, cause, fix) in enumerate(_PATTERNS):
            if i not in used and re.search(pattern, line, re.IGNORECASE):
                used.add(i)
                found.append(Fix(line.strip()[:200], cause, fix))
                break
    return found


# --- where a rank runs ---------------------------------------------------------------------------


def nearest_nic(gpu_pci_path: str, nics: Mapping[str, str]) -> str | None:
    """The RDMA device whose PCI path shares the longest prefix with the GPU's (NVSHMEM's default choice:
    "the NIC on the node that is closest to it by distance", env_defs.h:320, v3.4.5)."""
    gpu = [p for p in gpu_pci_path.split("/") if p]
    best, depth = None, -1
    for name, path in sorted(nics.items()):
        parts = [p for p in path.split("/") if p]
        common = 0
        for a, b in zip(gpu, parts, strict=False):
            if a != b:
                break
            common += 1
        if common > depth:
            best, depth = name, common
    return best


def nic_for(env: Mapping[str, str], pci_bus_id: str, sysfs: str = "/sys") -> str:
    """The NIC this GPU's NVSHMEM uses: NVSHMEM_HCA_LIST when the plan names one, else the nearest."""
    if env.get("NVSHMEM_HCA_LIST"):
        return f"NVSHMEM_HCA_LIST={env['NVSHMEM_HCA_LIST']}"
    root = Path(sysfs)
    nics = {}
    with contextlib.suppress(OSError):
        for dev in sorted(os.listdir(root / "class" / "infiniband")):
            with contextlib.suppress(OSError):
                nics[dev] = os.path.realpath(root / "class" / "infiniband" / dev / "device")
    if not nics:
        return "no RDMA NIC"
    gpu = os.path.realpath(root / "bus" / "pci" / "devices" / pci_bus_id.lower()) if pci_bus_id else ""
    return nearest_nic(gpu, nics) or "unknown NIC"


# --- a run's result --------------------------------------------------------------------------------


@dataclass
class Rank:
    """One rank's figures."""

    rank: int
    host: str
    gpu: str  # cuda:N and PCI bus id
    name: str  # GPU name
    nic: str
    dispatch_wrong: int = 0
    combine_wrong: int = 0
    checked: int = 0  # elements compared
    problem: str = ""
    dispatch_bytes: int = 0
    combine_bytes: int = 0
    time_us: float = 0.0  # one dispatch + combine (mean)
    gbps: float = 0.0


@dataclass
class Result:
    backend: str
    world_size: int
    shape: dict
    buffer: dict = field(default_factory=dict)  # the arguments the Buffer was created with
    ranks: list[Rank] = field(default_factory=list)
    problem: str = ""
    unfinished: list[str] = field(default_factory=list)  # "rank R (host, cuda:N PCI, NIC): where"
    fixes: list[Fix] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def wrong(self) -> int:
        return sum(r.dispatch_wrong + r.combine_wrong for r in self.ranks)

    def slowest(self) -> Rank | None:
        return min(self.ranks, key=lambda r: r.gbps) if self.ranks else None


@dataclass(frozen=True)
class Spec:
    """What to run. Locally this process hosts the store; across nodes every node's workers meet at the
    primary's store (``store_host``), this node's ranks starting at ``rank_offset``."""

    backend: str
    nprocs: int
    shape: Shape
    timeout_s: float = 300.0
    nodes: int = 1
    deepep_buffer_mb: int = 1024
    store_host: str | None = None
    store_port: int = 0
    store_prefix: str = "preflight/ep/"
    rank_offset: int = 0
    world_size: int | None = None

    @property
    def world(self) -> int:
        return self.world_size or self.nprocs


def buffer_args(spec: Spec) -> dict:
    """The keyword arguments vLLM gives the backend's buffer (see the module docstring), less the group."""
    mb = spec.deepep_buffer_mb * 1024 * 1024
    if spec.backend == "deepep_low_latency":
        return {
            "num_nvl_bytes": mb,
            "num_rdma_bytes": "size hint",
            "low_latency_mode": True,
            "num_qps_per_rank": spec.shape.experts // spec.world,
            "allow_nvlink_for_low_latency_mode": True,
            "explicitly_destroy": True,
        }
    if spec.backend == "deepep_high_throughput":
        internode = spec.nodes > 1
        return {
            "num_nvl_bytes": mb,
            "num_rdma_bytes": mb if internode else 0,
            "low_latency_mode": False,
            "num_qps_per_rank": 10 if internode else 1,
            "explicitly_destroy": True,
        }
    return {
        "num_max_tokens_per_rank": spec.shape.max_tokens,
        "hidden": spec.shape.hidden,
        "num_topk": spec.shape.topk,
        "use_fp8_dispatch": False,
        "allow_hybrid_mode": False,
        "prefer_overlap_with_compute": False,
        "allow_multiple_reduction": False,
        "explicitly_destroy": True,
    }


def world_layout(
    ready: Mapping[int, Mapping], missing: Sequence[int], me: int, addresses: Sequence[str]
) -> tuple[int, int, str]:
    """Across nodes: (this node's first global rank, the world size, a problem naming the nodes that cannot
    take part). Every node publishes {problem, nprocs, backend, shape} before any starts its workers, so a
    node without DeepEP or GPUs fails every node at once instead of leaving the others to hang."""

    def name(r: int) -> str:
        return f"node {r} ({addresses[r]})" if r < len(addresses) else f"node {r}"

    if missing:
        return (
            0,
            0,
            f"{', '.join(map(name, missing))} did not reach the EP check (each node runs it after its own checks)",
        )
    bad = [f"{name(r)}: {ready[r]['problem']}" for r in sorted(ready) if ready[r].get("problem")]
    if bad:
        return 0, 0, "; ".join(bad)
    for key in ("backend", "shape"):
        values = {json.dumps(ready[r].get(key), sort_keys=True) for r in ready}
        if len(values) > 1:
            return (
                0,
                0,
                f"nodes disagree on the {key}: " + ", ".join(f"{name(r)} {ready[r].get(key)}" for r in sorted(ready)),
            )
    offset = sum(ready[r]["nprocs"] for r in sorted(ready) if r < me)
    return offset, sum(ready[r]["nprocs"] for r in ready), ""


# --- the parent ------------------------------------------------------------------------------------


def run(spec: Spec, env: Mapping[str, str]) -> Result:
    """Runs the workers; never waits longer than ``spec.timeout_s`` (+ a few seconds to reap them)."""
    import torch.distributed as dist

    start = time.monotonic()
    result = Result(spec.backend, spec.world, asdict(spec.shape), buffer_args(spec))
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(collectives.ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    with tempfile.TemporaryDirectory(prefix="ep-preflight-") as work:
        store = None
        host, port = spec.store_host, spec.store_port
        if host is None:
            store = dist.TCPStore(
                "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=spec.timeout_s)
            )
            host, port = "127.0.0.1", store.port
        job = {
            **asdict(spec),
            "store_host": host,
            "store_port": port,
            "workdir": work,
            "pg_timeout_s": spec.timeout_s + 30,
        }
        (Path(work) / "spec.json").write_text(json.dumps(job))
        workers: list[collectives._Worker] = []
        try:
            pgid = 0
            for local in range(spec.nprocs):
                rank = spec.rank_offset + local
                log, err = Path(work) / f"rank-{rank}.jsonl", Path(work) / f"rank-{rank}.err"
                with open(err, "wb") as errf:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "preflight.ep", "--worker", str(Path(work) / "spec.json"), str(local)],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=errf,
                        stderr=subprocess.STDOUT,
                        process_group=pgid,
                    )
                pgid = pgid or proc.pid
                workers.append(collectives._Worker(local, rank, proc, log, err))
            timed_out, codes = collectives._wait(workers, start + spec.timeout_s)
        finally:
            collectives._stop([w.proc for w in workers])
        result.seconds = round(time.monotonic() - start, 3)
        explain(
            result, [(w.rank, w.events(), codes.get(w.rank), _read(w.err)) for w in workers], timed_out, spec.timeout_s
        )
        del store
    return result


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


_STEPS = {
    "store": "connecting to the store",
    "init": "in init_process_group",
    "identity": "after start",
    "buffer": "creating the DeepEP buffer (NVSHMEM init)",
    "dispatch": "in dispatch",
    "combine": "in combine",
    "timing": "timing dispatch + combine",
    "exchange": "exchanging results",
    "result": "finished",
    "error": "failed",
}


def explain(
    result: Result, workers: Sequence[tuple[int, list[dict], int | None, str]], timed_out: bool, timeout_s: float
) -> None:
    """Fills the result from the workers' progress lines: the ranks' figures when all finished, else the
    problem naming every rank that did not, with its node, GPU and NIC and where it was."""
    text = "\n".join(out for _, _, _, out in workers)
    result.fixes = translate(text)
    done = [events for _, events, _, _ in workers if any(e.get("at") == "result" for e in events)]
    if len(done) == len(workers) and workers:
        final = next(e for e in done[0] if e.get("at") == "result")
        result.ranks = [Rank(**r) for r in final["ranks"]]
        return
    lines, first_error = [], ""
    for rank, events, code, out in workers:
        if any(e.get("at") == "result" for e in events):
            continue
        who = next((e for e in events if e.get("at") == "identity"), None)
        where = f"{who['host']}, {who['gpu']}, {who['nic']}" if who else "identity unknown: it never started"
        last = next((e for e in reversed(events) if e.get("at") != "error"), None)
        state = _STEPS.get(last.get("at"), last.get("at")) if last else "not started (python / torch import)"
        error = next((e["error"] for e in events if e.get("at") == "error"), "")
        if not error and code not in (None, 0):
            tail = [ln.strip() for ln in out.splitlines() if ln.strip()]
            error = f"exited with code {code}" + (f": {tail[-1][:200]}" if tail else "")
        first_error = first_error or (f"rank {rank}: {error}" if error else "")
        lines.append(f"rank {rank} ({where}): {state}" + (f" ({error})" if error else ""))
    result.unfinished = lines
    head = first_error or (f"did not finish within {timeout_s:g} s" if timed_out else "stopped without a result")
    result.problem = f"{head}; did not finish: {'; '.join(lines)}"


# --- the worker --------------------------------------------------------------------------------------


def _topk_dtype():
    """deep_ep.topk_idx_t where DeepEP exports it (73b6ea4, v2); int64 before (c18eabd)."""
    import deep_ep
    import torch

    return getattr(deep_ep, "topk_idx_t", torch.int64)


def _bench(fn, warmups: int = WARMUPS, iters: int = ITERS) -> float:
    """Mean seconds of ``fn`` over CUDA events, the first timed run dropped (DeepEP tests/utils.py bench)."""
    import torch

    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)][1:]
    return sum(times) / len(times)


def _low_latency(buffer, rank: int, world: int, shape: Shape, me: Rank, progress) -> None:
    import torch

    tokens, local = shape.tokens, shape.experts // world
    x = token_data(rank, tokens, shape.hidden, "cuda")
    idx = routing(rank, tokens, shape.experts, shape.topk, "cuda").to(_topk_dtype())
    w = weights(tokens, shape.topk, "cuda")
    progress("dispatch")
    recv, count, handle, event, hook = buffer.low_latency_dispatch(
        x, idx, shape.max_tokens, shape.experts, use_fp8=False, async_finish=False, return_recv_hook=False
    )
    torch.cuda.synchronize()
    for i in range(local):
        expert = rank * local + i
        n = int(count[i])
        wrong, problem = check_rows(recv[i, :n].cpu(), expected_rows(rank, world, shape, expert), shape)
        me.dispatch_wrong += wrong
        me.checked += n * shape.hidden
        me.problem = me.problem or (f"dispatch, expert {expert}: {problem}" if problem else "")
    progress("combine")
    scale = torch.tensor(
        [expert_scale(rank * local + i) for i in range(local)], dtype=torch.bfloat16, device="cuda"
    ).view(-1, 1, 1)
    replies = (recv * scale).contiguous()
    out, event, hook = buffer.low_latency_combine(replies, idx, w, handle, async_finish=False, return_recv_hook=False)
    torch.cuda.synchronize()
    wrong, problem = compare(out.cpu(), expected_combined_ll(rank, shape))
    me.combine_wrong, me.checked = wrong, me.checked + out.numel()
    me.problem = me.problem or (f"combine: {problem}" if problem else "")
    progress("timing")

    def once() -> None:  # DeepEP's timed case: FP8 dispatch, BF16 combine
        r, _, h, _, _ = buffer.low_latency_dispatch(
            x, idx, shape.max_tokens, shape.experts, use_fp8=True, async_finish=False, return_recv_hook=False
        )
        buffer.low_latency_combine(replies, idx, w, h, async_finish=False, return_recv_hook=False)

    seconds = _bench(once)
    me.dispatch_bytes, me.combine_bytes = ll_bytes(idx, shape.hidden)
    me.time_us, me.gbps = seconds * 1e6, gbps(me.dispatch_bytes + me.combine_bytes, seconds)


def _high_throughput(buffer, rank: int, world: int, shape: Shape, me: Rank, progress, v2: bool) -> None:
    import torch

    x = token_data(rank, shape.tokens, shape.hidden, "cuda")
    idx = routing(rank, shape.tokens, shape.experts, shape.topk, "cuda").to(_topk_dtype())
    w = weights(shape.tokens, shape.topk, "cuda")
    progress("dispatch")
    if v2:

        def dispatch():
            recv, _, recv_w, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=shape.experts)
            return recv, recv_w, handle

        def combine(recv, recv_w, handle):
            return buffer.combine(recv, handle, topk_weights=recv_w)[0]
    else:
        layout = buffer.get_dispatch_layout(idx, shape.experts)
        num_per_rank, num_per_rdma, num_per_expert, in_rank, _ = layout

        def dispatch():
            recv, _, recv_w, _, handle, _ = buffer.dispatch(
                x,
                topk_idx=idx,
                topk_weights=w,
                num_tokens_per_rank=num_per_rank,
                num_tokens_per_rdma_rank=num_per_rdma,
                is_token_in_rank=in_rank,
                num_tokens_per_expert=num_per_expert,
            )
            return recv, recv_w, handle

        def combine(recv, recv_w, handle):
            return buffer.combine(recv, handle, topk_weights=recv_w)[0]

    recv, recv_w, handle = dispatch()
    torch.cuda.synchronize()
    wrong, problem = check_rows(recv.cpu(), expected_rows(rank, world, shape), shape)
    me.dispatch_wrong, me.checked = wrong, recv.numel()
    me.problem = f"dispatch: {problem}" if problem else ""
    progress("combine")
    out = combine(recv, recv_w, handle)
    torch.cuda.synchronize()
    wrong, problem = compare(out.cpu(), expected_combined_ht(rank, world, shape))
    me.combine_wrong, me.checked = wrong, me.checked + out.numel()
    me.problem = me.problem or (f"combine: {problem}" if problem else "")
    progress("timing")
    t_dispatch = _bench(dispatch)
    t_combine = _bench(lambda: combine(recv, recv_w, handle))
    me.dispatch_bytes = me.combine_bytes = recv.numel() * 2  # DeepEP's "NVL" bytes: the received BF16 rows
    me.time_us = (t_dispatch + t_combine) * 1e6
    me.gbps = gbps(me.dispatch_bytes + me.combine_bytes, t_dispatch + t_combine)


def _make_buffer(spec: Spec, group, device_group):
    import deep_ep

    args = buffer_args(spec)
    if spec.backend == "deepep_v2":
        return deep_ep.ElasticBuffer(device_group, **args)
    if args["num_rdma_bytes"] == "size hint":
        args["num_rdma_bytes"] = deep_ep.Buffer.get_low_latency_rdma_size_hint(
            spec.shape.max_tokens, spec.shape.hidden, spec.world, spec.shape.experts
        )
    return deep_ep.Buffer(group, **args)


def worker(spec_file: str, local_rank: int) -> int:
    job = json.loads(Path(spec_file).read_text())
    shape = Shape(**job["shape"])
    spec = Spec(**{k: job[k] for k in Spec.__dataclass_fields__ if k != "shape"}, shape=shape)
    rank, world = spec.rank_offset + local_rank, spec.world
    progress = collectives._Progress(Path(job["workdir"]) / f"rank-{rank}.jsonl")
    try:
        import torch
        import torch.distributed as dist

        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(device)
        pci = f"{getattr(props, 'pci_domain_id', 0):04x}:{getattr(props, 'pci_bus_id', 0):02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        me = Rank(rank, socket.gethostname(), f"cuda:{local_rank} {pci}", props.name, nic_for(os.environ, pci))
        progress("identity", host=me.host, gpu=me.gpu, nic=me.nic)
        timeout = timedelta(seconds=job["pg_timeout_s"])
        progress("store")
        store = dist.TCPStore(job["store_host"], job["store_port"], is_master=False, timeout=timeout)
        progress("init")
        dist.init_process_group(
            "nccl",
            store=dist.PrefixStore(spec.store_prefix, store),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device,
        )
        cpu_group = dist.new_group(list(range(world)), backend="gloo")  # vLLM hands DeepEP v1 its CPU group
        progress("buffer")
        buffer = _make_buffer(spec, cpu_group, dist.group.WORLD)
        if spec.backend == "deepep_low_latency":
            _low_latency(buffer, rank, world, shape, me, progress)
        else:
            _high_throughput(buffer, rank, world, shape, me, progress, v2=spec.backend == "deepep_v2")
        progress("exchange")
        everyone: list = [None] * world
        dist.all_gather_object(everyone, asdict(me), group=cpu_group)
        progress("result", ranks=everyone)
        buffer.destroy()
        dist.barrier(group=cpu_group)
        dist.destroy_process_group()
        return 0
    except Exception as exc:  # the parent reports it, with where this rank was
        progress("error", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:400])
        return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"] and len(sys.argv) == 4:
        sys.exit(worker(sys.argv[2], int(sys.argv[3])))
    sys.exit("usage: python -m preflight.ep --worker SPEC_FILE LOCAL_RANK (started by preflight itself)")
