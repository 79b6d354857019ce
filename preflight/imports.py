"""Imports the stack in a subprocess with exactly the environment the launcher gives vLLM.

What must import follows from the plan: torch and vllm always; DeepEP (and NVSHMEM's library) for a
deepep_* backend; pplx-kernels for pplx; DeepGEMM where the plan sets VLLM_USE_DEEP_GEMM=1 (vLLM's own copy,
vllm.third_party.deep_gemm, counts: vLLM >= 0.20.0 falls back to it); NIXL where a KV connector uses it. One
subprocess imports them all and answers in JSON, within a time bound.

A second subprocess reports the NCCL and NVSHMEM libraries that process loads after `import torch`: the NCCL
version is what deepep_v2 depends on, NVSHMEM's what IBGDA readiness depends on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from preflight.verdict import Verdict

# Runs in the child: import each module, report version and file, never raise.
_PROBE = r"""
import importlib, importlib.metadata, json, sys
out = {}
for name, dist in json.loads(sys.argv[1]).items():
    try:
        mod = importlib.import_module(name)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(mod, "__version__", None)
        out[name] = {"ok": True, "version": version, "file": getattr(mod, "__file__", None)}
    except BaseException as exc:
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        continue
    if name == "torch":  # the NCCL this environment loads (the launcher's LD_LIBRARY_PATH decides which)
        try:  # the library mapped, asked for its version (torch.cuda.nccl.version() is the compile-time one)
            import ctypes
            libs = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libnccl" in l})
            code = ctypes.c_int()
            ctypes.CDLL(libs[0]).ncclGetVersion(ctypes.byref(code))
            nccl = f"{code.value // 10000}.{code.value % 10000 // 100}.{code.value % 100}"
            out[name]["detail"] = f"NCCL {nccl} loaded ({', '.join(libs)})"
        except Exception as exc:
            out[name]["detail"] = f"NCCL not loaded ({type(exc).__name__})"
    if name == "deep_ep" and hasattr(mod, "init_jit"):  # DeepEP v2 compiles kernels at run time
        import os, shutil
        # Where DeepEP looks (deep_ep/__init__.py find_cuda_home, csrc/jit/compiler.hpp): CUDA_HOME, nvcc on PATH, /usr/local/cuda.
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        on_path = shutil.which("nvcc")
        nvcc = os.environ.get("EP_JIT_NVCC_COMPILER") or (os.path.join(home, "bin", "nvcc") if home else on_path or "/usr/local/cuda/bin/nvcc")
        cache = os.environ.get("EP_JIT_CACHE_DIR") or os.path.expanduser("~/.deep_ep")
        out[name]["detail"] = f"JIT cache {cache}, nvcc {nvcc}"
        if not nvcc or not os.path.isfile(nvcc):
            out[name].update(ok=False, error=f"DeepEP compiles kernels at run time and finds no nvcc ({nvcc or 'none on PATH, no CUDA_HOME'}); set CUDA_HOME to the CUDA toolkit")
        else:  # the cache, or the folder it will be made in, must take this user's writes
            existing = cache
            while not os.path.exists(existing) and os.path.dirname(existing) != existing:
                existing = os.path.dirname(existing)
            if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
                out[name].update(ok=False, error=f"DeepEP compiles kernels at run time into {cache}, and {existing} does not take this user's writes; set EP_JIT_CACHE_DIR to a writable folder (the stack prefix's jit-cache/deepep)")
