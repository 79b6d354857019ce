"""Preflight's interconnect and EFA checks: sysfs / procfs parsing against fixture trees laid out like real
nodes (symlinks and file contents as the kernel writes them), libfabric through the real `fi_info` of
Debian's libfabric-bin (tcp/udp/shm providers, no efa), and `python -m preflight` run as a user would."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from preflight import efa, rdma
from tests.conftest import run_module
from tests.recorded import H200_PARAMS, IBGDA_PARAMS, MODULES_PEERMEM, MODULES_PLAIN, proc_tree

FI_INFO = shutil.which("fi_info")
needs_fi_info = pytest.mark.skipif(
    FI_INFO is None, reason="fi_info not installed (Debian: apt-get install libfabric-bin)"
)

NDR = {"state": "4: ACTIVE", "phys_state": "5: LinkUp", "rate": "400 Gb/sec (4X NDR)", "link_layer": "InfiniBand"}
DOWN = {"state": "1: DOWN", "phys_state": "3: Disabled", "rate": "10 Gb/sec (4X SDR)", "link_layer": "InfiniBand"}
ROCE = {"state": "4: ACTIVE", "phys_state": "5: LinkUp", "rate": "200 Gb/sec (4X HDR)", "link_layer": "Ethernet"}
# GID table of a ConnectX RoCE port with an IPv6 link-local (0, 1) and an IPv4 address (2, 3).
ROCE_GIDS = {0: "IB/RoCE v1", 1: "RoCE v2", 2: "IB/RoCE v1", 3: "RoCE v2"}
EFA_PORT = {"state": "4: ACTIVE", "phys_state": "5: LinkUp", "rate": "100 Gb/sec (4X EDR)", "link_layer": "Unknown"}
# p5.48xlarge: 32 EFA devices, named by PCI bus.
P5_EFA = [f"rdmap{bus}s0" for bus in [*range(79, 87), *range(96, 104), *range(147, 155), *range(182, 190)]]

# /proc/driver/nvidia/params of the H200 machine (driver 580.159.04): IBGDA not configured.
# The same after vLLM's tools/ep_kernels/configure_system_drivers.sh and a reboot.

# Same node before `modprobe nvidia_peermem` (and without GDRCopy): nvidia_peermem is nowhere in column one.


# ------------------------------------------------------------------------------------------- fixture trees


def add_device(
    sys_root: Path,
    name: str,
    pci: str,
    driver: str | None,
    ports: dict[int, dict[str, str]],
    gids: dict[int, str] | None = None,
) -> None:
    """One RDMA device the way sysfs links it: class/infiniband/NAME -> devices/.../PCI/infiniband/NAME,
    whose device -> the PCI function, whose driver -> bus/pci/drivers/DRIVER."""
    pci_dir = sys_root / "devices" / "pci0000:00" / pci
    pci_dir.mkdir(parents=True, exist_ok=True)
    if driver:
        drivers = sys_root / "bus" / "pci" / "drivers" / driver
        drivers.mkdir(parents=True, exist_ok=True)
        (pci_dir / "driver").symlink_to(os.path.relpath(drivers, pci_dir))
    dev = pci_dir / "infiniband" / name
    dev.mkdir(parents=True)
    (dev / "device").symlink_to(os.path.relpath(pci_dir, dev))
    for number, attrs in ports.items():
        port = dev / "ports" / str(number)
        port.mkdir(parents=True)
        for key, value in attrs.items():
            (port / key).write_text(value + "\n")
        if gids:
            types = port / "gid_attrs" / "types"
            types.mkdir(parents=True)
            for index, kind in gids.items():
                (types / str(index)).write_text(kind + "\n")
    cls = sys_root / "class" / "infiniband"
    cls.mkdir(parents=True, exist_ok=True)
    (cls / name).symlink_to(os.path.relpath(dev, cls))


def ndr_node(sys_root: Path, overrides: dict[str, dict[str, str]] | None = None) -> Path:
    """8 x ConnectX-7 NDR (mlx5_0..mlx5_7, port 1), optionally with some ports changed."""
    for i in range(8):
        name = f"mlx5_{i}"
        add_device(
            sys_root,
            name,
            f"0000:{0x18 + 0x10 * i:02x}:00.0",
            "mlx5_core",
            {1: {**NDR, **(overrides or {}).get(name, {})}},
        )
    return sys_root


def roce_node(sys_root: Path, gids: dict[int, str] = ROCE_GIDS) -> Path:
    for i in range(8):
        add_device(sys_root, f"mlx5_{i}", f"0000:{0x18 + 0x10 * i:02x}:00.0", "mlx5_core", {1: ROCE}, gids)
    return sys_root


def efa_node(sys_root: Path) -> Path:
    for name in P5_EFA:
        bus = int(name.removeprefix("rdmap").split("s")[0])
        add_device(sys_root, name, f"0000:{bus:02x}:00.0", "efa", {1: EFA_PORT})
    return sys_root


def h200_machine(root: Path) -> tuple[Path, Path]:
    """The lent H200 machine: /sys/class/infiniband lists only rdma_cm; IBGDA not configured."""
    sys_root, proc = root / "sys", root / "proc"
    (sys_root / "class" / "infiniband" / "rdma_cm").mkdir(parents=True)
    (proc / "driver" / "nvidia").mkdir(parents=True)
    (proc / "driver" / "nvidia" / "params").write_text(H200_PARAMS)
    (proc / "modules").write_text(MODULES_PLAIN)
    return sys_root, proc


def ib_class(sys_root: Path) -> Path:
    return sys_root / "class" / "infiniband"


# ------------------------------------------------------------------------------------------- sysfs parsing


def test_ndr_node_is_read_as_eight_active_400g_infiniband_ports(tmp_path):
    devices = rdma.read_devices(ib_class(ndr_node(tmp_path / "sys")))
    assert [d.name for d in devices] == [f"mlx5_{i}" for i in range(8)]
    for dev in devices:
        assert dev.driver == "mlx5_core" and not dev.is_efa
        (port,) = dev.ports
        assert (port.number, port.state, port.phys_state, port.link_layer) == (1, "ACTIVE", "LinkUp", "InfiniBand")
        assert port.rate == "400 Gb/sec (4X NDR)" and port.rate_gbps == 400.0
        assert port.active and port.name == f"{dev.name}:1"


def test_a_down_port_and_a_slow_port_are_seen(tmp_path):
    sys_root = ndr_node(tmp_path / "sys", {"mlx5_3": DOWN, "mlx5_5": {"rate": "100 Gb/sec (4X EDR)"}})
    ports = {p.device: p for d in rdma.read_devices(ib_class(sys_root)) for p in d.ports}
    assert not ports["mlx5_3"].active and ports["mlx5_3"].describe_state() == "DOWN/Disabled"
    assert ports["mlx5_5"].active and ports["mlx5_5"].rate_gbps == 100.0
    assert sum(p.active for p in ports.values()) == 7


@pytest.mark.parametrize(
    "text, gbps",
    [
        ("400 Gb/sec (4X NDR)", 400.0),
        ("200 Gb/sec (2X NDR)", 200.0),
        ("2.5 Gb/sec (1X SDR)", 2.5),
        ("100 Gb/sec (4X EDR)", 100.0),
        ("", None),
        ("invalid", None),
    ],
)
def test_rate_parsing(text, gbps):
    assert rdma.Port("mlx5_0", 1, "ACTIVE", "LinkUp", text, "InfiniBand").rate_gbps == gbps


def test_roce_node_has_ethernet_link_layer_and_roce_v2_gids(tmp_path):
    root = ib_class(roce_node(tmp_path / "sys"))
    port = rdma.read_devices(root)[0].ports[0]
    assert port.link_layer == "Ethernet" and port.rate_gbps == 200.0
    assert rdma.gid_type(port, 3, root) == "RoCE v2" and rdma.gid_type(port, 0, root) == "IB/RoCE v1"
    assert rdma.gid_type(port, 7, root) is None
    assert rdma.roce_v2_indices(port, root) == [1, 3]


def test_p5_efa_devices_are_told_apart_by_their_driver(tmp_path):
    devices = rdma.read_devices(ib_class(efa_node(tmp_path / "sys")))
    assert len(devices) == 32 and [d.name for d in devices] == P5_EFA
    assert all(d.driver == "efa" and d.is_efa for d in devices)
    assert all(p.active and p.link_layer == "Unknown" for d in devices for p in d.ports)


def test_device_names_decide_only_when_the_driver_link_is_unreadable(tmp_path):
    sys_root = tmp_path / "sys"
    add_device(sys_root, "rdmap16s27", "0000:10:1b.0", None, {1: EFA_PORT})
    add_device(sys_root, "mlx5_0", "0000:18:00.0", None, {1: NDR})
    add_device(sys_root, "rdmap17s0", "0000:11:00.0", "irdma", {1: ROCE})
    by_name = {d.name: d for d in rdma.read_devices(ib_class(sys_root))}
    assert by_name["rdmap16s27"].is_efa and by_name["rdmap16s27"].driver == ""
    assert not by_name["mlx5_0"].is_efa
    assert not by_name["rdmap17s0"].is_efa  # a known driver other than efa wins over the name


def test_devices_sort_like_ibstat(tmp_path):
    sys_root = tmp_path / "sys"
    for i in (10, 2, 1, 0, 11):
        add_device(sys_root, f"mlx5_{i}", f"0000:{i + 16:02x}:00.0", "mlx5_core", {1: NDR})
    assert [d.name for d in rdma.read_devices(ib_class(sys_root))] == [
        "mlx5_0",
        "mlx5_1",
        "mlx5_2",
        "mlx5_10",
        "mlx5_11",
    ]


def test_h200_machine_has_no_rdma_devices(tmp_path):
    sys_root, _ = h200_machine(tmp_path)
    assert ib_class(sys_root).is_dir()
    assert rdma.read_devices(ib_class(sys_root)) == []
    assert rdma.read_devices(tmp_path / "nowhere") == []


@pytest.mark.parametrize(
    "spec, device, port, used",
    [
        (None, "mlx5_0", 1, True),
        ("", "mlx5_0", 1, True),
        ("mlx5_0,mlx5_1", "mlx5_1", 1, True),
        ("mlx5_0,mlx5_1", "mlx5_2", 1, False),
        ("mlx5_1", "mlx5_10", 1, True),  # NCCL matches prefixes
        ("=mlx5_1", "mlx5_10", 1, False),
        ("=mlx5_1", "mlx5_1", 1, True),
        ("^mlx5_8", "mlx5_8", 1, False),
        ("^mlx5_8", "mlx5_0", 1, True),
        ("^=mlx5_1", "mlx5_10", 1, True),
        ("mlx5_0:1", "mlx5_0", 1, True),
        ("mlx5_0:2", "mlx5_0", 1, False),
    ],
)
def test_nccl_ib_hca_selection(spec, device, port, used):
    assert rdma.nccl_uses(spec, device, port) is used


# ------------------------------------------------------------------------------------------ procfs parsing


def test_proc_modules_with_and_without_nvidia_peermem(tmp_path):
    assert {"nvidia_peermem", "gdrdrv", "nvidia", "mlx5_ib"} <= rdma.loaded_modules(proc_tree(tmp_path / "a"))
    plain = rdma.loaded_modules(proc_tree(tmp_path / "b", MODULES_PLAIN))
    assert "nvidia" in plain and "nvidia_peermem" not in plain and "gdrdrv" not in plain
    assert "nvidia_peermem" not in MODULES_PLAIN
    assert rdma.loaded_modules(tmp_path / "empty") is None


def test_h200_driver_params_say_ibgda_is_not_configured(tmp_path):
    _, proc = h200_machine(tmp_path)
    params = rdma.nvidia_params(proc)
    assert params.stream_mem_ops == "0"
    assert params.registry_dwords == {} and params.peer_mapping_override == ""
    assert params.values["EnableResizableBar"] == "0"


@pytest.mark.parametrize(
    "dwords, value, one",
    [
        ("PeerMappingOverride=1;", "1", True),
        ("RMForceStaticBar1=0;PeerMappingOverride=0x1", "0x1", True),
        ("PeerMappingOverride=0;", "0", False),
        ("RmEnableAggressiveVblank=1", "", False),
    ],
)
def test_registry_dwords(tmp_path, dwords, value, one):
    proc = proc_tree(tmp_path, None, IBGDA_PARAMS.replace("PeerMappingOverride=1;", dwords))
    params = rdma.nvidia_params(proc)
    assert params.stream_mem_ops == "1"
    assert params.peer_mapping_override == value and rdma.is_one(value) is one


def test_no_driver_means_no_params(tmp_path):
    assert rdma.nvidia_params(proc_tree(tmp_path, params=None)) is None


# ------------------------------------------------------------------------------- the real fi_info


@needs_fi_info
def test_real_fi_info_has_no_efa_provider():
    result = efa.fi_info("efa", binary=FI_INFO)
    assert not result.found and result.binary == FI_INFO
    assert result.reason.startswith("provider efa not found")


@needs_fi_info
def test_real_fi_info_finds_a_provider_it_lists():
    offered = efa.available_providers(FI_INFO)
    assert offered and "efa" not in offered
    name = "tcp" if "tcp" in offered else offered[0]
    result = efa.fi_info(name, binary=FI_INFO)
    assert result.found, result
    assert efa.offers(result.providers, name) and not efa.offers(result.providers, "efa")


@needs_fi_info
def test_real_fi_info_output_is_parsed_layer_by_layer():
    out = subprocess.run([FI_INFO, "-p", "tcp"], capture_output=True, text=True, timeout=30).stdout
    lines = efa.provider_lines(out)
    assert lines and all("tcp" in line.split(";") for line in lines)
    assert efa.core_providers(lines) == ["tcp"]


def test_missing_fi_info_is_a_reason(tmp_path):
    result = efa.fi_info("efa", binary=str(tmp_path / "fi_info"))
    assert not result.found and result.reason.endswith("fi_info not found")
    if not os.path.exists(efa.EFA_INSTALLER_FI_INFO):
        result = efa.fi_info("efa", env={"PATH": str(tmp_path)})
        assert result.binary is None and result.reason.startswith("fi_info not found")


def test_a_hung_fi_info_is_killed_with_what_it_started(tmp_path):
    script = tmp_path / "fi_info"
    script.write_text("#!/bin/sh\nsleep 30 &\nsleep 30\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    start = time.monotonic()
    result = efa.fi_info("efa", binary=str(script), timeout=0.5)
    assert time.monotonic() - start < 5
    assert not result.found and "did not finish in 0.5 s" in result.reason


# ------------------------------------------------------------------------------- the NCCL net plugin


@pytest.mark.parametrize(
    "setting, names",
    [
        (None, ["libnccl-net.so"]),
        ("none", []),
        ("ofi", ["ofi", "libnccl-net-ofi.so"]),
        ("aws-ofi", ["aws-ofi", "libnccl-net-aws-ofi.so"]),
        ("libnccl-net-ofi.so", ["libnccl-net-ofi.so"]),
        ("/opt/amazon/ofi-nccl/lib/libnccl-net.so", ["/opt/amazon/ofi-nccl/lib/libnccl-net.so"]),
        ("ofi,ib", ["ofi", "libnccl-net-ofi.so", "ib", "libnccl-net-ib.so"]),
    ],
)
def test_plugin_names_as_nccl_tries_them(setting, names):
    assert efa.plugin_names(setting) == names


def _plugin_dir(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"\x7fELF")
    return root


def test_plugin_on_ld_library_path_is_found(tmp_path):
    lib = _plugin_dir(tmp_path / "lib", "libnccl-net.so")
    found = efa.find_net_plugin({"LD_LIBRARY_PATH": f"/nonexistent:{lib}"}, {}, usual_dirs=())
    assert found.loaded == str(lib / "libnccl-net.so")


def test_named_plugin_needs_nccl_net_plugin(tmp_path):
    lib = _plugin_dir(tmp_path / "lib", "libnccl-net-ofi.so")
    unset = efa.find_net_plugin({"LD_LIBRARY_PATH": str(lib)}, {}, usual_dirs=())
    assert unset.loaded is None and unset.unused == (str(lib / "libnccl-net-ofi.so"),)
    named = efa.find_net_plugin({"LD_LIBRARY_PATH": str(lib), "NCCL_NET_PLUGIN": "ofi"}, {}, usual_dirs=())
    assert named.loaded == str(lib / "libnccl-net-ofi.so")


def test_plugin_by_absolute_path_and_by_ld_cache(tmp_path):
    lib = _plugin_dir(tmp_path / "lib", "libnccl-net.so")
    assert efa.find_net_plugin({"NCCL_NET_PLUGIN": str(lib / "libnccl-net.so")}, {}, usual_dirs=()).loaded
    assert efa.find_net_plugin({"NCCL_NET_PLUGIN": str(tmp_path / "gone.so")}, {}, usual_dirs=()).loaded is None
    cached = efa.find_net_plugin({}, {"libnccl-net.so": str(lib / "libnccl-net.so")}, usual_dirs=())
    assert cached.loaded == str(lib / "libnccl-net.so")


def test_plugin_in_the_usual_folder_but_not_on_the_path_is_not_loaded(tmp_path):
    usual = _plugin_dir(tmp_path / "opt" / "amazon" / "ofi-nccl" / "lib", "libnccl-net-ofi.so", "libnccl-net.so")
    found = efa.find_net_plugin({"LD_LIBRARY_PATH": ""}, {}, usual_dirs=(str(usual),))
    assert found.loaded is None
    assert set(found.elsewhere) == {str(usual / "libnccl-net-ofi.so"), str(usual / "libnccl-net.so")}
    on_path = efa.find_net_plugin({"LD_LIBRARY_PATH": str(usual)}, {}, usual_dirs=(str(usual),))
    assert on_path.loaded == str(usual / "libnccl-net.so") and on_path.elsewhere == ()


def test_none_disables_every_plugin(tmp_path):
    lib = _plugin_dir(tmp_path / "lib", "libnccl-net.so")
    found = efa.find_net_plugin({"LD_LIBRARY_PATH": str(lib), "NCCL_NET_PLUGIN": "none"}, {}, usual_dirs=())
    assert found.names == () and found.loaded is None


def test_real_ld_cache_is_parsed():
    cache = efa.ld_cache()
    if cache is None:
        pytest.skip("ldconfig not available here")
    assert any(name.startswith("libc.so.") for name in cache)
    assert all(os.path.isabs(path) for path in cache.values())


# ------------------------------------------------------------------------ `python -m preflight`, black box

DEPLOY = """\
model: deepseek-ai/DeepSeek-V3-0324
vllm_version: 0.26.0
nodes:
  - {{address: 10.254.0.1, gpus: 8}}
  - {{address: 10.254.0.2, gpus: 8}}
