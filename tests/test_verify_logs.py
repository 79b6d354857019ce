"""`launch verify` on real vLLM logs: what ran is recognised, and a run that differs from the plan fails
naming both what was asked and what vLLM used."""

from __future__ import annotations

import pytest

from launch import verify
from tests.conftest import VLLM_LOGS

LOGS = VLLM_LOGS / "dp2-ep"


def test_real_dp2_ep_run_is_recognised():
    found = verify.read([LOGS / "primary.log", LOGS / "secondary.log"])
    assert found.version == "0.26.0"
    assert found.all2all_manager == "AgRsAll2AllManager" and found.all2all_backend == "allgather_reducescatter"
    assert found.moe_backends == {"TRITON"}
    assert found.attention_backends == {"FLASH_ATTN"} and found.flash_attention == "3"
    assert found.ep_ranks[0].describe() == "EP rank 0/2: experts 0-3 of 8"
    assert found.ep_ranks[1].describe() == "EP rank 1/2: experts 4-7 of 8"
    assert found.dp_ranks == {0, 1}
    assert verify.problems(found, backend=None, ep_size=2) == []


def test_a_run_whose_backend_differs_fails_naming_both(launch, tmp_path, write_yaml):
    edited = tmp_path / "primary.log"
    edited.write_text(
        (LOGS / "primary.log")
        .read_text()
        .replace("Using AgRsAll2AllManager all2all manager.", "Using DeepEPLLAll2AllManager all2all manager.")
    )
    deploy = write_yaml("model: m\nnodes: [{address: 10.0.0.1, gpus: 1}, {address: 10.0.0.2, gpus: 1}]\n")
    res = launch("verify", str(edited), str(LOGS / "secondary.log"), "--deploy", str(deploy))
    assert res.code == 1
    assert (
        "MISMATCH all2all backend: asked for allgather_reducescatter, vLLM used DeepEPLLAll2AllManager (deepep_low_latency)"
        in res.out
    )
    ok = launch("verify", str(LOGS / "primary.log"), str(LOGS / "secondary.log"), "--deploy", str(deploy))
    assert ok.code == 0 and "# verdict: as planned" in ok.out


def test_a_missing_ep_rank_is_named():
    found = verify.read([LOGS / "primary.log"])  # the secondary's log left out
    assert verify.problems(found, backend=None, ep_size=2) == [
        "expert parallelism: no log line from EP rank(s) [1] of 2"
    ]


@pytest.mark.parametrize(
    "logged, backend",
    [
        ("AgRsAll2AllManager", "allgather_reducescatter"),
        ("PPLX", "pplx"),  # vLLM 0.10: "Using PPLX all2all manager."
        ("DeepEP High-Throughput", "deepep_high_throughput"),
        ("DeepEPHTAll2AllManager", "deepep_high_throughput"),
        ("DeepEP Low-Latency", "deepep_low_latency"),
        ("DeepEPLLAll2AllManager", "deepep_low_latency"),
        ("NaiveAll2AllManager", "naive"),
        ("SomethingNew", None),
    ],
)
def test_manager_names_across_versions(logged, backend):
    assert verify.backend_of(logged) == backend


def test_fallback_warning_is_a_mismatch(tmp_path):
    log = tmp_path / "p.log"
    log.write_text(
        "(EngineCore_DP0 pid=1) WARNING 01-01 00:00:00 [parallel.py:1] all2all_backend 'pplx' has been removed. "
        "Falling back to 'allgather_reducescatter'.\n(Worker pid=2) INFO [x.py:1] Using AgRsAll2AllManager all2all manager.\n"
    )
    found = verify.read([log])
    problems = verify.problems(found, backend="pplx")
    assert problems[0] == "all2all backend: asked for pplx, vLLM used AgRsAll2AllManager (allgather_reducescatter)"
    assert problems[1].startswith("vLLM fell back: all2all_backend 'pplx' has been removed")


def test_missing_log_is_one_line(launch, tmp_path):
    res = launch("verify", str(tmp_path / "nope.log"))
    assert (
        res.code == 2
        and res.err.strip()
        == f"error: {tmp_path / 'nope.log'}: no such log file (expected vLLM's output, e.g. from --log-file)"
    )


def test_the_version_is_vllms_never_nccls(tmp_path):
    log = tmp_path / "p.log"
    log.write_text(
        "(Worker pid=3) node1:3:3 [0] NCCL INFO NCCL version 2.28.9\n"
        "(APIServer pid=1) INFO 01-01 00:00:00 [api_utils.py:345]  ▄▄ ▄█ █     █     █ ▀▄▀ █  version 0.26.0\n"
    )
    assert verify.read([log]).version == "0.26.0"
    log.write_text("(Worker pid=3) node1:3:3 [0] NCCL INFO NCCL version 2.28.9\n")
    found = verify.read([log])
    assert found.version is None and found.nccl == "2.28.9"


@pytest.mark.parametrize(
    "lines, backend, problems",
    [
        # 0.10.1.1 defaulted to naive (VLLM_ALL2ALL_BACKEND's default in its vllm/envs.py)
        (["INFO [api_server.py:1805] vLLM API server version 0.10.1.1", "INFO Using naive all2all manager."], None, []),
        # 0.11.0's FlashInfer line says "all2allv manager"
        (
            ["INFO Initializing a V1 LLM engine (v0.11.0) with config: x", "INFO Using Flashinfer all2allv manager."],
            "flashinfer_all2allv",
            [],
        ),
        # 0.26.0 replaces pplx with allgather_reducescatter in its config: the AgRs manager is what pplx becomes there
        (
            [
                "INFO Initializing a V1 LLM engine (v0.26.0) with config: x",
                "INFO Using AgRsAll2AllManager all2all manager.",
            ],
            "pplx",
            [],
        ),
        # 0.16.0 still builds the PPLX manager for pplx
        (
            [
                "INFO Initializing a V1 LLM engine (v0.16.0) with config: x",
                "INFO Using AgRsAll2AllManager all2all manager.",
            ],
            "pplx",
            ["all2all backend: asked for pplx, vLLM used AgRsAll2AllManager (allgather_reducescatter)"],
        ),
    ],
)
def test_what_was_asked_follows_the_release_in_the_logs(tmp_path, lines, backend, problems):
    log = tmp_path / "p.log"
    log.write_text("\n".join(lines) + "\n")
    assert verify.problems(verify.read([log]), backend=backend) == problems


def test_every_manager_line_of_the_facts_table_is_recognised():
    from launch import vllm_facts

    for row in vllm_facts.load():
        for entries in row["backends"].values():
            for entry in entries:
                label = verify.label_of(entry["log"])
                assert label is not None, (row["version"], entry["log"])
                assert verify.backend_of(label) is not None
