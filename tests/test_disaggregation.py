"""Disaggregated prefill/decode: two vLLM groups joined by NIXL, vllm-router in front, all from one deploy
file. Golden plans for 1P+1D on one node and 2P+2D on four; the argv accepted by real vLLM; the router
command run by the real vllm-router; bad input refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from env.paths import StackPaths
from launch import check, router
from launch.config import load_deploy
from launch.request import Overrides, Request
from launch.resolve import resolve
from tests.conftest import EXAMPLES, ROOT
from tests.support import assert_one_line_error

KV = '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_connector_extra_config":{"backends":["UCX"]}}'


def group_plans(path, group, version="0.26.0"):
    request = Request("plan", deploy=str(path), group=group, overrides=Overrides(vllm_version=version))
    return list(resolve(request, stack=StackPaths(prefix=ROOT)).plans)


def test_one_prefill_one_decode_on_one_node():
    (prefill,) = group_plans(EXAMPLES / "pd-1p1d.yaml", "prefill")
    (decode,) = group_plans(EXAMPLES / "pd-1p1d.yaml", "decode")
    assert prefill.argv == [
        "vllm",
        "serve",
        "deepseek-ai/DeepSeek-V3-0324",
        "--tensor-parallel-size",
        "1",
        "--enable-expert-parallel",
        "--data-parallel-size",
        "4",
        "--data-parallel-size-local",
        "4",
        "--data-parallel-address",
        "10.0.0.1",
        "--data-parallel-rpc-port",
        "13345",
        "--api-server-count",
        "4",
        "--all2all-backend",
        "deepep_high_throughput",
        "--port",
        "8100",
        "--kv-transfer-config",
        KV,
    ]
    assert decode.argv[decode.argv.index("--data-parallel-rpc-port") + 1] == "13445"
    assert decode.argv[decode.argv.index("--all2all-backend") + 1] == "deepep_low_latency"
    assert decode.argv[decode.argv.index("--port") + 1] == "8200"
    # the two groups share the node: disjoint GPUs, side-channel ports that never meet
    assert (prefill.env["CUDA_VISIBLE_DEVICES"], decode.env["CUDA_VISIBLE_DEVICES"]) == ("0,1,2,3", "4,5,6,7")
    assert (prefill.env["VLLM_NIXL_SIDE_CHANNEL_PORT"], decode.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]) == ("5600", "5664")
    assert prefill.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == decode.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.1"
    assert router.argv(load_deploy(EXAMPLES / "pd-1p1d.yaml")) == [
        "vllm-router",
        "--vllm-pd-disaggregation",
        "--prefill",
        "http://10.0.0.1:8100",
        "--decode",
        "http://10.0.0.1:8200",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--policy",
        "round_robin",
        *("--prometheus-host", "0.0.0.0", "--prometheus-port", "29000"),  # its metrics, reachable like its API
    ]


def test_two_prefill_nodes_two_decode_nodes():
    prefill = group_plans(EXAMPLES / "pd-2p2d.yaml", "prefill")
    decode = group_plans(EXAMPLES / "pd-2p2d.yaml", "decode")
    assert [(p.layout.role, p.layout.start_rank, p.layout.primary_address) for p in prefill] == [
        ("primary", 0, "10.0.0.1"),
        ("secondary", 8, "10.0.0.1"),
    ]
    assert [(p.layout.role, p.layout.start_rank, p.layout.primary_address) for p in decode] == [
        ("primary", 0, "10.0.0.3"),
        ("secondary", 8, "10.0.0.3"),
    ]
    assert [p.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] for p in prefill + decode] == [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.4",
    ]
    assert all(p.env["UCX_TLS"] == "rc,cuda_copy,cuda_ipc" for p in prefill + decode)
    assert "--max-num-batched-tokens" in prefill[1].argv and "--max-num-seqs" in decode[1].argv
    assert all(p.argv[-2:] == ["--kv-transfer-config", KV] for p in prefill + decode)
    assert router.argv(load_deploy(EXAMPLES / "pd-2p2d.yaml"))[2:6] == [
        "--prefill",
        "http://10.0.0.1:8100",
        "--decode",
        "http://10.0.0.3:8200",
    ]


def test_each_group_logs_to_its_own_files(tmp_path):
    """Both groups have a node 0: one log_dir, two files, never one file written by two vLLMs."""
    text = (EXAMPLES / "pd-1p1d.yaml").read_text() + f"log_dir: {tmp_path}\n"
    path = tmp_path / "pd.yaml"
    path.write_text(text)
    (prefill,) = group_plans(path, "prefill")
    (decode,) = group_plans(path, "decode")
    assert prefill.log_file == f"{tmp_path}/prefill-node-0.log"
    assert decode.log_file == f"{tmp_path}/decode-node-0.log"


def test_plan_shows_prefill_decode_and_router_together(launch):
    res = launch("plan", str(EXAMPLES / "pd-2p2d.yaml"))
    assert res.code == 0, res.err
    titles = [line for line in res.out.splitlines() if line.startswith("# ") and "node" in line and "DP ranks" in line]
    assert [t.split(":")[0] for t in titles] == [
        "# prefill node 0 (primary 10.0.0.1)",
        "# prefill node 1 (secondary 10.0.0.2)",
        "# decode node 0 (primary 10.0.0.3)",
        "# decode node 1 (secondary 10.0.0.4)",
    ]
    assert res.out.rstrip().endswith(
        "--port 8000 --policy round_robin --prometheus-host 0.0.0.0 --prometheus-port 29000"
    )


@pytest.mark.vllm
@pytest.mark.parametrize("version", ["0.26.0", "0.33.0"])
def test_prefill_and_decode_argv_accepted_by_vllm(version):
    from tests.support import PARSER_PYTHON as PYTHON, parser_of

    folder = parser_of(version)
    plans = [
        p
        for f in ("pd-1p1d.yaml", "pd-2p2d.yaml")
        for g in ("prefill", "decode")
        for p in group_plans(EXAMPLES / f, g, version)
    ]
    answer = check.parse([p.argv[1:] for p in plans], python=str(PYTHON), pythonpath=[str(folder)], timeout=300)
    assert not answer.problem, answer.problem
    assert [r.error for r in answer.results if not r.ok] == []


def router_bin() -> str:
    found = shutil.which("vllm-router")
    if not found:
        if os.environ.get("EP_REQUIRE_VLLM") == "1":
            pytest.fail("vllm-router is not installed (pip install vllm-router)")
        pytest.skip("vllm-router is not installed (pip install vllm-router)")
    return found


def free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def loopback_deploy(write_yaml):
    p, d, r = free_ports(3)
    return write_yaml(f"""model: m
