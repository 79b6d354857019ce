"""Preflight's judges, table-driven with recorded values: what the checks conclude from what the readers found.
Each table row is a node as it was seen (the H200 machine's driver params, its NCCL 2.28.9 and NVSHMEM 3.4.5
wheels: ../shared/facts/gpu-machine-2xH200.md and deepep-builds-1xH200/README.md) or as the owners' documents
describe it; the judges cite those documents where they decide (preflight/rdma.py, imports.py, model.py)."""

from __future__ import annotations

import os

import pytest

from preflight import imports, model, rdma
from tests.recorded import H200_PARAMS, IBGDA_PARAMS, MODULES_PEERMEM, MODULES_PLAIN, proc_tree

# The library probe's lookups (preflight.imports._LIBS_PROBE) run on the H200 machine on 2026-12-02, after
# `import torch` (torch 2.11.0+cu130): ncclGetVersion, nvshmemx_vendor_get_version_info, /proc/self/maps,
# /proc/modules and /proc/driver/nvidia/params, as printed there.
H200_PROBE = {
    "nccl": [22809, ["/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nccl/lib/libnccl.so.2"]],
    "nvshmem": [3, 4, 5, ["/opt/torch/.venv/lib/python3.12/site-packages/nvidia/nvshmem/lib/libnvshmem_host.so.3"]],
    "torch_nccl": [2, 28, 9],
    "gdrdrv": False,
    "peermem": False,
    "params": ["0", '""'],
}
H200_NCCL = imports.Library(imports.nccl_version(H200_PROBE["nccl"][0]), H200_PROBE["nccl"][1][0])
H200_NVSHMEM = tuple(H200_PROBE["nvshmem"][:3])


def params(tmp_path, text):
    return rdma.nvidia_params(proc_tree(tmp_path, MODULES_PLAIN, text))


def modules(text):
    return {line.split()[0] for line in text.splitlines() if line.strip()}


# ------------------------------------------------------------------------------------------ IBGDA readiness

IBGDA = {
    # DeepEP docs/nvshmem.md: either the driver regkeys (GPU-initiated) ...
    "regkeys, no GDRCopy, NVSHMEM 3.3.9": (
        IBGDA_PARAMS,
        MODULES_PLAIN,
        (3, 3, 9),
        True,
        "GPU-initiated IBGDA (driver regkeys)",
    ),
    # ... or GDRCopy (CPU-assisted)
    "GDRCopy, no regkeys, NVSHMEM 3.3.9": (
        H200_PARAMS,
        MODULES_PEERMEM,
        (3, 3, 9),
        True,
        "CPU-assisted IBGDA through GDRCopy",
    ),
    # NVSHMEM 3.4.5 release notes: CPU-assisted IBGDA without either (the H200 machine's stack): a note, not a failure
    "H200 machine: neither, NVSHMEM 3.4.5": (
        H200_PARAMS,
        MODULES_PLAIN,
        H200_NVSHMEM,
        True,
        "note: neither regkeys nor GDRCopy",
    ),
    "neither, NVSHMEM 3.6.5": (H200_PARAMS, MODULES_PLAIN, (3, 6, 5), True, "note: neither regkeys nor GDRCopy"),
    "neither, NVSHMEM 3.3.24": (H200_PARAMS, MODULES_PLAIN, (3, 3, 24), False, "gdrdrv not loaded; NVSHMEM 3.3.24"),
    "neither, NVSHMEM not loadable": (H200_PARAMS, MODULES_PLAIN, None, False, "NVSHMEM unknown"),
    "no driver, NVSHMEM 3.3.9": (None, MODULES_PLAIN, (3, 3, 9), False, "no NVIDIA driver params"),
}


@pytest.mark.parametrize("driver, loaded, nvshmem, ok, says", IBGDA.values(), ids=IBGDA.keys())
def test_ibgda_readiness(tmp_path, driver, loaded, nvshmem, ok, says):
    verdict = rdma.ibgda_ready(params(tmp_path, driver) if driver else None, modules(loaded), nvshmem)
    assert verdict.ok is ok and says in verdict.value, verdict
    if not ok:
        assert (
            "configure_system_drivers.sh" in verdict.fix
            and "GDRCopy" in verdict.fix
            and "NVSHMEM >= 3.4.5" in verdict.fix
        )


