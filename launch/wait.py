"""Bounded waits that say what they wait for: a TCP port that accepts connections (and, for vLLM's
coordination port, greets like a ZeroMQ peer), an HTTP endpoint that answers 200. Used for ordered start-up:
secondaries wait for the primary's coordination port, the primary reports when its API is healthy.

Every step of a wait is bounded by what is left of its deadline: the name lookup, the connect, and each
read. A peer that accepts and never answers costs one probe of at most PROBE seconds, then the wait goes
on, and it ends at its bound, saying what the last try found.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

PROBE = 2.0
"""Most seconds one try (lookup, connect, first bytes) may take."""
ZMTP_SIGNATURE = 10
"""Bytes of the greeting a ZeroMQ peer sends as soon as a connection opens: 0xFF, 8 bytes, 0x7F
(ZMTP 3.x, https://rfc.zeromq.org/spec/37/ "Greeting"; libzmq sends them unprompted)."""


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


def _resolve(host: str, port: int, budget: float) -> list[tuple] | str:
    """getaddrinfo within ``budget`` seconds (the resolver's own timeouts are not ours): addresses, or why not."""
    try:  # an address literal needs no resolver
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except OSError:
        pass
    found: list = []

    def look_up() -> None:
        try:
            found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            found.append(f"cannot resolve {host} ({exc.strerror or exc})")

    worker = threading.Thread(target=look_up, daemon=True)
    worker.start()
    worker.join(budget)
    return found[0] if found else f"resolving {host} took longer than {budget:.1f} s"


def _connected(host: str, port: int, end: float) -> socket.socket | str:
    """A socket connected to ``host:port`` before ``end`` (time.monotonic()), or why there is none."""
    addresses = _resolve(host, port, end - time.monotonic())
    if isinstance(addresses, str):
        return addresses
    why = f"no address for {host}"
    for family, kind, proto, _, address in addresses:
        left = end - time.monotonic()
        if left <= 0:
            return why
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(left)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            why = "no answer to connect" if isinstance(exc, TimeoutError) else f"connect: {exc.strerror or exc}"
            continue
        return sock
    return why


def probe(host: str, port: int, budget: float = PROBE, *, greeting: bool = False) -> str | None:
    """One try, at most ``budget`` seconds: None when ``host:port`` accepts (and, with ``greeting``, sends a
    ZeroMQ greeting); otherwise what was found instead."""
    end = time.monotonic() + budget
    sock = _connected(host, port, end)
    if isinstance(sock, str):
        return sock
    with sock:
        return _greeted(sock, end) if greeting else None


def first_line(host: str, port: int, budget: float = PROBE, *, most: int = 256) -> tuple[str | None, str]:
    """One try, at most ``budget`` seconds: the first line ``host:port`` sends unprompted (at most ``most``
    bytes, as a launcher's watch port does), or None and what was found instead."""
    end = time.monotonic() + budget
    sock = _connected(host, port, end)
    if isinstance(sock, str):
        return None, sock
    data = b""
    with sock:
        while b"\n" not in data and len(data) < most:
            left = end - time.monotonic()
            if left <= 0:
                return None, f"accepted, but sent no line within {budget:g} s"
            sock.settimeout(left)
            try:
                chunk = sock.recv(most - len(data))
            except TimeoutError:
                continue
            except OSError as exc:
                return None, f"accepted, then {exc.strerror or exc}"
            if not chunk:
                break
            data += chunk
    if b"\n" not in data:
        return None, f"accepted, then sent {len(data)} bytes without a line end"
    return data.split(b"\n", 1)[0].decode("utf-8", "replace"), "answered"


def _greeted(sock: socket.socket, end: float) -> str | None:
    data = b""
    while len(data) < ZMTP_SIGNATURE:
        left = end - time.monotonic()
        if left <= 0:
            return f"accepted, but sent {len(data)} of a ZeroMQ greeting's {ZMTP_SIGNATURE} bytes in time"
        sock.settimeout(left)
        try:
            chunk = sock.recv(ZMTP_SIGNATURE - len(data))
        except TimeoutError:
            continue
        except OSError as exc:
            return f"accepted, then {exc.strerror or exc}"
        if not chunk:
            return "accepted, then closed without a ZeroMQ greeting"
        data += chunk
    if data[0] != 0xFF or data[-1] != 0x7F:
        return f"answered {data[:4].hex()}..., not a ZeroMQ greeting (another service on this port?)"
    return None


def listener(
    host: str,
    port: int,
    timeout: float,
    *,
    what: str,
    greeting: bool = False,
    say=print,
    every: float = 10.0,
    interval: float = 0.5,
) -> float:
    """Waits until ``probe`` succeeds, at most ``timeout`` seconds in all; returns the seconds it took. The
    WaitTimeout names what the last try found."""
    end = time.monotonic() + timeout
    last: list[str] = ["nothing tried"]

    def ready() -> bool:
        budget = min(PROBE, end - time.monotonic())
        if budget < 0.05:  # the bound is reached; until() says so
            return False
        why = probe(host, port, budget, greeting=greeting)
        last[0] = why or "ready"
        return why is None

    try:
        return until(ready, what, timeout, say=say, every=every, interval=interval)
    except WaitTimeout as exc:
        raise WaitTimeout(f"{exc} (last try: {last[0]})") from None


def until(
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    *,
    say=print,
    every: float = 10.0,
    interval: float = 0.5,
    stop: Callable[[], str | None] = lambda: None,
) -> float:
    """Polls ``ready`` until it is true; returns the seconds it took. Prints a progress line every
    ``every`` seconds; raises WaitTimeout after ``timeout``; ``stop`` may end the wait early with a reason.
    Never sleeps past the bound; ``ready`` itself must be bounded (the probes here are)."""
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
        time.sleep(max(0.0, min(interval, start + timeout - now)))
