"""RDMA devices and the kernel side of GPUDirect, read from sysfs and procfs without running anything.

Every reader takes its source as a parameter, so tests point it at a fixture tree. The checks take the
roots from the environment; these two variables are for tests and for containers that mount the host's
/sys or /proc somewhere else (``-v /sys:/host/sys:ro``):

    EP_PREFLIGHT_SYSFS_ROOT   where sysfs is mounted (default /sys)
    EP_PREFLIGHT_PROC_ROOT    where procfs is mounted (default /proc)

What is read, as the kernel writes it::

    /sys/class/infiniband/mlx5_0/ports/1/state        4: ACTIVE
    /sys/class/infiniband/mlx5_0/ports/1/phys_state   5: LinkUp
    /sys/class/infiniband/mlx5_0/ports/1/rate         400 Gb/sec (4X NDR)
    /sys/class/infiniband/mlx5_0/ports/1/link_layer   InfiniBand | Ethernet | Unknown (EFA)
    /sys/class/infiniband/mlx5_0/ports/1/gid_attrs/types/3   RoCE v2
    /sys/class/infiniband/mlx5_0/device/driver     -> .../drivers/mlx5_core   (efa on AWS)
    /proc/modules                 nvidia_peermem 16384 0 - Live 0x... (POE)
    /proc/driver/nvidia/params    EnableStreamMemOPs: 1 / RegistryDwords: "PeerMappingOverride=1;"
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from preflight.verdict import Verdict

IB_CLASS = "/sys/class/infiniband"
PROC = "/proc"
SYSFS_ROOT_VAR = "EP_PREFLIGHT_SYSFS_ROOT"
PROC_ROOT_VAR = "EP_PREFLIGHT_PROC_ROOT"

# EFA devices are named by their PCI slot (rdmap<bus>s<slot>); only a guess when the driver link is unreadable.
_EFA_NAME = re.compile(r"^rdmap\d+s\d+")
_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*Gb/sec")


def ib_class_dir() -> Path:
    """/sys/class/infiniband under EP_PREFLIGHT_SYSFS_ROOT (default /sys)."""
    return Path(os.environ.get(SYSFS_ROOT_VAR) or "/sys") / "class" / "infiniband"


def proc_dir() -> Path:
    """EP_PREFLIGHT_PROC_ROOT, default /proc."""
    return Path(os.environ.get(PROC_ROOT_VAR) or PROC)


@dataclass(frozen=True)
class Port:
    """One port of an RDMA device, as sysfs shows it."""

    device: str
    number: int
    state: str  # ACTIVE, DOWN, INIT, ARMED; "" when unreadable
    phys_state: str  # LinkUp, Disabled, Polling, ...
    rate: str  # as the kernel wrote it: "400 Gb/sec (4X NDR)"
    link_layer: str  # InfiniBand, Ethernet, Unknown (EFA)

    @property
    def name(self) -> str:
        return f"{self.device}:{self.number}"

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE" and self.phys_state == "LinkUp"

    @property
    def rate_gbps(self) -> float | None:
        match = _RATE.match(self.rate)
        return float(match.group(1)) if match else None

    def describe_state(self) -> str:
        return f"{self.state or '?'}/{self.phys_state or '?'}"


@dataclass(frozen=True)
class Device:
    """An entry of /sys/class/infiniband that has ports (rdma_cm and the like are no devices)."""

    name: str
    driver: str  # basename of device/driver: mlx5_core, efa, irdma, ... ("" when unreadable)
    ports: tuple[Port, ...]

    @property
    def is_efa(self) -> bool:
        return self.driver == "efa" if self.driver else bool(_EFA_NAME.match(self.name))


def _read(path: Path) -> str:
    # sysfs answers EINVAL for attributes that have no value now (the rate of some down ports).
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _after_colon(text: str) -> str:
    """'4: ACTIVE' -> 'ACTIVE' (state files carry the numeric value first)."""
    return text.partition(":")[2].strip() if ":" in text else text


def _natural(name: str) -> list:
    # mlx5_10 after mlx5_9, as ibstat lists them.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_devices(root: str | Path = IB_CLASS) -> list[Device]:
    """The RDMA devices under ``root``, ports sorted; [] when the folder is missing or empty."""
    root = Path(root)
    try:
        entries = sorted(os.listdir(root), key=_natural)
    except OSError:
        return []
    devices: list[Device] = []
    for name in entries:
        ports_dir = root / name / "ports"
        if not ports_dir.is_dir():
            continue
        try:
            driver = os.path.basename(os.readlink(root / name / "device" / "driver"))
        except OSError:
            driver = ""
        ports = []
        for entry in sorted(os.listdir(ports_dir), key=_natural):
            if not entry.isdigit():
                continue
            d = ports_dir / entry
            ports.append(
                Port(
                    device=name,
                    number=int(entry),
                    state=_after_colon(_read(d / "state")),
                    phys_state=_after_colon(_read(d / "phys_state")),
                    rate=_read(d / "rate"),
                    link_layer=_read(d / "link_layer"),
                )
            )
        devices.append(Device(name, driver, tuple(ports)))
    return devices


def gid_type(port: Port, index: int, root: str | Path = IB_CLASS) -> str | None:
    """'RoCE v2', 'IB/RoCE v1', or None when the GID table has no entry at ``index``."""
    text = _read(Path(root) / port.device / "ports" / str(port.number) / "gid_attrs" / "types" / str(index))
    return text or None


def roce_v2_indices(port: Port, root: str | Path = IB_CLASS) -> list[int]:
    """The GID indices of ``port`` that hold a RoCE v2 address (what NCCL_IB_GID_INDEX should name)."""
    folder = Path(root) / port.device / "ports" / str(port.number) / "gid_attrs" / "types"
    try:
        indices = sorted(int(e) for e in os.listdir(folder) if e.isdigit())
    except OSError:
        return []
    return [i for i in indices if _read(folder / str(i)) == "RoCE v2"]


def nccl_uses(spec: str | None, device: str, port: int) -> bool:
    """Whether NCCL_IB_HCA=``spec`` lets NCCL use ``device``:``port``.

    NCCL's syntax: comma-separated names matched as prefixes (mlx5_1 also selects mlx5_10), ``=`` first
    for exact names, ``^`` first to exclude the listed ones instead, ``:N`` after a name for one port.
    """
    text = (spec or "").strip()
    if not text:
        return True
    exclude = text.startswith("^")
    text = text.removeprefix("^")
    exact = text.startswith("=")
    text = text.removeprefix("=")
    listed = False
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, number = item.partition(":")
        if (device == name if exact else device.startswith(name)) and (not number or number == str(port)):
            listed = True
            break
    return listed != exclude


def loaded_modules(proc_root: str | Path = PROC) -> set[str] | None:
    """Names of the loaded kernel modules (first column of /proc/modules); None when unreadable."""
    try:
        text = (Path(proc_root) / "modules").read_text()
    except OSError:
        return None
    return {line.split()[0] for line in text.splitlines() if line.strip()}


@dataclass(frozen=True)
class NvidiaParams:
    """The NVIDIA kernel module's parameters as it runs now (/proc/driver/nvidia/params)."""

    values: dict[str, str]

    @property
    def stream_mem_ops(self) -> str:
        return self.values.get("EnableStreamMemOPs", "")

    @property
    def registry_dwords(self) -> dict[str, str]:
        """RegistryDwords "A=1;B=2;" as {A: 1, B: 2}."""
        text = self.values.get("RegistryDwords", "")
        out: dict[str, str] = {}
        for item in text.split(";"):
            key, sep, value = item.partition("=")
            if sep and key.strip():
                out[key.strip()] = value.strip()
        return out

    @property
    def peer_mapping_override(self) -> str:
        return self.registry_dwords.get("PeerMappingOverride", "")


