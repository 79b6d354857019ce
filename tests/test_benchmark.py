"""`launch bench`: the guide's benchmark against the deploy file's API, accepted by the real
`vllm bench serve` parser, recorded with the plan and versions, and two runs compared side by side."""

from __future__ import annotations

import json
import os
import shlex

import pytest

from launch import benchmark, check
from launch.config import parse_deploy
from tests.conftest import EXAMPLES, VLLM_LOGS
from tests.support import PARSER_PYTHON as PYTHON, VLLM_VERSIONS as VERSIONS, parser_of


def test_guide_defaults_against_the_primary(launch):
    res = launch(
        "bench", str(EXAMPLES / "guide-2node.yaml"), "--dry-run", "--out", "runs/a", "--", "--num-prompts", "200"
    )
    assert res.code == 0, res.err
    assert shlex.split(res.out) == [
        "vllm",
        "bench",
        "serve",
        "--base-url",
        "http://10.1.59.30:8000",
        "--model",
        "deepseek-ai/DeepSeek-V3-0324",
        "--dataset-name",
        "random",
        "--random-input-len",
        "128",
        "--random-output-len",
        "128",
        "--num-prompts",
        "10000",
        "--ignore-eos",
        "--save-result",
        "--result-dir",
        "runs/a",
        "--result-filename",
        "result.json",
        "--num-prompts",
        "200",  # after `--`: last, so it wins
    ]


@pytest.mark.vllm
@pytest.mark.parametrize("version", VERSIONS)
def test_bench_command_is_accepted_by_vllm_bench_serve(version, tmp_path):
    folder = parser_of(version)
    config = parse_deploy({"model": "m", "nodes": [{"address": "10.0.0.1"}], "port": 8100}, "d")
    good = benchmark.argv(config, tmp_path, ["--num-prompts", "200"])[1:]
    typo = benchmark.argv(config, tmp_path, ["--num-promts", "200"])[1:]
    answer = check.parse([good, typo], python=str(PYTHON), pythonpath=[str(folder)], timeout=300)
    assert not answer.problem, answer.problem
    assert answer.results[0].ok, answer.results[0].error
    assert not answer.results[1].ok and "--num-promts" in answer.results[1].error


def test_two_runs_side_by_side(launch, tmp_path):
    for name, tput in (("a", 1000.0), ("b", 1100.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(
            json.dumps({"completed": 200, "failed": 0, "output_throughput": tput, "mean_ttft_ms": 50.0})
        )
    res = launch("bench", "--compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert res.code == 0, res.err
    lines = res.out.splitlines()
    assert lines[0].split() == ["metric", "a", "b", "B/A"]
    assert "output tokens/s" in res.out and "1,000.00" in res.out and "1,100.00" in res.out and "1.100" in res.out
    assert any(line.startswith("mean TTFT ms") and line.endswith("1.000") for line in lines)


def test_compare_with_a_missing_run_is_one_line(launch, tmp_path):
    res = launch("bench", "--compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert res.code == 2 and res.err.count("\n") == 1 and "no benchmark result" in res.err


def test_a_run_is_recorded_with_its_plan_and_versions(launch, tmp_path, write_yaml):
    """A real run against a stand-in `vllm` that writes a result the way `vllm bench serve` does."""
    fake = tmp_path / "vllm"
    fake.write_text(
        '#!/bin/sh\nwhile [ "$1" != "--result-dir" ]; do shift; done\n'
        'printf \'{"completed": 3, "failed": 0, "output_throughput": 12.5}\' > "$2/result.json"\n'
    )
    fake.chmod(0o755)
    deploy = write_yaml("model: m\nnodes: [{address: 10.0.0.1}, {address: 10.0.0.2}]\n")
    out = tmp_path / "run"
    res = launch(
        "bench",
        str(deploy),
        "--out",
        str(out),
        "--vllm-bin",
        str(fake),
        "--logs",
        str(VLLM_LOGS / "dp2-ep" / "primary.log"),
    )
    assert res.code == 0, res.err
    assert "output tokens/s      : 12.50" in res.out
    assert [p["role"] for p in json.loads((out / "plan.json").read_text())] == ["primary", "secondary"]
    assert "python" in json.loads((out / "versions.json").read_text())
    assert (out / "command.txt").read_text().startswith("vllm bench serve --base-url http://10.0.0.1:8000")
    assert "AgRsAll2AllManager" in (out / "verify.txt").read_text()
    assert os.path.exists(out / "result.json")


def test_a_run_folder_that_holds_results_is_never_replaced(launch, write_yaml, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text('{"completed": 200}')
    deploy = write_yaml("model: m\nnodes: [{address: 10.0.0.1}, {address: 10.0.0.2}]\n")
    res = launch("bench", str(deploy), "--out", str(out), "--vllm-bin", "/bin/true")
    assert res.code == 2 and f"--out: {out} already holds a run (expected a new folder" in res.err
    assert (out / "result.json").read_text() == '{"completed": 200}'
