"""Bounded waits that say what they wait for: a TCP port that accepts connections, an HTTP endpoint
that answers 200. Used for ordered start-up: secondaries wait for the primary's coordination port, the
primary reports when its API is healthy."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable


class WaitTimeout(Exception):
    """The thing waited for did not come within the bound (message says what and how long)."""


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def until(ready: Callable[[], bool], what: str, timeout: float, *, say=print, every: float = 10.0,
          interval: float = 0.5, stop: Callable[[], str | None] = lambda: None) -> float:
    """Polls ``ready`` until it is true; returns the seconds it took. Prints a progress line every
    ``every`` seconds; raises WaitTimeout after ``timeout``; ``stop`` may end the wait early with a reason."""
    start = time.monotonic()
    next_line = start + every
    while True:
        if ready():
            return time.monotonic() - start
        now = time.monotonic()
        reason = stop()
        if reason:
            raise WaitTimeout(f"stopped waiting for {what} after {now - start:.0f} s: {reason}")
        if now - start >= timeout:
            raise WaitTimeout(f"{what} not ready within {timeout:g} s")
        if now >= next_line:
            say(f"waiting for {what} ({now - start:.0f} s of {timeout:g} s)")
            next_line = now + every
        time.sleep(interval)