print(json.dumps(out))
"""

DISTRIBUTIONS = {
    "torch": "torch",
    "vllm": "vllm",
    "deep_ep": "deep_ep",
    "pplx_kernels": "pplx_kernels",
    "deep_gemm": "deep_gemm",
    "nixl": "nixl",
}


ALTERNATIVES = {"deep_gemm": ("vllm.third_party.deep_gemm",)}
"""Modules that stand in for a required one. vLLM >= 0.20.0 ships DeepGEMM inside its wheel and imports it when
no `deep_gemm` is installed (vllm/utils/deep_gemm.py, _import_deep_gemm: "Fall back to the vendored copy bundled
in the vLLM wheel"; vllm/utils/import_utils.py has_deep_gemm; read in the 0.20.0 and 0.33.0 wheels, absent from
0.19.1)."""


@dataclass(frozen=True)
class Imported:
    module: str
    ok: bool
    version: str | None = None
    file: str | None = None
    error: str = ""
    detail: str = ""
    """torch: the NCCL loaded; DeepEP v2: its JIT cache and nvcc."""


def required(backend: str | None, plan_env: dict, kv_connector: str | None = None) -> dict[str, str]:
    """module -> why it is needed on this node."""
    need = {"torch": "vLLM runs on it", "vllm": "the server itself"}
    if backend and backend.startswith("deepep"):
        need["deep_ep"] = f"all2all backend {backend}"
    if backend == "pplx":
        need["pplx_kernels"] = "all2all backend pplx"
    if plan_env.get("VLLM_USE_DEEP_GEMM") == "1":
        # vLLM falls back to other kernels when DeepGEMM is absent, unless the plan asked for it.
        need["deep_gemm"] = "the plan sets VLLM_USE_DEEP_GEMM=1"
    if kv_connector and "nixl" in kv_connector.lower():
        need["nixl"] = f"KV connector {kv_connector}"
    return need


def to_probe(need: dict[str, str]) -> list[str]:
    """The modules to import for ``need``: each one and its stand-ins."""
    return [name for module in need for name in (module, *ALTERNATIVES.get(module, ()))]


def satisfied(module: str, results: dict[str, Imported]) -> Imported:
    """The import that satisfies ``module``: itself, else a stand-in that imported, else its own failure."""
    for name in (module, *ALTERNATIVES.get(module, ())):
        got = results.get(name)
        if got is not None and got.ok:
            return got
    return results[module]


def probe(
    modules: list[str], env: dict[str, str], timeout: float, python: str = sys.executable
) -> dict[str, Imported] | str:
    """The import results, or why the probe itself could not run (timeout, crash)."""
    wanted = {m: DISTRIBUTIONS.get(m, m) for m in modules}
    try:
        proc = subprocess.run(
            [python, "-c", _PROBE, json.dumps(wanted)], capture_output=True, text=True, env=env, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"importing {', '.join(modules)} took more than {timeout:g} s"
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the import probe exited with {proc.returncode}: {tail[:300]}"
    return {m: Imported(m, **v) for m, v in data.items()}


# ------------------------------------------------------------------------------ NCCL and NVSHMEM libraries

# Runs in the child, after `import torch` (which loads the NCCL of its wheel, or the one LD_LIBRARY_PATH names):
# the same lookups vLLM makes (vllm/utils/nccl.py find_nccl_library: VLLM_NCCL_SO_PATH, else libnccl.so.2;
# vllm/utils/import_utils.py _get_runtime_nccl_version: ncclGetVersion), and NVSHMEM's host library by its soname,
# else from the nvidia-nvshmem wheel (nvshmemx_vendor_get_version_info, NVIDIA/nvshmem src/host/init/query_host.cpp).
_LIBS_PROBE = r"""
import ctypes, glob, importlib.util, json, os
out = {}
try:
    import torch  # noqa: F401
