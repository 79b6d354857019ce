"""Facts of the operating system a node needs for serving: shared memory, locked memory, ports.
Each function reads one thing and takes its source as a parameter, so tests can point it elsewhere."""

from __future__ import annotations

import errno
import os
import resource
import socket


def shm_bytes(path: str = "/dev/shm") -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def memlock_limit() -> int:
    """RLIMIT_MEMLOCK soft limit in bytes; resource.RLIM_INFINITY for unlimited."""
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]


CAP_IPC_LOCK = 14


def has_ipc_lock() -> bool:
    """CAP_IPC_LOCK in this process's effective set: locked memory is then not limited by RLIMIT_MEMLOCK
    (how Kubernetes pods, which cannot raise ulimits, register RDMA memory)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def port_in_use(port: int, host: str = "0.0.0.0") -> str | None:
    """None if ``port`` can be bound on ``host`` now, else why not (listeners in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB", "MiB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
