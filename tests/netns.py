"""Two "nodes" on one machine: Linux network namespaces joined by a veth pair, each with its own
address and interface name. Needs root and iproute2; tests using it skip (with the reason) otherwise."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Host:
    ns: str
    ifname: str
    address: str

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    return None


@pytest.fixture(scope="session")
def two_hosts():
    """(primary, secondary): 10.77.0.1 on epnodeA, 10.77.0.2 on epnodeB, one veth pair between them."""
    why = available()
    if why:
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    a = Host(f"epa{tag}", f"epnodea{tag}"[:15], "10.77.0.1")
    b = Host(f"epb{tag}", f"epnodeb{tag}"[:15], "10.77.0.2")
    try:
        for h in (a, b):
            _ip("netns", "add", h.ns)
            _ip("-n", h.ns, "link", "set", "lo", "up")
        _ip("link", "add", a.ifname, "netns", a.ns, "type", "veth", "peer", "name", b.ifname, "netns", b.ns)
        for h in (a, b):
            _ip("-n", h.ns, "addr", "add", f"{h.address}/24", "dev", h.ifname)
            _ip("-n", h.ns, "link", "set", h.ifname, "up")
    except subprocess.CalledProcessError as exc:
        for h in (a, b):
            subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
        pytest.skip(f"cannot build network namespaces here: {exc.stderr.decode().strip()}")
    yield a, b
    for h in (a, b):
        subprocess.run(["ip", "netns", "del", h.ns], capture_output=True, timeout=10)
