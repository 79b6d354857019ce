"""Preflight's collective checks, for real on a CPU: gloo across 2 and 3 worker processes (the same code
as NCCL on GPUs), a rank that hangs or dies, the benchmark's table, and two "nodes" in network
namespaces meeting at the primary's rendezvous. Speeds are reported, never asserted; what is asserted
is exact data, nccl-tests' busbw relation, the bounds, and that failures name what went wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from preflight import bench, collectives, rendezvous
from preflight.collectives import KiB, MiB
from tests.conftest import ROOT, run_module

CHECKS = ROOT / "preflight" / "checks"
GLOO = {"EP_PREFLIGHT_BACKEND": "gloo", "EP_PREFLIGHT_NPROCS": "2"}
NO_FAULTS = (
    "EP_PREFLIGHT_TEST_HANG_RANK",
    "EP_PREFLIGHT_TEST_EXIT_RANK",
    "EP_PREFLIGHT_TEST_FAULT_AT",
    "EP_PREFLIGHT_RENDEZVOUS_PORT",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in NO_FAULTS and not k.startswith(("EP_PREFLIGHT_", "GLOO_", "EP_DEPLOY"))
    }
    path = os.pathsep.join([str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    return {**env, "PYTHONPATH": path, **extra}


def preflight(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "preflight", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )
    return proc, time.monotonic() - start


def summary_line(out: str, name: str) -> str:
    """The verdict line of one check in preflight's summary."""
    found = [ln for ln in out.splitlines() if ln[:5].strip() in ("PASS", "FAIL", "SKIP", "ERROR") and f" {name}" in ln]
    assert found, f"no summary line for {name!r} in:\n{out}"
    return found[0]


def assert_nccl_tests_relation(rows: list[dict], n: int) -> None:
    """busbw = algbw * 2(n-1)/n (all-reduce), algbw * (n-1)/n (all-to-all); algbw = size / time."""
    assert rows
    for r in rows:
        factor = 2 * (n - 1) / n if r["collective"] == "all_reduce" else (n - 1) / n
        assert r["busbw"] == pytest.approx(r["algbw"] * factor, abs=2e-3), r
        assert r["algbw"] == pytest.approx(r["size"] / r["time_us"] / 1e3, rel=1e-2, abs=2e-3), r
        assert r["wrong"] == 0, r


# --- pure parts, from tables -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("collective", "n", "factor"),
    [
        ("all_reduce", 2, 1.0),
        ("all_reduce", 3, 4 / 3),
        ("all_reduce", 8, 1.75),
        ("all_reduce", 16, 1.875),
        ("all_to_all", 2, 0.5),
        ("all_to_all", 3, 2 / 3),
        ("all_to_all", 8, 0.875),
        ("all_reduce", 1, 0.0),
    ],
)
def test_bus_factor_is_nccl_tests_formula(collective, n, factor):
    assert collectives.bus_factor(collective, n) == pytest.approx(factor)


@pytest.mark.parametrize(
    ("text", "size", "label"),
    [
        ("65536", 65536, "64 KiB"),
        ("64K", 64 * KiB, "64 KiB"),
        ("64KiB", 64 * KiB, "64 KiB"),
        ("1m", MiB, "1 MiB"),
        ("1G", 1024**3, "1 GiB"),
        ("1536", 1536, "1.5 KiB"),
        ("100", 100, "100 B"),
    ],
)
def test_sizes_parse_and_print_in_binary_units(text, size, label):
    assert collectives.parse_size(text) == size
    assert collectives.size_label(size) == label


@pytest.mark.parametrize("text", ["0", "-1M", "1X", "", "M"])
def test_bad_sizes_say_what_was_expected(text):
    with pytest.raises(ValueError, match="expected a positive number of bytes"):
        collectives.parse_size(text)


def test_all_to_all_buffers_split_into_equal_chunks():
    assert collectives.element_count("all_to_all", MiB, 3) == 262143  # 262144 rounded down to 3 x 87381
    assert collectives.element_count("all_reduce", MiB, 3) == 262144
    assert collectives.size_label(262143 * 4) == "1 MiB"


