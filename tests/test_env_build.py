"""The EP-kernel build path, for real on a CPU: a git repository made here holds a real torch C++
extension (an op registered with TORCH_LIBRARY, like vLLM's own _C, built by a setup.py with
torch.utils.cpp_extension.CppExtension) and a git submodule (a header, as DeepEP and DeepGEMM have
third-party/ submodules). `python -m env` fetches it at a pinned commit into a source cache, builds it
with `pip install --no-build-isolation --no-deps --target` as DeepEP is built, records it in the
manifest, imports it through the printed PYTHONPATH in a fresh process and calls the op.

The story runs once per test run (two compiles, about 15 s each on 2 cores), whichever xdist worker
gets there first; the tests below each assert one part of it:

1. fetch commit A with the repositories reachable; move them away; build A --offline from the cache;
2. build again: nothing to do; a commit not in the cache, online: "cannot reach", one line;
3. repositories back: a commit that does not exist: refused in one line, exit 2;
4. pin B: rebuilt (the new C++ is what runs);
5. pin C, whose C++ does not compile: exit 1, its log named, B still importable and recorded.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from tests.env_support import run_env

pytest.importorskip("torch")

GIT_ID = [
    "-c",
    "user.name=env tests",
    "-c",
    "user.email=env-tests@example.invalid",
    "-c",
    "protocol.file.allow=always",
    "-c",
    "init.defaultBranch=main",
]

SETUP_PY = """\
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))

setup(
    name="tinyext",
    version="0.1",
    packages=["tinyext"],
    ext_modules=[CppExtension("tinyext._C", ["csrc/ext.cpp"], include_dirs=[os.path.join(HERE, "third-party", "tinyhdr")], extra_compile_args=["-O0"])],
    cmdclass={"build_ext": BuildExtension},
)
"""

INIT_PY = """\
import torch

from . import _C  # noqa: F401  (loading it registers torch.ops.tinyext)

VERSION = "{version}"


def twice(x):
    return torch.ops.tinyext.twice(x)
"""

EXT_CPP = """\
{prologue}#include <Python.h>
#include <torch/library.h>
#include <ATen/core/Tensor.h>

#include "scale.h"

static at::Tensor twice(const at::Tensor& x) {{ return {body}; }}

TORCH_LIBRARY(tinyext, m) {{ m.def("twice(Tensor x) -> Tensor"); }}
TORCH_LIBRARY_IMPL(tinyext, CPU, m) {{ m.impl("twice", &twice); }}

