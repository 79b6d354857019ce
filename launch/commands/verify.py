"""verify: what vLLM's logs say ran (all2all manager, MoE and attention backends, EP ranks) against what was
asked for. A log in which nothing is recognised fails: it cannot show the plan was followed."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.errors import ConfigError
from launch.request import from_args
from launch.resolve import load


def missing_logs(logs: list[str], option: str = "") -> None:
    """Refuses log files that are not there, before anything runs."""
    missing = [log for log in logs if not Path(log).is_file()]
    if missing:
        where = f"{option}: " if option else ""
        raise ConfigError(f"{where}{missing[0]}: no such log file (expected vLLM's output, e.g. from --log-file)")


def recognised(found) -> bool:
    """Whether the logs held anything vLLM writes (a version, a backend, a rank)."""
    return bool(
        found.version
        or found.all2all_manager
        or found.moe_backends
        or found.attention_backends
        or found.ep_ranks
        or found.dp_ranks
    )


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    from launch import verify

    missing_logs(args.logs)
    backend, ep_size, deep_gemm = args.all2all_backend, args.ep_size, False
    if args.deploy:
        request = from_args(args, [])
        config, _ = load(request)
        backend = backend or config.all2all_backend or request.exported_backend
        if ep_size is None and config.enable_expert_parallel and config.disaggregation is None:
            ep_size = sum(config.local_dp(r) for r in range(len(config.nodes))) * config.tensor_parallel_size
        deep_gemm = config.env.get("VLLM_USE_DEEP_GEMM") == "1"
    found = verify.read([Path(log) for log in args.logs])
    for line in found.lines():
        print(line)
    if not recognised(found):
        print("# verdict: nothing recognised (expected vLLM's own output: are these the servers' logs?)")
        return 1
    problems = verify.problems(found, backend=backend, ep_size=ep_size, deep_gemm=deep_gemm)
    for problem in problems:
        print(f"MISMATCH {problem}")
    print(f"# verdict: {'MISMATCH' if problems else 'as planned'}")
    return 1 if problems else 0
