"""Bad input to `python -m env` is one line naming the component and the fix, exit code 2, no traceback,
and nothing is built; plus the pins' own rules, the arch list and job sizing, the prefix layout that
`stack_paths` reads, and the source cache's tarball checks. Nothing here compiles."""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from env import machine
from env.errors import StackError
from env.fetch import SourceCache, _resolve_url, extract
from env.manifest import Entry, Manifest, tree_sha256
from env.paths import stack_paths
from env.pins import PROFILES, Component, load_pins
from tests.conftest import ROOT
from tests.env_support import COMMIT, build, one_line, pins_file, run_env

# ---- bad input, through the real command line ---------------------------------------------------------------

BAD_BUILDS = [
    pytest.param(
        {"archs": ["9.0", "10.0"]},
        ["--arch", "8.0"],
        {},
        "error: component tinyext: GPU arch 8.0 (--arch) is not supported by these sources (they build for 9.0, 10.0); build for a supported arch with --arch, or pin a commit that supports it",
        id="unsupported-arch",
    ),
    pytest.param(
        {"cuda": True},
        [],
        {"CUDA_HOME": "/nonexistent/cuda"},
        "error: component tinyext: no GPU arch to build for",
        id="no-arch",
    ),
    pytest.param(
        {"cuda": True},
        ["--arch", "9.0"],
        {"CUDA_HOME": "/nonexistent/cuda"},
        "error: component tinyext: CUDA_HOME=/nonexistent/cuda has no bin/nvcc and CUDA headers; install cuda-nvcc",
        id="no-cuda-toolkit",
    ),
    pytest.param(
        {},
        [],
        {"CXX": "/nonexistent/bin/c++"},
        "error: component tinyext: the C++ compiler CXX=/nonexistent/bin/c++ does not run; install one",
        id="no-compiler",
    ),
    pytest.param(
        {"build": "cmake"},
        [],
        {"PATH": "<only c++>"},
        "error: component tinyext: cmake is not on PATH; install cmake",
        id="no-cmake",
    ),
    pytest.param(
        {"needs_nvshmem": True},
        [],
        {"NVSHMEM_DIR": "/nonexistent/nvshmem"},
        "error: component tinyext: NVSHMEM_DIR=/nonexistent/nvshmem has no include/ folder",
        id="bad-nvshmem-dir",
    ),
    pytest.param(
        {"ref": "c18eabd"},
        [],
        {},
        "error: component tinyext: commit 'c18eabd' is not a full 40-hex commit; pin the full commit hash",
        id="short-commit",
    ),
    pytest.param(
        {"kind": "svn"},
        [],
        {},
        "error: component tinyext: kind 'svn' is unknown; use one of git, tarball, pypi, conda",
        id="unknown-kind",
    ),
]


@pytest.mark.parametrize(("fields", "args", "env", "expected"), BAD_BUILDS)
def test_bad_build_input_is_one_line_with_the_fix(tmp_path, fields, args, env, expected):
    if env.get("PATH") == "<only c++>":  # a PATH with the compiler and nothing else
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "c++").symlink_to(shutil.which("c++") or shutil.which("g++"))
        env = {"PATH": str(tmp_path / "bin")}
    result = build(tmp_path, pins_file(tmp_path, **fields), *args, env=env)
    assert result["code"] == 2, result
    assert one_line(result).startswith(expected)
    assert not (tmp_path / "stack" / "builds").exists()  # refused before anything was built


def test_no_nvshmem_found_names_the_ways_to_get_one(tmp_path):
    python = sys.executable
    probe = machine.probe_python(python, [])
    if probe.nvshmem_dir:
        pytest.skip("an nvidia-nvshmem wheel is installed here")
    line = one_line(build(tmp_path, pins_file(tmp_path, needs_nvshmem=True)))
    assert line.startswith("error: component tinyext: needs NVSHMEM and none was found")
    assert "pixi install" in line and "NVSHMEM_DIR" in line


