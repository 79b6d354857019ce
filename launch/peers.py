"""The launchers watch each other while vLLM runs (bare metal): a node that goes away stops the group.

Why. vLLM watches only the engine processes of its own node. Its front end's monitor and a headless
secondary's wait on the sentinels of the processes they started themselves
(vllm/v1/engine/utils.py ``CoreEngineProcManager.monitor_engine_liveness``: 0.26.0 line 222, 0.33.0 line 356;
started by ``MPClient.start_engine_core_monitor``, vllm/v1/engine/core_client.py:685 in 0.26.0, and by
``run_headless``, vllm/entrypoints/cli/serve.py:247). The primary's start-up handshake waits for remote engines
without a deadline (``wait_for_engine_startup``, vllm/v1/engine/utils.py:1225 in 0.26.0, 1403 in 0.33.0: it
polls every ``STARTUP_POLL_PERIOD_MS`` = 10 s, forever), and once serving, the data parallel ranks meet in a
torch.distributed all-reduce every step (``ParallelConfig.has_unfinished_dp``, vllm/config/parallel.py:700 in
0.26.0), where a rank that is gone leaves the others blocked until the process group's own timeout. So a
secondary that dies leaves the primary hanging, and a primary that dies leaves the secondaries holding their
GPUs, and nothing names the node that went away.

What. While vLLM runs, every node's launcher answers on its watch port (the deploy file's ``rpc_port + 1000``)
with one line, ``vllm-ep watch 1 node RANK TOKEN`` (TOKEN: random, one per launcher run), to whoever
connects. The primary's launcher asks every secondary's, each secondary's launcher the primary's, every
``interval`` seconds (at most 2; each try bounded, at most 2 s, lookup, connect and read included; at most 32
at once). A peer

- that has not answered yet may take ``watch.startup_grace_s`` (default 900) from the start of this node's
  vLLM: nodes start at different times, and a secondary may start long after the primary;
- that answered and then stops answering (refused, no answer, another service on the port) for
  ``watch.lost_after_s`` (default 30) is gone;
- that answers with another TOKEN was restarted: the vLLM this group started with is gone there.

A peer that is gone stops this node's vLLM the way SIGTERM does (launch/supervise.py: its process group, the
stop timeout, then SIGKILL), and the launcher ends with exit code 3 and one line naming the node, its rank
and address, and what stopped answering. Bound: a secondary that goes away stops the primary within
lost_after_s + interval + one round of tries (2 s per 32 peers); the other secondaries follow within that
bound again (they watch the primary, whose launcher stops answering as it ends).

Not covered: a node whose launcher runs but whose vLLM hangs (its launcher still answers; vLLM's own
timeouts and `python -m launch status` apply), the guide's positional arguments (they describe one node, not
the group: a deploy file does). Under Slurm and Kubernetes the watch is off: the scheduler stops the group
itself (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from launch import wait
from launch.config import WATCH_PORT_OFFSET, DeployConfig
from launch.errors import ConfigError
from launch.layout import NodeLayout

PROTOCOL = "vllm-ep watch 1"
"""The answer's first words; the version changes when the line does."""
INTERVAL = 2.0
"""Most seconds between two tries at one peer."""
MOST_AT_ONCE = 32


@dataclass(frozen=True)
class Peer:
    """A node this launcher watches: where its launcher answers."""

    node_rank: int
    role: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"node {self.node_rank} ({self.role} {self.host})"


@dataclass(frozen=True)
class WatchPlan:
    """This node's part of the watch: where its launcher answers, and whom it watches."""

    node_rank: int
    bind: str
    """The address the watch port binds to: this node's address, or every address ("") when it is unknown."""
    port: int
    peers: tuple[Peer, ...]
    startup_grace_s: float
    lost_after_s: float
    group: str | None = None
    """prefill / decode: named with every node it speaks of."""

    def name(self, peer: Peer) -> str:
        return f"{self.group} {peer}" if self.group else str(peer)

    @property
    def interval(self) -> float:
        return min(INTERVAL, self.lost_after_s / 4)

    @property
    def note(self) -> str:
        return (
            f"watch: answers on {self.bind or '*'}:{self.port} while vLLM runs (launch serve); watches "
            f"{_listed(self.peers)}; a node silent "
            f"for {self.lost_after_s:g} s (start-up grace {self.startup_grace_s:g} s) stops this node's vLLM; "
            f"off: watch: {{enabled: false}}"
        )


def _listed(peers: tuple[Peer, ...], most: int = 3) -> str:
    shown = ", ".join(f"node {p.node_rank} ({p.role} {p.host}:{p.port})" for p in peers[:most])
    return shown + (f" and {len(peers) - most} more" if len(peers) > most else "")


def plan_for(config: DeployConfig, layout: NodeLayout) -> WatchPlan | None:
    """The watch of the node at ``layout``. Pure. None when the deploy file turns it off, and where no deploy
    file lists the other nodes: one node alone, or the guide's positional arguments (they describe this node
    only; its launcher runs as the guide's scripts did, and a deploy file gets it the watch)."""
    w = config.watch
    if not w.enabled or len(config.nodes) < 2:
        return None
    port = config.watch_port
    if layout.role == "primary":  # a file planned for running lists every node's address
        peers = tuple(
            Peer(rank, "secondary", node.address, port)
            for rank, node in enumerate(config.nodes)
            if rank != layout.node_rank and node.address
        )
    else:
        peers = (Peer(0, "primary", layout.primary_address, port),)
    return WatchPlan(
        node_rank=layout.node_rank,
        bind=layout.node_address or "",
        port=port,
        peers=peers,
        startup_grace_s=w.startup_grace_s,
        lost_after_s=w.lost_after_s,
    )