# ------------------------------------------------------------------------------------------ RoCE GIDs

# A ConnectX RoCE port with an IPv6 link-local (0, 1) and an IPv4 address (2, 3), and one without IPv4.
TWO_ADDRESSES = {0: "IB/RoCE v1", 1: "RoCE v2", 2: "IB/RoCE v1", 3: "RoCE v2"}
LINK_LOCAL_ONLY = {0: "IB/RoCE v1", 1: "RoCE v2"}
V1_ONLY = {0: "IB/RoCE v1"}
EIGHT = {f"mlx5_{i}:1": TWO_ADDRESSES for i in range(8)}

GIDS = {
    "both auto": (EIGHT, None, None, True, True, "auto: RoCE v2 at index 1, 3 on 8 ports"),
    "-1 is auto (both libraries' default)": (EIGHT, "-1", "-1", True, True, "auto: RoCE v2 at index 1, 3"),
    "auto, a port without RoCE v2": (
        {"mlx5_0:1": V1_ONLY, "mlx5_1:1": TWO_ADDRESSES},
        None,
        None,
        True,
        False,
        "no RoCE v2 GID on mlx5_0:1",
    ),
    "one index for both": (
        EIGHT,
        "3",
        "3",
        True,
        True,
        "index 3 is RoCE v2 on 8 ports (NCCL_IB_GID_INDEX and NVSHMEM_IB_GID_INDEX)",
    ),
    "NCCL's index where NVSHMEM stays within the node": (
        EIGHT,
        "3",
        None,
        False,
        True,
        "index 3 is RoCE v2 on 8 ports (NCCL_IB_GID_INDEX)",
    ),
    "NVSHMEM on another index": (EIGHT, "3", "1", True, False, "NCCL_IB_GID_INDEX=3, NVSHMEM_IB_GID_INDEX=1"),
    "NVSHMEM left to pick while NCCL is told": (
        EIGHT,
        "3",
        None,
        True,
        False,
        "NCCL_IB_GID_INDEX=3, NVSHMEM_IB_GID_INDEX=auto",
    ),
    "index of the IPv4 address missing": ({"mlx5_0:1": LINK_LOCAL_ONLY}, "3", "3", True, False, "mlx5_0:1: empty"),
    "index of a RoCE v1 GID": (EIGHT, "2", "2", True, False, "mlx5_0:1: IB/RoCE v1"),
    "not a number": (EIGHT, "three", None, False, False, "NCCL_IB_GID_INDEX=three"),
}


@pytest.mark.parametrize("tables, nccl, nvshmem, used, ok, says", GIDS.values(), ids=GIDS.keys())
def test_roce_gid_for_nccl_and_nvshmem(tables, nccl, nvshmem, used, ok, says):
    verdict = rdma.roce_gid(tables, nccl, nvshmem, used)
    assert verdict.ok is ok and says in verdict.value, verdict


def test_a_wrong_index_names_the_right_one():
    verdict = rdma.roce_gid({"mlx5_0:1": LINK_LOCAL_ONLY}, "3", "3", True)
    assert "network.gid_index" in verdict.fix and "mlx5_0:1 has RoCE v2 at 1" in verdict.fix


# ------------------------------------------------------------------------------------------ experts over EP ranks

