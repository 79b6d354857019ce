"""What a Kubernetes pod of the deployment needs beyond `lws-step`: probes for every pod and a clean /dev/shm.

The leader (the primary) is probed on vLLM's own ``/health``. A worker runs vLLM headless: nothing of vLLM
listens on it, so its probes are commands (exec probes) that Kubernetes runs inside the container:

    python -m launch.pod live                  # exit 0 while this container's vLLM process runs (not a zombie)
    python -m launch.pod ready --deploy FILE [--group prefill|decode]
                                               # exit 0 when the group's primary answers /health with 200

``ready`` asks the leader through ``LWS_LEADER_ADDRESS`` (what LeaderWorkerSet gives every pod) on the deploy
file's port (with prefill/decode, the port of the pod's group), so a worker is ready exactly when its group serves; its startup probe uses the same question with
the start-up budget. Each answers in one line and within ``--timeout`` seconds (default 5).

``clear_shm`` empties /dev/shm before vLLM starts: a memory-backed emptyDir outlives a container restart
inside the same pod, and NCCL / vLLM shared-memory segments left by the previous run collide with the next.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import psutil

from launch.config import ConfigError, load_deploy


def vllm_processes(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes that are vLLM serving: `vllm serve ...` (or `python -m vllm... serve`), not zombies."""
    found = []
    for proc in procs:
        try:
            argv, state = proc.cmdline(), proc.status()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        names = [os.path.basename(a) for a in argv[:3]]
        if (
            "serve" in argv
            and any(n == "vllm" or n.startswith("vllm.") for n in names)
            and state != psutil.STATUS_ZOMBIE
        ):
            found.append(proc)
    return found


def live() -> tuple[bool, str]:
    procs = vllm_processes(psutil.process_iter())
    if not procs:
        return False, "no `vllm serve` process runs in this container"
    return True, f"vLLM runs (pid {', '.join(str(p.pid) for p in procs)})"


def ready(
    deploy: str, timeout_s: float, environ: dict[str, str] | os._Environ = os.environ, group: str | None = None
) -> tuple[bool, str]:
    leader = environ.get("LWS_LEADER_ADDRESS")
    if not leader:
        return False, "LWS_LEADER_ADDRESS is not set (expected inside a LeaderWorkerSet pod)"
    from launch.placement import check_group

    config = load_deploy(deploy)
    check_group(config, deploy, group)
    port = config.group(group).port if group else config.port
    url = f"http://{leader}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - http, from LWS and the deploy file
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return False, f"the primary {url} did not answer: {reason}"
    return status == 200, f"the primary {url} answered {status}"


def clear_shm(root: Path = Path("/dev/shm")) -> int:
    """Removes what a previous run left in ``root``; returns how many entries were removed."""
    removed = 0
    for entry in list(root.iterdir()) if root.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed += 1
    return removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.pod", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="probe", required=True)
    sub.add_parser("live", help="exit 0 while this container's vLLM process runs")
    p = sub.add_parser("ready", help="exit 0 when the group's primary answers /health with 200")
    p.add_argument("--deploy", required=True)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--group", choices=("prefill", "decode"), help="the pod's group (a deploy file with prefill/decode)")
    args = ap.parse_args(argv)
    try:
        ok, line = live() if args.probe == "live" else ready(args.deploy, args.timeout, group=args.group)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
