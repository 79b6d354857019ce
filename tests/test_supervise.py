"""The launcher stops everything it started: SIGTERM / SIGINT reach vLLM's whole process tree, nothing
outlives the launcher, and the exit code is vLLM's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support import alive

FAKE = ROOT / "tests" / "fixtures" / "fake_vllm_tree.py"
GUIDE_ARGS = ["primary", "127.0.0.1", "13345", "tiny-moe", "1", "1", "1", "--socket-ifname", "lo"]


def start(tmp_path, on_term="default", extra=()):
    pidfile = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIDFILE": str(pidfile), "FAKE_VLLM_ON_TERM": on_term}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch", *GUIDE_ARGS, "--vllm-bin", str(FAKE), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = pidfile.read_text().splitlines() if pidfile.exists() else []
        if len(lines) == 5:
            # the parent first, then its workers
            return proc, [
                int(line.split()[1]) for line in sorted(lines, key=lambda line: not line.startswith("parent"))
            ]
        time.sleep(0.05)
    proc.kill()
    pytest.fail(
        f"the fake vLLM tree did not start within 20 s: {proc.stderr.read() if proc.poll() is not None else ''}"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_whole_tree_and_passes_the_exit_code_on(sig, tmp_path):
    proc, pids = start(tmp_path, on_term="exit:7")
    proc.send_signal(sig)
    code = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert code == 7, err  # vLLM's own exit code
    assert not [p for p in pids if alive(p)]
    assert f"{signal.Signals(sig).name}: stopping vLLM" in err


def test_child_killed_by_the_signal_gives_128_plus_signal(tmp_path):
    proc, pids = start(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert not [p for p in pids if alive(p)]


def test_a_tree_that_ignores_sigterm_is_killed_at_the_deadline(tmp_path):
    proc, pids = start(tmp_path, on_term="ignore", extra=["--stop-timeout", "1"])
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    took = time.monotonic() - t0
    assert code == 128 + signal.SIGKILL
    assert not [p for p in pids if alive(p)]
    assert took < 10
    assert "did not stop within 1 s: sending SIGKILL" in proc.stderr.read()


def test_workers_left_behind_by_a_crashed_parent_are_stopped(tmp_path):
    proc, pids = start(tmp_path)
    os.kill(pids[0], signal.SIGKILL)  # the parent dies; its workers would be orphans
    code = proc.wait(timeout=30)
    assert code == 128 + signal.SIGKILL
    assert not [p for p in pids if alive(p)]


def test_log_file_gets_vllms_output(tmp_path):
    log = tmp_path / "logs" / "primary.log"
    proc, _ = start(tmp_path, extra=["--log-file", str(log)])
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert "fake vllm ready serve tiny-moe" in log.read_text()
    assert "fake vllm ready" in proc.stdout.read()


def test_sigterm_with_the_launchers_stderr_gone_still_stops_the_tree(tmp_path):
    # a tee between the launcher and the terminal dies of the same SIGTERM first: the launcher's messages
    # fail, its stop must not (it used to end with a traceback and exit 1, leaving vLLM running)
    proc, pids = start(tmp_path, on_term="exit:7")
    proc.stderr.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7
    assert not [p for p in pids if alive(p)]


def test_a_log_file_that_cannot_be_opened_is_reported_and_vllm_runs(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    proc, pids = start(tmp_path, on_term="exit:7", extra=["--log-file", str(blocker / "primary.log")])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7
    err = proc.stderr.read()
    assert f"log file {blocker / 'primary.log'}: cannot open (File exists: {blocker}); vLLM runs without it" in err
    assert "fake vllm ready" in proc.stdout.read()
    assert not [p for p in pids if alive(p)]


def test_a_log_file_that_is_a_link_is_not_written_through(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("kept\n")
    link = tmp_path / "primary.log"
    link.symlink_to(target)
    proc, pids = start(tmp_path, on_term="exit:7", extra=["--log-file", str(link)])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7
    assert (
        f"log file {link}: cannot open (Too many levels of symbolic links); vLLM runs without it" in proc.stderr.read()
    )
    assert target.read_text() == "kept\n"
    assert not [p for p in pids if alive(p)]


def test_the_tree_is_marked_so_that_what_leaves_it_can_be_found(tmp_path):
    proc, pids = start(tmp_path)
    try:
        marks = {Path(f"/proc/{pid}/environ").read_bytes().split(b"EP_LAUNCH_TREE=")[1].split(b"\0")[0] for pid in pids}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert len(marks) == 1 and marks.pop().startswith(f"{proc.pid}-".encode())
