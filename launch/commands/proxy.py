"""proxy: vllm-router in front of the prefill and decode groups, started once both answer /health."""

from __future__ import annotations

import argparse
import os
import shlex
import time

from launch import router
from launch.commands import executable, say
from launch.errors import ConfigError, NodeDown
from launch.request import from_args
from launch.resolve import load


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    from launch import supervise, wait

    request = from_args(args, passthrough)
    config, path = load(request)
    if config.disaggregation is None:
        raise ConfigError(f"{path}: disaggregation: missing (serve-proxy fronts a prefill and a decode group)")
    command = router.argv(config)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    exe = executable(args.router_bin, "vllm-router", "pip install vllm-router, or pass --router-bin")
    deadline = time.monotonic() + args.wait_for_groups
    for name, url in router.health_urls(config).items():
        what = f"the {name} group's API at {url}"
        try:
            took = wait.until(lambda u=url: wait.healthy(u), what, max(0.0, deadline - time.monotonic()), say=say)
        except wait.WaitTimeout:
            raise NodeDown(
                f"{name}: {what} not ready within {args.wait_for_groups:g} s (start serve-{name} on its nodes first)"
            ) from None
        say(f"{name} is healthy at {url} (after {took:.1f} s)")
    return supervise.run([exe, *command[1:]], os.environ, stop_timeout=10, what="vllm-router")
