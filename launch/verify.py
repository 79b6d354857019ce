"""What actually ran, read from vLLM's own log lines, and whether it is what the plan asked for.

    python -m launch verify LOGFILE... [--deploy FILE | --all2all-backend NAME]

Recognised (vLLM 0.10 .. 0.33 wordings): the vLLM version, the all2all manager vLLM chose
("Using AgRsAll2AllManager all2all manager." / older "Using PPLX all2all manager."), the MoE and
attention backends, FlashAttention's version, each DP/EP rank and the experts it holds, the NCCL version
(with NCCL_DEBUG=INFO), DeepGEMM use, and vLLM's own fall-back warnings. A backend that differs from the
one asked for fails, naming both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_PATTERNS = {
    "version": re.compile(r"(?:vLLM API server version|version) (\d+\.\d+\.\d+[\w.+]*)\s*$"),
    "engine_version": re.compile(r"Initializing a V1 LLM engine \(v([\w.+]+)\)"),
    "all2all": re.compile(r"Using (.+?) all2all manager"),
    "moe": re.compile(r"Using (\S+(?: \S+)?) (?:Unquantized |Fp8 |FP8 |Quantized )?MoE backend(?! out)"),
    "moe_choice": re.compile(r"Using (\S+) (?:\w+ )?MoE backend out of potential backends"),
    "attention": re.compile(r"Using (\S+) attention backend"),
    "flash_attn": re.compile(r"Using FlashAttention version (\d+)"),
    "ep_rank": re.compile(r"\[EP Rank (\d+)/(\d+)\] Expert parallelism is enabled.*?Local/global number of experts: (\d+)/(\d+)"
                          r"(?:.*?Experts local to global index map: ([\d\->, ]+))?"),
    "dp_rank": re.compile(r"is assigned as DP rank (\d+)"),
    "nccl": re.compile(r"NCCL version (\d+\.\d+\.\d+)"),
    "deep_gemm": re.compile(r"(Using DeepGemm|DeepGEMM)", re.IGNORECASE),
    "fallback": re.compile(r"(has been removed\. Falling back to '?(\w+)'?|falling back to \S+ all2all)", re.IGNORECASE),
}

# The class or label vLLM logs for each backend, squeezed to lowercase letters and digits.
_MANAGERS = {
    "agrs": "allgather_reducescatter", "allgatherreducescatter": "allgather_reducescatter",
    "naive": "naive", "pplx": "pplx",
    "deepepht": "deepep_high_throughput", "deepephighthroughput": "deepep_high_throughput",
    "deepepll": "deepep_low_latency", "deepeplowlatency": "deepep_low_latency",
    "deepepv2": "deepep_v2", "nixlep": "nixl_ep",
    "flashinferalltoall": "flashinfer_all2allv", "flashinferall2allv": "flashinfer_all2allv",
}


def backend_of(manager: str) -> str | None:
    """'AgRsAll2AllManager' -> allgather_reducescatter; 'PPLX' -> pplx; None when unknown."""
    key = re.sub(r"[^a-z0-9]", "", manager.lower()).removesuffix("all2allmanager").removesuffix("manager")
    if key in _MANAGERS:
        return _MANAGERS[key]
    return next((v for k, v in _MANAGERS.items() if key.startswith(k)), None)


@dataclass
class EpRank:
    rank: int
    size: int
    local_experts: int
    global_experts: int
    experts: list[int] = field(default_factory=list)

    def describe(self) -> str:
        span = f"experts {self.experts[0]}-{self.experts[-1]}" if self.experts else f"{self.local_experts} experts"
        return f"EP rank {self.rank}/{self.size}: {span} of {self.global_experts}"


@dataclass
class Findings:
    files: list[str] = field(default_factory=list)
    version: str | None = None
    all2all_manager: str | None = None
    moe_backends: set[str] = field(default_factory=set)
    attention_backends: set[str] = field(default_factory=set)
    flash_attention: str | None = None
    ep_ranks: dict[int, EpRank] = field(default_factory=dict)
    dp_ranks: set[int] = field(default_factory=set)
    nccl: str | None = None
    deep_gemm: bool = False
    fallbacks: list[str] = field(default_factory=list)

    @property
    def all2all_backend(self) -> str | None:
        return backend_of(self.all2all_manager) if self.all2all_manager else None

    def lines(self) -> list[str]:
        rows = [
            ("logs", ", ".join(self.files)),
            ("vLLM", self.version or "not found"),
            ("all2all manager", f"{self.all2all_manager} ({self.all2all_backend or 'unknown backend'})" if self.all2all_manager else "not found"),
            ("MoE backend", ", ".join(sorted(self.moe_backends)) or "not found"),
            ("attention", ", ".join(sorted(self.attention_backends)) + (f" (FlashAttention {self.flash_attention})" if self.flash_attention else "") or "not found"),
            ("DP ranks", ", ".join(map(str, sorted(self.dp_ranks))) or "not found"),
        ]
        rows += [("expert parallel", r.describe()) for _, r in sorted(self.ep_ranks.items())] or [("expert parallel", "not found")]
        rows += [("NCCL", self.nccl or "not logged (NCCL_DEBUG=INFO logs it)"), ("DeepGEMM", "used" if self.deep_gemm else "not seen")]
        rows += [("fallback", f) for f in self.fallbacks]
        width = max(len(k) for k, _ in rows)
        return [f"{k:<{width}} : {v}" for k, v in rows]


def read(paths: list[Path]) -> Findings:
    found = Findings(files=[str(p) for p in paths])
    for path in paths:
        with open(path, errors="replace") as f:
            for line in f:
                _scan(line.rstrip("\n"), found)
    return found


def _scan(line: str, found: Findings) -> None:
    p = _PATTERNS
    if (m := p["engine_version"].search(line)) or ("version" in line and (m := p["version"].search(line))):
        found.version = found.version or m.group(1)
    if m := p["all2all"].search(line):
        found.all2all_manager = m.group(1)
    if m := p["moe_choice"].search(line):
        found.moe_backends.add(m.group(1))
    if m := p["attention"].search(line):
        found.attention_backends.add(m.group(1))
    if m := p["flash_attn"].search(line):
        found.flash_attention = m.group(1)
    if m := p["ep_rank"].search(line):
        experts = [int(pair.split("->")[1]) for pair in (m.group(5) or "").split(",") if "->" in pair]
        rank = EpRank(int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)), sorted(experts))
        found.ep_ranks[rank.rank] = rank
    if m := p["dp_rank"].search(line):
        found.dp_ranks.add(int(m.group(1)))
    if m := p["nccl"].search(line):
        found.nccl = found.nccl or m.group(1)
    if p["deep_gemm"].search(line) and "not" not in line.lower() and "disabled" not in line.lower():
        found.deep_gemm = True
    if m := p["fallback"].search(line):
        found.fallbacks.append(line.split("] ", 1)[-1][:200])


def problems(found: Findings, *, backend: str | None, ep_size: int | None = None, deep_gemm: bool = False) -> list[str]:
    """Where what ran differs from what was asked for; empty when it matches."""
    out = []
    asked = backend or "allgather_reducescatter"  # vLLM's default since 0.11
    if found.all2all_manager is None:
        if ep_size and ep_size > 1:
            out.append("no all2all manager in the logs (expected one with expert parallelism; is this the primary's log?)")
    elif found.all2all_backend != asked:
        out.append(f"all2all backend: asked for {asked}, vLLM used {found.all2all_manager} ({found.all2all_backend or 'unknown'})")
    if ep_size:
        missing = sorted(set(range(ep_size)) - set(found.ep_ranks))
        if missing:
            out.append(f"expert parallelism: no log line from EP rank(s) {missing} of {ep_size}")
        sizes = {r.size for r in found.ep_ranks.values()}
        if sizes and sizes != {ep_size}:
            out.append(f"expert parallelism: EP size {sorted(sizes)} in the logs, {ep_size} planned")
    if deep_gemm and not found.deep_gemm:
        out.append("DeepGEMM: asked for (VLLM_USE_DEEP_GEMM=1) but the logs never show it in use")
    out += [f"vLLM fell back: {f}" for f in found.fallbacks]
    return out
