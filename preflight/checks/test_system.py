"""Operating system: shared memory, locked memory, the socket interface, and the ports vLLM will bind."""

from __future__ import annotations

import resource

import pytest

from launch import netif
from preflight import system

GiB = 1024**3


def test_dev_shm_is_large_enough(node, check):
    """/dev/shm size"""
    need = node.thresholds.get("shm_min_gib")
    size = system.shm_bytes()
    check.require(
        size is not None and size >= need * GiB,
        "missing" if size is None else system.human_bytes(size),
        f">= {need:g} GiB",
        fix="mount -o remount,size=64G /dev/shm (containers: --shm-size=64g, or a memory-backed emptyDir on Kubernetes)",
    )


def test_locked_memory_is_unlimited(check):
    """ulimit -l (locked memory)"""
    limit = system.memlock_limit()
    shown = "unlimited" if limit == resource.RLIM_INFINITY else system.human_bytes(limit)
    capable = limit != resource.RLIM_INFINITY and system.has_ipc_lock()
    check.require(
        limit == resource.RLIM_INFINITY or capable,
        f"{shown}, but CAP_IPC_LOCK lifts it" if capable else shown,
        "unlimited, or CAP_IPC_LOCK",
        fix="set `* - memlock unlimited` in /etc/security/limits.conf (containers: --ulimit memlock=-1; Kubernetes: "
        "capabilities add IPC_LOCK); RDMA registration needs it",
    )


def test_socket_interface_exists_and_is_up(node, check):
    """socket interface for NCCL / Gloo / NVSHMEM"""
    if node.plan is None and not node.ifname:
        check.skip("no deploy file and no --socket-ifname: nothing to check")
    name = node.ifname
    known = ", ".join(netif.interfaces())
    check.require(
        name is not None,
        name or node.ifname_problem,
        "an interface of this node",
        fix=f"set network.socket_ifname in the deploy file to one of: {known}",
        why=node.ifname_problem,
    )
    up = netif.interface_up(name)
    check.require(
        up is not None,
        name,
        f"one of: {known}",
        fix="set network.socket_ifname to an interface that exists here",
        why=f"interface {name!r} does not exist",
    )
    check.require(bool(up), f"{name} is down", "up", fix=f"ip link set {name} up (or pick another interface)")
    addrs = netif.interfaces().get(name, [])
    check.require(bool(addrs), f"{name} has no IP address", "an address", fix=f"configure an address on {name}")
    check.measured(f"{name} up, {', '.join(addrs)}", "an interface of this node, up, with an address")


def test_socket_interface_reaches_the_primary(node, check):
    """route to the primary via the socket interface"""
    if node.plan is None or node.primary_address is None:
        check.skip("no deploy file: single node")
    if not node.ifname:
        check.skip(f"no socket interface ({node.ifname_problem})")
    if node.plan.layout.role == "primary":
        holder = netif.holding(node.primary_address)
        check.require(
            holder == node.ifname,
            f"{node.primary_address} is on {holder or 'no interface'}",
            f"on {node.ifname}",
            fix="the primary's address in the deploy file must be on its socket interface",
        )
        return
    via = netif.towards(node.primary_address)
    check.require(
        via == node.ifname,
        f"route to {node.primary_address} leaves through {via or 'nothing'}",
        f"through {node.ifname}",
        fix=f"set network.socket_ifname to {via}, or fix the routes so {node.ifname} reaches the primary",
    )


@pytest.mark.parametrize("which", ["rpc_port", "port"])
def test_primary_ports_are_free(node, check, which):
    """primary port free"""
    if node.plan is None or node.plan.layout.role != "primary":
        check.skip("only the primary binds the API and coordination ports")
    port = getattr(node.config, which)
    problem = system.port_in_use(port)
    check.require(
        problem is None,
        f"{which} {port} {problem or 'free'}",
        "free",
        fix=f"stop what listens on {port} (ss -ltnp 'sport = :{port}'), or choose another {which} in the deploy file",
    )


def test_watch_port_is_free(node, check):
    """watch port free"""
    watch = node.plan.watch if node.plan is not None else None
    if watch is None:
        check.skip("no watch on this node (one node, a scheduler's job, or watch: {enabled: false})")
    problem = system.port_in_use(watch.port)
    check.require(
        problem is None,
        f"watch port {watch.port} {problem or 'free'}",
        "free",
        fix=f"stop what listens on {watch.port} (ss -ltnp 'sport = :{watch.port}'), or choose another rpc_port "
        "(the watch port is rpc_port + 1000)",
    )


def test_nixl_side_channel_ports_are_free(node, check):
    """NIXL side-channel ports free"""
    if node.kv_connector is None:
        check.skip("no KV connector: not a prefill/decode node")
    base = int(node.plan.env.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600"))
    # vLLM's NIXL connector opens one side-channel port per local rank, counted up from the base.
    ranks = node.plan.layout.data_parallel_size_local * node.config.tensor_parallel_size
    busy = [f"{port} {why}" for port in range(base, base + ranks) if (why := system.port_in_use(port))]
    check.require(
        not busy,
        ", ".join(busy) or f"{base}..{base + ranks - 1} free",
        f"{base}..{base + ranks - 1} free",
        fix="stop what holds them (ss -ltnp), or set disaggregation.connector.side_channel_port to a free range",
    )
