"""The stack imports with exactly the environment the launcher will give vLLM."""

from __future__ import annotations

import pytest
from packaging.version import Version

from preflight import imports

IMPORT_TIMEOUT_S = 180  # a cold `import vllm` on a network file system can take a minute


@pytest.fixture(scope="session")
def stack(node):
    env = node.env()
    need = imports.required(node.backend, node.plan.env if node.plan else {}, node.kv_connector)
    return need, imports.probe(imports.to_probe(need), env, IMPORT_TIMEOUT_S)


@pytest.mark.parametrize("module", ["torch", "vllm", "deep_ep", "pplx_kernels", "deep_gemm", "nixl"])
def test_imports(stack, check, module):
    """import"""
    need, results = stack
    if module not in need:
        check.skip(f"{module} not needed by this node's plan")
    if isinstance(results, str):
        check.require(
            False, results, "imports", fix="run `python -m env status` and rebuild what is missing", why=results
        )
    got = imports.satisfied(module, results)
    check.require(
        got.ok,
        got.error,
        f"importable ({need[module]})",
        fix="pixi install (or `pixi run build-ep-kernels` for DeepEP / pplx-kernels / DeepGEMM)",
    )
    stand_in = f" (vLLM's own copy, {got.module})" if got.module != module else ""
    check.measured(
        f"{got.version or 'unknown version'} from {got.file}{stand_in}" + (f"; {got.detail}" if got.detail else "")
    )


def test_nccl_that_torch_loads_is_new_enough(node, check, request):
    """NCCL loaded with torch"""
    backend = node.backend
    floor = imports.nccl_floor(backend, node.transport, node.nodes > 1)
    if floor is None:
        check.skip(f"all2all backend is {backend or 'not set'}: no NCCL version floor")
    libraries = request.getfixturevalue("libraries")
    if isinstance(libraries, str):
        check.require(False, libraries, "NCCL loads", fix="run `python -m env status`", why=libraries)
    imports.nccl_for_backend(backend, libraries["nccl"], floor).report(check)


def test_vllm_is_the_version_the_plan_targets(node, stack, check):
    """vLLM version is the plan's target"""
    need, results = stack
    if node.plan is None:
        check.skip("no deploy file: no target version")
    if isinstance(results, str) or not results["vllm"].ok:
        check.skip("vLLM does not import (see the import check)")
    installed = Version(Version(results["vllm"].version).base_version)
    target = node.plan.target
    check.require(
        installed == target.version,
        f"vLLM {results['vllm'].version}",
        f"{target.version} ({target.source})",
        fix=f"install vLLM {target.version}, or set vllm_version: {installed} in the deploy file",
    )