static struct PyModuleDef module_def = {{PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr}};
PyMODINIT_FUNC PyInit__C(void) {{ return PyModule_Create(&module_def); }}
"""


def git(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(["git", *GIT_ID, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


@dataclass(frozen=True)
class Repo:
    remote: Path
    """Folder holding the bare repositories (tinyext.git and its submodule tinyhdr.git)."""
    url: str
    commits: dict[str, str]
    """A, B (good), C (does not compile)."""
    work: Path
    """The clone the commits were made in."""


def make_repo(root: Path) -> Repo:
    """Two bare repositories under root/remote: tinyhdr (a header) and tinyext (the extension, with
    tinyhdr as a submodule at a relative URL, as GitHub projects do)."""
    remote, work = root / "remote", root / "work"
    remote.mkdir(parents=True)
    git("init", "--quiet", "--bare", str(remote / "tinyhdr.git"))
    git("init", "--quiet", "--bare", str(remote / "tinyext.git"))
    git("clone", "--quiet", str(remote / "tinyhdr.git"), str(work / "tinyhdr"))
    (work / "tinyhdr" / "scale.h").write_text("#pragma once\nconstexpr int kScale = 2;\n")
    git("add", "-A", cwd=work / "tinyhdr")
    git("commit", "--quiet", "-m", "scale", cwd=work / "tinyhdr")
    git("push", "--quiet", "origin", "HEAD:main", cwd=work / "tinyhdr")

    ext = work / "tinyext"
    git("clone", "--quiet", str(remote / "tinyext.git"), str(ext))
    (ext / "tinyext").mkdir()
    (ext / "csrc").mkdir()
    (ext / "setup.py").write_text(SETUP_PY)
    git("submodule", "--quiet", "add", "../tinyhdr.git", "third-party/tinyhdr", cwd=ext)
    commits = {}
    versions = {
        "A": ("", "x.mul(kScale)"),
        "B": ("", "x.mul(kScale).add(1)"),
        "C": ('#include "this_commit_does_not_compile.h"\n', "x"),
    }
    for version, (prologue, body) in versions.items():
        (ext / "tinyext" / "__init__.py").write_text(INIT_PY.format(version=version))
        (ext / "csrc" / "ext.cpp").write_text(EXT_CPP.format(prologue=prologue, body=body))
        git("add", "-A", cwd=ext)
        git("commit", "--quiet", "-m", f"version {version}", cwd=ext)
        commits[version] = git("rev-parse", "HEAD", cwd=ext)
    # Only A is published for now: B and C appear upstream after the cache was filled (publish()).
    git("push", "--quiet", "origin", f"{commits['A']}:refs/heads/main", cwd=ext)
    return Repo(remote, str(remote / "tinyext.git"), commits, ext)


def publish(repo: Repo) -> None:
    git("push", "--quiet", "origin", "HEAD:main", cwd=repo.work)


def write_pins(path: Path, url: str, commit: str, archs: tuple[str, ...] = ("9.0", "10.0")) -> Path:
    """A pins file with one profile, `test`, holding the extension as a DeepEP-like component."""
    path.write_text(
        "[profiles.test]\n"
        'python = "3.11"\ndescription = "a CPU torch extension built as DeepEP is"\n'
        "[[profiles.test.components]]\n"
        f'name = "tinyext"\nkind = "git"\nurl = "{url}"\nref = "{commit}"\nsource = "made by tests/test_env_build.py"\n'
        'build = "pip"\ncuda = false\nneeds_torch = true\nsubmodules = true\nmodule = "tinyext"\n'
        f"archs = {json.dumps(list(archs))}\n"
        'build_env = { DISABLE_AGGRESSIVE_PTX_INSTRS = "1" }\n'
    )
    return path


def import_through_paths(prefix: Path, pins: Path, profile: str = "test") -> dict:
    """`eval "$(python -m env paths)"` in a shell, then a fresh Python imports the extension and calls it."""
    paths = run_env("paths", "--pins", str(pins), "--profile", profile, "--prefix", str(prefix))
    script = 'import json, torch, tinyext; print(json.dumps({"version": tinyext.VERSION, "twice": tinyext.twice(torch.ones(3)).tolist(), "file": tinyext.__file__}))'
    shell = f"{paths['out']}\ncd /\nexec \"{sys.executable}\" -c '{script}'"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, timeout=120)
    result = {"paths": paths["out"], "code": proc.returncode, "err": proc.stderr[-2000:]}
    if proc.returncode == 0:
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return result


def manifest(prefix: Path) -> dict:
    path = prefix / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def story(root: Path) -> dict:
    repo = make_repo(root / "repo")
    cache, prefix, pins = root / "cache", root / "stack", root / "pins.toml"
    base = ["--pins", str(pins), "--profile", "test", "--prefix", str(prefix), "--cache", str(cache), "--arch", "9.0"]
    steps: dict = {"repo": {**asdict(repo), "remote": str(repo.remote), "work": str(repo.work)}}

    # 1. fetch with the repositories reachable; then they go away; build from the cache only.
    write_pins(pins, repo.url, repo.commits["A"])
    steps["fetch"] = run_env("fetch", "--pins", str(pins), "--profile", "test", "--cache", str(cache))
    hidden = repo.remote.with_name("remote-moved-away")
    repo.remote.rename(hidden)
    steps["build_a"] = run_env("build", *base, "--offline")
    steps["manifest_a"] = manifest(prefix)
    steps["import_a"] = import_through_paths(prefix, pins)
    steps["status_a"] = run_env(
        "status", "--pins", str(pins), "--profile", "test", "--prefix", str(prefix), "--format", "json"
    )

    # 2. unchanged inputs: nothing to do; a commit the cache lacks, with the source out of reach.
    steps["build_a_again"] = run_env("build", *base, "--offline")
    steps["manifest_a_again"] = manifest(prefix)
    write_pins(pins, repo.url, repo.commits["B"])
    steps["unreachable"] = run_env("build", *base)
    steps["offline_missing"] = run_env("build", *base, "--offline")
    hidden.rename(repo.remote)
    publish(repo)

    # 3. a commit that exists nowhere.
    write_pins(pins, repo.url, "0123456789abcdef0123456789abcdef01234567")
    steps["no_such_commit"] = run_env("build", *base)

    # 4. the pin moves to B: rebuilt.
    write_pins(pins, repo.url, repo.commits["B"])
    steps["status_before_b"] = run_env("status", "--pins", str(pins), "--profile", "test", "--prefix", str(prefix))
    steps["build_b"] = run_env("build", *base)
    steps["manifest_b"] = manifest(prefix)
    steps["import_b"] = import_through_paths(prefix, pins)

    # 5. the pin moves to C, which does not compile: B stays.
    write_pins(pins, repo.url, repo.commits["C"])
    steps["build_c"] = run_env("build", *base)
    steps["manifest_c"] = manifest(prefix)
    steps["import_after_c"] = import_through_paths(prefix, pins)
    steps["status_after_c"] = run_env("status", "--pins", str(pins), "--profile", "test", "--prefix", str(prefix))
    steps["builds_after_c"] = sorted(p.name for p in (prefix / "builds").iterdir())
    steps["logs"] = sorted(p.name for p in (prefix / "logs").iterdir())
    steps["prefix"] = str(prefix)
    return steps


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The story's results, computed once per test run even with several xdist workers."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not uid:
        return story(tmp_path_factory.mktemp("env-build"))
    shared = tmp_path_factory.getbasetemp().parent / f"env-build-{uid}"
    shared.mkdir(exist_ok=True)
    with open(shared / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits while the first runs the story
        done = shared / "steps.json"
        if not done.exists():
            work = shared / "work"
            shutil.rmtree(work, ignore_errors=True)
            done.write_text(json.dumps(story(work)))
        return json.loads(done.read_text())


def one_line_error(result: dict) -> str:
    lines = result["err"].strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result['err']}"
    assert "Traceback" not in result["err"]
    return lines[0]


# ---- 1. fetched, then built offline exactly as DeepEP is, recorded, importable ------------------------------


def test_fetch_mirrors_the_commit_and_its_submodule(steps):
    fetch = steps["fetch"]
    assert fetch["code"] == 0, fetch["err"]
    assert steps["repo"]["commits"]["A"][:12] in fetch["out"]
    assert "1 submodule(s)" in fetch["out"]


def test_offline_build_from_the_cache_with_the_source_gone(steps):
    build = steps["build_a"]
    assert build["code"] == 0, build["err"] + build["out"]
    assert "(offline)" in build["out"]
    assert "building" in build["out"] and "built in" in build["out"]


def test_build_is_recorded_in_the_manifest(steps):
    entry = steps["manifest_a"]["entries"]["tinyext"]
    assert steps["manifest_a"]["profile"] == "test"
    assert entry["commit"] == steps["repo"]["commits"]["A"]
    assert entry["url"] == steps["repo"]["url"]
    assert entry["arch_list"] == "9.0" and entry["arch_origin"] == "--arch"
    assert entry["flags"]["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert entry["flags"]["DISABLE_AGGRESSIVE_PTX_INSTRS"] == "1"
    assert int(entry["flags"]["MAX_JOBS"]) >= 1
    assert len(entry["artifact_sha256"]) == 64 and len(entry["input_hash"]) == 64
    assert entry["built_at"].endswith("Z") and entry["duration_s"] > 0
    assert list(entry["submodules"]) == ["third-party/tinyhdr"]
    # built the way DeepEP's setup.py is built: pip, no isolation, no deps, into the prefix
    assert "pip install --no-build-isolation --no-deps --no-index" in entry["command"]
    assert "--target" in entry["command"]
    assert entry["pythonpath"] == ["tinyext/python"]
    assert entry["log"].startswith("logs/tinyext-")
    assert entry["torch"].startswith("2.")


def test_imported_through_the_printed_pythonpath_and_called(steps):
    imported = steps["import_a"]
    assert imported["code"] == 0, imported["err"]
    assert imported["version"] == "A"
    assert imported["twice"] == [2.0, 2.0, 2.0]  # the C++ op ran
    prefix = steps["prefix"]
    assert imported["file"].startswith(f"{prefix}/tinyext/python/tinyext/")
    assert f"export PYTHONPATH={prefix}/tinyext/python" in imported["paths"]


def test_status_says_built_from_which_commit_for_which_archs(steps):
    status = steps["status_a"]
    assert status["code"] == 0, status["out"] + status["err"]
    row = next(r for r in json.loads(status["out"])["components"] if r["name"] == "tinyext")
    assert row["state"] == "ok"
    assert row["built"] == steps["repo"]["commits"]["A"][:7]
    assert row["archs"] == "9.0"


# ---- 2. unchanged inputs: nothing happens; a source out of reach ---------------------------------------------


def test_second_build_with_unchanged_inputs_does_nothing(steps):
    again = steps["build_a_again"]
    assert again["code"] == 0, again["err"]
    assert "up to date" in again["out"] and "building" not in again["out"]
    assert steps["manifest_a_again"] == steps["manifest_a"]


def test_unreachable_source_is_one_line_with_the_offline_fix(steps):
    line = one_line_error(steps["unreachable"])
    assert steps["unreachable"]["code"] == 2
    assert line.startswith("error: component tinyext: cannot reach")
    assert "python -m env fetch" in line and "--offline" in line


def test_offline_build_of_a_commit_not_in_the_cache_names_fetch(steps):
    line = one_line_error(steps["offline_missing"])
    assert steps["offline_missing"]["code"] == 2
    assert "is not in the source cache" in line and "python -m env fetch" in line


# ---- 3. a commit that does not exist ------------------------------------------------------------------------


def test_commit_that_does_not_exist_is_refused_in_one_line(steps):
    result = steps["no_such_commit"]
    line = one_line_error(result)
    assert result["code"] == 2
    assert line == (
        f"error: component tinyext: commit 0123456789abcdef0123456789abcdef01234567 does not exist in {steps['repo']['url']}; "
        "fix the pin (env/pins.py, or the --pins file): use a full commit of that repository"
    )


# ---- 4. a changed pin rebuilds -----------------------------------------------------------------------------


def test_status_calls_a_changed_pin_stale(steps):
    status = steps["status_before_b"]
    assert status["code"] == 1
    assert "stale" in status["out"] and "pin changed since the build" in status["out"]


def test_changed_pin_rebuilds(steps):
    build = steps["build_b"]
    assert build["code"] == 0, build["err"] + build["out"]
    assert "building" in build["out"]
    entry = steps["manifest_b"]["entries"]["tinyext"]
    assert entry["commit"] == steps["repo"]["commits"]["B"]
    assert entry["input_hash"] != steps["manifest_a"]["entries"]["tinyext"]["input_hash"]
    imported = steps["import_b"]
    assert imported["version"] == "B"
    assert imported["twice"] == [3.0, 3.0, 3.0]  # B's C++, not A's


# ---- 5. a failed build keeps the previous good one -----------------------------------------------------------


def test_failed_build_names_its_log_and_keeps_the_previous_build(steps):
    result = steps["build_c"]
    line = one_line_error(result)
    assert result["code"] == 1
    assert line.startswith("error: component tinyext: build failed (exit 1):")
    assert "this_commit_does_not_compile.h: No such file or directory" in line  # the compiler's own words
    assert f"full log: {steps['prefix']}/logs/tinyext-" in line and "the previous build, if any, is kept" in line
    assert steps["manifest_c"] == steps["manifest_b"]
    imported = steps["import_after_c"]
    assert imported["code"] == 0, imported["err"]
    assert (imported["version"], imported["twice"]) == ("B", [3.0, 3.0, 3.0])
    assert not [b for b in steps["builds_after_c"] if b.startswith(".staging")]
    assert len(steps["logs"]) == 3  # one log per set of inputs: A, B and the failed C


def test_status_after_a_failed_build_still_shows_the_good_build_as_stale(steps):
    status = steps["status_after_c"]
    assert status["code"] == 1
    row = next(line for line in status["out"].splitlines() if line.strip().startswith("tinyext"))
    assert steps["repo"]["commits"]["B"][:7] in row and "stale" in row