def nvidia_params(proc_root: str | Path = PROC) -> NvidiaParams | None:
    """None when the file is missing: no NVIDIA driver loaded (or /proc/driver not visible here)."""
    try:
        text = (Path(proc_root) / "driver" / "nvidia" / "params").read_text()
    except OSError:
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip().strip('"')
    return NvidiaParams(values)


def is_one(value: str) -> bool:
    """'1' or '0x1' (RegistryDwords values may be written in hex)."""
    try:
        return int(value, 0) == 1
    except ValueError:
        return False


def gid_types(port: Port, root: str | Path = IB_CLASS) -> dict[int, str]:
    """The port's GID table as {index: 'RoCE v2' | 'IB/RoCE v1'} (empty entries left out)."""
    folder = Path(root) / port.device / "ports" / str(port.number) / "gid_attrs" / "types"
    try:
        indices = sorted(int(e) for e in os.listdir(folder) if e.isdigit())
    except OSError:
        return {}
    return {i: kind for i in indices if (kind := _read(folder / str(i)))}


# ------------------------------------------------------------------------------------------------ judges
# Pure functions of what the readers above (and preflight.imports' library probe) found; tested with tables.

IBGDA_FIX = (
    "either run vLLM's tools/ep_kernels/configure_system_drivers.sh as root (it appends `options nvidia "
    'NVreg_EnableStreamMemOPs=1 NVreg_RegistryDwords="PeerMappingOverride=1;"` to /etc/modprobe.d/nvidia.conf '
    "and runs update-initramfs -u) and reboot; or install GDRCopy and load gdrdrv (gdrcopy's insmod.sh, or the "
    "gdrdrv-dkms package); or use NVSHMEM >= 3.4.5"
)
NVSHMEM_CPU_ASSISTED_IBGDA = (3, 4, 5)
"""NVSHMEM 3.4.5 release notes: "Added support for CPU-Assisted IBGDA without the use of GDRCopy or the x86 regkey
setting. Systems not supporting the other methods will automatically fall back to this new method."
(docs.nvidia.com/nvshmem/release-notes-install-guide/release-notes/release-3405.html)"""


