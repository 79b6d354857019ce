"""Source builds of the EP kernels into the stack's prefix, the way their own recipes build them.

For each source component of a profile, in order (NVSHMEM before what links against it):

1. the inputs are hashed: the pin (URL, commit or version and sha256, recipe flags), the GPU arch list,
   the Python ABI, torch, the CUDA toolkit, the NVSHMEM built against and the C++ compiler. If the
   component's current build has the same hash, nothing is done;
2. the source is checked out from the source cache (fetched first unless --offline; see env/fetch.py);
3. it is built in a staging folder, with TORCH_CUDA_ARCH_LIST, CUDA_HOME, NVSHMEM_DIR and MAX_JOBS set:
   - pip: `python -m pip install --no-build-isolation --no-deps --no-index --target <build>/python .`,
     what DeepEP's, pplx-kernels' and DeepGEMM's setup.py expect (torch imported at build time,
     nothing downloaded);
   - cmake: configure, build, install into the build folder (NVSHMEM);
   the whole output goes to <prefix>/logs/<component>-<hash>.log;
4. on success the build folder moves to <prefix>/builds/, the link <prefix>/<component> is swapped to it
   in one rename, and the manifest is rewritten. On failure the staging folder is removed and the link,
   the previous build and the manifest are left exactly as they were.

Bad input stops the run before anything is built, in one line naming the component and the fix (exit
code 2): a commit that does not exist, a checksum mismatch or an unverified tarball, a missing compiler,
cmake or CUDA toolkit, no NVSHMEM, torch missing, no GPU arch, an arch the sources do not support, an
unreachable source on a node without internet. A build that runs and fails exits 1 and names its log.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from env import machine
from env.errors import StackError
from env.fetch import SourceCache, extract, git
from env.manifest import BUILD_RECORD, Entry, Manifest, digest, tree_sha256, write_json
from env.pins import Component, Profile, arch_base

BUILDER = 2
"""Bumped when this recipe changes, so that every component is rebuilt once."""

Out = Callable[[str], None]


@dataclass(frozen=True)
class BuildConfig:
    profile: Profile
    prefix: Path
    cache: Path
    offline: bool = False
    only: tuple[str, ...] = ()
    """Components to build (optional ones included); empty = the profile's default ones."""
    arch: str | None = None
    deploy: Path | None = None
    jobs: int | None = None
    python: str = sys.executable
    sha256: dict[str, str] = field(default_factory=dict)
    """Checksums the user vouches for, by component: what an unverified tarball needs."""
    timeout_s: float = 6 * 3600.0
    """Per build command; NVSHMEM from source on a small machine takes about an hour."""
    heartbeat_s: float = 30.0
    force: bool = False


def selected(profile: Profile, only: tuple[str, ...]) -> list[Component]:
    if only:
        wanted = [profile.component(name) for name in only]  # unknown names raise
        return [c for c in profile.components if c in wanted]
    return [c for c in profile.components if c.default]


def short(comp: Component) -> str:
    return comp.ref[:7] if comp.kind == "git" else comp.ref