EXPERTS = {
    "DeepSeek-V3 over 16": (256, 16, [], True, "256 experts over 16 EP ranks: 16 each"),
    "DeepSeek-V3 over 24: vLLM spreads the remainder": (
        256,
        24,
        [],
        True,
        "256 experts over 24 EP ranks: ranks 0-15 hold 11, ranks 16-23 hold 10 (note: uneven",
    ),
    "Qwen3-30B-A3B over 3": (128, 3, [], True, "ranks 0-1 hold 43, rank 2 holds 42"),
    "EPLB, 256 + 16 over 16": (
        256,
        16,
        ["--enable-eplb", "--num-redundant-experts", "16"],
        True,
        "256 + 16 redundant experts over 16 EP ranks: 17 each",
    ),
    "EPLB, 256 + 8 over 24 (newer --eplb-config)": (
        256,
        24,
        ["--enable-eplb", "--eplb-config", '{"num_redundant_experts": 8}'],
        True,
        "11 each",
    ),
    "EPLB, 256 + 0 over 24": (256, 24, ["--enable-eplb"], False, "256 experts over 24 EP ranks"),
    "EPLB, 256 + 20 over 24": (
        256,
        24,
        ["--enable-eplb", "--eplb-config.num_redundant_experts", "20"],
        False,
        "256 + 20 redundant",
    ),
    "redundant experts without EPLB": (
        256,
        16,
        ["--num-redundant-experts=16"],
        False,
        "16 redundant experts without --enable-eplb",
    ),
}


@pytest.mark.parametrize("experts, ep, argv, ok, says", EXPERTS.values(), ids=EXPERTS.keys())
def test_experts_over_ep_ranks(experts, ep, argv, ok, says):
    verdict = model.expert_split(experts, ep, *model.eplb(argv))
    assert verdict.ok is ok and says in verdict.value, verdict


def test_eplb_fix_names_a_redundant_count_that_divides():
    assert model.expert_split(256, 24, True, 0).fix.startswith("set the redundant experts to 8 ")
    assert model.expert_split(256, 24, True, 20).fix.startswith("set the redundant experts to 32 ")


# ------------------------------------------------------------------------------------------ NCCL for deepep_v2


@pytest.mark.parametrize(
    "code, version", [(22809, (2, 28, 9)), (23004, (2, 30, 4)), (23102, (2, 31, 2)), (2708, (2, 7, 8))]
)
def test_nccl_version_codes(code, version):
    assert imports.nccl_version(code) == version


def test_the_h200_probe_agrees_with_torch():
    """What ncclGetVersion said there is what torch.cuda.nccl.version() said in the same process."""
    assert H200_NCCL.version == tuple(H200_PROBE["torch_nccl"])
    assert not H200_PROBE["gdrdrv"] and H200_PROBE["params"][0] == "0"  # the IBGDA row "H200 machine" above


NCCL = {
    # the H200 machine's image: torch 2.11 with nvidia-nccl-cu13 2.28.9, where DeepEP v2 failed to import
    "H200 machine, NCCL 2.28.9 (DeepEP v2 failed to import there)": (H200_NCCL, False),
    "the wheel that made DeepEP v2 build there, 2.31.2": (
        imports.Library((2, 31, 2), "/site-packages/nvidia/nccl/lib/libnccl.so.2"),
        True,
    ),
    "exactly 2.30.4": (imports.Library((2, 30, 4)), True),
    "not loadable": (imports.Library(None, error="OSError: libnccl.so.2: cannot open shared object file"), False),
}


@pytest.mark.parametrize("library, ok", NCCL.values(), ids=NCCL.keys())
def test_nccl_for_deepep_v2(library, ok):
    verdict = imports.nccl_for_backend("deepep_v2", library)
    assert verdict.ok is ok and verdict.expected == ">= 2.30.4 (deepep_v2)"
    assert verdict.value.startswith("NCCL ") and "nvidia-nccl-cu13>=2.30.4" in verdict.fix


def test_nccl_gin_across_efa_nodes_needs_the_newer_nccl():
    """aws-ofi-nccl's GIN needs NCCL 2.31.2 (doc/gin-getting-started.md); within one node DeepEP's 2.30.4 holds."""
    assert imports.nccl_floor("deepep_v2", "efa", across_nodes=True) == (2, 31, 2)
    assert imports.nccl_floor("deepep_v2", "efa", across_nodes=False) == (2, 30, 4)
    assert imports.nccl_floor("deepep_v2", "ib", across_nodes=True) == (2, 30, 4)
    assert imports.nccl_floor("deepep_low_latency", "efa", across_nodes=True) is None
    verdict = imports.nccl_for_backend("deepep_v2", imports.Library((2, 30, 4)), (2, 31, 2))
    assert not verdict.ok and verdict.expected == ">= 2.31.2 (deepep_v2)" and "nvidia-nccl-cu13>=2.31.2" in verdict.fix


