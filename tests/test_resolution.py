"""One resolution: the command line and the environment become one request, and one `resolve` turns it and
the deploy file into the node plans that `plan` prints, `serve` runs and preflight checks.

What this buys, shown through the real command line:
- an exported VLLM_ALL2ALL_BACKEND gives the launcher and preflight the same backend and IBGDA settings;
- a flag the launcher owns, given after `--`, is taken into the plan once (or refused), never doubled;
- named options are validated by the deploy file's own model, in one line naming the option;
- a prefill / decode file says where a group's setting belongs instead of ignoring it.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import EXAMPLES
from tests.support import assert_one_line_error

TWO_NODES = """\
model: m
nodes:
  - {address: 127.0.0.1, gpus: 8}
  - {address: 10.0.0.2, gpus: 8}
network: {transport: ib}
vllm_version: 0.26.0
"""


def plans(res) -> list[dict]:
    assert res.code == 0, res.err
    return json.loads(res.out)


def flag(argv: list[str], name: str) -> list[str]:
    """Every value given for ``name`` (a flag given twice shows twice)."""
    return [argv[i + 1] for i, word in enumerate(argv[:-1]) if word == name]


# ---- the exported backend: one plan for the launcher and for preflight --------------------------------------
def test_exported_backend_reaches_the_plan_and_preflight_alike(launch, write_yaml):
    deploy = write_yaml(TWO_NODES)
    exported = {"VLLM_ALL2ALL_BACKEND": "deepep_low_latency"}
    primary, _ = plans(launch("plan", str(deploy), "--format", "json", env=exported))
    assert primary["all2all_backend"] == "deepep_low_latency"
    assert flag(primary["argv"], "--all2all-backend") == ["deepep_low_latency"]
    assert primary["env"]["NVSHMEM_IB_ENABLE_IBGDA"] == "1"  # DeepEP over InfiniBand drives the NIC from the GPU

    from preflight import context

    node = context.build(str(deploy), 0, "lo", None, environ=exported)
    assert node.backend == "deepep_low_latency"
    assert node.plan.argv == primary["argv"]
    assert node.env()["NVSHMEM_IB_ENABLE_IBGDA"] == "1"


def test_the_deploy_files_backend_wins_over_the_exported_one(launch, write_yaml):
    deploy = write_yaml(TWO_NODES + "all2all_backend: deepep_high_throughput\n")
    primary, _ = plans(
        launch("plan", str(deploy), "--format", "json", env={"VLLM_ALL2ALL_BACKEND": "deepep_low_latency"})
    )
    assert primary["all2all_backend"] == "deepep_high_throughput"


def test_an_exported_backend_cannot_override_the_plans_flag_on_vllm_014(launch, write_yaml, tmp_path):
    # vLLM 0.14-0.15 let a set VLLM_ALL2ALL_BACKEND win over --all2all-backend (launch/vllm_facts.json: env.uses)
    deploy = write_yaml(TWO_NODES.replace("0.26.0", "0.14.0") + "all2all_backend: deepep_high_throughput\n")
    exported = {"VLLM_ALL2ALL_BACKEND": "pplx"}
    printed = launch("plan", str(deploy), "--node-rank", "0", env=exported)
    assert printed.code == 0, printed.err
    assert "unset VLLM_ALL2ALL_BACKEND" in printed.out and "--all2all-backend deepep_high_throughput" in printed.out

    vllm = tmp_path / "vllm"
    vllm.write_text('#!/bin/sh\necho "VLLM_ALL2ALL_BACKEND=${VLLM_ALL2ALL_BACKEND-unset} $*"\n')
    vllm.chmod(0o755)
    served = launch(
        "primary",
        "--deploy",
        str(deploy),
        "--node-rank",
        "0",
        "--socket-ifname",
        "lo",
        "--vllm-bin",
        str(vllm),
        env=exported,
    )
    assert served.code == 0, served.err
    assert served.out.startswith("VLLM_ALL2ALL_BACKEND=unset serve m ")
    assert "--all2all-backend deepep_high_throughput" in served.out


def test_an_unknown_stack_profile_is_one_line(launch, write_yaml):
    res = launch("plan", str(write_yaml(TWO_NODES)), env={"EP_STACK_PROFILE": "nope"})
    assert_one_line_error(res, "EP_STACK_PROFILE: unknown profile 'nope' (expected one of: ")


# ---- arguments after `--`: a flag the launcher owns is taken once, or refused ----------------------------
def test_a_port_after_the_dashes_is_the_port_the_launcher_polls(launch, write_yaml):
    """vLLM listens where the plan says, and the plan's API (what serve polls for /health) is the same port."""
    deploy = write_yaml(TWO_NODES)
    primary, secondary = plans(launch("plan", str(deploy), "--format", "json", "--", "--port", "18901"))
    assert flag(primary["argv"], "--port") == ["18901"]
    assert primary["api"] == "http://127.0.0.1:18901"
    assert secondary["api"] is None and "--port" not in secondary["argv"]  # headless: no API


