"""The EP checks: DeepEP's size hint and bandwidth accounting against DeepEP's own printed figures, the
self-describing data and its host reference, the judges with recorded figures, NVSHMEM's lines translated
into fixes, the EP memory budget with real models' config.json values, and `python -m preflight -m ep`
on a machine without GPUs (every check ends with its reason)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from packaging.version import Version

from preflight import ep, ep_memory, rendezvous
from preflight.ep import Shape
from tests.conftest import ROOT, run_module
from tests.recorded import DEEPSEEK_V3, QWEN3_30B_A3B

GiB = 1024**3

# config.json of https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (the fields the budget reads)
# https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json


# --- DeepEP's own arithmetic, against what DeepEP printed --------------------------------------------


def test_low_latency_size_hint_is_the_one_deepep_prints():
    # tests/test_low_latency.py defaults (128 tokens, hidden 7168, 288 experts) on 8 ranks printed
    # "Allocating buffer size: 2146.961792 MB ..." (yangwhale/gpu-tpu-pedia gpu/deepep/readme.md, B200 x 8)
    assert ep_memory.ll_rdma_bytes(128, 7168, 8, 288) == 2_146_961_792
    # the one-GPU run of shared/facts/deepep-builds-1xH200 (64 tokens, hidden 2048, 8 experts): 8.52 MB
    assert ep_memory.ll_rdma_bytes(64, 2048, 1, 8) == 8_520_064
    # the layout does not depend on the rank count, only on the experts and tokens
    assert ep_memory.ll_rdma_bytes(128, 7168, 64, 288) == ep_memory.ll_rdma_bytes(128, 7168, 8, 288)


def test_low_latency_bandwidth_reproduces_deepeps_printout():
    # Same run: "[rank 0] Dispatch + combine bandwidth: 256.81 GB/s, avg_t=85.85 us". 128 tokens x top-8
    # less the 10 slots the test masks at random: 1014 selections.
    idx = torch.arange(128 * 8).view(128, 8)
    idx.view(-1)[:10] = -1
    dispatch, combine = ep.ll_bytes(idx, 7168)
    assert (dispatch, combine) == (1014 * (7168 + 224 + 16), 1014 * 7168 * 2)
    assert ep.gbps(dispatch + combine, 85.85e-6) == pytest.approx(256.81, abs=0.05)


@pytest.mark.parametrize(
    "gpu, backend, nodes, minimum",
    [
        ("NVIDIA H200", "deepep_low_latency", 1, 9.35),  # half of DeepEP's own 18.7 GB/s on one H200
        ("NVIDIA H200", "deepep_low_latency", 2, None),  # across nodes: the fabric decides, no figure
        ("NVIDIA H200", "deepep_high_throughput", 1, None),
        ("NVIDIA H100 80GB HBM3", "deepep_low_latency", 1, None),  # not measured: reported only
    ],
)
def test_bandwidth_minimum_comes_from_a_measured_figure(gpu, backend, nodes, minimum):
    got, why = ep.bandwidth_minimum(backend, [gpu], nodes)
    assert got == minimum and why
    if minimum:
        # the recorded one-GPU figures (v1 18.7 GB/s, v2 legacy 36.5 GB/s) pass; a rank 5x slower does not
        assert all(figure >= got for figure in (18.7, 36.5)) and got > 18.7 / 5


def h200_run(*gbps: float) -> ep.Result:
    ranks = [
        ep.Rank(r, "gpu-node", f"cuda:{r} 0000:{0x18 + r:02x}:00.0", "NVIDIA H200", "no RDMA NIC", gbps=g, time_us=60.0)
        for r, g in enumerate(gbps)
    ]
    return ep.Result("deepep_low_latency", len(gbps), {}, ranks=ranks)


def test_the_recorded_one_gpu_figures_pass_and_a_slow_rank_is_named():
    minimum, _ = ep.bandwidth_minimum("deepep_low_latency", ["NVIDIA H200"], 1)
    for figure in (18.7, 36.5):  # DeepEP v1 73b6ea4 and v2 d4f41e4 (legacy) on one H200
        assert ep.judge_bandwidth(h200_run(figure), minimum)[0]
    ok, value = ep.judge_bandwidth(h200_run(18.7, 3.1), minimum)
    assert not ok and value.startswith("slowest rank 1 (gpu-node, cuda:1 0000:19:00.0): 3.10 GB/s")
    assert ep.judge_bandwidth(h200_run(0.5), None)[0]  # no minimum: reported, never failed


# --- what the kernels can run -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, shape, world, says",
    [
        ("deepep_low_latency", Shape(2048, 128, 8, 256), 1, ""),  # Qwen3-30B-A3B on one GPU
        ("deepep_low_latency", Shape(7168, 256, 8, 256), 16, ""),  # DeepSeek-V3 on 16
        ("deepep_low_latency", Shape(256, 8, 2, 256), 2, "hidden size 256 is not one DeepEP's low-latency kernels"),
        ("deepep_high_throughput", Shape(256, 8, 2, 256), 2, ""),  # no such limit there
        ("deepep_low_latency", Shape(7168, 256, 8, 256), 3, "256 experts do not divide by 3 EP ranks"),
        ("pplx", Shape(7168, 256, 8, 256), 8, "runs no EP kernel library"),
        # vLLM's wide-EP recipe raises the chunk to 512 and sets NVSHMEM_QP_DEPTH=1512 for that reason
        ("deepep_low_latency", Shape(7168, 256, 8, 512), 16, "need NVSHMEM_QP_DEPTH >= 1026"),
        ("deepep_high_throughput", Shape(7168, 256, 8, 256), 16, ""),  # two nodes of 8
    ],
)
def test_shapes_the_kernels_refuse_are_named(backend, shape, world, says):
    got = ep.unsupported(backend, shape, world, min(world, 8))
    assert (says in got) if says else got == ""


def test_high_throughput_on_one_gpu_is_a_skip_with_the_reason():
    assert "need 2, 4 or 8 ranks" in ep.needs_more_ranks("deepep_high_throughput", 1)
    assert ep.needs_more_ranks("deepep_high_throughput", 8) == ""
    assert ep.needs_more_ranks("deepep_low_latency", 1) == ""  # a single-rank low-latency buffer works


# --- the data says who sent it, to whom, and where ---------------------------------------------------

SHAPE = Shape(hidden=2048, experts=16, topk=4, max_tokens=64)


def test_token_data_is_exact_in_bf16_and_decodes_to_sender_and_position():
    x = token_data = ep.token_data(5, SHAPE.tokens, SHAPE.hidden)
    assert x.dtype == torch.bfloat16
    assert torch.equal(x.float(), x.float().round())  # small integers only
    assert x[:, 0].eq(5).all() and torch.equal(x[:, 1].long(), torch.arange(SHAPE.tokens))
    assert not torch.equal(token_data[0, 2:], ep.token_data(6, SHAPE.tokens, SHAPE.hidden)[0, 2:])  # senders differ


def test_routing_picks_distinct_experts_and_masks_some_slots():
    idx = ep.routing(3, SHAPE.tokens, SHAPE.experts, SHAPE.topk)
    for row in idx.tolist():
        chosen = [e for e in row if e >= 0]
        assert len(chosen) == len(set(chosen)) and all(0 <= e < SHAPE.experts for e in chosen)
    assert (idx == -1).sum() > 0 and (idx == -1).sum(dim=1).max() == 1
    assert ep.weights(2, 8).sum(dim=1).tolist() == [1.0, 1.0]  # powers of two: exact sums


def simulate_low_latency(world: int, shape: Shape) -> dict[int, torch.Tensor]:
    """What correct low-latency dispatch hands each expert: every (sender, token) that chose it."""
    out: dict[int, list] = {e: [] for e in range(shape.experts)}
    for s in range(world):
        x, idx = ep.token_data(s, shape.tokens, shape.hidden), ep.routing(s, shape.tokens, shape.experts, shape.topk)
        for t, row in enumerate(idx.tolist()):
            for e in row:
                if e >= 0:
                    out[e].append(x[t])
    return {e: torch.stack(rows) for e, rows in out.items()}


def test_correct_dispatch_passes_for_every_expert_of_every_rank():
    world = 4
    received = simulate_low_latency(world, SHAPE)
    local = SHAPE.experts // world
    for rank in range(world):
        for e in range(rank * local, (rank + 1) * local):
            rows = received[e][torch.randperm(len(received[e]))]  # arrival order is DeepEP's business
            assert ep.check_rows(rows, ep.expected_rows(rank, world, SHAPE, e), SHAPE) == (0, "")


@pytest.mark.parametrize(
    "damage, wrong, says",
    [
        (lambda r: r.__setitem__((3, 100), 99.0), 1, "1 of 2048 elements differ"),
        # relabelled as another sender's: a row that should not be here, and the real one missing
        (lambda r: r.__setitem__((2, 0), 3.0), 2 * 2048, "not sent to this rank"),
        (lambda r: r.__setitem__(1, r[0]), 2 * 2048, "a duplicate"),  # one row twice, one missing
    ],
)
def test_damaged_dispatch_is_counted_per_element(damage, wrong, says):
    world, expert = 4, 1
    rows = simulate_low_latency(world, SHAPE)[expert].clone()
    damage(rows)
    got, problem = ep.check_rows(rows, ep.expected_rows(0, world, SHAPE, expert), SHAPE)
    assert got == wrong and says in problem


def test_missing_rows_are_named():
    rows = simulate_low_latency(4, SHAPE)[0]
    got, problem = ep.check_rows(rows[:-2], ep.expected_rows(0, 4, SHAPE, 0), SHAPE)
    assert got == 2 * 2048 and "2 rows never arrived" in problem


def test_combine_references_match_a_plain_loop():
    world, rank = 4, 2
    x = ep.token_data(rank, SHAPE.tokens, SHAPE.hidden).float()
    idx = ep.routing(rank, SHAPE.tokens, SHAPE.experts, SHAPE.topk).tolist()
    w = ep.weights(SHAPE.tokens, SHAPE.topk).tolist()
    local = SHAPE.experts // world
    ll = torch.stack(
        [x[t] * sum(w[t][k] * ep.expert_scale(e) for k, e in enumerate(idx[t]) if e >= 0) for t in range(SHAPE.tokens)]
    )
    ht = torch.stack([x[t] * len({e // local for e in idx[t] if e >= 0}) for t in range(SHAPE.tokens)])
    assert torch.equal(ep.expected_combined_ll(rank, SHAPE), ll.to(torch.bfloat16))
    assert torch.equal(ep.expected_combined_ht(rank, world, SHAPE), ht.to(torch.bfloat16))
    got = ep.expected_combined_ll(rank, SHAPE).clone()
    got[7, 9] += 1
    n, problem = ep.compare(got, ep.expected_combined_ll(rank, SHAPE))
    assert n == 1 and problem.startswith("token 7: 1 of 2048")


# --- NVSHMEM's and DeepEP's words, translated ---------------------------------------------------------


@pytest.mark.parametrize(
    "line, fix",
    [
        # NVSHMEM 3.4.5 src/host/transport/transport.cpp:282 (printed on the one-GPU H200 run without a NIC)
        (
            "/nvshmem/src/host/transport/transport.cpp:282: init failed for transport: IBGDA",
            "NVSHMEM_IBGDA_NIC_HANDLER=cpu",
        ),
        (
            "src/modules/transport/ibgda/ibgda.cpp:411: NVSHMEM_IBGDA_NIC_HANDLER=cpu requires GDRCopy.",
            "modprobe gdrdrv",
        ),
        (
            "mem_heap.cpp:2267: nvshmem malloc failed (hint: check if total allocation has exceeded NVSHMEM symmetric size = "
            "1073741824, NVSHMEM symmetric size can be increased using NVSHMEM_SYMMETRIC_SIZE environment variable)",
            "raise NVSHMEM_SYMMETRIC_SIZE",
        ),
        ("ibgda.cpp:3805: device mlx5_bond_0 is not enumerated as an mlx5 device. Skipping...", "NVSHMEM_HCA_LIST"),
        ("ibv_modify_qp failed", "NVSHMEM_IB_GID_INDEX"),
        # shared/facts/deepep-builds-1xH200: DeepEP v2 with torch's NCCL 2.28.9
        (
            "AssertionError: Duplicate NCCL runtime found in the current system: /a/libnccl.so.2 and /b/libnccl.so.2",
            "first on PYTHONPATH",
        ),
        ("ImportError: deep_ep/_C.so: undefined symbol: ncclCommQueryProperties", "NCCL >= 2.30.4"),
        ("AssertionError: Unsupported ranks", "2, 4 or 8 GPUs per node"),
        (
            "RuntimeError: Failed: Assertion error csrc/kernels/internode_ll.cu:553 'false and \"Unsupported hidden\"'",
            "deepep_high_throughput",
        ),
    ],
)
def test_nvshmem_and_deepep_lines_become_fixes(line, fix):
    found = ep.translate(f"some other output\n{line}\nmore")
    assert len(found) == 1 and fix in found[0].fix and found[0].said == line[:200]


def test_each_cause_is_named_once_in_output_order():
    text = "init failed for transport: IBGDA\ninit failed for transport: IBGDA\nibv_modify_qp failed\n"
    assert [f.cause.split()[0] for f in ep.translate(text)] == ["NVSHMEM", "the"]
    assert ep.translate("all good\n") == []


# --- naming the rank that did not finish ---------------------------------------------------------------


def test_nearest_nic_is_the_one_sharing_the_gpus_pci_path():
    gpu = "/sys/devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:00.0/0000:18:00.0"
    nics = {
        "mlx5_0": "/sys/devices/pci0000:15/0000:15:01.0/0000:16:00.0/0000:17:01.0/0000:19:00.0",
        "mlx5_1": "/sys/devices/pci0000:97/0000:97:01.0/0000:98:00.0/0000:99:00.0",
    }
    assert ep.nearest_nic(gpu, nics) == "mlx5_0"
    assert ep.nic_for({"NVSHMEM_HCA_LIST": "mlx5_3:1"}, "0000:18:00.0") == "NVSHMEM_HCA_LIST=mlx5_3:1"


def test_a_rank_stuck_in_nvshmem_init_is_named_with_node_gpu_and_nic():
    result = ep.Result("deepep_low_latency", 2, {})
    done = [
        {"at": "identity", "host": "n0", "gpu": "cuda:0 0000:18:00.0", "nic": "mlx5_0"},
        {"at": "result", "ranks": []},
    ]
    stuck = [{"at": "identity", "host": "n0", "gpu": "cuda:1 0000:2a:00.0", "nic": "mlx5_1"}, {"at": "buffer"}]
    ep.explain(
        result,
        [(0, done, None, ""), (1, stuck, None, "transport.cpp:282: init failed for transport: IBGDA\n")],
        timed_out=True,
        timeout_s=300,
    )
    assert result.unfinished == ["rank 1 (n0, cuda:1 0000:2a:00.0, mlx5_1): creating the DeepEP buffer (NVSHMEM init)"]
    assert result.problem.startswith("did not finish within 300 s")
    assert result.fixes and "IBGDA" in result.fixes[0].said


def test_workers_without_a_gpu_end_with_their_error_within_the_bound():
    # Real worker processes: here CUDA is absent, so each says so and the parent names them all.
    spec = ep.Spec("deepep_low_latency", 2, SHAPE, timeout_s=60)
    result = ep.run(spec, {**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert not result.ok and len(result.unfinished) == 2 and result.seconds < 60
    assert "rank 0: " in result.problem and "rank 1 (identity unknown" in result.problem


# --- the EP memory budget ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, experts, topk, moe_layers, billions",
    [
        (DEEPSEEK_V3, 256, 8, 58, 671.0),  # DeepSeek: "Total parameters: 671B" without the MTP module
        (QWEN3_30B_A3B, 128, 8, 48, 30.5),  # Qwen: "Number of Parameters: 30.5B in total"
    ],
)
def test_model_shapes_from_real_configs(config, experts, topk, moe_layers, billions):
    s = ep_memory.moe_shape(config)
    assert (s.experts, s.topk, s.moe_layers) == (experts, topk, moe_layers)
    total = s.expert_params * s.experts * s.moe_layers + s.other_params
    assert total / 1e9 == pytest.approx(billions, abs=0.1)


def test_a_config_without_moe_fields_is_one_line():
    with pytest.raises(
        ep_memory.BudgetError, match=r"^config.json: n_routed_experts / num_experts .*: missing \(expected"
    ):
        ep_memory.moe_shape({"hidden_size": 4096, "num_hidden_layers": 32})


@pytest.mark.parametrize(
    "backend, argv, env, vllm, dp, tokens",
    [
        ("deepep_low_latency", [], {}, "0.26.0", 16, 256),  # scheduler default for batched DP
        ("deepep_low_latency", ["--max-num-batched-tokens", "512"], {}, "0.26.0", 16, 512),
        ("deepep_high_throughput", [], {}, "0.26.0", 16, 8192),  # the server's default
        ("deepep_low_latency", [], {}, "0.26.0", 1, 8192),  # one DP rank: no batched DP
        ("deepep_low_latency", [], {"VLLM_MOE_DP_CHUNK_SIZE": "512"}, "0.11.1", 16, 512),  # before 0.20.0
        ("deepep_low_latency", ["--max-num-batched-tokens", "512"], {}, "0.10.1.1", 16, 256),
    ],
)
def test_tokens_per_rank_as_vllm_sizes_the_buffers(backend, argv, env, vllm, dp, tokens):
    assert ep_memory.tokens_per_rank(backend, argv, env, Version(vllm), dp) == tokens


def test_eplb_and_sizes_from_the_plan():
    argv = ["--enable-eplb", "--eplb-config", '{"num_redundant_experts": 32}']
    assert ep_memory.redundant_experts(argv) == 32
    assert ep_memory.redundant_experts(argv[1:]) == 0  # without --enable-eplb vLLM places none
    assert ep_memory.parse_size("4g") == 4 * GiB and ep_memory.parse_size("1073741824") == GiB
    with pytest.raises(ep_memory.BudgetError, match="NVSHMEM_SYMMETRIC_SIZE='lots'"):
        ep_memory.parse_size("lots")


def plan(ep_size: int, **kw) -> ep_memory.Plan:
    base = {
        "backend": "deepep_low_latency",
        "ep_size": ep_size,
        "tp_size": 1,
        "nodes": ep_size // 8,
        "tokens_per_rank": 256,
        "max_model_len": 32768,
        "gpu_memory_utilization": 0.9,
        "kv_bytes_per_token": 61 * 576 * 2,
    }
    return ep_memory.Plan(**{**base, **kw})


H200 = 143771 * 1024**2  # NVML's memory total on the H200 machine


def test_deepseek_v3_fits_sixteen_h200s_with_every_term_shown():
    b = ep_memory.budget(ep_memory.moe_shape(DEEPSEEK_V3), plan(16), H200)
    names = [t.name for t in b.terms]
    assert names == [
        "weights",
        "EPLB redundant experts",
        "KV cache",
        "DeepEP NVLink buffer",
        "NVSHMEM symmetric heap",
        "MoE activations",
        "CUDA graphs + other activations",
    ]
    terms = {t.name: t.bytes for t in b.terms}
    # 256 tokens, hidden 7168, 256 experts: DeepEP's hint (its printed 2146.96 MB for 128 tokens and 288
    # experts, x 2 x 256 / 288), in NVSHMEM's 512 MiB steps
    assert ep_memory.ll_rdma_bytes(256, 7168, 16, 256) == 3_816_818_816
    assert terms["NVSHMEM symmetric heap"] == 8 * 512 * 1024**2
    assert terms["DeepEP NVLink buffer"] == GiB
    assert b.fits and b.largest.name == "weights"
    lines = ep_memory.table(b, "DeepSeek-V3, EP 16")
    assert lines[0] == "# EP memory budget per GPU: DeepSeek-V3, EP 16" and lines[-1].strip().startswith("total")


def test_too_few_gpus_fail_naming_the_largest_term_and_what_to_change():
    b = ep_memory.budget(ep_memory.moe_shape(DEEPSEEK_V3), plan(4, nodes=1), H200)
    assert not b.fits and b.largest.name == "weights" and "more GPUs" in b.largest.change
    assert "over by" in ep_memory.verdict(b)


def test_redundant_experts_and_a_set_symmetric_size_count():
    shape = ep_memory.moe_shape(DEEPSEEK_V3)
    b = ep_memory.budget(shape, plan(16, redundant_experts=32, nvshmem_symmetric_size=16 * GiB), H200)
    terms = {t.name: t.bytes for t in b.terms}
    assert terms["EPLB redundant experts"] == pytest.approx(shape.expert_bytes / 256 * 32 / 16)
    assert terms["NVSHMEM symmetric heap"] == 16 * GiB  # NVSHMEM reserves what it is told when that is more


# --- through `python -m preflight` on this machine (no GPU, no DeepEP) ---------------------------------


def deploy(tmp_path, backend: str, config: dict, extra: str = "") -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    path = tmp_path / "one.yaml"
    path.write_text(
        f"model: {folder}\nnodes:\n  - {{address: 127.0.0.1, gpus: 1}}\nall2all_backend: {backend}\n"
        f"vllm_version: '0.26.0'\nnetwork: {{transport: tcp, socket_ifname: lo}}\n{extra}"
    )
    return str(path)


def test_without_gpus_or_deepep_every_ep_check_ends_with_its_reason(tmp_path):
    res = run_module(
        "preflight",
        "--deploy",
        deploy(tmp_path, "deepep_low_latency", QWEN3_30B_A3B),
        "--node-rank",
        "0",
        "-m",
        "ep",
        timeout=240,
    )
    assert "FAIL  ep           EP dispatch + combine exact" in res.out
    assert "deep_ep does not import with the plan's environment" in res.out and "fix: build the EP kernels" in res.out
    assert "SKIP  ep           EP dispatch + combine bandwidth" in res.out
    assert "SKIP  ep           EP memory budget fits a GPU" in res.out
    assert res.code == 1 and "Traceback" not in res.out + res.err


def test_a_backend_without_ep_kernels_skips_the_group(tmp_path):
    res = run_module(
        "preflight",
        "--deploy",
        deploy(tmp_path, "allgather_reducescatter", QWEN3_30B_A3B),
        "--node-rank",
        "0",
        "-m",
        "ep",
        timeout=120,
    )
    assert res.out.count("all2all backend allgather_reducescatter uses no EP kernel library") == 3
    assert res.code == 0 and "Traceback" not in res.out + res.err


def test_a_dense_model_is_one_line_with_the_fix(tmp_path):
    dense = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32}
    res = run_module(
        "preflight",
        "--deploy",
        deploy(tmp_path, "deepep_low_latency", dense),
        "--node-rank",
        "0",
        "-m",
        "ep",
        timeout=120,
    )
    assert (
        "config.json: n_routed_experts / num_experts" in res.out
        and "fix: point model: at a mixture-of-experts" in res.out
    )
    assert res.code == 1 and "Traceback" not in res.out + res.err


def test_a_threshold_that_is_not_a_number_fails_the_checks_that_read_it_and_the_suite_runs_on(tmp_path):
    extra = "preflight: {ep_bandwidth_min_gbps: fast, shm_min_gib: -1, ep_memory_reserve_gib: 2}\n"
    deploy(tmp_path, "deepep_low_latency", QWEN3_30B_A3B, extra)  # one.yaml in tmp_path
    picked = "dev_shm or locked_memory or bandwidth"
    res = run_module("preflight", "--deploy", "one.yaml", "--node-rank", "0", "-k", picked, timeout=120, cwd=tmp_path)
    assert res.code == 1 and "Traceback" not in res.out + res.err
    (shm,) = [ln for ln in res.out.splitlines() if "/dev/shm size" in ln]
    assert shm.startswith("FAIL") and shm.endswith(
        "one.yaml: preflight.shm_min_gib: input should be greater than or equal to 0, got -1  "
        "fix: write a number >= 0 in the deploy file's preflight: section, or leave the line out for the default"
    )
    assert "ulimit -l" in res.out  # the next check still ran
    assert "# verdict: NOT READY" in res.out


def test_a_threshold_is_still_refused_by_every_other_command(launch, tmp_path):
    path = deploy(tmp_path, "deepep_low_latency", QWEN3_30B_A3B, "preflight: {ep_bandwidth_min_gbps: fast}\n")
    res = launch("plan", path)
    assert res.code == 2 and res.err == (
        f"error: {path}: preflight.ep_bandwidth_min_gbps: input should be a valid number, got 'fast'\n"
    )


def test_deepep_v2_sizes_its_elastic_buffer_itself():
    """Worked by hand from ElasticBuffer::calculate_buffer_size (DeepEP d4f41e4), DeepSeek-V3's hidden 7168 and
    top-8, 256 tokens per rank. One node of 8: dispatch 8 x 256 tokens of 14,336 + 128 bytes (BF16 + top-k
    indices, weights, source rank and indices) = 29.6 MB, combine 8 x 256 x 14,400: 30 MiB after 2 MiB
    alignment. Four nodes, hybrid: combine's scale-out send (8 x 4 x (256 + 1,280 channels) tokens) leads."""
    mib = 1024**2
    assert ep_memory.elastic_buffer_bytes(256, 7168, 8, 8, 8) == 30 * mib
    assert ep_memory.elastic_buffer_bytes(256, 7168, 8, 32, 8) == 816 * mib
    b = ep_memory.budget(ep_memory.moe_shape(DEEPSEEK_V3), plan(32, backend="deepep_v2"), H200)
    terms = {t.name: t for t in b.terms}
    assert terms["DeepEP v2 ElasticBuffer"].bytes == 816 * mib  # not VLLM_DEEPEP_BUFFER_SIZE_MB: v2 ignores it
    assert terms["NVSHMEM symmetric heap"].bytes == 0 and "NCCL symmetric memory" in terms["NVSHMEM symmetric heap"].how


