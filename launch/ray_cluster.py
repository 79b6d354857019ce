"""data_parallel_backend: ray. vLLM runs on the primary only and places its data parallel engines on the
nodes of a Ray cluster: the primary runs the Ray head, the secondaries run `ray start --address ... --block`
as their (supervised) process. vLLM sizes its placement from the nodes present when it starts, so the
primary waits, within a bound and saying so, until every node of the deploy file has joined; then it starts
vLLM. Stopping the primary stops vLLM first, then the head.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from launch import wait

_NODE_LINE = re.compile(r"^\s*(\d+)\s+node_[0-9a-f]+\s*$")


class Stopped(Exception):
    """SIGTERM / SIGINT arrived while the head waited for the nodes."""


def active_nodes(ray: str, address: str, env: Mapping[str, str], timeout: float = 30.0) -> int | None:
    """Nodes in the "Active:" section of `ray status`; None while the cluster does not answer."""
    try:
        proc = subprocess.run(
            [ray, "status", "--address", address], capture_output=True, text=True, env=dict(env), timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    count, active = 0, False
    for line in proc.stdout.splitlines():
        if line.strip().endswith(":"):
            active = line.strip() == "Active:"
            continue
        match = _NODE_LINE.match(line)
        if active and match:
            count += int(match.group(1))
    return count


def head_address(argv: Sequence[str]) -> str:
    """host:port of the head that ``ray start --head --port P --node-ip-address A`` starts."""
    return f"{argv[list(argv).index('--node-ip-address') + 1]}:{argv[list(argv).index('--port') + 1]}"


@contextmanager
def head(argv: Sequence[str], env: Mapping[str, str], nodes: int, timeout: float, say) -> Iterator[None]:
    """Runs the Ray head (``argv`` ends in --block) until the block ends; enters once ``nodes`` nodes are active."""
    address = head_address(argv)
    proc = subprocess.Popen(list(argv), env=dict(env), start_new_session=True)

    def stop_waiting(signum, _frame):
        raise Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop_waiting) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:

        def gone() -> str | None:
            return f"the Ray head exited with {proc.returncode}" if proc.poll() is not None else None

        what = f"{nodes} nodes in the Ray cluster at {address}"
        took = wait.until(
            lambda: (active_nodes(argv[0], address, env) or 0) >= nodes, what, timeout, say=say, interval=2.0, stop=gone
        )
        say(f"{what} (after {took:.1f} s): starting vLLM")
        yield  # vLLM's supervision installs its own handlers meanwhile and puts these back after
    finally:
        # A signal while the head stops must not end the launcher before the head (its own session): escalate.
        def escalate(_signum, _frame) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        for sig in previous:
            signal.signal(sig, escalate)
        try:
            _stop(proc, say)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _stop(proc: subprocess.Popen, say, bound: float = 45.0) -> None:
    """SIGTERM to the head's process group (Ray drains for up to 30 s), SIGKILL past the bound."""
    if proc.poll() is not None:
        return
    say(f"stopping the Ray head (process group {proc.pid})")
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        say(f"the Ray head did not stop within {bound:g} s: SIGKILL")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass  # ended on its own meanwhile (ray start --block stops its raylet and GCS itself)
