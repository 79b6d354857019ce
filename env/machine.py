"""What the build machine offers: GPU archs, cores and memory, compilers, CUDA, and the target Python.

Each is read once per build and recorded in the manifest, so a build says what it was made with.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from env.errors import StackError
from env.pins import arch_base

GIB = 1 << 30


# ---- GPU arch list ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchList:
    archs: tuple[str, ...]
    origin: str
    """Where the list came from, for the build's resolved-configuration lines."""

    @property
    def value(self) -> str:
        return ";".join(self.archs)

    @property
    def bases(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(arch_base(a) for a in self.archs))

    def cmake(self) -> str:
        """CMAKE_CUDA_ARCHITECTURES spelling: '9.0a;10.0' -> '90a;100'."""
        out = []
        for a in self.archs:
            m = re.match(r"^(\d+)\.(\d+)([af]?)", a)
            if m:
                out.append(f"{m.group(1)}{m.group(2)}{m.group(3)}")
        return ";".join(dict.fromkeys(out))


def parse_archs(text: str, origin: str) -> ArchList:
    items = [a for a in re.split(r"[;,\s]+", text.strip()) if a]
    for a in items:
        try:
            arch_base(a)
        except ValueError as exc:
            raise StackError(
                origin, str(exc), "write the list like TORCH_CUDA_ARCH_LIST: '9.0' or '9.0a;10.0'"
            ) from None
    return ArchList(tuple(dict.fromkeys(items)), origin)


