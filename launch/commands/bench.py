"""bench: `vllm bench serve` against the deploy file's API (the guide's defaults), recorded with every node's
plan and the versions here; --compare prints two recorded runs side by side."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from pathlib import Path

from launch.commands import VLLM_FIX, executable, plan_json, say
from launch.commands.verify import missing_logs
from launch.errors import ConfigError
from launch.request import from_args
from launch.resolve import resolve


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    from launch import benchmark, supervise

    if args.compare:
        try:
            a, b = (benchmark.load_result(Path(run)) for run in args.compare)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"--compare: {exc}") from None
        print("\n".join(benchmark.compare(a, b, (Path(args.compare[0]).name, Path(args.compare[1]).name))))
        return 0
    if args.logs:
        missing_logs(args.logs, "--logs")  # before a run of many minutes, not after it
    # `--` here is for `vllm bench serve`, not `vllm serve`: the plans get none of it.
    request = from_args(args, [])
    path = request.deploy
    if not path:
        raise ConfigError("deploy file: none given (pass FILE or set EP_DEPLOY)")
    from launch.resolve import load, with_overrides

    config = with_overrides(load(request)[0], request.overrides, path, request.group)
    if config.disaggregation is None and config.nodes[0].address is None and config.host in (None, "", "0.0.0.0", "::"):
        raise ConfigError(
            f"{path}: nodes[0].address: missing (expected the primary's address to reach its API; "
            f"a scheduler-placed deployment prints it: slurm-step allocation)"
        )
    out = Path(args.out or f"bench-results/{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    command = benchmark.argv(config, out, passthrough)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    if out.is_symlink() or (out.exists() and any(out.iterdir())):
        raise ConfigError(
            f"--out: {out} already holds a run (expected a new folder: a run's results are never replaced)"
        )
    exe = executable(args.vllm_bin, "vllm", VLLM_FIX)
    resolution = resolve(request)
    benchmark.record(out, command, [plan_json(p) for p in resolution.plans])
    say(f"benchmark run folder: {out}")
    code = supervise.run([exe, *command[1:]], os.environ, stop_timeout=10)
    if args.logs:
        from launch import verify

        found = verify.read([Path(log) for log in args.logs])
        problems = verify.problems(found, backend=resolution.deployments[0].backend)
        (out / "verify.txt").write_text("\n".join(found.lines() + [f"MISMATCH {p}" for p in problems]) + "\n")
    if (out / "result.json").exists():
        print("\n".join(benchmark.summary(benchmark.load_result(out))))
    return code
