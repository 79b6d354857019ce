"""Runs vLLM so that stopping the launcher stops every process vLLM started.

vLLM forks API servers, engine cores and workers. The launcher starts it in a session of its own, turns
SIGTERM / SIGINT / SIGHUP into a SIGTERM to that whole process group, waits up to ``stop_timeout``
seconds, then SIGKILLs what is left (saying so); a second Ctrl-C SIGKILLs at once, a repeated SIGTERM (schedulers
repeat themselves) changes nothing. When vLLM exits by itself, stragglers in its group are
stopped the same way, so no orphan keeps holding GPU memory. The exit code is vLLM's (128 + signal
number when it died of a signal, as shells report it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _reap_group(pgid: int, deadline: float, say) -> None:
    """Waits until the group is empty; SIGKILLs it at the deadline."""
    while _group_alive(pgid):
        if time.monotonic() >= deadline:
            say(f"processes of group {pgid} still running after the stop timeout: sending SIGKILL")
            _signal_group(pgid, signal.SIGKILL)
            break
        time.sleep(0.05)
        _reap_zombies()


def _reap_zombies() -> None:
    # Grandchildren re-parented to us (when we are a subreaper or PID 1 in a container) must be waited for.
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def _tee(source: IO[bytes], sinks: list[IO[bytes]]) -> None:
    for chunk in iter(lambda: source.readline(), b""):
        for sink in sinks:
            sink.write(chunk)
            sink.flush()


def _report_health(child: subprocess.Popen, url: str, timeout: float, say) -> None:
    from launch import wait

    def gone() -> str | None:
        return None if child.poll() is None else f"vLLM exited with code {child.returncode}"

    try:
        took = wait.until(lambda: wait.healthy(url), f"vLLM's API at {url}", timeout, say=say, every=30, interval=1, stop=gone)
        say(f"vLLM is healthy at {url}, {took:.1f} s after start")
    except wait.WaitTimeout as exc:
        say(str(exc))


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    log_file: str | None = None,
    stop_timeout: float = 30.0,
    health_url: str | None = None,
    health_timeout: float = 1800.0,
    say=lambda msg: print(f"[launch] {msg}", file=sys.stderr, flush=True),
    what: str = "vLLM",
) -> int:
    """Starts ``argv`` and supervises it until it and everything it started have ended. With
    ``health_url``, says when vLLM's API first answers there (or that it did not, within the bound)."""
    log = None
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        log = open(log_file, "ab")  # noqa: SIM115 - closed below
    child = subprocess.Popen(
        list(argv),
        env=dict(env),
        start_new_session=True,
        stdout=subprocess.PIPE if log else None,
        stderr=subprocess.STDOUT if log else None,
    )
    pgid = child.pid
    stopping: dict[str, float] = {}

    def on_signal(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if "deadline" in stopping:
            # A second Ctrl-C means "now"; a second SIGTERM is a scheduler repeating itself (Slurm signals every
            # task, then the job script may too): the deadline already bounds the stop.
            if signum == signal.SIGINT:
                say(f"{name} again: sending SIGKILL to {what}'s process group {pgid}")
                _signal_group(pgid, signal.SIGKILL)
            return
        stopping["deadline"] = time.monotonic() + stop_timeout
        say(f"{name}: stopping {what} (process group {pgid}), up to {stop_timeout:g} s")
        _signal_group(pgid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in FORWARDED}
    watcher = None
    if health_url:
        watcher = threading.Thread(target=_report_health, args=(child, health_url, health_timeout, say), daemon=True)
        watcher.start()
    copier = None
    if log:
        copier = threading.Thread(target=_tee, args=(child.stdout, [sys.stdout.buffer, log]), daemon=True)
        copier.start()
    try:
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                deadline = stopping.get("deadline")
                if deadline is not None and time.monotonic() >= deadline:
                    say(f"{what} did not stop within {stop_timeout:g} s: sending SIGKILL to process group {pgid}")
                    _signal_group(pgid, signal.SIGKILL)
                    stopping["deadline"] = float("inf")
        # vLLM is gone; its helpers may not be. Stop them within the same bound.
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGTERM)
            _reap_group(pgid, time.monotonic() + stop_timeout, say)
        if copier:
            copier.join(timeout=5)
        if watcher:
            watcher.join(timeout=3)  # it notices the exit within a second and says so
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if log:
            log.close()
    return 128 - code if code < 0 else code
