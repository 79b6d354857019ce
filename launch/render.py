"""Plans as text: shell (`export` lines + the command) and runnable per-node scripts. Pure functions."""

from __future__ import annotations

import shlex

from launch.config import is_secret
from launch.netif import AutoIfname
from launch.plan import NodePlan

MASK = "***"


def _value(name: str, value: str | AutoIfname, *, script: bool) -> str:
    if isinstance(value, AutoIfname):
        return '"$socket_ifname"'
    if is_secret(name):
        # A script takes the secret from the environment it runs in; a printed plan never shows it.
        return f'"${{{name}:?set {name} in the environment}}"' if script else MASK
    return shlex.quote(value)


def env_lines(plan: NodePlan, *, script: bool = False) -> list[str]:
    lines = []
    auto = next((v for v in plan.env.values() if isinstance(v, AutoIfname)), None)
    if auto is not None:
        # Found on the node when the script runs; stop there if nothing matches.
        lines.append(f"socket_ifname={auto.shell()}")
        lines.append(f': "${{socket_ifname:?no {auto.what()} on this node}}"')
    for name, entries in plan.path_prepend.items():
        joined = shlex.quote(":".join(entries))
        lines.append(f"export {name}={joined}${{{name}:+:${name}}}")
    for name, value in plan.env.items():
        lines.append(f"export {name}={_value(name, value, script=script)}")
    return lines


def command_line(plan: NodePlan) -> str:
    return shlex.join(plan.argv)


def shell(plan: NodePlan) -> str:
    """What `plan` prints for one node: a comment header, the exports, then the command."""
    lines = [f"# {plan.title}"]
    lines += [f"# {note}" for note in plan.notes]
    lines += env_lines(plan)
    if plan.ray_head:
        lines.append(f"{shlex.join(plan.ray_head)} &   # then wait until the Ray cluster has {plan.ray_nodes} nodes")
    cmd = command_line(plan)
    if plan.log_file:
        cmd += f" 2>&1 | tee -a {shlex.quote(plan.log_file)}"
    lines.append(cmd)
    return "\n".join(lines) + "\n"


def script(plan: NodePlan) -> str:
    """A runnable script for one node (`plan --format shell --out DIR`)."""
    lines = ["#!/usr/bin/env bash", f"# {plan.title}"]
    lines += [f"# {note}" for note in plan.notes]
    lines += ["set -euo pipefail"]
    lines += env_lines(plan, script=True)
    # With a Ray head the script stays alive after vLLM to stop the head (no exec).
    run = "" if plan.ray_head else "exec "
    if plan.ray_head:
        lines += _ray_head_lines(plan)
    elif plan.argv[0] == "ray":
        lines += _ray_worker_wait(plan)
    if plan.log_file:
        lines.append(f"mkdir -p {shlex.quote(plan.log_file.rsplit('/', 1)[0])}")
        lines.append(f"{run}{command_line(plan)} > >(tee -a {shlex.quote(plan.log_file)}) 2>&1")
    else:
        lines.append(f"{run}{command_line(plan)}")
    return "\n".join(lines) + "\n"


def _ray_worker_wait(plan: NodePlan, bound_s: int = 600) -> list[str]:
    """`ray start --address` gives up after ~20 s: wait (bounded) for the head's port first."""
    host, port = plan.argv[plan.argv.index("--address") + 1].rsplit(":", 1)
    return [
        f"echo \"waiting up to {bound_s} s for the Ray head at {host}:{port}\" >&2",
        f"until (exec 3<>/dev/tcp/{host}/{port}) 2>/dev/null || [ \"$SECONDS\" -ge {bound_s} ]; do sleep 2; done",
    ]


def _ray_head_lines(plan: NodePlan, bound_s: int = 600) -> list[str]:
    """Start the Ray head, stop it on exit, and wait (bounded) until every node joined before vLLM starts."""
    from launch.ray_cluster import head_address

    address, nodes = head_address(plan.ray_head), plan.ray_nodes
    awk = "awk '/^Active:/{a=1;next} /:$/{a=0} a && / node_/{n+=$1} END{print n+0}'"
    return [
        f"{shlex.join(plan.ray_head)} &",
        "ray_head=$!",
        'trap \'kill "$ray_head" 2>/dev/null; wait "$ray_head"\' EXIT',
        f"ray_nodes() {{ ray status --address {address} 2>/dev/null | {awk}; }}",
        f"echo \"waiting up to {bound_s} s for {nodes} nodes in the Ray cluster at {address}\" >&2",
        f'until [ "$(ray_nodes)" -ge {nodes} ] || [ "$SECONDS" -ge {bound_s} ]; do sleep 2; done',
        f'[ "$(ray_nodes)" -ge {nodes} ] || {{ echo "error: ray: fewer than {nodes} nodes joined {address} within {bound_s} s" >&2; exit 3; }}',
    ]


def summary(plan: NodePlan) -> list[str]:
    """Aligned `key : value` lines, logged before a node starts (secrets masked)."""
    lay = plan.layout
    rows = [
        ("role", lay.role),
        ("node rank", str(lay.node_rank)),
        ("target", plan.target.describe()),
        ("data parallel", f"size {lay.data_parallel_size}, local {lay.data_parallel_size_local}, start rank {lay.start_rank}"),
        ("coordinator", f"{lay.primary_address}:{lay.rpc_port}"),
    ]
    if lay.api_server_count is not None:
        rows.append(("api servers", str(lay.api_server_count)))
    for name, value in plan.env.items():
        shown = value.describe() if isinstance(value, AutoIfname) else (MASK if is_secret(name) else value)
        rows.append((name, shown))
    rows.append(("command", command_line(plan)))
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}} : {v}" for k, v in rows]
