"""check: every node's `vllm serve` argv through the installed vLLM's own parser (launch/check.py)."""

from __future__ import annotations

import argparse

from launch import check
from launch.request import from_args
from launch.resolve import resolve


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    request = from_args(args, passthrough)
    plans = list(resolve(request).plans)
    return check.report(plans, timeout=args.timeout, python=request.vllm_python)
