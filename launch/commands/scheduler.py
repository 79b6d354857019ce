"""What a scheduler runs. `plan --format slurm | k8s` writes the job (it carries the deploy file itself);
inside the job, `slurm-step` / `lws-step` place the deploy file on the allocation and run one step as this node."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launch import files
from launch.commands import say
from launch.config import DeployConfig, dump_deploy
from launch.errors import ConfigError, NodeDown
from launch.request import Request, from_args
from launch.resolve import load, resolve


def plan(args: argparse.Namespace) -> int:
    """--format slurm / k8s: what the scheduler runs, carrying the deploy file itself."""
    request = from_args(args, [])
    path = request.deploy
    if not path:
        raise ConfigError("deploy file: none given (pass FILE or set EP_DEPLOY)")
    given = [request.overrides.options[name] for name in request.overrides.given()]
    given += [f"--{name.replace('_', '-')}" for name in ("node_rank", "group") if getattr(args, name, None) is not None]
    if given:
        raise ConfigError(
            f"{given[0]}: not taken with --format {args.format} (expected the value in {path}: the job carries the deploy file)"
        )
    config, _ = load(request)
    text = Path(path).read_text(encoding="utf-8")
    from launch.placement import GROUPS, group_nodes

    _refuse_for_scheduler(config, path, args.format)
    listed = [n for g in (GROUPS if config.disaggregation else (None,)) for n in group_nodes(config, g) if n.address]
    if listed:
        where = "the allocation's" if args.format == "slurm" else "the pods'"
        say(f"note: {path} lists node addresses; with --format {args.format} they are replaced by {where} at run time")
    # Every node's plan must build before the job is submitted: plan it on stand-in addresses.
    resolve(request, loaded=_stand_in_addresses(config))
    if args.format == "slurm":
        from launch import slurm

        out = slurm.script(config, text, Path(path).name)
    else:
        import yaml

        from launch import k8s

        class Literal(yaml.SafeDumper):
            """Multi-line strings (the deploy file in the ConfigMap) as readable | blocks."""

        Literal.add_representer(
            str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
        )
        out = yaml.dump_all(k8s.manifests(config, text, Path(path).name), Dumper=Literal, sort_keys=False)
    if not args.out:
        sys.stdout.write(out)
        return 0
    target = Path(args.out)
    if target.is_dir():
        raise ConfigError(f"--out: {target} is a folder (expected a file name for --format {args.format})")
    if not target.parent.is_dir():
        raise ConfigError(f"--out: folder {target.parent} does not exist (expected a file in an existing folder)")
    files.may_write(target, out, force=args.force, option="--out")
    files.write(target, out)
    print(target)
    return 0


def _refuse_for_scheduler(config: DeployConfig, path: str, fmt: str) -> None:
    """What a scheduler-placed file cannot carry: fixed GPU ids (the scheduler assigns GPUs) and secrets
    (the file travels in the job script or a ConfigMap)."""
    from launch.config import is_secret
    from launch.placement import GROUPS, group_nodes
    from launch.vllm_flags import SECRET_FLAGS, secrets_to_env

    prefixes = [("", None)] if config.disaggregation is None else [(f"disaggregation.{g}.", g) for g in GROUPS]
    for prefix, group in prefixes:
        for rank, node in enumerate(group_nodes(config, group)):
            if node.gpu_ids is not None:
                raise ConfigError(
                    f"{path}: {prefix}nodes[{rank}].gpu_ids: not taken with --format {fmt} (expected none: "
                    f"the scheduler assigns each node's GPUs and sets CUDA_VISIBLE_DEVICES)"
                )
    envs = [("env", config.env)] + [
        (f"{p}nodes[{r}].env", n.env) for p, g in prefixes for r, n in enumerate(group_nodes(config, g))
    ]
    if config.disaggregation is not None:
        envs += [(f"disaggregation.{g}.env", getattr(config.disaggregation, g).env) for g in GROUPS]
    # (where it is shown, the variable it would be): secret variables, and secret flags' values, which would
    # travel as the variable vLLM reads (launch/vllm_flags.py)
    secrets = [(f"{field}.{name}", name) for field, env in envs for name in env if is_secret(name)]
    args = [("vllm_args", config.vllm_args)]
    if config.disaggregation is not None:
        args += [(f"disaggregation.{g}.vllm_args", getattr(config.disaggregation, g).vllm_args) for g in GROUPS]
    flag_of = {variable: flag for flag, variable in SECRET_FLAGS.items()}
    for field, words in args:
        taken, _ = secrets_to_env(list(words), f"{path}: {field}")
        secrets += [(f"{field}: {flag_of[name]}", name) for name in taken]
    if secrets:
        shown, name = secrets[0]
        fix = (
            f"export {name} before sbatch: the job passes your environment to every node"
            if fmt == "slurm"
            else "a Kubernetes Secret named in kubernetes.env_from_secret"
        )
        where = "the job script" if fmt == "slurm" else "a ConfigMap"
        raise ConfigError(
            f"{path}: {shown}: a secret would be written into {where} (expected it out of the deploy file: {fix})"
        )


def _stand_in_addresses(config: DeployConfig) -> DeployConfig:
    """Documentation-range addresses (RFC 5737) where the scheduler will put real ones."""
    from launch.placement import with_addresses

    if config.disaggregation is None:
        return with_addresses(config, {None: {r: f"192.0.2.{r + 1}" for r in range(len(config.nodes))}})
    d = config.disaggregation
    return with_addresses(
        config,
        {
            "prefill": {r: f"198.51.100.{r + 1}" for r in range(len(d.prefill.nodes))},
            "decode": {r: f"203.0.113.{r + 1}" for r in range(len(d.decode.nodes))},
        },
    )


def _scheduled_deploy(request: Request) -> tuple[DeployConfig, str]:
    """The deploy file a scheduled step runs: --deploy, else the copy the job script carries."""
    if not request.deploy and not request.deploy_text:
        raise ConfigError(
            "deploy file: none given (pass --deploy FILE; in a job from `plan --format slurm`, EP_DEPLOY_TEXT carries it)"
        )
    return load(request)


def _placed_file(config: DeployConfig, name: str) -> str:
    """The placed deploy file, node-local (steps are separate processes that read a file)."""
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"vllm-ep-{os.getuid()}"
    path = folder / f"{name}.yaml"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The scheduler stops the group when a node fails (docs/operations.md): the launchers' watch stays off.
        path.write_text(
            dump_deploy(config.model_copy(update={"watch": config.watch.model_copy(update={"enabled": False})}))
        )
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot write the placed deploy file ({exc.strerror or exc}; expected a writable "
            f"temporary folder: set TMPDIR)"
        ) from None
    return str(path)


def _run_step(step: str, placed: str, rank: int, group: str | None, extra: list[str]) -> int:
    """Replaces this process with the step, so the scheduler's signals reach it directly. Every node of the job
    runs preflight at once, so its cross-node checks are expected (--cross-node)."""
    where = ["--node-rank", str(rank)]
    grouped = ["--group", group] if group else []
    argv = {
        "preflight": ["-m", "preflight", "--deploy", placed, *where, *grouped, "--cross-node", *extra],
        "serve": ["-m", "launch", group or "serve", "--deploy", placed, *where, *extra],
        "plan": ["-m", "launch", "plan", placed, *where, *grouped, *extra],
        "check": ["-m", "launch", "check", placed, *where, *grouped, *extra],
        "proxy": ["-m", "launch", "proxy", "--deploy", placed, *extra],
    }[step]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])
    return 1  # not reached


def slurm_step(args: argparse.Namespace, passthrough: list[str]) -> int:
    from launch import placement

    config, source = _scheduled_deploy(from_args(args, []))
    job = os.environ.get("SLURM_JOB_ID", "?")
    if args.step in ("allocation", "proxy"):
        placed, hosts = placement.slurm_allocation(config, source)
        if args.step == "proxy":
            return _run_step("proxy", _placed_file(placed, f"slurm-{job}-router"), 0, None, passthrough)
        for group, names in hosts.items():
            for rank, (host, node) in enumerate(zip(names, placement.group_nodes(placed, group), strict=True)):
                role = "primary" if rank == 0 else "secondary"
                print(
                    f"[launch] slurm job {job}: {group + ' ' if group else ''}node {rank} ({role}) = {host} {node.address}"
                )
        if placed.disaggregation is not None:
            from launch import router

            api = f"{router.address(placed)}:{placed.disaggregation.router.port} (vllm-router)"
        else:
            api = f"{placed.nodes[0].address}:{placed.port}"
        print(f"[launch] slurm job {job}: the API will answer at http://{api} once every node is up")
        return 0
    p = placement.slurm(config, source, args.group)
    say(f"slurm job {job}: {p.describe()}")
    placed = _placed_file(p.config, f"slurm-{job}-{args.group or 'node'}-{p.node_rank}")
    extra = [*(config.slurm.preflight_args if args.step == "preflight" else []), *passthrough]
    return _run_step(args.step, placed, p.node_rank, args.group, extra)


def lws_step(args: argparse.Namespace, passthrough: list[str]) -> int:
    from launch import placement

    config, source = _scheduled_deploy(from_args(args, []))
    if args.step == "proxy":
        # The router's pod (a Deployment, not a LeaderWorkerSet): the groups' leaders through their Services.
        if args.group:
            raise ConfigError(
                f"--group {args.group}: not taken by lws-step proxy (expected none: the router fronts both)"
            )
        placed = placement.k8s_router(config, source)
        say(
            f"router pod: prefill at {placement.group_nodes(placed, 'prefill')[0].address}, "
            f"decode at {placement.group_nodes(placed, 'decode')[0].address}"
        )
        return _run_step("proxy", _placed_file(placed, "lws-router"), 0, None, passthrough)
    try:
        p = placement.lws(config, source, group=args.group, resolve_timeout=args.resolve_timeout, say=say)
    except placement.LeaderNotFound as exc:
        raise NodeDown(str(exc)) from None
    say(f"LeaderWorkerSet pod: {p.describe()}")
    if args.step == "serve" and "--dry-run" not in passthrough:  # a dry run changes nothing
        from launch import pod

        say(f"/dev/shm: {pod.clear_shm()} entries left by an earlier run removed")
    placed = _placed_file(p.config, f"lws-{args.group or 'node'}-{p.node_rank}-{args.step}")
    return _run_step(args.step, placed, p.node_rank, args.group, passthrough)


def run(args: argparse.Namespace, passthrough: list[str]) -> int:
    return slurm_step(args, passthrough) if args.command == "slurm-step" else lws_step(args, passthrough)
