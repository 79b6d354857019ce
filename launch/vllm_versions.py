"""What each vLLM version accepts, so the launcher emits only what the target version understands.

The target version is, in order: the one given on the command line or in the deploy file, the one
installed where the plan is made, or the stack's pinned version. Facts come from vLLM's own sources
(vllm/envs.py, vllm/config/parallel.py, vllm/engine/arg_utils.py) at the tagged releases; the real
parser of an installed vLLM has the last word (`python -m launch check`).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from env.pins import PROFILES, active_profile
from launch.config import ConfigError

ALL2ALL_FLAG_SINCE = Version("0.11.1")
"""--all2all-backend appeared in 0.11.1; before, only the VLLM_ALL2ALL_BACKEND variable existed."""
ALL2ALL_ENV_REMOVED = Version("0.15.0")
"""VLLM_ALL2ALL_BACKEND is no longer read from this version on."""


@dataclass(frozen=True)
class Backend:
    name: str
    since: Version
    removed: Version | None = None
    note: str = ""

    def available(self, version: Version) -> bool:
        return self.since <= version and (self.removed is None or version < self.removed)


_V0 = Version("0.0")
BACKENDS: tuple[Backend, ...] = (
    Backend("naive", _V0, Version("0.16.0"), "removed in early 2026"),
    Backend("pplx", _V0, Version("0.16.0"), "pplx-kernels support was removed in early 2026"),
    Backend("allgather_reducescatter", _V0),
    Backend("deepep_high_throughput", _V0),
    Backend("deepep_low_latency", _V0),
    Backend("flashinfer_all2allv", Version("0.11.0")),
    Backend("deepep_v2", Version("0.24.0"), note="needs NCCL >= 2.30.4"),
    Backend("nixl_ep", Version("0.24.0")),
    Backend("flashinfer_nvlink_two_sided", Version("0.24.0")),
    Backend("flashinfer_nvlink_one_sided", Version("0.24.0")),
)
"""Known all2all backends and the releases between which vLLM accepts them (ROCm's mori_* left out:
the toolkit targets NVIDIA clusters)."""


@dataclass(frozen=True)
class Target:
    """The vLLM version a plan is made for, and where that fact came from."""

    version: Version
    source: str  # "given", "deploy file", "installed", "pinned"

    @property
    def all2all_as_flag(self) -> bool:
        return self.version >= ALL2ALL_FLAG_SINCE

    @property
    def reads_all2all_env(self) -> bool:
        return self.version < ALL2ALL_ENV_REMOVED

    def backends(self) -> list[str]:
        return [b.name for b in BACKENDS if b.available(self.version)]

    def check_backend(self, name: str) -> None:
        """Refuses a backend this version removed or never had, naming the alternatives."""
        known = {b.name: b for b in BACKENDS}
        choices = ", ".join(self.backends())
        backend = known.get(name)
        if backend is None:
            raise ConfigError(f"all2all_backend: unknown backend {name!r} (expected one of: {choices})")
        if backend.removed is not None and self.version >= backend.removed:
            raise ConfigError(
                f"all2all_backend: {name!r} was removed in vLLM {backend.removed} and the target is {self.version} "
                f"({backend.note}; expected one of: {choices})"
            )
        if self.version < backend.since:
            raise ConfigError(
                f"all2all_backend: {name!r} needs vLLM >= {backend.since}, the target is {self.version} (expected one of: {choices})"
            )

    def describe(self) -> str:
        return f"vLLM {self.version} ({self.source})"


def parse_version(text: str, field: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:
        raise ConfigError(f"{field}: {text!r} is not a version (expected e.g. 0.26.0)") from None


def installed_vllm() -> str | None:
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_target(given: str | None, from_deploy: str | None) -> Target:
    if given:
        return Target(parse_version(given, "--vllm-version"), "given")
    if from_deploy:
        return Target(parse_version(from_deploy, "vllm_version"), "deploy file")
    installed = installed_vllm()
    if installed:
        # Local builds carry suffixes (0.26.0+cu130, 0.27.0.dev12); compare on the release part.
        return Target(Version(Version(installed).base_version), "installed")
    profile = active_profile()
    return Target(Version(PROFILES[profile].vllm), f"pinned, profile {profile}")