all2all_backend: {backend}
network:
  transport: {transport}
  socket_ifname: lo
{extra}"""


def preflight(
    write_yaml,
    transport: str,
    sys_root: Path | None = None,
    proc: Path | None = None,
    backend: str = "deepep_low_latency",
    extra: str = "",
    env: dict[str, str] | None = None,
):
    path = write_yaml(DEPLOY.format(transport=transport, backend=backend, extra=extra))
    roots = {
        rdma.SYSFS_ROOT_VAR: str(sys_root or "/nonexistent-sys"),
        rdma.PROC_ROOT_VAR: str(proc or "/nonexistent-proc"),
    }
    res = run_module(
        "preflight",
        f"--deploy={path}",
        "--node-rank=1",
        "-k",
        "interconnect or efa",
        env={**roots, **(env or {})},
        timeout=120,
    )
    assert "Traceback" not in res.out + res.err, res.out + res.err
    lines = {}
    for line in res.out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0] in ("PASS", "FAIL", "SKIP", "ERROR") and parts[1] in ("interconnect", "efa"):
            lines[parts[2]] = (parts[0], line)
    return res, lines


def outcome(lines, name: str) -> str:
    return next(v[0] for k, v in lines.items() if k.startswith(name))


def text(lines, name: str) -> str:
    return next(v[1] for k, v in lines.items() if k.startswith(name))


def test_tcp_deploy_skips_every_interconnect_and_efa_check(write_yaml):
    res, lines = preflight(write_yaml, "tcp", backend="allgather_reducescatter")
    assert res.code == 0, res.out + res.err
    assert len(lines) == 11 and all(v[0] == "SKIP" for v in lines.values()), res.out
    assert "transport is tcp: no RDMA devices needed" in text(lines, "RDMA devices present")
    assert "transport is tcp: no GPUDirect RDMA" in text(lines, "nvidia_peermem loaded")
    assert "transport is tcp, not efa" in text(lines, "libfabric EFA provider")
    assert "transport is tcp, not efa" in text(lines, "aws-ofi-nccl and GDRCopy for NCCL GIN")
    assert "allgather_reducescatter: no NVSHMEM IBGDA" in text(lines, "IBGDA ready")
    assert "# verdict: READY" in res.out


def test_healthy_ndr_node_passes(write_yaml, tmp_path):
    res, lines = preflight(write_yaml, "ib", ndr_node(tmp_path / "sys"), proc_tree(tmp_path / "proc"))
    assert res.code == 0, res.out
    for name in (
        "RDMA devices present",
        "RDMA ports ACTIVE",
        "RDMA port rate",
        "RDMA link layer",
        "nvidia_peermem loaded",
        "IBGDA ready",
    ):
        assert outcome(lines, name) == "PASS", text(lines, name)
    assert "GPU-initiated IBGDA (driver regkeys)" in text(lines, "IBGDA ready")
    assert "8 devices, 8 ports: mlx5_0 .. mlx5_7" in text(lines, "RDMA devices present")
    assert "400 Gb/sec (4X NDR) on 8 ports" in text(lines, "RDMA port rate")
    assert "transport is ib, not efa" in text(lines, "EFA devices present")


def test_down_port_slow_port_and_h200_driver_fail_with_fixes(write_yaml, tmp_path):
    sys_root = ndr_node(tmp_path / "sys", {"mlx5_3": DOWN, "mlx5_5": {"rate": "100 Gb/sec (4X EDR)"}})
    proc = proc_tree(tmp_path / "proc", MODULES_PLAIN, H200_PARAMS)
    res, lines = preflight(write_yaml, "ib", sys_root, proc, extra="preflight: {ib_rate_min_gbps: 400}\n")
    assert res.code == 1
    assert "7/8 active; mlx5_3:1 DOWN/Disabled" in text(lines, "RDMA ports ACTIVE")
    assert "mlx5_5:1 100 Gb/sec (4X EDR) (expected >= 400 Gb/sec)" in text(lines, "RDMA port rate")
    assert outcome(lines, "nvidia_peermem loaded") == "FAIL" and "modprobe nvidia_peermem" in text(
        lines, "nvidia_peermem"
    )
    ibgda = text(lines, "IBGDA ready")
    assert outcome(lines, "IBGDA ready") == "FAIL"
    # this machine has no NVSHMEM library, so the judge cannot count on NVSHMEM >= 3.4.5 either
    assert "EnableStreamMemOPs=0, PeerMappingOverride=unset; gdrdrv not loaded; NVSHMEM unknown" in ibgda
    assert "configure_system_drivers.sh" in ibgda and "GDRCopy" in ibgda and "NVSHMEM >= 3.4.5" in ibgda


def test_nccl_ib_hca_leaves_a_down_port_out(write_yaml, tmp_path):
    sys_root = ndr_node(tmp_path / "sys", {"mlx5_7": DOWN})
    extra = "  nccl: {NCCL_IB_HCA: '=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6'}\n"
    res, lines = preflight(write_yaml, "ib", sys_root, proc_tree(tmp_path / "proc"), extra=extra)
    assert outcome(lines, "RDMA ports ACTIVE") == "PASS", res.out
    assert "7 devices, 7 ports" in text(lines, "RDMA devices present")


def test_h200_machine_on_ib_says_not_present_and_no_driver_params(write_yaml, tmp_path):
    sys_root, proc = h200_machine(tmp_path)
    (proc / "driver" / "nvidia" / "params").unlink()
    res, lines = preflight(write_yaml, "ib", sys_root, proc)
    assert res.code == 1
    assert "has no InfiniBand / RoCE device" in text(lines, "RDMA devices present")
    assert outcome(lines, "RDMA ports ACTIVE") == "SKIP"
    assert "no NVIDIA driver params; gdrdrv" in text(lines, "IBGDA ready")


@pytest.mark.parametrize("backend", ["allgather_reducescatter", "deepep_v2"])
def test_ibgda_is_skipped_without_deepep_v1(write_yaml, tmp_path, backend):
    sys_root, proc = h200_machine(tmp_path)
    (proc / "driver" / "nvidia" / "params").unlink()
    res, lines = preflight(write_yaml, "ib", sys_root, proc, backend=backend)  # vLLM 0.26.0 has both
    assert outcome(lines, "IBGDA ready") == "SKIP"
    assert f"all2all backend is {backend}: no NVSHMEM IBGDA (DeepEP v1 only)" in text(lines, "IBGDA ready")


def test_gdrcopy_alone_makes_ibgda_ready(write_yaml, tmp_path):
    """DeepEP's docs/nvshmem.md: the driver regkeys OR GDRCopy; the H200 machine's driver has no regkeys."""
    sys_root = ndr_node(tmp_path / "sys")
    proc = proc_tree(tmp_path / "proc", MODULES_PEERMEM, H200_PARAMS)
    res, lines = preflight(write_yaml, "ib", sys_root, proc)
    assert outcome(lines, "IBGDA ready") == "PASS", text(lines, "IBGDA ready")
    assert "CPU-assisted IBGDA through GDRCopy" in text(lines, "IBGDA ready")


def test_roce_node_on_roce_passes_and_on_ib_names_the_link_layer(write_yaml, tmp_path):
    sys_root, proc = roce_node(tmp_path / "sys"), proc_tree(tmp_path / "proc")
    res, lines = preflight(write_yaml, "roce", sys_root, proc)
    assert res.code == 0, res.out
    assert "Ethernet on 8 ports" in text(lines, "RDMA link layer")
    assert "auto: RoCE v2 at index 1, 3 on 8 ports" in text(lines, "RoCE v2 GID")
    res, lines = preflight(write_yaml, "roce", sys_root, proc, extra="  gid_index: 3\n")
    assert res.code == 0, res.out
    assert "index 3 is RoCE v2 on 8 ports (NCCL_IB_GID_INDEX and NVSHMEM_IB_GID_INDEX)" in text(lines, "RoCE v2 GID")
    res, lines = preflight(write_yaml, "ib", sys_root, proc)
    wrong = text(lines, "RDMA link layer")
    assert res.code == 1 and "mlx5_0:1 Ethernet" in wrong and "network.transport: roce" in wrong


def test_frontend_ethernet_nic_on_an_ib_node_is_named(write_yaml, tmp_path):
    sys_root = ndr_node(tmp_path / "sys")
    add_device(sys_root, "mlx5_8", "0000:a8:00.0", "mlx5_core", {1: {**ROCE, "rate": "100 Gb/sec (4X EDR)"}})
    res, lines = preflight(write_yaml, "ib", sys_root, proc_tree(tmp_path / "proc"))
    wrong = text(lines, "RDMA link layer")
    assert res.code == 1 and "mlx5_8:1 Ethernet" in wrong
    assert "NCCL_IB_HCA: =mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7" in wrong
    assert outcome(lines, "RDMA ports ACTIVE") == "PASS"


def test_roce_gid_index_without_an_ipv4_address(write_yaml, tmp_path):
    sys_root = roce_node(tmp_path / "sys", {0: "IB/RoCE v1", 1: "RoCE v2"})
    res, lines = preflight(write_yaml, "roce", sys_root, proc_tree(tmp_path / "proc"), extra="  gid_index: 3\n")
    gid = text(lines, "RoCE v2 GID")
    assert res.code == 1 and "mlx5_0:1: empty" in gid and "has RoCE v2 at 1" in gid


def test_roce_gid_check_covers_nvshmem_where_the_environment_splits_them(write_yaml, tmp_path):
    """The plan refuses one library's GID alone; an exported variable on the node can still do it."""
    sys_root, proc = roce_node(tmp_path / "sys"), proc_tree(tmp_path / "proc")
    res, lines = preflight(
        write_yaml, "roce", sys_root, proc, extra="  gid_index: 3\n", env={"NVSHMEM_IB_GID_INDEX": "1"}
    )
    gid = text(lines, "RoCE v2 GID")
    # the plan's value wins over the node's for the launcher's own variables
    assert "index 3 is RoCE v2 on 8 ports" in gid, gid
    res, lines = preflight(write_yaml, "roce", sys_root, proc, env={"NVSHMEM_IB_GID_INDEX": "1"})
    gid = text(lines, "RoCE v2 GID")
    assert (
        res.code == 1
        and "NCCL_IB_GID_INDEX=auto, NVSHMEM_IB_GID_INDEX=1 (expected one GID index for NCCL and NVSHMEM)" in gid
    )


