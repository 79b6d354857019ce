"""What a rendered script asks of the toolkit on its node, so that the script holds no second implementation:

python -m launch ifname ADDRESS [--towards]        the interface holding ADDRESS (or the route towards it)
python -m launch wait-port HOST PORT [--timeout S] wait, bounded and saying so, until HOST:PORT accepts
python -m launch ray-wait HOST:PORT --nodes N      wait, bounded, until the Ray cluster has N active nodes
"""

from __future__ import annotations

import argparse
import os

from launch import netif, wait
from launch.commands import RAY_FIX, executable, say
from launch.errors import ConfigError, NodeDown
from launch.netif import AutoIfname


def ifname(args: argparse.Namespace) -> int:
    auto = AutoIfname(args.address, towards=args.towards)
    found = netif.find(auto)
    if not found:
        raise ConfigError(
            f"socket_ifname: auto found no {auto.what()} on this machine (expected this node's address "
            f"on one of: {', '.join(netif.interfaces())}; set network.socket_ifname)"
        )
    print(found)
    return 0


def wait_port(args: argparse.Namespace) -> int:
    what = f"{args.what} at {args.host}:{args.port}"
    try:
        took = wait.until(lambda: wait.port_open(args.host, args.port), what, args.timeout, say=say)
    except wait.WaitTimeout as exc:
        raise NodeDown(str(exc)) from None
    say(f"{what} accepts connections (after {took:.1f} s)")
    return 0


def ray_wait(args: argparse.Namespace) -> int:
    from launch import ray_cluster

    ray = executable(None, "ray", RAY_FIX)
    what = f"{args.nodes} nodes in the Ray cluster at {args.address}"
    try:
        took = wait.until(
            lambda: (ray_cluster.active_nodes(ray, args.address, os.environ) or 0) >= args.nodes,
            what,
            args.timeout,
            say=say,
            interval=2.0,
        )
    except wait.WaitTimeout as exc:
        raise NodeDown(f"ray: {exc}") from None
    say(f"{what} (after {took:.1f} s)")
    return 0


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    return {"ifname": ifname, "wait-port": wait_port, "ray-wait": ray_wait}[args.command](args)
