"""libfabric's EFA provider and the aws-ofi-nccl plugin, found the way NCCL on this node will find them.

- ``fi_info -p efa`` (the real one, bounded by a timeout) says whether libfabric can open the EFA
  provider. The EFA installer's own fi_info (/opt/amazon/efa/bin) is preferred over one on PATH: it
  belongs to the libfabric that aws-ofi-nccl is linked against.
- The plugin: NCCL dlopen()s each name in NCCL_NET_PLUGIN (comma-separated; ``none`` loads nothing),
  and for a bare name that is not ``lib*.so`` also ``libnccl-net-<name>.so``; without the variable it
  loads ``libnccl-net.so`` only. dlopen looks in LD_LIBRARY_PATH, then the ld.so cache (``ldconfig -p``),
  then /lib and /usr/lib. A plugin that sits in /opt/amazon/ofi-nccl/lib but in none of those is not
  loaded: NCCL falls back to TCP sockets without an error.

Every subprocess is an argv list with a timeout; a missing binary or a timeout is a reason, not an error.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from preflight.verdict import Verdict

FI_INFO_TIMEOUT_S = 20.0
LDCONFIG_TIMEOUT_S = 10.0
EFA_INSTALLER_FI_INFO = "/opt/amazon/efa/bin/fi_info"
# Where the EFA installer and AWS images put aws-ofi-nccl (the folder name and lib dir vary by version).
USUAL_PLUGIN_DIRS = (
    "/opt/amazon/ofi-nccl/lib",
    "/opt/amazon/ofi-nccl/lib64",
    "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu",
    "/opt/amazon/ofi-nccl/lib/aarch64-linux-gnu",
    "/opt/amazon/aws-ofi-nccl/lib",
)
# The names aws-ofi-nccl installs: NCCL's default name (older installers), and the named ones (newer).
PLUGIN_FILES = ("libnccl-net.so", "libnccl-net-ofi.so", "libnccl-net-aws-ofi.so")
_DEFAULT_DIRS = ("/lib64", "/usr/lib64", "/lib", "/usr/lib")


# ---------------------------------------------------------------------------------------------- fi_info


@dataclass(frozen=True)
class FiInfo:
    """What `fi_info -p PROVIDER` said."""

    provider: str
    found: bool
    binary: str | None
    reason: str = ""  # why not found / why it could not run
    providers: tuple[str, ...] = ()  # provider lines it printed ("tcp;ofi_rxm", "efa", ...)


def find_fi_info(env: dict[str, str] | None = None) -> str | None:
    if os.access(EFA_INSTALLER_FI_INFO, os.X_OK):
        return EFA_INSTALLER_FI_INFO
    return shutil.which("fi_info", path=(env or os.environ).get("PATH"))


def provider_lines(output: str) -> list[str]:
    """The `provider:` values of fi_info's output, in order, without repeats."""
    seen: list[str] = []
    for line in output.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key == "provider" and value.strip() and value.strip() not in seen:
            seen.append(value.strip())
    return seen


def offers(lines: list[str] | tuple[str, ...], provider: str) -> bool:
    """Whether ``provider`` is one of the layers of a listed provider ('tcp' is in 'tcp;ofi_rxm')."""
    return any(provider in line.split(";") for line in lines)


def core_providers(lines: list[str] | tuple[str, ...]) -> list[str]:
    """The providers under the utility layers: 'tcp;ofi_rxm' -> 'tcp'."""
    return sorted({line.split(";")[0] for line in lines})


def _run(argv: list[str], env: dict[str, str] | None, timeout: float) -> tuple[int | None, str, str]:
    """(exit code, stdout, reason); exit code None when it could not run or hung."""
    try:
        # Own session, so that a hung command and anything it started can be killed as one group.
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,
        )
    except FileNotFoundError:
        return None, "", f"{argv[0]} not found"
    except PermissionError:
        return None, "", f"{argv[0]} is not executable"
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return None, "", f"`{' '.join(argv)}` did not finish in {timeout:g} s"
    lines = err.strip().splitlines()
    return proc.returncode, out, lines[-1] if lines else f"exit code {proc.returncode}"