def test_efa_node_with_debian_libfabric(write_yaml, tmp_path):
    lib = _plugin_dir(tmp_path / "ofi", "libnccl-net-ofi.so")
    sys_root = efa_node(tmp_path / "sys")
    res, lines = preflight(
        write_yaml,
        "efa",
        sys_root,
        proc_tree(tmp_path / "proc"),
        backend="allgather_reducescatter",
        env={"LD_LIBRARY_PATH": str(lib)},
    )
    assert "32 devices: rdmap79s0 .. rdmap189s0" in text(lines, "EFA devices present")
    assert outcome(lines, "EFA devices present") == "PASS"
    assert outcome(lines, "RDMA devices present") == "SKIP" and outcome(lines, "nvidia_peermem loaded") == "PASS"
    plugin = text(lines, "aws-ofi-nccl plugin")
    assert outcome(lines, "aws-ofi-nccl plugin") == "FAIL" and "NCCL_NET_PLUGIN: ofi" in plugin
    provider = text(lines, "libfabric EFA provider")
    if not os.path.exists(efa.EFA_INSTALLER_FI_INFO):  # a real EFA host would find the provider
        expected = ["not found", "offers:", "tcp"] if FI_INFO else ["no fi_info"]
        assert all(word in provider for word in expected), provider
    res, lines = preflight(
        write_yaml,
        "efa",
        sys_root,
        proc_tree(tmp_path / "proc"),
        backend="allgather_reducescatter",
        env={"LD_LIBRARY_PATH": str(lib)},
        extra="  nccl: {NCCL_NET_PLUGIN: ofi}\n",
    )
    assert outcome(lines, "aws-ofi-nccl plugin") == "PASS" and str(lib / "libnccl-net-ofi.so") in text(
        lines, "aws-ofi-nccl"
    )
