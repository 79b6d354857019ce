"""What the commands do at their edges: a reader that goes away, Ctrl-C while waiting, logs that are missing or
say nothing, what `check` leaves behind, how it compares versions. Each one line or a clean exit, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from packaging.version import Version

from launch import check
from tests.conftest import ROOT
from tests.support import assert_one_line_error

TWO_NODES = (
    "model: m\nnodes:\n  - {address: 127.0.0.1, gpus: 8}\n  - {address: 10.0.0.2, gpus: 8}\nvllm_version: 0.26.0\n"
)


def test_a_reader_that_goes_away_ends_the_plan_quietly(write_yaml):
    """`launch plan FILE | head -1` on a plan larger than a pipe's buffer."""
    nodes = "".join(f"  - {{address: 10.0.{i // 250}.{i % 250 + 1}, gpus: 8}}\n" for i in range(128))
    deploy = write_yaml(f"model: m\nnodes:\n{nodes}")
    proc = subprocess.run(
        ["bash", "-c", f'"{sys.executable}" -m launch plan {deploy} | head -1'],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.stdout.startswith("# node 0 (primary 10.0.0.1)")
    assert proc.stderr == ""


def test_ctrl_c_while_waiting_for_the_primary(write_yaml, tmp_path):
    """A secondary waiting for a primary that is not up stops on Ctrl-C, says so, exits 130."""
    deploy = write_yaml(TWO_NODES.replace("vllm_version", "rpc_port: 1\nvllm_version"))  # port 1: nobody listens
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch",
            "secondary",
            "--deploy",
            str(deploy),
            "--node-rank",
            "1",
            "--socket-ifname",
            "lo",
            "--vllm-bin",
            "/bin/true",
            "--wait-for-primary",
            "60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    deadline = time.monotonic() + 60
    line = ""
    while "waiting" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()  # the summary, then "waiting for the primary's coordination port ..."
        if "command" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted: nothing more was started" in err


def test_verify_on_a_log_with_nothing_of_vllm_fails(launch, tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("")
    res = launch("verify", str(empty))
    assert res.code == 1
    assert res.out.strip().splitlines()[-1].startswith("# verdict: nothing recognised")


def test_bench_refuses_missing_logs_before_running(launch, write_yaml, tmp_path):
    ran = tmp_path / "ran"
    fake = tmp_path / "vllm"
    fake.write_text(f"#!/bin/sh\ntouch {ran}\n")
    fake.chmod(0o755)
    res = launch(
        "bench",
        str(write_yaml(TWO_NODES)),
        "--out",
        str(tmp_path / "run"),
        "--vllm-bin",
        str(fake),
        "--logs",
        str(tmp_path / "missing.log"),
    )
    assert_one_line_error(res, "--logs: ", "missing.log: no such log file")
    assert not ran.exists() and not (tmp_path / "run").exists()


def test_check_leaves_no_temporary_folder(launch, write_yaml, tmp_path):
    """The parser probe's CPU platform plugin folder goes away with it (here vLLM is absent: exit 2)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    res = launch(
        "check",
        str(write_yaml(TWO_NODES)),
        "--python",
        sys.executable,
        env={"TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)},
    )
    assert res.code in (0, 1, 2), res.err
    assert list(scratch.iterdir()) == []


def test_check_stopped_at_its_bound_leaves_no_temporary_folder(tmp_path):
    """A probe killed at --timeout cannot clean up after itself: the folder belongs to the caller."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    slow = tmp_path / "python"  # a Python that starts the probe and then hangs, as a slow vLLM import does
    slow.write_text('#!/bin/sh\ntouch "$EP_CHECK_SCRATCH/ep_check_cpu_platform.py" && exec sleep 30\n')
    slow.chmod(0o755)
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(scratch)
    try:
        import tempfile

        tempfile.tempdir = None  # read TMPDIR again
        answer = check.parse([["serve", "m"]], python=str(slow), timeout=1)
    finally:
        os.environ.pop("TMPDIR") if old is None else os.environ.update(TMPDIR=old)
        tempfile.tempdir = None
    assert answer.problem == "vLLM's parser did not answer within 1 s"
    assert list(scratch.iterdir()) == []


def test_bounds_in_seconds_are_numbers_at_least_zero(launch, write_yaml):
    res = launch("check", str(write_yaml(TWO_NODES)), "--timeout", "-1")
    assert res.code == 2 and res.err.splitlines()[-1] == (
        "python -m launch check: error: argument --timeout: expected seconds (a number >= 0), got '-1'"
    )
    res = launch("primary", "--deploy", str(write_yaml(TWO_NODES)), "--stop-timeout", "inf", "--dry-run")
    assert res.code == 2 and "argument --stop-timeout: expected seconds (a number >= 0), got 'inf'" in res.err


def test_check_compares_releases_not_substrings():
    assert check.same_release(Version("0.26.0"), "0.26.0+cu130")
    assert check.same_release(Version("0.26.0"), "0.26.0")
    assert not check.same_release(Version("0.1"), "0.10.1.1")  # a substring, not the same release
    assert not check.same_release(Version("0.26.0"), None)
    assert not check.same_release(Version("0.26.0"), "not-a-version")
