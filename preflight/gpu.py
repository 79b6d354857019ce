"""This node's GPUs as NVML reports them, and the judgement of what is read.

Three layers, so that each can be tested on its own:

- an adapter (:class:`Pynvml`): one method per NVML call, pynvml's errors turned into :class:`Unsupported`
  (this GPU or driver has no such query) and :class:`NvmlError` (the query failed). Tests pass a fake
  adapter holding values recorded on a real machine; nothing else here touches pynvml.
- the reading (:func:`read_node`, :func:`read_bounded`): adapter -> plain dataclasses (:class:`NodeGpus`,
  :class:`GpuFacts`), or a one-line reason (``"no NVIDIA driver: ..."``) when NVML cannot start.
- the judges (``*_problems``): pure functions of those dataclasses, each returning the problems it found
  as sentences naming the GPU; an empty list means the check passes.

The CUDA side (the torch build vLLM will import) is read by :func:`torch_build` in a subprocess with a
time limit, with the environment the launcher will set.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

NO_DRIVER = "no NVIDIA driver"
NO_BINDINGS = "no NVML bindings"
NVML_HUNG = "NVML not answering"
NVML_FAILED = "NVML failed"
CPU_TORCH = "torch is a CPU build (torch.version.cuda is None): it cannot use the GPUs"

MiB = 1024**2

# P2P status codes of nvmlDeviceGetP2PStatus (nvmlGpuP2PStatus_t).
P2P_OK = 0
P2P_STATUS = {
    0: "ok",
    1: "chipset not supported",
    2: "GPU not supported",
    3: "IOH topology not supported",
    4: "disabled by regkey",
    5: "not supported",
    6: "unknown",
}

# Clock event (formerly "throttle") reason bits of nvmlDeviceGetCurrentClocksEventReasons.
CLOCK_REASONS = {
    0x1: "gpu idle",
    0x2: "applications clocks setting",
    0x4: "SW power cap",
    0x8: "HW slowdown",
    0x10: "sync boost",
    0x20: "SW thermal slowdown",
    0x40: "HW thermal slowdown",
    0x80: "HW power brake slowdown",
    0x100: "display clock setting",
    0x200: "board limit",
    0x400: "reliability",
}
# The ones that mean the GPU is held back by heat, power delivery or a hardware fault. A power cap under
# load, idle and clocks set by the operator are normal operation.
CLOCK_BAD = 0x8 | 0x20 | 0x40 | 0x80


class NvmlError(Exception):
    """An NVML call failed; the text is NVML's, ``code`` its nvmlReturn_t where known."""

    def __init__(self, text: str, code: int | None = None):
        super().__init__(text)
        self.code = code


class Unsupported(NvmlError):
    """This GPU or driver does not have the query (an answer of 'not applicable', not a fault)."""


class Nvml(Protocol):
    """What the reading needs from NVML. Handles are opaque; every method may raise NvmlError / Unsupported."""

    max_links: int

    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str: ...
    def cuda_driver_version(self) -> int: ...
    def device_count(self) -> int: ...
    def handle(self, index: int) -> Any: ...
    def name(self, h: Any) -> str: ...
    def uuid(self, h: Any) -> str: ...
    def pci_bus_id(self, h: Any) -> str: ...
    def memory(self, h: Any) -> tuple[int, int]: ...
    def compute_capability(self, h: Any) -> tuple[int, int]: ...
    def ecc_enabled(self, h: Any) -> bool: ...
    def ecc_uncorrected(self, h: Any, aggregate: bool) -> int: ...
    def retired_pages_pending(self, h: Any) -> bool: ...
    def remapped_rows(self, h: Any) -> tuple[bool, bool]: ...
    def mig_mode(self, h: Any) -> tuple[bool, bool]: ...
    def compute_processes(self, h: Any) -> list[tuple[int, int | None]]: ...
    def nvlink_up(self, h: Any, link: int) -> bool: ...
    def clock_event_reasons(self, h: Any) -> int: ...
    def p2p_status(self, h1: Any, h2: Any, nvlink: bool) -> int: ...


