"""PYTHONPATH and LD_LIBRARY_PATH for the stack, computed, never typed by hand.

Two sources, in this order:
1. the built stack's prefix (EP kernels built from source by `python -m env build`), given by
   EP_STACK_PREFIX or `.stack/<profile>` in the project root. Its manifest.json lists what each built
   component provides, through the component's link (<prefix>/deepep/python, <prefix>/nvshmem/lib,
   NVSHMEM_DIR=<prefix>/nvshmem), so a rebuild never changes the paths; the plain folders
   <prefix>/python, <prefix>/lib and <prefix>/nvshmem of a hand-made prefix are honoured too;
2. the active Python environment: the CUDA libraries that pip/conda wheels put under
   site-packages/nvidia/*/lib (NVSHMEM, cuBLAS, ...) along sys.path, and torch's own lib folder, so that
   extensions linked against them (DeepEP against libnvshmem_host.so.3) load without a system copy.

One NCCL (env/nccl.py): the NCCL folder comes FIRST on LD_LIBRARY_PATH and no other NCCL folder is listed,
so that torch (which would otherwise load its own wheel's through its RUNPATH) and DeepEP v2 (which links
the newer one and refuses a second NCCL in the process) load the same library.
NVSHMEM_DIR is exported only for an NVSHMEM built or installed as a folder, never for the pip wheel:
DeepEP v1's setup.py finds the wheel itself, and links a name the wheel lacks when NVSHMEM_DIR is set.

The launcher and preflight's import checks call the same :func:`stack_paths`, so what preflight imports
is what vLLM will import.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from env import nccl
from env.manifest import Manifest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StackPaths:
    prefix: Path
    pythonpath: list[str] = field(default_factory=list)
    ld_library_path: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Other variables the stack needs (NVSHMEM_DIR, CUDA_HOME) where their folders exist."""

    def as_prepend(self) -> dict[str, list[str]]:
        return {k: v for k, v in (("PYTHONPATH", self.pythonpath), ("LD_LIBRARY_PATH", self.ld_library_path)) if v}


def default_prefix(profile: str) -> Path:
    given = os.environ.get("EP_STACK_PREFIX")
    return Path(given) if given else PROJECT_ROOT / ".stack" / profile


def _site_dirs() -> list[Path]:
    """The folders Python imports from, in sys.path order (PYTHONPATH first), then the site dirs."""
    seen: list[Path] = []
    for entry in [*sys.path, *(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))]:
        path = Path(entry) if entry else None
        if path and path.is_dir() and path not in seen:
            seen.append(path)
    return seen


def stack_paths(profile: str = "current", prefix: Path | None = None) -> StackPaths:
    prefix = prefix or default_prefix(profile)
    pythonpath: list[str] = []
    libs: list[str] = []
    env: dict[str, str] = {}
    manifest = Manifest.load(prefix, strict=False)  # the launcher must not fail on a broken manifest
    for name in manifest.entries:
        entry = manifest.live(name)
        if entry is None:
            continue
        pythonpath.extend(str(prefix / p) for p in entry.pythonpath)
        libs.extend(str(prefix / p) for p in entry.ld_library_path)
        for key, rel in entry.env.items():
            env.setdefault(key, str(prefix / rel))
    built_site = prefix / "python"
    if built_site.is_dir():
        pythonpath.append(str(built_site))
    for sub in ("lib", "nvshmem/lib"):
        if (prefix / sub).is_dir():
            libs.append(str(prefix / sub))
    if (prefix / "nvshmem").is_dir():
        env.setdefault("NVSHMEM_DIR", str(prefix / "nvshmem"))
    sites = _site_dirs()
    the_nccl = nccl.find([str(s) for s in sites])
    if the_nccl:
        libs.insert(0, the_nccl.lib)
    for site in sites:
        nvidia = site / "nvidia"
        if nvidia.is_dir():
            libs.extend(str(p) for p in sorted(nvidia.glob("*/lib")) if p.is_dir() and p.parent.name != "nccl")
        torch_lib = site / "torch" / "lib"
        if torch_lib.is_dir():
            libs.append(str(torch_lib))
    conda_prefix = os.environ.get("CONDA_PREFIX")
    if conda_prefix and (Path(conda_prefix) / "targets").is_dir():
        env.setdefault("CUDA_HOME", conda_prefix)
    return StackPaths(prefix=prefix, pythonpath=_unique(pythonpath), ld_library_path=_unique(libs), env=env)


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def joined(prepend: list[str], inherited: str | None) -> str:
    """The value a path variable gets: ours first, then what the user had."""
    parts = list(prepend) + ([inherited] if inherited else [])
    return os.pathsep.join(parts)
