"""`python -m env`: the pinned EP kernel stack, fetched, built, located and checked.

Usage, per scenario:

    python -m env pins   [--profile P]                 # every pin, with where it was read
    python -m env fetch  [--profile P] [--cache DIR]    # every source at its pin into the cache
    python -m env build  [--profile P] [--arch 9.0]     # build what changed, into .stack/<profile>
    python -m env build  --offline --cache DIR          # a node without internet: only the cache is read
    eval "$(python -m env paths)"                       # PYTHONPATH, LD_LIBRARY_PATH (the one NCCL first), ... of the stack
    python -m env status [--profile P]                  # built, missing or stale; exit 1 unless complete

The profile is --profile, else EP_STACK_PROFILE (each pixi environment sets it), else `current`; the
built-in ones are `seed` (the guide's stack), `vllm026` (vLLM 0.26 / torch 2.11 / CUDA 13) and `current`.
The prefix is --prefix, else EP_STACK_PREFIX, else .stack/<profile> in the project; the source cache is
--cache, else EP_STACK_CACHE, else .cache/ep-sources. `--pins FILE` adds profiles from a TOML file (a
fork, a patched commit) in env/pins.py's shape.

Variables a build sets for each component: TORCH_CUDA_ARCH_LIST (--arch, else the GPUs NVML finds,
else the deploy file's env.TORCH_CUDA_ARCH_LIST, else the inherited value), CUDA_HOME (CUDA_HOME, the
pixi environment's cuda-nvcc, /usr/local/cuda), NVSHMEM_DIR (a built NVSHMEM, NVSHMEM_DIR, or the
nvidia-nvshmem wheel, which the kernels' setup.py finds itself: then left unset), MAX_JOBS (cores, fewer
where memory is short; --jobs), the CUDA >= 13 cccl include, EP_NCCL_ROOT_DIR and EP_JIT_CACHE_DIR for
DeepEP v2, plus the component's own flags, all recorded in <prefix>/manifest.json, with the patches applied.

Exit codes: 0 done; 1 a build ran and failed (its log is named; the previous build is kept) or status
found the stack incomplete; 2 bad input, said in one line with the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path

from env import machine
from env.build import BuildConfig, Builder, selected
from env.errors import StackError
from env.fetch import SourceCache
from env.paths import PROJECT_ROOT, default_prefix, stack_paths
from env.pins import Profile, active_profile, resolve_profiles
from env.status import healthy, render_json, render_text, rows
from launch.argtypes import seconds
from launch.errors import LaunchError


def default_cache() -> Path:
    given = os.environ.get("EP_STACK_CACHE")
    return Path(given) if given else PROJECT_ROOT / ".cache" / "ep-sources"


def _sha256_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sha256",
        action="append",
        default=[],
        metavar="NAME=HEX",
        help="checksum of an unverified tarball, after checking it",
    )


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m env", description="The pinned EP kernel stack: pins, sources, builds, paths, status."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{pins,fetch,build,paths,status}")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", help="stack profile (default: EP_STACK_PROFILE, else current)")
        p.add_argument("--pins", type=Path, help="TOML file with more profiles, in env/pins.py's shape")

    # ---- pins ----
    p = sub.add_parser("pins", help="print every pin of a profile with its source")
    common(p)
    p.add_argument("--format", choices=("text", "json"), default="text")

    # ---- fetch ----
    p = sub.add_parser("fetch", help="download every source at its pin into the source cache")
    common(p)
    p.add_argument("--cache", type=Path, help="source cache folder (default: EP_STACK_CACHE, else .cache/ep-sources)")
    p.add_argument(
        "--only", action="append", default=[], help="components, comma-separated (default: every source component)"
    )
    _sha256_option(p)

    # ---- build ----
    p = sub.add_parser("build", help="build the profile's source components into the prefix")
    common(p)
    p.add_argument("--prefix", type=Path, help="stack prefix (default: EP_STACK_PREFIX, else .stack/<profile>)")
    p.add_argument("--cache", type=Path, help="source cache folder (default: EP_STACK_CACHE, else .cache/ep-sources)")
    p.add_argument("--offline", action="store_true", help="read sources from the cache only; never reach the network")
    p.add_argument("--only", action="append", default=[], help="components, comma-separated (optional ones included)")
    p.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST, e.g. 9.0 or '9.0a;10.0' (default: the GPUs found)")
    p.add_argument("--deploy", type=Path, help="deploy file whose env.TORCH_CUDA_ARCH_LIST names the cluster's GPUs")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: cores, fewer where memory is short)")
    p.add_argument(
        "--python", default=sys.executable, help="interpreter of the stack's environment (default: this one)"
    )
    _sha256_option(p)
    p.add_argument(
        "--timeout", type=seconds, default=6 * 3600.0, help="seconds one build command may take (default 21600)"
    )
    p.add_argument("--force", action="store_true", help="build even where the inputs are unchanged")

    # ---- paths ----
    p = sub.add_parser("paths", help="print the built stack's PYTHONPATH, LD_LIBRARY_PATH, NVSHMEM_DIR (shell exports)")
    common(p)
    p.add_argument("--prefix", type=Path, help="stack prefix (default: EP_STACK_PREFIX, else .stack/<profile>)")
    p.add_argument("--format", choices=("shell", "json"), default="shell")

    # ---- status ----
    p = sub.add_parser("status", help="what is built, from which commit, for which archs; what is missing or stale")
    common(p)
    p.add_argument("--prefix", type=Path, help="stack prefix (default: EP_STACK_PREFIX, else .stack/<profile>)")
    p.add_argument("--arch", help="the arch list the builds should have (default: not compared)")
    p.add_argument(
        "--python", default=sys.executable, help="interpreter of the stack's environment (default: this one)"
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    return parser


# ---- arguments to typed values --------------------------------------------------------------------------


def pick_profile(args: argparse.Namespace) -> Profile:
    profiles = resolve_profiles(getattr(args, "pins", None))
    name = args.profile or active_profile()
    if name not in profiles:
        given = "--profile" if args.profile else "EP_STACK_PROFILE"
        raise StackError(given, f"{name!r} is not a profile", f"choose one of {', '.join(sorted(profiles))}")
    return profiles[name]


def parse_only(values: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))


def parse_sha256(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, _, hexdigest = value.partition("=")
        if not name or not re.fullmatch(r"[0-9a-f]{64}", hexdigest.strip().lower()):
            raise StackError("--sha256", f"{value!r} is not NAME=HEX", "give the component name and its 64-hex sha256")
        out[name.strip()] = hexdigest.strip().lower()
    return out


# ---- commands ---------------------------------------------------------------------------------------------


def cmd_pins(args: argparse.Namespace) -> int:
    profile = pick_profile(args)
    if args.format == "json":
        data = {
            "profile": profile.name,
            "vllm": profile.vllm,
            "torch": profile.torch,
            "python": profile.python,
            "cuda": profile.cuda,
            "components": [
                {
                    **c.pin(),
                    "source": c.source,
                    "note": c.note,
                    "default": c.default,
                    "needs_env": list(c.needs_env),
                    "archs": list(c.archs),
                }
                for c in profile.components
            ],
        }
        print(json.dumps(data, indent=2))
        return 0
    print(f"# {profile.name}: {profile.description}")
    print(
        f"  {'vllm':<14} pypi     =={profile.vllm}\n  {'torch':<14} pypi     =={profile.torch}  (CUDA {profile.cuda or '-'})"
    )
    for c in profile.components:
        optional = "" if c.default else "  [optional]"
        print(
            f"  {c.name:<14} {c.kind:<8} {c.ref}{optional}\n  {'':<14} url      {c.url}\n  {'':<14} source   {c.source}"
        )
        if c.sha256:
            print(f"  {'':<14} sha256   {c.sha256}")
        if c.is_source:
            print(f"  {'':<14} needs    {', '.join(c.needs_env) or '-'}; archs {', '.join(c.archs) or 'any'}")
        if c.note:
            print(f"  {'':<14} note     {c.note}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    profile = pick_profile(args)
    only = parse_only(args.only)
    comps = selected(profile, only) if only else [c for c in profile.components if c.is_source]
    sha = parse_sha256(args.sha256)
    cache = SourceCache(args.cache or default_cache())
    print(f"# env fetch: profile {profile.name}, cache {cache.root}")
    failed: list[StackError] = []
    for comp in comps:
        try:
            print(f"  {comp.name:<14} {cache.fetch(comp, sha.get(comp.name))}", flush=True)
        except StackError as exc:
            failed.append(exc)
            print(f"  {comp.name:<14} FAILED", flush=True)
        for patch in comp.patches:  # from a web host, not the git mirror: reported on its own line
            try:
                cache.ensure_patch(f"component {comp.name}", patch)
                print(f"  {comp.name:<14} patch {patch.file_name} (sha256 verified)", flush=True)
            except StackError as exc:
                failed.append(exc)
                print(f"  {comp.name:<14} patch {patch.file_name} FAILED", flush=True)
    for exc in failed:
        print(f"error: {exc}", file=sys.stderr)
    return max((e.code for e in failed), default=0)


def cmd_build(args: argparse.Namespace) -> int:
    profile = pick_profile(args)
    if args.jobs is not None and args.jobs < 1:
        raise StackError("--jobs", f"{args.jobs} is not a positive number", "give 1 or more")
    config = BuildConfig(
        profile=profile,
        prefix=(args.prefix or default_prefix(profile.name)).absolute(),
        cache=(args.cache or default_cache()).absolute(),
        offline=args.offline,
        only=parse_only(args.only),
        arch=args.arch,
        deploy=args.deploy,
        jobs=args.jobs,
        python=args.python,
        sha256=parse_sha256(args.sha256),
        timeout_s=args.timeout,
        force=args.force,
    )
    return Builder(config, out=lambda line: print(line, flush=True)).run()


def cmd_paths(args: argparse.Namespace) -> int:
    name = pick_profile(args).name
    prefix = (args.prefix or default_prefix(name)).absolute()
    stack = stack_paths(name, prefix)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "prefix": str(prefix),
                    "PYTHONPATH": stack.pythonpath,
                    "LD_LIBRARY_PATH": stack.ld_library_path,
                    "env": stack.env,
                },
                indent=2,
            )
        )
        return 0
    print(f"# stack paths: profile {name}, prefix {prefix}")
    for var, paths in stack.as_prepend().items():
        # Ours first, then whatever the shell had.
        print(f'export {var}={shlex.quote(os.pathsep.join(paths))}"${{{var}:+:${var}}}"')
    for var, value in sorted(stack.env.items()):
        print(f"export {var}={shlex.quote(value)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    profile = pick_profile(args)
    prefix = (args.prefix or default_prefix(profile.name)).absolute()
    packages = sorted({c.url for c in profile.components if c.kind == "pypi"} | {"vllm", "torch"})
    info = machine.probe_python(args.python, packages)
    archs = machine.parse_archs(args.arch, "--arch") if args.arch else None
    table = rows(profile, prefix, info, archs, os.environ.get("CONDA_PREFIX"))
    print(
        render_json(profile, prefix, table, info.nccl)
        if args.format == "json"
        else render_text(profile, prefix, table, info.nccl)
    )
    return 0 if healthy(table) else 1


COMMANDS = {"pins": cmd_pins, "fetch": cmd_fetch, "build": cmd_build, "paths": cmd_paths, "status": cmd_status}


class Stopped(BaseException):
    """SIGTERM or SIGHUP (a scheduler's stop, a closed terminal): unwinds like Ctrl-C, so that a running
    compiler, which has a process group of its own, is stopped with the build (env/build.py: _run)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, _frame) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    try:
        return COMMANDS[args.command](args)
    except Stopped as exc:
        print(f"error: {exc}: stopped; the previous builds are kept", file=sys.stderr)
        return 128 + exc.signum
    except LaunchError as exc:  # StackError, or a deploy file's ConfigError: one line, its exit code
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; the previous builds are kept", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python -m env status | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
