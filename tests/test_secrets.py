"""Secrets by meaning, not only by name: vLLM's secret-bearing flags (--api-key, --hf-token) travel as the
variables vLLM reads the same value from, so they never show in a printed plan, a rendered command, the
launcher's summary or a process listing; a scheduler job refuses to carry them; errors never echo them."""

from __future__ import annotations

import json

from tests.support import assert_one_line_error

DEPLOY = """\
model: m
nodes: [{address: 127.0.0.1, gpus: 2}]
network: {transport: tcp, socket_ifname: lo}
vllm_version: 0.26.0
"""
KEY = "sk-do-not-show-1234"


def test_an_api_key_in_vllm_args_becomes_vllm_api_key(launch, write_yaml):
    deploy = write_yaml(DEPLOY + f"vllm_args: [--api-key, {KEY}, --max-model-len, '4096']\n")
    text = launch("plan", str(deploy))
    (plan,) = json.loads(launch("plan", str(deploy), "--format", "json").out)
    assert text.code == 0, text.err
    assert KEY not in text.out + text.err and "export VLLM_API_KEY=***" in text.out
    assert "--api-key" not in plan["argv"] and plan["argv"][-2:] == ["--max-model-len", "4096"]
    assert plan["env"]["VLLM_API_KEY"] == "***"


def test_serve_hands_the_key_to_vllm_in_its_environment_only(launch, write_yaml, tmp_path):
    vllm = tmp_path / "vllm"
    vllm.write_text('#!/bin/sh\necho "key=$VLLM_API_KEY token=$HF_TOKEN args=$*"\n')
    vllm.chmod(0o755)
    deploy = write_yaml(DEPLOY)
    res = launch("primary", "--deploy", str(deploy), "--vllm-bin", str(vllm), "--", "--api-key", KEY,
                 "--hf-token=hf_secret_token")  # fmt: skip
    assert res.code == 0, res.err
    assert res.out.startswith(f"key={KEY} token=hf_secret_token args=serve m ")
    assert "--api-key" not in res.out and "--hf-token" not in res.out
    assert KEY not in res.err and "hf_secret_token" not in res.err  # the summary shows ***


def test_hf_token_without_a_value_stays_a_flag(launch, write_yaml):
    (plan,) = json.loads(launch("plan", str(write_yaml(DEPLOY)), "--format", "json", "--", "--hf-token").out)
    assert plan["argv"][-1] == "--hf-token" and "HF_TOKEN" not in plan["env"]


def test_two_api_keys_are_refused_without_showing_them(launch, write_yaml):
    res = launch("plan", str(write_yaml(DEPLOY)), "--", "--api-key", KEY, "second-key")
    assert_one_line_error(res, "--: --api-key: expected one value (the launcher gives it to vLLM as VLLM_API_KEY")
    assert KEY not in res.err and "second-key" not in res.err


def test_a_scheduler_job_does_not_carry_a_secret_flag(launch, write_yaml):
    deploy = write_yaml("model: m\nnodes: [{gpus: 8}]\n" + f"vllm_args: [--api-key, {KEY}]\n")
    res = launch("plan", str(deploy), "--format", "slurm")
    assert_one_line_error(res, f"{deploy}: vllm_args: --api-key: a secret would be written into the job script",
                          "export VLLM_API_KEY before sbatch")  # fmt: skip
    assert KEY not in res.err


def test_a_secret_with_a_newline_is_refused_without_its_value(launch, write_yaml):
    res = launch("plan", str(write_yaml(DEPLOY + 'env: {DB_PASSWORD: "hunter2\\nx"}\n')))
    assert_one_line_error(res, "env.DB_PASSWORD: the value has control characters")
    assert "hunter2" not in res.err
