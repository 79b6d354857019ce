"""GPUs: driver, count and model, the build's architectures and CUDA version, memory health, MIG, memory in
use, NVLink / P2P, clock slowdowns. NVML is read once per session; without a driver every check fails with
the reason instead of crashing."""

from __future__ import annotations

import sys

import pytest

from preflight import gpu

TORCH_TIMEOUT_S = 60.0  # `import torch` on a cold network file system can take tens of seconds

UNAVAILABLE_FIX = {
    gpu.NO_DRIVER: "install / load the NVIDIA driver (modprobe nvidia); `nvidia-smi` must list the GPUs "
    "(containers: --gpus all with the NVIDIA container toolkit)",
    gpu.NO_BINDINGS: "pip install nvidia-ml-py (the module pynvml)",
    gpu.NVML_HUNG: "run `nvidia-smi`; if it hangs too, see `dmesg | grep -i xid`, reset the GPU or reboot",
    gpu.NVML_FAILED: "run `nvidia-smi -q` and `dmesg | grep -i xid`; reset the GPU or reboot",
}
RESET_FIX = "nvidia-smi -r -i N with nothing running on it (or reboot); if errors return or remapping failed, take the GPU out of service"


@pytest.fixture(scope="session")
def torch_build(node) -> gpu.TorchBuild:
    """The torch vLLM will import: this interpreter with the environment the launcher sets."""
    return gpu.torch_build(sys.executable, node.env(), TORCH_TIMEOUT_S)


def _driver(gpus: gpu.NodeGpus | str, check, threshold: str) -> gpu.NodeGpus:
    """Every check needs NVML: without it, fail with the reason (value: what is missing; detail: NVML's text)."""
    if isinstance(gpus, str):
        what, _, detail = gpus.partition(": ")
        check.require(False, what, threshold, fix=UNAVAILABLE_FIX.get(what, ""), why=detail)
    return gpus


def _torch(request, check, threshold: str) -> gpu.TorchBuild:
    """Probe torch only once a driver is known to be there (the probe costs seconds)."""
    build: gpu.TorchBuild = request.getfixturevalue("torch_build")
    check.require(not build.error, build.error, threshold, fix="repair the torch install of the serving environment")
    if build.version is None:
        check.skip(f"torch is not installed for {sys.executable}: nothing to compare with")
    return build


def test_driver_loaded(gpus, check):
    """NVIDIA driver loaded"""
    node = _driver(gpus, check, "loaded")
    problems = gpu.unreadable_problems(node.gpus, "device")
    check.require(
        not problems,
        f"{node.driver} (CUDA {node.cuda_driver})",
        "loaded, every GPU answering",
        fix="nvidia-smi -q; dmesg | grep -i xid; reset the GPU or reboot",
        why="; ".join(problems),
    )


def test_gpu_count(node, gpus, check):
    """GPU count for this node's plan"""
    expected = node.expected_gpus
    threshold = f">= {expected} (the plan's local DP x TP)" if expected else ">= 1"
    facts = _driver(gpus, check, threshold)
    cvd = node.env().get("CUDA_VISIBLE_DEVICES")
    visible = gpu.visible_gpus(facts.gpus, cvd)
    value = (
        f"{len(facts.gpus)}"
        if cvd is None
        else f"{len(facts.gpus)} found, {visible} visible (CUDA_VISIBLE_DEVICES={cvd})"
    )
    problems = gpu.count_problems(visible, expected)
    check.require(
        not problems,
        value,
        threshold,
        why="; ".join(problems),
        fix="fix nodes[].gpus / data_parallel_size_local in the deploy file, or CUDA_VISIBLE_DEVICES, "
        "or the GPUs given to the container",
    )


def test_one_gpu_model(gpus, check):
    """one GPU model"""
    facts = _driver(gpus, check, "the same on every GPU")
    names = sorted({g.name or "unknown" for g in facts.gpus})
    value = f"{len(facts.gpus)} x {names[0]}" if len(names) == 1 else ", ".join(names)
    problems = gpu.model_problems(facts.gpus)
    check.require(
        not problems,
        value,
        "the same on every GPU",
        why="; ".join(problems),
        fix="expert parallel ranks run in lock step: use GPUs of one model (CUDA_VISIBLE_DEVICES)",
    )


def test_compute_capability_in_build(gpus, check, request):
    """compute capability in the built kernels"""
    threshold = "among torch.cuda.get_arch_list()"
    facts = _driver(gpus, check, threshold)
    build = _torch(request, check, threshold)
    ccs = sorted({f"{g.compute_capability[0]}.{g.compute_capability[1]}" for g in facts.gpus if g.compute_capability})
    problems = gpu.arch_problems(facts.gpus, build.archs) if build.cuda else [gpu.CPU_TORCH]
    check.require(
        not problems,
        f"{'/'.join(ccs) or 'unknown'} (torch {build.version}: {' '.join(build.archs) or 'no CUDA archs'})",
        threshold,
        why="; ".join(problems),
        fix="install a torch (and kernels) built for this GPU: TORCH_CUDA_ARCH_LIST must include it",
    )


