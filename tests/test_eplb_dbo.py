"""EPLB and dual-batch overlap as deploy-file sections: `eplb:` and `dbo:` become the target release's own
flags (read from its wheel: launch/vllm_facts.json), vLLM's constraints are checked before anything starts,
and real vLLM parsers accept what is planned (and validate EPLB's settings with their own EPLBConfig)."""

from __future__ import annotations

import json

import pytest

from launch import check
from tests.support import PARSER_PYTHON, assert_one_line_error, parser_of

TWO_NODES = """\
model: m
nodes: [{address: 10.0.0.1, gpus: 8}, {address: 10.0.0.2, gpus: 8}]
network: {transport: ib}
all2all_backend: deepep_low_latency
"""


def argv(launch, write_yaml, text: str, *extra: str) -> list[str]:
    res = launch("plan", str(write_yaml(text)), "--format", "json", *extra)
    assert res.code == 0, res.err
    primary, secondary = json.loads(res.out)
    assert primary["argv"][primary["argv"].index("m") + 1 :].count("--enable-eplb") <= 1
    return secondary["argv"]


def after(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


# ---- planned per release ------------------------------------------------------------------------------------
def test_newer_releases_take_eplb_settings_as_one_json(launch, write_yaml):
    words = argv(
        launch, write_yaml, TWO_NODES + "vllm_version: 0.26.0\neplb: {num_redundant_experts: 32, window_size: 500}\n"
    )
    assert "--enable-eplb" in words
    assert json.loads(after(words, "--eplb-config")) == {"num_redundant_experts": 32, "window_size": 500}


def test_the_oldest_release_takes_them_as_flags_of_their_own(launch, write_yaml):
    text = TWO_NODES + "vllm_version: 0.10.1.1\neplb: {num_redundant_experts: 32, log_balancedness: true}\n"
    words = argv(launch, write_yaml, text)
    assert after(words, "--num-redundant-experts") == "32" and "--eplb-log-balancedness" in words
    assert "--eplb-config" not in words


def test_eplb_true_is_vllms_defaults(launch, write_yaml):
    words = argv(launch, write_yaml, TWO_NODES + "vllm_version: 0.33.0\neplb: true\n")
    assert "--enable-eplb" in words and "--eplb-config" not in words


def test_dbo_with_its_thresholds(launch, write_yaml):
    words = argv(launch, write_yaml, TWO_NODES + "vllm_version: 0.26.0\ndbo: {decode_token_threshold: 32}\n")
    assert "--enable-dbo" in words and after(words, "--dbo-decode-token-threshold") == "32"
    assert "--dbo-prefill-token-threshold" not in words


def test_prefill_and_decode_each_take_their_own(launch, write_yaml):
    text = """\
model: m
vllm_version: 0.26.0
disaggregation:
  prefill: {nodes: [{address: 10.0.0.1, gpus: 8}], port: 8100, rpc_port: 13345, all2all_backend: deepep_high_throughput,
            eplb: {num_redundant_experts: 8}}
  decode: {nodes: [{address: 10.0.0.2, gpus: 8}], port: 8200, rpc_port: 13355, all2all_backend: deepep_low_latency,
           dbo: true}
  connector: {name: NixlConnector, backend: UCX}
"""
    res = launch("plan", str(write_yaml(text)), "--format", "json")
    assert res.code == 0, res.err
    prefill, decode = json.loads(res.out)
    assert "--enable-eplb" in prefill["argv"] and "--enable-dbo" not in prefill["argv"]
    assert "--enable-dbo" in decode["argv"] and "--enable-eplb" not in decode["argv"]


# ---- refused before anything starts, in one line ------------------------------------------------------------
REFUSED = {
    "a setting the release does not have": (
        "vllm_version: 0.26.0\neplb: {policy_x: 1}\n",
        "eplb.policy_x: not an EPLB setting of vLLM 0.26.0 (expected one of: window_size, step_interval",
    ),
    "a newer setting on an old release": (
        "vllm_version: 0.10.1.1\neplb: {use_async: true}\n",
        "eplb.use_async: not an EPLB setting of vLLM 0.10.1.1",
    ),
    "DBO before vLLM had it": (
        "vllm_version: 0.10.1.1\ndbo: true\n",
        "dbo: vLLM 0.10.1.1 has no dual-batch overlap (expected vllm_version >= 0.11.0)",
    ),
    "DBO on a backend it does not support": (
        "vllm_version: 0.26.0\ndbo: true\n",
        "dbo: needs all2all_backend one of deepep_low_latency, deepep_high_throughput, nixl_ep in vLLM 0.26.0 "
        "(vllm/config/vllm.py:1533); the plan has allgather_reducescatter",
    ),
    "nixl_ep for DBO before vLLM allowed it": (
        "vllm_version: 0.20.0\nall2all_backend: nixl_ep\ndbo: true\n",
        "dbo: needs all2all_backend one of deepep_low_latency, deepep_high_throughput in vLLM 0.20.0",
    ),
    "EPLB without expert parallelism": (
        "vllm_version: 0.26.0\nenable_expert_parallel: false\neplb: true\n",
        "eplb: needs enable_expert_parallel: true",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_in_one_line(launch, write_yaml, case):
    more, expected = REFUSED[case]
    text = TWO_NODES.replace("all2all_backend: deepep_low_latency\n", "") + more
    deploy = write_yaml(text)
    assert_one_line_error(launch("plan", str(deploy)), f"error: {deploy}: {expected}")


def test_eplb_on_a_single_rank_is_refused(launch, write_yaml):
    deploy = write_yaml("model: m\nnodes: [{address: 10.0.0.1, gpus: 1}]\nvllm_version: 0.26.0\neplb: true\n")
    assert_one_line_error(launch("plan", str(deploy)), "eplb: the EP group has 1 rank")


def test_the_flags_themselves_are_refused_where_they_would_double(launch, write_yaml):
    deploy = write_yaml(TWO_NODES + "vllm_version: 0.26.0\neplb: true\n")
    assert_one_line_error(
        launch("plan", str(deploy), "--", "--enable-eplb"),
        "error: --: --enable-eplb: set by the launcher (expected it from the deploy file's eplb: section",
    )
    deploy = write_yaml(TWO_NODES + "vllm_args: [--enable-dbo]\n", "flags.yaml")
    assert_one_line_error(launch("plan", str(deploy)), "vllm_args: --enable-dbo: set by the launcher")


def test_a_top_level_section_in_a_prefill_decode_file_is_refused(launch, write_yaml):
    text = """\
model: m
eplb: true
disaggregation:
  prefill: {nodes: [{address: 10.0.0.1, gpus: 8}], port: 8100, rpc_port: 13345}
  decode: {nodes: [{address: 10.0.0.2, gpus: 8}], port: 8200, rpc_port: 13355}
"""
    assert_one_line_error(
        launch("plan", str(write_yaml(text))),
        "eplb: set at the top of a file with disaggregation, where no group reads it",
    )


# ---- real vLLM parsers -------------------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.parametrize(
    "version, sections",
    [
        ("0.10.1.1", "eplb: {num_redundant_experts: 16, window_size: 500, step_interval: 1000, log_balancedness: true}\n"),
        ("0.26.0", "eplb: {num_redundant_experts: 16, use_async: true, policy: default}\ndbo: {decode_token_threshold: 32}\n"),
        ("0.33.0", "eplb: {num_redundant_experts: 16, log_balancedness_interval: 10}\ndbo: {prefill_token_threshold: 512}\n"),
    ],
)  # fmt: skip
def test_real_vllm_accepts_what_is_planned(launch, write_yaml, version, sections):
    folder = parser_of(version)
    res = launch("plan", str(write_yaml(TWO_NODES + f"vllm_version: {version}\n" + sections)), "--format", "json")
    assert res.code == 0, res.err
    argvs = [p["argv"][1:] for p in json.loads(res.out)]
    answer = check.parse(argvs, python=str(PARSER_PYTHON), pythonpath=[str(folder)], timeout=300)
    assert not answer.problem, answer.problem
    assert [r.error for r in answer.results] == [None, None]


@pytest.mark.vllm
def test_vllms_own_eplb_config_refuses_a_bad_value(launch, write_yaml):
    """Values are vLLM's to judge: its parser validates --eplb-config with its EPLBConfig (window_size > 0)."""
    folder = parser_of("0.26.0")
    res = launch(
        "plan", str(write_yaml(TWO_NODES + "vllm_version: 0.26.0\neplb: {window_size: 0}\n")), "--format", "json"
    )
    answer = check.parse([json.loads(res.out)[0]["argv"][1:]], python=str(PARSER_PYTHON), pythonpath=[str(folder)])
    assert "argument --eplb-config: 1 validation error for EPLBConfig" in answer.results[0].error
