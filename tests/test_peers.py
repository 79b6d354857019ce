"""The launchers watch each other while vLLM runs: a node that goes away stops the group, naming the node.

Real launchers (`python -m launch serve`) on 127.0.0.1 and 127.0.0.2 (both loopback on Linux, so each
binds its own watch port without a network namespace), each running a stand-in vLLM process tree
(tests/fixtures/fake_vllm_tree.py). Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from launch import peers, wait
from launch.config import WATCH_PORT_OFFSET as WATCH, parse_deploy_text
from launch.layout import layouts
from tests.conftest import FIXTURES, ROOT, run_module
from tests.support import alive

FAKE_TREE = FIXTURES / "fake_vllm_tree.py"
PRIMARY, SECONDARY = "127.0.0.1", "127.0.0.2"
STOP_TIMEOUT = 5.0


def free_port_pair() -> int:
    """An rpc_port whose watch port is free on both addresses."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((PRIMARY, 0))
            rpc = s.getsockname()[1]
        if rpc + WATCH > 65535:
            continue
        try:
            for host in (PRIMARY, SECONDARY):
                with socket.socket() as probe:
                    probe.bind((host, rpc + WATCH))
            return rpc
        except OSError:
            continue
    pytest.fail("no free pair of ports on the loopback addresses")


def deploy_file(tmp_path: Path, rpc: int, *, grace: float = 60, lost: float = 2, enabled: bool = True) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"""model: tiny-moe
vllm_version: 0.26.0
rpc_port: {rpc}
port: {rpc + 2}
network: {{socket_ifname: lo}}
nodes:
  - {{address: {PRIMARY}, gpus: 1}}
  - {{address: {SECONDARY}, gpus: 1}}
watch: {{enabled: {str(enabled).lower()}, startup_grace_s: {grace}, lost_after_s: {lost}}}
"""
    )
    return path


