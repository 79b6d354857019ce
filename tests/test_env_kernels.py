"""What the EP kernels' builds need beyond a plain source build, through the real command line:
patches pinned by URL and sha256 (fetched into the cache, applied, recorded; a wrong checksum or a patch
that no longer applies is one line and the previous build stays), the one NCCL (checked before compiling,
first on LD_LIBRARY_PATH, alone there), NVSHMEM found the way each DeepEP line's setup.py expects, and a CPU
torch refused for CUDA kernels. The package built here is pure Python (pip builds it in a second); the
compiled path is tests/test_env_build.py's, and the real kernels are tests/gpu/test_one_gpu.py's."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from env import machine, nccl
from env.errors import StackError
from env.pins import load_pins
from tests.env_support import COMMIT, build, one_line, pins_file, run_env


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


@pytest.fixture()
def repo(tmp_path) -> dict:
    """A package `kernelpkg` whose VALUE is 1 at commit A and whose file is rewritten at commit B."""
    src = tmp_path / "upstream"
    (src / "kernelpkg").mkdir(parents=True)
    (src / "setup.py").write_text(
        "from setuptools import setup\nsetup(name='kernelpkg', version='1.0', packages=['kernelpkg'])\n"
    )
    (src / "kernelpkg" / "__init__.py").write_text("VALUE = 1\nNAME = 'upstream'\n")
    git(src, "init", "-q")
    git(src, "add", ".")
    git(src, "commit", "-qm", "A")
    a = git(src, "rev-parse", "HEAD")
    (src / "kernelpkg" / "__init__.py").write_text("VALUE = 7\nNAME = 'rewritten'\n")
    git(src, "commit", "-qam", "B")
    return {"url": str(src), "A": a, "B": git(src, "rev-parse", "HEAD")}


def patch_file(tmp_path: Path) -> tuple[Path, str]:
    """A unified diff that turns commit A's VALUE = 1 into VALUE = 2 (it does not apply to B)."""
    path = tmp_path / "patches-host" / "value-fix.patch"
    path.parent.mkdir(exist_ok=True)
    path.write_text(
        "--- a/kernelpkg/__init__.py\n+++ b/kernelpkg/__init__.py\n@@ -1,2 +1,2 @@\n-VALUE = 1\n+VALUE = 2\n NAME = 'upstream'\n"
    )
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def kernel_pins(tmp_path: Path, url: str, ref: str, patch: Path | str, sha: str) -> Path:
    path = tmp_path / "pins.toml"
    path.write_text(f"""[profiles.test]
description = "a patched package"
[[profiles.test.components]]
name = "kernelpkg"
kind = "git"
url = "{url}"
ref = "{ref}"
source = "tests"
build = "pip"
cuda = false
module = "kernelpkg"
patches = [{{url = "{patch if isinstance(patch, str) else patch.as_uri()}", sha256 = "{sha}", source = "tests"}}]
""")
    return path


def imported_value(tmp_path: Path, pins: Path) -> str:
    paths = run_env("paths", "--pins", str(pins), "--profile", "test", "--prefix", str(tmp_path / "stack"))["out"]
    shell = f'{paths}\ncd /\nexec "{sys.executable}" -c "import kernelpkg; print(kernelpkg.VALUE, kernelpkg.NAME)"'
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=120).stdout.strip()


def test_a_pinned_patch_is_fetched_applied_and_recorded(tmp_path, repo):
    patch, sha = patch_file(tmp_path)
    pins = kernel_pins(tmp_path, repo["url"], repo["A"], patch, sha)
    fetched = run_env("fetch", "--pins", str(pins), "--profile", "test", "--cache", str(tmp_path / "cache"))
    assert fetched["code"] == 0 and "kernelpkg      patch value-fix.patch (sha256 verified)" in fetched["out"], fetched
    patch.unlink()  # from here on only the cache holds it
    built = build(tmp_path, pins, "--offline")
    assert built["code"] == 0, built["err"]
    assert "kernelpkg: applied value-fix.patch" in built["out"]
    entry = json.loads((tmp_path / "stack" / "manifest.json").read_text())["entries"]["kernelpkg"]
    assert entry["patches"] == [{"url": patch.as_uri(), "sha256": sha}] and entry["commit"] == repo["A"]
    assert imported_value(tmp_path, pins) == "2 upstream"


