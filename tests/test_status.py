"""`launch status`: every node's line from its group's /health and the primary's Prometheus /metrics, polled
against stand-in servers that answer as vLLM does (tests/fixtures/fake_vllm_http.py), within one bound."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from launch import status
from launch.config import WATCH_PORT_OFFSET as WATCH, parse_deploy
from tests.support import FAKE_VLLM, free_port, stand_in_launcher, vllm_metrics


@pytest.fixture
def stand_in(tmp_path):
    """Starts a stand-in vLLM API server on 127.0.0.1:PORT serving the given metrics; stops it afterwards."""
    procs = []

    def start(port: int, metrics: str | None = None, health: int = 200) -> None:
        env = {"FAKE_VLLM_DELAY": "0", "FAKE_VLLM_HEALTH": str(health), "PATH": "/usr/bin:/bin"}
        if metrics is not None:
            path = tmp_path / f"metrics-{port}.txt"
            path.write_text(metrics)
            env["FAKE_VLLM_METRICS"] = str(path)
        procs.append(subprocess.Popen([sys.executable, str(FAKE_VLLM), "--port", str(port)], env=env))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"the stand-in did not listen on {port} within 10 s")

    yield start
    for p in procs:
        p.terminate()
        p.wait(5)


@pytest.fixture
def launcher():
    """Stand-in secondary launchers: each answers its watch port with the line launch/peers.py sends."""
    servers = []
    yield lambda address, rank, port: servers.append(stand_in_launcher(address, rank, port))
    for server in servers:
        server.close()


def rpc_port() -> int:
    """An rpc_port whose watch port (+1000) is free on 127.0.0.2."""
    while True:
        port = free_port()
        if port + WATCH <= 65535:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.2", port + WATCH)) != 0:
                    return port


def two_nodes(port: int, rpc: int = 13345, extra: str = "") -> str:
    return (
        f"model: m\nport: {port}\nrpc_port: {rpc}\nnodes:\n  - {{address: 127.0.0.1, gpus: 2}}\n"
        f"  - {{address: 127.0.0.2, gpus: 2}}\n{extra}"
    )


def test_rank_figures_read_vllms_prometheus_text():
    figures = status.rank_figures(vllm_metrics({0: (3, 1, 0.25), 1: (0, 0, 0.0)}))
    assert (figures[0].running, figures[0].waiting, figures[0].kv_use) == (3, 1, 0.25)
    assert (figures[1].running, figures[1].kv_use) == (0, 0.0)
    # vLLM 0.10's older name for the same gauge is read as well.
    assert status.rank_figures(vllm_metrics({0: (1, 0, 0.5)}, old_kv_name=True))[0].kv_use == 0.5


def test_every_node_is_reported_from_its_primarys_metrics(launch, write_yaml, stand_in, launcher):
    port, rpc = free_port(), rpc_port()
    stand_in(port, vllm_metrics({0: (3, 1, 0.25), 1: (2, 0, 0.5), 2: (1, 0, 0.125), 3: (0, 4, 0.75)}))
    launcher("127.0.0.2", 1, rpc + WATCH)
    res = launch("status", str(write_yaml(two_nodes(port, rpc))), "--ranks")
    assert res.code == 0, res.out + res.err
    lines = res.out.splitlines()
    assert "2 nodes, 4 DP ranks; polled 1 endpoints and 1 launchers' watch ports" in lines[0]
    assert "node 0 (primary 127.0.0.1)" in lines[1] and "UP    DP 0..1: running 5 waiting 1 KV 50.0% max" in lines[1]
    assert lines[2:4] == ["  DP    0: running 3 waiting 1 KV 25.0%", "  DP    1: running 2 waiting 0 KV 50.0%"]
    assert "node 1 (secondary 127.0.0.2)" in lines[4] and "UP    DP 2..3: running 1 waiting 4 KV 75.0% max" in lines[4]
    assert lines[-1] == "# verdict: serving"


def test_a_primary_that_is_not_listening_makes_every_node_of_its_group_down(launch, write_yaml):
    res = launch("status", str(write_yaml(two_nodes(free_port()))))
    assert res.code == 1
    down = [line for line in res.out.splitlines() if " DOWN " in line]
    assert len(down) == 2 and all("connection refused" in line for line in down)
    assert "(its group's primary)" in down[1]
    assert res.out.splitlines()[-1] == "# verdict: NOT serving"


def test_an_unhealthy_engine_answers_503_and_is_down(launch, write_yaml, stand_in):
    port = free_port()
    stand_in(port, vllm_metrics({0: (0, 0, 0.0)}), health=503)
    res = launch("status", str(write_yaml(two_nodes(port))))
    assert res.code == 1 and "/health answered 503" in res.out


def test_a_listener_that_never_answers_is_bounded(launch, write_yaml):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections (the kernel's backlog) and never answers
        start = time.monotonic()
        res = launch("status", str(write_yaml(two_nodes(silent.getsockname()[1]))), "--timeout", "1.5")
        took = time.monotonic() - start
    assert res.code == 1 and "no answer within the bound" in res.out
    assert took < 10, took  # the bound held (process start-up included)


def test_ranks_missing_from_the_metrics_are_named(launch, write_yaml, stand_in, launcher):
    port, rpc = free_port(), rpc_port()
    stand_in(port, vllm_metrics({0: (0, 0, 0.0), 1: (0, 0, 0.0)}))
    launcher("127.0.0.2", 1, rpc + WATCH)
    res = launch("status", str(write_yaml(two_nodes(port, rpc))))
    assert res.code == 0, res.out  # its launcher answers: an engine that has not reported yet is no failure
    assert "node 1 (secondary 127.0.0.2)" in res.out and "no metrics for DP 2..3" in res.out


def test_a_secondary_whose_launcher_is_gone_is_down_while_its_primary_serves(launch, write_yaml, stand_in):
    port, rpc = free_port(), rpc_port()
    stand_in(port, vllm_metrics({0: (0, 0, 0.0), 1: (0, 0, 0.0), 2: (0, 0, 0.0), 3: (0, 0, 0.0)}))
    res = launch("status", str(write_yaml(two_nodes(port, rpc))))
    assert res.code == 1
    (line,) = [ln for ln in res.out.splitlines() if "node 1 (secondary 127.0.0.2)" in ln]
    assert " DOWN  DP 2..3: launcher 127.0.0.2:" in line and "the node, or its launcher, is gone" in line
    assert "connect" in line.lower() or "refused" in line.lower(), line
    assert res.out.splitlines()[-1] == "# verdict: NOT serving"


def test_a_watch_port_that_answers_for_another_node_is_not_this_node(launch, write_yaml, stand_in, launcher):
    port, rpc = free_port(), rpc_port()
    stand_in(port, vllm_metrics({0: (0, 0, 0.0)}))
    launcher("127.0.0.2", 5, rpc + WATCH)  # a launcher of another deployment, or another rank
    res = launch("status", str(write_yaml(two_nodes(port, rpc))))
    assert res.code == 1 and "answered 'vllm-ep watch 1 node 5 t0k3n', not this node's launcher" in res.out


def test_with_the_watch_off_only_the_primary_is_asked(launch, write_yaml, stand_in):
    port = free_port()
    stand_in(port, vllm_metrics({0: (0, 0, 0.0)}))
    res = launch("status", str(write_yaml(two_nodes(port, extra="watch: {enabled: false}\n"))))
    assert res.code == 0, res.out
    assert "polled 1 endpoints in" in res.out


def test_prefill_decode_polls_both_primaries_and_the_router(launch, write_yaml, stand_in):
    prefill, decode, router = free_port(), free_port(), free_port()
    stand_in(prefill, vllm_metrics({0: (1, 0, 0.1)}))
    stand_in(decode, vllm_metrics({0: (7, 0, 0.6)}))
    stand_in(router)
    text = f"""model: m
