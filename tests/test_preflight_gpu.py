"""GPU preflight: the NVML reading and judging with values recorded on the lent 2 x H200 machine
(../shared/facts/gpu-machine-2xH200.md, plus preflight.gpu.Pynvml's own reading there on 2026-11-22: UUIDs,
0 MiB used by NVML's v2 memory query with 615 MiB reserved, page retirement not supported, links 18+ answering
"invalid argument"), edited one fault at a time; and `python -m preflight -k gpu` on a machine without a
driver, as a user runs it."""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

from preflight import gpu
from preflight.gpu import NvmlError, Unsupported
from tests.conftest import run_module

MiB = 1024**2
GiB = 1024**3

# torch 2.11.0+cu130 on the H200 machine: torch.version.cuda and torch.cuda.get_arch_list()
H200_TORCH_CUDA = "13.0"
H200_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


@dataclass
class FakeGpu:
    """One GPU's answers. An exception as a value is raised by the query, as pynvml would."""

    name: str = "NVIDIA H200"
    uuid: str = "GPU-42d246dd-7d1d-5588-2fc7-87366717ea4c"
    pci_bus_id: str = "00000000:00:06.0"
    memory: tuple[int, int] = (143771 * MiB, 0)  # total, used (v2: the driver's reserved 615 MiB not counted)
    cc: tuple[int, int] = (9, 0)
    ecc_enabled: bool = True
    ecc_volatile: int | Exception = 0
    ecc_aggregate: int | Exception = 0
    # Hopper repairs memory by row remapping; the page-retirement query is not supported there.
    retired_pending: bool | Exception = field(default_factory=lambda: Unsupported("Not Supported"))
    remapped: tuple[bool, bool] | Exception = (False, False)
    mig: tuple[bool, bool] | Exception = (False, False)
    processes: list[tuple[int, int | None]] = field(default_factory=list)
    nvlinks: list[bool] = field(default_factory=lambda: [True] * 18)  # NV18, state 1 for links 0..17
    clock_reasons: int = 0x1  # gpu idle


class FakeNvml:
    """The adapter's interface over recorded values; handles are GPU indices."""

    max_links = 36  # nvidia-ml-py 13's NVML_NVLINK_MAX_LINKS: links past a GPU's own answer unsupported

    def __init__(
        self,
        gpus: list[FakeGpu],
        driver: str = "580.159.04",
        cuda: int = 13000,
        p2p_read: int = 0,
        p2p_nvlink: int = 0,
        init_error: Exception | None = None,
    ):
        self.gpus, self.driver, self.cuda = gpus, driver, cuda
        self.p2p_read, self.p2p_nvlink, self.init_error = p2p_read, p2p_nvlink, init_error
        self.inits = self.shutdowns = 0

    @staticmethod
    def _give(value):
        if isinstance(value, Exception):
            raise value
        return value

    def init(self) -> None:
        self.inits += 1
        self._give(self.init_error)

    def shutdown(self) -> None:
        self.shutdowns += 1

    def driver_version(self) -> str:
        return self.driver

    def cuda_driver_version(self) -> int:
        return self.cuda

    def device_count(self) -> int:
        return len(self.gpus)

    def handle(self, index: int) -> int:
        return index

    def name(self, h):
        return self.gpus[h].name

    def uuid(self, h):
        return self.gpus[h].uuid

    def pci_bus_id(self, h):
        return self.gpus[h].pci_bus_id

    def memory(self, h):
        return self.gpus[h].memory

    def compute_capability(self, h):
        return self.gpus[h].cc

    def ecc_enabled(self, h):
        return self.gpus[h].ecc_enabled

    def retired_pages_pending(self, h):
        return self._give(self.gpus[h].retired_pending)

    def remapped_rows(self, h):
        return self._give(self.gpus[h].remapped)

    def mig_mode(self, h):
        return self._give(self.gpus[h].mig)

    def compute_processes(self, h):
        return self.gpus[h].processes

    def clock_event_reasons(self, h):
        return self.gpus[h].clock_reasons

    def ecc_uncorrected(self, h, aggregate: bool) -> int:
        return self._give(self.gpus[h].ecc_aggregate if aggregate else self.gpus[h].ecc_volatile)

    def nvlink_up(self, h, link: int) -> bool:
        links = self.gpus[h].nvlinks
        if link >= len(links):
            raise Unsupported("Invalid Argument")
        return links[link]

    def p2p_status(self, h1, h2, nvlink: bool) -> int:
        return self.p2p_nvlink if nvlink else self.p2p_read