@pytest.fixture()
def http_server(tmp_path):
    """Serves tmp_path/patches-host over HTTP on 127.0.0.1, as a patch's upstream host would."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "patches-host"
    folder.mkdir(exist_ok=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_patch_is_downloaded_over_http_and_a_missing_one_is_one_line(tmp_path, repo, http_server):
    patch, sha = patch_file(tmp_path)
    pins = kernel_pins(tmp_path, repo["url"], repo["A"], f"{http_server}/value-fix.patch", sha)
    fetched = run_env("fetch", "--pins", str(pins), "--profile", "test", "--cache", str(tmp_path / "cache"))
    assert fetched["code"] == 0 and "kernelpkg      patch value-fix.patch (sha256 verified)" in fetched["out"], fetched
    assert (tmp_path / "cache" / "patches" / "value-fix.patch").read_bytes() == patch.read_bytes()

    gone = kernel_pins(tmp_path, repo["url"], repo["A"], f"{http_server}/moved.patch", sha)
    result = run_env("fetch", "--pins", str(gone), "--profile", "test", "--cache", str(tmp_path / "cache2"))
    assert result["code"] != 0
    line = one_line(result)
    assert line.startswith(f"error: component kernelpkg: cannot download {http_server}/moved.patch (HTTP Error 404")
    assert not list((tmp_path / "cache2").rglob("*.part"))  # nothing half-written is left to be mistaken for it


def test_a_patch_with_another_checksum_is_refused_before_building(tmp_path, repo):
    patch, sha = patch_file(tmp_path)
    wrong = "0" * 64
    result = build(tmp_path, kernel_pins(tmp_path, repo["url"], repo["A"], patch, wrong))
    assert result["code"] == 2
    assert one_line(result) == (
        f"error: component kernelpkg: checksum mismatch for patch value-fix.patch: got {sha}, expected {wrong}; "
        "the download is corrupt or the pin is wrong: fetch again, or correct the patch's sha256 in the pins"
    )
    assert (
        not (tmp_path / "stack" / "kernelpkg").exists()
        and not (tmp_path / "cache" / "patches" / "value-fix.patch").exists()
    )


def test_a_patch_that_no_longer_applies_is_one_line_and_the_previous_build_stays(tmp_path, repo):
    patch, sha = patch_file(tmp_path)
    assert build(tmp_path, kernel_pins(tmp_path, repo["url"], repo["A"], patch, sha))["code"] == 0
    link_before = os.readlink(tmp_path / "stack" / "kernelpkg")
    moved = kernel_pins(tmp_path, repo["url"], repo["B"], patch, sha)  # the pin moved to B; the patch was made for A
    result = build(tmp_path, moved)
    assert result["code"] == 2
    line = one_line(result)
    assert line.startswith(f"error: component kernelpkg: patch value-fix.patch does not apply to {repo['B'][:12]} (")
    assert line.endswith("pin a patch made for this commit, or drop it from the pin; the previous build is kept")
    assert os.readlink(tmp_path / "stack" / "kernelpkg") == link_before
    assert imported_value(tmp_path, moved) == "2 upstream"
    assert not list((tmp_path / "stack" / "builds").glob(".staging-*"))


def test_a_patch_in_a_pins_file_needs_url_and_sha256(tmp_path):
    path = tmp_path / "pins.toml"
    path.write_text(
        '[profiles.p]\n[[profiles.p.components]]\nname = "x"\nkind = "git"\nurl = "u"\nref = "' + COMMIT + '"\n'
        'source = "s"\nbuild = "pip"\npatches = [{url = "https://example.org/fix.patch"}]\n'
    )
    with pytest.raises(StackError, match=r"profiles.p.components\[0\].patches\[0\] is not a patch table"):
        load_pins(path)


# ---- the one NCCL -------------------------------------------------------------------------------------------


def nccl_dir(root: Path, version: str) -> Path:
    major, minor, patch = version.split(".")
    (root / "include").mkdir(parents=True)
    (root / "lib").mkdir()
    (root / "include" / "nccl.h").write_text(
        f"#define NCCL_MAJOR {major}\n#define NCCL_MINOR {minor}\n#define NCCL_PATCH {patch}\n"
    )
    return root


def nccl_wheel(site: Path, version: str) -> Path:
    """What pip leaves for nvidia-nccl-cu13: nvidia/nccl/{include,lib} and its dist-info."""
    nccl_dir(site / "nvidia" / "nccl", version)
    (site / "nvidia" / "nccl" / "lib" / "libnccl.so.2").write_bytes(b"")
    info = site / f"nvidia_nccl_cu13-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: nvidia-nccl-cu13\nVersion: {version}\n")
    return site


def test_a_kernel_that_needs_a_newer_nccl_is_refused_before_compiling(tmp_path):
    old = nccl_dir(tmp_path / "nccl-2.28.9", "2.28.9")
    result = build(tmp_path, pins_file(tmp_path, needs_nccl=">=2.30.4"), env={"EP_NCCL_ROOT_DIR": str(old)})
    assert result["code"] == 2
    wheel = (
        "nvidia-nccl-cu13"
        if (machine.probe_python(sys.executable, []).torch_cuda or "").startswith("13")
        else "nvidia-nccl-cu12"
    )
    assert one_line(result) == (
        f"error: component tinyext: needs NCCL >=2.30.4 at build and run time; the environment has NCCL 2.28.9 (EP_NCCL_ROOT_DIR={old}); "
        f"install one NCCL >=2.30.4 that torch and tinyext both load: pip install '{wheel}>=2.30.4' --no-deps (or set EP_NCCL_ROOT_DIR)"
    )
    assert "nccl         : 2.28.9" in result["out"]


def test_the_newer_nccl_comes_first_on_ld_library_path_and_alone(tmp_path):
    newer, older = nccl_wheel(tmp_path / "newer-site", "2.32.3"), nccl_wheel(tmp_path / "image-site", "2.28.9")
    found = nccl.find([str(newer), str(older)], environ={})
    assert (found.version, found.root) == ("2.32.3", str(newer / "nvidia" / "nccl"))
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent), str(newer), str(older)])}
    shell = run_env("paths", "--profile", "vllm026", "--prefix", str(tmp_path / "stack"), env=env)["out"]
    libs = (
        next(line for line in shell.splitlines() if line.startswith("export LD_LIBRARY_PATH="))
        .split("=", 1)[1]
        .split('"')[0]
        .strip("'")
        .split(":")
    )
    assert libs[0] == str(newer / "nvidia" / "nccl" / "lib")
    assert str(older / "nvidia" / "nccl" / "lib") not in libs
    assert "NVSHMEM_DIR" not in shell  # never the pip wheel's folder: DeepEP v1 links a name the wheel lacks


def test_nccl_version_comes_from_its_header():
    assert nccl.header_version("/nonexistent") is None


# ---- NVSHMEM as each DeepEP line's setup.py finds it; torch built for CUDA -----------------------------------


def test_deepep_v1_is_refused_an_nvshmem_dir_without_the_unversioned_library(tmp_path):
    wheel_like = tmp_path / "nvshmem"
    (wheel_like / "include").mkdir(parents=True)
    (wheel_like / "lib").mkdir()
    (wheel_like / "lib" / "libnvshmem_host.so.3").write_bytes(b"")
    result = build(
        tmp_path,
        pins_file(tmp_path, needs_nvshmem=True, nvshmem_unversioned=True),
        env={"NVSHMEM_DIR": str(wheel_like)},
    )
    assert result["code"] == 2
    assert one_line(result) == (
        f"error: component tinyext: NVSHMEM_DIR={wheel_like} has no lib/libnvshmem_host.so, the name this commit's setup.py links when "
        "NVSHMEM_DIR is set; unset NVSHMEM_DIR so that its setup.py finds the nvidia-nvshmem wheel itself, or point it at an NVSHMEM install"
    )


def test_cuda_kernels_are_refused_a_cpu_torch(tmp_path):
    info = machine.probe_python(sys.executable, [])
    if info.torch_cuda:
        pytest.skip("torch here is a CUDA build")
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "include").mkdir()
    (cuda / "include" / "cuda_runtime.h").write_text("")
    nvcc = cuda / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n"
    )  # a toolkit is found; none compiles here
    nvcc.chmod(0o755)
    result = build(
        tmp_path, pins_file(tmp_path, cuda=True, needs_torch=True), "--arch", "9.0", env={"CUDA_HOME": str(cuda)}
    )
    assert result["code"] == 2
    assert one_line(result) == (
        f"error: component tinyext: torch {info.torch} in {sys.executable} is a CPU build; CUDA kernels need torch "
        "built for CUDA 13.0; install the profile's CUDA torch (pixi install)"
    )


@pytest.mark.parametrize(
    ("line", "version"),
    [
        ("g++-real (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0", (13, 3, 0)),  # the GPU machine's
        ("x86_64-conda-linux-gnu-c++ (conda-forge gcc 14.2.0-2) 14.2.0", (14, 2, 0)),
        ("Ubuntu clang version 18.1.3 (1ubuntu1)", None),
    ],
)
def test_compiler_versions_are_read_from_their_first_line(line, version):
    assert machine.cxx_version(line) == version


# ---- the profile names ---------------------------------------------------------------------------------------


def test_paths_takes_pins_and_refuses_an_unknown_profile_in_one_line(tmp_path):
    pins = pins_file(tmp_path)
    ok = run_env("paths", "--pins", str(pins), "--profile", "test", "--prefix", str(tmp_path / "stack"))
    assert ok["code"] == 0 and ok["out"].startswith("# stack paths: profile test")
    bad = run_env("paths", env={"EP_STACK_PROFILE": "nope"})
    assert bad["code"] == 2
    assert one_line(bad) == "error: EP_STACK_PROFILE: 'nope' is not a profile; choose one of current, seed, vllm026"


# ---- the toolkit and the compiler against torch's CUDA, as the GPU machine reports them ----------------------

GPU_MACHINE_TORCH = machine.PythonInfo(  # what the probe read on the H200 machine's image
    executable="/opt/torch/.venv/bin/python3",
    version="3.12",
    soabi="cpython-312-x86_64-linux-gnu",
    torch="2.11.0+cu130",
    torch_cuda="13.0",
    gcc_bounds={"12.8": [[6, 0, 0], [15, 0]], "13.0": [[6, 0, 0], [16, 0]]},
)
GPU_MACHINE_GXX = ("/usr/bin/g++", "g++-real (Ubuntu 13.3.0-6ubuntu2~24.04) 13.3.0")


def check(tmp_path: Path, toolkit: machine.Toolkit, cxx: tuple[str, str]) -> None:
    from env.build import BuildConfig, Builder
    from env.pins import VLLM026

    builder = Builder(BuildConfig(profile=VLLM026, prefix=tmp_path / "stack", cache=tmp_path / "cache"), environ={})
    builder._check(VLLM026.component("deepep"), machine.ArchList(("9.0",), "--arch"), toolkit, cxx, GPU_MACHINE_TORCH)


def test_the_gpu_machines_toolkit_and_compiler_pass(tmp_path):
    check(tmp_path, machine.Toolkit("/usr/local/cuda", "13.0"), GPU_MACHINE_GXX)


def test_a_toolkit_of_another_cuda_major_than_torchs_is_refused(tmp_path):
    with pytest.raises(StackError) as err:
        check(tmp_path, machine.Toolkit("/usr/local/cuda-12.8", "12.8"), GPU_MACHINE_GXX)
    assert str(err.value) == (
        "component deepep: the CUDA toolkit 12.8 at /usr/local/cuda-12.8 does not match torch 2.11.0+cu130 (built for "
        "CUDA 13.0); install cuda-nvcc 13.0 (the profile's environment has it) or set CUDA_HOME to a CUDA 13.x toolkit"
    )


def test_a_compiler_outside_torchs_bounds_for_that_cuda_is_refused(tmp_path):
    with pytest.raises(
        StackError,
        match=r"the C\+\+ compiler g\+\+ \(GCC\) 16.1.0 is outside what torch accepts for CUDA 13.0 \(g\+\+ >= 6.0.0, < 16.0;",
    ):
        check(tmp_path, machine.Toolkit("/usr/local/cuda", "13.0"), ("/usr/bin/g++", "g++ (GCC) 16.1.0"))


def test_deepep_v2_is_refused_a_torch_older_than_its_readme_asks(tmp_path):
    """DeepEP v2 (the current profile's pin) states "PyTorch 2.10 and above"; the check runs before compiling."""
    from dataclasses import replace

    from env.build import BuildConfig, Builder
    from env.pins import CURRENT

    builder = Builder(BuildConfig(profile=CURRENT, prefix=tmp_path / "stack", cache=tmp_path / "cache"), environ={})
    deepep = CURRENT.component("deepep")
    toolkit, archs = machine.Toolkit("/usr/local/cuda", "13.0"), machine.ArchList(("9.0",), "--arch")
    older = replace(GPU_MACHINE_TORCH, torch="2.9.1+cu130")
    with pytest.raises(StackError) as err:
        builder._check(deepep, archs, toolkit, GPU_MACHINE_GXX, older)
    assert str(err.value) == (
        "component deepep: needs torch >= 2.10 (its README's requirements), /opt/torch/.venv/bin/python3 has torch "
        "2.9.1+cu130; install the profile's torch (pixi install), or a profile whose DeepEP line supports torch 2.9.1+cu130"
    )
    builder._check(deepep, archs, toolkit, GPU_MACHINE_GXX, GPU_MACHINE_TORCH)  # the GPU machine's 2.11.0+cu130


def test_a_cuda_13_build_gets_the_cccl_headers_and_the_driver_stub(tmp_path):
    """CUDA 13 moved libcu++ under include/cccl; DeepEP v2 links -lcuda, which a build host without the driver
    finds only as the toolkit's stub (vLLM's ep_kernels script adds both)."""
    from env.build import BuildConfig, Builder
    from env.pins import CURRENT

    cuda = tmp_path / "cuda"
    (cuda / "include" / "cccl").mkdir(parents=True)
    (cuda / "lib64" / "stubs").mkdir(parents=True)
    (cuda / "lib64" / "stubs" / "libcuda.so").write_text("")
    builder = Builder(
        BuildConfig(profile=CURRENT, prefix=tmp_path / "stack", cache=tmp_path / "cache"),
        environ={"LIBRARY_PATH": "/opt/mine"},
    )
    archs = machine.ArchList(("9.0",), "--arch")
    env = builder._env(
        CURRENT.component("deepep"), machine.Toolkit(str(cuda), "13.0"), archs, 4, None, GPU_MACHINE_TORCH
    )
    assert env["NVCC_APPEND_FLAGS"] == f"-I{cuda}/include/cccl"
    assert env["LIBRARY_PATH"] == f"/opt/mine:{cuda}/lib64/stubs"  # the user's own first
    assert env["EP_JIT_CACHE_DIR"] == str(tmp_path / "stack" / "jit-cache" / "deepep")


def test_deepep_v1_is_refused_an_nvshmem_wheel_other_than_the_profiles_pin(tmp_path):
    """vllm026 pins nvidia-nvshmem-cu13==3.4.5 (torch 2.11's image); DeepEP's setup.py would build against
    whatever wheel is installed, so another one is named before compiling."""
    from dataclasses import replace

    from env.build import BuildConfig, Builder
    from env.pins import VLLM026

    builder = Builder(BuildConfig(profile=VLLM026, prefix=tmp_path / "stack", cache=tmp_path / "cache"), environ={})
    older = replace(GPU_MACHINE_TORCH, nvshmem_dir="/site/nvidia/nvshmem", packages={"nvidia-nvshmem-cu13": "3.3.20"})
    with pytest.raises(StackError) as err:
        builder._check_libraries(VLLM026.component("deepep"), older)
    assert str(err.value) == (
        "component deepep: builds against nvidia-nvshmem-cu13 3.3.20; the profile pins ==3.4.5; "
        "pip install 'nvidia-nvshmem-cu13==3.4.5' (pixi install does)"
    )
    pinned = replace(older, packages={"nvidia-nvshmem-cu13": "3.4.5"})
    builder._check_libraries(VLLM026.component("deepep"), pinned)  # the pinned wheel passes