def ibgda_ready(
    params: NvidiaParams | None,
    modules: set[str] | None,
    nvshmem: tuple[int, int, int] | None,
    nvshmem_problem: str = "",
) -> Verdict:
    """Whether NVSHMEM can drive the NIC from the GPU (IBGDA) here. DeepEP's docs/nvshmem.md ("Enable NVSHMEM
    IBGDA support": "Either of the following methods can be used") accepts the NVIDIA driver's regkeys
    (GPU-initiated) or GDRCopy's gdrdrv (CPU-assisted); from NVSHMEM 3.4.5 neither is required."""
    regkeys = params is not None and params.stream_mem_ops == "1" and is_one(params.peer_mapping_override)
    gdrdrv = modules is not None and "gdrdrv" in modules
    if params is None:
        driver = "no NVIDIA driver params"
    else:
        driver = f"EnableStreamMemOPs={params.stream_mem_ops or '?'}, PeerMappingOverride={params.peer_mapping_override or 'unset'}"
    gdr = "gdrdrv loaded" if gdrdrv else "gdrdrv unknown" if modules is None else "gdrdrv not loaded"
    version = (
        ".".join(map(str, nvshmem)) if nvshmem else f"unknown ({nvshmem_problem})" if nvshmem_problem else "unknown"
    )
    value = f"{driver}; {gdr}; NVSHMEM {version}"
    if regkeys:
        return Verdict(True, f"{value}: GPU-initiated IBGDA (driver regkeys)")
    if gdrdrv:
        return Verdict(True, f"{value}: CPU-assisted IBGDA through GDRCopy (a small cost, DeepEP docs/nvshmem.md 2.2)")
    if nvshmem and nvshmem >= NVSHMEM_CPU_ASSISTED_IBGDA:
        return Verdict(
            True, f"{value}: note: neither regkeys nor GDRCopy; NVSHMEM falls back to its own CPU-assisted IBGDA"
        )
    return Verdict(
        False,
        value,
        "driver regkeys (EnableStreamMemOPs=1, PeerMappingOverride=1), or gdrdrv loaded, or NVSHMEM >= 3.4.5",
        fix=IBGDA_FIX,
        why="without one of them NVSHMEM cannot drive the NIC from the GPU (IBGDA)",
    )