def test_driver_supports_cuda_runtime(gpus, check, request):
    """driver new enough for torch's CUDA"""
    threshold = "driver CUDA >= torch's CUDA major"
    facts = _driver(gpus, check, threshold)
    build = _torch(request, check, threshold)
    value = f"driver CUDA {facts.cuda_driver}, torch {build.version} CUDA {build.cuda or 'none'}"
    if gpu.minor_compat(facts.cuda_driver_version, build.cuda):
        value += " (minor-version compatibility)"
    problems = gpu.cuda_problems(facts.cuda_driver_version, build.cuda)
    check.require(
        not problems,
        value,
        threshold,
        why="; ".join(problems),
        fix="upgrade the NVIDIA driver, or install a torch built for the driver's CUDA (e.g. a cu12x wheel)",
    )


def test_memory_health(gpus, check):
    """no uncorrected ECC errors or pending remaps"""
    threshold = "0 volatile uncorrected, nothing pending"
    facts = _driver(gpus, check, threshold)
    ecc = {g.ecc_enabled for g in facts.gpus}
    lifetime = sum(g.ecc_uncorrected_aggregate or 0 for g in facts.gpus)
    value = (
        "ECC on" if ecc == {True} else "ECC off" if ecc == {False} else "ECC mixed/unknown"
    ) + f", {lifetime} uncorrected over lifetime"
    problems = gpu.health_problems(facts.gpus)
    check.require(not problems, value, threshold, why="; ".join(problems), fix=RESET_FIX)


def test_mig_off(gpus, check):
    """MIG off"""
    facts = _driver(gpus, check, "off")
    on = [g.label for g in facts.gpus if g.mig_enabled or g.mig_pending]
    problems = gpu.mig_problems(facts.gpus)
    check.require(
        not problems,
        f"on: {', '.join(on)}" if on else "off",
        "off",
        why="; ".join(problems),
        fix="nvidia-smi -i N -mig 0, then reset the GPU: vLLM's expert parallel ranks need whole GPUs",
    )


def test_gpu_memory_free(node, gpus, check):
    """GPU memory free (no other process)"""
    limit = node.thresholds.get("gpu_memory_used_max_mib")
    threshold = f"<= {limit:g} MiB used per GPU"
    facts = _driver(gpus, check, threshold)
    used = [g for g in facts.gpus if g.memory_used is not None]
    top = max(used, key=lambda g: g.memory_used, default=None)
    value = f"{top.memory_used / gpu.MiB:.0f} MiB on {top.label}" if top else "unknown"
    problems = gpu.memory_problems(facts.gpus, limit)
    check.require(
        not problems,
        value,
        threshold,
        why="; ".join(problems),
        fix="stop the processes holding GPU memory (nvidia-smi --query-compute-apps=pid,used_memory --format=csv), "
        "or raise preflight.gpu_memory_used_max_mib",
    )


def test_nvlink_and_p2p(gpus, check):
    """NVLink up and P2P between every pair"""
    threshold = "every link up, P2P for every pair"
    facts = _driver(gpus, check, threshold)
    if len(facts.gpus) < 2:
        check.skip(f"{len(facts.gpus)} GPU: no pair to connect")
    pairs = len(facts.p2p)
    if not gpu.has_nvlink(facts):
        no_p2p = sum(p.read != gpu.P2P_OK for p in facts.p2p.values())
        check.skip(f"no NVLink: PCIe only ({pairs - no_p2p}/{pairs} pairs with P2P)")
    links = sum(len(g.nvlinks) for g in facts.gpus)
    up = sum(sum(g.nvlinks.values()) for g in facts.gpus)
    over = sum(p.nvlink == gpu.P2P_OK for p in facts.p2p.values())
    value = f"{up}/{links} links up on {len(facts.gpus)} GPUs, {over}/{pairs} pairs P2P over NVLink"
    problems = gpu.nvlink_problems(facts)
    check.require(
        not problems,
        value,
        threshold,
        why="; ".join(problems),
        fix="nvidia-smi nvlink -s; nvidia-smi topo -m; on NVSwitch systems start nvidia-fabricmanager; "
        "links down need a reset or service",
    )


def test_no_clock_slowdown(gpus, check):
    """no clock slowdown (thermal, power, HW)"""
    threshold = "no HW / thermal / power brake slowdown"
    facts = _driver(gpus, check, threshold)
    reasons = sorted({r for g in facts.gpus for r in gpu.clock_reasons(g.clock_event_reasons or 0)})
    problems = gpu.throttle_problems(facts.gpus)
    check.require(
        not problems,
        ", ".join(reasons) or "none",
        threshold,
        why="; ".join(problems),
        fix="check cooling and power (nvidia-smi -q -d PERFORMANCE,TEMPERATURE,POWER); "
        "HW slowdown and power brake come from the board or chassis: ask the operator",
    )
