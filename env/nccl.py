"""The one NCCL: which NCCL library the stack's processes load, and its version.

torch finds libnccl.so.2 through its RUNPATH (site-packages/nvidia/nccl/lib) unless LD_LIBRARY_PATH names
another folder first; DeepEP v2 links the NCCL its setup.py finds (EP_NCCL_ROOT_DIR, NCCL_DIR, else the
nvidia-nccl wheel first on sys.path: deep_ep/utils/find_pkgs.py) and refuses to import when the process
holds a second one ("Duplicate NCCL runtime found", deep_ep/__init__.py check_nccl_so). So the stack picks
ONE: the variable's folder, else the nvidia-nccl wheel first on sys.path (a newer wheel installed beside the
image's, e.g. in a folder on PYTHONPATH, wins), and puts its lib/ first on LD_LIBRARY_PATH (env/paths.py),
so that torch and the kernels load the same library.

This module imports nothing outside the standard library: the build runs it inside the stack's own
interpreter to ask that interpreter the same question.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT_VARS = ("EP_NCCL_ROOT_DIR", "NCCL_DIR")
"""Variables naming an NCCL folder (include/, lib/), in the order DeepEP v2's find_pkg_root reads them."""


@dataclass(frozen=True)
class Nccl:
    root: str
    """The folder holding include/nccl.h and lib/libnccl.so*."""
    version: str
    """From include/nccl.h (what a build compiles against), else the wheel's metadata."""
    origin: str
    """Where it was found, in words: a variable or the wheel's name and folder."""

    @property
    def lib(self) -> str:
        return str(Path(self.root) / "lib")


def header_version(root: str | Path) -> str | None:
    """'2.32.3' from <root>/include/nccl.h's NCCL_MAJOR / NCCL_MINOR / NCCL_PATCH, or None."""
    try:
        text = (Path(root) / "include" / "nccl.h").read_text(errors="replace")
    except OSError:
        return None
    parts = [re.search(rf"#define\s+NCCL_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None  # type: ignore[union-attr]


def find(search_path: list[str], environ: dict[str, str] | None = None) -> Nccl | None:
    """The NCCL the stack loads: a ROOT_VARS folder, else the first nvidia-nccl wheel along `search_path`."""
    environ = os.environ if environ is None else environ
    for var in ROOT_VARS:
        if environ.get(var):
            root = environ[var]
            return Nccl(root, header_version(root) or "unknown", f"{var}={root}")
    import importlib.metadata as md

    for entry in search_path:
        if not entry or not Path(entry, "nvidia", "nccl", "lib").is_dir():
            continue
        for dist in md.distributions(path=[entry]):
            name = (dist.metadata["Name"] or "").lower().replace("_", "-")
            if name.startswith("nvidia-nccl-"):
                root = str(Path(entry, "nvidia", "nccl"))
                return Nccl(root, header_version(root) or dist.version, f"{name} {dist.version} in {entry}")
    return None
