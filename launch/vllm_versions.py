"""What each vLLM version accepts, so the launcher emits only what the target version understands.

The target version is, in order: the one given on the command line or in the deploy file, the one
installed where the plan is made, or the stack's pinned version. What a version accepts is read from
launch/vllm_facts.json, the table `python -m launch.vllm_facts` derives from each release's wheel (the
file and line of every fact are in it; docs/vllm-versions.md renders it). A version between two rows of
the table takes the nearest older row; a version newer than the newest row takes the newest, and says so.
The real parser of an installed vLLM has the last word on the argv (`python -m launch check`).
"""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from env.pins import PROFILES, active_profile
from launch import vllm_facts
from launch.config import ConfigError

ROCM_ONLY = ("mori",)
"""Backends of AMD's ROCm (MoRI): the toolkit targets NVIDIA clusters, so they are left out of plans."""


@functools.cache
def rows() -> tuple[dict[str, Any], ...]:
    """The facts table, oldest release first."""
    return tuple(vllm_facts.load())


def row_for(version: Version, field: str = "vllm_version") -> tuple[dict[str, Any], str | None]:
    """The row that describes `version` and, when it is not that release's own row, a note saying which."""
    table = rows()
    older = [r for r in table if Version(r["version"]) <= version]
    if not older:
        raise ConfigError(
            f"{field}: {version} is older than the oldest release the toolkit has read "
            f"({table[0]['version']}; expected >= {table[0]['version']})"
        )
    row = older[-1]
    if Version(row["version"]) == version:
        return row, None
    if row is table[-1]:
        return row, f"newer than the newest release read ({row['version']}): planned with its facts"
    return row, f"planned with the facts of {row['version']}, the nearest older release read"


def _plannable(row: dict[str, Any], name: str) -> str | None:
    """The backend vLLM really builds for `name` in this release (after its config's rewrites), or None
    where the release refuses it (its config's choices, or the communicator's `Unknown all2all backend`)."""
    if name.startswith(ROCM_ONLY):
        return None
    accepted = row["accepted"]
    if accepted is not None and name not in accepted["names"]:
        return None
    if row["flag"]["exists"] and name in {c["name"] for c in row["flag"].get("removed_choices", [])}:
        return None
    used = row["rewrites"].get(name, {}).get("to", name)
    if used not in row["backends"]:
        return None
    return _current_name(row, used) or used


def _current_name(row: dict[str, Any], name: str) -> str | None:
    """For a name the communicator marks deprecated, the one current name it shares the branch with
    (flashinfer_all2allv -> flashinfer_nvlink_two_sided from 0.18): same manager, no deprecation warning."""
    entries = row["backends"][name]
    if not all(e.get("deprecated") for e in entries):
        return None
    branch = {e["at"] for e in entries}
    current = [
        other
        for other, others in row["backends"].items()
        if other != name
        and not other.startswith(ROCM_ONLY)
        and any(e["at"] in branch and not e.get("deprecated") for e in others)
    ]
    return current[0] if len(current) == 1 else None


@dataclass(frozen=True)
class Backend:
    """A backend name and the releases of the table that accept it (since, up to removed)."""

    name: str
    since: Version
    removed: Version | None = None
    note: str = ""

    def available(self, version: Version) -> bool:
        return self.since <= version and (self.removed is None or version < self.removed)


def _backends() -> tuple[Backend, ...]:
    table = rows()
    names: dict[str, None] = {}
    for r in table:
        names.update(dict.fromkeys(r["backends"]))
        names.update(dict.fromkeys(r["rewrites"]))
    out = []
    for name in names:
        if name.startswith(ROCM_ONLY):
            continue
        ok = [_plannable(r, name) is not None for r in table]
        if not any(ok):
            continue
        first = ok.index(True)
        gone = next((i for i in range(first, len(ok)) if not ok[i]), None)
        out.append(Backend(name, Version(table[first]["version"]), Version(table[gone]["version"]) if gone else None))
    return tuple(out)


BACKENDS: tuple[Backend, ...] = _backends()
"""Every backend some release of the table accepts, with the first release that does and the first after
it that does not (ROCm's mori_* left out)."""