def test_library_probe_reports_what_this_machine_loads():
    """The real probe: here torch is a CPU build without NCCL, and no NVSHMEM is installed."""
    found = imports.libraries(dict(os.environ), timeout=120)
    assert not isinstance(found, str), found
    for name, library in found.items():
        if library.version is None:
            assert library.error, name
        else:
            assert all(isinstance(part, int) for part in library.version), name


# ------------------------------------------------------------------------------------------ DeepGEMM in vLLM's wheel


def imported(module, ok, version=None):
    return imports.Imported(
        module, ok, version, f"/site/{module.replace('.', '/')}/__init__.py", "" if ok else "ModuleNotFoundError"
    )


DEEP_GEMM = {
    "installed deep_gemm": ({"deep_gemm": imported("deep_gemm", True, "2.1.1")}, "deep_gemm"),
    "vLLM's own copy (vLLM >= 0.20.0)": (
        {
            "deep_gemm": imported("deep_gemm", False),
            "vllm.third_party.deep_gemm": imported("vllm.third_party.deep_gemm", True, "2.8.1"),
        },
        "vllm.third_party.deep_gemm",
    ),
    "neither (vLLM 0.19.1 and older have no copy)": (
        {
            "deep_gemm": imported("deep_gemm", False),
            "vllm.third_party.deep_gemm": imported("vllm.third_party.deep_gemm", False),
        },
        None,
    ),
}


@pytest.mark.parametrize("results, satisfies", DEEP_GEMM.values(), ids=DEEP_GEMM.keys())
def test_deep_gemm_is_satisfied_by_vllms_copy(results, satisfies):
    got = imports.satisfied("deep_gemm", results)
    assert (got.module if got.ok else None) == satisfies


def test_the_probe_asks_for_vllms_copy_only_where_deep_gemm_is_needed():
    need = imports.required("deepep_low_latency", {"VLLM_USE_DEEP_GEMM": "1"})
    assert imports.to_probe(need) == ["torch", "vllm", "deep_ep", "deep_gemm", "vllm.third_party.deep_gemm"]
    assert "vllm.third_party.deep_gemm" not in imports.to_probe(imports.required("deepep_low_latency", {}))


@pytest.mark.parametrize("version, vendored", [("0.10.1.1", False), ("0.26.0", True), ("0.33.0", True)])
def test_vllms_own_deep_gemm_in_the_installed_wheels(version, vendored):
    """The stand-in preflight accepts is the module vLLM itself falls back to (vllm/utils/import_utils.py)."""
    from tests.support import wheel_text

    (stand_in,) = imports.ALTERNATIVES["deep_gemm"]
    package = wheel_text(version, stand_in.replace(".", "/") + "/__init__.py")
    assert bool(package) is vendored
    assert (f'_has_module("{stand_in}")' in wheel_text(version, "vllm/utils/import_utils.py")) is vendored


def _deepep_v2_stand_in(tmp_path):
    """A `deep_ep` that looks like v2 to the probe (it has init_jit) and a CUDA_HOME with an nvcc."""
    package = tmp_path / "site" / "deep_ep"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("def init_jit():\n    pass\n")
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "bin" / "nvcc").write_text("")
    return {"PYTHONPATH": str(tmp_path / "site"), "CUDA_HOME": str(cuda), "PATH": os.environ["PATH"]}