@pytest.mark.parametrize("n", [2, 3, 5])
def test_encoded_values_say_who_sent_what(n):
    """The expected layouts are what a correct exchange produces (done here by hand, chunk by chunk)."""
    import torch

    count = collectives.element_count("all_to_all", 4 * KiB, n)
    chunk = count // n
    inputs = [collectives.alltoall_input(r, n, count, "cpu") for r in range(n)]
    for r in range(n):
        received = torch.cat([inputs[j][r * chunk : (r + 1) * chunk] for j in range(n)])
        assert torch.equal(received, collectives.alltoall_expected(r, n, count, "cpu"))
    total = sum(collectives.allreduce_input(r, 1000, "cpu") for r in range(n))
    assert torch.equal(total, collectives.allreduce_expected(n, 1000, "cpu"))
    # a chunk delivered to the wrong rank is caught
    assert not torch.equal(inputs[0][:chunk], collectives.alltoall_expected(1, n, count, "cpu")[:chunk])


@pytest.mark.parametrize(
    ("names", "all_reduce", "all_to_all"),
    [
        (["NVIDIA H200", "NVIDIA H200"], 150.0, 100.0),  # the lent machine (shared/facts)
        (["NVIDIA H100 80GB HBM3"] * 8, 150.0, 100.0),
        (["NVIDIA B200"] * 8, 150.0, 100.0),
        (["NVIDIA H100-SXM5-80GB"] * 8, 150.0, 100.0),
        (["NVIDIA H800"] * 8, None, None),
        (["NVIDIA H100 PCIe"] * 2, None, None),
        (["NVIDIA H200 NVL"] * 2, None, None),
        (["NVIDIA A10G"] * 4, None, None),
        (["NVIDIA H100 80GB HBM3", "NVIDIA H200"], None, None),
        ([], None, None),
    ],
)
def test_busbw_minimum_comes_from_the_gpu_model(names, all_reduce, all_to_all):
    assert collectives.nvlink_minimum("all_reduce", names)[0] == all_reduce
    assert collectives.nvlink_minimum("all_to_all", names)[0] == all_to_all


@pytest.mark.parametrize(
    ("backend", "nprocs", "expected", "visible", "crossnode", "want"),
    [
        ("gloo", None, None, 0, False, collectives.Workers("gloo", 2)),
        ("gloo", None, 8, 0, True, collectives.Workers("gloo", 1)),
        ("gloo", 3, None, 0, True, collectives.Workers("gloo", 3)),
        ("nccl", None, 8, 0, False, collectives.Workers("nccl", 0, problem="no CUDA GPUs")),
        ("nccl", None, 8, 8, False, collectives.Workers("nccl", 8)),
        ("nccl", None, None, 2, False, collectives.Workers("nccl", 2)),
        ("nccl", None, 8, 2, False, collectives.Workers("nccl", 8, problem="8 GPUs wanted (the plan), 2 visible")),
        (
            "nccl",
            None,
            1,
            1,
            False,
            collectives.Workers("nccl", 1, skip="one GPU on this node: no intra-node collective"),
        ),
        ("nccl", None, 1, 1, True, collectives.Workers("nccl", 1)),
    ],
)
def test_workers_per_node(backend, nprocs, expected, visible, crossnode, want):
    selection = collectives.Selection(backend, nprocs)
    assert collectives.workers_for(selection, expected, visible, crossnode=crossnode) == want


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"EP_PREFLIGHT_BACKEND": "mpi"}, "EP_PREFLIGHT_BACKEND='mpi' (expected one of: gloo, nccl)"),
        ({"EP_PREFLIGHT_NPROCS": "two"}, "EP_PREFLIGHT_NPROCS='two' (expected a whole number >= 1)"),
    ],
)
def test_bad_selection_variables_name_themselves(environ, message):
    with pytest.raises(ValueError) as err:
        collectives.Selection.from_env(environ)
    assert str(err.value) == message


