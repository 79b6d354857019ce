"""The EP kernels built, imported and run on ONE GPU, through the project's own commands.

    EP_GPU_CACHE=<source cache> EP_GPU_RESULTS=results/ python -m pytest -m gpu tests/gpu/test_one_gpu.py -s

tests/gpu/run-on-1-gpu.sh sets the machine's variables and runs this file. For each profile built here
(`vllm026`: DeepEP v1 73b6ea4 against the NVSHMEM wheel; `current`: DeepEP v2 d4f41e4, patched, against the
one NCCL >= 2.30.4):
1. `python -m env build --profile P --offline --cache $EP_GPU_CACHE`, with no variable set by hand;
2. `python -m env status --profile P`: the build recorded and current;
3. DeepEP's own tests/test_low_latency.py (v2: tests/legacy/), one rank, imported through
   `eval "$(python -m env paths --profile P)"`;
4. `python -m preflight` READY for a deepep_low_latency node, deep_ep imported from the prefix;
5. (vllm026) prefill + decode + router on the one GPU through `launch prefill|decode|proxy`: the same token
   ids through the router as straight from prefill, `vllm bench serve` 200/200, SIGTERM leaves no GPU process.
Figures land in $EP_GPU_RESULTS as JSON and text for docs/results.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from env.fetch import SourceCache
from env.pins import PROFILES
from tests.conftest import ROOT

pytestmark = pytest.mark.gpu

# Settings the lent machine needs in every process (no NVLink SHARP / multicast there).
MACHINE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
}
LOW_LATENCY_ARGS = [
    "--num-processes",
    "1",
    "--num-tokens",
    "64",
    "--hidden",
    "2048",
    "--num-topk",
    "4",
    "--num-experts",
    "8",
]
LL_TEST = {"vllm026": "tests/test_low_latency.py", "current": "tests/legacy/test_low_latency.py"}


def gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


@pytest.fixture(scope="module", autouse=True)
def one_gpu():
    if gpu_count() < 1:
        pytest.skip("needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def cache() -> Path:
    given = os.environ.get("EP_GPU_CACHE")
    if not given or not Path(given).is_dir():
        pytest.skip("needs EP_GPU_CACHE: a source cache filled by `python -m env fetch` (tests/gpu/run-on-1-gpu.sh)")
    return Path(given)


@pytest.fixture(scope="module")
def results() -> Path:
    out = Path(os.environ.get("EP_GPU_RESULTS", ROOT / "gpu-results"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def machine_env(**more: str) -> dict[str, str]:
    return {
        **os.environ,
        **MACHINE_ENV,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **more,
    }


def env_cmd(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "env", *args],
        capture_output=True,
        text=True,
        env=machine_env(),
        cwd=ROOT,
        timeout=timeout,
    )


def save(results: Path, name: str, data: dict) -> None:
    (results / name).write_text(json.dumps(data, indent=2) + "\n")


# ---- 1-2. build and status ------------------------------------------------------------------------
@pytest.mark.parametrize("profile", ["vllm026", "current"])
def test_build_from_the_profile_offline(profile, cache, results):
    t0 = time.monotonic()
    proc = env_cmd("build", "--profile", profile, "--offline", "--cache", str(cache))
    took = time.monotonic() - t0
    (results / f"build-{profile}.txt").write_text(proc.stdout + proc.stderr + f"\n# wall time {took:.1f} s\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    manifest = json.loads((ROOT / ".stack" / profile / "manifest.json").read_text())
    entry = manifest["entries"]["deepep"]
    assert entry["commit"] == PROFILES[profile].component("deepep").ref
    save(
        results,
        f"build-{profile}.json",
        {
            k: entry[k]
            for k in (
                "commit",
                "duration_s",
                "max_jobs",
                "arch_list",
                "cuda",
                "torch",
                "compiler",
                "nvshmem_dir",
                "patches",
                "nccl",
                "flags",
            )
        },
    )


@pytest.mark.parametrize("profile", ["vllm026", "current"])
def test_status_records_the_build(profile, results):
    proc = env_cmd("status", "--profile", profile, "--format", "json", timeout=300)
    (results / f"status-{profile}.json").write_text(proc.stdout)
    rows = {r["name"]: r for r in json.loads(proc.stdout)["components"]}
    assert rows["deepep"]["state"] == "ok", rows["deepep"]
    if profile == "vllm026":  # the machine's image is this profile's stack: complete
        assert proc.returncode == 0, proc.stdout


# ---- 3. DeepEP's own low-latency test --------------------------------------------------------------
@pytest.mark.parametrize("profile", ["vllm026", "current"])
def test_deepep_low_latency_through_env_paths(profile, cache, results, tmp_path):
    comp = PROFILES[profile].component("deepep")
    src = tmp_path / "deepep-tests"
    SourceCache(cache, offline=True).checkout(f"component {comp.name}", comp.url, comp.ref, src, with_submodules=False)
    script = (
        f'eval "$({shlex_join([sys.executable, "-m", "env", "paths", "--profile", profile])})" && '
        f"cd {src} && {shlex_join([sys.executable, LL_TEST[profile], *LOW_LATENCY_ARGS])}"
    )
    env = machine_env()
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")  # only what `env paths` adds, plus the staged site
    proc = subprocess.run(
        ["bash", "-c", f"cd {ROOT} && {script}"], capture_output=True, text=True, env=env, timeout=540
    )
    out = proc.stdout + proc.stderr
    (results / f"deepep-ll-{profile}.txt").write_text(f"$ {script}\n{out}")
    assert proc.returncode == 0, out[-4000:]
    figures = re.findall(r"Dispatch \+ combine bandwidth: ([\d.]+) GB/s", out)
    assert figures, out[-2000:]
    save(
        results,
        f"deepep-ll-{profile}.json",
        {
            "dispatch_combine_gbps": [float(f) for f in figures],
            "lines": [ln for ln in out.splitlines() if "GB/s" in ln],
        },
    )


def test_deepep_v2_compiles_its_kernels_at_run_time_into_the_prefix(cache, results, tmp_path):
    """DeepEP v2's elastic buffer (NCCL GIN, the patched barrier) JIT-compiles its kernels with nvcc at first
    use; the build pointed its cache into the prefix. On one H200 without an RDMA NIC its one-rank test died
    with SIGSEGV before compiling anything (2026-12-02), so it runs where an RDMA device is present."""
    if not any(Path("/sys/class/infiniband").glob("*")):
        pytest.skip("DeepEP v2's elastic buffer needs an RDMA device here (none in /sys/class/infiniband)")
    comp = PROFILES["current"].component("deepep")
    jit_cache = ROOT / ".stack" / "current" / "jit-cache" / "deepep"
    src = tmp_path / "deepep-tests"
    SourceCache(cache, offline=True).checkout(f"component {comp.name}", comp.url, comp.ref, src, with_submodules=False)
    test = [
        sys.executable,
        "tests/elastic/test_ep.py",
        "--num-processes",
        "1",
        "--num-tokens",
        "128",
        "--hidden",
        "2048",
        "--num-topk",
        "4",
        "--num-experts",
        "8",
        "--test-first-only",
    ]
    script = f'eval "$({shlex_join([sys.executable, "-m", "env", "paths", "--profile", "current"])})" && cd {src} && {shlex_join(test)}'
    env = machine_env()
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    proc = subprocess.run(
        ["bash", "-c", f"cd {ROOT} && {script}"], capture_output=True, text=True, env=env, timeout=540
    )
    out = proc.stdout + proc.stderr
    compiled = sorted(p.name for p in jit_cache.rglob("*") if p.is_file()) if jit_cache.is_dir() else []
    (results / "deepep-elastic-current.txt").write_text(
        f"$ {script}\n{out}\n# JIT cache {jit_cache}: {len(compiled)} files\n"
    )
    assert proc.returncode == 0, out[-4000:]
    assert compiled, f"nothing compiled into {jit_cache}"
    save(
        results,
        "deepep-elastic-current.json",
        {"jit_cache_files": len(compiled), "lines": [ln for ln in out.splitlines() if "GB/s" in ln]},
    )


def shlex_join(argv: list[str]) -> str:
    import shlex

    return shlex.join(argv)


# ---- 4. preflight ----------------------------------------------------------------------------------
def host_interface() -> tuple[str, str]:
    from launch import netif

    for name, addrs in netif.interfaces().items():
        for addr in addrs:
            if name != "lo" and "." in addr and not addr.startswith("127."):
                return name, addr
    pytest.skip("needs an interface with a non-loopback IPv4 address")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-moe")
    subprocess.run([sys.executable, str(ROOT / "tests" / "gpu" / "tiny_moe.py"), str(out)], check=True, timeout=300)
    return out


@pytest.mark.parametrize("profile", ["vllm026", "current"])
def test_preflight_ready_with_deep_ep_from_the_prefix(profile, tiny_model, results, tmp_path):
    if not shutil.which("vllm"):
        pytest.skip("needs vllm on PATH (staged by tests/gpu/run-on-1-gpu.sh's caller)")
    ifname, address = host_interface()
    env = "\n".join(f'  {k}: "{v}"' for k, v in MACHINE_ENV.items())
    deploy = tmp_path / "one.yaml"
    deploy.write_text(
        f"model: {tiny_model}\nnodes: [{{address: {address}, gpus: 1}}]\nrpc_port: 13345\nport: 8000\n"
        f"all2all_backend: deepep_low_latency\nvllm_version: {PROFILES['vllm026'].vllm}\n"
        f"network: {{transport: tcp, socket_ifname: {ifname}}}\nenv:\n{env}\n"
    )
    report = results / f"preflight-{profile}.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "preflight",
            "--deploy",
            str(deploy),
            "--node-rank",
            "0",
            "--preflight-json",
            str(report),
        ],
        capture_output=True,
        text=True,
        env=machine_env(EP_STACK_PROFILE=profile),
        cwd=ROOT,
        timeout=540,
    )
    (results / f"preflight-{profile}.txt").write_text(proc.stdout + proc.stderr)
    assert "READY" in proc.stdout and "NOT READY" not in proc.stdout, proc.stdout[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if "deep_ep" in ln and "import" in ln)
    assert str(ROOT / ".stack" / profile / "deepep") in line, line


# ---- 5. prefill + decode + router on the one GPU ---------------------------------------------------
PD_PORTS = {"router": 8000, "prefill": 8100, "decode": 8200}


def pd_deploy(model: Path) -> str:
    env = "\n".join(f'  {k}: "{v}"' for k, v in MACHINE_ENV.items())
    return f"""\
