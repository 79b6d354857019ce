"""The real EP kernel sources, fetched and checked out offline from local mirrors.

../shared/sources holds bare mirrors of the upstream repositories at the pinned commits (its README). An
operator behind a firewall points `python -m env fetch` at such mirrors with git's own URL rewriting
(`url.<base>.insteadOf`), no change to the pins: this test does exactly that, then checks the sources out
of the filled cache with the network out of the question (`--offline`). Skipped where ../shared is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from env.fetch import SourceCache, git
from env.pins import CURRENT, SEED, VLLM026
from tests.conftest import ROOT, SHARED

MIRRORS = SHARED / "sources"
pytestmark = pytest.mark.skipif(not MIRRORS.is_dir(), reason=f"no local mirrors at {MIRRORS} (../shared/sources)")


def fetch(cache: Path, profile: str, only: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": f"url.{MIRRORS.resolve().as_uri()}/.insteadOf",
        "GIT_CONFIG_VALUE_0": "https://github.com/",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [sys.executable, "-m", "env", "fetch", "--profile", profile, "--only", only, "--cache", str(cache)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


def head(tree: Path) -> str:
    return git(["rev-parse", "HEAD"], cwd=tree).stdout.strip()


def test_deepep_v2_with_its_submodule_from_the_mirrors(tmp_path):
    cache = tmp_path / "cache"
    proc = fetch(cache, "current", "deepep")
    deepep = CURRENT.component("deepep")
    assert f"{deepep.ref[:12]} in DeepEP-" in proc.stdout and "+ 1 submodule(s)" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    if proc.returncode:  # the pin's patch lives on a web host, not in a git mirror: said in one line
        assert proc.stderr.count("\n") == 1 and "deepep-gin-barrier-data-visibility.patch" in proc.stderr, proc.stderr
    tree = tmp_path / "src"
    subs = SourceCache(cache, offline=True).checkout(
        "component deepep", deepep.url, deepep.ref, tree, with_submodules=True
    )
    assert head(tree) == deepep.ref
    assert list(subs) == ["third-party/fmt"] and head(tree / "third-party" / "fmt") == subs["third-party/fmt"]
    assert (tree / "third-party" / "fmt" / "include" / "fmt" / "format.h").is_file()
    assert (tree / "deep_ep" / "utils" / "find_pkgs.py").is_file()  # DeepEP v2's layout


def test_seed_deepep_and_pplx_kernels_and_the_v1_commit_from_the_mirrors(tmp_path):
    cache = tmp_path / "cache"
    proc = fetch(cache, "seed", "deepep,pplx-kernels")
    assert proc.returncode == 0, proc.stderr
    proc = fetch(cache, "vllm026", "deepep")
    assert proc.returncode == 0, proc.stderr
    offline = SourceCache(cache, offline=True)
    for comp in (SEED.component("deepep"), SEED.component("pplx-kernels"), VLLM026.component("deepep")):
        tree = tmp_path / f"{comp.name}-{comp.ref[:7]}"
        offline.checkout(f"component {comp.name}", comp.url, comp.ref, tree, with_submodules=comp.submodules)
        assert head(tree) == comp.ref and (tree / "setup.py").is_file()


def show(commit: str, path: str) -> str:
    return git(["--git-dir", str(MIRRORS / "deepseek-ai" / "DeepEP.git"), "show", f"{commit}:{path}"]).stdout


def test_what_the_pins_say_about_each_deepep_line_is_in_its_setup_py():
    v1, v2 = VLLM026.component("deepep"), CURRENT.component("deepep")
    setup_v1 = show(v1.ref, "setup.py")
    # v1 links the unversioned name unless NVSHMEM_DIR is unset, when it finds the wheel's versioned one itself
    assert "nvshmem_host_lib = 'libnvshmem_host.so'" in setup_v1 and 'find_spec("nvidia.nvshmem")' in setup_v1
    assert v1.nvshmem_unversioned and SEED.component("deepep").nvshmem_unversioned
    setup_v2 = show(v2.ref, "setup.py")
    assert "'EP_JIT_CACHE_DIR'" in setup_v2 and "'EP_NCCL_ROOT_DIR'" in setup_v2  # persisted into deep_ep/envs.py
    assert 'get_env<std::string>("EP_JIT_CACHE_DIR")' in show(v2.ref, "csrc/jit/compiler.hpp")
    assert not v2.nvshmem_unversioned  # v2 resolves the wheel's versioned library itself (_find_versioned_so)