def test_fact_differences_name_the_values_and_the_nodes():
    facts = {
        0: {"torch": "2.11.0", "nccl": "2.28.9", "vllm": None},
        1: {"torch": "2.11.0", "nccl": "2.27.3", "vllm": None},
        2: {"torch": "2.11.0", "nccl": "2.28.9", "vllm": "0.26.0"},
    }
    diffs = rendezvous.differences(facts, ["torch", "nccl", "vllm"])
    assert diffs == {"nccl": {"2.28.9": [0, 2], "2.27.3": [1]}, "vllm": {"None": [0, 1], "0.26.0": [2]}}
    assert (
        rendezvous.describe_difference(diffs)
        == "nccl: 2.28.9 on nodes 0, 2, 2.27.3 on node 1; vllm: absent on nodes 0, 1, 0.26.0 on node 2"
    )
    assert rendezvous.describe_same(facts, ["torch"]) == "torch 2.11.0 on 3 nodes"


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U22)  Tue Sep 23 2025\n"
            "GCC version:  gcc version 12.3.0\n",
            "580.159.04",
        ),
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.129.03  Thu Oct 19 18:56:32 UTC 2023\n", "535.129.03"),
        ("garbage\n", None),
    ],
)
def test_driver_version_from_procfs(tmp_path, text, version):
    path = tmp_path / "version"
    path.write_text(text)
    assert rendezvous.driver_version(str(path)) == version
    assert rendezvous.driver_version(str(tmp_path / "absent")) is None