class Pynvml:
    """The real adapter: each method is one pynvml call (imported here, so a missing package is a reason,
    not an import error of the whole suite)."""

    def __init__(self) -> None:
        import pynvml

        self._nv = pynvml
        self.max_links = int(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18))
        # pynvml defines NVML_P2P_CAPS_INDEX_READ as `0,` (a tuple): take the number, whatever the version.
        read = pynvml.NVML_P2P_CAPS_INDEX_READ
        self._p2p_read = int(read[0] if isinstance(read, tuple) else read)
        self._p2p_nvlink = int(pynvml.NVML_P2P_CAPS_INDEX_NVLINK)

    def _call(self, fn: str, *args: Any) -> Any:
        nv = self._nv
        try:
            return getattr(nv, fn)(*args)
        except nv.NVMLError as exc:
            # Function-not-found is an older driver without the query: not applicable, like not-supported.
            if exc.value in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_FUNCTION_NOT_FOUND):
                raise Unsupported(str(exc), exc.value) from None
            raise NvmlError(str(exc), exc.value) from None

    def init(self) -> None:
        self._call("nvmlInit")

    def shutdown(self) -> None:
        self._call("nvmlShutdown")

    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion"))

    def cuda_driver_version(self) -> int:
        return int(self._call("nvmlSystemGetCudaDriverVersion"))

    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount"))

    def handle(self, index: int) -> Any:
        return self._call("nvmlDeviceGetHandleByIndex", index)

    def name(self, h: Any) -> str:
        return _text(self._call("nvmlDeviceGetName", h))

    def uuid(self, h: Any) -> str:
        return _text(self._call("nvmlDeviceGetUUID", h))

    def pci_bus_id(self, h: Any) -> str:
        return _text(self._call("nvmlDeviceGetPciInfo", h).busId)

    def memory(self, h: Any) -> tuple[int, int]:
        # v2 keeps the driver's reserved memory out of "used"; v1 (older drivers) counts it in.
        try:
            info = self._call("nvmlDeviceGetMemoryInfo", h, self._nv.nvmlMemory_v2)
        except (NvmlError, AttributeError):
            info = self._call("nvmlDeviceGetMemoryInfo", h)
        return int(info.total), int(info.used)

    def compute_capability(self, h: Any) -> tuple[int, int]:
        major, minor = self._call("nvmlDeviceGetCudaComputeCapability", h)
        return int(major), int(minor)

    def ecc_enabled(self, h: Any) -> bool:
        return self._call("nvmlDeviceGetEccMode", h)[0] == self._nv.NVML_FEATURE_ENABLED

    def ecc_uncorrected(self, h: Any, aggregate: bool) -> int:
        counter = self._nv.NVML_AGGREGATE_ECC if aggregate else self._nv.NVML_VOLATILE_ECC
        return int(self._call("nvmlDeviceGetTotalEccErrors", h, self._nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, counter))

    def retired_pages_pending(self, h: Any) -> bool:
        return self._call("nvmlDeviceGetRetiredPagesPendingStatus", h) == self._nv.NVML_FEATURE_ENABLED

    def remapped_rows(self, h: Any) -> tuple[bool, bool]:
        _corrected, _uncorrected, pending, failure = self._call("nvmlDeviceGetRemappedRows", h)
        return bool(pending), bool(failure)

    def mig_mode(self, h: Any) -> tuple[bool, bool]:
        current, pending = self._call("nvmlDeviceGetMigMode", h)
        on = self._nv.NVML_DEVICE_MIG_ENABLE
        return current == on, pending == on

    def compute_processes(self, h: Any) -> list[tuple[int, int | None]]:
        return [(int(p.pid), p.usedGpuMemory) for p in self._call("nvmlDeviceGetComputeRunningProcesses", h)]

    def nvlink_up(self, h: Any, link: int) -> bool:
        try:
            return self._call("nvmlDeviceGetNvLinkState", h, link) == self._nv.NVML_FEATURE_ENABLED
        except NvmlError as exc:
            # A link number past this GPU's links answers "invalid argument": the link does not exist.
            if exc.code == self._nv.NVML_ERROR_INVALID_ARGUMENT:
                raise Unsupported(str(exc), exc.code) from None
            raise

    def clock_event_reasons(self, h: Any) -> int:
        try:
            return int(self._call("nvmlDeviceGetCurrentClocksEventReasons", h))
        except (Unsupported, AttributeError):  # the older name, for drivers / bindings before the rename
            return int(self._call("nvmlDeviceGetCurrentClocksThrottleReasons", h))

    def p2p_status(self, h1: Any, h2: Any, nvlink: bool) -> int:
        return int(self._call("nvmlDeviceGetP2PStatus", h1, h2, self._p2p_nvlink if nvlink else self._p2p_read))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Process:
    pid: int
    used_bytes: int | None  # None where the driver does not account per process