class Builder:
    def __init__(self, config: BuildConfig, out: Out = print, environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.out = out
        self.environ = dict(os.environ if environ is None else environ)
        self.cache = SourceCache(config.cache, offline=config.offline)

    # ---- the run ------------------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.config
        comps = selected(cfg.profile, cfg.only)
        sources = [c for c in comps if c.is_source]
        packages = sorted(
            {c.url for c in cfg.profile.components if c.kind == "pypi"}
            | {"vllm", "torch", "nvidia-nvshmem-cu12", "nvidia-nvshmem-cu13"}
        )
        info = machine.probe_python(cfg.python, packages, environ=self.environ)
        archs = machine.resolve_archs(cfg.arch, cfg.deploy, self.environ)
        cuda_needed = any(c.cuda for c in sources)
        toolkit = machine.find_cuda(self.environ) if cuda_needed else None
        jobs, jobs_origin = machine.max_jobs(cuda_needed, cfg.jobs, self.environ)
        cxx = machine.find_cxx(self.environ) if sources else None

        self.out(f"# env build: profile {cfg.profile.name}, {len(sources)} source component(s), prefix {cfg.prefix}")
        torch_text = f"torch {info.torch}" if info.torch else "no torch"
        self._kv("python", f"{info.executable} ({info.version}, {torch_text})")
        self._kv("arch list", f"{archs.value or '-'} ({archs.origin})")
        self._kv("max jobs", f"{jobs} ({jobs_origin})")
        self._kv(
            "cuda", f"{toolkit.home} ({toolkit.version})" if toolkit else ("not found" if cuda_needed else "not needed")
        )
        self._kv("compiler", cxx[1] if cxx else ("not found" if sources else "not needed"))
        if any(c.needs_nccl for c in sources):
            self._kv("nccl", f"{info.nccl['version']} ({info.nccl['origin']})" if info.nccl else "not found")
        self._kv("source cache", f"{cfg.cache}{' (offline)' if cfg.offline else ''}")

        for comp in comps:
            if not comp.is_source:
                self._report_package(comp, info)
        for comp in sources:  # every prerequisite, before hours of compiling
            self._check(comp, archs, toolkit, cxx, info)
            self._check_libraries(comp, info)
            for patch in comp.patches:
                self.cache.ensure_patch(f"component {comp.name}", patch)
        if not sources:
            return 0

        cfg.prefix.mkdir(parents=True, exist_ok=True)
        with _lock(cfg.prefix):
            manifest = Manifest.load(cfg.prefix)
            manifest.profile = cfg.profile.name
            for i, comp in enumerate(sources, 1):
                self._build_one(f"[{i}/{len(sources)}]", comp, manifest, archs, toolkit, cxx, info, jobs)
        return 0

    def _kv(self, key: str, value: str) -> None:
        self.out(f"  {key:<13}: {value}")

    def _report_package(self, comp: Component, info: machine.PythonInfo) -> None:
        have = info.packages.get(comp.url)
        if comp.kind == "pypi":
            state = f"installed {have}" if have else "not installed: `pixi install` (or pip install) provides it"
        else:
            state = "from the conda environment"
        self.out(f"  {comp.name:<14} {comp.kind} {comp.url} {comp.ref}: {state}")

    def _check(
        self,
        comp: Component,
        archs: machine.ArchList,
        toolkit: machine.Toolkit | None,
        cxx: tuple[str, str] | None,
        info: machine.PythonInfo,
    ) -> None:
        where = f"component {comp.name}"
        if comp.archs and archs.archs:
            supported = {arch_base(a) for a in comp.archs}
            for base in archs.bases:
                if base not in supported:
                    raise StackError(
                        where,
                        f"GPU arch {base} ({archs.origin}) is not supported by these sources (they build for {', '.join(comp.archs)})",
                        "build for a supported arch with --arch, or pin a commit that supports it",
                    )
        if comp.cuda and not archs.archs:
            raise StackError(
                where,
                "no GPU arch to build for: no GPU found by NVML, no --arch, no deploy file env.TORCH_CUDA_ARCH_LIST",
                "pass --arch (e.g. --arch 9.0 for H100/H200)",
            )
        if comp.cuda and toolkit is None:
            given = self.environ.get("CUDA_HOME") or self.environ.get("CUDA_PATH")
            what = f"CUDA_HOME={given} has no bin/nvcc and CUDA headers" if given else "no CUDA toolkit (nvcc) found"
            raise StackError(
                where, what, "install cuda-nvcc (the profile's pixi environment has it) or set CUDA_HOME to the toolkit"
            )
        if cxx is None:
            given = self.environ.get("CXX")
            what = f"the C++ compiler CXX={given} does not run" if given else "no C++ compiler (c++ / g++) on PATH"
            raise StackError(
                where,
                what,
                "install one (pixi: gxx, in the profile's environment; Debian: apt-get install g++) or set CXX",
            )
        if comp.build == "cmake" and not shutil.which("cmake", path=self.environ.get("PATH")):
            raise StackError(where, "cmake is not on PATH", "install cmake (pixi: the profile's environment has it)")
        if comp.needs_torch and not info.torch:
            raise StackError(
                where,
                f"its setup.py imports torch, which {info.executable} cannot ({info.torch_error or 'not installed'})",
                "install the profile's torch first (pixi install), or pass --python with the stack's interpreter",
            )
        if comp.min_torch and info.torch and _release(info.torch) < _release(comp.min_torch):
            raise StackError(
                where,
                f"needs torch >= {comp.min_torch} (its README's requirements), {info.executable} has torch {info.torch}",
                f"install the profile's torch (pixi install), or a profile whose DeepEP line supports torch {info.torch}",
            )
        if comp.cuda and comp.needs_torch and toolkit:
            if not info.torch_cuda:
                raise StackError(
                    where,
                    f"torch {info.torch} in {info.executable} is a CPU build; CUDA kernels need torch built for CUDA {toolkit.version}",
                    "install the profile's CUDA torch (pixi install)",
                )
            if info.torch_cuda.split(".")[0] != toolkit.version.split(".")[0]:
                raise StackError(
                    where,
                    f"the CUDA toolkit {toolkit.version} at {toolkit.home} does not match torch {info.torch} (built for CUDA {info.torch_cuda})",
                    f"install cuda-nvcc {info.torch_cuda} (the profile's environment has it) or set CUDA_HOME to a CUDA {info.torch_cuda.split('.')[0]}.x toolkit",
                )
            bounds = info.gcc_bounds.get(toolkit.version)
            have = machine.cxx_version(cxx[1]) if cxx else None
            if bounds and have and not (tuple(bounds[0]) <= have < tuple(bounds[1])):
                lo, hi = ".".join(map(str, bounds[0])), ".".join(map(str, bounds[1]))
                raise StackError(
                    where,
                    f"the C++ compiler {cxx[1]} is outside what torch accepts for CUDA {toolkit.version} (g++ >= {lo}, < {hi}; torch/utils/cpp_extension.py)",
                    "install a g++ in that range (the profile's environment has one) or set CXX",
                )

    def _check_libraries(self, comp: Component, info: machine.PythonInfo) -> None:
        """NVSHMEM and NCCL as the component's own setup.py will find them, checked before compiling."""
        where = f"component {comp.name}"
        if comp.needs_nvshmem and not self._built_nvshmem():
            given = self.environ.get("NVSHMEM_DIR")
            if given and not Path(given, "include").is_dir():
                raise StackError(
                    where,
                    f"NVSHMEM_DIR={given} has no include/ folder",
                    "point NVSHMEM_DIR at an NVSHMEM install (include/, lib/)",
                )
            if given and comp.nvshmem_unversioned and not Path(given, "lib", "libnvshmem_host.so").exists():
                raise StackError(
                    where,
                    f"NVSHMEM_DIR={given} has no lib/libnvshmem_host.so, the name this commit's setup.py links when NVSHMEM_DIR is set",
                    "unset NVSHMEM_DIR so that its setup.py finds the nvidia-nvshmem wheel itself, or point it at an NVSHMEM install",
                )
            if not given and info.nvshmem_dir:
                self._check_package(comp, info, "nvshmem")
        if comp.needs_nccl:
            fix = f"install one NCCL {comp.needs_nccl} that torch and {comp.name} both load: pip install '{self._nccl_wheel(info)}{comp.needs_nccl}' --no-deps (or set EP_NCCL_ROOT_DIR)"
            if not info.nccl:
                raise StackError(
                    where,
                    f"needs NCCL {comp.needs_nccl} and none was found (no EP_NCCL_ROOT_DIR / NCCL_DIR, no nvidia-nccl wheel in {info.executable})",
                    fix,
                )
            if not _satisfies(info.nccl["version"], comp.needs_nccl):
                raise StackError(
                    where,
                    f"needs NCCL {comp.needs_nccl} at build and run time; the environment has NCCL {info.nccl['version']} ({info.nccl['origin']})",
                    fix,
                )
            if comp.needs_torch:
                loaded = machine.torch_nccl(info.executable, self._nccl_env(info))
                if len(loaded.get("libs", [])) > 1:
                    raise StackError(
                        where,
                        f"importing torch maps two NCCL libraries ({', '.join(loaded['libs'])}); {comp.name} refuses a second NCCL in the process",
                        "keep one nvidia-nccl wheel (or one NCCL folder) where torch and the kernels find it",
                    )
                if loaded.get("version") and loaded["version"] != info.nccl["version"]:
                    raise StackError(
                        where,
                        f"torch loads NCCL {loaded['version']} ({', '.join(loaded.get('libs', [])) or '?'}) even with NCCL {info.nccl['version']} from {info.nccl['root']} first on LD_LIBRARY_PATH",
                        "install the newer NCCL where torch finds it (the same environment's nvidia-nccl wheel)",
                    )

    def _check_package(self, comp: Component, info: machine.PythonInfo, name: str) -> None:
        """A wheel the component builds against satisfies the profile's pin of it."""
        pin = next((c for c in self.config.profile.components if c.name == name and c.kind == "pypi"), None)
        have = info.packages.get(pin.url) if pin else None
        if pin and have and not _satisfies(have, pin.ref):
            raise StackError(
                f"component {comp.name}",
                f"builds against {pin.url} {have}; the profile pins {pin.ref}",
                f"pip install '{pin.url}{pin.ref}' (pixi install does)",
            )

    def _nccl_wheel(self, info: machine.PythonInfo) -> str:
        pin = next((c for c in self.config.profile.components if c.name == "nccl" and c.kind == "pypi"), None)
        return (
            pin.url if pin else ("nvidia-nccl-cu13" if (info.torch_cuda or "").startswith("13") else "nvidia-nccl-cu12")
        )

    def _nccl_env(self, info: machine.PythonInfo) -> dict[str, str]:
        """The build's environment with the one NCCL first on LD_LIBRARY_PATH, as env/paths.py orders it."""
        env = dict(self.environ)
        if info.nccl:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                p for p in (str(Path(info.nccl["root"]) / "lib"), env.get("LD_LIBRARY_PATH", "")) if p
            )
        return env

    def _built_nvshmem(self) -> bool:
        manifest = Manifest.load(self.config.prefix) if (self.config.prefix / "manifest.json").is_file() else None
        built = [c for c in selected(self.config.profile, self.config.only) if "NVSHMEM_DIR" in c.exports]
        return bool(built) or any(
            manifest and manifest.live(c.name) for c in self.config.profile.components if "NVSHMEM_DIR" in c.exports
        )

    # ---- one component ------------------------------------------------------------------------------------

    def _build_one(
        self,
        tag: str,
        comp: Component,
        manifest: Manifest,
        archs: machine.ArchList,
        toolkit: machine.Toolkit | None,
        cxx: tuple[str, str] | None,
        info: machine.PythonInfo,
        jobs: int,
    ) -> None:
        cfg = self.config
        where = f"component {comp.name}"
        nvshmem = self._nvshmem(comp, manifest, info) if comp.needs_nvshmem else None
        cmake_flags = self._cmake_flags(comp, toolkit, archs) if comp.build == "cmake" else []
        user_sha = cfg.sha256.get(comp.name)
        inputs = {
            "builder": BUILDER,
            "pin": comp.pin(),
            "sha256": user_sha or comp.sha256,
            "arch_list": archs.value if comp.cuda else None,
            "python": info.soabi,
            "torch": info.torch if comp.needs_torch else None,
            "cuda": toolkit.version if comp.cuda and toolkit else None,
            "nvshmem": nvshmem[1] if nvshmem else None,
            "compiler": cxx[1] if cxx else None,
            "cmake": cmake_flags,
            "nccl": info.nccl if comp.needs_nccl else None,
        }
        input_hash = digest(inputs)
        h12 = input_hash[:12]
        live = manifest.live(comp.name)
        if live and live.input_hash == input_hash and not cfg.force:
            self.out(f"{tag} {comp.name:<14} {short(comp)}  up to date (built {live.built_at}, {live.path})")
            return

        builds, logs = cfg.prefix / "builds", cfg.prefix / "logs"
        builds.mkdir(exist_ok=True)
        logs.mkdir(exist_ok=True)
        staging = builds / f".staging-{comp.name}-{h12}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        src, out_dir = staging / "src", staging / "out"
        log = logs / f"{comp.name}-{h12}.log"
        self.out(f"{tag} {comp.name:<14} {short(comp)}  building (log: {log})")
        start = time.monotonic()
        try:
            if comp.kind == "git":
                submodules = self.cache.checkout(where, comp.url, comp.ref, src, comp.submodules)
            else:
                submodules = {}
                extract(where, self.cache.ensure_tarball(comp, user_sha), src)
            self._apply_patches(comp, src)
            # The log starts once there is a source to build: a refused pin leaves none behind.
            log.write_text(f"# {comp.name} {comp.url} {comp.ref}  inputs {input_hash}\n")
            env = self._env(comp, toolkit, archs, jobs, nvshmem[0] if nvshmem else None, info)
            out_dir.mkdir()
            commands = self._commands(comp, src, out_dir, cmake_flags, jobs)
            for argv in commands:
                self._run(comp.name, argv, env, src, log)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        duration = time.monotonic() - start

        final = builds / f"{comp.name}-{h12}"
        if final.exists():  # the same inputs built again (--force, or a build left behind by a crash)
            old = builds / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(out_dir, final)
        shutil.rmtree(staging, ignore_errors=True)

        entry = Entry(
            name=comp.name,
            kind=comp.kind,
            url=comp.url,
            commit=comp.ref if comp.kind == "git" else None,
            version=comp.ref if comp.kind == "tarball" else None,
            sha256=(user_sha or comp.sha256) if comp.kind == "tarball" else None,
            input_hash=input_hash,
            pin_hash=digest(comp.pin()),
            artifact_sha256=tree_sha256(final),
            built_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            duration_s=round(duration, 1),
            path=f"builds/{final.name}",
            link=comp.name,
            arch_list=archs.value,
            arch_origin=archs.origin,
            flags=self._recorded_flags(comp, env, cmake_flags),
            command=" && ".join(shlex.join(self._shown(argv, staging, final)) for argv in commands),
            submodules=submodules,
            max_jobs=jobs,
            python=f"{info.version} ({info.soabi})",
            torch=info.torch,
            cuda=toolkit.version if comp.cuda and toolkit else None,
            compiler=cxx[1] if cxx else None,
            nvshmem_dir=(nvshmem[0] or nvshmem[1]) if nvshmem else None,
            patches=[{"url": p.url, "sha256": p.sha256} for p in comp.patches],
            nccl=f"{info.nccl['version']} ({info.nccl['root']})" if comp.needs_nccl and info.nccl else None,
            module=comp.module,
            log=f"logs/{log.name}",
            pythonpath=[f"{comp.name}/python"] if (final / "python").is_dir() else [],
            ld_library_path=[f"{comp.name}/{d}" for d in ("lib", "lib64") if (final / d).is_dir()],
            env={
                **{k: os.path.normpath(f"{comp.name}/{v}") for k, v in comp.exports.items()},
                **({comp.jit_cache_env: f"jit-cache/{comp.name}"} if comp.jit_cache_env else {}),
            },
        )
        write_json(final / BUILD_RECORD, asdict(entry))
        previous = manifest.entries.get(comp.name)
        _swap_link(where, cfg.prefix / comp.name, Path("builds") / final.name)
        manifest.entries[comp.name] = entry
        manifest.save()
        keep = {final.name} | ({Path(previous.path).name} if previous else set())
        _prune(builds, comp.name, keep)
        self.out(f"{tag} {comp.name:<14} {short(comp)}  built in {duration:.1f} s -> {cfg.prefix / comp.name}")

    def _nvshmem(self, comp: Component, manifest: Manifest, info: machine.PythonInfo) -> tuple[str | None, str]:
        """(NVSHMEM_DIR, what identifies that NVSHMEM) for a component built against it: a built NVSHMEM
        of this profile, else NVSHMEM_DIR, else the nvidia-nvshmem wheel of the target Python (NVSHMEM_DIR
        None: the component's setup.py finds the wheel)."""
        for other in self.config.profile.components:
            entry = manifest.live(other.name) if "NVSHMEM_DIR" in other.exports else None
            if entry and "NVSHMEM_DIR" in entry.env:
                return str(self.config.prefix / entry.env["NVSHMEM_DIR"]), f"built {entry.artifact_sha256}"
        given = self.environ.get("NVSHMEM_DIR")
        if given:  # its layout was checked before anything compiled (_check_libraries)
            return given, f"dir {given}"
        if info.nvshmem_dir:
            # Left unset: DeepEP's setup.py then finds the wheel itself and links its versioned library
            # (v1 setup.py:20-27; v2 deep_ep/utils/find_pkgs.py), which NVSHMEM_DIR=<wheel> would break for v1.
            version = info.packages.get("nvidia-nvshmem-cu13") or info.packages.get("nvidia-nvshmem-cu12") or "?"
            return None, f"wheel {version} at {info.nvshmem_dir}"
        raise StackError(
            f"component {comp.name}",
            f"needs NVSHMEM and none was found (no built NVSHMEM in {self.config.prefix}, no NVSHMEM_DIR, no nvidia-nvshmem wheel in {info.executable})",
            "install the profile's environment (pixi install), or build NVSHMEM first (--only nvshmem...), or set NVSHMEM_DIR",
        )

    def _cmake_flags(self, comp: Component, toolkit: machine.Toolkit | None, archs: machine.ArchList) -> list[str]:
        env_prefix = self.environ.get("CONDA_PREFIX") or "/usr"
        values = {"cuda_home": toolkit.home if toolkit else "", "cuda_archs": archs.cmake(), "env_prefix": env_prefix}
        flags = [f.format(**values) for f in comp.cmake_flags]
        if any(f.startswith("NVSHMEM_") for f in flags):
            # NVSHMEM uses GDRCopy where its library is present (the guide's container had it).
            home = next(
                (p for p in (env_prefix, "/usr", "/opt/gdrcopy") if Path(p, "include", "gdrapi.h").is_file()), None
            )
            flags += ["NVSHMEM_USE_GDRCOPY=1", f"GDRCOPY_HOME={home}"] if home else ["NVSHMEM_USE_GDRCOPY=0"]
        return flags

    def _env(
        self,
        comp: Component,
        toolkit: machine.Toolkit | None,
        archs: machine.ArchList,
        jobs: int,
        nvshmem_dir: str | None,
        info: machine.PythonInfo,
    ) -> dict[str, str]:
        env = self._nccl_env(info) if comp.needs_nccl else dict(self.environ)
        env.update(comp.build_env)
        env["MAX_JOBS"] = env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(jobs)
        if archs.archs:
            env["TORCH_CUDA_ARCH_LIST"] = archs.value
        if comp.cuda and toolkit:
            env["CUDA_HOME"] = toolkit.home
            env["PATH"] = os.pathsep.join([f"{toolkit.home}/bin", env.get("PATH", "")])
            cccl = _cccl_include(toolkit)
            if cccl:
                # CUDA 13 moved libcu++/CUB/Thrust under include/cccl; vLLM's ep_kernels script adds it to
                # DeepEP's include dirs for CUDA >= 13. Given to nvcc and g++ alike, the source left as it is.
                env["NVCC_APPEND_FLAGS"] = " ".join(f for f in (env.get("NVCC_APPEND_FLAGS", ""), f"-I{cccl}") if f)
                env["CPLUS_INCLUDE_PATH"] = os.pathsep.join(p for p in (cccl, env.get("CPLUS_INCLUDE_PATH", "")) if p)
            stubs = _driver_stubs(toolkit)
            if stubs:
                # DeepEP v2 links -lcuda (setup.py); a build host without the driver has only the toolkit's stub
                # (vLLM's ep_kernels script adds the same folder); it names libcuda.so.1, the driver's, at run time.
                env["LIBRARY_PATH"] = os.pathsep.join(p for p in (env.get("LIBRARY_PATH", ""), stubs) if p)
        if comp.needs_nccl and info.nccl:
            env["EP_NCCL_ROOT_DIR"] = info.nccl["root"]  # DeepEP v2's setup.py persists it for its import
        if comp.jit_cache_env:
            cache = self.config.prefix / "jit-cache" / comp.name
            cache.mkdir(parents=True, exist_ok=True)
            env[comp.jit_cache_env] = str(cache)
        if nvshmem_dir:
            env["NVSHMEM_DIR"] = nvshmem_dir
            env["CMAKE_PREFIX_PATH"] = os.pathsep.join(
                p for p in (f"{nvshmem_dir}/lib/cmake", env.get("CMAKE_PREFIX_PATH", "")) if p
            )
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        return env

    def _commands(
        self, comp: Component, src: Path, out_dir: Path, cmake_flags: list[str], jobs: int
    ) -> list[list[str]]:
        if comp.build == "pip":
            # No isolation: setup.py imports the environment's torch. No deps, no index: nothing else moves.
            return [
                [
                    self.config.python,
                    "-m",
                    "pip",
                    "install",
                    "--no-build-isolation",
                    "--no-deps",
                    "--no-index",
                    "--no-input",
                    "--no-cache-dir",
                    "-v",
                    "--target",
                    str(out_dir / "python"),
                    ".",
                ]
            ]
        build_dir = src / "_build"
        generator = ["-G", "Ninja"] if shutil.which("ninja", path=self.environ.get("PATH")) else []
        configure = [
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build_dir),
            *generator,
            f"-DCMAKE_INSTALL_PREFIX={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
            *(f"-D{f}" for f in cmake_flags),
        ]
        return [
            configure,
            ["cmake", "--build", str(build_dir), "-j", str(jobs)],
            ["cmake", "--install", str(build_dir)],
        ]

    @staticmethod
    def _recorded_flags(comp: Component, env: dict[str, str], cmake_flags: list[str]) -> dict[str, str]:
        keys = [
            *comp.build_env,
            "TORCH_CUDA_ARCH_LIST",
            "CUDA_HOME",
            "NVSHMEM_DIR",
            "MAX_JOBS",
            "NVCC_APPEND_FLAGS",
            "CPLUS_INCLUDE_PATH",
            "LIBRARY_PATH",
            "EP_NCCL_ROOT_DIR",
            *([comp.jit_cache_env] if comp.jit_cache_env else []),
        ]
        flags = {k: env[k] for k in keys if k in env}
        for f in cmake_flags:
            key, _, value = f.partition("=")
            flags[f"-D{key}"] = value
        return flags

    @staticmethod
    def _shown(argv: list[str], staging: Path, final: Path) -> list[str]:
        return [a.replace(str(staging / "out"), str(final)).replace(str(staging / "src"), "<src>") for a in argv]

    def _apply_patches(self, comp: Component, src: Path) -> None:
        """The pin's patches, in order, on the fresh checkout; one that does not apply stops the build."""
        where = f"component {comp.name}"
        for patch in comp.patches:
            path = self.cache.ensure_patch(where, patch)
            for args in (["apply", "--check"], ["apply"]):
                proc = git([*args, str(path)], timeout=120, cwd=src)
                if proc.returncode:
                    raise StackError(
                        where,
                        f"patch {patch.file_name} does not apply to {comp.ref[:12]} ({_first(proc.stderr)})",
                        "pin a patch made for this commit, or drop it from the pin; the previous build is kept",
                    )
            self.out(f"      {comp.name}: applied {patch.file_name} (sha256 {patch.sha256[:12]})")

    def _run(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        """Run one build command into the log, bounded in time, with a heartbeat line while it runs."""
        where = f"component {name}"
        timeout = self.config.timeout_s
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(argv)}\n")
            f.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise StackError(where, f"{argv[0]} is not installed", "install it in the build environment") from None
            start = time.monotonic()
            try:
                while True:
                    left = timeout - (time.monotonic() - start)
                    if left <= 0:
                        _kill(proc)
                        raise StackError(
                            where,
                            f"build took more than {timeout:g} s and was stopped",
                            f"see {log}; give more time with --timeout",
                            code=1,
                        )
                    try:
                        code = proc.wait(timeout=min(self.config.heartbeat_s, left))
                        break
                    except subprocess.TimeoutExpired:
                        self.out(f"      {name}: building, {time.monotonic() - start:.0f} s ({_last_line(log)[:100]})")
            except BaseException:
                _kill(proc)
                raise
        if code:
            raise StackError(
                where,
                f"build failed (exit {code}): {_error_line(log)}",
                f"full log: {log}; the previous build, if any, is kept",
                code=1,
            )