def test_with_one_data_parallel_rank_vllm_holds_no_ep_buffers():
    b = ep_memory.budget(
        ep_memory.moe_shape(QWEN3_30B_A3B), plan(1, nodes=1, creates_buffers=False, batched_tokens=8192), H200
    )
    terms = {t.name: t for t in b.terms}
    assert terms["DeepEP NVLink buffer"].bytes == 0 == terms["NVSHMEM symmetric heap"].bytes
    assert "data parallel size 1" in terms["NVSHMEM symmetric heap"].how


def test_the_budget_table_alone_for_deepseek_v3_on_two_nodes(tmp_path):
    folder = tmp_path / "dsv3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(DEEPSEEK_V3))  # config only, no weights
    path = tmp_path / "two.yaml"
    path.write_text(
        f"model: {folder}\nnodes:\n  - {{address: 10.0.0.1, gpus: 8}}\n  - {{address: 10.0.0.2, gpus: 8}}\n"
        "all2all_backend: deepep_low_latency\nvllm_version: '0.26.0'\nvllm_args: [--max-model-len, '32768']\n"
        "network: {transport: ib, socket_ifname: lo}\n"
    )
    res = run_module("preflight.ep_memory", "--deploy", str(path), "--node-rank", "1", "--gpu-memory-gib", "139.8")
    assert res.code == 0, res.out + res.err
    assert "# EP memory budget per GPU: node 1 of 2" in res.out and "EP 16" in res.out
    assert "NVSHMEM symmetric heap                4.00 GiB  low-latency size hint (256 tokens/rank" in res.out
    assert "fits" in res.out.splitlines()[-1]