def h200(**node) -> FakeNvml:
    return FakeNvml(
        [FakeGpu(), FakeGpu(uuid="GPU-e0355984-43c8-1862-170c-6203c140e873", pci_bus_id="00000000:00:07.0")], **node
    )


def read(nvml: FakeNvml) -> gpu.NodeGpus:
    node = gpu.read_node(nvml)
    assert isinstance(node, gpu.NodeGpus), node
    return node


def all_problems(node: gpu.NodeGpus, archs=H200_ARCHS, torch_cuda=H200_TORCH_CUDA, max_mib=2048.0) -> list[str]:
    """Every judge, as the checks call them."""
    return [
        *gpu.count_problems(gpu.visible_gpus(node.gpus, None), 2),
        *gpu.model_problems(node.gpus),
        *gpu.arch_problems(node.gpus, archs),
        *gpu.cuda_problems(node.cuda_driver_version, torch_cuda),
        *gpu.health_problems(node.gpus),
        *gpu.mig_problems(node.gpus),
        *gpu.memory_problems(node.gpus, max_mib),
        *gpu.nvlink_problems(node),
        *gpu.throttle_problems(node.gpus),
    ]


# ------------------------------------------------------------------------------ reading, recorded H200


def test_h200_is_read_into_facts():
    nvml = h200()
    node = read(nvml)
    assert (node.driver, node.cuda_driver_version, node.cuda_driver) == ("580.159.04", 13000, "13.0")
    assert [g.pci_bus_id for g in node.gpus] == ["00000000:00:06.0", "00000000:00:07.0"]
    g = node.gpus[0]
    assert (g.name, g.compute_capability, g.memory_total, g.ecc_enabled, g.mig_enabled) == (
        "NVIDIA H200",
        (9, 0),
        143771 * MiB,
        True,
        False,
    )
    assert g.nvlinks == {link: True for link in range(18)}
    assert g.retired_pages_pending is None  # not supported: None, not a failure
    assert (g.row_remap_pending, g.row_remap_failure, g.ecc_uncorrected_volatile) == (False, False, 0)
    assert g.unreadable == {}
    assert node.p2p == {(0, 1): gpu.P2p(read=gpu.P2P_OK, nvlink=gpu.P2P_OK)}
    assert (nvml.inits, nvml.shutdowns) == (1, 1)


def test_h200_passes_every_judge():
    assert all_problems(read(h200())) == []


def _gpu(i: int, **values):
    def edit(nvml: FakeNvml) -> None:
        for name, value in values.items():
            setattr(nvml.gpus[i], name, value)

    return edit


def _link_down(nvml: FakeNvml) -> None:
    nvml.gpus[1].nvlinks[7] = False