def test_deepep_v2_needs_nvcc_and_a_jit_cache_it_can_write_at_run_time(tmp_path):
    """DeepEP v2 compiles its kernels when first used: the probe asks what it will ask, in the plan's environment."""
    env = _deepep_v2_stand_in(tmp_path)
    good = imports.probe(["deep_ep"], {**env, "EP_JIT_CACHE_DIR": str(tmp_path / "cache" / "deep_ep")}, 60)
    assert good["deep_ep"].ok, good
    assert good["deep_ep"].detail == f"JIT cache {tmp_path}/cache/deep_ep, nvcc {tmp_path}/cuda/bin/nvcc"

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad = imports.probe(["deep_ep"], {**env, "EP_JIT_CACHE_DIR": str(blocker / "cache")}, 60)["deep_ep"]
    assert not bad.ok and bad.error == (
        f"DeepEP compiles kernels at run time into {blocker}/cache, and {blocker} does not take this user's writes; "
        "set EP_JIT_CACHE_DIR to a writable folder (the stack prefix's jit-cache/deepep)"
    )

    no_nvcc = imports.probe(["deep_ep"], {**env, "CUDA_HOME": str(tmp_path / "nowhere")}, 60)["deep_ep"]
    assert not no_nvcc.ok and no_nvcc.error == (
        f"DeepEP compiles kernels at run time and finds no nvcc ({tmp_path}/nowhere/bin/nvcc); set CUDA_HOME to the CUDA toolkit"
    )


GIN_ON_EFA = {
    "plugin 1.21.0, GDRCopy 2.5 loaded, runtime in the ld cache": (
        (1, 21, 0),
        {"gdrdrv", "efa"},
        "2.5",
        "/usr/lib/x86_64-linux-gnu/libgdrapi.so.2",
        True,
        "aws-ofi-nccl 1.21.0; gdrdrv loaded 2.5; libgdrapi /usr/lib/x86_64-linux-gnu/libgdrapi.so.2",
    ),
    "a plugin older than GIN": ((1, 17, 2), {"gdrdrv"}, "2.5", "/usr/lib/libgdrapi.so.2", False, "aws-ofi-nccl 1.17.2"),
    "an older GDRCopy": (
        (1, 21, 0),
        {"gdrdrv"},
        "2.4.1",
        "/usr/lib/libgdrapi.so.2",
        False,
        "aws-ofi-nccl 1.21.0; gdrdrv loaded 2.4.1",
    ),
    "driver not loaded": (
        (1, 21, 0),
        {"efa"},
        None,
        "/usr/lib/libgdrapi.so.2",
        False,
        "aws-ofi-nccl 1.21.0; gdrdrv not loaded",
    ),
    "no runtime": (
        (1, 21, 0),
        {"gdrdrv"},
        "2.5",
        None,
        False,
        "aws-ofi-nccl 1.21.0; gdrdrv loaded 2.5; libgdrapi not found",
    ),
    "versions that cannot be read": (
        None,
        {"gdrdrv"},
        None,
        "/usr/lib/libgdrapi.so.2",
        True,
        "aws-ofi-nccl version not read; gdrdrv loaded; libgdrapi /usr/lib/libgdrapi.so.2 (check the plugin's "
        "version and gdrdrv's version by hand)",
    ),
}


@pytest.mark.parametrize("plugin, modules, gdrdrv, lib, ok, value", GIN_ON_EFA.values(), ids=GIN_ON_EFA.keys())
def test_nccl_gin_on_efa_needs_the_newer_plugin_and_gdrcopy(plugin, modules, gdrdrv, lib, ok, value):
    """aws-ofi-nccl >= 1.21.0 and GDRCopy >= 2.5, runtime and driver (aws-ofi-nccl doc/gin-getting-started.md)."""
    from preflight import efa

    verdict = efa.gin_on_efa(plugin, modules, gdrdrv, lib)
    assert verdict.ok is ok and verdict.value.startswith(value), verdict.value
    assert verdict.fix.startswith("install aws-ofi-nccl >= 1.21.0 and GDRCopy >= 2.5")


def test_the_plugins_version_is_read_from_its_library(tmp_path):
    """The plugin logs "Initializing " PACKAGE_STRING, so autoconf's "aws-ofi-nccl X.Y.Z-aws" is in the file."""
    from preflight import efa

    lib = tmp_path / "libnccl-net-ofi.so"
    lib.write_bytes(b"\x7fELF" + b"\0" * 4096 + b"NET/OFI Initializing aws-ofi-nccl 1.21.1-aws\0" + b"\0" * 64)
    assert efa.plugin_version(str(lib)) == (1, 21, 1)
    assert efa.plugin_version(str(tmp_path / "missing.so")) is None and efa.plugin_version(None) is None
