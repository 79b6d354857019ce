"""Interconnect: the InfiniBand / RoCE ports NCCL will use, the GIDs NCCL and NVSHMEM will address them by, and
the kernel modules and NVIDIA driver settings that GPUDirect RDMA and DeepEP's IBGDA need (the judges live in
preflight/rdma.py and cite their sources)."""

from __future__ import annotations

from launch.fabric import DEEPEP_V1, uses_nvshmem
from preflight import rdma

LINK_LAYER = {"ib": "InfiniBand", "roce": "Ethernet"}


def _names(items: list[str]) -> str:
    return ", ".join(items) if len(items) <= 4 else f"{items[0]} .. {items[-1]}"


def _rdma_ports(node, check) -> tuple[list[rdma.Port], str | None]:
    """The InfiniBand / RoCE ports NCCL will use (NCCL_IB_HCA applied); skips where none are needed."""
    transport = node.transport
    if transport == "tcp":
        check.skip("transport is tcp: no RDMA devices needed")
    if transport == "efa":
        check.skip("transport is efa: EFA devices are checked by the efa checks")
    hca = node.env().get("NCCL_IB_HCA")
    devices = [d for d in rdma.read_devices(rdma.ib_class_dir()) if not d.is_efa]
    return [p for d in devices for p in d.ports if rdma.nccl_uses(hca, p.device, p.number)], hca


def _ports_or_skip(node, check) -> list[rdma.Port]:
    ports, _ = _rdma_ports(node, check)
    if not ports:
        check.skip("no RDMA port to look at (see: RDMA devices present)")
    return ports


def test_rdma_devices_present(node, check):
    """RDMA devices present"""
    ports, hca = _rdma_ports(node, check)
    where = rdma.ib_class_dir()
    found = [d.name for d in rdma.read_devices(where) if not d.is_efa]
    if found and not ports:
        value, why = f"none selected by NCCL_IB_HCA={hca}", f"devices here: {', '.join(found)}"
        fix = "set network.nccl.NCCL_IB_HCA to devices of this node (ibv_devinfo -l lists them)"
    else:
        value, why = "none", f"{where} {'has no InfiniBand / RoCE device' if where.is_dir() else 'is missing'}"
        fix = (
            "load the NIC's RDMA driver (modprobe mlx5_ib) and look at ibv_devinfo; in a container pass "
            "/dev/infiniband (--device or the RDMA device plugin); or set network.transport: tcp"
        )
    devices = list(dict.fromkeys(p.device for p in ports))
    if devices:
        value = f"{len(devices)} devices, {len(ports)} ports: {_names(devices)}"
    check.require(bool(ports), value, "at least one InfiniBand / RoCE port", fix=fix, why=why)


def test_rdma_ports_active(node, check):
    """RDMA ports ACTIVE (LinkUp)"""
    ports = _ports_or_skip(node, check)
    down = [p for p in ports if not p.active]
    value = f"{len(ports) - len(down)}/{len(ports)} active"
    if down:
        value += "; " + ", ".join(f"{p.name} {p.describe_state()}" for p in down)
    if any(p.state == "INIT" and p.phys_state == "LinkUp" for p in down):
        fix = "the link is up but no subnet manager has configured it: run opensm on a node (or enable the switch's SM)"
    else:
        fix = (
            f"check the cable and switch port (ibstat {down[0].device if down else ''}, mlxlink), "
            "or leave the port out with network.nccl.NCCL_IB_HCA"
        )
    check.require(not down, value, "every port ACTIVE/LinkUp", fix=fix)


def test_rdma_port_rate(node, check):
    """RDMA port rate"""
    ports = [p for p in _ports_or_skip(node, check) if p.active]
    if not ports:
        check.skip("no active port to measure (see: RDMA ports ACTIVE)")
    need = node.thresholds.get("ib_rate_min_gbps")
    slow = [p for p in ports if (p.rate_gbps or 0.0) < need]
    rates = sorted({p.rate for p in ports})
    value = (
        ", ".join(f"{p.name} {p.rate or 'unreadable'}" for p in slow)
        if slow
        else f"{rates[0]} on {len(ports)} ports"
        if len(rates) == 1
        else f"{', '.join(rates)} on {len(ports)} ports"
    )
    check.require(
        not slow,
        value,
        f">= {need:g} Gb/sec",
        fix="a port below its rated speed: reseat or replace the cable / transceiver and check the switch port "
        "(mlxlink -d DEV shows the negotiated speed); or lower preflight.ib_rate_min_gbps",
    )


