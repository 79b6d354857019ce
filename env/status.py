"""`python -m env status`: what is built, from which commit, for which archs; what is missing or stale.

Stale means the build no longer matches what a build would make now: the pin changed since (another
commit, version or recipe), torch changed under it, or it was built for other GPU archs than asked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from env import machine
from env.manifest import Manifest, digest
from env.pins import Component, Profile

State = Literal["ok", "stale", "missing", "optional", "unchecked"]


@dataclass(frozen=True)
class Row:
    name: str
    kind: str
    pin: str
    built: str
    """What is there: the commit or version built, the package version installed, or '-'."""
    archs: str
    state: State
    detail: str
    default: bool = True


def _pin_text(comp: Component) -> str:
    return comp.ref[:7] if comp.kind == "git" else comp.ref


def _row_of(comp: Component):
    """A Row maker for ``comp``: (state, detail, built, archs) -> Row, its name, kind, pin and default filled in."""

    def row(state: State, detail: str, built: str = "-", archs: str = "-", default: bool | None = None) -> Row:
        given = comp.default if default is None else default
        return Row(comp.name, comp.kind, _pin_text(comp), built, archs, state, detail, given)

    return row


def component_row(
    comp: Component,
    manifest: Manifest,
    info: machine.PythonInfo | None,
    archs: machine.ArchList | None,
    conda_prefix: str | None,
) -> Row:
    if comp.kind in ("pypi", "conda"):
        return _package_row(comp, info, conda_prefix)
    row, pin = _row_of(comp), _pin_text(comp)
    entry = manifest.live(comp.name)
    if entry is None:
        if comp.name in manifest.entries:
            return row("missing", "recorded, but its build folder or link is gone: build again")
        if not comp.default:
            return row("optional", f"not built (optional: --only {comp.name})", default=False)
        return row("missing", "not built: python -m env build", default=True)
    built = (entry.commit or "")[:7] or (entry.version or "?")
    shown = entry.arch_list or "-"
    if entry.pin_hash != digest(comp.pin()):
        what = f"built {built}, pinned {pin}" if built != pin else "the recipe or URL changed"
        return row("stale", f"pin changed since the build ({what}): build again", built, shown)
    if comp.needs_torch and info and info.torch and entry.torch != info.torch:
        why = f"built against torch {entry.torch}, the environment has {info.torch}: build again"
        return row("stale", why, built, shown)
    if comp.cuda and archs and archs.archs and entry.arch_list != archs.value:
        return row(
            "stale", f"built for {entry.arch_list}, {archs.origin} says {archs.value}: build again", built, shown
        )
    detail = f"built {entry.built_at} in {entry.duration_s:g} s, artifact {entry.artifact_sha256[:12]}"
    return row("ok", detail, built, shown)


def _package_row(comp: Component, info: machine.PythonInfo | None, conda_prefix: str | None) -> Row:
    row = _row_of(comp)
    if comp.kind == "conda":
        if not conda_prefix:
            return row("unchecked", "no conda environment active (pixi shell / pixi run)")
        metas = sorted(Path(conda_prefix, "conda-meta").glob(f"{comp.url}-[0-9]*.json"))
        if not metas:
            return row("missing", "not in the conda environment: pixi install")
        version = metas[-1].name[len(comp.url) + 1 :].split("-")[0]
        return row("ok", "from the conda environment", version)
    if info is None:
        return row("unchecked", "Python not probed")
    have = info.packages.get(comp.url)
    if not have:
        return row("missing", "not installed: pixi install (or pip install)")
    try:
        ok = Version(have) in SpecifierSet(comp.ref) if comp.ref not in ("", "*") else True
    except (InvalidSpecifier, InvalidVersion):
        ok = True
    return row("ok", "installed", have) if ok else row("stale", f"installed {have} does not satisfy {comp.ref}", have)


def rows(
    profile: Profile,
    prefix: Path,
    info: machine.PythonInfo | None,
    archs: machine.ArchList | None,
    conda_prefix: str | None,
) -> list[Row]:
    manifest = Manifest.load(prefix)
    # vLLM and torch head the table: the builds are made for them.
    base = [
        Component(name=n, kind="pypi", url=n, ref=spec, source=f"profile {profile.name}", cuda=False)
        for n, spec in (("vllm", f"=={profile.vllm}"), ("torch", f"=={profile.torch}"))
        if spec != "=="
    ]
    return [component_row(c, manifest, info, archs, conda_prefix) for c in (*base, *profile.components)]


def healthy(table: list[Row]) -> bool:
    """Every component the profile builds or expects by default is in place and current."""
    return all(r.state in ("ok", "unchecked") for r in table if r.default)


def render_text(profile: Profile, prefix: Path, table: list[Row], nccl: dict[str, str] | None = None) -> str:
    lines = [
        f"# env status: profile {profile.name}, prefix {prefix}",
        f"# {'component':<14} {'kind':<8} {'pin':<12} {'built':<12} {'archs':<10} {'state':<9} detail",
    ]
    for r in table:
        lines.append(
            f"  {r.name:<14} {r.kind:<8} {r.pin[:12]:<12} {r.built[:12]:<12} {r.archs[:10]:<10} {r.state:<9} {r.detail}"
        )
    if nccl:  # the library `env paths` puts first on LD_LIBRARY_PATH: torch and the kernels load it
        lines.append(f"# nccl  : {nccl['version']} from {nccl['root']} ({nccl['origin']})")
    lines.append(f"# stack : {'OK' if healthy(table) else 'INCOMPLETE'}")
    return "\n".join(lines)


def render_json(profile: Profile, prefix: Path, table: list[Row], nccl: dict[str, str] | None = None) -> str:
    return json.dumps(
        {
            "profile": profile.name,
            "prefix": str(prefix),
            "ok": healthy(table),
            "nccl": nccl,
            "components": [asdict(r) for r in table],
        },
        indent=2,
    )
