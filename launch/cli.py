"""Command line: `python -m launch primary|secondary|serve|plan|check` (pixi: serve-primary, ...).

Usage, the guide's way (same positional arguments as its two scripts)::

    python -m launch primary   NODE1_IP RPC_PORT MODEL TOTAL_DP LOCAL_DP API_SERVERS [options] [-- vllm args]
    python -m launch secondary NODE1_IP RPC_PORT MODEL TOTAL_DP LOCAL_DP START_RANK  [options] [-- vllm args]

or from a deploy file that describes the whole cluster (every node runs the same file)::

    python -m launch serve --deploy cluster.yaml [--node-rank N]    # role and ranks from the file
    python -m launch plan cluster.yaml                               # every node's env + command
    python -m launch plan cluster.yaml --format shell --out plans/   # one runnable script per node
    python -m launch check cluster.yaml                              # argv through vLLM's own parser

Arguments after ``--`` go to vLLM. A flag the launcher sets itself is taken into the plan as the named
option would be (--port, --host, -tp, --all2all-backend, --api-server-count, --trust-remote-code,
--enable-expert-parallel) or refused when it is derived (--data-parallel-*, --headless,
--kv-transfer-config): vLLM never gets one twice (launch/vllm_flags.py).

Variables the launcher sets on every node: PYTHONPATH and LD_LIBRARY_PATH (the stack's, put before
yours), GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME / NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME (one interface for
all three), the transport's NCCL/NVSHMEM/libfabric settings, VLLM_ALL2ALL_BACKEND for vLLM < 0.11.1
(newer versions get --all2all-backend), then the deploy file's `env`.

How a command line becomes a running process (one file per step)::

    launch/cli.py         the parser and the command registry (this file)
    launch/request.py     the parsed options + every environment fallback -> a typed Request
    launch/resolve.py     Request + deploy file -> deployments -> one NodePlan per node
    launch/plan.py        NodePlan: typed facts (kind, API, coordinator, backend, KV transfer, Ray head), argv derived
    launch/commands/      what each command does with the plans: print (plan), check, run (serve), ...

Failure modes (launch/errors.py, caught once in ``main``): bad input exits 2 with one line naming the file,
option or variable, the field and what was expected; a node waited for that never came up exits 3; Ctrl-C
before vLLM started exits 130; a reader that goes away (`plan | head`) ends the output quietly (141). A
missing interface or vLLM binary is refused before anything starts; once vLLM runs, the exit code is
vLLM's, and SIGTERM / SIGINT stop vLLM's whole process group (see launch/supervise.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from launch.argtypes import seconds
from launch.errors import Interrupted, LaunchError
from launch.request import GUIDE_ARGS


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", description="vLLM expert-parallel launcher")
    sub = parser.add_subparsers(dest="command", required=True)

    for role in ("primary", "secondary"):
        p = sub.add_parser(role, help=f"run vLLM on the {role} node")
        p.add_argument("guide", nargs="*", metavar=" ".join(GUIDE_ARGS[role]), help="the guide's positional arguments")
        _deploy_options(p)
        _serve_options(p)
        _vllm_options(p)

    p = sub.add_parser("serve", help="run this node's part of a deploy file (role from its rank)")
    _deploy_options(p)
    _serve_options(p)
    _vllm_options(p)

    for group in ("prefill", "decode"):
        p = sub.add_parser(group, help=f"run this node's part of the {group} group (deploy file with disaggregation)")
        _deploy_options(p)
        _serve_options(p)
        _vllm_options(p)

    p = sub.add_parser("proxy", help="run vllm-router in front of prefill and decode, once both are healthy")
    _deploy_options(p)
    p.add_argument("--dry-run", action="store_true", help="print the router's command instead of running it")
    p.add_argument(
        "--wait-for-groups",
        type=seconds,
        default=1800.0,
        metavar="SECONDS",
        help="how long to wait for both groups' /health before giving up (default 1800)",
    )
    p.add_argument("--router-bin", default=None, help="the vllm-router executable (default: vllm-router on PATH)")

    p = sub.add_parser("plan", help="print every node's environment and command without running")
    p.add_argument("deploy_file", nargs="?", help="deploy file (YAML); default: $EP_DEPLOY")
    p.add_argument("--node-rank", type=int, help="only this node")
    p.add_argument(
        "--format",
        choices=("text", "shell", "json", "slurm", "k8s"),
        default="text",
        help="text: exports + command per node; shell: one runnable script per node in --out; json; "
        "slurm: one sbatch script for the whole job; k8s: LeaderWorkerSet manifests",
    )
    p.add_argument(
        "--out", help="folder for --format shell scripts (node-RANK.sh); file for slurm / k8s (default: stdout)"
    )
    p.add_argument("--force", action="store_true", help="overwrite files in --out that differ")
    p.add_argument("--group", choices=("prefill", "decode"), help="only this group (deploy file with disaggregation)")
    _vllm_options(p)

    p = sub.add_parser(
        "bench", help="`vllm bench serve` against the deploy file's API (the guide's defaults), recorded"
    )
    p.add_argument("deploy_file", nargs="?", help="deploy file (YAML); default: $EP_DEPLOY")
    p.add_argument("--out", help="run folder (default: bench-results/UTC-TIME)")
    p.add_argument("--logs", nargs="+", help="the servers' vLLM logs: verified and kept with the result")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="print two runs side by side instead")
    p.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    p.add_argument("--vllm-bin", default=None, help="the vllm executable (default: vllm on PATH)")
    p.set_defaults(node_rank=None)
    _vllm_options(p)

    p = sub.add_parser("verify", help="read vLLM logs: what ran (all2all, MoE, attention, EP ranks) vs what was asked")
    p.add_argument("logs", nargs="+", help="vLLM log files (primary and secondaries)")
    p.add_argument("--deploy", help="deploy file whose backend, EP size and DeepGEMM setting are expected")
    p.add_argument(
        "--all2all-backend", help="the backend that was asked for (default: the deploy file's, else vLLM's default)"
    )
    p.add_argument("--ep-size", type=int, help="expected EP ranks (default: the deploy file's DP x TP)")

    p = sub.add_parser(
        "slurm-step",
        help="inside a Slurm job (the script `plan --format slurm` writes): place the "
        "deploy file on the allocation, then run STEP as this node",
    )
    p.add_argument(
        "step",
        choices=("allocation", "preflight", "serve", "plan", "check", "proxy"),
        help="allocation: check and print where the nodes are (batch host); proxy: the P/D router",
    )
    p.add_argument("--group", choices=("prefill", "decode"), help="this component's group (heterogeneous P/D job)")
    p.add_argument("--deploy", help="deploy file (default: the copy the job script carries, $EP_DEPLOY_TEXT)")

    p = sub.add_parser(
        "lws-step",
        help="inside a LeaderWorkerSet pod (`plan --format k8s`): place the deploy file on "
        "the group, then run STEP as this pod",
    )
    p.add_argument(
        "step", choices=("preflight", "serve", "proxy"), help="proxy: the prefill/decode router (its own pod)"
    )
    p.add_argument("--group", choices=("prefill", "decode"), help="this LeaderWorkerSet's group (prefill/decode)")
    p.add_argument("--deploy", help="deploy file (default: $EP_DEPLOY)")
    p.add_argument(
        "--resolve-timeout",
        type=seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the leader's DNS name to resolve (default 300)",
    )

    p = sub.add_parser(
        "status",
        help="poll every group's /health and /metrics: one line per node (up, running and "
        "waiting requests, KV-cache use, what failed), exit 1 when one is down",
    )
    p.add_argument("deploy", help="the deploy file")
    p.add_argument("--timeout", type=seconds, default=10.0, help="bound on the whole poll, seconds (default: 10)")
    p.add_argument("--ranks", action="store_true", help="also one line per data parallel rank")

    p = sub.add_parser("check", help="parse every node's argv with the installed vLLM's own parser")
    p.add_argument("deploy_file", nargs="?", help="deploy file (YAML); default: $EP_DEPLOY")
    p.add_argument("--node-rank", type=int, help="only this node")
    p.add_argument("--timeout", type=seconds, default=120.0, help="seconds vLLM's parser may take (default 120)")
    p.add_argument("--group", choices=("prefill", "decode"), help="only this group (deploy file with disaggregation)")
    p.add_argument(
        "--python", default=None, help="the Python whose vLLM parses (default: $EP_VLLM_PYTHON, else this one)"
    )
    _vllm_options(p)

    # What rendered scripts ask of the toolkit on their node (launch/commands/node.py).
    p = sub.add_parser("ifname", help="print the interface that holds ADDRESS (or, --towards, the route to it)")
    p.add_argument("address")
    p.add_argument("--towards", action="store_true", help="the interface the route towards ADDRESS leaves through")
    p = sub.add_parser("wait-port", help="wait (bounded) until HOST:PORT accepts connections")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=seconds, default=600.0, metavar="SECONDS")
    p.add_argument("--what", default="the port", help="what is waited for, in the progress lines")
    p = sub.add_parser("ray-wait", help="wait (bounded) until the Ray cluster at HOST:PORT has N active nodes")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--timeout", type=seconds, default=600.0, metavar="SECONDS")
    return parser


# ---- option groups ---------------------------------------------------------------------------


def _deploy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("deploy file")
    g.add_argument("--deploy", help="deploy file (YAML) describing the whole cluster; default: $EP_DEPLOY")
    g.add_argument(
        "--node-rank",
        type=int,
        help="this node's index in the deploy file (default: found from this machine's addresses)",
    )


def _serve_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("running")
    g.add_argument(
        "--dry-run", action="store_true", help="print this node's environment and command instead of running it"
    )
    g.add_argument("--log-file", help="also write vLLM's output to this file")
    g.add_argument(
        "--stop-timeout", type=seconds, default=30.0, help="seconds vLLM gets to stop after SIGTERM before SIGKILL"
    )
    g.add_argument("--vllm-bin", default=None, help="the vllm executable (default: vllm on PATH)")
    g.add_argument(
        "--wait-for-primary",
        type=seconds,
        default=600.0,
        metavar="SECONDS",
        help="secondaries: wait this long for the primary's coordination port before starting (0: do not wait)",
    )
    g.add_argument(
        "--health-timeout",
        type=seconds,
        default=1800.0,
        metavar="SECONDS",
        help="primary: report when the API answers /health, or that it did not within this bound",
    )
    g.add_argument(
        "--wait-for-nodes",
        type=seconds,
        default=600.0,
        metavar="SECONDS",
        help="primary with data_parallel_backend ray: wait this long for every node to join the Ray cluster",
    )


def _vllm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("vLLM (named as vLLM names them)")
    g.add_argument("--all2all-backend", help="e.g. deepep_low_latency, deepep_high_throughput, allgather_reducescatter")
    g.add_argument("--port", type=int, help="API port on the primary")
    g.add_argument("--host", help="address the API binds to")
    g.add_argument("--tensor-parallel-size", type=int)
    g.add_argument("--vllm-version", help="target vLLM version (default: installed, else the stack's pin)")
    g = p.add_argument_group("network")
    g.add_argument("--transport", choices=("ib", "roce", "efa", "tcp"))
    g.add_argument("--socket-ifname", help="interface for NCCL/Gloo/NVSHMEM bootstrap, or auto")


# ---- the command registry: name -> module in launch/commands/ (imported when run) --------------------------
COMMANDS = {
    "primary": "serve", "secondary": "serve", "serve": "serve", "prefill": "serve", "decode": "serve",
    "plan": "plan", "check": "check", "proxy": "proxy", "bench": "bench", "verify": "verify", "status": "status",
    "slurm-step": "scheduler", "lws-step": "scheduler", "ifname": "node", "wait-port": "node", "ray-wait": "node",
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args = get_args_parser().parse_args(argv)
    try:
        command = importlib.import_module(f"launch.commands.{COMMANDS[args.command]}")
        code = command.run(args, passthrough)
        sys.stdout.flush()
        return code
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\n[launch] interrupted: nothing more was started", file=sys.stderr)
        return Interrupted.exit_code
    except BrokenPipeError:
        # The reader went away (`plan FILE | head -1`): stop quietly, as `cat` does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
