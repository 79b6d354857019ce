"""primary, secondary, serve, prefill, decode: resolve this node's plan, find its interface, run it supervised.

Secondaries wait (bounded, saying so) for what they join: the primary's coordination port, or its Ray head.
The primary reports when its API answers /health. Ctrl-C while waiting stops before anything started (130).
While vLLM runs, the launchers watch each other (launch/peers.py): a node of the group that goes away stops
this node's vLLM, and the launcher ends with exit code 3 and one line naming that node.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import replace

from env.paths import joined
from launch import netif, plan as planning, render
from launch.commands import RAY_FIX, VLLM_FIX, executable, say
from launch.errors import ConfigError, NodeDown
from launch.netif import AutoIfname
from launch.plan import NodePlan
from launch.request import from_args
from launch.resolve import resolve


def resolve_on_node(plan: NodePlan) -> NodePlan:
    """Fills in what can only be known on the node: the interface; refuses one that is not there."""
    env = dict(plan.env)
    for name, value in plan.env.items():
        if isinstance(value, AutoIfname):
            found = netif.find(value)
            if not found:
                raise ConfigError(
                    f"socket_ifname: auto found no {value.what()} on this machine "
                    f"(expected this node's address on one of: {', '.join(netif.interfaces())}; set --socket-ifname)"
                )
            env[name] = found
        elif name in planning.IFNAME_VARS and value not in netif.interfaces():
            raise ConfigError(
                f"socket_ifname: interface {value!r} does not exist on this machine (expected one of: {', '.join(netif.interfaces())})"
            )
    return replace(plan, env=env)


def child_environment(plan: NodePlan) -> dict[str, str]:
    """This process's environment, then the stack's variables and paths (ours first), then the plan's."""
    env = {k: v for k, v in os.environ.items() if k not in plan.unset}
    if plan.stack is not None:
        env.update(plan.stack.env)
    for name, entries in plan.path_prepend.items():
        env[name] = joined(entries, os.environ.get(name))
    for name, value in plan.env.items():
        assert isinstance(value, str), "resolve_on_node first"
        env[name] = value
    return env


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    request = from_args(args, passthrough)
    how = request.running
    (plan,) = resolve(request).plans
    plan = resolve_on_node(plan)
    if how.log_file:
        plan = replace(plan, log_file=how.log_file)
    if how.dry_run:
        sys.stdout.write(render.shell(plan))
        return 0
    env = child_environment(plan)
    if plan.kind == "ray-worker":
        argv = [executable(None, "ray", RAY_FIX, path=env.get("PATH")), *plan.argv[1:]]
    else:
        argv = [executable(how.vllm_bin, "vllm", VLLM_FIX, path=env.get("PATH")), *plan.argv[1:]]
    for line in render.summary(plan):
        print(f"[launch] {line}", file=sys.stderr)
    from launch import wait

    lay = plan.layout
    process = "the Ray worker" if plan.kind == "ray-worker" else "vLLM"
    if lay.role == "secondary" and how.wait_for_primary > 0:
        joins = plan.coordinator
        what = f"the primary's {'Ray head' if plan.kind == 'ray-worker' else 'coordination port'} {joins}"
        try:
            # vLLM's primary binds a ZeroMQ ROUTER there (the engines' handshake): a port that accepts but
            # sends no ZeroMQ greeting is another service. Ray's head (GCS) speaks gRPC: a connect suffices.
            took = wait.listener(
                joins.host, joins.port, how.wait_for_primary, what=what, greeting=plan.kind != "ray-worker", say=say
            )
        except wait.WaitTimeout as exc:
            raise NodeDown(
                f"primary: {exc} (start serve-primary on {joins.host} first; check the address and "
                f"firewall; --wait-for-primary 0 starts without waiting)"
            ) from None
        say(f"{what} accepts connections (after {took:.1f} s): starting {process}")
    health = plan.api.url("/health") if plan.api else None
    supervised = functools.partial(
        _supervised, argv, env, plan, process, log_file=plan.log_file, stop_timeout=how.stop_timeout,
        health_url=health, health_timeout=how.health_timeout,
    )  # fmt: skip
    if not plan.ray_head:
        return supervised()
    from launch import ray_cluster

    head = [executable(None, "ray", RAY_FIX, path=env.get("PATH")), *plan.ray_head.argv[1:]]
    try:
        with ray_cluster.head(head, env, plan.ray_nodes, how.wait_for_nodes, say=say):
            return supervised()
    except wait.WaitTimeout as exc:
        raise NodeDown(f"ray: {exc} (start serve on every secondary; they join with `ray start --address`)") from None
    except ray_cluster.Stopped as exc:
        say(f"{exc}: stopped before vLLM started")
        return 143 if str(exc) == "SIGTERM" else 130


def _supervised(argv: list[str], env: dict[str, str], plan: NodePlan, what: str, **options) -> int:
    """vLLM under launch/supervise.py, with the launchers' watch (launch/peers.py) where the plan has one: a
    node of the group that is gone stops it, and the launcher ends naming that node (exit code 3)."""
    from launch import peers, supervise

    if plan.watch is None:
        return supervise.run(argv, env, what=what, **options)
    with peers.Watch(replace(plan.watch, group=plan.group)) as watch:
        say(plan.watch.note)
        code = supervise.run(argv, env, what=what, stop_when=watch.gone, **options)
    if watch.message:
        raise NodeDown(f"{watch.message}; this node's {what} was stopped (it exited with {code})")
    return code