@dataclass(frozen=True)
class BackendChoice:
    """A backend as asked for, and what vLLM will really build."""

    asked: str
    used: str
    note: str | None = None


@dataclass(frozen=True)
class Target:
    """The vLLM version a plan is made for, and where that fact came from."""

    version: Version
    source: str  # "given", "deploy file", "installed", "pinned"

    @property
    def row(self) -> dict[str, Any]:
        return row_for(self.version, self._field)[0]

    @property
    def _field(self) -> str:
        """Where the version came from, as the user would name it in an error."""
        return {"given": "--vllm-version", "installed": "installed vLLM"}.get(self.source, "vllm_version")

    @property
    def all2all_as_flag(self) -> bool:
        """--all2all-backend exists (vllm/engine/arg_utils.py); before, only VLLM_ALL2ALL_BACKEND did."""
        return bool(self.row["flag"]["exists"])

    @property
    def reads_all2all_env(self) -> bool:
        """VLLM_ALL2ALL_BACKEND decides the backend in this release (vllm/envs.py and where it is used)."""
        return bool(self.row["env"]["read"])

    @property
    def default_backend(self) -> str:
        """The backend vLLM uses when none is named."""
        return str(self.row["default"]["name"])

    def backends(self) -> list[str]:
        """Every name this release accepts, rewritten ones included (they plan as what they become)."""
        row = self.row
        names = [*row["backends"], *row["rewrites"]]
        return [n for n in dict.fromkeys(names) if _plannable(row, n) is not None]

    def choose_backend(self, name: str) -> BackendChoice:
        """What vLLM will build for `name`; refuses a name this release does not accept, naming the alternatives."""
        row = self.row
        choices = ", ".join(self.backends())
        if name.startswith(ROCM_ONLY):
            raise ConfigError(
                f"all2all_backend: {name!r} is ROCm's (AMD MoRI); the toolkit plans for NVIDIA GPUs "
                f"(expected one of: {choices})"
            )
        used = _plannable(row, name)
        removed = {c["name"]: c["at"] for c in row["flag"].get("removed_choices", [])}
        if used is None and name in removed:
            raise ConfigError(
                f"all2all_backend: {name!r} is not a choice of --all2all-backend in vLLM {self.version} "
                f"({removed[name]} removes it: vLLM sets it itself; expected one of: {choices})"
            )
        if used is None:
            known = {b.name: b for b in BACKENDS}
            backend = known.get(name)
            if backend is None:
                raise ConfigError(f"all2all_backend: unknown backend {name!r} (expected one of: {choices})")
            if self.version < backend.since:
                raise ConfigError(
                    f"all2all_backend: {name!r} needs vLLM >= {backend.since}, the target is "
                    f"{self.version} (expected one of: {choices})"
                )
            raise ConfigError(
                f"all2all_backend: {name!r} was removed in vLLM {backend.removed} and the target is "
                f"{self.version} (expected one of: {choices})"
            )
        if used == name:
            return BackendChoice(name, used)
        if name in row["rewrites"]:
            why = f"vLLM {self.version} replaces it with {used!r} ({row['rewrites'][name]['at']})"
        else:
            why = f"deprecated in vLLM {self.version}, which builds the same manager for {used!r} ({row['backends'][name][0]['at']})"
        return BackendChoice(name, used, f"all2all backend {name!r}: {why}; planned as {used}")

    def check_backend(self, name: str) -> str:
        """Refuses a backend this version removed or never had; returns the backend vLLM will really use."""
        return self.choose_backend(name).used

    def managers(self, name: str) -> list[str]:
        """The lines vLLM logs once `name` is built ("Using X all2all manager."), from this release's row."""
        used = _plannable(self.row, name) or name
        return [e["log"] or e["manager"] for e in self.row["backends"].get(used, [])]

    def api_server_default(self) -> tuple[str, str]:
        """What `vllm serve` starts when --api-server-count is not given, in internal load balancing mode (the
        primary of the classic layout): the value's expression and where it was read."""
        rule = self.row["api_server_count"]["internal_lb"]
        return rule["value"], rule["at"]

    def describe(self) -> str:
        note = row_for(self.version, self._field)[1]
        return f"vLLM {self.version} ({self.source}{'; ' + note if note else ''})"


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
