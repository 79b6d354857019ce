"""Every argv the launcher generates is accepted by real vLLM's own `vllm serve` parser, for the guide's
vLLM (0.10.1.1), the GPU machine's (0.26.0) and the newest (0.33.0): primary and secondary, every backend
the version has, TP 1 and 2. Backends a version removed or never had are refused by the launcher before
vLLM sees them; a typo passed through after `--` is caught by vLLM's parser.

The parsers come from tests/vllm/install-parsers.sh (EP_VLLM_PARSERS points at them; .ci/run installs
them and sets EP_REQUIRE_VLLM=1, so that in CI a missing parser fails instead of skipping)."""

from __future__ import annotations

import os

import pytest
from packaging.version import Version

from env.paths import StackPaths
from launch import check, plan as planning
from launch.config import ConfigError, parse_deploy
from launch.layout import layouts
from launch.vllm_versions import BACKENDS, Target
from tests.conftest import ROOT
from tests.support import PARSER_PYTHON, VLLM_VERSIONS, parser_of

pytestmark = pytest.mark.vllm
VERSIONS = VLLM_VERSIONS
PYTHON = PARSER_PYTHON


def plans_for(version: str, backend: str | None, tp: int = 1, transport: str = "ib", passthrough=()):
    config = parse_deploy(
        {
            "model": "deepseek-ai/DeepSeek-V3-0324",
            "nodes": [
                {"address": "10.0.0.1", "gpus": 8},
                {"address": "10.0.0.2", "gpus": 8},
                {"address": "10.0.0.3", "gpus": 8},
            ],
            "tensor_parallel_size": tp,
            "all2all_backend": backend,
            "trust_remote_code": True,
            "network": {"transport": transport},
            "vllm_args": ["--max-model-len", "8192"],
        },
        "generated",
    )
    target = Target(Version(version), "given")
    return [
        planning.build(config, lay, target, StackPaths(prefix=ROOT), passthrough=list(passthrough))
        for lay in layouts(config)
    ]


def combinations(version: str):
    target = Target(Version(version), "given")
    for backend in [None, *target.backends()]:
        for tp in (1, 2):
            yield backend, tp


@pytest.mark.parametrize("version", VERSIONS)
def test_every_generated_argv_is_accepted(version):
    folder = parser_of(version)
    cases = [(backend, tp, p) for backend, tp in combinations(version) for p in plans_for(version, backend, tp)]
    # transports change the environment only; one argv per transport proves it
    cases += [(None, 1, p) for t in ("roce", "efa", "tcp") for p in plans_for(version, None, 1, t)[:2]]
    answer = check.parse([p.argv[1:] for _, _, p in cases], python=str(PYTHON), pythonpath=[str(folder)], timeout=300)
    assert not answer.problem, answer.problem
    assert answer.version == version
    rejected = [
        (b, tp, p.layout.role, r.error) for (b, tp, p), r in zip(cases, answer.results, strict=True) if not r.ok
    ]
    assert rejected == []
    assert len(answer.results) >= 12


@pytest.mark.parametrize("version", VERSIONS)
def test_typos_and_missing_flags_are_caught_by_vllm(version):
    folder = parser_of(version)
    (typo,) = [
        p for p in plans_for(version, None, passthrough=["--max-modle-len", "4096"]) if p.layout.role == "primary"
    ]
    # the flag before its time: --all2all-backend on 0.10.1.1, which only read the environment variable
    old_flag = plans_for("0.26.0", "deepep_low_latency")[0]
    answer = check.parse([typo.argv[1:], old_flag.argv[1:]], python=str(PYTHON), pythonpath=[str(folder)], timeout=300)
    assert not answer.results[0].ok and "--max-modle-len" in answer.results[0].error
    assert answer.results[1].ok == (Version(version) >= Version("0.11.1"))


@pytest.mark.parametrize("version", VERSIONS)
def test_removed_and_unknown_backends_never_reach_vllm(version):
    target = Target(Version(version), "given")
    offered = set(target.backends())
    for backend in [b.name for b in BACKENDS if b.name not in offered] + ["deepep_fast"]:
        with pytest.raises(ConfigError, match="all2all_backend"):
            plans_for(version, backend)


def test_launch_check_command_reports_each_node(launch, write_yaml):
    folder = parser_of("0.26.0")
    deploy = write_yaml(
        "model: m\nnodes: [{address: 10.0.0.1, gpus: 8}, {address: 10.0.0.2, gpus: 8}]\n"
        "all2all_backend: deepep_high_throughput\nvllm_version: 0.26.0\nvllm_args: [--max-num-seqs, '64']\n"
    )
    res = launch(
        "check", str(deploy), "--python", str(PYTHON), env={"PYTHONPATH": f"{ROOT}{os.pathsep}{folder}"}, timeout=300
    )
    assert res.code == 0, res.out + res.err
    assert "# vLLM 0.26.0 parsed 2 node argv(s)" in res.out
    assert "OK       node 0 (primary)" in res.out and "OK       node 1 (secondary)" in res.out
    bad = write_yaml(
        "model: m\nnodes: [{address: 10.0.0.1, gpus: 8}]\nvllm_version: 0.26.0\nvllm_args: [--enable-expert-paralel]\n",
        "bad.yaml",
    )
    res = launch(
        "check", str(bad), "--python", str(PYTHON), env={"PYTHONPATH": f"{ROOT}{os.pathsep}{folder}"}, timeout=300
    )
    assert res.code == 1
    assert "REJECTED node 0 (primary):" in res.out and "--enable-expert-paralel" in res.out


@pytest.mark.parametrize("version", VERSIONS)
def test_the_ray_backends_primary_argv_is_accepted(version):
    """data_parallel_backend: ray puts `--data-parallel-backend ray` on the primary (the only node running vLLM)."""
    folder = parser_of(version)
    config = parse_deploy(
        {"model": "m", "nodes": [{"address": "10.0.0.1"}, {"address": "10.0.0.2"}], "data_parallel_backend": "ray"},
        "generated",
    )
    target = Target(Version(version), "given")
    primary = planning.build(config, layouts(config)[0], target, StackPaths(prefix=ROOT))
    assert "--data-parallel-backend" in primary.argv
    answer = check.parse([primary.argv[1:]], python=str(PYTHON), pythonpath=[str(folder)], timeout=300)
    assert not answer.problem, answer.problem
    assert answer.results[0].ok, answer.results[0].error