class Node:
    """One launcher running its node of the deploy file, with the stand-in vLLM tree."""

    def __init__(self, tmp_path: Path, deploy: Path, rank: int):
        self.pidfile = tmp_path / f"pids-{rank}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PIDFILE": str(self.pidfile)}
        env.pop("VLLM_ALL2ALL_BACKEND", None)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launch", "serve", "--deploy", str(deploy), "--node-rank", str(rank)]
            + ["--vllm-bin", str(FAKE_TREE), "--wait-for-primary", "0", "--stop-timeout", str(STOP_TIMEOUT)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def tree(self, timeout: float = 20) -> list[int]:
        """The stand-in vLLM's pids, once all five have started."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = self.pidfile.read_text().splitlines() if self.pidfile.exists() else []
            if len(lines) == 5:
                return [int(line.split()[1]) for line in lines]
            if self.proc.poll() is not None:
                pytest.fail(f"the launcher ended early ({self.proc.returncode}): {self.proc.stderr.read()}")
            time.sleep(0.05)
        self.proc.kill()
        pytest.fail(f"the stand-in vLLM did not start within {timeout} s")

    def finish(self, timeout: float) -> tuple[int, str, float]:
        """Exit code, stderr and seconds from now until it ended (killed, and the test failed, past ``timeout``)."""
        start = time.monotonic()
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f"the launcher did not end within {timeout} s: {err}")
        return self.proc.returncode, err, time.monotonic() - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.finish(STOP_TIMEOUT + 10)


def answers(host: str, port: int, timeout: float = 10) -> str:
    """The line a launcher's watch port sends, once it does."""
    end = time.monotonic() + timeout
    why = "not asked"
    while time.monotonic() < end:
        line, why = wait.first_line(host, port, 1.0)
        if line:
            return line
        time.sleep(0.1)
    pytest.fail(f"{host}:{port} sent no watch line within {timeout} s (last try: {why})")


def gone(pids: list[int], timeout: float = 5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


# ---- two launchers, one goes away ---------------------------------------------------------------------------
def test_a_secondary_that_goes_away_stops_the_primary_which_names_it(tmp_path):
    rpc = free_port_pair()
    deploy = deploy_file(tmp_path, rpc, lost=2)
    primary, secondary = Node(tmp_path, deploy, 0), Node(tmp_path, deploy, 1)
    try:
        primary_tree, secondary_tree = primary.tree(), secondary.tree()
        assert answers(PRIMARY, rpc + WATCH).startswith("vllm-ep watch 1 node 0 ")
        assert answers(SECONDARY, rpc + WATCH).startswith("vllm-ep watch 1 node 1 ")
        time.sleep(1)  # the primary has heard the secondary answer (it asks every 0.5 s)

        secondary.proc.kill()  # the launcher, as a dead machine would: nothing of it answers any more
        assert gone(secondary_tree), "the secondary's vLLM outlived its launcher"
        code, err, took = primary.finish(timeout=2 + 1 + STOP_TIMEOUT + 10)
    finally:
        primary.stop()
        secondary.stop()
    assert code == 3, err
    assert "node 1 (secondary 127.0.0.2) stopped answering on its launcher's watch port" in err
    assert f"127.0.0.2:{rpc + WATCH}" in err and "connect: Connection refused" in err
    assert "node 1 (secondary 127.0.0.2) is gone: stopping vLLM" in err  # the supervised stop, SIGTERM's way
    assert took < 2 + 0.5 + 1 + STOP_TIMEOUT, f"the primary took {took:.1f} s to stop"
    assert gone(primary_tree), "the primary's vLLM tree was not stopped"
    assert err.count("error: ") == 1 and err.strip().splitlines()[-1].startswith("error: node 1 (secondary 127.0.0.2)")


def test_a_secondary_whose_vllm_dies_stops_the_primary(tmp_path):
    """The secondary's vLLM dies; its launcher stops what is left of it and ends, and so stops answering."""
    rpc = free_port_pair()
    deploy = deploy_file(tmp_path, rpc, lost=2)
    primary, secondary = Node(tmp_path, deploy, 0), Node(tmp_path, deploy, 1)
    try:
        primary_tree = primary.tree()
        secondary.tree()
        answers(SECONDARY, rpc + WATCH)
        time.sleep(1)
        parent = next(int(line.split()[1]) for line in secondary.pidfile.read_text().splitlines() if "parent" in line)
        os.kill(parent, signal.SIGKILL)
        code, _, _ = secondary.finish(timeout=STOP_TIMEOUT + 10)
        assert code == 128 + signal.SIGKILL  # vLLM's own end, passed on as before
        code, err, took = primary.finish(timeout=2 + 1 + STOP_TIMEOUT + 10)
    finally:
        primary.stop()
        secondary.stop()
    assert code == 3, err
    assert "error: node 1 (secondary 127.0.0.2) stopped answering on its launcher's watch port" in err
    assert took < 2 + 0.5 + 1 + STOP_TIMEOUT
    assert gone(primary_tree)


def test_a_secondary_stops_its_vllm_when_the_primary_goes_away(tmp_path):
    rpc = free_port_pair()
    deploy = deploy_file(tmp_path, rpc, lost=2)
    primary, secondary = Node(tmp_path, deploy, 0), Node(tmp_path, deploy, 1)
    try:
        primary.tree()
        secondary_tree = secondary.tree()
        answers(PRIMARY, rpc + WATCH)
        time.sleep(1)
        primary.proc.kill()
        code, err, took = secondary.finish(timeout=2 + 1 + STOP_TIMEOUT + 10)
    finally:
        primary.stop()
        secondary.stop()
    assert code == 3, err
    assert (
        f"error: node 0 (primary 127.0.0.1) stopped answering on its launcher's watch port 127.0.0.1:{rpc + WATCH}"
        in err
    )
    assert took < 2 + 0.5 + 1 + STOP_TIMEOUT
    assert gone(secondary_tree), "the secondary's vLLM still holds its GPUs"


def test_a_secondary_slow_to_start_is_not_declared_gone_within_the_grace(tmp_path):
    rpc = free_port_pair()
    grace = 6.0
    deploy = deploy_file(tmp_path, rpc, grace=grace, lost=1)
    primary = Node(tmp_path, deploy, 0)
    secondary = None
    try:
        primary.tree()
        time.sleep(3)  # the secondary starts late: far past lost_after_s, within the grace
        assert primary.proc.poll() is None, primary.finish(1)[1]
        secondary = Node(tmp_path, deploy, 1)
        secondary.tree()
        answers(SECONDARY, rpc + WATCH)
        while time.monotonic() < primary.started + grace + 2:  # past the grace: the secondary answers, all is well
            assert primary.proc.poll() is None, primary.finish(1)[1]
            time.sleep(0.2)
    finally:
        primary.stop()
        if secondary:
            secondary.stop()


def test_a_secondary_that_never_comes_is_declared_gone_after_the_grace(tmp_path):
    rpc = free_port_pair()
    deploy = deploy_file(tmp_path, rpc, grace=2, lost=1)
    primary = Node(tmp_path, deploy, 0)
    try:
        tree = primary.tree()
        code, err, _ = primary.finish(timeout=2 + 1 + STOP_TIMEOUT + 10)
    finally:
        primary.stop()
    assert code == 3, err
    assert "error: node 1 (secondary 127.0.0.2) never answered on its launcher's watch port" in err
    assert "within the start-up grace of 2 s" in err
    assert time.monotonic() - primary.started >= 2
    assert gone(tree)


def test_a_watch_port_in_use_is_refused_before_vllm_starts(tmp_path):
    rpc = free_port_pair()
    deploy = deploy_file(tmp_path, rpc)
    with socket.socket() as taken:
        taken.bind((PRIMARY, rpc + WATCH))
        taken.listen()
        primary = Node(tmp_path, deploy, 0)
        code, err, _ = primary.finish(timeout=30)
    assert code == 2
    assert f"error: watch port 127.0.0.1:{rpc + WATCH} (rpc_port + 1000): Address already in use" in err
    assert not primary.pidfile.exists(), "vLLM started although the watch could not"


def test_with_the_watch_off_a_launcher_serves_alone_and_answers_on_no_watch_port(tmp_path):
    rpc = free_port_pair()
    primary = Node(tmp_path, deploy_file(tmp_path, rpc, grace=1, lost=1, enabled=False), 0)
    try:
        primary.tree()
        time.sleep(2)  # past the grace it would have had: no secondary is missed
        assert primary.proc.poll() is None
        assert wait.first_line(PRIMARY, rpc + WATCH, 1.0) == (None, "connect: Connection refused")
    finally:
        primary.proc.send_signal(signal.SIGTERM)
        code, err, _ = primary.finish(STOP_TIMEOUT + 10)
    assert code == 143, err  # the stand-in dies of SIGTERM: 128 + 15, as before the watch existed
    assert "watch" not in err


# ---- the plan says it; the deploy file turns it off ------------------------------------------------------------
CLUSTER = """model: m
vllm_version: 0.26.0
nodes: [{address: 10.0.0.1}, {address: 10.0.0.2}, {address: 10.0.0.3}]
"""


def test_the_plan_says_whom_each_launcher_watches(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CLUSTER)
    r = run_module("launch", "plan", str(path))
    assert r.code == 0, r.err
    assert (
        "# watch: answers on 10.0.0.1:14345 while vLLM runs (launch serve); watches node 1 (secondary "
        "10.0.0.2:14345), node 2 (secondary 10.0.0.3:14345); a node silent for 30 s (start-up grace 900 s) stops "
        "this node's vLLM; off: watch: {enabled: false}" in r.out
    )
    assert (
        "# watch: answers on 10.0.0.3:14345 while vLLM runs (launch serve); watches node 0 (primary 10.0.0.1:14345)"
        in r.out
    )

    path.write_text(CLUSTER + "watch: {enabled: false}\n")
    r = run_module("launch", "plan", str(path))
    assert r.code == 0, r.err
    assert "watch" not in r.out


@pytest.mark.parametrize(
    "argv",
    [
        ["primary", "10.0.0.1", "13345", "m", "16", "8", "8"],  # the guide's arguments describe this node only
        ["secondary", "10.0.0.1", "13345", "m", "16", "8", "8"],
        ["serve", "--deploy", "ONE_NODE", "--node-rank", "0"],  # nobody to watch
    ],
)
def test_without_a_deploy_file_listing_the_group_there_is_no_watch(tmp_path, argv):
    one = tmp_path / "one.yaml"
    one.write_text("model: m\nnodes: [{address: 10.0.0.1}]\n")
    argv = [str(one) if a == "ONE_NODE" else a for a in argv]
    r = run_module("launch", *argv, "--socket-ifname", "lo", "--vllm-version", "0.26.0", "--dry-run")
    assert r.code == 0, r.err
    assert "vllm serve" in r.out and "watch" not in r.out


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("rpc_port: 65000\n", "rpc_port: 65000 leaves no watch port (rpc_port + 1000; expected at most 64535"),
        ("rpc_port: 7000\n", "rpc_port: 7000 + 1000 (the launchers' watch port) is also port (expected another port"),
    ],
)
def test_an_rpc_port_that_leaves_no_watch_port_is_one_line(tmp_path, extra, expected):
    path = tmp_path / "c.yaml"
    path.write_text(CLUSTER + extra)
    r = run_module("launch", "plan", str(path))
    assert r.code == 2
    assert r.err.strip() == f"error: {path}: {expected}, or watch: {{enabled: false}})"
    path.write_text(CLUSTER + extra + "watch: {enabled: false}\n")
    assert run_module("launch", "plan", str(path)).code == 0