@dataclass
class GpuFacts:
    """One GPU. A field is None where the GPU does not support the query, or where reading it failed
    (then ``unreadable`` holds the field's name and NVML's error)."""

    index: int
    name: str | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total: int | None = None  # bytes
    memory_used: int | None = None  # bytes
    compute_capability: tuple[int, int] | None = None
    ecc_enabled: bool | None = None
    ecc_uncorrected_volatile: int | None = None  # since the driver loaded
    ecc_uncorrected_aggregate: int | None = None  # over the GPU's life
    retired_pages_pending: bool | None = None  # pre-Ampere page retirement
    row_remap_pending: bool | None = None  # Ampere and later
    row_remap_failure: bool | None = None
    mig_enabled: bool | None = None
    mig_pending: bool | None = None  # takes effect at the next GPU reset
    processes: list[Process] | None = None
    nvlinks: dict[int, bool] = field(default_factory=dict)  # link -> up; empty: no NVLink
    clock_event_reasons: int | None = None
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"GPU{self.index}"


@dataclass(frozen=True)
class P2p:
    """nvmlDeviceGetP2PStatus of one pair: any path (read), and over NVLink. None: unreadable."""

    read: int | None
    nvlink: int | None


@dataclass
class NodeGpus:
    driver: str
    cuda_driver_version: int | None  # NVML's form: 13000 is CUDA 13.0
    gpus: list[GpuFacts]
    p2p: dict[tuple[int, int], P2p] = field(default_factory=dict)  # (i, j) with i < j

    @property
    def cuda_driver(self) -> str:
        return cuda_text(self.cuda_driver_version)


def cuda_text(version: int | None) -> str:
    return "unknown" if version is None else f"{version // 1000}.{version % 1000 // 10}"


# --------------------------------------------------------------------------------------------- reading