def nvml_archs() -> ArchList | None:
    """The compute capabilities of this machine's GPUs, or None without NVML / a driver / GPUs."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: NVMLError_LibraryNotFound / DriverNotLoaded
        return None
    try:
        found: dict[str, int] = {}
        names: dict[str, str] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            arch = f"{major}.{minor}"
            found[arch] = found.get(arch, 0) + 1
            name = pynvml.nvmlDeviceGetName(handle)
            names[arch] = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    if not found:
        return None
    seen = ", ".join(f"{n} x {names[a]}" for a, n in found.items())
    return ArchList(tuple(sorted(found, key=lambda a: tuple(map(int, a.split("."))))), f"NVML: {seen}")


def deploy_archs(path: Path) -> ArchList | None:
    """TORCH_CUDA_ARCH_LIST from a deploy file's cluster-wide `env:` (the cluster's GPUs, declared). The file is
    read and validated as the launcher reads it (launch/config.py: bounded, one-line errors)."""
    from launch.config import ConfigError, load_deploy

    try:
        config = load_deploy(path)
    except ConfigError as exc:
        raise StackError(
            "--deploy", str(exc), "fix the deploy file (python -m launch plan FILE says the same)"
        ) from None
    value = config.env.get("TORCH_CUDA_ARCH_LIST")
    if value is None:
        return None
    return parse_archs(value, f"{path}: env.TORCH_CUDA_ARCH_LIST")


def resolve_archs(given: str | None, deploy: Path | None, environ: dict[str, str]) -> ArchList:
    """--arch, else this machine's GPUs, else the deploy file, else an inherited TORCH_CUDA_ARCH_LIST."""
    if given:
        return parse_archs(given, "--arch")
    found = nvml_archs()
    if found:
        return found
    if deploy:
        declared = deploy_archs(deploy)
        if declared:
            return declared
    if environ.get("TORCH_CUDA_ARCH_LIST"):
        return parse_archs(environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST")
    return ArchList((), "no GPU found by NVML, no --arch, no deploy file env.TORCH_CUDA_ARCH_LIST")


# ---- cores and memory -------------------------------------------------------------------------------------


def available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def max_jobs(cuda: bool, given: int | None, environ: dict[str, str]) -> tuple[int, str]:
    """Parallel compile jobs: the cores, fewer where memory would run out (nvcc on DeepEP's kernels
    takes a few GiB a job; a C++ torch extension about one)."""
    if given:
        return given, "--jobs"
    if environ.get("MAX_JOBS", "").isdigit() and int(environ["MAX_JOBS"]) > 0:
        return int(environ["MAX_JOBS"]), "MAX_JOBS"
    per_job = 4 * GIB if cuda else GIB
    n_cores, mem = cores(), available_memory()
    jobs = max(1, min(n_cores, mem // per_job))
    return jobs, f"{n_cores} cores, {mem / GIB:.0f} GiB available, {per_job // GIB} GiB a job"


# ---- compilers and CUDA -----------------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if proc.returncode == 0 and text else None


def find_cxx(environ: dict[str, str]) -> tuple[str, str] | None:
    """(path, `--version` first line) of the C++ compiler a build would use."""
    for name in [environ["CXX"]] if environ.get("CXX") else ["c++", "g++"]:
        path = shutil.which(name, path=environ.get("PATH"))
        if path:
            version = _first_line([path, "--version"])
            if version:
                return path, version
    return None


@dataclass(frozen=True)
class Toolkit:
    home: str
    version: str
    """nvcc's release, e.g. '13.0'."""


def find_cuda(environ: dict[str, str]) -> Toolkit | None:
    """The CUDA toolkit: CUDA_HOME / CUDA_PATH, the pixi (conda) environment's cuda-nvcc, /usr/local/cuda,
    else the folder above an nvcc on PATH; a candidate counts when it has bin/nvcc and the runtime headers."""
    explicit = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if explicit:
        # The user's choice is taken or refused, never silently replaced by another toolkit.
        candidates: list[str | None] = [explicit]
    else:
        candidates = [environ.get("CONDA_PREFIX"), "/usr/local/cuda"]
    nvcc = None if explicit else shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for home in candidates:
        if not home or not (Path(home) / "bin" / "nvcc").is_file() or not _has_cuda_headers(Path(home)):
            continue
        m = re.search(r"release (\d+\.\d+)", _nvcc_version(Path(home) / "bin" / "nvcc"))
        if m:
            return Toolkit(str(Path(home)), m.group(1))
    return None


def _has_cuda_headers(home: Path) -> bool:
    # conda-forge keeps them under targets/<triple>/include
    return (home / "include" / "cuda_runtime.h").is_file() or any(home.glob("targets/*/include/cuda_runtime.h"))


def _nvcc_version(nvcc: Path) -> str:
    try:
        return subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


# ---- the Python the stack is built for --------------------------------------------------------------------

_PROBE = r"""
import importlib.metadata as md, importlib.util, json, sys, sysconfig
out = {"version": "%d.%d" % sys.version_info[:2], "soabi": sysconfig.get_config_var("SOABI") or "", "packages": {}}
for name in json.loads(sys.argv[1]):
    try:
        out["packages"][name] = md.version(name)
    except md.PackageNotFoundError:
        pass
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
try:
    from torch.utils.cpp_extension import CUDA_GCC_VERSIONS
    out["gcc_bounds"] = {k: [list(lo), list(hi)] for k, (lo, hi) in CUDA_GCC_VERSIONS.items()}
except Exception:
    pass
try:
    spec = importlib.util.spec_from_file_location("_stack_nccl", sys.argv[2])
    nccl = sys.modules["_stack_nccl"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nccl)
    found = nccl.find(sys.path)
    if found:
        out["nccl"] = {"root": found.root, "version": found.version, "origin": found.origin}
except Exception:
    pass
try:
    spec = importlib.util.find_spec("nvidia.nvshmem")
    if spec and spec.submodule_search_locations:
        out["nvshmem_dir"] = list(spec.submodule_search_locations)[0]
except Exception:
    pass
print(json.dumps(out))
"""


@dataclass(frozen=True)
class PythonInfo:
    executable: str
    version: str
    soabi: str
    torch: str | None = None
    torch_cuda: str | None = None
    torch_error: str | None = None
    nvshmem_dir: str | None = None
    """The nvidia-nvshmem wheel's folder (include/, lib/), where that wheel is installed."""
    packages: dict[str, str] = field(default_factory=dict)
    gcc_bounds: dict[str, list[list[int]]] = field(default_factory=dict)
    """torch's own table of g++ versions per CUDA release: {cuda: [min, max excluded]}."""
    nccl: dict[str, str] | None = None
    """The NCCL the stack loads there (env/nccl.py): root, version, origin."""


def probe_python(
    python: str, packages: list[str], timeout: float = 180, environ: dict[str, str] | None = None
) -> PythonInfo:
    where = f"python {python}"
    try:
        argv = [python, "-c", _PROBE, json.dumps(packages), str(Path(__file__).with_name("nccl.py"))]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=environ)
    except FileNotFoundError:
        raise StackError(
            where, "does not exist", "pass --python with the interpreter of the stack's environment"
        ) from None
    except subprocess.TimeoutExpired:
        raise StackError(
            where, f"did not answer within {timeout:g} s (importing torch)", "check that environment"
        ) from None
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StackError(
            where, f"could not be probed ({tail[:200]})", "pass --python with a working Python 3.11+"
        ) from None
    return PythonInfo(executable=python, **data)


_TORCH_NCCL = r"""
import ctypes, json, torch
out = {}
with open("/proc/self/maps") as f:
    libs = sorted({line.split()[-1] for line in f if "libnccl" in line})
out["libs"] = libs
# torch.cuda.nccl.version() is the NCCL torch was compiled with; the library mapped may be newer: ask it.
try:
    code = ctypes.c_int()
    ctypes.CDLL(libs[0]).ncclGetVersion(ctypes.byref(code))
    out["version"] = f"{code.value // 10000}.{code.value % 10000 // 100}.{code.value % 100}"
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
print(json.dumps(out))
"""


def torch_nccl(python: str, environ: dict[str, str], timeout: float = 180) -> dict:
    """The NCCL torch loads in `environ` (the stack's LD_LIBRARY_PATH): version and the library files
    mapped; {'error': ...} where torch has no NCCL (a CPU build) or cannot say."""
    try:
        proc = subprocess.run([python, "-c", _TORCH_NCCL], capture_output=True, text=True, timeout=timeout, env=environ)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, IndexError, json.JSONDecodeError):
        return {"error": "the probe did not answer", "libs": []}


def cxx_version(version_line: str) -> tuple[int, ...] | None:
    """(13, 3, 0) from 'g++ (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0'; None for a compiler that is not GCC."""
    if "clang" in version_line.lower():
        return None
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?\s*$", version_line.strip()) or re.search(
        r"\)\s+(\d+)\.(\d+)(?:\.(\d+))?", version_line
    )
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def default_python() -> str:
    return sys.executable