def fi_info(
    provider: str = "efa",
    binary: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = FI_INFO_TIMEOUT_S,
) -> FiInfo:
    """Runs `fi_info -p PROVIDER`. Without ``binary``, the one :func:`find_fi_info` picks."""
    binary = binary or find_fi_info(env)
    if not binary:
        return FiInfo(provider, False, None, "fi_info not found (not on PATH, no EFA installer)")
    code, out, reason = _run([binary, "-p", provider], env, timeout)
    lines = tuple(provider_lines(out))
    if code is None:
        return FiInfo(provider, False, binary, reason)
    if code == 0 and offers(lines, provider):
        return FiInfo(provider, True, binary, "", lines)
    # libfabric answers -61 (FI_ENODATA) when no provider of that name can be opened here.
    return FiInfo(provider, False, binary, f"provider {provider} not found ({reason})", lines)


def available_providers(
    binary: str | None = None, env: dict[str, str] | None = None, timeout: float = FI_INFO_TIMEOUT_S
) -> list[str] | None:
    """The core providers plain `fi_info` lists (tcp, udp, shm, efa...); None when it cannot run."""
    binary = binary or find_fi_info(env)
    if not binary:
        return None
    code, out, _ = _run([binary], env, timeout)
    return core_providers(provider_lines(out)) if code == 0 else None


# ------------------------------------------------------------------------------------- the NCCL plugin


def plugin_names(setting: str | None) -> list[str]:
    """What NCCL will dlopen, in order, for NCCL_NET_PLUGIN=``setting`` ([] for none)."""
    if setting is None:
        return ["libnccl-net.so"]
    if setting.strip().lower() == "none":
        return []
    names: list[str] = []
    for name in (part.strip() for part in setting.split(",")):
        if not name:
            continue
        names.append(name)
        if "/" not in name and not (name.startswith("lib") and name.endswith(".so")):
            names.append(f"libnccl-net-{name}.so")
    return names


def ld_cache(timeout: float = LDCONFIG_TIMEOUT_S) -> dict[str, str] | None:
    """{soname: path} from `ldconfig -p` (the ld.so cache dlopen reads); None when it cannot run."""
    # ldconfig lives in /sbin, which a non-root PATH often lacks.
    binary = shutil.which("ldconfig", path=os.pathsep.join([os.environ.get("PATH", ""), "/sbin", "/usr/sbin"]))
    if not binary:
        return None
    code, out, _ = _run([binary, "-p"], None, timeout)
    if code != 0:
        return None
    return parse_ld_cache(out)


def parse_ld_cache(output: str) -> dict[str, str]:
    """`\tlibnccl-net.so (libc6,x86-64) => /usr/lib/libnccl-net.so` lines as {name: path}; first wins."""
    cache: dict[str, str] = {}
    for line in output.splitlines():
        left, sep, path = line.partition("=>")
        if sep:
            cache.setdefault(left.strip().split(" ")[0], path.strip())
    return cache


@dataclass(frozen=True)
class PluginSearch:
    """Where NCCL's net plugin is, or why NCCL will not load one."""

    setting: str | None  # NCCL_NET_PLUGIN as vLLM will get it
    names: tuple[str, ...]  # what NCCL dlopen()s, in order
    loaded: str | None = None  # the file the first loadable name resolves to
    elsewhere: tuple[str, ...] = ()  # plugin files present where NCCL will not look for them
    unused: tuple[str, ...] = ()  # plugin files NCCL could reach, under a name it will not ask for
    searched: tuple[str, ...] = field(default_factory=tuple)  # the folders dlopen searches