def test_groups_on_one_node_do_not_meet_on_a_watch_port():
    text = """model: m
vllm_version: 0.26.0
disaggregation:
  connector: {name: NixlConnector}
  prefill: {nodes: [{address: 10.0.0.1, gpus: 4, gpu_ids: [0, 1, 2, 3]}], port: 8100, rpc_port: 13345}
  decode: {nodes: [{address: 10.0.0.1, gpus: 4, gpu_ids: [4, 5, 6, 7]}], port: 8200, rpc_port: 13346}
"""
    parse_deploy_text(text, "pd.yaml")  # consecutive rpc ports: watch ports 14345 and 14346
    clash = text.replace("port: 8100", "port: 14346")
    with pytest.raises(
        ValueError, match=r"decode.rpc_port: 13346 \+ 1000 \(the launchers' watch port\) is also the prefill API"
    ):
        parse_deploy_text(clash, "pd.yaml")
    parse_deploy_text(clash + "watch: {enabled: false}\n", "pd.yaml")


def test_a_job_placed_by_a_scheduler_runs_without_the_watch(tmp_path, monkeypatch):
    import tempfile

    from launch.commands import scheduler
    from launch.config import load_deploy

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = parse_deploy_text(CLUSTER, "c.yaml")
    assert config.watch.enabled
    assert not load_deploy(scheduler._placed_file(config, "job-1")).watch.enabled