def _field(gpu: GpuFacts, what: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Unsupported:
        return None
    except NvmlError as exc:
        gpu.unreadable[what] = str(exc)
        return None


def _read_gpu(nvml: Nvml, index: int) -> tuple[GpuFacts, Any]:
    gpu = GpuFacts(index=index)
    h = _field(gpu, "device", lambda: nvml.handle(index))
    if h is None:
        gpu.unreadable.setdefault("device", "no handle")
        return gpu, None
    gpu.name = _field(gpu, "name", lambda: nvml.name(h))
    gpu.uuid = _field(gpu, "uuid", lambda: nvml.uuid(h))
    gpu.pci_bus_id = _field(gpu, "pci bus id", lambda: nvml.pci_bus_id(h))
    gpu.memory_total, gpu.memory_used = _field(gpu, "memory", lambda: nvml.memory(h)) or (None, None)
    gpu.compute_capability = _field(gpu, "compute capability", lambda: nvml.compute_capability(h))
    gpu.ecc_enabled = _field(gpu, "ECC mode", lambda: nvml.ecc_enabled(h))
    gpu.ecc_uncorrected_volatile = _field(gpu, "ECC errors", lambda: nvml.ecc_uncorrected(h, aggregate=False))
    gpu.ecc_uncorrected_aggregate = _field(gpu, "ECC errors", lambda: nvml.ecc_uncorrected(h, aggregate=True))
    gpu.retired_pages_pending = _field(gpu, "retired pages", lambda: nvml.retired_pages_pending(h))
    gpu.row_remap_pending, gpu.row_remap_failure = _field(gpu, "remapped rows", lambda: nvml.remapped_rows(h)) or (
        None,
        None,
    )
    gpu.mig_enabled, gpu.mig_pending = _field(gpu, "MIG mode", lambda: nvml.mig_mode(h)) or (None, None)
    procs = _field(gpu, "processes", lambda: nvml.compute_processes(h))
    gpu.processes = None if procs is None else [Process(pid, used) for pid, used in procs]
    for link in range(nvml.max_links):
        up = _field(gpu, "NVLink", lambda link=link: nvml.nvlink_up(h, link))
        if up is not None:
            gpu.nvlinks[link] = up
    gpu.clock_event_reasons = _field(gpu, "clock reasons", lambda: nvml.clock_event_reasons(h))
    return gpu, h


def _p2p(nvml: Nvml, h1: Any, h2: Any, nvlink: bool) -> int | None:
    try:
        return nvml.p2p_status(h1, h2, nvlink)
    except Unsupported:
        return 5  # NVML_P2P_STATUS_NOT_SUPPORTED: what the query would have said
    except NvmlError:
        return None


def read_node(nvml: Nvml) -> NodeGpus | str:
    """Everything the checks need, read once; a one-line reason instead when NVML cannot be used."""
    try:
        nvml.init()
    except NvmlError as exc:
        return f"{NO_DRIVER}: {exc}"
    try:
        driver = nvml.driver_version()
        try:
            cuda = nvml.cuda_driver_version()
        except NvmlError:
            cuda = None
        read = [_read_gpu(nvml, i) for i in range(nvml.device_count())]
        p2p = {}
        for i, (_, h1) in enumerate(read):
            for j in range(i + 1, len(read)):
                h2 = read[j][1]
                if h1 is not None and h2 is not None:
                    p2p[(i, j)] = P2p(read=_p2p(nvml, h1, h2, False), nvlink=_p2p(nvml, h1, h2, True))
        return NodeGpus(driver=driver, cuda_driver_version=cuda, gpus=[g for g, _ in read], p2p=p2p)
    except NvmlError as exc:
        return f"{NVML_FAILED}: {exc}"
    finally:
        with contextlib.suppress(NvmlError):
            nvml.shutdown()


def read_bounded(make: Callable[[], Nvml], timeout_s: float) -> NodeGpus | str:
    """:func:`read_node` with a time limit: a wedged GPU can make NVML calls block for minutes. The reader
    runs in a daemon thread, so a call that never returns does not keep the process alive."""
    out: list[NodeGpus | str] = []

    def work() -> None:
        try:
            nvml = make()
        except ImportError as exc:
            out.append(f"{NO_BINDINGS}: {exc}")
            return
        except NvmlError as exc:
            out.append(f"{NO_DRIVER}: {exc}")
            return
        try:
            out.append(read_node(nvml))
        except Exception as exc:  # the bindings misbehaving (ctypes, an API change): a reason, not a crash
            out.append(f"{NVML_FAILED}: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=work, name="nvml-read", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not out:
        return f"{NVML_HUNG}: no answer within {timeout_s:g} s (a GPU or the driver may be hung)"
    return out[0]


# ---------------------------------------------------------------------------------------- torch build


@dataclass(frozen=True)
class TorchBuild:
    """The torch the serving environment imports. ``version`` None: torch is not installed there;
    ``error``: the probe itself failed (import error, time limit)."""

    version: str | None = None
    cuda: str | None = None  # torch.version.cuda; None for a CPU build
    archs: tuple[str, ...] = ()
    error: str = ""


_PROBE = """\
import json
try:
    import torch
except ModuleNotFoundError as exc:
    if exc.name != "torch":
        raise
    print(json.dumps({"version": None}))
else:
    print(json.dumps({"version": torch.__version__, "cuda": torch.version.cuda, "archs": torch.cuda.get_arch_list()}))
"""


def torch_build(python: str, env: dict[str, str], timeout_s: float) -> TorchBuild:
    """Ask ``python`` (with ``env``) which CUDA and GPU architectures its torch was built for. A subprocess:
    importing torch takes seconds and can hang on a broken install, and this must not touch CUDA here."""
    try:
        proc = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return TorchBuild(error=f"`import torch` took longer than {timeout_s:g} s")
    except OSError as exc:
        return TorchBuild(error=f"cannot run {python}: {exc.strerror or exc}")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return TorchBuild(error=f"`import torch` failed: {err[-1] if err else f'exit code {proc.returncode}'}")
    try:
        got = json.loads(lines[-1])
    except json.JSONDecodeError:
        return TorchBuild(error=f"unexpected probe output: {lines[-1][:200]}")
    return TorchBuild(version=got["version"], cuda=got.get("cuda"), archs=tuple(got.get("archs") or ()))


# --------------------------------------------------------------------------------------------- judges


def visible_gpus(gpus: list[GpuFacts], cuda_visible_devices: str | None) -> int:
    """How many of ``gpus`` CUDA will show under CUDA_VISIBLE_DEVICES (unset: all). Like CUDA, the list
    stops at its first entry that names no GPU (an index or a GPU-UUID prefix)."""
    if cuda_visible_devices is None:
        return len(gpus)
    seen: set[int] = set()
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        match = [
            g.index
            for g in gpus
            if (entry.isdigit() and int(entry) == g.index)
            or (entry.startswith("GPU-") and g.uuid and g.uuid.startswith(entry))
        ]
        if len(match) != 1 or match[0] in seen:
            break
        seen.add(match[0])
    return len(seen)


def count_problems(visible: int, expected: int | None) -> list[str]:
    need = expected or 1
    if visible >= need:
        return []
    return [
        f"{visible} GPU{'s' if visible != 1 else ''} visible, "
        + (f"this node's plan uses {expected}" if expected else "need at least 1")
    ]


def unreadable_problems(gpus: list[GpuFacts], *fields: str) -> list[str]:
    return [
        f"{g.label}: cannot read {what}: {err}"
        for g in gpus
        for what, err in g.unreadable.items()
        if not fields or what in fields
    ]


def model_problems(gpus: list[GpuFacts]) -> list[str]:
    names = {g.name for g in gpus}
    if len(names) <= 1:
        return []
    return ["mixed GPU models: " + ", ".join(f"{g.label} {g.name or 'unknown'}" for g in gpus)]


_ARCH = re.compile(r"(sm|compute)_(\d+?)(\d)([af]?)")


def arch_runs_on(arch: str, cc: tuple[int, int]) -> bool:
    """Whether code built for ``arch`` (torch's names: sm_90, sm_90a, sm_100f, compute_90) runs on a GPU of
    compute capability ``cc``: machine code runs on its own major version at the same or a later minor
    (``a`` code only on its exact version); PTX (compute_*) is compiled on the spot for any later GPU."""
    m = _ARCH.fullmatch(arch)
    if not m:
        return False
    kind, built = m.group(1), (int(m.group(2)), int(m.group(3)))
    if m.group(4) == "a":
        return built == cc
    if kind == "compute" and not m.group(4):
        return built <= cc
    return built[0] == cc[0] and built[1] <= cc[1]


def arch_problems(gpus: list[GpuFacts], archs: tuple[str, ...] | list[str]) -> list[str]:
    out = []
    for cc in sorted({g.compute_capability for g in gpus if g.compute_capability}):
        if not any(arch_runs_on(a, cc) for a in archs):
            which = ", ".join(g.label for g in gpus if g.compute_capability == cc)
            out.append(
                f"{which}: compute capability {cc[0]}.{cc[1]} (sm_{cc[0]}{cc[1]}) is not among the "
                f"architectures torch was built for ({' '.join(archs) or 'none'})"
            )
    return out + unreadable_problems(gpus, "compute capability")


def _version(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_problems(driver_cuda: int | None, runtime: str | None) -> list[str]:
    """The driver must support the CUDA runtime torch was built with. Within one major version an older
    driver still runs newer runtimes (CUDA minor-version compatibility), so only the major is a hard limit."""
    if runtime is None:
        return [CPU_TORCH]
    rt = _version(runtime)
    if driver_cuda is None or rt is None:
        return [f"cannot compare: driver CUDA {cuda_text(driver_cuda)}, torch CUDA {runtime}"]
    if driver_cuda // 1000 < rt[0]:
        return [f"the driver supports CUDA {cuda_text(driver_cuda)}, torch needs CUDA {rt[0]}.x ({runtime})"]
    return []


def minor_compat(driver_cuda: int | None, runtime: str | None) -> bool:
    """True when the pair works only through minor-version compatibility (same major, older driver)."""
    rt = _version(runtime or "")
    return bool(driver_cuda and rt and driver_cuda // 1000 == rt[0] and driver_cuda % 1000 // 10 < rt[1])


def health_problems(gpus: list[GpuFacts]) -> list[str]:
    """Memory errors that make a GPU unfit now. Aggregate (lifetime) counts are history that row remapping
    already dealt with, so only volatile counts and pending / failed repairs fail."""
    out = []
    for g in gpus:
        if g.ecc_uncorrected_volatile:
            out.append(f"{g.label}: {g.ecc_uncorrected_volatile} uncorrected ECC errors since the driver loaded")
        if g.retired_pages_pending:
            out.append(f"{g.label}: retired pages pending (a reset retires them)")
        if g.row_remap_pending:
            out.append(f"{g.label}: row remap pending (a reset applies it)")
        if g.row_remap_failure:
            out.append(f"{g.label}: row remapping failed (no spare rows left)")
    return out + unreadable_problems(gpus, "ECC mode", "ECC errors", "retired pages", "remapped rows")


def mig_problems(gpus: list[GpuFacts]) -> list[str]:
    out = []
    for g in gpus:
        if g.mig_enabled:
            out.append(f"{g.label}: MIG on")
        elif g.mig_pending:
            out.append(f"{g.label}: MIG turns on at the next reset (pending)")
    return out + unreadable_problems(gpus, "MIG mode")


def _processes(g: GpuFacts) -> str:
    if not g.processes:
        return ""
    shown = [f"{p.pid}" + (f" ({p.used_bytes / MiB:.0f} MiB)" if p.used_bytes is not None else "") for p in g.processes]
    return f", pid {', '.join(shown)}"


def memory_problems(gpus: list[GpuFacts], max_mib: float) -> list[str]:
    out = []
    for g in gpus:
        if g.memory_used is not None and g.memory_used / MiB > max_mib:
            out.append(f"{g.label}: {g.memory_used / MiB:.0f} MiB in use{_processes(g)}")
    return out + unreadable_problems(gpus, "memory")


def has_nvlink(node: NodeGpus) -> bool:
    return any(g.nvlinks for g in node.gpus)


def nvlink_problems(node: NodeGpus) -> list[str]:
    out = []
    for g in node.gpus:
        down = [link for link, up in g.nvlinks.items() if not up]
        if down:
            out.append(
                f"{g.label}: NVLink {', '.join(map(str, down))} down ({len(g.nvlinks) - len(down)}/{len(g.nvlinks)} up)"
            )
        elif not g.nvlinks and has_nvlink(node):
            out.append(f"{g.label}: no NVLink while the other GPUs have it")
    for (i, j), p in node.p2p.items():
        if p.read != P2P_OK:
            status = "unreadable" if p.read is None else P2P_STATUS.get(p.read, str(p.read))
            out.append(f"GPU{i}-GPU{j}: no P2P ({status})")
    # Every pair without NVLink P2P although the links are up: on NVSwitch systems the fabric is not set up.
    if node.p2p and has_nvlink(node) and all(p.nvlink != P2P_OK for p in node.p2p.values()):
        out.append("no GPU pair can use NVLink for P2P although the GPUs have NVLinks")
    return out + unreadable_problems(node.gpus, "NVLink")


def clock_reasons(mask: int) -> list[str]:
    return [name for bit, name in CLOCK_REASONS.items() if mask & bit]


def throttle_problems(gpus: list[GpuFacts]) -> list[str]:
    out = []
    for g in gpus:
        if g.clock_event_reasons and g.clock_event_reasons & CLOCK_BAD:
            out.append(f"{g.label}: {', '.join(clock_reasons(g.clock_event_reasons & CLOCK_BAD))}")
    return out + unreadable_problems(gpus, "clock reasons")