def _locate(name: str, dirs: list[str], cache: dict[str, str], cwd: str) -> str | None:
    if "/" in name:
        path = Path(cwd, name)
        return str(path) if path.is_file() else None
    for folder in dirs:
        if folder and (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    found = cache.get(name)
    if found and Path(found).is_file():
        return found
    for folder in _DEFAULT_DIRS:
        if (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    return None


def find_net_plugin(
    env: dict[str, str],
    cache: dict[str, str] | None = None,
    usual_dirs: tuple[str, ...] = USUAL_PLUGIN_DIRS,
    cwd: str | None = None,
) -> PluginSearch:
    """Resolves NCCL_NET_PLUGIN / libnccl-net.so against ``env``'s LD_LIBRARY_PATH and ``cache``."""
    setting = env.get("NCCL_NET_PLUGIN")
    names = plugin_names(setting)
    dirs = [d for d in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    cache = cache or {}
    cwd = cwd or os.getcwd()
    loaded = next((path for path in (_locate(n, dirs, cache, cwd) for n in names) if path), None)
    reachable = [p for p in (_locate(n, dirs, cache, cwd) for n in PLUGIN_FILES if n not in names) if p]
    # The same file may be reachable by another path (a symlinked folder): compare real paths.
    known = {os.path.realpath(p) for p in [loaded, *reachable] if p}
    elsewhere = [str(Path(d) / n) for d in usual_dirs for n in PLUGIN_FILES if (Path(d) / n).is_file()]
    elsewhere = [p for p in elsewhere if os.path.realpath(p) not in known]
    return PluginSearch(setting, tuple(names), loaded, tuple(elsewhere), tuple(reachable), tuple(dirs))


# ------------------------------------------------------------------------ NCCL GIN on EFA (deepep_v2 across nodes)

GIN_PLUGIN = (1, 21, 0)
GDRCOPY_FOR_GIN = (2, 5)
"""aws-ofi-nccl doc/gin-getting-started.md, Requirements: "aws-ofi-nccl 1.21.0 or later" and "GDRCopy 2.5 or
later, for both the runtime (libgdrapi) and the kernel driver (gdrdrv)", for NCCL's GPU-Initiated Networking
through the plugin (what deepep_v2 runs on across EFA nodes)."""
GDRDRV_VERSION = "/sys/module/gdrdrv/version"
_PLUGIN_VERSION = re.compile(rb"aws-ofi-nccl (\d+)\.(\d+)\.(\d+)")
"""The plugin logs "Initializing " PACKAGE_STRING (src/nccl_ofi_net.c), autoconf's "aws-ofi-nccl X.Y.Z[-aws]"
(configure.ac AC_INIT): the string is in the library."""


def gdrdrv_version(path: str = GDRDRV_VERSION) -> str | None:
    """The loaded gdrdrv's version as the kernel lists it, where the module declares one."""
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def plugin_version(path: str | None, most: int = 64 << 20) -> tuple[int, int, int] | None:
    """aws-ofi-nccl's version from the PACKAGE_STRING in its library (at most ``most`` bytes read), or None."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            found = _PLUGIN_VERSION.search(f.read(most))
    except OSError:
        return None
    return tuple(int(g) for g in found.groups()) if found else None  # type: ignore[return-value]


def gin_on_efa(
    plugin: tuple[int, int, int] | None, modules: set[str] | None, gdrdrv: str | None, libgdrapi: str | None
) -> Verdict:
    """Whether NCCL GIN can run through aws-ofi-nccl here: the plugin >= 1.21.0 (where its version can be read),
    GDRCopy's gdrdrv loaded (>= 2.5 where it declares a version) and its libgdrapi loadable."""
    gdr = ".".join(map(str, GDRCOPY_FOR_GIN))
    driver = "gdrdrv unknown" if modules is None else "gdrdrv loaded" if "gdrdrv" in modules else "gdrdrv not loaded"
    shown = ".".join(map(str, plugin)) if plugin else "version not read"
    value = f"aws-ofi-nccl {shown}; {driver}{f' {gdrdrv}' if gdrdrv else ''}; libgdrapi {libgdrapi or 'not found'}"
    parts = tuple(int(p) for p in gdrdrv.split(".")[:2] if p.isdigit()) if gdrdrv else ()
    ok = (
        (plugin is None or plugin >= GIN_PLUGIN)
        and modules is not None
        and "gdrdrv" in modules
        and libgdrapi is not None
        and not (len(parts) == 2 and parts < GDRCOPY_FOR_GIN)
    )
    unread = [what for what, known in (("the plugin's version", plugin), ("gdrdrv's version", parts)) if not known]
    note = f" (check {' and '.join(unread)} by hand)" if ok and unread else ""
    return Verdict(
        ok,
        value + note,
        f"aws-ofi-nccl >= {'.'.join(map(str, GIN_PLUGIN))}, gdrdrv loaded and libgdrapi (GDRCopy >= {gdr})",
        fix=f"install aws-ofi-nccl >= 1.21.0 and GDRCopy >= {gdr} (libgdrapi and the gdrdrv kernel module), then "
        "modprobe gdrdrv",
        why="NCCL GIN through aws-ofi-nccl (deepep_v2 across EFA nodes) needs them (doc/gin-getting-started.md)",
    )