disaggregation:
  connector: {{name: NixlConnector}}
  prefill: {{nodes: [{{address: 127.0.0.1, gpus: 1, gpu_ids: [0]}}], port: {p}, rpc_port: 13345}}
  decode: {{nodes: [{{address: 127.0.0.1, gpus: 1, gpu_ids: [1]}}], port: {d}, rpc_port: 13346}}
  router: {{port: {r}, host: 127.0.0.1}}
"""), (p, d, r)


def test_real_router_reports_absent_groups_unhealthy(write_yaml):
    exe = router_bin()
    deploy, (p, d, r) = loopback_deploy(write_yaml)
    command = router.argv(load_deploy(deploy))
    t0 = time.monotonic()
    proc = subprocess.run(
        [exe, *command[1:], "--worker-startup-timeout-secs", "2", "--worker-startup-check-interval", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0  # it stops, saying which worker never became healthy
    assert f"http://127.0.0.1:{p}" in proc.stdout + proc.stderr and "healthy" in proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 30


def test_serve_proxy_waits_for_both_groups_and_names_the_missing_one(launch, write_yaml):
    router_bin()
    deploy, (p, d, r) = loopback_deploy(write_yaml)
    res = launch("proxy", "--deploy", str(deploy), "--wait-for-groups", "2")
    assert res.code == 3
    assert res.err.strip().splitlines()[-1] == (
        f"error: prefill: the prefill group's API at http://127.0.0.1:{p}/health not ready within 2 s (start serve-prefill on its nodes first)"
    )


PD = """\
model: m
disaggregation:
  connector: {name: NixlConnector}
  prefill: {nodes: [{address: 10.0.0.1, gpus: 4, gpu_ids: [0, 1, 2, 3]}], port: 8100, rpc_port: 13345}
  decode: {nodes: [{address: 10.0.0.1, gpus: 4, gpu_ids: [4, 5, 6, 7]}], port: 8200, rpc_port: 13445}