# --- across nodes: who takes part, and where each node's ranks start ------------------------------------

READY = {"problem": "", "backend": "deepep_low_latency", "shape": {"hidden": 7168}}


def test_world_layout_gives_each_node_its_first_rank():
    ready = {0: {**READY, "nprocs": 8}, 1: {**READY, "nprocs": 8}, 2: {**READY, "nprocs": 4}}
    assert ep.world_layout(ready, [], 0, []) == (0, 20, "")
    assert ep.world_layout(ready, [], 2, []) == (16, 20, "")


@pytest.mark.parametrize(
    "ready, missing, says",
    [
        ({0: {**READY, "nprocs": 8}}, [1], "node 1 (10.0.0.2) did not reach the EP check"),
        (
            {0: {**READY, "nprocs": 8}, 1: {**READY, "nprocs": 0, "problem": "deep_ep does not import"}},
            [],
            "node 1 (10.0.0.2): deep_ep does not import",
        ),
        (
            {0: {**READY, "nprocs": 8}, 1: {**READY, "nprocs": 8, "backend": "deepep_high_throughput"}},
            [],
            "nodes disagree on the backend",
        ),
    ],
)
def test_a_node_that_cannot_take_part_fails_every_node_naming_it(ready, missing, says):
    offset, world, problem = ep.world_layout(ready, missing, 0, ["10.0.0.1", "10.0.0.2"])
    assert says in problem and world == 0