GID_FIX = "set network.gid_index (NCCL and NVSHMEM both) to a RoCE v2 index, or leave it out for both to pick one"


def _gid_setting(value: str | None) -> int | None | str:
    """None: the library picks (unset or -1, both libraries' default); an index; or the text when it is no number."""
    if value is None or value.strip() in ("", "-1"):
        return None
    text = value.strip()
    return int(text) if text.isdigit() else text


def roce_gid(tables: dict[str, dict[int, str]], nccl: str | None, nvshmem: str | None, nvshmem_used: bool) -> Verdict:
    """The GIDs NCCL (NCCL_IB_GID_INDEX) and, where it crosses nodes, NVSHMEM (NVSHMEM_IB_GID_INDEX) will use on
    each port, from its GID table ``{port name: {index: type}}``. Unset (or -1) lets either library pick a RoCE v2
    GID itself (NCCL env.rst NCCL_IB_GID_INDEX / NCCL_IB_ROCE_VERSION_NUM; NVSHMEM env_defs.h IB_GID_INDEX /
    IB_ROCE_VERSION_NUM), so a port needs at least one; a given index must be RoCE v2 on every port, and the two
    libraries must agree."""
    settings = {"NCCL_IB_GID_INDEX": _gid_setting(nccl)}
    if nvshmem_used:
        settings["NVSHMEM_IB_GID_INDEX"] = _gid_setting(nvshmem)
    for name, index in settings.items():
        if isinstance(index, str):
            return Verdict(False, f"{name}={index}", "a GID index (a number) or unset", fix=GID_FIX)
    given = {name: index for name, index in settings.items() if index is not None}
    if nvshmem_used and given and len(set(settings.values())) > 1:
        value = ", ".join(f"{name}={'auto' if index is None else index}" for name, index in settings.items())
        return Verdict(
            False,
            value,
            "one GID index for NCCL and NVSHMEM",
            fix=GID_FIX,
            why="the two libraries would address the peers through different GIDs",
        )
    v2 = {port: [i for i, kind in table.items() if kind == "RoCE v2"] for port, table in tables.items()}
    if not given:
        missing = [port for port, indices in v2.items() if not indices]
        if missing:
            return Verdict(
                False,
                f"no RoCE v2 GID on {', '.join(missing)}",
                "a RoCE v2 GID on every port (auto selection)",
                fix="configure an IPv4 address on the port's network device (ip addr add ... dev <netdev>)",
                why="NCCL and NVSHMEM pick a RoCE v2 GID themselves and find none",
            )
        common = sorted(set.intersection(*(set(i) for i in v2.values()))) if v2 else []
        where = f"index {', '.join(map(str, common))}" if common else "different indices"
        return Verdict(True, f"auto: RoCE v2 at {where} on {len(tables)} ports")
    index = next(iter(given.values()))
    names = " and ".join(given)
    wrong = {port: table.get(index, "empty") for port, table in tables.items() if table.get(index) != "RoCE v2"}
    if wrong:
        fix = GID_FIX
        first = next(iter(wrong))
        if v2[first]:
            fix += f" ({first} has RoCE v2 at {', '.join(map(str, v2[first]))})"
        else:
            fix += " (none found: is an IPv4/IPv6 address configured on the port's netdev?)"
        value = ", ".join(f"{port}: {kind}" for port, kind in wrong.items())
        return Verdict(False, value, f"RoCE v2 at index {index} ({names})", fix=fix)
    return Verdict(True, f"index {index} is RoCE v2 on {len(tables)} ports ({names})")
