"""Hostile inputs and hostile children, tried for real: processes that leave vLLM's process group, a launcher
killed by SIGKILL, output without newlines, a full log disk, YAML alias bombs and deep nesting, and a peer
that accepts a connection and never answers. Every case is bounded to a few seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

GUIDE_ARGS = ["primary", "127.0.0.1", "13345", "tiny-moe", "1", "1", "1", "--socket-ifname", "lo"]


def alive(pid: int) -> bool:
    """Running, not a zombie (a zombie holds no memory and no GPU)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def survivors(pids, within: float) -> list[int]:
    """The pids still alive after ``within`` seconds (returns as soon as none is)."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if not [p for p in pids if alive(p)]:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):
    """Whatever a failing case leaves running is killed afterwards (and the case says so)."""
    yield
    pidfile = tmp_path / "pids"
    noted = [int(line.split()[1]) for line in pidfile.read_text().splitlines()] if pidfile.exists() else []
    for pid in noted:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def finish(proc: subprocess.Popen, within: float = 15) -> tuple[int, str]:
    """The launcher's exit code and stderr; fails when its stderr stays open (a process of the tree holds it)."""
    try:
        _, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the launcher or a process holding its stderr was still running after {within} s")
    return proc.returncode, err.decode()


def stand_in(tmp_path: Path, body: str) -> Path:
    """An executable that stands in for `vllm`: ``body`` is Python; PIDFILE receives `name pid` lines."""
    script = tmp_path / "vllm"
    head = f"#!{sys.executable}\nimport os, signal, sys, time\n\n"
    head += "def note(name):\n    with open(os.environ['PIDFILE'], 'a') as f:\n        f.write(f'{name} {os.getpid()}\\n')\n\n"
    script.write_text(head + textwrap.dedent(body))
    script.chmod(0o755)
    return script