def test_torch_missing_from_the_target_python_is_named(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    result = build(tmp_path, pins_file(tmp_path, needs_torch=True), "--python", str(venv / "bin" / "python"))
    line = one_line(result)
    assert result["code"] == 2
    assert line.startswith(
        f"error: component tinyext: its setup.py imports torch, which {venv}/bin/python cannot (ModuleNotFoundError"
    )
    assert "install the profile's torch first" in line


def test_unknown_profile_and_malformed_options(tmp_path):
    assert (
        one_line(run_env("status", "--profile", "nope"))
        == "error: --profile: 'nope' is not a profile; choose one of current, seed, vllm026"
    )
    bad = run_env("fetch", "--profile", "seed", "--cache", str(tmp_path), "--sha256", "nvshmem=xyz")
    assert bad["code"] == 2 and one_line(bad).startswith("error: --sha256: 'nvshmem=xyz' is not NAME=HEX")


def test_pins_file_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "pins.toml"
    path.write_text(
        '[profiles.test]\nvllm = "1"\n[[profiles.test.components]]\nname = "x"\nkind = "git"\nurl = "u"\nref = "r"\ncolour = "red"\n'
    )
    with pytest.raises(StackError) as err:
        load_pins(path)
    assert str(err.value).startswith(f"{path}: profiles.test.components[0].colour is not a component field")
    path.write_text("[profiles.test\n")
    with pytest.raises(StackError, match="is not valid TOML"):
        load_pins(path)


def test_a_manifest_the_toolkit_did_not_write_is_left_alone(tmp_path):
    (tmp_path / "manifest.json").write_text('{"mine": 1}\n')
    with pytest.raises(StackError) as caught:
        Manifest.load(tmp_path)
    assert "is not a build manifest of this toolkit" in str(caught.value)
    assert Manifest.load(tmp_path, strict=False).entries == {}  # the launcher reads on, finding nothing
    assert (tmp_path / "manifest.json").read_text() == '{"mine": 1}\n'


def test_the_manifest_is_marked_as_the_toolkits(tmp_path):
    Manifest(tmp_path, "current", {}).save()
    assert json.loads((tmp_path / "manifest.json").read_text())["tool"] == "vllm-ep-deploy"
    assert Manifest.load(tmp_path).profile == "current"


def test_concurrent_build_on_one_prefix_is_refused(tmp_path):
    prefix = tmp_path / "stack"
    prefix.mkdir()
    with open(prefix / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = build(tmp_path, pins_file(tmp_path))
    assert result["code"] == 2
    assert (
        one_line(result)
        == f"error: {prefix}: another `python -m env build` is running on this prefix; wait for it to finish"
    )


# ---- tarballs: verified by sha256, or refused -----------------------------------------------------------------


@pytest.fixture
def tarball(tmp_path) -> tuple[Path, str]:
    src = tmp_path / "nvshmem_src-1.0"
    src.mkdir()
    (src / "CMakeLists.txt").write_text("project(x)\n")
    path = tmp_path / "upstream" / "nvshmem_src-1.0.tar.gz"
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_unverified_tarball_is_refused_until_the_user_vouches_for_it(tmp_path, tarball):
    path, digest = tarball
    pins = pins_file(tmp_path, name="nvshmem", kind="tarball", url=path.as_uri(), ref="1.0", build="cmake")
    cache = tmp_path / "cache"
    first = run_env("fetch", "--pins", str(pins), "--profile", "test", "--cache", str(cache))
    assert first["code"] == 2
    assert one_line(first) == (
        f"error: component nvshmem: nvshmem_src-1.0.tar.gz has no verified sha256 in the pins (the downloaded file's is {digest}); "
        f"compare it with the publisher's checksum, then pass --sha256 nvshmem={digest} (or set sha256 in the pins)"
    )
    path.unlink()  # the second call needs no download: the cache holds the file
    second = run_env(
        "fetch", "--pins", str(pins), "--profile", "test", "--cache", str(cache), "--sha256", f"nvshmem={digest}"
    )
    assert second["code"] == 0, second["err"]
    assert "nvshmem_src-1.0.tar.gz (sha256 verified)" in second["out"]


def test_checksum_mismatch_is_refused_and_the_file_dropped(tmp_path, tarball):
    path, digest = tarball
    wrong = "0" * 64
    comp = Component(
        name="nvshmem", kind="tarball", url=path.as_uri(), ref="1.0", source="tests", sha256=wrong, build="cmake"
    )
    cache = SourceCache(tmp_path / "cache")
    with pytest.raises(StackError) as err:
        cache.ensure_tarball(comp, None)
    assert str(err.value) == (
        f"component nvshmem: checksum mismatch for nvshmem_src-1.0.tar.gz: got {digest}, expected {wrong}; "
        "the download is corrupt or the pin is wrong: fetch again, or correct sha256 in the pins"
    )
    assert not cache.tarball_path(comp.url).exists()
    offline = SourceCache(tmp_path / "cache", offline=True)
    with pytest.raises(StackError, match="is not in the source cache"):
        offline.ensure_tarball(comp, digest)


def test_extract_drops_the_archives_top_folder(tmp_path, tarball):
    path, _ = tarball
    extract("component x", path, tmp_path / "src")
    assert (tmp_path / "src" / "CMakeLists.txt").is_file()


def test_submodule_urls_resolve_like_git():
    assert (
        _resolve_url("https://github.com/deepseek-ai/DeepEP.git", "../fmtlib/fmt.git")
        == "https://github.com/deepseek-ai/fmtlib/fmt.git"
    )
    assert _resolve_url("/srv/git/DeepEP.git", "../fmt.git") == "/srv/git/fmt.git"
    assert (
        _resolve_url("/srv/git/DeepEP.git", "https://github.com/fmtlib/fmt.git") == "https://github.com/fmtlib/fmt.git"
    )


# ---- the pins ---------------------------------------------------------------------------------------------------

GUIDE = {  # aws-samples/awsome-inference 2.projects/vllm-ep/README.md, step 2
    "deepep": "c18eabdebf1381978ff884d278f6083a6153be3f",
    "pplx-kernels": "12cecfda252e4e646417ac263d96e994d476ee5d",
    "deepgemm": "ea9c5d9270226c5dd7a577c212e9ea385f6ef048",
    "nvshmem": "3.3.9",
    "nccl": "2.27.7.*",
}


@pytest.mark.parametrize("name", sorted(GUIDE))
def test_seed_is_exactly_the_guides_stack(name):
    seed = PROFILES["seed"]
    assert (seed.vllm, seed.torch) == ("0.10.1.1", "2.7.1")
    assert seed.component(name).ref == GUIDE[name]


def test_current_follows_vllms_ep_kernels():
    current = PROFILES["current"]
    assert (current.vllm, current.torch) == ("0.33.0", "2.14.0")
    assert current.component("deepep").ref == "d4f41e4e93602a15e95f55f6ee8df8f1aaa0e4bb"
    assert current.component("nccl").ref == ">=2.30.4"  # DeepEP v2
    assert current.pypi_pins()["nixl"].startswith("==1.5.")
    assert "pplx-kernels" not in {c.name for c in current.components}  # vLLM removed the backend


@pytest.mark.parametrize("comp", [c for p in PROFILES.values() for c in p.components], ids=lambda c: c.name)
def test_every_pin_says_where_it_came_from(comp):
    assert comp.source.strip()
    if comp.kind == "tarball" and comp.sha256 is None:
        assert "sha256" in comp.note  # an unverified checksum is said plainly
    if comp.is_source and comp.cuda:
        assert {"CUDA_HOME", "TORCH_CUDA_ARCH_LIST"} <= set(comp.needs_env)


def test_pins_command_prints_every_component_with_its_source():
    result = run_env("pins", "--profile", "seed", "--format", "json")
    data = json.loads(result["out"])
    assert [c["name"] for c in data["components"]] == [c.name for c in PROFILES["seed"].components]
    assert all(c["source"] for c in data["components"])


# ---- arch list and job sizing -------------------------------------------------------------------------------


def test_arch_list_spellings():
    archs = machine.parse_archs("9.0a+PTX;10.0 12.0f", "--arch")
    assert archs.value == "9.0a+PTX;10.0;12.0f"
    assert archs.bases == ("9.0", "10.0", "12.0")
    assert archs.cmake() == "90a;100;120f"
    with pytest.raises(StackError, match="is not a TORCH_CUDA_ARCH_LIST entry"):
        machine.parse_archs("sm_90", "--arch")


def test_arch_list_from_the_deploy_file_when_no_gpu_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "nvml_archs", lambda: None)
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("model: m\nnodes: [{address: 10.0.0.1}]\nenv:\n  TORCH_CUDA_ARCH_LIST: '9.0'\n")
    found = machine.resolve_archs(None, deploy, {})
    assert (found.value, found.origin) == ("9.0", f"{deploy}: env.TORCH_CUDA_ARCH_LIST")
    assert machine.resolve_archs("10.0", deploy, {}).value == "10.0"  # --arch wins
    monkeypatch.setattr(machine, "nvml_archs", lambda: machine.ArchList(("9.0",), "NVML: 8 x NVIDIA H200"))
    assert machine.resolve_archs(None, None, {}).origin == "NVML: 8 x NVIDIA H200"


def test_the_deploy_file_is_read_as_the_launcher_reads_it(tmp_path):
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text("model: m\nnodes: [{address: 10.0.0.1}]\nenv: {TORCH_CUDA_ARCH_LIST: '9.0'}\nbogus: 1\n")
    result = build(tmp_path, pins_file(tmp_path), "--deploy", str(deploy))
    assert one_line(result).startswith(f"error: --deploy: {deploy}: bogus: unknown key (expected one of: model,")


def test_max_jobs_fits_cores_and_memory(monkeypatch):
    monkeypatch.setattr(machine, "cores", lambda: 32)
    monkeypatch.setattr(machine, "available_memory", lambda: 40 * machine.GIB)
    assert machine.max_jobs(True, None, {})[0] == 10  # 4 GiB a CUDA job
    assert machine.max_jobs(False, None, {})[0] == 32
    assert machine.max_jobs(True, None, {"MAX_JOBS": "3"}) == (3, "MAX_JOBS")
    assert machine.max_jobs(True, 7, {"MAX_JOBS": "3"}) == (7, "--jobs")
    monkeypatch.setattr(machine, "available_memory", lambda: machine.GIB)
    assert machine.max_jobs(True, None, {})[0] == 1


# ---- the prefix layout stack_paths reads --------------------------------------------------------------------


def fake_build(prefix: Path, name: str, dirs: tuple[str, ...], env: dict[str, str] | None = None) -> None:
    build = prefix / "builds" / f"{name}-0123456789ab"
    for d in dirs:
        (build / d).mkdir(parents=True)
    (prefix / name).symlink_to(Path("builds") / build.name)
    manifest = Manifest.load(prefix)
    manifest.entries[name] = Entry(
        name=name,
        kind="git",
        url="u",
        commit=COMMIT,
        version=None,
        sha256=None,
        input_hash="i",
        pin_hash="p",
        artifact_sha256=tree_sha256(build),
        built_at="2026-11-22T00:00:00Z",
        duration_s=1.0,
        path=f"builds/{build.name}",
        link=name,
        arch_list="9.0",
        arch_origin="--arch",
        pythonpath=[f"{name}/python"] if "python" in dirs else [],
        ld_library_path=[f"{name}/lib"] if "lib" in dirs else [],
        env=env or {},
    )
    manifest.save()


def test_stack_paths_reads_the_manifest(tmp_path):
    prefix = tmp_path / "stack"
    fake_build(prefix, "nvshmem-src", ("lib", "include"), {"NVSHMEM_DIR": "nvshmem-src"})
    fake_build(prefix, "deepep", ("python",))
    paths = stack_paths("current", prefix)
    assert str(prefix / "deepep" / "python") in paths.pythonpath
    assert str(prefix / "nvshmem-src" / "lib") in paths.ld_library_path
    assert paths.env["NVSHMEM_DIR"] == str(prefix / "nvshmem-src")
    shell = run_env("paths", "--profile", "current", "--prefix", str(prefix))["out"]
    assert f'export PYTHONPATH={prefix}/deepep/python"${{PYTHONPATH:+:$PYTHONPATH}}"' in shell
    assert f"export NVSHMEM_DIR={prefix}/nvshmem-src" in shell


def test_a_build_whose_folder_is_gone_is_not_on_the_paths_and_status_says_missing(tmp_path):
    prefix = tmp_path / "stack"
    fake_build(prefix, "deepep", ("python",))
    (prefix / "deepep").unlink()
    assert str(prefix / "deepep" / "python") not in stack_paths("current", prefix).pythonpath
    status = run_env("status", "--profile", "current", "--prefix", str(prefix))
    row = next(line for line in status["out"].splitlines() if line.strip().startswith("deepep"))
    assert "missing" in row and "build folder or link is gone" in row and status["code"] == 1


def test_a_broken_manifest_never_breaks_the_launcher_but_status_names_it(tmp_path):
    prefix = tmp_path / "stack"
    prefix.mkdir()
    (prefix / "manifest.json").write_text("{not json")
    assert stack_paths("current", prefix).pythonpath == []
    result = run_env("status", "--profile", "current", "--prefix", str(prefix))
    assert result["code"] == 2
    assert one_line(result).startswith(f"error: {prefix}/manifest.json: is not a readable build manifest")


def test_a_hand_made_folder_where_the_link_goes_is_not_replaced(tmp_path):
    from env.build import _swap_link

    (tmp_path / "deepep").mkdir()
    with pytest.raises(StackError, match="is a folder, not the link this tool manages"):
        _swap_link("component deepep", tmp_path / "deepep", Path("builds/deepep-0123456789ab"))


def test_vllm026_is_the_images_stack_with_the_deepep_vllm_pinned_before_v2():
    image = PROFILES["vllm026"]
    assert (image.vllm, image.torch, image.cuda) == ("0.26.0", "2.11.0", "13.0")
    deepep = image.component("deepep")
    assert deepep.ref == "73b6ea4a439ba03a695563f9fd242c8e4b02b37c"
    assert deepep.nvshmem_unversioned and not deepep.needs_nccl and not deepep.patches
    assert image.pypi_pins()["nvidia-nccl-cu13"] == "==2.28.9"  # torch 2.11's own: DeepEP v1 does not link NCCL


def test_current_deepep_carries_vllms_patch_and_its_runtime_needs():
    deepep = PROFILES["current"].component("deepep")
    assert [(p.file_name, p.sha256[:12]) for p in deepep.patches] == [
        ("deepep-gin-barrier-data-visibility.patch", "fbde7fef0cd1")
    ]
    assert deepep.needs_nccl == ">=2.30.4" and deepep.jit_cache_env == "EP_JIT_CACHE_DIR"
    assert "patches" in deepep.pin()  # a changed patch means a rebuild


def test_a_stopped_build_stops_its_compiler_and_keeps_the_prefix(tmp_path):
    """SIGTERM (a scheduler's stop) or SIGHUP (a closed terminal) ends the build like Ctrl-C: the compiler,
    in a process group of its own, is stopped too, and nothing is recorded as built."""
    import os
    import signal
    import time

    src = tmp_path / "slowext"
    src.mkdir()
    (src / "setup.py").write_text(
        "import os, pathlib, time\n"
        "pathlib.Path(os.environ['EP_TEST_PIDFILE']).write_text(str(os.getpid()))\n"
        "time.sleep(300)\n"
    )
    ident = ["-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], [*ident, "commit", "-q", "-m", "slow"]):
        subprocess.run(["git", *args], cwd=src, check=True, capture_output=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, check=True, capture_output=True, text=True)
    pins = pins_file(tmp_path, url=str(src), ref=commit.stdout.strip())
    pidfile = tmp_path / "compiler.pid"
    for sig in (signal.SIGTERM, signal.SIGHUP):
        pidfile.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EP_TEST_PIDFILE": str(pidfile)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "env", "build", "--pins", str(pins), "--profile", "test",
             "--prefix", str(tmp_path / "stack"), "--cache", str(tmp_path / "cache")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while not pidfile.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert pidfile.exists(), proc.communicate()[1]
        compiler = int(pidfile.read_text())
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        assert err.strip().splitlines()[-1] == f"error: {sig.name}: stopped; the previous builds are kept"
        gone = time.monotonic() + 20
        while time.monotonic() < gone and os.path.exists(f"/proc/{compiler}"):
            time.sleep(0.2)
        assert not os.path.exists(f"/proc/{compiler}"), f"the compiler ({compiler}) outlived a {sig.name}"
        assert not Manifest.load(tmp_path / "stack").entries
