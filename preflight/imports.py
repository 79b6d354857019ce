"""Imports the stack in a subprocess with exactly the environment the launcher gives vLLM.

What must import follows from the plan: torch and vllm always; DeepEP (and NVSHMEM's library) for a
deepep_* backend; pplx-kernels for pplx; DeepGEMM where the plan sets VLLM_USE_DEEP_GEMM=1; NIXL where a KV
connector uses it. One subprocess imports them all and answers in JSON, within a time bound.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

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


def probe(modules: list[str], env: dict[str, str], timeout: float, python: str = sys.executable) -> dict[str, Imported] | str:
    """The import results, or why the probe itself could not run (timeout, crash)."""
    wanted = {m: DISTRIBUTIONS.get(m, m) for m in modules}
    try:
        proc = subprocess.run([python, "-c", _PROBE, json.dumps(wanted)], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"importing {', '.join(modules)} took more than {timeout:g} s"
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the import probe exited with {proc.returncode}: {tail[:300]}"
    return {m: Imported(m, **v) for m, v in data.items()}
