"""What the user asked for, typed: the parsed command line plus every environment fallback, read here once.

    command line + environment -> Request -> launch/resolve.py -> node plans -> print | check | run

No other module of the launcher reads options or the environment to decide a plan. The fallbacks:

    EP_DEPLOY              the deploy file when none is named on the command line
    EP_DEPLOY_TEXT / _NAME the deploy file's text carried by a scheduler job (`plan --format slurm`)
    VLLM_ALL2ALL_BACKEND   the all2all backend when neither --all2all-backend nor the deploy file names one
                           (the guide exports it; the plan then carries it, and so does preflight's)
    EP_STACK_PROFILE       the stack profile whose paths and pinned vLLM the plan uses (pixi's feature sets it)
    EP_VLLM_PYTHON         the Python whose vLLM parses the argvs of `check`

Arguments after ``--`` go to vLLM; a flag the launcher owns among them is taken into the overrides (or
refused) here, by launch/vllm_flags.py, so it reaches the plan once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from env.pins import DEFAULT_PROFILE, PROFILES
from launch import vllm_flags
from launch.errors import ConfigError

GUIDE_ARGS = {
    "primary": ("NODE1_IP", "RPC_PORT", "MODEL", "TOTAL_DP", "LOCAL_DP", "API_SERVERS"),
    "secondary": ("NODE1_IP", "RPC_PORT", "MODEL", "TOTAL_DP", "LOCAL_DP", "START_RANK"),
}
SERVING = ("primary", "secondary", "serve", "prefill", "decode")
"""Commands that run this node's part (and so need to know which node this is)."""


@dataclass(frozen=True)
class Overrides:
    """Named options that win over the deploy file; each is validated by the deploy file's own model."""

    port: int | None = None
    host: str | None = None
    tensor_parallel_size: int | None = None
    api_server_count: int | None = None
    all2all_backend: str | None = None
    trust_remote_code: bool | None = None
    enable_expert_parallel: bool | None = None
    transport: str | None = None
    socket_ifname: str | None = None
    vllm_version: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    """Field -> how the user gave it (``--port``, ``-- --port``), for error messages."""

    def given(self) -> dict[str, object]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "options" and getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class Running:
    """How a serving command runs its node's plan (no effect on the plan itself)."""

    dry_run: bool = False
    log_file: str | None = None
    stop_timeout: float = 30.0
    vllm_bin: str | None = None
    wait_for_primary: float = 600.0
    health_timeout: float = 1800.0
    wait_for_nodes: float = 600.0


@dataclass(frozen=True)
class Request:
    command: str
    deploy: str | None = None
    """Deploy file path (a positional FILE, --deploy, or EP_DEPLOY)."""
    deploy_text: str | None = None
    """A scheduler job's copy of the deploy file (EP_DEPLOY_TEXT), when no path is given."""
    deploy_name: str = "EP_DEPLOY_TEXT"
    guide: tuple[str, ...] = ()
    """The guide's six positional arguments (primary / secondary)."""
    node_rank: int | None = None
    group: str | None = None
    overrides: Overrides = Overrides()
    vllm_args: tuple[str, ...] = ()
    """Arguments after ``--`` that vLLM gets as they are (owned flags already taken out)."""
    exported_backend: str | None = None
    """VLLM_ALL2ALL_BACKEND from the environment."""
    profile: str = DEFAULT_PROFILE
    vllm_python: str = sys.executable
    running: Running = Running()

    @property
    def serving(self) -> bool:
        return self.command in SERVING

    @property
    def one_node(self) -> bool:
        """Whether the request is about this machine's node only (serving, preflight)."""
        return self.serving or self.command == "preflight"

    @property
    def role(self) -> str | None:
        """The part a serving command runs (primary, secondary, prefill, decode; serve: from the file)."""
        return self.command if self.command in SERVING and self.command != "serve" else None


def from_args(args: argparse.Namespace, passthrough: list[str], environ: Mapping[str, str] | None = None) -> Request:
    """The parsed command line and the environment as one Request; raises ConfigError (one line)."""
    environ = os.environ if environ is None else environ
    taken, rest = vllm_flags.split(list(passthrough), "--")
    named = {f.name: getattr(args, f.name, None) for f in fields(Overrides) if f.name != "options"}
    options = {name: f"--{name.replace('_', '-')}" for name, value in named.items() if value is not None}
    for name, value in taken.items():
        given = named.get(name)
        if given is not None and str(given) != str(value):
            flag = options[name]
            raise ConfigError(f"{flag}: given as {given} and after -- as {value} (expected one value)")
        named[name] = _typed(name, value)
        options.setdefault(name, f"-- --{name.replace('_', '-')}")
    profile = environ.get("EP_STACK_PROFILE") or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise ConfigError(f"EP_STACK_PROFILE: unknown profile {profile!r} (expected one of: {', '.join(PROFILES)})")
    path = getattr(args, "deploy", None) or getattr(args, "deploy_file", None)
    guide = tuple(getattr(args, "guide", None) or ())
    text = environ.get("EP_DEPLOY_TEXT") if args.command in ("slurm-step", "lws-step") and not path else None
    fallback = None if text or guide else environ.get("EP_DEPLOY")  # the guide's arguments need no file
    return Request(
        command=args.command,
        deploy=path or fallback or None,
        deploy_text=text,
        deploy_name=environ.get("EP_DEPLOY_NAME") or "EP_DEPLOY_TEXT",
        guide=guide,
        node_rank=getattr(args, "node_rank", None),
        group=getattr(args, "group", None),
        overrides=Overrides(**named, options=options),
        vllm_args=tuple(rest),
        exported_backend=environ.get("VLLM_ALL2ALL_BACKEND") or None,
        profile=profile,
        vllm_python=getattr(args, "python", None) or environ.get("EP_VLLM_PYTHON") or sys.executable,
        running=Running(**{f.name: getattr(args, f.name) for f in fields(Running) if hasattr(args, f.name)}),
    )


def _typed(name: str, value: str | bool) -> object:
    """A value taken from after ``--``, as the named option would have typed it."""
    if isinstance(value, bool) or name not in ("port", "tensor_parallel_size", "api_server_count"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"-- --{name.replace('_', '-')}: expected an integer, got {value!r}") from None