# ---- helpers ----------------------------------------------------------------------------------------------


def _satisfies(version: str, spec: str) -> bool:
    try:
        return Version(version) in SpecifierSet(spec)
    except InvalidVersion:
        return False


def _release(version: str) -> Version:
    """A version without its local build (2.11.0+cu130 is 2.11.0) or pre-release part, for floors."""
    try:
        return Version(Version(version).base_version)
    except InvalidVersion:
        return Version("0")


def _cccl_include(toolkit: machine.Toolkit) -> str | None:
    """<CUDA_HOME>/include/cccl (or conda's targets/<triple>/include/cccl) for CUDA >= 13."""
    if int(toolkit.version.split(".")[0]) < 13:
        return None
    home = Path(toolkit.home)
    for cand in [home / "include" / "cccl", *sorted(home.glob("targets/*/include/cccl"))]:
        if cand.is_dir():
            return str(cand)
    return None


def _driver_stubs(toolkit: machine.Toolkit) -> str | None:
    """The toolkit's stub libcuda.so folder (lib64/stubs, or conda's targets/<triple>/lib/stubs), if any."""
    home = Path(toolkit.home)
    for cand in [home / "lib64" / "stubs", *sorted(home.glob("targets/*/lib/stubs"))]:
        if (cand / "libcuda.so").exists():
            return str(cand)
    return None