except BaseException as exc:
    out["torch"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
def loaded(fragment):
    try:
        paths = [line.split()[-1] for line in open("/proc/self/maps") if fragment in line and "/" in line]
    except OSError:
        return None
    return paths[0] if paths else None
try:
    lib = ctypes.CDLL(os.environ.get("VLLM_NCCL_SO_PATH") or "libnccl.so.2")
    code = ctypes.c_int()
    lib.ncclGetVersion(ctypes.byref(code))
    out["nccl"] = {"code": code.value, "file": loaded("libnccl")}
except BaseException as exc:
    out["nccl"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
def nvshmem_lib():
    try:
        return ctypes.CDLL("libnvshmem_host.so.3")
    except OSError as first:
        for spec in ("nvidia.nvshmem", "nvidia.nvshmem.lib"):
            try:
                found = importlib.util.find_spec(spec)
            except (ImportError, ValueError):
                found = None
            for folder in (found.submodule_search_locations or []) if found else []:
                for path in glob.glob(os.path.join(folder, "**", "libnvshmem_host.so*"), recursive=True):
                    return ctypes.CDLL(path)
        raise first
try:
    lib = nvshmem_lib()
    major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    lib.nvshmemx_vendor_get_version_info(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    out["nvshmem"] = {"version": [major.value, minor.value, patch.value], "file": loaded("libnvshmem_host")}
except BaseException as exc:
    out["nvshmem"] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Library:
    """A shared library as the probe found it: its version, or why it could not be loaded."""

    version: tuple[int, ...] | None
    file: str | None = None
    error: str = ""

    def describe(self) -> str:
        if self.version is None:
            return f"not loadable ({self.error})"
        text = ".".join(map(str, self.version))
        return f"{text} from {self.file}" if self.file else text


def nccl_version(code: int) -> tuple[int, int, int]:
    """NCCL_VERSION_CODE as ncclGetVersion returns it: major*10000 + minor*100 + patch from 2.9 on (23004 = 2.30.4),
    major*1000 + minor*100 + patch before (2708 = 2.7.8) (nccl.h, NCCL_VERSION)."""
    if code >= 10000:
        return code // 10000, code % 10000 // 100, code % 100
    return code // 1000, code % 1000 // 100, code % 100


def libraries(env: dict[str, str], timeout: float, python: str = sys.executable) -> dict[str, Library] | str:
    """{"nccl": Library, "nvshmem": Library} as a process with ``env`` loads them, or why the probe could not run."""
    try:
        proc = subprocess.run([python, "-c", _LIBS_PROBE], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"loading NCCL and NVSHMEM took more than {timeout:g} s"
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the library probe exited with {proc.returncode}: {tail[:300]}"
    nccl, nvshmem = data["nccl"], data["nvshmem"]
    return {
        "nccl": Library(
            nccl_version(nccl["code"]) if "code" in nccl else None, nccl.get("file"), nccl.get("error", "")
        ),
        "nvshmem": Library(
            tuple(nvshmem["version"]) if "version" in nvshmem else None, nvshmem.get("file"), nvshmem.get("error", "")
        ),
    }


NCCL_FLOOR = {"deepep_v2": (2, 30, 4)}
"""The NCCL a backend needs where torch loads it: DeepEP README (d4f41e4) "NCCL 2.30.4 and above"; vLLM checks
the same against the runtime library (vllm/utils/import_utils.py DEEPEP_V2_MIN_NCCL_VERSION_RAW = 23004)."""
GIN_ON_EFA_FLOOR = (2, 31, 2)
"""NCCL GIN across EFA nodes, through aws-ofi-nccl >= 1.21.0: "NCCL 2.31.2-1 or later" (aws/aws-ofi-nccl
doc/gin-getting-started.md, Requirements; the plan names the same, launch/matrix.py GIN_ON_EFA)."""


def nccl_floor(backend: str | None, transport: str, across_nodes: bool) -> tuple[int, ...] | None:
    """The lowest NCCL this node's plan runs on, or None where the backend sets no floor."""
    floor = NCCL_FLOOR.get(backend or "")
    if floor and transport == "efa" and across_nodes:
        return max(floor, GIN_ON_EFA_FLOOR)
    return floor


def nccl_for_backend(backend: str, nccl: Library, floor: tuple[int, ...] | None = None) -> Verdict:
    floor = floor or NCCL_FLOOR[backend]
    want = ".".join(map(str, floor))
    fix = (
        f'pip install "nvidia-nccl-cu13>={want}" --no-deps (or -cu12) in the environment vLLM runs in, and rebuild DeepEP '
        "against it; or point VLLM_NCCL_SO_PATH / LD_LIBRARY_PATH at such a libnccl.so.2"
    )
    if nccl.version is None:
        return Verdict(
            False,
            f"NCCL {nccl.describe()}",
            f">= {want} ({backend})",
            fix=fix,
            why="the NCCL that torch loads could not be read",
        )
    return Verdict(
        nccl.version >= floor,
        f"NCCL {nccl.describe()}",
        f">= {want} ({backend})",
        fix=fix,
        why=f"{backend} runs on NCCL GIN, which needs this NCCL",
    )
