"""Network interfaces of this machine: which one NCCL, Gloo and NVSHMEM should bind, and who we are.

Rule used everywhere: a node binds the interface that holds its own address from the deploy file (the
address the other nodes reach it at). Without that address (a guide-style secondary), it binds the
interface its route to the primary leaves through.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class AutoIfname:
    """An interface to be found on the node itself, at start: the one holding ``address``, or, with
    ``towards`` set, the one the route to ``address`` leaves through."""

    address: str
    towards: bool = False

    def what(self) -> str:
        return f"{'route towards' if self.towards else 'interface holding'} {self.address}"

    def describe(self) -> str:
        return f"auto ({self.what()})"


def resolve(address: str) -> set[str]:
    """All IP addresses a node address stands for (itself if it is one; else its DNS answers)."""
    try:
        infos = socket.getaddrinfo(address, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return set()
    return {info[4][0].split("%")[0] for info in infos}


def interfaces() -> dict[str, list[str]]:
    """Interface name -> its IP addresses."""
    out: dict[str, list[str]] = {}
    for name, addrs in psutil.net_if_addrs().items():
        out[name] = [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
    return out


def interface_up(name: str) -> bool | None:
    stats = psutil.net_if_stats().get(name)
    return None if stats is None else stats.isup


def holding(address: str) -> str | None:
    """The interface that has ``address`` (or one of the addresses its name resolves to)."""
    wanted = resolve(address)
    for name, addrs in interfaces().items():
        if wanted & set(addrs):
            return name
    return None


def towards(address: str) -> str | None:
    """The interface the kernel's route to ``address`` leaves through (no packet is sent)."""
    for family, _, _, _, sockaddr in _addrinfo(address):
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((sockaddr[0], 9))
            except OSError:
                continue
            local = probe.getsockname()[0]
        for name, addrs in interfaces().items():
            if local in addrs:
                return name
    return None


def _addrinfo(address: str) -> list:
    try:
        return socket.getaddrinfo(address, None, type=socket.SOCK_DGRAM)
    except socket.gaierror:
        return []


def find(auto: AutoIfname) -> str | None:
    return towards(auto.address) if auto.towards else holding(auto.address)


def own_rank(node_addresses: list[str]) -> list[int]:
    """Ranks of the nodes whose address belongs to this machine (exactly one on a well-formed cluster)."""
    mine = {a for addrs in interfaces().values() for a in addrs}
    return [rank for rank, addr in enumerate(node_addresses) if resolve(addr) & mine]
