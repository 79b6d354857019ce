"""AWS EFA: the devices, libfabric's EFA provider (the real `fi_info -p efa`) and the aws-ofi-nccl plugin
where NCCL will load it (without it NCCL falls back to TCP sockets, silently, at a fraction of the speed)."""

from __future__ import annotations

import os

from preflight import efa, rdma


def _efa_only(node, check) -> None:
    transport = node.transport
    if transport != "efa":
        check.skip(f"transport is {transport}, not efa")


def _names(items: list[str]) -> str:
    return ", ".join(items) if len(items) <= 4 else f"{items[0]} .. {items[-1]}"


def test_efa_devices_present_and_active(node, check):
    """EFA devices present and ACTIVE"""
    _efa_only(node, check)
    where = rdma.ib_class_dir()
    devices = [d for d in rdma.read_devices(where) if d.is_efa]
    check.require(
        bool(devices),
        "none",
        "at least one EFA device",
        fix="launch the instance with EFA network interfaces and install the EFA driver (aws-efa-installer); "
        "in a container pass /dev/infiniband (the EFA device plugin on EKS)",
        why=f"{where} {'has no EFA device' if where.is_dir() else 'is missing'}",
    )
    ports = [p for d in devices for p in d.ports]
    down = [p for p in ports if not p.active]
    value = f"{len(devices)} devices: {_names([d.name for d in devices])}"
    if down:
        value += f"; {len(ports) - len(down)}/{len(ports)} ports active; " + ", ".join(
            f"{p.name} {p.describe_state()}" for p in down
        )
    check.require(
        not down,
        value,
        "every port ACTIVE/LinkUp",
        fix="reload the EFA driver (modprobe -r efa && modprobe efa) or stop and start the instance",
    )


def test_libfabric_efa_provider(node, check):
    """libfabric EFA provider (fi_info -p efa)"""
    _efa_only(node, check)
    env = node.env()
    result = efa.fi_info("efa", env=env)
    why = result.reason
    if not result.found and result.binary:
        # FI_PROVIDER=efa (the plan's) would hide every other provider from the listing.
        offered = efa.available_providers(result.binary, {k: v for k, v in env.items() if k != "FI_PROVIDER"})
        why += f"; {result.binary} offers: {', '.join(offered)}" if offered else ""
    value = f"found by {result.binary}" if result.found else ("no fi_info" if not result.binary else "not found")
    check.require(
        result.found,
        value,
        "found",
        fix="install the EFA software (aws-efa-installer: efa_installer.sh -y) for /opt/amazon/efa's libfabric "
        "with the efa provider; a distribution's libfabric has none",
        why=why,
    )


def _plugin_setting(path: str) -> str:
    """What NCCL_NET_PLUGIN makes NCCL ask for this file: libnccl-net-ofi.so -> ofi."""
    name = os.path.basename(path)
    return name.removeprefix("libnccl-net-").removesuffix(".so") if name.startswith("libnccl-net-") else path


def test_aws_ofi_nccl_plugin(node, check):
    """aws-ofi-nccl plugin where NCCL loads it"""
    _efa_only(node, check)
    found = efa.find_net_plugin(node.env(), efa.ld_cache())
    asked = f"NCCL_NET_PLUGIN={found.setting}" if found.setting is not None else "NCCL_NET_PLUGIN unset"
    if found.loaded:
        real = os.path.realpath(found.loaded)
        check.measured(found.loaded if real == found.loaded else f"{found.loaded} -> {real}", "found")
        return
    if not found.names:
        value, why, fix = asked, "NCCL loads no net plugin", "remove NCCL_NET_PLUGIN=none from network.nccl / env"
    elif found.unused:
        value, why = f"{asked}: NCCL asks for {', '.join(found.names)}", f"the plugin here is {found.unused[0]}"
        fix = f"set network.nccl.NCCL_NET_PLUGIN: {_plugin_setting(found.unused[0])}"
    elif found.elsewhere:
        folder, name = os.path.split(found.elsewhere[0])
        value, why = (
            f"{asked}: not on the library path",
            f"{found.elsewhere[0]} is in none of LD_LIBRARY_PATH, the ld.so cache, /usr/lib",
        )
        fix = (
            f"add {folder} to LD_LIBRARY_PATH (env in the deploy file), or register it: "
            f"echo {folder} > /etc/ld.so.conf.d/aws-ofi-nccl.conf && ldconfig"
        )
        if name not in found.names:
            fix += f"; and set network.nccl.NCCL_NET_PLUGIN: {_plugin_setting(name)}"
    else:
        value, why = (
            f"{asked}: not found",
            f"no {' / '.join(efa.PLUGIN_FILES)} on the library path or in /opt/amazon/ofi-nccl",
        )
        fix = "install aws-ofi-nccl (the EFA installer puts it in /opt/amazon/ofi-nccl)"
    check.require(False, value, "found", fix=fix, why=f"{why}; NCCL would fall back to TCP sockets")


def test_nccl_gin_prerequisites(node, check):
    """aws-ofi-nccl and GDRCopy for NCCL GIN (deepep_v2 across EFA nodes)"""
    _efa_only(node, check)
    if node.backend != "deepep_v2" or node.nodes < 2:
        check.skip(f"all2all backend {node.backend or 'not set'} on {node.nodes} node(s): no NCCL GIN across EFA")
    cache = efa.ld_cache() or {}
    libgdrapi = next((path for name, path in sorted(cache.items()) if name.startswith("libgdrapi.so")), None)
    plugin = efa.plugin_version(efa.find_net_plugin(node.env(), cache).loaded)
    efa.gin_on_efa(plugin, rdma.loaded_modules(), efa.gdrdrv_version(), libgdrapi).report(check)
