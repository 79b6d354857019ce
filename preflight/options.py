"""Preflight's own command-line options, one table: pytest's option group (preflight/plugin.py), the first
section of `python -m preflight --help`, and the early check of the deploy file (preflight/__main__.py). A
module of its own so that reading it does not import the pytest plugin before pytest does."""

from __future__ import annotations

OPTIONS: list[tuple[str, dict]] = [
    ("--deploy", dict(default=None, help="deploy file (YAML); default: $EP_DEPLOY; without: check this node alone")),
    (
        "--node-rank",
        dict(type=int, default=None, help="this node's index in the deploy file (default: from its addresses)"),
    ),
    (
        "--group",
        dict(
            default=None,
            choices=("prefill", "decode"),
            help="disaggregated deployments: which group this node serves in",
        ),
    ),
    (
        "--cross-node",
        dict(
            action="store_true",
            default=False,
            help="every node of the deploy file runs preflight now: join the rendezvous at the primary and "
            "run the cross-node checks (default: this node alone; -m multinode asks for them too)",
        ),
    ),
    ("--socket-ifname", dict(default=None, help="override the deploy file's socket interface")),
    (
        "--transport",
        dict(default=None, choices=("ib", "roce", "efa", "tcp"), help="override the deploy file's transport"),
    ),
    ("--preflight-json", dict(default=None, help="write the JSON report here (default: none)")),
]
"""Our options, one table: pytest's group and `python -m preflight --help`'s first section."""
GROUP = ("preflight", "node preflight (vllm-ep-deploy)")


def usage() -> str:
    """Our options, as `python -m preflight --help` shows them before pytest's own."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m preflight",
        add_help=False,
        description="Checks this node before serving; every pytest option works too "
        "(-k, -m, -n N, --junitxml), listed after ours.",
    )
    group = parser.add_argument_group(GROUP[1])
    for flag, kwargs in OPTIONS:
        group.add_argument(flag, **{k: v for k, v in kwargs.items() if k != "default"})
    return parser.format_help()