def test_a_port_given_twice_with_two_values_is_refused(launch):
    res = launch(
        "primary", "127.0.0.1", "13345", "m", "2", "1", "1", "--port", "18900", "--dry-run", "--", "--port", "18901"
    )
    assert_one_line_error(res, "--port: given as 18900 and after -- as 18901 (expected one value)")


def test_short_and_underscore_forms_are_the_same_flag(launch, write_yaml):
    deploy = write_yaml(TWO_NODES)
    primary, _ = plans(launch("plan", str(deploy), "--format", "json", "--", "-tp", "2", "--trust_remote_code"))
    assert flag(primary["argv"], "--tensor-parallel-size") == ["2"]
    assert primary["data_parallel_size_local"] == 4  # 8 GPUs / TP 2: the override reaches the layout too
    assert primary["argv"].count("--trust-remote-code") == 1


def test_the_no_form_of_an_on_off_flag_is_the_same_flag_turned_off(launch, write_yaml):
    """vLLM takes --no-enable-expert-parallel too (BooleanOptionalAction): passed beside the launcher's own
    --enable-expert-parallel, the last would win and the plan would describe expert parallelism vLLM never runs."""
    primary, _ = plans(
        launch("plan", str(write_yaml(TWO_NODES)), "--format", "json", "--", "--no-enable-expert-parallel")
    )
    assert not {"--enable-expert-parallel", "--no-enable-expert-parallel"} & set(primary["argv"])
    res = launch("plan", str(write_yaml(TWO_NODES)), "--", "--enable-expert-parallel", "--no-enable-expert-parallel")
    assert_one_line_error(res, "--: --no-enable-expert-parallel: given twice (True and False; expected once)")
    res = launch("plan", str(write_yaml(TWO_NODES)), "--", "--no-headless")
    assert_one_line_error(res, "--: --no-headless: set by the launcher")


@pytest.mark.parametrize(
    "given, origin",
    [
        (["--all2all-backend", "bogus"], "--all2all-backend"),
        (["--", "--all2all-backend", "bogus"], "-- --all2all-backend"),
        ([], "VLLM_ALL2ALL_BACKEND"),
    ],
    ids=["option", "after the dashes", "exported"],
)
def test_an_unknown_backend_is_named_where_it_was_given(launch, write_yaml, given, origin):
    env = {"VLLM_ALL2ALL_BACKEND": "bogus"} if not given else {}
    res = launch("plan", str(write_yaml(TWO_NODES)), *given, env=env)
    assert_one_line_error(res, f"{origin}: unknown backend 'bogus' (expected one of: ")


def test_a_flag_the_launcher_derives_is_refused_after_the_dashes(launch, write_yaml):
    res = launch("plan", str(write_yaml(TWO_NODES)), "--", "--data-parallel-size", "4")
    assert_one_line_error(res, "--: --data-parallel-size: set by the launcher (expected it from the nodes' gpus")
    res = launch("plan", str(write_yaml(TWO_NODES)), "--", "--headless")
    assert_one_line_error(res, "--: --headless: set by the launcher")


def test_other_vllm_arguments_go_last_and_unchanged(launch, write_yaml):
    primary, _ = plans(launch("plan", str(write_yaml(TWO_NODES)), "--format", "json", "--", "--max-num-seqs", "64"))
    assert primary["argv"][-2:] == ["--max-num-seqs", "64"]


# ---- named options: the deploy file's rules, one line naming the option ---------------------------------
def test_an_override_out_of_range_names_the_option(launch, write_yaml):
    deploy = str(write_yaml(TWO_NODES))
    assert_one_line_error(
        launch("plan", deploy, "--port", "70000"), "--port: input should be less than or equal to 65535, got 70000"
    )
    assert_one_line_error(
        launch("plan", deploy, "--tensor-parallel-size", "0"),
        "--tensor-parallel-size: input should be greater than or equal to 1, got 0",
    )
    assert_one_line_error(
        launch("plan", deploy, "--tensor-parallel-size", "3"),
        "nodes[0].gpus: 8 GPUs do not divide by tensor_parallel_size 3",
    )
    assert_one_line_error(
        launch("plan", deploy, "--", "--port", "13345"),
        "-- --port: 13345 is also rpc_port (expected two different ports)",
    )