def test_rdma_link_layer_matches_transport(node, check):
    """RDMA link layer matches the transport"""
    ports = _ports_or_skip(node, check)
    transport = node.transport
    want = LINK_LAYER[transport]
    wrong = [p for p in ports if p.link_layer != want]
    value = (
        ", ".join(f"{p.name} {p.link_layer or 'unknown'}" for p in wrong) if wrong else f"{want} on {len(ports)} ports"
    )
    right = list(dict.fromkeys(p.device for p in ports if p.link_layer == want))
    if right:
        # '=' makes NCCL match names exactly (mlx5_1 would also select mlx5_10).
        fix = f"keep NCCL to the {want} devices: network.nccl.NCCL_IB_HCA: ={','.join(right)}"
    else:
        other = {"InfiniBand": "ib", "Ethernet": "roce"}.get(wrong[0].link_layer if wrong else "", "tcp")
        fix = f"set network.transport: {other} (these ports are {wrong[0].link_layer if wrong else '?'})"
    check.require(not wrong, value, f"{want} (transport {transport})", fix=fix)


def test_roce_gid_index_is_roce_v2(node, check):
    """RoCE v2 GID for NCCL and NVSHMEM"""
    transport = node.transport
    if transport != "roce":
        check.skip(f"transport is {transport}, not roce")
    ports = [p for p in _ports_or_skip(node, check) if p.link_layer == "Ethernet" and p.active]
    if not ports:
        check.skip("no active Ethernet RDMA port (see: RDMA ports ACTIVE)")
    env, root = node.env(), rdma.ib_class_dir()
    tables = {p.name: rdma.gid_types(p, root) for p in ports}
    nvshmem = uses_nvshmem(node.backend, node.nodes > 1)
    rdma.roce_gid(tables, env.get("NCCL_IB_GID_INDEX"), env.get("NVSHMEM_IB_GID_INDEX"), nvshmem).report(check)


def test_nvidia_peermem_loaded(node, check):
    """nvidia_peermem loaded (GPUDirect RDMA)"""
    transport = node.transport
    if transport == "tcp":
        check.skip("transport is tcp: no GPUDirect RDMA")
    _require_module(
        check,
        "nvidia_peermem",
        fix=(
            "modprobe nvidia_peermem (it ships with the NVIDIA driver); to load it at boot: "
            "echo nvidia_peermem > /etc/modules-load.d/nvidia-peermem.conf"
        ),
        why=f"without it NCCL over {transport} copies GPU buffers through host memory",
    )


def _require_module(check, name: str, fix: str, why: str) -> None:
    """The kernel module ``name`` is in /proc/modules."""
    proc = rdma.proc_dir()
    modules = rdma.loaded_modules(proc)
    check.require(modules is not None, "unknown", "loaded", fix=fix, why=f"cannot read {proc / 'modules'}")
    loaded = name in modules
    check.require(loaded, "loaded" if loaded else "not loaded", "loaded", fix=fix, why=why)


def _deepep_v1_multinode(node, check) -> str:
    """The DeepEP v1 backend, or a skip where IBGDA is not needed: one node uses NVLink (vLLM's tools/ep_kernels set
    the driver up for multi-node only), deepep_v2 runs on NCCL GIN."""
    backend = node.backend
    if backend not in DEEPEP_V1:
        check.skip(f"all2all backend is {backend or 'not set'}: no NVSHMEM IBGDA (DeepEP v1 only)")
    if node.nodes < 2:
        check.skip(f"single node: {backend} runs over NVLink")
    return backend


def test_ibgda_ready(node, check, request):
    """IBGDA ready (driver regkeys, GDRCopy or NVSHMEM >= 3.4.5)"""
    _deepep_v1_multinode(node, check)
    transport = node.transport
    if transport not in LINK_LAYER:
        check.skip(f"transport is {transport}: IBGDA is for InfiniBand / RoCE")
    if node.env().get("NVSHMEM_IB_ENABLE_IBGDA") == "0":
        check.skip("IBGDA switched off (NVSHMEM_IB_ENABLE_IBGDA=0)")
    proc = rdma.proc_dir()
    libraries = request.getfixturevalue("libraries")  # only where it is needed: it imports torch
    if isinstance(libraries, str):
        nvshmem, problem = None, libraries
    else:
        nvshmem, problem = libraries["nvshmem"].version, libraries["nvshmem"].error
    rdma.ibgda_ready(rdma.nvidia_params(proc), rdma.loaded_modules(proc), nvshmem, problem).report(check)