model: {model}
disaggregation:
  connector: {{name: NixlConnector, backend: UCX}}
  prefill:
    nodes: [{{address: 127.0.0.1, gpus: 1, gpu_ids: [0]}}]
    port: {PD_PORTS["prefill"]}
    rpc_port: 13345
  decode:
    nodes: [{{address: 127.0.0.2, gpus: 1, gpu_ids: [0]}}]
    port: {PD_PORTS["decode"]}
    rpc_port: 13445
  router: {{port: {PD_PORTS["router"]}}}
network: {{transport: tcp, socket_ifname: lo}}
vllm_args: [--max-model-len, "1024", --gpu-memory-utilization, "0.3"]
env:
{env}
"""


def completion(port: int, model: Path) -> list[int]:
    body = json.dumps(
        {
            "model": str(model),
            "prompt": "The capital of France is",
            "max_tokens": 24,
            "temperature": 0,
            "return_token_ids": True,
        }
    ).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        data = json.load(resp)
    return data["choices"][0]["token_ids"]


def healthy(port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                if resp.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(2)
    return False


def gpu_processes() -> list[str]:
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,process_name", "--format=csv,noheader"], capture_output=True, text=True
    )
    return [ln for ln in out.stdout.splitlines() if ln.strip()]


def test_prefill_decode_router_on_one_gpu(tiny_model, results, tmp_path):
    if not shutil.which("vllm") or not shutil.which("vllm-router"):
        pytest.skip("needs vllm and vllm-router on PATH")
    deploy = tmp_path / "pd.yaml"
    deploy.write_text(pd_deploy(tiny_model))
    env = machine_env(EP_STACK_PROFILE="vllm026")
    procs: dict[str, subprocess.Popen] = {}
    t0 = time.monotonic()
    try:
        for role in ("prefill", "decode", "proxy"):
            log = open(results / f"pd-{role}.log", "w")  # noqa: SIM115
            argv = [sys.executable, "-m", "launch", role, "--deploy", str(deploy), "--node-rank", "0"]
            procs[role] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )
        assert healthy(PD_PORTS["router"], time.monotonic() + 420), "router /health did not answer"
        ready_s = time.monotonic() - t0
        via_router = completion(PD_PORTS["router"], tiny_model)
        direct = completion(PD_PORTS["prefill"], tiny_model)
        assert via_router == direct and via_router
        bench = subprocess.run(
            [
                "vllm",
                "bench",
                "serve",
                "--backend",
                "vllm",
                "--model",
                str(tiny_model),
                "--host",
                "127.0.0.1",
                "--port",
                str(PD_PORTS["router"]),
                "--dataset-name",
                "random",
                "--random-input-len",
                "128",
                "--random-output-len",
                "128",
                "--num-prompts",
                "200",
                "--ignore-eos",
                "--save-result",
                "--result-dir",
                str(results),
                "--result-filename",
                "pd-bench.json",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        (results / "pd-bench.txt").write_text(bench.stdout + bench.stderr)
        figures = json.loads((results / "pd-bench.json").read_text())
        assert figures["completed"] == 200, bench.stdout[-2000:]
    finally:
        stop_t = time.monotonic()
        for role in ("proxy", "decode", "prefill"):
            if role in procs and procs[role].poll() is None:
                os.killpg(procs[role].pid, signal.SIGTERM)
        codes = {role: p.wait(timeout=120) for role, p in procs.items()}
        stopped_s = time.monotonic() - stop_t
        time.sleep(2)
        left = gpu_processes()
    save(
        results,
        "pd.json",
        {
            "ready_s": round(ready_s, 1),
            "token_ids": via_router,
            "stop_codes": codes,
            "stopped_s": round(stopped_s, 1),
            "gpu_processes_after": left,
            **{
                k: figures.get(k)
                for k in (
                    "completed",
                    "failed",
                    "output_throughput",
                    "request_throughput",
                    "mean_ttft_ms",
                    "mean_tpot_ms",
                )
            },
        },
    )
    assert not left, left
