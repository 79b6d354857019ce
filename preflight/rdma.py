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
            ports.append(Port(
                device=name, number=int(entry), state=_after_colon(_read(d / "state")),
                phys_state=_after_colon(_read(d / "phys_state")), rate=_read(d / "rate"),
                link_layer=_read(d / "link_layer"),
            ))
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
