"""EPLB and dual-batch overlap: the deploy file's `eplb:` and `dbo:` as the target release's own flags.

What each release takes is read from its wheel (launch/vllm_facts.json, rows `eplb` and `dbo`; the table in
docs/vllm-versions.md): EPLB's settings as one `--eplb-config` JSON (the fields of that release's EPLBConfig)
or, in the oldest releases, as flags of their own; DBO's token thresholds as flags, and the all2all backends
its configuration requires. Checked here, before anything starts, as vLLM's configuration would refuse them:
- EPLB needs expert parallelism and more than one rank in the EP group (TP x DP > 1:
  vllm/config/parallel.py, "EPLB requires tensor, prefill-context, or data parallelism");
- DBO needs one of the backends of the release's row (vllm/config/vllm.py, under `use_ubatching`).
Whether (experts + redundant experts) divide over the EP ranks needs the model's config: preflight checks it
on the node (preflight/model.py expert_split), reading these same flags from the plan's command.
"""

from __future__ import annotations

import json
from typing import Any

from launch.config import DeployConfig, DualBatchOverlap, EplbSettings
from launch.errors import ConfigError
from launch.vllm_versions import Target, rows


def _first_with(feature: str) -> str:
    return next((r["version"] for r in rows() if r.get(feature, {}).get("exists")), "?")


def args(
    config: DeployConfig, target: Target, backend: str | None, data_parallel_size: int, where: str = ""
) -> list[str]:
    """The flags for ``config``'s eplb: and dbo: (the same on every node); ``where`` prefixes the field names in
    errors (``disaggregation.decode.`` for a group)."""
    out = []
    if config.eplb is not None:
        ep_ranks = config.tensor_parallel_size * data_parallel_size  # vLLM's EP group spans TP x DP
        out += eplb_args(config.eplb, target, config.enable_expert_parallel, ep_ranks, f"{where}eplb")
    if config.dbo is not None:
        used = target.check_backend(backend) if backend else None  # after the release's own rewrites
        out += dbo_args(config.dbo, target, used, f"{where}dbo")
    return out


def eplb_args(settings: EplbSettings, target: Target, expert_parallel: bool, ep_ranks: int, field: str) -> list[str]:
    row: dict[str, Any] = target.row.get("eplb", {"exists": False})
    if not row["exists"]:
        raise ConfigError(
            f"{field}: vLLM {target.version} has no EPLB (expected vllm_version >= {_first_with('eplb')})"
        )
    if not expert_parallel:
        raise ConfigError(f"{field}: needs enable_expert_parallel: true (vLLM balances experts over the EP ranks)")
    if ep_ranks <= 1:
        raise ConfigError(
            f"{field}: the EP group has 1 rank (expected tensor_parallel_size x data parallel ranks > 1: "
            "vLLM refuses EPLB without TP or DP)"
        )
    known = row["config"]["fields"] if "config" in row else row.get("flags", {})
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(
            f"{field}.{unknown[0]}: not an EPLB setting of vLLM {target.version} (expected one of: {', '.join(known)})"
        )
    args = ["--enable-eplb"]
    if "config" in row:
        return args + (["--eplb-config", json.dumps(settings, separators=(",", ":"))] if settings else [])
    for name, value in settings.items():
        flag = known[name]["flag"]
        if isinstance(value, bool):  # switches of vLLM's argparse: the flag when true; they default to false
            args += [flag] if value else []
        else:
            args += [flag, str(value)]
    return args


def dbo_args(dbo: DualBatchOverlap, target: Target, backend: str | None, field: str) -> list[str]:
    row: dict[str, Any] = target.row.get("dbo", {"exists": False})
    if not row["exists"]:
        raise ConfigError(
            f"{field}: vLLM {target.version} has no dual-batch overlap (expected vllm_version >= {_first_with('dbo')})"
        )
    used = backend or target.row["default"]["name"]
    needs = row["backends"]["names"]
    if used not in needs:
        raise ConfigError(
            f"{field}: needs all2all_backend one of {', '.join(needs)} in vLLM {target.version} "
            f"({row['backends']['at']}); the plan has {used}{'' if backend else ' (the default)'}"
        )
    args = ["--enable-dbo"]
    for name in ("decode_token_threshold", "prefill_token_threshold"):
        value = getattr(dbo, name)
        if value is not None:
            if name not in row["thresholds"]:
                raise ConfigError(f"{field}.{name}: vLLM {target.version} has no such threshold")
            args += [row["thresholds"][name]["flag"], str(value)]
    return args
