"""Plans as text: shell (`export` lines + the command) and runnable per-node scripts. Pure functions.

What only the node can know is asked of the toolkit on the node, never re-implemented in shell nor baked in
from the machine that made the plan: the interface that holds an address (`python -m launch ifname`), the
stack's PYTHONPATH / LD_LIBRARY_PATH / NVSHMEM_DIR (`python -m env paths`), the nodes of the Ray cluster
(`python -m launch ray-wait`). The toolkit's Python is ``$EP_PYTHON`` on the node, else ``python``.
"""

from __future__ import annotations

import shlex

from launch.config import is_secret
from launch.netif import AutoIfname
from launch.plan import NodePlan

MASK = "***"
PYTHON = '"${EP_PYTHON:-python}"'
"""How a rendered script runs the toolkit on the node."""


def _value(name: str, value: str | AutoIfname, *, script: bool) -> str:
    if isinstance(value, AutoIfname):
        return '"$socket_ifname"'
    if is_secret(name):
        # A script takes the secret from the environment it runs in; a printed plan never shows it.
        return f'"${{{name}:?set {name} in the environment}}"' if script else MASK
    return shlex.quote(value)


def env_lines(plan: NodePlan, *, script: bool = False) -> list[str]:
    lines = [f"unset {name}  # this vLLM lets it override the plan's flag" for name in plan.unset]
    auto = next((v for v in plan.env.values() if isinstance(v, AutoIfname)), None)
    if auto is not None:
        # Found on the node when the script runs (the same lookup `serve` does); stop there if nothing matches.
        toward = " --towards" if auto.towards else ""
        lines.append(f"socket_ifname=$({PYTHON} -m launch ifname {shlex.quote(auto.address)}{toward})")
        lines.append(f': "${{socket_ifname:?no {auto.what()} on this node}}"')
    if plan.stack is not None:
        # The node's own stack paths (its prefix, its site-packages), ours before what it has.
        lines.append(f'eval "$({PYTHON} -m env paths --profile {shlex.quote(plan.profile)})"')
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
        lines.append(
            f"{shlex.join(plan.ray_head.argv)} &   # then wait until the Ray cluster has {plan.ray_nodes} nodes"
        )
    cmd = command_line(plan)
    if plan.log_file:
        cmd += f" 2>&1 | tee -a {shlex.quote(plan.log_file)}"
    lines.append(cmd)
    return "\n".join(lines) + "\n"


SCRIPT_MARK = "# written by `python -m launch plan --format shell`"
"""Line 2 of every script: `plan --out --force` removes a stale node script only if it carries it."""


def script(plan: NodePlan) -> str:
    """A runnable script for one node (`plan --format shell --out DIR`)."""
    lines = ["#!/usr/bin/env bash", SCRIPT_MARK, f"# {plan.title}"]
    lines += [f"# {note}" for note in plan.notes]
    lines += ["set -euo pipefail"]
    lines += env_lines(plan, script=True)
    # With a Ray head the script stays alive after vLLM to stop the head (no exec).
    run = "" if plan.ray_head else "exec "
    if plan.ray_head:
        lines += _ray_head_lines(plan)
    elif plan.kind == "ray-worker":
        lines += _ray_worker_wait(plan)
    if plan.log_file:
        lines.append(f"mkdir -p {shlex.quote(plan.log_file.rsplit('/', 1)[0])}")
        lines.append(f"{run}{command_line(plan)} > >(tee -a {shlex.quote(plan.log_file)}) 2>&1")
    else:
        lines.append(f"{run}{command_line(plan)}")
    return "\n".join(lines) + "\n"


def _ray_worker_wait(plan: NodePlan, bound_s: int = 600) -> list[str]:
    """`ray start --address` gives up after ~20 s: wait (bounded) for the head's port first."""
    head = plan.coordinator
    return [
        f"{PYTHON} -m launch wait-port {shlex.quote(head.host)} {head.port} --timeout {bound_s} --what 'the Ray head'"
    ]


def _ray_head_lines(plan: NodePlan, bound_s: int = 600) -> list[str]:
    """Start the Ray head, stop it on exit, and wait (bounded) until every node joined before vLLM starts."""
    head = plan.ray_head
    return [
        f"{shlex.join(head.argv)} &",
        "ray_head=$!",
        'trap \'kill "$ray_head" 2>/dev/null; wait "$ray_head"\' EXIT',
        f"{PYTHON} -m launch ray-wait {shlex.quote(str(head.endpoint))} --nodes {head.nodes} --timeout {bound_s}",
    ]


def summary(plan: NodePlan) -> list[str]:
    """Aligned `key : value` lines, logged before a node starts (secrets masked)."""
    lay = plan.layout
    rows = [
        ("role", lay.role),
        ("node rank", str(lay.node_rank)),
        ("target", plan.target.describe()),
        (
            "data parallel",
            f"size {lay.data_parallel_size}, local {lay.data_parallel_size_local}, start rank {lay.start_rank}",
        ),
        ("coordinator", f"{plan.coordinator}{' (Ray head)' if plan.kind == 'ray-worker' else ''}"),
    ]
    if lay.api_server_count is not None:
        rows.append(("api servers", str(lay.api_server_count)))
    if plan.api is not None:
        rows.append(("api", plan.api.url()))
    if plan.all2all_backend:
        rows.append(("all2all backend", plan.all2all_backend))
    for name, value in plan.env.items():
        shown = value.describe() if isinstance(value, AutoIfname) else (MASK if is_secret(name) else value)
        rows.append((name, shown))
    rows.append(("command", command_line(plan)))
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}} : {v}" for k, v in rows]
