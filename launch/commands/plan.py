"""plan: every node's environment and command, without running anything.

--format text (exports + command per node), json, shell (one runnable script per node in --out);
slurm and k8s are what a scheduler runs (launch/commands/scheduler.py).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from launch import files, render
from launch.commands import plan_json
from launch.errors import ConfigError
from launch.request import from_args
from launch.resolve import resolve

_SCRIPT = re.compile(r"((prefill|decode)-)?node-[0-9]+\.sh")
"""The names `--format shell` gives its scripts (and the only files --force removes)."""


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    if args.format in ("slurm", "k8s"):
        from launch.commands import scheduler

        return scheduler.plan(args)
    resolution = resolve(from_args(args, passthrough))
    plans = resolution.plans
    config = resolution.config
    if args.format == "text":
        sys.stdout.write("\n".join(render.shell(p) for p in plans))
        if config.disaggregation is not None and args.node_rank is None and args.group is None:
            from launch import router

            sys.stdout.write(
                f"\n# router (on {router.address(config)}), once prefill and decode answer /health\n"
                f"{shlex.join(router.argv(config))}\n"
            )
    elif args.format == "json":
        json.dump([plan_json(p) for p in plans], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        if not args.out:
            raise ConfigError("--out: --format shell writes one script per node (expected --out FOLDER)")
        out = Path(args.out)
        scripts = {
            out / f"{p.group + '-' if p.group else ''}node-{p.layout.node_rank}.sh": render.script(p) for p in plans
        }
        whole = args.node_rank is None and args.group is None
        # A whole cluster's scripts are the folder's: a node-N.sh left from a larger plan would run stale.
        stale = sorted(set(f for f in out.glob("*.sh") if _SCRIPT.fullmatch(f.name)) - set(scripts)) if whole else []
        for file in stale:
            files.refuse_link(file, "--out")
            if render.SCRIPT_MARK not in file.read_text(errors="replace").splitlines()[:3]:
                raise ConfigError(
                    f"--out: {file} is no node of this plan and was not written by the toolkit (expected a folder "
                    "holding only its scripts; move that file away)"
                )
        if stale and not args.force:
            raise ConfigError(
                f"--out: {stale[0]} is no node of this plan (expected a new folder, or --force to remove it)"
            )
        for file, text in scripts.items():
            files.may_write(file, text, force=args.force, option="--out", new="a new folder")
        out.mkdir(parents=True, exist_ok=True)
        for file in stale:
            file.unlink()
            print(f"removed {file}", file=sys.stderr)
        for file, text in scripts.items():
            files.write(file, text, mode=0o755)
            print(file)
    return 0
