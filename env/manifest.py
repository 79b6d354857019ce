"""The build manifest: what was built, from which source, how, for which GPUs, and its artifact's hash.

It lives next to the artifacts, in the stack's prefix:

    <prefix>/manifest.json           one entry per built component (this module)
    <prefix>/<component>             link to the component's current build (swapped atomically)
    <prefix>/builds/<component>-<h>  a build, never changed once finished; BUILD.json inside it
    <prefix>/logs/<component>-<h>.log  the build log of those inputs (the last attempt)

`<h>` is the first 12 hex digits of the hash of the build's inputs (pin, arch list, Python ABI, torch,
CUDA, NVSHMEM, compiler): same inputs, same folder, nothing to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from env.errors import StackError

MANIFEST = "manifest.json"
BUILD_RECORD = "BUILD.json"
SCHEMA = 1
TOOL = "vllm-ep-deploy"
"""Marks the manifest as this toolkit's: a build never writes over a file of the same name it did not make."""
_SKIP = {"__pycache__", BUILD_RECORD}
"""Left out of an artifact's hash: byte code (timestamps) and the record that holds the hash."""


@dataclass
class Entry:
    name: str
    kind: str
    url: str
    commit: str | None
    """git: the commit built (and `submodules` theirs)."""
    version: str | None
    """tarball: the version built."""
    sha256: str | None
    """tarball: the verified archive's sha256."""
    input_hash: str
    pin_hash: str
    """The hash of the pin alone: status compares it with the pins to say 'stale'."""
    artifact_sha256: str
    built_at: str
    duration_s: float
    path: str
    """The build folder, relative to the prefix."""
    link: str
    arch_list: str
    arch_origin: str
    flags: dict[str, str] = field(default_factory=dict)
    """Environment and cmake flags the build ran with."""
    command: str = ""
    submodules: dict[str, str] = field(default_factory=dict)
    max_jobs: int = 1
    python: str = ""
    torch: str | None = None
    cuda: str | None = None
    compiler: str | None = None
    nvshmem_dir: str | None = None
    """The NVSHMEM_DIR built with, or the wheel its setup.py found itself."""
    patches: list[dict[str, str]] = field(default_factory=list)
    """Patches applied before the build: url and sha256 of each."""
    nccl: str | None = None
    """The NCCL built against (version and folder), for components that link it."""
    module: str | None = None
    log: str = ""
    pythonpath: list[str] = field(default_factory=list)
    """Folders for PYTHONPATH, relative to the prefix and through the link (so a rebuild keeps them)."""
    ld_library_path: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Variables the artifact provides (NVSHMEM_DIR), relative to the prefix."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Manifest:
    prefix: Path
    profile: str = ""
    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.prefix / MANIFEST

    @classmethod
    def load(cls, prefix: Path, strict: bool = True) -> Manifest:
        """The prefix's manifest (empty when there is none). A broken one is an error when `strict`,
        else ignored: the launcher must never fail on it."""
        path = prefix / MANIFEST
        if not path.is_file():
            return cls(prefix)
        try:
            data = json.loads(path.read_text())
            ours = isinstance(data, dict) and (
                data.get("tool") == TOOL or (data.get("schema") == SCHEMA and {"profile", "entries"} <= data.keys())
            )  # the second form: manifests written before the marker
            if not ours:
                if not strict:
                    return cls(prefix)
                raise StackError(
                    str(path),
                    'is not a build manifest of this toolkit (no "tool": "vllm-ep-deploy"); it is left as it is',
                    "build into another --prefix, or move that file away",
                )
            entries = {name: Entry.from_json(e) for name, e in data.get("entries", {}).items()}
            return cls(prefix, data.get("profile", ""), entries)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            if strict:
                raise StackError(
                    str(path), f"is not a readable build manifest ({exc})", "remove it and build again"
                ) from None
            return cls(prefix)

    def save(self) -> None:
        data = {
            "tool": TOOL,
            "schema": SCHEMA,
            "profile": self.profile,
            "entries": {n: asdict(e) for n, e in sorted(self.entries.items())},
        }
        write_json(self.path, data)

    def live(self, name: str) -> Entry | None:
        """The entry of `name` whose build is in place (its link resolves to its folder)."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        link, target = self.prefix / entry.link, self.prefix / entry.path
        if not target.is_dir() or not link.is_dir() or link.resolve() != target.resolve():
            return None
        return entry


def write_json(path: Path, data: Any) -> None:
    """Written whole or not at all: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tree_sha256(root: Path) -> str:
    """One hash over a build folder's files (paths, contents, links), in a fixed order."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP)
        for name in sorted(filenames):
            if name in _SKIP:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                h.update(f"L {rel} {os.readlink(path)}\n".encode())
                continue
            h.update(f"F {rel}\n".encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        for d in dirnames:
            if (Path(dirpath) / d).is_symlink():
                h.update(
                    f"L {(Path(dirpath) / d).relative_to(root).as_posix()} {os.readlink(Path(dirpath) / d)}\n".encode()
                )
    return h.hexdigest()