def test_two_nodes_meet_for_the_ep_check_and_each_names_the_other(tmp_path):
    # Two preflight processes on this machine play nodes 0 and 1 (127.0.0.1 and 127.0.0.2, both on lo).
    # Neither has DeepEP: each says so at the EP rendezvous, and both fail naming both nodes.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        rpc = s.getsockname()[1]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    path = tmp_path / "two.yaml"
    path.write_text(
        f"model: {folder}\nnodes:\n  - {{address: 127.0.0.1, gpus: 1}}\n  - {{address: 127.0.0.2, gpus: 1}}\n"
        f"rpc_port: {rpc}\nport: {rpc + 7}\nall2all_backend: deepep_low_latency\nvllm_version: '0.26.0'\n"
        "network: {transport: ib, socket_ifname: lo}\npreflight: {rendezvous_timeout_s: 60}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(rendezvous.PORT_VAR, None)
    argv = [sys.executable, "-m", "preflight", "--deploy", str(path), "-m", "ep", "--node-rank"]
    procs = [
        subprocess.Popen(
            [*argv, str(r)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for out in outs:
        assert "FAIL  ep           EP dispatch + combine exact" in out, out
        assert (
            "node 0 (127.0.0.1): deep_ep does not import" in out
            and "node 1 (127.0.0.2): deep_ep does not import" in out
        )
        assert "Traceback" not in out
    assert [p.returncode for p in procs] == [1, 1]


def test_high_throughput_across_nodes_needs_eight_gpus_a_node():
    got = ep.unsupported("deepep_high_throughput", Shape(7168, 256, 8, 256), 8, 4)  # two nodes of 4
    assert "need 8 GPUs per node" in got
