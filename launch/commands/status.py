"""status: every group's /health and the primary's Prometheus /metrics, one line per node (launch/status.py);
exit 1 when a node is down."""

from __future__ import annotations

import argparse

from launch.errors import ConfigError
from launch.request import from_args
from launch.resolve import load


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    from launch import status

    if not 0 < args.timeout <= 600:
        raise ConfigError(f"--timeout: {args.timeout:g} is out of range (expected 0 < seconds <= 600)")
    config, source = load(from_args(args, passthrough))
    lines, healthy = status.report(config, source, args.timeout, args.ranks)
    print("\n".join(lines))
    return 0 if healthy else 1
