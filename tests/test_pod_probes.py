"""The commands Kubernetes runs as a worker pod's probes (launch/pod.py), against real processes and a stand-in
vLLM API server; and /dev/shm emptied before vLLM starts again in the same pod."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from launch import pod
from tests.conftest import run_module
from tests.support import FAKE_VLLM, free_port


@pytest.fixture
def stand_in_vllm(tmp_path):
    """A process whose command line is `vllm serve m` (a script named vllm), as the launcher starts it."""
    script = tmp_path / "vllm"
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    script.chmod(0o755)
    proc = subprocess.Popen([str(script), "serve", "m"])
    yield proc
    proc.kill()
    proc.wait()


def test_live_finds_the_vllm_serve_process(stand_in_vllm):
    mine = psutil.Process(stand_in_vllm.pid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "serve" not in mine.cmdline():
        time.sleep(0.05)
    assert pod.vllm_processes([mine, psutil.Process()]) == [mine]  # this test process is not vLLM


def test_a_vllm_that_died_unreaped_is_not_live(stand_in_vllm):
    mine = psutil.Process(stand_in_vllm.pid)
    stand_in_vllm.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and mine.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)
    assert mine.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by its parent
    assert pod.vllm_processes([mine]) == []


@pytest.mark.parametrize(("health", "code", "says"), [(200, 0, "answered 200"), (503, 1, "answered 503")])
def test_ready_asks_the_groups_primary(write_yaml, health, code, says):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(FAKE_VLLM), "--port", str(port)],
        env={"FAKE_VLLM_DELAY": "0", "FAKE_VLLM_HEALTH": str(health)},
    )
    try:
        deploy = write_yaml(f"model: m\nport: {port}\nnodes: [{{gpus: 8}}, {{gpus: 8}}]\n")
        deadline = time.monotonic() + 10
        res = None
        while time.monotonic() < deadline:
            res = run_module("launch.pod", "ready", "--deploy", str(deploy), env={"LWS_LEADER_ADDRESS": "127.0.0.1"})
            if "did not answer" not in res.out:
                break
            time.sleep(0.2)
        assert res.code == code and says in res.out and res.out.count("\n") == 1
    finally:
        server.terminate()
        server.wait(5)


def test_ready_without_a_primary_is_not_ready_within_its_bound(write_yaml):
    deploy = write_yaml(f"model: m\nport: {free_port()}\nnodes: [{{gpus: 8}}]\n")
    res = run_module(
        "launch.pod", "ready", "--deploy", str(deploy), "--timeout", "2", env={"LWS_LEADER_ADDRESS": "127.0.0.1"}
    )
    assert res.code == 1 and "did not answer" in res.out
    res = run_module("launch.pod", "ready", "--deploy", str(deploy), env={"LWS_LEADER_ADDRESS": ""})
    assert res.code == 1 and "LWS_LEADER_ADDRESS is not set" in res.out


def test_clear_shm_removes_what_the_previous_run_left(tmp_path):
    shm = tmp_path / "shm"
    (shm / "nccl-dir" / "deeper").mkdir(parents=True)
    (shm / "nccl-dir" / "deeper" / "seg").write_bytes(b"x")
    (shm / "psm_1234").write_bytes(b"x")
    (shm / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    assert pod.clear_shm(shm) == 3
    assert list(shm.iterdir()) == [] and (tmp_path / "elsewhere").is_dir()  # a link is removed, not followed
