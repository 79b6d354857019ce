"""preflight.gpu.Pynvml, the adapter the checks use on a real node, driven through a stand-in `pynvml` module.

The stand-in keeps the real nvidia-ml-py's constants and its NVMLError class and answers each NVML call the
way the driver answered on the 2 x H200 machine (2026-11-22): names as bytes, NVML's v2 memory query,
page retirement "Not Supported" on Hopper, NVLink state 1 for links 0..17 and "Invalid Argument" past them,
no per-process memory accounting. What is tested is the adapter's own code: which call it makes with which
constants, and how it turns NVML's errors into facts."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from preflight import gpu

pynvml = pytest.importorskip("pynvml")  # nvidia-ml-py, a dependency of the project

MiB = 1024**2


def stand_in(driver_ok: bool = True, legacy_memory: bool = False, throttle_name_only: bool = False) -> types.ModuleType:
    nv = types.ModuleType("pynvml")
    for name in dir(pynvml):
        if name.startswith("NVML_") or name in ("NVMLError", "nvmlMemory_v2"):
            setattr(nv, name, getattr(pynvml, name))
    calls: list[tuple] = []
    nv.calls = calls

    def error(code: int):
        return pynvml.NVMLError(code)

    def nvmlInit():
        calls.append(("init",))
        if not driver_ok:
            raise error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    def nvmlDeviceGetMemoryInfo(h, version=None):
        calls.append(("memory", version))
        if version is not None and legacy_memory:
            raise error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        reserved = 0 if version == pynvml.nvmlMemory_v2 else 615 * MiB
        return SimpleNamespace(total=143771 * MiB, used=reserved)

    def nvmlDeviceGetNvLinkState(h, link):
        if link >= 18:
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetTotalEccErrors(h, kind, counter):
        calls.append(("ecc", kind, counter))
        return 0

    def nvmlDeviceGetP2PStatus(h1, h2, index):
        calls.append(("p2p", h1, h2, index))
        return 0  # NVML_P2P_STATUS_OK

    def nvmlDeviceGetCurrentClocksEventReasons(h):
        if throttle_name_only:
            raise AttributeError("module 'pynvml' has no attribute 'nvmlDeviceGetCurrentClocksEventReasons'")
        return 0x1

    def not_supported(*_):
        raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    bus = {0: b"00000000:00:06.0", 1: b"00000000:00:07.0"}
    nv.nvmlInit = nvmlInit
    nv.nvmlShutdown = lambda: calls.append(("shutdown",))
    nv.nvmlSystemGetDriverVersion = lambda: b"580.159.04"
    nv.nvmlSystemGetCudaDriverVersion = lambda: 13000
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetName = lambda h: b"NVIDIA H200"
    nv.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"
    nv.nvmlDeviceGetPciInfo = lambda h: SimpleNamespace(busId=bus[h])
    nv.nvmlDeviceGetMemoryInfo = nvmlDeviceGetMemoryInfo
    nv.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    nv.nvmlDeviceGetEccMode = lambda h: (pynvml.NVML_FEATURE_ENABLED, pynvml.NVML_FEATURE_ENABLED)
    nv.nvmlDeviceGetTotalEccErrors = nvmlDeviceGetTotalEccErrors
    nv.nvmlDeviceGetRetiredPagesPendingStatus = not_supported
    nv.nvmlDeviceGetRemappedRows = lambda h: (0, 0, 0, 0)
    nv.nvmlDeviceGetMigMode = lambda h: (0, 0)
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [SimpleNamespace(pid=4242, usedGpuMemory=None)]
    nv.nvmlDeviceGetNvLinkState = nvmlDeviceGetNvLinkState
    nv.nvmlDeviceGetCurrentClocksEventReasons = nvmlDeviceGetCurrentClocksEventReasons
    nv.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x1
    nv.nvmlDeviceGetP2PStatus = nvmlDeviceGetP2PStatus
    return nv


@pytest.fixture
def install(monkeypatch):
    def put(module: types.ModuleType) -> types.ModuleType:
        monkeypatch.setitem(sys.modules, "pynvml", module)
        return module

    return put


def test_the_adapter_reads_an_h200_node(install):
    nv = install(stand_in())
    node = gpu.read_node(gpu.Pynvml())
    assert isinstance(node, gpu.NodeGpus), node
    assert (node.driver, node.cuda_driver) == ("580.159.04", "13.0")
    first = node.gpus[0]
    assert (first.name, first.pci_bus_id, first.compute_capability) == ("NVIDIA H200", "00000000:00:06.0", (9, 0))
    # NVML's v2 query: the driver's reserved memory is not reported as used.
    assert (first.memory_total, first.memory_used) == (143771 * MiB, 0)
    assert ("memory", pynvml.nvmlMemory_v2) in nv.calls
    # Hopper answers "Not Supported" for page retirement: not applicable, not unreadable.
    assert first.retired_pages_pending is None and "retired pages" not in first.unreadable
    # Links past the 18th answer "Invalid Argument": they do not exist, and are not errors.
    assert sorted(first.nvlinks) == list(range(18)) and all(first.nvlinks.values())
    assert first.unreadable == {}
    assert [(p.pid, p.used_bytes) for p in first.processes] == [(4242, None)]
    # Uncorrected ECC errors, volatile and aggregate, with nvidia-ml-py's own counter constants.
    assert ("ecc", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC) in nv.calls
    assert ("ecc", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC) in nv.calls
    # P2P asked twice per pair: any path (nvidia-ml-py writes that index as a one-element tuple) and NVLink.
    assert {c[3] for c in nv.calls if c[0] == "p2p"} == {
        pynvml.NVML_P2P_CAPS_INDEX_READ[0],
        pynvml.NVML_P2P_CAPS_INDEX_NVLINK,
    }
    assert node.p2p[(0, 1)] == gpu.P2p(read=0, nvlink=0)
    assert nv.calls[-1] == ("shutdown",)
    assert gpu.nvlink_problems(node) == [] and gpu.health_problems(node.gpus) == []


def test_an_older_driver_without_the_v2_memory_query_counts_reserved_memory(install):
    install(stand_in(legacy_memory=True))
    node = gpu.read_node(gpu.Pynvml())
    assert node.gpus[0].memory_used == 615 * MiB


def test_bindings_before_the_clock_reasons_rename_use_the_older_name(install):
    install(stand_in(throttle_name_only=True))
    node = gpu.read_node(gpu.Pynvml())
    assert node.gpus[0].clock_event_reasons == 0x1


def test_a_node_without_the_driver_is_a_reason(install):
    install(stand_in(driver_ok=False))
    reason = gpu.read_bounded(gpu.Pynvml, 10)
    assert isinstance(reason, str) and reason.startswith(gpu.NO_DRIVER), reason