"""


@pytest.mark.parametrize(
    "edit, expected",
    [
        (
            ("gpu_ids: [4, 5, 6, 7]", "gpu_ids: [3, 4, 5, 6]"),
            "disaggregation.decode.nodes[0].gpu_ids: GPUs [3] of 10.0.0.1 are also used by disaggregation.prefill.nodes[0] (expected disjoint gpu_ids per node)",
        ),
        (
            ("  connector: {name: NixlConnector}\n", ""),
            "disaggregation.connector: missing (expected {name: NixlConnector, backend: UCX or LIBFABRIC}: decode needs the prefill's KV cache)",
        ),
        (
            ("rpc_port: 13445}", "rpc_port: 13445}\n  router: {port: 8200, address: 10.0.0.1}"),
            "disaggregation.router.port: 8200 is also the decode API port on 10.0.0.1 (expected a free port)",
        ),
        (("port: 8200", "port: 8100"), "disaggregation.decode.port: 8100 is also the prefill API port on 10.0.0.1"),
        (
            ("rpc_port: 13445}", "rpc_port: 13445}\n  router: {port: 8000, metrics_port: 8000}"),
            "disaggregation.router.metrics_port: 8000 is also router.port (expected its own port, e.g. 29000)",
        ),
        (
            ("rpc_port: 13445}", "rpc_port: 13445}\n  router: {metrics_port: 8100}"),
            "disaggregation.router.metrics_port: 8100 is also the prefill API port on 10.0.0.1 (expected a free port)",
        ),
        (
            ("rpc_port: 13445}", "rpc_port: 13445}\n  router: {address: 'a b'}"),
            "disaggregation.router.address: 'a b' is neither an IP address nor a host name",
        ),
        (
            ("connector: {name: NixlConnector}", "connector: {name: NixlConnector, backend: TCP}"),
            "disaggregation.connector.backend: input should be 'UCX' or 'LIBFABRIC', got 'TCP'",
        ),
    ],
)
def test_bad_disaggregation_is_one_line(edit, expected, launch, write_yaml):
    path = write_yaml(PD.replace(*edit))
    assert_one_line_error(launch("plan", str(path)), f"{path}: {expected}")


def test_serve_decode_needs_the_section(launch, write_yaml):
    path = write_yaml("model: m\nnodes: [{address: 10.0.0.1}]\n")
    assert_one_line_error(
        launch("decode", "--deploy", str(path), "--node-rank", "0", "--dry-run"),
        f"{path}: disaggregation: missing (serve-decode needs prefill and decode groups in the deploy file)",
    )


def test_serve_prefill_dry_run_on_its_node(launch, write_yaml):
    path = write_yaml(PD.replace("10.0.0.1", "127.0.0.1"))
    res = launch("prefill", "--deploy", str(path), "--dry-run", "--socket-ifname", "lo")
    assert res.code == 0, res.err
    assert "# prefill node 0 (primary 127.0.0.1)" in res.out
    assert "--kv-transfer-config" in res.out and "export VLLM_NIXL_SIDE_CHANNEL_PORT=5600" in res.out
    assert json.loads(KV)["kv_connector"] == "NixlConnector"


def test_preflight_on_a_decode_node_checks_nixl(write_yaml):
    from tests.conftest import run_module

    path = write_yaml(PD.replace("10.0.0.1", "127.0.0.1"))
    res = run_module(
        "preflight",
        "--deploy",
        str(path),
        "--group",
        "decode",
        "--node-rank",
        "0",
        "--socket-ifname",
        "lo",
        "-k",
        "nixl or imports",
    )
    assert "# preflight: " in res.out and "node 0 of 1 (primary 127.0.0.1)" in res.out
    assert "PASS  system       NIXL side-channel ports free" in res.out and "5664..5667 free" in res.out
    assert (
        "import [nixl]" in res.out and "SKIP  imports      import [nixl]" not in res.out
    )  # required for a KV connector
    missing = run_module("preflight", "--deploy", str(path), "-k", "nixl")
    assert missing.code != 0 and "expected --group prefill or --group decode" in missing.out + missing.err
