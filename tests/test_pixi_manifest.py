"""pixi.toml is the users' front door: valid against pixi's own schema, TOML 1.0, with the tasks the
README promises, and pinned to exactly what env/pins.py says."""

from __future__ import annotations

import json
import tomllib

import jsonschema
import pytest

from env.pins import PROFILES
from tests.conftest import FIXTURES, ROOT

SCHEMA = FIXTURES / "pixi" / "pixi-manifest-schema-v0.77.0.json"


@pytest.fixture(scope="module")
def manifest():
    with open(ROOT / "pixi.toml", "rb") as f:
        return tomllib.load(f)


def test_valid_against_pixis_own_schema(manifest):
    schema = json.loads(SCHEMA.read_text())
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)
    ]
    assert errors == []


def test_user_tasks_exist_and_call_the_launcher(manifest):
    tasks = manifest["tasks"]
    assert tasks["serve-primary"]["cmd"] == "python -m launch primary"
    assert tasks["serve-secondary"]["cmd"] == "python -m launch secondary"
    assert tasks["plan"]["cmd"] == "python -m launch plan"
    assert manifest["feature"]["test"]["tasks"]["test"]["cmd"].startswith("pytest")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_pins_agree_with_env_pins(manifest, profile):
    pins = PROFILES[profile]
    deps = manifest["feature"][profile]["pypi-dependencies"]
    assert deps["vllm"] == f"=={pins.vllm}"
    assert deps["torch"] == f"=={pins.torch}"
    assert manifest["dependencies"]["python"] == f"{pins.python}.*"


# ---- one source of truth: every pin pixi.toml holds is env/pins.py's, and the other way round ------------

ENVIRONMENT_OF = {"current": "default", "seed": "seed", "vllm026": "vllm026"}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_pypi_pin_of_the_profile_is_in_its_feature_and_nothing_else(manifest, profile):
    assert manifest["feature"][profile]["pypi-dependencies"] == PROFILES[profile].pypi_pins()


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_conda_pin_of_the_profile_is_in_its_feature_and_nothing_else(manifest, profile):
    feature = manifest["feature"][profile]
    assert feature["dependencies"] == PROFILES[profile].conda_pins()
    for tool in ("cuda-nvcc", "cmake", "ninja", "gxx", "rdma-core", "libfabric", "ucx", "cuda-version"):
        assert tool in feature["dependencies"], f"{profile} lacks the toolchain package {tool}"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_cuda_torch_index_and_profile_variable_agree(manifest, profile):
    pins, feature = PROFILES[profile], manifest["feature"][profile]
    assert feature["system-requirements"]["cuda"] == pins.cuda
    assert feature["activation"]["env"]["EP_STACK_PROFILE"] == profile
    assert feature.get("pypi-options", {}).get("extra-index-urls", []) == (
        [pins.torch_index] if pins.torch_index else []
    )


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_profile_has_its_environment(manifest, profile):
    env = manifest["environments"][ENVIRONMENT_OF[profile]]
    assert env["features"] == [profile] and env["solve-group"] == profile


def test_no_pin_outside_the_profile_features(manifest):
    """vLLM, torch and the stack's packages are pinned in the profile features only."""
    stack = {n for p in PROFILES.values() for n in (*p.pypi_pins(), *p.conda_pins())}
    assert not stack & set(manifest["pypi-dependencies"]), "pin stack packages in a profile feature"
    assert not stack & set(manifest["dependencies"]) - {"python"}
    for name, feature in manifest["feature"].items():
        if name not in PROFILES:
            assert not stack & set(feature.get("pypi-dependencies", {})) | (
                stack & set(feature.get("dependencies", {}))
            ), name


def test_no_dependency_is_left_unconstrained(manifest):
    """`*` would let a solve pick any version: every dependency names at least a floor."""
    tables = [manifest["dependencies"], manifest["pypi-dependencies"]]
    for feature in manifest["feature"].values():
        tables += [feature.get("dependencies", {}), feature.get("pypi-dependencies", {})]
    loose = [
        name
        for table in tables
        for name, spec in table.items()
        if spec == "*" or (isinstance(spec, dict) and spec.get("version") == "*")
    ]
    assert loose == []


def test_stack_tasks_call_python_m_env(manifest):
    tasks = manifest["tasks"]
    assert tasks["build-ep-kernels"]["cmd"] == "python -m env build"
    assert tasks["fetch-sources"]["cmd"] == "python -m env fetch"
    assert tasks["stack-paths"]["cmd"] == "python -m env paths"
    assert tasks["stack-status"]["cmd"] == "python -m env status"
    for kept in (
        "serve-primary",
        "serve-secondary",
        "serve",
        "plan",
        "check",
        "preflight",
        "preflight-bench",
        "bench-plan",
    ):
        assert kept in tasks


def test_pinned_vllm_is_the_default_profiles():
    from env.pins import DEFAULT_PROFILE, PINNED_VLLM

    assert PINNED_VLLM == PROFILES[DEFAULT_PROFILE].vllm == "0.33.0"