def test_model_digest_tells_checkpoints_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(rendezvous, "BIG_FILE", 4 * MiB)
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "config.json").write_text('{"num_experts": 8}')
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * (5 * MiB // 256))  # "big": head and tail
    assert rendezvous.model_digest(str(a)) == rendezvous.model_digest(str(b))
    assert "(2 files, " in rendezvous.model_digest(str(a))
    with open(b / "model.safetensors", "r+b") as f:  # last byte differs: the tail is hashed
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    assert rendezvous.model_digest(str(a)) != rendezvous.model_digest(str(b))
    assert rendezvous.model_digest(str(tmp_path / "absent")) is None


def test_rendezvous_port_is_rpc_port_plus_one_unless_set():
    assert rendezvous.rendezvous_port(13345, {}) == 13346
    assert rendezvous.rendezvous_port(13345, {"EP_PREFLIGHT_RENDEZVOUS_PORT": "29400"}) == 29400
    with pytest.raises(rendezvous.RendezvousError, match="expected a TCP port"):
        rendezvous.rendezvous_port(13345, {"EP_PREFLIGHT_RENDEZVOUS_PORT": "99999"})


def test_bench_table_reads_back():
    rows = [
        collectives.Row("all_reduce", MiB, MiB // 4, "float", 1234.5, 0.849, 0.849, 0),
        collectives.Row("all_to_all", 1073741824, 268435456, "float", 3270.12, 328.347, 164.173, 7),
    ]
    lines = bench.table_lines(rows)
    assert lines[0].split() == ["#", "size", "count", "type", "redop", "time", "algbw", "busbw", "#wrong"]
    assert lines[1].split() == ["#", "(B)", "(elements)", "(us)", "(GB/s)", "(GB/s)"]
    assert len({len(ln) for ln in lines[2:]}) == 1  # fixed width
    assert bench.parse_table(lines) == [
        {
            "size": MiB,
            "count": MiB // 4,
            "type": "float",
            "redop": "sum",
            "time_us": 1234.5,
            "algbw": 0.849,
            "busbw": 0.849,
            "wrong": 0,
        },
        {
            "size": 1073741824,
            "count": 268435456,
            "type": "float",
            "redop": "none",
            "time_us": 3270.1,
            "algbw": 328.347,
            "busbw": 164.173,
            "wrong": 7,
        },
    ]


# --- real processes on this machine ------------------------------------------------------------------


def test_checks_pass_with_gloo_on_two_processes(tmp_path):
    report = tmp_path / "report.json"
    proc, seconds = preflight("-m", "collective", "--preflight-json", str(report), env=clean_env(**GLOO))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("all-reduce across this node's GPUs", "all-to-all across this node's GPUs"):
        line = summary_line(proc.stdout, name)
        assert line.startswith("PASS") and "(2 ranks, gloo, 0 wrong); cpu: no minimum" in line, line
    assert summary_line(proc.stdout, "all-reduce across nodes").startswith("SKIP  crossnode")
    assert "single node: nothing to compare" in summary_line(proc.stdout, "all-reduce across nodes")
    checks = {c["name"]: c for c in json.loads(report.read_text())["checks"]}
    rows = [dict(r) for c in checks.values() for r in c["extra"].get("rows", [])]
    assert [r["size"] for r in rows if r["collective"] == "all_reduce"] == list(collectives.CPU_SIZES)
    assert_nccl_tests_relation(rows, 2)
    print(
        f"\npreflight -m collective, gloo x 2: {seconds:.1f} s; busbw at 16 MiB: "
        + ", ".join(f"{r['collective']} {r['busbw']} GB/s" for r in rows if r["size"] >= 16 * MiB - 8)
    )


@pytest.mark.skipif(collectives.cuda_devices() > 0, reason="this machine has GPUs: the NCCL checks run for real")
def test_without_gpus_the_nccl_checks_fail_naming_why():
    proc, _ = preflight(str(CHECKS / "test_collectives.py"), env=clean_env())
    assert proc.returncode == 1
    line = summary_line(proc.stdout, "all-reduce across this node's GPUs")
    assert line.startswith("FAIL  collectives") and "no CUDA GPUs" in line and "EP_PREFLIGHT_BACKEND=gloo" in line, line


def _leftovers(tag: str) -> list[int]:
    """Processes still carrying this test's marker in their environment (workers that outlived the run)."""
    left = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("EP_TEST_TAG") == tag:
                left.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return left


def test_a_hung_rank_fails_the_check_within_the_bound_naming_it(tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text(
        "model: tiny-moe\nnodes: [{address: 127.0.0.1, gpus: 2}]\nnetwork: {transport: tcp}\n"
        "preflight: {collective_timeout_s: 6}\n"
    )
    tag = uuid.uuid4().hex
    env = clean_env(**GLOO, EP_PREFLIGHT_TEST_HANG_RANK="1", EP_TEST_TAG=tag)
    proc, seconds = preflight(str(CHECKS / "test_collectives.py"), "--deploy", str(deploy), "--node-rank", "0", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = summary_line(proc.stdout, "all-reduce across this node's GPUs")
    assert line.startswith("FAIL"), line
    assert "all_reduce of 64 KiB did not finish within 6 s: rank(s) 0, 1 did not finish" in line, line
    assert "rank 0: in all_reduce of 64 KiB; rank 1: never reached it (last: process group up)" in line, line
    assert "interface GLOO_SOCKET_IFNAME=lo" in line and "(expected done within 6 s)" in line, line
    assert seconds < 6 + 20, f"took {seconds:.1f} s"  # the bound, plus start-up and the kill
    assert _leftovers(tag) == []
    print(f"\nhung rank: failed after {seconds:.1f} s (bound 6 s + start-up)")


def test_a_dead_rank_is_named_with_its_exit_code():
    tag = uuid.uuid4().hex
    spec = collectives.Spec("gloo", 2, (64 * KiB,), ("all_to_all",), warmup=1, iters=2, timeout_s=60)
    result = collectives.run(spec, clean_env(EP_PREFLIGHT_TEST_EXIT_RANK="1", EP_TEST_TAG=tag))
    assert not result.ok and result.collective == "all_to_all"
    assert result.problem.startswith("all_to_all of 64 KiB: rank 1 exited with code 3 (process group up): "), (
        result.problem
    )
    assert 1 in result.unfinished and "interface GLOO_SOCKET_IFNAME=lo" in result.problem
    assert result.seconds < 60 / 2  # a death does not wait for the deadline
    assert _leftovers(tag) == []


def test_bench_prints_nccl_tests_table_for_three_processes(tmp_path):
    """nccl-tests' layout, read back; the deploy file's minimum fails all-reduce (exit 1), all-to-all has none."""
    deploy = tmp_path / "d.yaml"
    deploy.write_text(
        "model: tiny-moe\nnodes: [{address: 127.0.0.1, gpus: 3}]\nnetwork: {transport: tcp}\n"
        "preflight: {intra_allreduce_busbw_min_gbps: 1000}\n"
    )
    out = tmp_path / "bench.json"
    res = run_module(
        "preflight",
        "bench",
        "--backend",
        "gloo",
        "--nprocs",
        "3",
        "--sizes",
        "64K",
        "1M",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--deploy",
        str(deploy),
        "--node-rank",
        "0",
        "--json",
        str(out),
        env=clean_env(),
        timeout=120,
    )
    assert res.code == 1, res.out + res.err
    lines = res.out.splitlines()
    header = {
        k.strip(): v.strip()
        for k, v in (ln[2:].split(" : ", 1) for ln in lines[:20] if ln.startswith("# ") and " : " in ln)
    }
    assert header["backend"] == "gloo" and header["processes"] == "3" and header["deploy"] == str(deploy)
    assert (
        header["torch"].startswith("2.") and header["interface"] == "GLOO_SOCKET_IFNAME=lo"
    )  # the plan's, from the deploy file
    identities = [ln for ln in lines if ln.startswith("#  Rank ")]
    assert [ln.split()[2] for ln in identities] == ["0", "1", "2"] and all(
        "device     cpu [cpu]" in ln for ln in identities
    )
    rows = bench.parse_table(lines)
    assert [(r["redop"], r["size"]) for r in rows] == [
        ("sum", 65536),
        ("sum", 1048576),
        ("none", 65532),
        ("none", 1048572),
    ]
    for r in rows:
        r["collective"] = "all_reduce" if r["redop"] == "sum" else "all_to_all"
    assert_nccl_tests_relation(rows, 3)
    averages = [float(ln.split(":")[1]) for ln in lines if ln.startswith("# Avg bus bandwidth")]
    assert averages == [
        pytest.approx((rows[0]["busbw"] + rows[1]["busbw"]) / 2, abs=2e-3),
        pytest.approx((rows[2]["busbw"] + rows[3]["busbw"]) / 2, abs=2e-3),
    ]
    assert lines.count("# Out of bounds values : 0 OK") == 2
    footer = [ln for ln in lines if ln.startswith("# all_")]
    assert [ln.rsplit(" ", 1)[1] for ln in footer] == ["OK", "FAILED", "OK", "UNCHECKED"]
    assert "(>= 1000, deploy file) FAILED" in footer[1] and footer[1].startswith("# all_reduce busbw at 1 MiB ")
    saved = json.loads(out.read_text())
    assert saved["version"] == 1 and [c["verdict"] for c in saved["checks"]] == [True, False, True, "unchecked"]
    assert saved["result"]["rows"][1]["busbw"] == rows[1]["busbw"]
    print("\n" + "\n".join(ln for ln in lines if not ln.startswith("#")))


# --- two nodes: network namespaces joined by a veth pair ---------------------------------------------

DEPLOY = """\
model: tiny-moe
nodes:
  - {{address: 10.77.0.1, gpus: 2}}
  - {{address: 10.77.0.2, gpus: 2{extra}}}
rpc_port: {rpc_port}
network: {{transport: tcp, socket_ifname: auto}}
preflight: {{rendezvous_timeout_s: {rendezvous}, collective_timeout_s: {collective}}}
"""


def start_in(host, deploy: Path, rank: int, report: Path, **env: str) -> subprocess.Popen:
    argv = host.cmd(
        sys.executable,
        "-m",
        "preflight",
        "-m",
        "multinode",
        "--deploy",
        str(deploy),
        "--node-rank",
        str(rank),
        "--preflight-json",
        str(report),
    )
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=clean_env(EP_PREFLIGHT_BACKEND="gloo", **env),
    )


def finish(procs: list[subprocess.Popen], timeout: float) -> tuple[list[tuple[int, str]], float]:
    start = time.monotonic()
    out = [(p.returncode, p.communicate(timeout=timeout)[0]) for p in procs]
    return [(p.returncode, text) for p, (_, text) in zip(procs, out, strict=True)], time.monotonic() - start


def test_two_nodes_meet_compare_and_run_collectives(two_hosts, tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text(DEPLOY.format(extra="", rpc_port=13345, rendezvous=30, collective=60))
    start = time.monotonic()
    # 2 workers on the primary, 1 on the secondary: a world of 3, ranks 0-1 and 2
    procs = [
        start_in(two_hosts[0], deploy, 0, tmp_path / "n0.json", EP_PREFLIGHT_NPROCS="2"),
        start_in(two_hosts[1], deploy, 1, tmp_path / "n1.json", EP_PREFLIGHT_NPROCS="1"),
    ]
    results, _ = finish(procs, timeout=120)
    seconds = time.monotonic() - start
    for rank, ((code, out), host) in enumerate(zip(results, two_hosts, strict=True)):
        assert code == 0, out
        assert f"node {rank} of 2 ({'primary' if rank == 0 else 'secondary'} 10.77.0.{rank + 1})" in out
        line = summary_line(out, "every node joined the rendezvous")
        assert line.startswith("PASS  crossnode") and "2 of 2 nodes at 10.77.0.1:13346 in " in line, line
        for group in rendezvous.GROUPS:
            assert summary_line(out, f"same on every node [{group}]").startswith("PASS"), out
        for name in ("all-reduce across nodes", "all-to-all across nodes"):
            line = summary_line(out, name)
            assert (
                line.startswith("PASS")
                and f"(3 ranks on 2 nodes, gloo, GLOO_SOCKET_IFNAME={host.ifname}, 0 wrong)" in line
            ), line
        report = json.loads((tmp_path / f"n{rank}.json").read_text())
        rows = [r for c in report["checks"] for r in c["extra"].get("rows", [])]
        assert_nccl_tests_relation(rows, 3)
    print(f"\ntwo nodes, world of 3: both READY in {seconds:.1f} s")


def test_a_wrong_interface_fails_every_node_fast_naming_it(two_hosts, tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text(DEPLOY.format(extra=", socket_ifname: nosuch0", rpc_port=13355, rendezvous=30, collective=60))
    procs = [start_in(h, deploy, r, tmp_path / f"n{r}.json") for r, h in enumerate(two_hosts)]
    results, seconds = finish(procs, timeout=120)
    want = "node 1 (10.77.0.2): socket interface 'nosuch0' (GLOO_SOCKET_IFNAME) does not exist on this node"
    for code, out in results:
        assert code == 1, out
        for name in ("all-reduce across nodes", "all-to-all across nodes"):
            line = summary_line(out, name)
            assert line.startswith("FAIL") and want in line, line
    assert seconds < 30, f"took {seconds:.1f} s: not fast (the bounds are 30 s / 60 s)"
    print(f"\nwrong interface: both nodes failed in {seconds:.1f} s")


def test_a_missing_node_fails_within_the_bound_naming_it(two_hosts, tmp_path):
    primary, secondary = two_hosts
    alone = tmp_path / "alone.yaml"
    alone.write_text(DEPLOY.format(extra="", rpc_port=13365, rendezvous=3, collective=60))
    # the secondary looks for a primary on another port, where nobody listens: both wait alone, at once
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(DEPLOY.format(extra="", rpc_port=13375, rendezvous=3, collective=60))
    procs = [start_in(primary, alone, 0, tmp_path / "n0.json"), start_in(secondary, elsewhere, 1, tmp_path / "n1.json")]
    (code0, out0), (code1, out1) = finish(procs, timeout=120)[0]
    assert code0 == 1 and code1 == 1, out0 + out1
    line = summary_line(out0, "every node joined the rendezvous")
    assert (
        line.startswith("FAIL")
        and "rank(s) 1 (10.77.0.2) did not join the rendezvous at 10.77.0.1:13366 within 3 s" in line
    ), line
    line = summary_line(out1, "every node joined the rendezvous")
    assert line.startswith("FAIL") and "cannot reach the primary's rendezvous at 10.77.0.1:13376 within 3 s" in line, (
        line
    )
    assert f"this node's socket interface: {secondary.ifname}" in line, line
    for out in (out0, out1):
        assert summary_line(out, "all-reduce across nodes").startswith("SKIP"), out
    for report in ("n0.json", "n1.json"):
        joined = next(
            c
            for c in json.loads((tmp_path / report).read_text())["checks"]
            if c["name"] == "every node joined the rendezvous"
        )
        assert joined["seconds"] < 3 + 10, joined  # the bound, plus collecting facts
