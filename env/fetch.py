"""The source cache: every source at its pin, fetched once, then built from anywhere, offline included.

Layout of a cache folder (copy it as a whole to a node without internet):

    git/<repo>-<urlhash>.git   a bare mirror of the repository (all refs), verified to hold the pinned commit
                               and, for components with submodules, the mirrors of those at their commits
    tarballs/<file>            source archives; a build uses one only when its sha256 matches the pin
    patches/<file>             patches a pin names by URL and sha256; a build applies one only when its
                               sha256 matches (a patch got another way may be put here by hand: it is checked)

Git runs non-interactively (no credential prompt can hang a build) and every call is bounded in time.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from env.errors import StackError
from env.pins import Component, Patch

GIT_TIMEOUT_S = 1800.0
"""Cloning a large repository (CUTLASS as a submodule) over a slow link takes minutes, not hours."""
DOWNLOAD_TIMEOUT_S = 120.0
"""Per socket operation: a stalled download fails instead of hanging."""
SUBMODULE_DEPTH = 3

OFFLINE_FIX = "on a node without internet: run `python -m env fetch --cache DIR` where the source is reachable, copy DIR here, then build with `python -m env build --offline --cache DIR`"


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GIT_TERMINAL_PROMPT"] = "0"  # never wait for a password that no one will type
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    return env


def git(args: list[str], timeout: float = GIT_TIMEOUT_S, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, env=_git_env(), timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(["git", *args], 124, "", f"git {args[0]} took more than {timeout:g} s")
    except FileNotFoundError:
        raise StackError(
            "git", "is not installed", "install git (Debian: apt-get install git; pixi: add git)"
        ) from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Submodule:
    path: str
    url: str
    commit: str


@dataclass(frozen=True)
class SourceCache:
    root: Path
    offline: bool = False

    # ---- git ----------------------------------------------------------------------------------------------

    def mirror_path(self, url: str) -> Path:
        stem = re.sub(r"\.git$", "", url.rstrip("/").rsplit("/", 1)[-1]) or "repo"
        digest = hashlib.sha256(url.encode()).hexdigest()[:10]
        return self.root / "git" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', stem)}-{digest}.git"

    @staticmethod
    def has_commit(mirror: Path, commit: str) -> bool:
        return (
            mirror.is_dir()
            and git(["--git-dir", str(mirror), "cat-file", "-e", f"{commit}^{{commit}}"], timeout=60).returncode == 0
        )

    def ensure_commit(self, where: str, url: str, commit: str) -> Path:
        """The mirror of `url`, holding `commit`: from the cache, else fetched (never when offline)."""
        mirror = self.mirror_path(url)
        if self.has_commit(mirror, commit):
            return mirror
        if self.offline:
            raise StackError(
                where, f"commit {commit[:12]} of {url} is not in the source cache {self.root}", OFFLINE_FIX
            )
        mirror.parent.mkdir(parents=True, exist_ok=True)
        if not mirror.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".clone-", dir=mirror.parent))
            proc = git(["clone", "--quiet", "--mirror", "--", url, str(tmp / "m.git")])
            if proc.returncode:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StackError(where, f"cannot reach {url} ({_last_line(proc.stderr)})", OFFLINE_FIX)
            os.replace(tmp / "m.git", mirror)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            proc = git(["--git-dir", str(mirror), "fetch", "--quiet", "--prune", "origin"])
            if proc.returncode:
                raise StackError(where, f"cannot reach {url} ({_last_line(proc.stderr)})", OFFLINE_FIX)
        if not self.has_commit(mirror, commit):
            # A commit no branch or tag reaches (e.g. from a pull request) can still be asked for by its hash.
            git(["--git-dir", str(mirror), "fetch", "--quiet", "origin", commit])
        if not self.has_commit(mirror, commit):
            raise StackError(
                where,
                f"commit {commit} does not exist in {url}",
                "fix the pin (env/pins.py, or the --pins file): use a full commit of that repository",
            )
        return mirror

    def submodules(self, where: str, mirror: Path, commit: str, parent_url: str) -> list[Submodule]:
        """The submodules recorded at `commit`: path, URL (relative ones resolved) and gitlink commit."""
        shown = git(["--git-dir", str(mirror), "show", f"{commit}:.gitmodules"], timeout=60)
        if shown.returncode:
            return []
        with tempfile.NamedTemporaryFile("w", suffix=".gitmodules", delete=False) as f:
            f.write(shown.stdout)
        try:
            listed = git(["config", "--file", f.name, "--get-regexp", r"^submodule\..*\.(path|url)$"], timeout=60)
        finally:
            os.unlink(f.name)
        specs: dict[str, dict[str, str]] = {}
        for line in listed.stdout.splitlines():
            key, _, value = line.partition(" ")
            name, _, attr = key[len("submodule.") :].rpartition(".")
            specs.setdefault(name, {})[attr] = value.strip()
        out = []
        for name, spec in sorted(specs.items()):
            if "path" not in spec or "url" not in spec:
                continue
            tree = git(["--git-dir", str(mirror), "ls-tree", commit, "--", spec["path"]], timeout=60)
            fields = tree.stdout.split()
            if len(fields) < 3 or fields[1] != "commit":
                raise StackError(
                    where,
                    f"submodule {name} has no commit recorded at {commit[:12]}",
                    "pin a commit whose submodules are complete",
                )
            out.append(Submodule(spec["path"], _resolve_url(parent_url, spec["url"]), fields[2]))
        return out

    def ensure_tree(self, where: str, url: str, commit: str, depth: int = 0) -> dict[str, str]:
        """Mirror `url` at `commit` and, recursively, its submodules: {submodule path: commit}."""
        mirror = self.ensure_commit(where, url, commit)
        found: dict[str, str] = {}
        if depth >= SUBMODULE_DEPTH:
            return found
        for sub in self.submodules(where, mirror, commit, url):
            found[sub.path] = sub.commit
            for path, c in self.ensure_tree(f"{where} (submodule {sub.path})", sub.url, sub.commit, depth + 1).items():
                found[f"{sub.path}/{path}"] = c
        return found

    def checkout(
        self, where: str, url: str, commit: str, dest: Path, with_submodules: bool, depth: int = 0
    ) -> dict[str, str]:
        """A working tree of `url` at `commit` in `dest` (and its submodules, from their mirrors)."""
        mirror = self.ensure_commit(where, url, commit)
        clone = git(["clone", "--quiet", "--no-checkout", "--", str(mirror), str(dest)])
        if clone.returncode:
            raise StackError(
                where, f"cannot copy the cached source ({_last_line(clone.stderr)})", f"remove {mirror} and fetch again"
            )
        co = git(["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit], cwd=dest)
        if co.returncode:
            raise StackError(
                where, f"cannot check out {commit[:12]} ({_last_line(co.stderr)})", f"remove {mirror} and fetch again"
            )
        found: dict[str, str] = {}
        if not with_submodules or depth >= SUBMODULE_DEPTH:
            return found
        for sub in self.submodules(where, mirror, commit, url):
            target = dest / sub.path
            if target.is_dir():
                target.rmdir()  # the empty folder a checkout leaves for a submodule
            found[sub.path] = sub.commit
            inner = self.checkout(f"{where} (submodule {sub.path})", sub.url, sub.commit, target, True, depth + 1)
            found.update({f"{sub.path}/{p}": c for p, c in inner.items()})
        return found

    # ---- tarballs -----------------------------------------------------------------------------------------

    def tarball_path(self, url: str) -> Path:
        name = posixpath.basename(urllib.parse.urlparse(url).path) or "source.tar"
        return self.root / "tarballs" / name

    def ensure_tarball(self, comp: Component, expected: str | None) -> Path:
        """The archive, verified against `expected` (the user's --sha256, else the pin's)."""
        where = f"component {comp.name}"
        expected = expected or comp.sha256
        path = self.tarball_path(comp.url)
        if not path.is_file():
            if self.offline:
                raise StackError(where, f"{path.name} is not in the source cache {self.root}", OFFLINE_FIX)
            _download(where, comp.url, path)
        actual = sha256_file(path)
        if expected is None:
            raise StackError(
                where,
                f"{path.name} has no verified sha256 in the pins (the downloaded file's is {actual})",
                f"compare it with the publisher's checksum, then pass --sha256 {comp.name}={actual} (or set sha256 in the pins)",
            )
        if actual != expected:
            path.unlink()
            raise StackError(
                where,
                f"checksum mismatch for {path.name}: got {actual}, expected {expected}",
                "the download is corrupt or the pin is wrong: fetch again, or correct sha256 in the pins",
            )
        return path

    # ---- patches ------------------------------------------------------------------------------------------

    def patch_path(self, patch: Patch) -> Path:
        return self.root / "patches" / patch.file_name

    def ensure_patch(self, where: str, patch: Patch) -> Path:
        """The patch file, verified against its pinned sha256 (downloaded unless offline)."""
        path = self.patch_path(patch)
        if not path.is_file():
            if self.offline:
                raise StackError(where, f"patch {patch.file_name} is not in the source cache {self.root}", OFFLINE_FIX)
            _download(where, patch.url, path)
        actual = sha256_file(path)
        if actual != patch.sha256:
            path.unlink()
            raise StackError(
                where,
                f"checksum mismatch for patch {patch.file_name}: got {actual}, expected {patch.sha256}",
                "the download is corrupt or the pin is wrong: fetch again, or correct the patch's sha256 in the pins",
            )
        return path

    def fetch(self, comp: Component, sha256: str | None = None) -> str:
        """Make the cache hold `comp` at its pin (its patches: :meth:`ensure_patch`); what it holds, in words."""
        where = f"component {comp.name}"
        if comp.kind == "git":
            if comp.submodules:
                subs = self.ensure_tree(where, comp.url, comp.ref)
            else:
                self.ensure_commit(where, comp.url, comp.ref)
                subs = {}
            extra = f" + {len(subs)} submodule(s)" if subs else ""
            return f"{comp.ref[:12]} in {self.mirror_path(comp.url).name}{extra}"
        if comp.kind == "tarball":
            path = self.ensure_tarball(comp, sha256)
            return f"{path.name} (sha256 verified)"
        return f"{comp.kind} package {comp.url} {comp.ref}: packed with the environment (pixi-pack), not here"


def _resolve_url(parent: str, url: str) -> str:
    """A submodule URL as git resolves it: './x' and '../x' are relative to the superproject's URL."""
    if not url.startswith(("./", "../")):
        return url
    if "://" in parent:
        return urllib.parse.urljoin(parent.rstrip("/") + "/", url)
    return posixpath.normpath(posixpath.join(parent, url))


def _download(where: str, url: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp, open(part, "wb") as f:  # noqa: S310 (pinned URL)
            shutil.copyfileobj(resp, f, 1 << 20)
    except (OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise StackError(where, f"cannot download {url} ({exc})", OFFLINE_FIX) from None
    os.replace(part, path)


def extract(where: str, archive: Path, dest: Path) -> None:
    """Unpack a source archive into `dest`, dropping its single top folder as source tarballs have."""
    tmp = dest.with_name(dest.name + ".unpack")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            # The "data" filter refuses absolute paths, links out of the tree and device files.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.11.4
                tar.extractall(tmp)  # noqa: S202
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StackError(
            where, f"cannot unpack {archive.name} ({exc})", "remove it from the cache and fetch again"
        ) from None
    entries = list(tmp.iterdir())
    top = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
    os.replace(top, dest)
    shutil.rmtree(tmp, ignore_errors=True)
