"""What actually ran, read from vLLM's own log lines, and whether it is what the plan asked for.

    python -m launch verify LOGFILE... [--deploy FILE | --all2all-backend NAME]

Recognised: the vLLM version, the all2all manager vLLM chose (every line the releases of
launch/vllm_facts.json log: "Using AgRsAll2AllManager all2all manager.", older "Using PPLX all2all
manager.", "Using Flashinfer all2allv manager."), the MoE and attention backends, FlashAttention's version,
each DP/EP rank and the experts it holds, the NCCL version (with NCCL_DEBUG=INFO), DeepGEMM use, and vLLM's
own fall-back warnings. A backend that differs from the one asked for fails, naming both; with the version
found in the logs, "asked for" follows that release's facts (its default, the names its config rewrites).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import InvalidVersion, Version

from launch import vllm_versions
from launch.config import ConfigError

_VERSION = r"(\d+\.\d+(?:\.\d+)*(?:[.+-][\w.+]*)?)"
_PATTERNS = {
    # Only vLLM's own wordings: the engine's first line, the API server's, and the start-up banner's
    # "<logo> version X". A bare "version X" would also take NCCL's "NCCL version 2.28.9".
    "engine_version": re.compile(r"Initializing a V1 LLM engine \(v" + _VERSION + r"\)"),
    "version": re.compile(r"vLLM (?:API )?server version " + _VERSION),
    "banner_version": re.compile(r"[\u2580-\u259f]\s+version " + _VERSION + r"\s*$"),
    "all2all": re.compile(r"Using (.+?) all2allv? manager"),
    "moe": re.compile(r"Using (\S+(?: \S+)?) (?:Unquantized |Fp8 |FP8 |Quantized )?MoE backend(?! out)"),
    "moe_choice": re.compile(r"Using (\S+) (?:\w+ )?MoE backend out of potential backends"),
    "attention": re.compile(r"Using (\S+) attention backend"),
    "flash_attn": re.compile(r"Using FlashAttention version (\d+)"),
    "ep_rank": re.compile(
        r"\[EP Rank (\d+)/(\d+)\] Expert parallelism is enabled.*?Local/global number of experts: (\d+)/(\d+)"
        r"(?:.*?Experts local to global index map: ([\d\->, ]+))?"
    ),
    "dp_rank": re.compile(r"is assigned as DP rank (\d+)"),
    "nccl": re.compile(r"NCCL version (\d+\.\d+\.\d+)"),
    "deep_gemm": re.compile(r"(Using DeepGemm|DeepGEMM)", re.IGNORECASE),
    "fallback": re.compile(
        r"(has been removed\. Falling back to '?(\w+)'?|falling back to \S+ all2all)", re.IGNORECASE
    ),
}


def _squeeze(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", label.lower())


def label_of(log_line: str) -> str | None:
    """'Using PPLX all2all manager.' -> 'PPLX': what the all2all pattern captures from a line vLLM logs."""
    m = _PATTERNS["all2all"].search(log_line)
    return m.group(1) if m else None


@functools.cache
def _managers() -> dict[str, str]:
    """Every manager label the releases of the facts table log, squeezed, -> the backend it stands for.
    A label several names share (AgRsAll2AllManager: naive and allgather_reducescatter) stands for the name
    that is neither rewritten by that release's config nor deprecated in its communicator."""
    out: dict[str, str] = {}
    for row in vllm_versions.rows():
        for name, entries in row["backends"].items():
            for entry in entries:
                label = label_of(entry["log"] or "") or entry["manager"]
                secondary = entry.get("deprecated") or name in row["rewrites"]
                if not secondary or _squeeze(label) not in out:
                    out[_squeeze(label)] = name
    return out


def backend_of(manager: str) -> str | None:
    """'AgRsAll2AllManager' -> allgather_reducescatter; 'PPLX' -> pplx; None when no release logs it."""
    return _managers().get(_squeeze(manager))


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
            (
                "all2all manager",
                f"{self.all2all_manager} ({self.all2all_backend or 'unknown backend'})"
                if self.all2all_manager
                else "not found",
            ),
            ("MoE backend", ", ".join(sorted(self.moe_backends)) or "not found"),
            (
                "attention",
                ", ".join(sorted(self.attention_backends))
                + (f" (FlashAttention {self.flash_attention})" if self.flash_attention else "")
                or "not found",
            ),
            ("DP ranks", ", ".join(map(str, sorted(self.dp_ranks))) or "not found"),
        ]
        rows += [("expert parallel", r.describe()) for _, r in sorted(self.ep_ranks.items())] or [
            ("expert parallel", "not found")
        ]
        rows += [
            ("NCCL", self.nccl or "not logged (NCCL_DEBUG=INFO logs it)"),
            ("DeepGEMM", "used" if self.deep_gemm else "not seen"),
        ]
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
    if ("version" in line or "engine (v" in line) and any(
        m := p[k].search(line) for k in ("engine_version", "version", "banner_version")
    ):
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
    target = _target(found.version)
    # Without a version in the logs: vLLM's default from 0.11 on (0.10 defaulted to naive).
    asked = backend or (target.default_backend if target else "allgather_reducescatter")
    if found.all2all_manager is None:
        if ep_size and ep_size > 1:
            out.append(
                "no all2all manager in the logs (expected one with expert parallelism; is this the primary's log?)"
            )
    elif not _as_asked(found.all2all_manager, asked, target):
        out.append(
            f"all2all backend: asked for {asked}, vLLM used {found.all2all_manager} ({found.all2all_backend or 'unknown'})"
        )
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


def _target(version: str | None) -> vllm_versions.Target | None:
    """The facts of the release the logs name; None when they name none the table covers."""
    if version is None:
        return None
    try:
        target = vllm_versions.Target(Version(Version(version).base_version), "logs")
        target.row  # noqa: B018 - refuses a version older than the table
    except (InvalidVersion, ConfigError):
        return None
    return target


def _as_asked(manager: str, asked: str, target: vllm_versions.Target | None) -> bool:
    """The logged manager is the one vLLM builds for `asked` (in that release, when the logs name it)."""
    if target is not None:
        expected = {_squeeze(label_of(line) or line) for line in target.managers(asked)}
        if expected:
            return _squeeze(manager) in expected
    return backend_of(manager) == asked
