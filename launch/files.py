"""Files the launcher writes where the user says (`plan --out`, `bench --out`).

It writes only there, never through a symbolic link (a link may point at anything the user, or someone with
write access to the folder, chose), never over a file that differs unless --force says so, and each file
whole: written beside its name and renamed into place, so that a reader never sees half of it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from launch.errors import ConfigError


def refuse_link(path: Path, option: str) -> None:
    if path.is_symlink():
        raise ConfigError(
            f"{option}: {path} is a symbolic link (expected a regular file or none: the toolkit does not write "
            "through links; remove it)"
        )


def may_write(path: Path, text: str, *, force: bool, option: str, new: str = "a new file") -> None:
    """Refuses before anything is written: a link, or a different file without --force."""
    refuse_link(path, option)
    if path.exists() and not force and path.read_text(errors="replace") != text:
        raise ConfigError(f"{option}: {path} exists and differs (expected {new}, or --force to overwrite)")


def write(path: Path, text: str, *, mode: int = 0o644) -> None:
    """``text`` at ``path``, whole (call ``may_write`` first)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