# ---- what one peer said, and the verdict on it: pure, for the tests ----------------------------------------
@dataclass
class PeerState:
    peer: Peer
    token: str | None = None
    """What it answered the first time."""
    last_answer: float | None = None
    """time.monotonic() of its last answer; None: it has not answered yet."""
    last_try: str = "not asked yet"
    restarted: bool = False


def record(state: PeerState, line: str | None, why: str, now: float) -> None:
    """Takes one try's result (``wait.first_line``) into ``state``."""
    if line is None:
        state.last_try = why
        return
    words = line.split()
    head = " ".join(words[:3])
    if head != PROTOCOL or len(words) != 6 or words[3] != "node":
        state.last_try = f"answered {line[:40]!r}, not a launcher's watch (another service on the port?)"
        return
    if words[4] != str(state.peer.node_rank):
        state.last_try = f"answered as node {words[4][:8]}, not node {state.peer.node_rank} (check the deploy file)"
        return
    if state.token is not None and words[5] != state.token:
        state.restarted = True
    state.token = state.token or words[5]
    state.last_answer = now
    state.last_try = "answered"


def verdict(state: PeerState, now: float, started: float, plan: WatchPlan) -> str | None:
    """Why the peer counts as gone, in one line naming it, or None while it does not."""
    p, name = state.peer, plan.name(state.peer)
    where = f"its launcher's watch port {p.host}:{p.port}"
    if state.restarted:
        return (
            f"{name} was restarted: {where} answers for another launcher run (the vLLM this group started with is gone)"
        )
    if state.last_answer is None:
        if now - started < plan.startup_grace_s:
            return None
        return (
            f"{name} never answered on {where} within the start-up grace of {plan.startup_grace_s:g} s "
            f"(last try: {state.last_try}; start `python -m launch serve` there, or raise watch.startup_grace_s)"
        )
    silent = now - state.last_answer
    if silent < plan.lost_after_s:
        return None
    return (
        f"{name} stopped answering on {where} for {silent:.0f} s (bound watch.lost_after_s {plan.lost_after_s:g} s; "
        f"last try: {state.last_try}): its launcher has ended, or its machine or the network is gone"
    )


# ---- the running watch ------------------------------------------------------------------------------------
@dataclass
class Watch:
    """Serves this node's watch port and watches its peers, in two threads, from ``with`` to its end."""

    plan: WatchPlan
    message: str | None = None
    """Set once, when a peer is gone: the one line that names it and says what stopped answering."""
    gone_peer: Peer | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _server: socket.socket | None = None

    def gone(self) -> str | None:
        """For the supervisor's loop: a short reason once a peer is gone, else None."""
        return f"{self.plan.name(self.gone_peer)} is gone" if self.gone_peer else None

    def __enter__(self) -> Watch:
        self._server = _listen(self.plan)
        line = f"{PROTOCOL} node {self.plan.node_rank} {secrets.token_hex(8)}\n".encode()
        self._threads = [
            threading.Thread(target=self._answer, args=(line,), name="watch-answer", daemon=True),
            threading.Thread(target=self._watch, name="watch-peers", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=wait.PROBE + 1)  # each step of both is bounded by a socket timeout
        if self._server is not None:
            self._server.close()

    def _answer(self, line: bytes) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.settimeout(1.0)
                conn.sendall(line)

    def _watch(self) -> None:
        plan = self.plan
        if not plan.peers:
            return
        started = time.monotonic()
        states = [PeerState(p) for p in plan.peers]
        budget = min(wait.PROBE, plan.interval)
        with ThreadPoolExecutor(max_workers=min(MOST_AT_ONCE, len(states)), thread_name_prefix="watch") as pool:
            while not self._stop.is_set():
                tries = list(pool.map(lambda s: wait.first_line(s.peer.host, s.peer.port, budget), states))
                now = time.monotonic()
                for state, (line, why) in zip(states, tries, strict=True):
                    record(state, line, why, now)
                for state in states:
                    if why := verdict(state, now, started, plan):
                        self.message, self.gone_peer = why, state.peer
                        return
                self._stop.wait(plan.interval)


def _listen(plan: WatchPlan) -> socket.socket:
    """The watch port, bound and listening; a ConfigError (before vLLM starts) when it cannot be."""
    try:
        infos = socket.getaddrinfo(plan.bind or None, plan.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        server = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"watch port {plan.bind or '*'}:{plan.port}: {exc.strerror or exc}") from None
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(address)
        server.listen(64)
        server.settimeout(0.5)  # how often the answering thread looks at its stop flag
    except OSError as exc:
        server.close()
        raise ConfigError(
            f"watch port {plan.bind or '*'}:{plan.port} (rpc_port + {WATCH_PORT_OFFSET}): {exc.strerror or exc} "
            f"(expected it free on this node: another launcher with this rpc_port here? or set watch: "
            f"{{enabled: false}})"
        ) from None
    return server
