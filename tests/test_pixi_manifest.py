"""pixi.toml is the users' front door: valid against pixi's own schema, TOML 1.0, with the tasks the
README promises, and pinned to exactly what env/pins.py says."""

from __future__ import annotations

import json
import tomllib

import jsonschema
import pytest

from env.pins import PROFILES
from tests.conftest import ROOT, SHARED

SCHEMA = SHARED / "pixi" / "pixi-manifest-schema-v0.77.0.json"


@pytest.fixture(scope="module")
def manifest():
    with open(ROOT / "pixi.toml", "rb") as f:
        return tomllib.load(f)


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"pixi's schema is not beside the project ({SCHEMA.name})")
def test_valid_against_pixis_own_schema(manifest):
    schema = json.loads(SCHEMA.read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(manifest)]
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