def launch(tmp_path: Path, body: str, *extra: str, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIDFILE": str(tmp_path / "pids")}
    exe = stand_in(tmp_path, body)
    return subprocess.Popen(
        [sys.executable, "-m", "launch", *GUIDE_ARGS, "--vllm-bin", str(exe), *extra],
        env=env,
        stdout=stdout,
        stderr=stderr,
    )


def pids(tmp_path: Path, names: set[str], proc: subprocess.Popen, within: float = 15) -> dict[str, int]:
    """Waits until the stand-in has noted every name in ``names``."""
    pidfile = tmp_path / "pids"
    end = time.monotonic() + within
    while time.monotonic() < end:
        lines = pidfile.read_text().split("\n") if pidfile.exists() else []
        found = dict(line.split() for line in lines if line.count(" ") == 1)
        if names <= found.keys():
            return {k: int(v) for k, v in found.items()}
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the stand-in did not note {names} within {within} s: {proc.communicate()[1]}")


# A vLLM whose helper leaves the process group, as a daemonizing library would.
LEAVES_THE_GROUP = """
if os.fork() == 0:
    {leave}
    note("escaped")
    while True:
        time.sleep(1)
note("parent")
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize(("leave", "said"), [("os.setsid()", "own session"), ("os.setpgid(0, 0)", "own process group")])
def test_a_process_that_left_vllms_group_is_stopped_and_named(leave, said, tmp_path):
    proc = launch(tmp_path, LEAVES_THE_GROUP.format(leave=leave), "--stop-timeout", "3")
    found = pids(tmp_path, {"parent", "escaped"}, proc)
    assert os.getpgid(found["escaped"]) != found["parent"]  # it did leave the group
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 128 + signal.SIGTERM, err
    assert not survivors(found.values(), 1)
    assert f"stopped 1 stray process of vLLM: {found['escaped']} vllm ({said})" in err, err


def test_a_daemon_whose_parent_exited_is_found_through_the_subreaper(tmp_path):
    # the classic double fork: the middle process exits at once, the daemon is re-parented (to the launcher)
    body = """
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            note("daemon")
            while True:
                time.sleep(1)
        os._exit(0)
    note("parent")
    time.sleep(0.5)
    sys.exit(3)
    """
    proc = launch(tmp_path, body, "--stop-timeout", "3")
    code, err = finish(proc)
    daemon = pids(tmp_path, {"daemon"}, proc)["daemon"]
    assert code == 3, err  # vLLM's own exit code
    assert not survivors([daemon], 1)
    assert f"stopped 1 stray process of vLLM: {daemon}" in err, err


def test_sigkill_of_the_launcher_leaves_no_process_behind(tmp_path):
    body = """
    if os.fork() == 0:           # a worker in vLLM's group, SIGTERM ignored
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        note("worker")
        while True:
            time.sleep(1)
    if os.fork() == 0:           # a helper in a session of its own
        os.setsid()
        note("escaped")
        while True:
            time.sleep(1)
    note("parent")
    while True:
        time.sleep(1)
    """
    proc = launch(tmp_path, body)
    found = pids(tmp_path, {"parent", "worker", "escaped"}, proc)
    proc.kill()
    assert not survivors(found.values(), 5), "still running 5 s after the launcher's SIGKILL"
    _, err = finish(proc)
    assert "the launcher was killed: sent SIGKILL to" in err, err


def test_output_without_newlines_does_not_grow_the_launcher(tmp_path):
    # 50 MB in one line: a line-by-line copy would hold all of it
    body = """
    sys.stdout.buffer.write(b"S")
    sys.stdout.flush()
    time.sleep(1)
    block = b"x" * (1 << 20)
    for _ in range(50):
        sys.stdout.buffer.write(block)
    sys.stdout.flush()
    note("written")
    while True:
        time.sleep(1)
    """
    log = tmp_path / "vllm.log"
    proc = launch(tmp_path, body, "--log-file", str(log), stdout=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 15
        while (not log.exists() or log.stat().st_size < 1) and time.monotonic() < end:
            time.sleep(0.05)
        before = peak_rss(proc.pid)
        while log.stat().st_size < 50 * (1 << 20) + 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert log.stat().st_size == 50 * (1 << 20) + 1
        grew = peak_rss(proc.pid) - before
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    assert grew < 8 << 20, f"the launcher's peak memory grew by {grew >> 20} MiB while copying 50 MiB"


def peak_rss(pid: int) -> int:
    """VmHWM: the most resident memory the process ever held, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (needs root), unmounted afterwards."""
    where = tmp_path / "small"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


# 4 MiB of lines, then a last line: a writer blocked on its pipe would never print it.
CHATTY = """
for i in range(64 * 1024):
    print(f"line {i:08d} " + "y" * 50)
print("finished", flush=True)
"""


@pytest.mark.parametrize("target", ["tmpfs", "/dev/full"])
def test_a_full_log_target_is_reported_once_and_vllm_goes_on(target, tmp_path, request):
    log = request.getfixturevalue("full_disk") / "vllm.log" if target == "tmpfs" else Path("/dev/full")
    proc = launch(tmp_path, CHATTY, "--log-file", str(log))
    out, err = proc.communicate(timeout=30)
    err = err.decode()
    assert proc.returncode == 0, err
    assert out.decode().splitlines()[-1] == "finished"  # every line reached the terminal
    failures = [line for line in err.splitlines() if "write failed" in line]
    assert failures == [
        f"[launch] log file {log}: write failed (No space left on device); vLLM's output is no longer "
        f"copied there, vLLM goes on"
    ]
    assert "Traceback" not in err


def test_a_closed_stdout_is_reported_once_and_the_log_gets_everything(tmp_path):
    log = tmp_path / "vllm.log"
    proc = launch(tmp_path, CHATTY, "--log-file", str(log))
    proc.stdout.close()  # the terminal's reader is gone
    code, err = finish(proc, within=30)
    assert code == 0, err
    assert log.read_text().splitlines()[-1] == "finished"
    assert [line for line in err.splitlines() if "write failed" in line] == [
        "[launch] stdout: write failed (Broken pipe); vLLM's output is no longer copied there, vLLM goes on"
    ]


# --- Deploy files that try to exhaust the planner: one line, in well under a second, whatever the input ---

GOOD = "model: tiny-moe\nnodes:\n  - {address: 10.1.59.30, gpus: 8}\n"


def alias_bomb(levels: int) -> str:
    """``levels`` lines of nine aliases each: 9**levels values, in a few hundred bytes."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return GOOD + "\n".join(lines) + "\n"


HOSTILE = {
    # 9**9 = 387 million values in 434 bytes
    "alias bomb": (alias_bomb(9), "not valid YAML (aliases expand to more than 10,000 values"),
    "nesting 500 deep": (
        GOOD + "env: " + "[" * 500 + "]" * 500 + "\n",
        "not valid YAML (nested deeper than 64 levels)",
    ),
    "a megabyte of text": (GOOD + "# " + "x" * (1 << 20) + "\n", "not valid YAML (longer than 262,144 characters"),
    "an integer of 5,000 digits": (
        GOOD + "port: " + "9" * 5000 + "\n",
        "not valid YAML (Exceeds the limit (4300 digits)",
    ),
    "a list of 5,000 items where a name goes": (
        GOOD.replace("tiny-moe", "[" + "a, " * 5000 + "]"),
        "model: input should be a valid string, got a list of 5000 items",
    ),
    "a long string where a number goes": (
        GOOD + "port: " + "p" * 100000 + "\n",
        "port: input should be a valid integer",
    ),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_deploy_file_is_one_short_line_within_seconds(name, tmp_path):
    from launch.config import ConfigError, parse_deploy_text

    text, expected = HOSTILE[name]
    start = time.monotonic()
    with pytest.raises(ConfigError):
        parse_deploy_text(text, "deploy.yaml")
    assert time.monotonic() - start < 3  # bounded: the unguarded parser took 85 s or ran out of memory
    # and through the command line: exit 2, one line, no traceback
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "launch", "plan", str(path)], capture_output=True, text=True, env=env, timeout=30
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and expected in lines[0], lines[:3]
    assert len(lines[0]) <= 500 + len(str(path)), len(lines[0])


def test_a_long_value_is_shown_as_an_excerpt():
    from launch.config import ConfigError, parse_deploy_text

    with pytest.raises(ConfigError) as caught:
        parse_deploy_text(GOOD + "port: " + "p" * 100000 + "\n", "d.yaml")
    message = str(caught.value)
    assert message.startswith("d.yaml: port: input should be a valid integer, got 'ppp")
    assert message.endswith("…") and len(message) < 200


def test_a_mistyped_secret_is_not_echoed():
    from launch.config import ConfigError, parse_deploy_text

    with pytest.raises(ConfigError) as caught:
        parse_deploy_text(GOOD + "env: {DB_PASSWD: [hunter2]}\n", "d.yaml")
    assert "hunter2" not in str(caught.value)
    assert str(caught.value).endswith("got ***")


def test_anchors_and_merge_keys_of_a_real_deploy_file_still_load():
    from launch import yaml_safe

    text = "defaults: &node {gpus: 8, env: {A: '1'}}\nnodes:\n" + "".join(
        f"  - {{<<: *node, address: 10.0.0.{i}}}\n" for i in range(64)
    )
    data = yaml_safe.load(text)
    assert data["nodes"][63] == {"gpus": 8, "env": {"A": "1"}, "address": "10.0.0.63"}


# --- Rendezvous: a peer that accepts and never answers holds a secondary no longer than its bound ---


@pytest.fixture
def silent_listener():
    """A TCP port that accepts every connection and never sends a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_listener_that_never_answers_holds_the_wait_only_to_its_bound(silent_listener):
    from launch import wait

    said: list[str] = []
    start = time.monotonic()
    with pytest.raises(wait.WaitTimeout) as caught:
        wait.listener(
            "127.0.0.1",
            silent_listener,
            3,
            what="the primary's coordination port",
            greeting=True,
            say=said.append,
            every=1,
        )
    took = time.monotonic() - start
    assert 3 <= took < 4.5, took  # the bound, plus one probe's scheduling on a loaded machine
    assert str(caught.value) == (
        "the primary's coordination port not ready within 3 s (last try: accepted, but sent 0 "
        "of a ZeroMQ greeting's 10 bytes in time)"
    )
    assert said  # progress was reported meanwhile
    assert wait.port_open("127.0.0.1", silent_listener)  # a bare connect would have called it ready


def test_preflights_rendezvous_gives_up_on_a_silent_listener_at_its_bound(silent_listener):
    """A secondary's TCPStore handshake has no bound of its own: against a listener that accepts and never
    answers it waited for minutes; preflight now ends it at the rendezvous bound, naming what it found."""
    from preflight import rendezvous

    start = time.monotonic()
    session = rendezvous.open_store(1, 2, "127.0.0.1", silent_listener, "lo", 3)
    took = time.monotonic() - start
    assert took < 6, took
    assert session.store is None and session.problem == (
        f"reached 127.0.0.1:{silent_listener}, but it did not answer as the primary's TCPStore within 3 s "
        f"(another service on port {silent_listener}? set {rendezvous.PORT_VAR} to a free port, the same on every node)"
    )


def test_a_service_that_is_not_zeromq_is_named(tmp_path):
    from launch import wait

    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        why = wait.probe("127.0.0.1", server.getsockname()[1], 2, greeting=True)
    finally:
        server.close()
    assert why == "answered 48545450..., not a ZeroMQ greeting (another service on this port?)"


ROUTER = """
import zmq
router = zmq.Context().socket(zmq.ROUTER)
print(router.bind_to_random_port("tcp://127.0.0.1"), flush=True)
if router.poll(120_000):  # generous: on a loaded machine the dealer's Python alone takes seconds to start
    print("got", router.recv_multipart()[-1].decode(), flush=True)
"""
DEALER = """
import sys, zmq
dealer = zmq.Context().socket(zmq.DEALER)
dealer.connect(f"tcp://127.0.0.1:{sys.argv[1]}")
dealer.send(b"hello")
dealer.close(linger=2000)
"""


def test_a_real_zeromq_router_is_ready_and_undisturbed_by_the_probe():
    # vLLM's primary binds a ZeroMQ ROUTER on the coordination port for the engines' handshake
    # (vllm/v1/engine/utils.py: 0.10.1.1 lines 671-682, 0.26.0 lines 1179-1191, 0.33.0 lines 1348-1363)
    from launch import wait
    from tests.support import PARSER_PYTHON

    if not PARSER_PYTHON.exists():
        pytest.skip(f"no Python with pyzmq (the vLLM parsers' venv, {PARSER_PYTHON}, is not installed)")
    router = subprocess.Popen([str(PARSER_PYTHON), "-c", ROUTER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(router.stdout.readline())
        took = wait.listener("127.0.0.1", port, 5, what="a ZeroMQ router", greeting=True, say=print)
        subprocess.run([str(PARSER_PYTHON), "-c", DEALER, str(port)], check=True, timeout=120)
        out, _ = router.communicate(timeout=120)
    finally:
        router.kill()
        router.wait()
    assert took < 3  # ready at the first try, not after retries
    assert out.strip() == "got hello"  # the engines' handshake still works after the probe


def test_an_endless_deploy_file_is_read_only_to_the_bound(launch):
    start = time.monotonic()
    res = launch("plan", "/dev/zero")
    assert res.code == 2 and res.err == (
        "error: /dev/zero: not valid YAML (longer than 262,144 characters (expected a deploy file of a few kilobytes))\n"
    )
    assert time.monotonic() - start < 30  # read 256 KiB, not forever