# ---- the verdict on one peer: what it said, and when -----------------------------------------------------------
PLAN = peers.plan_for(
    parse_deploy_text(CLUSTER + "watch: {startup_grace_s: 100, lost_after_s: 10}\n", "c"),
    layouts(parse_deploy_text(CLUSTER, "c"))[0],
)
NODE1 = PLAN.peers[0]
LINE = "vllm-ep watch 1 node 1 aaaa"


def state_after(*tries: tuple[float, str | None, str]) -> peers.PeerState:
    state = peers.PeerState(NODE1)
    for now, line, why in tries:
        peers.record(state, line, why, now)
    return state


@pytest.mark.parametrize(
    ("tries", "now", "expected"),
    [
        # not answered yet: fine within the grace, gone after it
        ([(1, None, "connect: Connection refused")], 99, None),
        ([(1, None, "connect: Connection refused")], 100, "never answered on its launcher's watch port 10.0.0.2:14345 "
         "within the start-up grace of 100 s (last try: connect: Connection refused;"),
        # answered, then silent: fine below lost_after_s, gone at it
        ([(5, LINE, "answered"), (14, None, "no answer to connect")], 14, None),
        ([(5, LINE, "answered"), (15, None, "no answer to connect")], 15, "stopped answering on its launcher's watch "
         "port 10.0.0.2:14345 for 10 s (bound watch.lost_after_s 10 s; last try: no answer to connect)"),
        # another service on the port, or another node, counts as silence, saying what answered
        ([(5, LINE, "answered"), (15, "SSH-2.0-OpenSSH_9.6", "answered")], 15, "last try: answered 'SSH-2.0-OpenSSH_9.6', "
         "not a launcher's watch (another service on the port?))"),
        ([(5, LINE, "answered"), (15, "vllm-ep watch 1 node 2 bbbb", "answered")], 15, "last try: answered as node 2, "
         "not node 1 (check the deploy file))"),
        # a restarted launcher: its vLLM is not the one the group started with
        ([(5, LINE, "answered"), (6, "vllm-ep watch 1 node 1 bbbb", "answered")], 6, "node 1 (secondary 10.0.0.2) was "
         "restarted: its launcher's watch port 10.0.0.2:14345 answers for another launcher run"),
        # answering keeps it alive, however long it runs
        ([(5, LINE, "answered"), (1000, LINE, "answered")], 1009, None),
    ],
)  # fmt: skip
def test_verdict(tries, now, expected):
    said = peers.verdict(state_after(*tries), now, started=0, plan=PLAN)
    if expected is None:
        assert said is None
    else:
        assert said is not None and expected in said
        assert said.startswith("node 1 (secondary 10.0.0.2) ")


def test_a_group_names_itself_with_the_node():
    state = state_after((5, LINE, "answered"), (15, None, "connect: Connection refused"))
    said = peers.verdict(state, 15, started=0, plan=replace(PLAN, group="decode"))
    assert said is not None and said.startswith("decode node 1 (secondary 10.0.0.2) stopped answering")


def test_preflight_says_when_the_watch_port_is_taken(tmp_path):
    import socket

    from tests.conftest import run_module
    from tests.support import free_port

    rpc = free_port() - 1000
    holder = socket.socket()
    holder.bind(("0.0.0.0", rpc + 1000))
    holder.listen()
    deploy = tmp_path / "d.yaml"
    deploy.write_text(
        f"model: m\nrpc_port: {rpc}\nnodes: [{{address: 127.0.0.1, gpus: 1}}, {{address: 127.0.0.2, gpus: 1}}]\n"
        "network: {transport: tcp, socket_ifname: lo}\n"
    )
    try:
        res = run_module("preflight", "--deploy", str(deploy), "--node-rank", "0", "-k", "watch")
    finally:
        holder.close()
    assert f"FAIL  system       watch port free      watch port {rpc + 1000} in use (expected free)" in res.out, res.out
    assert "choose another rpc_port (the watch port is rpc_port + 1000)" in res.out and res.code == 1