def test_guide_arguments_refuse_a_tensor_parallel_size_of_zero(launch):
    res = launch("primary", "10.1.59.30", "13345", "m", "16", "8", "8", "--tensor-parallel-size", "0", "--dry-run")
    assert_one_line_error(res, "--tensor-parallel-size: input should be greater than or equal to 1, got 0")


# ---- prefill / decode: a group's setting lands in a group, or is refused naming where it belongs -----------
PD = (EXAMPLES / "pd-1p1d.yaml").read_text()


def test_a_top_level_group_setting_in_a_pd_file_is_refused(launch, write_yaml):
    for setting in ("all2all_backend: deepep_low_latency", "port: 9000", "tensor_parallel_size: 2"):
        name = setting.split(":")[0]
        res = launch("plan", str(write_yaml(PD + setting + "\n")))
        assert_one_line_error(
            res,
            f"{name}: set at the top of a file with disaggregation, where no group reads it "
            f"(expected disaggregation.prefill.{name} and disaggregation.decode.{name})",
        )


def test_a_backend_override_applies_to_both_groups_or_the_one_asked_for(launch):
    both = plans(
        launch("plan", str(EXAMPLES / "pd-1p1d.yaml"), "--format", "json", "--all2all-backend", "deepep_low_latency")
    )
    assert [(p["group"], p["all2all_backend"]) for p in both] == [
        ("prefill", "deepep_low_latency"),
        ("decode", "deepep_low_latency"),
    ]
    (decode,) = plans(
        launch("plan", str(EXAMPLES / "pd-1p1d.yaml"), "--format", "json", "--group", "decode", "--port", "8300")
    )
    assert decode["api"] == "http://127.0.0.1:8300"
    assert decode["kv_transfer"]["kv_connector"] == "NixlConnector"


def test_an_api_port_override_needs_a_group(launch):
    res = launch("plan", str(EXAMPLES / "pd-1p1d.yaml"), "--port", "9000")
    assert_one_line_error(
        res,
        "--port: ",
        "has prefill and decode groups, each with its own API port (expected --group prefill or --group decode",
    )


# ---- the typed plan ------------------------------------------------------------------------------------
def test_the_plan_says_what_each_node_is(launch, write_yaml):
    primary, secondary = plans(launch("plan", str(write_yaml(TWO_NODES + "port: 8100\n")), "--format", "json"))
    assert (primary["kind"], primary["api"], primary["coordinator"]) == (
        "vllm",
        "http://127.0.0.1:8100",
        "127.0.0.1:13345",
    )
    assert (secondary["kind"], secondary["api"], secondary["coordinator"]) == ("vllm", None, "127.0.0.1:13345")
    ray = plans(launch("plan", str(write_yaml(TWO_NODES + "data_parallel_backend: ray\n")), "--format", "json"))
    assert (ray[0]["ray_head"], ray[1]["kind"], ray[1]["coordinator"]) == (
        "127.0.0.1:6379",
        "ray-worker",
        "127.0.0.1:6379",
    )


def test_a_host_name_address_plans_like_an_ip(launch, write_yaml):
    primary, _ = plans(
        launch("plan", str(write_yaml(TWO_NODES.replace("10.0.0.2", "gpu-02.cluster.local"))), "--format", "json")
    )
    assert primary["node_address"] == "127.0.0.1"


def test_the_preflight_section_names_every_threshold_the_checks_read():
    """The deploy file's `preflight:` keys are the thresholds' names, so a misspelled one is refused (test_bad_input)."""
    from launch.config import Preflight
    from preflight.thresholds import KNOWN

    assert set(Preflight.model_fields) == set(KNOWN)


def test_the_engine_start_up_bound_reaches_every_node_where_vllm_reads_it(launch, write_yaml):
    """vLLM waits 600 s for its engines unless VLLM_ENGINE_READY_TIMEOUT_S says otherwise (envs.py from 0.14.0)."""
    deploy = write_yaml(TWO_NODES + "engine_ready_timeout_s: 3000\n")
    for node in plans(launch("plan", str(deploy), "--format", "json")):
        assert node["env"]["VLLM_ENGINE_READY_TIMEOUT_S"] == "3000"
    old = launch("plan", str(deploy), "--vllm-version", "0.10.1.1")
    assert "# warning: engine_ready_timeout_s: vLLM 0.10.1.1 does not read VLLM_ENGINE_READY_TIMEOUT_S" in old.out
    twice = write_yaml(TWO_NODES + "engine_ready_timeout_s: 3000\nenv: {VLLM_ENGINE_READY_TIMEOUT_S: '60'}\n")
    assert_one_line_error(
        launch("plan", str(twice)), "env.VLLM_ENGINE_READY_TIMEOUT_S: also set by engine_ready_timeout_s"
    )
