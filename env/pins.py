"""The stack's pins, by profile: the one place versions and commits are written down.

`seed` is exactly the stack of the multi-node EP guide this toolkit grew out of; `current` is the newest
vLLM release with the EP kernels it is tested with. pixi.toml repeats the conda and PyPI pins below (pixi
cannot read Python); tests/test_pixi_manifest.py keeps the two equal.

Every component carries `source`: where its pin was read (repository, path, commit or pull request).
Where a pin is an inference rather than a value read in that source, `note` says so plainly.

A component is one of:
- git: a repository at a full 40-hex commit, built from source by `python -m env build`;
- tarball: a source archive with its sha256 (None = not verified yet: the build refuses it until the
  user passes the checksum with `--sha256 NAME=HEX`);
- pypi / conda: a package the pixi environment installs; `ref` is its version specifier.

A pins file (`--pins FILE`, TOML, see :func:`load_pins`) can define more profiles in the same shape:
a fork, a patched commit, or the tests' local repository.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet

from env.errors import StackError

Kind = Literal["git", "tarball", "pypi", "conda"]
Build = Literal["pip", "cmake", "none"]
"""How a source component is built: `pip` = `pip install --no-build-isolation --no-deps --target`
(what DeepEP's, pplx-kernels' and DeepGEMM's setup.py expect), `cmake` = configure, build, install
(NVSHMEM), `none` = the environment provides it."""

KINDS = ("git", "tarball", "pypi", "conda")
BUILDS = ("pip", "cmake", "none")
RESERVED = frozenset({"python", "lib", "logs", "builds", "manifest.json"})
"""Folder names of the prefix layout that a component may not be named (its link lives beside them)."""

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ARCH = re.compile(r"^(\d+)\.(\d+)[af]?(\+PTX)?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def arch_base(arch: str) -> str:
    """'9.0a+PTX' -> '9.0': the compute capability an arch-list entry targets."""
    m = _ARCH.match(arch.strip())
    if not m:
        raise ValueError(f"{arch!r} is not a TORCH_CUDA_ARCH_LIST entry (expected e.g. 9.0, 9.0a, 10.0+PTX)")
    return f"{m.group(1)}.{m.group(2)}"


@dataclass(frozen=True)
class Patch:
    """A patch the build applies to a git source before building it, pinned by URL and sha256.

    The project does not carry patch text: `python -m env fetch` downloads it into the source cache
    (patches/<file name>), and a build uses it only when its sha256 matches."""

    url: str
    sha256: str
    source: str = ""
    """Where the patch and its reason were read."""

    @property
    def file_name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def check(self, where: str) -> None:
        if not _SHA256.match(self.sha256):
            raise StackError(
                where,
                f"patch {self.url} has sha256 {self.sha256!r}, not 64 lower-case hex digits",
                "copy the patch's checksum exactly",
            )
        if not _PATCH_NAME.match(self.file_name):
            raise StackError(
                where, f"patch URL {self.url} does not end in a file name", "give the URL of the patch file itself"
            )


@dataclass(frozen=True)
class Component:
    name: str
    kind: Kind
    url: str
    """git or tarball URL (a local path works too); the package name for pypi / conda."""
    ref: str
    """git: the full commit; tarball: its version; pypi / conda: a version specifier (==1.5.1, 2.27.7.*)."""
    source: str
    """Where the pin was read: repository, path and commit or pull request."""
    sha256: str | None = None
    """Tarballs: the archive's sha256; None when it could not be verified (the build then refuses it)."""
    build: Build = "none"
    default: bool = True
    """Built (or expected) by `python -m env build` without --only; optional ones are named with --only."""
    cuda: bool = True
    """Compiles CUDA code: needs nvcc (CUDA_HOME) and a GPU arch list."""
    needs_torch: bool = False
    """Its setup.py imports torch (torch.utils.cpp_extension): torch must be installed before the build."""
    min_torch: str = ""
    """The lowest torch its sources support (e.g. "2.10"), checked before compiling; empty: none stated."""
    needs_nvshmem: bool = False
    """Built against NVSHMEM: NVSHMEM_DIR is set for the build (built here, given, or the pip wheel's)."""
    submodules: bool = False
    archs: tuple[str, ...] = ()
    """Compute capabilities the sources support (9.0, 10.0); empty = any."""
    build_env: dict[str, str] = field(default_factory=dict)
    """Fixed environment for the build (flags read by setup.py), recorded in the manifest."""
    cmake_flags: tuple[str, ...] = ()
    """cmake -D flags; {cuda_home}, {cuda_archs} and {env_prefix} are filled in at build time."""
    exports: dict[str, str] = field(default_factory=dict)
    """Variables the built artifact provides, as paths relative to its folder (NVSHMEM_DIR: '.')."""
    module: str | None = None
    """The Python module it provides (what preflight imports)."""
    patches: tuple[Patch, ...] = ()
    """Applied in order to the checked-out source before the build (git sources only)."""
    needs_nccl: str = ""
    """A version specifier (>=2.30.4) the NCCL it compiles against and runs with must meet; empty = none."""
    nvshmem_unversioned: bool = False
    """Its setup.py links `-l:libnvshmem_host.so` when NVSHMEM_DIR is set, and finds the pip wheel's
    versioned library itself only when NVSHMEM_DIR is unset (DeepEP v1's setup.py). The build then leaves
    NVSHMEM_DIR unset for the wheel, and a given NVSHMEM_DIR must hold the unversioned name."""
    jit_cache_env: str = ""
    """The variable naming the cache of kernels it compiles at run time (DeepEP v2: EP_JIT_CACHE_DIR); the
    build points it into the prefix, and that run time needs nvcc."""
    note: str = ""
    """Where the pin is an inference, or what the build does differently from the source's recipe."""

    def __post_init__(self) -> None:
        where = f"component {self.name}"
        if not _NAME.match(self.name) or self.name in RESERVED:
            raise StackError(
                where,
                f"name {self.name!r} is not allowed",
                "use lower-case letters, digits, '-', '.', '_' and none of " + ", ".join(sorted(RESERVED)),
            )
        if self.kind not in KINDS:
            raise StackError(where, f"kind {self.kind!r} is unknown", f"use one of {', '.join(KINDS)}")
        if self.build not in BUILDS:
            raise StackError(where, f"build {self.build!r} is unknown", f"use one of {', '.join(BUILDS)}")
        if self.kind == "git" and not _COMMIT.match(self.ref):
            # An abbreviated hash is no ref: `git fetch origin <short>` cannot resolve it.
            raise StackError(where, f"commit {self.ref!r} is not a full 40-hex commit", "pin the full commit hash")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise StackError(
                where, f"sha256 {self.sha256!r} is not 64 lower-case hex digits", "copy the checksum exactly"
            )
        if self.kind in ("pypi", "conda") and self.build != "none":
            raise StackError(where, f"a {self.kind} package is installed by pixi, not built", "set build = 'none'")
        if self.kind in ("git", "tarball") and self.build == "none":
            raise StackError(where, "a source component needs a build", "set build = 'pip' or 'cmake'")
        if self.patches and self.kind != "git":
            raise StackError(where, "patches apply to git sources only", "pin the source as a git commit")
        for patch in self.patches:
            patch.check(where)
        if self.needs_nccl:
            try:
                SpecifierSet(self.needs_nccl)
            except InvalidSpecifier:
                raise StackError(
                    where, f"needs_nccl {self.needs_nccl!r} is not a version specifier", "write it like '>=2.30.4'"
                ) from None
        for arch in self.archs:
            try:
                arch_base(arch)
            except ValueError as exc:
                raise StackError(where, str(exc), "list compute capabilities like 9.0, 10.0") from None

    @property
    def is_source(self) -> bool:
        return self.kind in ("git", "tarball")

    @property
    def needs_env(self) -> tuple[str, ...]:
        """The variables its build needs set."""
        out = ["CUDA_HOME", "TORCH_CUDA_ARCH_LIST"] if self.cuda else []
        return tuple(out + (["NVSHMEM_DIR"] if self.needs_nvshmem else []))

    def pin(self) -> dict[str, Any]:
        """What defines the pinned source and its recipe: a change here means a rebuild."""
        return {
            "name": self.name,
            "kind": self.kind,
            "url": self.url,
            "ref": self.ref,
            "sha256": self.sha256,
            "build": self.build,
            "submodules": self.submodules,
            "build_env": dict(sorted(self.build_env.items())),
            "cmake_flags": list(self.cmake_flags),
            **({"patches": [{"url": p.url, "sha256": p.sha256} for p in self.patches]} if self.patches else {}),
        }


@dataclass(frozen=True)
class Profile:
    name: str
    vllm: str
    torch: str
    python: str
    description: str
    cuda: str = ""
    """The CUDA toolkit (cuda-version) the profile's torch wheels are built for."""
    components: tuple[Component, ...] = ()
    toolchain: dict[str, str] = field(default_factory=dict)
    """conda-forge packages of the build toolchain and the network stack, with their version specs."""
    torch_index: str = ""
    """An extra PyPI index torch comes from (PyTorch's per-CUDA index), where PyPI's build is not the one."""

    def __post_init__(self) -> None:
        names = [c.name for c in self.components]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise StackError(
                f"profile {self.name}", f"component {dupes[0]} is listed twice", "give each component a unique name"
            )

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise StackError(
            f"profile {self.name}",
            f"has no component {name!r}",
            f"choose one of {', '.join(c.name for c in self.components)}",
        )

    def pypi_pins(self) -> dict[str, str]:
        """PyPI packages and specifiers, exactly as pixi.toml's feature lists them."""
        pins = {"vllm": f"=={self.vllm}", "torch": f"=={self.torch}"}
        pins.update({c.url: c.ref for c in self.components if c.kind == "pypi"})
        return pins

    def conda_pins(self) -> dict[str, str]:
        """conda-forge packages and specs, exactly as pixi.toml's feature lists them."""
        pins = dict(self.toolchain)
        if self.cuda:
            pins["cuda-version"] = f"{self.cuda}.*"
        pins.update({c.url: c.ref for c in self.components if c.kind == "conda"})
        return pins


def _toolchain(cuda: str, gxx: str) -> dict[str, str]:
    """conda-forge's build toolchain and network stack for a profile: nvcc and the CUDA runtime headers of
    the CUDA release torch is built for (the build refuses another major), a g++ inside torch's bounds for
    that CUDA (torch/utils/cpp_extension.py CUDA_GCC_VERSIONS: 12.8 -> < 15, 13.0 -> < 16)."""
    return {
        "cuda-nvcc": f"{cuda}.*",
        "cuda-cudart-dev": f"{cuda}.*",
        "cmake": ">=3.26",
        "ninja": ">=1.11",
        "gxx": gxx,
        "rdma-core": ">=50",  # inference: a floor of the current line, not a version read in a source
        "libfabric": ">=1.22",  # inference: a floor of the current line, not a version read in a source
        "ucx": ">=1.19",  # NIXL's README: "NIXL was tested with UCX version 1.19.0"
    }


_AWSOME = "aws-samples/awsome-inference 2.projects/vllm-ep/README.md and vllm-ep.Dockerfile @ 269a783e"
_VLLM_EP = "vllm-project/vllm tools/ep_kernels/install_python_libraries.sh (main, 2026)"

GIN_BARRIER_FIX = Patch(
    url="https://raw.githubusercontent.com/vllm-project/vllm/665dfaaf4e0df9000ca101b808546a046ac710b0/"
    "tools/ep_kernels/patches/deepep-gin-barrier-data-visibility.patch",
    sha256="fbde7fef0cd154a090f3a150a55bb0300c4c364800f485cf27361031bb25c961",
    source=f"{_VLLM_EP}: applied to DeepEP d4f41e4e only, 'silent dispatch corruption -> combine illegal memory accesses'",
)
"""vLLM's fix for DeepEP v2's GIN barrier (signal on every context; a system-scope fence before a world
barrier). sha256 of the file at that vLLM commit (4660 bytes)."""

VLLM_ROUTER = Component(
    name="vllm-router",
    kind="pypi",
    url="vllm-router",
    ref="==0.1.17",
    source="PyPI vllm-router 0.1.17 (vllm-project/router); ran in front of vLLM 0.26.0 prefill/decode on an H200",
    cuda=False,
    note="the router `serve-proxy` starts (python -m launch proxy); inference: the newest release seen, not a "
    "version a vLLM release names",
)

SEED = Profile(
    name="seed",
    vllm="0.10.1.1",
    torch="2.7.1",
    python="3.12",
    cuda="12.8",
    torch_index="https://download.pytorch.org/whl/cu128",
    description="the guide's stack: vLLM 0.10.1.1, NVSHMEM 3.3.9, DeepEP c18eabd, pplx-kernels 12cecfd, DeepGEMM ea9c5d9, NCCL 2.27.7",
    toolchain=_toolchain("12.8", "13.*"),
    components=(
        Component(
            name="nvshmem",
            kind="tarball",
            url="https://developer.download.nvidia.com/compute/redist/nvshmem/3.3.9/source/nvshmem_src_cuda12-all-all-3.3.9.tar.gz",
            ref="3.3.9",
            sha256=None,
            source=f"{_AWSOME} (step 1, NVSHMEM_VERSION=3.3.9)",
            note="sha256 not verified here (NVIDIA's download host was out of reach): pass --sha256 nvshmem=HEX "
            "after checking it against NVIDIA's published checksum",
            build="cmake",
            cmake_flags=(
                # The guide's cmake line, less the MPI/PMIx/tests/examples parts a node does not need.
                "CUDA_HOME={cuda_home}",
                "CMAKE_CUDA_ARCHITECTURES={cuda_archs}",
                "NVSHMEM_IBGDA_SUPPORT=1",
                "NVSHMEM_IBRC_SUPPORT=1",
                "NVSHMEM_LIBFABRIC_SUPPORT=1",
                "LIBFABRIC_HOME={env_prefix}",
                "NVSHMEM_USE_NCCL=1",
                "NCCL_HOME={env_prefix}",
                "NVSHMEM_MPI_SUPPORT=0",
                "NVSHMEM_PMIX_SUPPORT=0",
                "NVSHMEM_SHMEM_SUPPORT=0",
                "NVSHMEM_BUILD_TESTS=0",
                "NVSHMEM_BUILD_EXAMPLES=0",
                "NVSHMEM_TIMEOUT_DEVICE_POLLING=0",
            ),
            exports={"NVSHMEM_DIR": "."},
        ),
        Component(
            name="deepep",
            kind="git",
            url="https://github.com/deepseek-ai/DeepEP.git",
            ref="c18eabdebf1381978ff884d278f6083a6153be3f",
            source=f"{_AWSOME} (DEEPEP_COMMIT)",
            build="pip",
            needs_torch=True,
            needs_nvshmem=True,
            nvshmem_unversioned=True,
            archs=("9.0", "10.0"),
            module="deep_ep",
            note="the guide builds with TORCH_CUDA_ARCH_LIST='9.0a+PTX;10.0' (pass --arch to match)",
        ),
        Component(
            name="pplx-kernels",
            kind="git",
            url="https://github.com/ppl-ai/pplx-kernels.git",
            ref="12cecfda252e4e646417ac263d96e994d476ee5d",
            source=f"{_AWSOME} (PPLX_KERNELS_COMMIT)",
            build="pip",
            needs_torch=True,
            needs_nvshmem=True,
            archs=("9.0", "10.0"),
            module="pplx_kernels",
            note="the guide runs `setup.py bdist_wheel` then installs the wheel; pip --target does both",
        ),
        Component(
            name="deepgemm",
            kind="git",
            url="https://github.com/deepseek-ai/DeepGEMM.git",
            ref="ea9c5d9270226c5dd7a577c212e9ea385f6ef048",
            source=f"{_AWSOME} (DEEPGEMM_COMMIT; built with its submodules by ./install.sh)",
            build="pip",
            needs_torch=True,
            submodules=True,
            archs=("9.0", "10.0"),
            module="deep_gemm",
        ),
        Component(
            name="nccl",
            kind="conda",
            url="nccl",
            ref="2.27.7.*",
            source=f"{_AWSOME} (NCCL_VERSION=v2.27.7-1, built from NVIDIA/nccl in the guide's container)",
            cuda=False,
            note="inference: conda-forge's nccl 2.27.7 stands in for the guide's source build (not solved here: "
            "no conda channel reachable). What loads is torch 2.7.1's own wheel NCCL (2.26): env/nccl.py picks the "
            "nvidia-nccl wheel and keeps the conda prefix's lib/ off LD_LIBRARY_PATH, where its CUDA libraries would "
            "shadow torch's; EP_NCCL_ROOT_DIR=$CONDA_PREFIX loads 2.27.7 instead, as the guide did",
        ),
    ),
)

CURRENT = Profile(
    name="current",
    vllm="0.33.0",
    torch="2.14.0",
    python="3.12",
    cuda="13.0",
    description="the newest vLLM release and the EP kernels it is tested with: DeepEP v2 d4f41e4, NVSHMEM and NCCL wheels, NIXL 1.5.1",
    toolchain=_toolchain("13.0", "14.*"),
    components=(
        Component(
            name="nvshmem",
            kind="pypi",
            url="nvidia-nvshmem-cu13",
            ref=">=3.3.24",
            source=f"{_VLLM_EP} (NVSHMEM_VER default 3.3.24, 'supports both CUDA 12 and 13')",
            cuda=False,
            note="torch pins its own exact nvidia-nvshmem-cu13 (==3.4.5 for torch 2.11-2.13); the floor is vLLM's; "
            "DeepEP is built against the wheel pip installed (its setup.py's own fallback)",
        ),
        Component(
            name="nvshmem-src",
            kind="git",
            url="https://github.com/NVIDIA/nvshmem.git",
            ref="df2814155acfba6227534dd81a8bf338da9e55f2",
            source="pbelevich/deepep-benchmark README.md (NVSHMEM 3.4.5-0 = NVIDIA/nvshmem df28141)",
            default=False,
            build="cmake",
            cmake_flags=(
                "CUDA_HOME={cuda_home}",
                "CMAKE_CUDA_ARCHITECTURES={cuda_archs}",
                "NVSHMEM_IBGDA_SUPPORT=1",
                "NVSHMEM_IBRC_SUPPORT=1",
                "NVSHMEM_LIBFABRIC_SUPPORT=1",
                "LIBFABRIC_HOME={env_prefix}",
                "NVSHMEM_MPI_SUPPORT=0",
                "NVSHMEM_PMIX_SUPPORT=0",
                "NVSHMEM_SHMEM_SUPPORT=0",
                "NVSHMEM_BUILD_TESTS=0",
                "NVSHMEM_BUILD_EXAMPLES=0",
            ),
            exports={"NVSHMEM_DIR": "."},
            note="option beside the wheel (--only nvshmem-src,deepep): 3.4.5 is the version torch 2.11-2.13 pin; "
            "vLLM's own script downloads the 3.3.24 binary archive instead",
        ),
        Component(
            name="deepep",
            kind="git",
            url="https://github.com/deepseek-ai/DeepEP.git",
            ref="d4f41e4e93602a15e95f55f6ee8df8f1aaa0e4bb",
            source=f"{_VLLM_EP} (DEEPEP_COMMIT_HASH, pinned in full; DeepEP v2)",
            build="pip",
            needs_torch=True,
            needs_nvshmem=True,
            submodules=True,
            archs=("9.0", "10.0"),
            module="deep_ep",
            patches=(GIN_BARRIER_FIX,),
            needs_nccl=">=2.30.4",
            min_torch="2.10",  # README.md at d4f41e4, Requirements: "PyTorch 2.10 and above"
            jit_cache_env="EP_JIT_CACHE_DIR",
            note="DeepEP v2 needs NCCL >= 2.30.4 at build and run time (the same script's DEEPEP_V2_MIN_NCCL) and compiles "
            "kernels at run time with nvcc (csrc/jit/compiler.hpp); vLLM's script patches this commit: the GIN barrier "
            "fix (pinned here as a patch), the CUDA 13 cccl include (the build adds it for CUDA >= 13) and pidfd syscall "
            "numbers for manylinux headers (not needed where the system headers define them); SM80 is refused by this commit",
        ),
        Component(
            name="deepgemm",
            kind="git",
            url="https://github.com/vllm-project/DeepGEMM.git",
            ref="9a86ae2b78991f1c8e6e95945a591e1ca3b19ce7",
            source="vllm-project/vllm PR #56876 (cmake/external_projects/deepgemm.cmake -> vllm-project/DeepGEMM dev 9a86ae2b)",
            default=False,
            build="pip",
            needs_torch=True,
            submodules=True,
            archs=("9.0", "10.0", "12.0"),
            module="deep_gemm",
            note="the vllm 0.33.0 wheel bundles DeepGEMM 2.8.1 (vllm/third_party/deep_gemm/__init__.py, read from the "
            "wheel), so nothing is built by default. Inference: this source pin is older than that: PR #52035 pinned "
            "deepseek-ai 8b1392b (2.6.1), #56876 this fork commit (2.8.0), #57218 a6bbb800 (full hash not found), all "
            "before v0.30.0; the wheel does not record its commit",
        ),
        Component(
            name="nccl",
            kind="pypi",
            url="nvidia-nccl-cu13",
            ref=">=2.30.4",
            source=f"{_VLLM_EP} (DEEPEP_V2_MIN_NCCL=2.30.4)",
            cuda=False,
        ),
        Component(
            name="nixl",
            kind="pypi",
            url="nixl",
            ref="==1.5.1",
            source="PyPI nixl 1.5.1 (2026-10); vllm-project/vllm requirements/kv_connectors.txt tracks the 1.5 line",
            cuda=False,
            module="nixl",
            note="inference: the newest 1.5.x on PyPI, not a value read in vLLM 0.33.0's requirements",
        ),
        Component(
            name="nixl-cu13",
            kind="pypi",
            url="nixl-cu13",
            ref="==1.5.1",
            source="PyPI nixl-cu13 1.5.1 (the CUDA 13 build the nixl meta package selects)",
            cuda=False,
        ),
        VLLM_ROUTER,
    ),
)
# pplx-kernels is absent from `current` on purpose: vLLM removed the pplx backend in PR #33724 (early 2026);
# vLLM 0.33.0's vllm/config/parallel.py turns `pplx` into allgather_reducescatter with a warning.

_IMAGE = "the GPU machine's image (torch 2.11.0+cu130 with its nvidia-nccl-cu13 and nvidia-nvshmem-cu13 wheels)"

VLLM026 = Profile(
    name="vllm026",
    vllm="0.26.0",
    torch="2.11.0",
    python="3.12",
    cuda="13.0",
    description="vLLM 0.26.0 on torch 2.11 + CUDA 13, the stack many images already hold: DeepEP 73b6ea4 (v1) against "
    "the NVSHMEM 3.4.5 wheel, NCCL 2.28.9, NIXL 1.5.1",
    toolchain=_toolchain("13.0", "14.*"),
    components=(
        Component(
            name="nvshmem",
            kind="pypi",
            url="nvidia-nvshmem-cu13",
            ref="==3.4.5",
            source=f"{_IMAGE}; vLLM 0.26.0's METADATA requires torch==2.11.0",
            cuda=False,
            note="the wheel torch 2.11.0+cu130 installs; DeepEP's setup.py finds it itself (NVSHMEM_DIR left unset)",
        ),
        Component(
            name="deepep",
            kind="git",
            url="https://github.com/deepseek-ai/DeepEP.git",
            ref="73b6ea4a439ba03a695563f9fd242c8e4b02b37c",
            source=f"{_VLLM_EP} before DeepEP v2 (DEEPEP_COMMIT_HASH 73b6ea4). vLLM 0.26.0 offers both lines "
            "(vllm/config/parallel.py:45 lists deepep_v2, read from the wheel), but DeepEP v2 needs NCCL >= 2.30.4 "
            "and torch 2.11.0 loads 2.28.9, so this profile builds v1 and plans refuse deepep_v2 on it",
            build="pip",
            needs_torch=True,
            needs_nvshmem=True,
            nvshmem_unversioned=True,
            archs=("9.0", "10.0"),
            module="deep_ep",
            note="the same script builds it with the CUDA 13 cccl include (the build adds it for CUDA >= 13)",
        ),
        Component(
            name="nccl",
            kind="pypi",
            url="nvidia-nccl-cu13",
            ref="==2.28.9",
            source=_IMAGE,
            cuda=False,
            note="torch 2.11.0+cu130's own NCCL; DeepEP v1 does not link NCCL",
        ),
        Component(
            name="nixl",
            kind="pypi",
            url="nixl",
            ref="==1.5.1",
            source="PyPI nixl 1.5.1; ran with vLLM 0.26.0's NixlConnector on an H200 (prefill/decode, one GPU)",
            cuda=False,
            module="nixl",
        ),
        Component(
            name="nixl-cu13",
            kind="pypi",
            url="nixl-cu13",
            ref="==1.5.1",
            source="PyPI nixl-cu13 1.5.1 (the CUDA 13 build the nixl meta package selects)",
            cuda=False,
        ),
        VLLM_ROUTER,
    ),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (SEED, VLLM026, CURRENT)}

DEFAULT_PROFILE = "current"
PINNED_VLLM = PROFILES[DEFAULT_PROFILE].vllm


def active_profile(environ: dict[str, str] | None = None) -> str:
    """The profile of the active pixi environment (EP_STACK_PROFILE, set by its feature), else the default."""
    name = (environ if environ is not None else os.environ).get("EP_STACK_PROFILE") or DEFAULT_PROFILE
    return name


# ---- pins files -------------------------------------------------------------------------------------------

_COMPONENT_FIELDS = {f.name for f in fields(Component)}
_PROFILE_FIELDS = {f.name for f in fields(Profile)} - {"name", "components"}


def load_pins(path: Path) -> dict[str, Profile]:
    """Profiles from a TOML pins file: `[profiles.NAME]` with the Profile fields and
    `[[profiles.NAME.components]]` tables with the Component fields."""
    where = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise StackError(where, f"cannot be read ({exc.strerror})", "give an existing pins file") from None
    except tomllib.TOMLDecodeError as exc:
        raise StackError(where, f"is not valid TOML ({exc})", "fix the syntax") from None
    tables = data.get("profiles")
    if not isinstance(tables, dict) or not tables:
        raise StackError(where, "has no [profiles.NAME] table", "define at least one profile")
    out: dict[str, Profile] = {}
    for name, table in tables.items():
        out[name] = _profile(where, name, table)
    return out


def _profile(where: str, name: str, table: Any) -> Profile:
    if not isinstance(table, dict):
        raise StackError(where, f"profiles.{name} is not a table", "write [profiles.NAME]")
    unknown = sorted(set(table) - _PROFILE_FIELDS - {"components"})
    if unknown:
        raise StackError(
            where,
            f"profiles.{name}.{unknown[0]} is not a profile field",
            f"use {', '.join(sorted(_PROFILE_FIELDS | {'components'}))}",
        )
    comps = []
    for i, ctable in enumerate(table.get("components", [])):
        if not isinstance(ctable, dict):
            raise StackError(
                where, f"profiles.{name}.components[{i}] is not a table", "write [[profiles.NAME.components]]"
            )
        bad = sorted(set(ctable) - _COMPONENT_FIELDS)
        if bad:
            raise StackError(
                where,
                f"profiles.{name}.components[{i}].{bad[0]} is not a component field",
                f"use {', '.join(sorted(_COMPONENT_FIELDS))}",
            )
        missing = [k for k in ("name", "kind", "url", "ref", "source") if k not in ctable]
        if missing:
            raise StackError(
                where,
                f"profiles.{name}.components[{i}] has no {missing[0]}",
                "name, kind, url, ref and source are required",
            )
        kw = dict(ctable)
        for key in ("archs", "cmake_flags"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "patches" in kw:
            kw["patches"] = tuple(
                _patch(where, f"profiles.{name}.components[{i}].patches[{j}]", t) for j, t in enumerate(kw["patches"])
            )
        comps.append(Component(**kw))
    kw = {k: v for k, v in table.items() if k != "components"}
    for key in ("vllm", "torch", "python", "description"):
        kw.setdefault(key, "")
    return Profile(name=name, components=tuple(comps), **kw)


def _patch(where: str, field_name: str, table: Any) -> Patch:
    if not isinstance(table, dict) or not {"url", "sha256"} <= set(table) or set(table) - {"url", "sha256", "source"}:
        raise StackError(
            where, f"{field_name} is not a patch table", "write {url = '...', sha256 = '<64 hex>'} (source optional)"
        )
    return Patch(url=str(table["url"]), sha256=str(table["sha256"]), source=str(table.get("source", "")))


def resolve_profiles(pins_file: Path | None) -> dict[str, Profile]:
    """The built-in profiles, plus (and overridden by) those of a pins file."""
    return {**PROFILES, **(load_pins(pins_file) if pins_file else {})}