def _first(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else "no output"


@contextmanager
def _lock(prefix: Path) -> Iterator[None]:
    """One build per prefix at a time: two would race on the links and the manifest."""
    with open(prefix / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(
                str(prefix), "another `python -m env build` is running on this prefix", "wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _swap_link(where: str, link: Path, target: Path) -> None:
    """Point `link` at `target` in one rename: a reader sees the old build or the new one, never neither."""
    if link.exists() and not link.is_symlink():
        raise StackError(where, f"{link} is a folder, not the link this tool manages", "move it out of the prefix")
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)  # relative: the prefix can be moved or shared as a whole
    os.replace(tmp, link)


def _prune(builds: Path, name: str, keep: set[str]) -> None:
    """Keep the current build and the one before it (a running server may still use it)."""
    mine_re = re.compile(rf"{re.escape(name)}-[0-9a-f]{{12}}")
    for path in builds.iterdir():
        mine = mine_re.fullmatch(path.name) is not None
        if (mine and path.name not in keep) or path.name.startswith(f".old-{name}-"):
            shutil.rmtree(path, ignore_errors=True)


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, size: int = 64 * 1024) -> list[str]:
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - size))
        return [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]


def _last_line(log: Path) -> str:
    lines = _tail(log, 4096)
    return lines[-1] if lines else ""


_DIAGNOSTIC = re.compile(
    r":\d+(:\d+)?: (fatal )?error\b|^CMake Error|\berror: #error|^ERROR: .*\bcompil", re.IGNORECASE
)


def _error_line(log: Path) -> str:
    """The line that says why: the first compiler or cmake error, else the last error line, else the last."""
    lines = [line for line in _tail(log) if not line.startswith("$ ")]
    for line in lines:
        if _DIAGNOSTIC.search(line):
            return line[:240]
    for line in reversed(lines):
        if "error" in line.lower():
            return line[:240]
    return lines[-1][:240] if lines else "no output"