FAULTS = {
    "one NVLink down": (_link_down, "GPU1: NVLink 7 down (17/18 up)"),
    "MIG on": (_gpu(0, mig=(True, True)), "GPU0: MIG on"),
    "MIG pending": (_gpu(1, mig=(False, True)), "GPU1: MIG turns on at the next reset"),
    "ECC errors": (_gpu(1, ecc_volatile=2, ecc_aggregate=2), "GPU1: 2 uncorrected ECC errors since the driver loaded"),
    "row remap pending": (_gpu(0, remapped=(True, False)), "GPU0: row remap pending"),
    "row remap failure": (_gpu(0, remapped=(False, True)), "GPU0: row remapping failed"),
    "retired pages pending": (_gpu(1, retired_pending=True), "GPU1: retired pages pending"),
    "ECC counter unreadable": (
        _gpu(0, ecc_volatile=NvmlError("GPU is lost")),
        "GPU0: cannot read ECC errors: GPU is lost",
    ),
    "another process holds 20 GiB": (
        _gpu(0, memory=(143771 * MiB, 20 * GiB), processes=[(4242, 20 * GiB)]),
        "GPU0: 20480 MiB in use, pid 4242 (20480 MiB)",
    ),
    "mixed models": (
        _gpu(1, name="NVIDIA H100 80GB HBM3"),
        "mixed GPU models: GPU0 NVIDIA H200, GPU1 NVIDIA H100 80GB HBM3",
    ),
    "HW thermal slowdown": (_gpu(0, clock_reasons=0x40 | 0x4), "GPU0: HW thermal slowdown"),
    "power brake": (_gpu(1, clock_reasons=0x80), "GPU1: HW power brake slowdown"),
    "P2P disabled": (lambda n: setattr(n, "p2p_read", 4), "GPU0-GPU1: no P2P (disabled by regkey)"),
    "NVLink fabric not set up": (lambda n: setattr(n, "p2p_nvlink", 5), "no GPU pair can use NVLink for P2P"),
    "driver older than torch's CUDA major": (
        lambda n: setattr(n, "cuda", 12080),
        "the driver supports CUDA 12.8, torch needs CUDA 13.x (13.0)",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_the_only_problem(fault):
    edit, expected = FAULTS[fault]
    nvml = h200()
    edit(nvml)
    problems = all_problems(read(nvml))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_compute_capability_8_0_against_kernels_built_for_9_0():
    nvml = h200()
    for g in nvml.gpus:
        g.cc = (8, 0)
    node = read(nvml)
    assert gpu.arch_problems(node.gpus, ("sm_90",)) == [
        "GPU0, GPU1: compute capability 8.0 (sm_80) is not among the architectures torch was built for (sm_90)"
    ]
    assert gpu.arch_problems(node.gpus, H200_ARCHS) == []  # the image's torch has sm_80


def test_idle_and_app_clocks_are_not_slowdowns():
    nvml = h200()
    nvml.gpus[0].clock_reasons = 0x1 | 0x2 | 0x4 | 0x10
    assert gpu.throttle_problems(read(nvml).gpus) == []


def test_memory_under_the_threshold_passes_with_processes_listed():
    nvml = h200()
    nvml.gpus[0].memory, nvml.gpus[0].processes = (143771 * MiB, 500 * MiB), [(99, 500 * MiB)]
    node = read(nvml)
    assert gpu.memory_problems(node.gpus, 2048) == []
    assert gpu.memory_problems(node.gpus, 100) == ["GPU0: 500 MiB in use, pid 99 (500 MiB)"]


def test_pcie_only_gpus_have_no_nvlink_problem():
    nvml = h200(p2p_nvlink=5)
    for g in nvml.gpus:
        g.nvlinks = []
    node = read(nvml)
    assert not gpu.has_nvlink(node)
    assert gpu.nvlink_problems(node) == []


def test_bridged_pairs_pass_when_some_pairs_use_nvlink():
    """Four GPUs in two NVLink-bridged pairs (H100 NVL): pairs across bridges go over PCIe, which is fine."""
    nvml = FakeNvml([FakeGpu() for _ in range(4)])
    bridged = {(0, 1), (2, 3)}
    nvml.p2p_status = lambda h1, h2, nvlink: 0 if not nvlink or (h1, h2) in bridged else 5
    node = read(nvml)
    assert sum(p.nvlink == gpu.P2P_OK for p in node.p2p.values()) == 2 and len(node.p2p) == 6
    assert gpu.nvlink_problems(node) == []


# ------------------------------------------------------------------------------------ pure tables


@pytest.mark.parametrize(
    "arch, cc, runs",
    [
        ("sm_90", (9, 0), True),
        ("sm_80", (8, 6), True),
        ("sm_86", (8, 0), False),
        ("sm_80", (9, 0), False),
        ("sm_90a", (9, 0), True),
        ("sm_90a", (10, 0), False),
        ("sm_100f", (10, 3), True),
        ("sm_120", (12, 0), True),
        ("compute_80", (9, 0), True),
        ("compute_90", (8, 0), False),
        ("compute_90a", (9, 0), True),
        ("gfx942", (9, 0), False),
    ],
)
def test_arch_runs_on(arch, cc, runs):
    assert gpu.arch_runs_on(arch, cc) is runs


@pytest.mark.parametrize(
    "driver, runtime, problem, minor",
    [
        (13000, "13.0", "", False),
        (12020, "12.4", "", True),  # driver 535 with a cu124 torch: minor-version compatibility
        (12080, "13.0", "the driver supports CUDA 12.8, torch needs CUDA 13.x", False),
        (13000, None, "torch is a CPU build", False),
        (None, "13.0", "cannot compare", False),
    ],
)
def test_cuda_driver_against_runtime(driver, runtime, problem, minor):
    got = gpu.cuda_problems(driver, runtime)
    assert (got[0] if got else "").startswith(problem) and bool(got) == bool(problem)
    assert gpu.minor_compat(driver, runtime) is minor


@pytest.mark.parametrize(
    "cvd, visible",
    [
        (None, 2),
        ("0", 1),
        ("1,0", 2),
        ("", 0),
        ("0,7,1", 1),
        ("0,0", 1),
        ("-1", 0),
        ("GPU-e0355984", 1),
        ("GPU-e0355984,GPU-42d2", 2),
    ],
)
def test_cuda_visible_devices(cvd, visible):
    assert gpu.visible_gpus(read(h200()).gpus, cvd) == visible


@pytest.mark.parametrize(
    "visible, expected, ok", [(2, 2, True), (8, 2, True), (1, 2, False), (0, None, False), (1, None, True)]
)
def test_gpu_count(visible, expected, ok):
    assert (gpu.count_problems(visible, expected) == []) is ok


# ------------------------------------------------------------------------- no driver, hangs, torch


def test_no_driver_is_a_reason_not_an_exception():
    nvml = h200(init_error=NvmlError("Driver Not Loaded", 9))
    assert gpu.read_node(nvml) == "no NVIDIA driver: Driver Not Loaded"
    assert nvml.shutdowns == 0


def test_missing_bindings_are_a_reason():
    def make():
        raise ImportError("No module named 'pynvml'")

    assert gpu.read_bounded(make, 5) == "no NVML bindings: No module named 'pynvml'"


def test_a_hung_nvml_is_bounded():
    release = threading.Event()

    class Hung(FakeNvml):
        def init(self):
            release.wait(30)

    start = time.monotonic()
    got = gpu.read_bounded(lambda: Hung([]), 0.3)
    release.set()
    assert got.startswith("NVML not answering: no answer within 0.3 s") and time.monotonic() - start < 5


def test_the_real_bindings_read_or_explain():
    """This machine's NVML through pynvml: GPUs, or (no driver here) the reason; never an exception."""
    got = gpu.read_bounded(gpu.Pynvml, 30)
    if isinstance(got, str):
        assert got.startswith((f"{gpu.NO_DRIVER}: ", f"{gpu.NO_BINDINGS}: ")), got
    else:
        assert got.gpus and got.driver and all(g.name and g.compute_capability for g in got.gpus)


def test_torch_probe_reads_this_interpreters_torch():
    torch = pytest.importorskip("torch")
    got = gpu.torch_build(sys.executable, dict(os.environ), 120)
    assert (got.error, got.version, got.cuda, got.archs) == (
        "",
        torch.__version__,
        torch.version.cuda,
        tuple(torch.cuda.get_arch_list()),
    )


def test_torch_probe_without_torch_and_when_slow(tmp_path):
    # sitecustomize runs at interpreter start: one that hides torch, one that stalls start-up.
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text("import time\ntime.sleep(30)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert gpu.torch_build(sys.executable, {**env, "PYTHONPATH": str(tmp_path / "hide")}, 60) == gpu.TorchBuild()
    start = time.monotonic()
    slow = gpu.torch_build(sys.executable, {**env, "PYTHONPATH": str(tmp_path / "slow")}, 1)
    assert slow.error == "`import torch` took longer than 1 s" and time.monotonic() - start < 10
    assert gpu.torch_build(str(tmp_path / "no-python"), env, 5).error.startswith("cannot run ")


# ------------------------------------------------------------------------------------------ black box

CHECKS = [
    "NVIDIA driver loaded",
    "GPU count for this node's plan",
    "one GPU model",
    "compute capability in the built kernels",
    "driver new enough for torch's CUDA",
    "no uncorrected ECC errors or pending remaps",
    "MIG off",
    "GPU memory free (no other process)",
    "NVLink up and P2P between every pair",
    "no clock slowdown (thermal, power, HW)",
]


def test_preflight_gpu_without_a_driver_fails_every_check_cleanly():
    if not isinstance(gpu.read_bounded(gpu.Pynvml, 30), str):
        pytest.skip("an NVIDIA driver is loaded here: the no-driver run cannot be played")
    start = time.monotonic()
    res = run_module("preflight", "-k", "gpu", timeout=120)
    took = time.monotonic() - start
    text = res.out + res.err
    assert res.code != 0, text
    assert "Traceback" not in text, text
    fails = [ln for ln in res.out.splitlines() if ln.startswith("FAIL  gpu ")]
    assert len(fails) == len(CHECKS), text
    for name, line in zip(CHECKS, fails, strict=True):
        assert name in line and "no NVIDIA driver" in line and "fix: " in line, line
    assert "# verdict: NOT READY (" in res.out
    assert took < 60, f"preflight -k gpu took {took:.1f} s"


def test_preflight_gpu_count_names_the_plans_gpus(tmp_path):
    if not isinstance(gpu.read_bounded(gpu.Pynvml, 30), str):
        pytest.skip("an NVIDIA driver is loaded here: the no-driver run cannot be played")
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("model: m\nnodes:\n  - {address: 10.1.59.30, gpus: 4}\n  - {address: 10.1.60.57, gpus: 4}\n")
    res = run_module("preflight", "-k", "gpu_count", f"--deploy={deploy}", "--node-rank=1", timeout=120)
    line = next(ln for ln in res.out.splitlines() if ln.startswith("FAIL  gpu "))
    assert (
        "GPU count for this node's plan" in line
        and "no NVIDIA driver (expected >= 4 (the plan's local DP x TP))" in line
    ), line