disaggregation:
  connector: {{name: NixlConnector}}
  prefill: {{port: {prefill}, rpc_port: 13345, nodes: [{{address: 127.0.0.1, gpus: 1, gpu_ids: [0]}}]}}
  decode: {{port: {decode}, rpc_port: 13346, nodes: [{{address: 127.0.0.1, gpus: 1, gpu_ids: [1]}}]}}
  router: {{port: {router}}}
"""
    res = launch("status", str(write_yaml(text)))
    assert res.code == 0, res.out + res.err
    assert "prefill node 0 (primary 127.0.0.1)" in res.out and "running 1 waiting 0 KV 10.0% max" in res.out
    assert "decode node 0 (primary 127.0.0.1)" in res.out and "running 7 waiting 0 KV 60.0% max" in res.out
    assert f"router 127.0.0.1:{router}" in res.out and "polled 3 endpoints" in res.out


def test_bad_input_is_one_line(launch, write_yaml):
    res = launch("status", str(write_yaml(two_nodes(8000))), "--timeout", "0")
    assert res.code == 2 and res.err.strip().count("\n") == 0 and "--timeout" in res.err
    placed = write_yaml("model: m\nnodes: [{gpus: 8}, {gpus: 8}]\n")
    res = launch("status", str(placed))
    assert res.code == 2 and "nodes: an address is missing" in res.err and "Traceback" not in res.err


def test_node_line_is_pure():
    config = parse_deploy({"model": "m", "nodes": [{"address": "10.0.0.1", "gpus": 8}]}, "t")
    rows, endpoints = status.targets(config)
    answer = status.Answer(health=200, ranks={r: status.RankFigures(1, 0, 0.5) for r in range(8)})
    assert status.node_line(rows[0], answer, per_rank=False) == [
        f"{'node 0 (primary 10.0.0.1)':<40} UP    DP 0..7: running 8 waiting 0 KV 50.0% max"
    ]
    assert endpoints[0].url == "http://10.0.0.1:8000"
