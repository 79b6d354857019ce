"""Ordered start-up without guessing: a secondary waits (bounded, saying for what) until the primary's
coordination port accepts connections; the primary says when its API answers /health and how long
start-up took."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(*args, env=None):
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "launch", *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def echo_secondary(port: int, wait_s: int) -> subprocess.Popen:
    """The guide's secondary joining a primary on 127.0.0.1:``port``; `/bin/echo` stands in for vLLM (it prints
    the command it would have run)."""
    argv = ["secondary", "127.0.0.1", str(port), "m", "2", "1", "1", "--socket-ifname", "lo"]
    return launcher(*argv, "--vllm-bin", "/bin/echo", "--wait-for-primary", str(wait_s))


def test_secondary_starts_once_the_primary_port_appears():
    # vLLM's primary binds a ZeroMQ ROUTER on the coordination port (the engines' handshake); a real one here
    import zmq

    port = free_port()
    router = zmq.Context.instance().socket(zmq.ROUTER)

    def open_later():
        time.sleep(2)
        router.bind(f"tcp://127.0.0.1:{port}")

    threading.Thread(target=open_later, daemon=True).start()
    t0 = time.monotonic()
    proc = echo_secondary(port, wait_s=30)
    out, err = proc.communicate(timeout=60)
    router.close(linger=0)
    assert proc.returncode == 0, err
    assert f"the primary's coordination port 127.0.0.1:{port} accepts connections (after" in err
    assert out.startswith("serve m ")  # vLLM ran only after the wait
    assert 1.5 < time.monotonic() - t0 < 30


def test_another_service_on_the_primary_port_is_not_taken_for_vllm():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts, says nothing: no ZeroMQ greeting
    port = listener.getsockname()[1]
    proc = echo_secondary(port, wait_s=3)
    out, err = proc.communicate(timeout=60)
    listener.close()
    assert proc.returncode == 3 and out == ""  # vLLM never started
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"error: primary: the primary's coordination port 127.0.0.1:{port} not ready within 3 s "
        "(last try: accepted, but sent 0 of a ZeroMQ greeting's 10 bytes in time)"
    ), last


def test_secondary_names_a_primary_that_never_comes_up():
    port = free_port()
    t0 = time.monotonic()
    proc = echo_secondary(port, wait_s=2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    assert out == ""  # vLLM never started
    assert err.strip().splitlines()[-1] == (
        f"error: primary: the primary's coordination port 127.0.0.1:{port} not ready within 2 s "
        "(last try: connect: Connection refused) (start serve-primary on 127.0.0.1 first; check the address and firewall; --wait-for-primary 0 starts without waiting)"
    )
    assert time.monotonic() - t0 < 15


def fake_primary(port: int, **env: str) -> subprocess.Popen:
    """The guide's primary on one GPU's worth of ranks, with a stand-in vLLM serving /health on ``port``."""
    argv = ["primary", "127.0.0.1", "13345", "m", "1", "1", "1", "--socket-ifname", "lo", "--port", str(port)]
    return launcher(*argv, "--vllm-bin", str(FIXTURES / "fake_vllm_http.py"), env=env)


def test_primary_reports_when_the_api_is_healthy():
    port = free_port()
    proc = fake_primary(port, FAKE_VLLM_DELAY="1")
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "is healthy" in line:
            break
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    healthy = [line for line in lines if "is healthy" in line]
    assert (
        healthy
        and f"vLLM is healthy at http://127.0.0.1:{port}/health," in healthy[0]
        and "s after start" in healthy[0]
    )


def test_primary_that_dies_before_healthy_is_reported():
    port = free_port()
    proc = fake_primary(port, FAKE_VLLM_DELAY="0.5", FAKE_VLLM_EXIT="4")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 4
    assert f"stopped waiting for vLLM's API at http://127.0.0.1:{port}/health after" in err
    assert "vLLM exited with code 4" in err
