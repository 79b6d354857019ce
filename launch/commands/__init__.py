"""One module per command family; launch/cli.py maps each command name to its module and calls ``run``.

serve.py      primary, secondary, serve, prefill, decode: run this node's plan
plan.py       plan --format text | json | shell: print every node's plan
scheduler.py  plan --format slurm | k8s, slurm-step, lws-step: what a scheduler runs
check.py      check: every node's argv through the installed vLLM's own parser
proxy.py      proxy: vllm-router in front of prefill and decode
bench.py      bench: `vllm bench serve` against the deploy file's API, recorded
verify.py     verify: what vLLM's logs say ran, against what was planned
node.py       ifname, wait-port, ray-wait: what rendered scripts ask of the toolkit on the node
"""

from __future__ import annotations

import shutil
import socket
import sys

from launch import render
from launch.errors import ConfigError
from launch.netif import AutoIfname
from launch.plan import NodePlan

VLLM_FIX = "install the stack with `pixi install`, or pass --vllm-bin"
RAY_FIX = "data_parallel_backend ray needs Ray in the stack's environment (pip install 'ray[default]')"


def say(message: str) -> None:
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def executable(given: str | None, name: str, fix: str, path: str | None = None) -> str:
    exe = given or shutil.which(name, path=path)
    if not exe:
        raise ConfigError(f"{name}: not found on PATH ({fix})")
    return exe


def plan_json(p: NodePlan) -> dict:
    env = {}
    for name, value in p.env.items():
        env[name] = (
            value.describe() if isinstance(value, AutoIfname) else (render.MASK if render.is_secret(name) else value)
        )
    return {
        "node_rank": p.layout.node_rank, "role": p.layout.role, "kind": p.kind, "group": p.group,
        "node_address": p.layout.node_address,
        "data_parallel_size": p.layout.data_parallel_size, "data_parallel_size_local": p.layout.data_parallel_size_local,
        "start_rank": p.layout.start_rank, "target_vllm": str(p.target.version), "target_source": p.target.source,
        "api": p.api.url() if p.api else None, "coordinator": str(p.coordinator) if p.coordinator else None,
        "all2all_backend": p.all2all_backend, "kv_transfer": p.kv_transfer,
        "ray_head": str(p.ray_head.endpoint) if p.ray_head else None,
        # the stack's paths as found where this plan was made; `serve` finds each node's own (env/paths.py)
        "stack_paths": {"found_on": socket.gethostname(), "path_prepend": p.path_prepend, "env": p.stack.env if p.stack else {}},
        "env": env, "argv": p.argv, "log_file": p.log_file,
        "watch": {"port": p.watch.port, "watches": [f"{q.host}:{q.port}" for q in p.watch.peers]} if p.watch else None,
    }  # fmt: skip
