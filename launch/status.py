"""`python -m launch status FILE`: is the deployment serving, and how busy is every data parallel rank.

What is polled, all at once and within one time bound:
- each group's primary: GET /health (vLLM's own liveness: 200 while its engines answer) and GET /metrics
  (vLLM's Prometheus endpoint);
- each secondary's launcher, on its watch port (rpc_port + 1000, launch/peers.py), where the deploy file
  keeps the watch on: the line it answers says the node and its launcher are still there;
- the router of a prefill/decode deployment: GET /health.
A headless secondary has no HTTP endpoint of its own. Its data parallel ranks are served through the
primary's API server, whose /metrics carries one series per rank (label ``engine``): in vLLM's internal
load-balancing mode the API server's client manages every rank, local and remote
(vllm/v1/engine/core_client.py, ``engine_ranks_managed``, and the per-engine label values in
vllm/v1/metrics/loggers.py; read in the 0.26.0 wheel). So each node's line shows its own ranks' figures as
the primary reports them, and a node is down when its group's primary is, or its launcher does not answer.

The figures per rank: ``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and the KV-cache use
(``vllm:kv_cache_usage_perc``; vLLM 0.10 also had the older ``vllm:gpu_cache_usage_perc``).

Exit code: 0 when every polled endpoint answered healthy, 1 when one did not (its line says why), 2 for a
deploy file or argument that cannot be used.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from launch import wait
from launch.config import ConfigError, DeployConfig
from launch.layout import NodeLayout, layouts
from launch.peers import PROTOCOL

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
KV_USE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
"""The current name first; vLLM 0.10 exported both, later versions only the first."""


@dataclass(frozen=True)
class Endpoint:
    """One HTTP server to poll: a group's primary (with metrics) or the router."""

    name: str
    url: str
    metrics: bool


@dataclass(frozen=True)
class Launcher:
    """A secondary's launcher, asked on its watch port for the line it answers while vLLM runs."""

    name: str
    host: str
    port: int
    node_rank: int


@dataclass(frozen=True)
class NodeRow:
    group: str | None
    layout: NodeLayout
    endpoint: Endpoint
    """The endpoint this node's health is judged by: its group's primary."""
    launcher: Launcher | None = None
    """A secondary's own launcher, where the watch is on."""


@dataclass
class Answer:
    """What one endpoint said: the /health status, or the reason it could not be asked."""

    health: int | None = None
    error: str | None = None
    seconds: float = 0.0
    ranks: dict[int, RankFigures] = field(default_factory=dict)
    answered: bool = False
    """A launcher's watch port answered with its node's line."""

    @property
    def up(self) -> bool:
        return self.health == 200 or self.answered


@dataclass
class RankFigures:
    running: float | None = None
    waiting: float | None = None
    kv_use: float | None = None
    """Fraction 0..1 of the rank's KV cache in use."""


def targets(config: DeployConfig) -> tuple[list[NodeRow], list[Endpoint]]:
    """Every node of the deploy file with the endpoint (and launcher) that answers for it, and every HTTP
    endpoint to poll."""
    groups = (
        [(None, config)] if config.disaggregation is None else [(g, config.group(g)) for g in ("prefill", "decode")]
    )
    rows: list[NodeRow] = []
    endpoints: list[Endpoint] = []
    for group, cfg in groups:
        lays = layouts(cfg)
        primary = Endpoint(
            f"{group or 'api'} {lays[0].node_address}:{cfg.port}",
            f"http://{_host(lays[0].node_address)}:{cfg.port}",
            True,
        )
        endpoints.append(primary)
        rows += [NodeRow(group, lay, primary, _launcher(cfg, group, lay)) for lay in lays]
    if config.disaggregation is not None:
        router = config.disaggregation.router
        where = router.address or config.disaggregation.prefill.nodes[0].address
        endpoints.append(Endpoint(f"router {where}:{router.port}", f"http://{_host(where)}:{router.port}", False))
    return rows, endpoints


def _launcher(cfg: DeployConfig, group: str | None, lay: NodeLayout) -> Launcher | None:
    if lay.role == "primary" or not cfg.watch.enabled or lay.node_address is None:
        return None
    where = f"{lay.node_address}:{cfg.watch_port}"
    return Launcher(f"{group + ' ' if group else ''}launcher {where}", lay.node_address, cfg.watch_port, lay.node_rank)


def _host(address: str | None) -> str:
    if address is None:
        raise ConfigError(
            "nodes: an address is missing (expected every node's address; a scheduler-placed file has "
            "none: ask the scheduler, e.g. `kubectl get pods`, `squeue`)"
        )
    return f"[{address}]" if ":" in address else address


def poll(endpoints: list[Endpoint], timeout_s: float, launchers: list[Launcher] = ()) -> dict[str, Answer]:
    """Asks every endpoint and launcher at once; nothing waits past ``timeout_s`` in all."""
    deadline = time.monotonic() + timeout_s
    asked = [*endpoints, *launchers]
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(asked)))) as pool:
        answers = list(pool.map(lambda e: _ask(e, deadline), asked))
    return {e.name: a for e, a in zip(asked, answers, strict=True)}


def _ask(endpoint: Endpoint | Launcher, deadline: float) -> Answer:
    start = time.monotonic()
    answer = Answer()
    if isinstance(endpoint, Launcher):
        line, why = wait.first_line(endpoint.host, endpoint.port, max(deadline - start, 0.05))
        answer.answered = line is not None and line.startswith(f"{PROTOCOL} node {endpoint.node_rank} ")
        if not answer.answered:
            answer.error = why if line is None else f"answered {line[:60]!r}, not this node's launcher"
        answer.seconds = time.monotonic() - start
        return answer
    try:
        answer.health, _ = _get(endpoint.url + "/health", deadline)
        if endpoint.metrics and answer.up:
            _, text = _get(endpoint.url + "/metrics", deadline)
            answer.ranks = rank_figures(text)
    except (OSError, ValueError) as exc:
        answer.error = _reason(exc)
    answer.seconds = time.monotonic() - start
    return answer


def _get(url: str, deadline: float) -> tuple[int, str]:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no time left within the bound")
    try:
        with urllib.request.urlopen(url, timeout=left) as response:  # noqa: S310 - http only, built from the deploy file
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return "no answer within the bound"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens on the port)"
    return str(exc) or type(exc).__name__


def rank_figures(text: str) -> dict[int, RankFigures]:
    """Per data parallel rank (label ``engine``), the figures of vLLM's Prometheus text."""
    ranks: dict[int, RankFigures] = {}
    kv_seen: dict[int, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            engine = sample.labels.get("engine")
            if engine is None or not engine.isdigit():
                continue
            figures = ranks.setdefault(int(engine), RankFigures())
            if sample.name == RUNNING:
                figures.running = sample.value
            elif sample.name == WAITING:
                figures.waiting = sample.value
            elif sample.name in KV_USE:
                rank = KV_USE.index(sample.name)  # prefer the current name where both are exported
                if kv_seen.get(int(engine), len(KV_USE)) > rank:
                    figures.kv_use, kv_seen[int(engine)] = sample.value, rank
    return ranks


def node_line(row: NodeRow, answer: Answer, per_rank: bool, launcher: Answer | None = None) -> list[str]:
    """One line for the node (and one per rank with ``per_rank``); pure, for the tests. ``launcher``: what the
    node's own launcher answered (a secondary, where the watch is on)."""
    lay = row.layout
    first, last = lay.start_rank, lay.start_rank + lay.data_parallel_size_local - 1
    where = f"{row.group + ' ' if row.group else ''}node {lay.node_rank} ({lay.role} {lay.node_address})"
    if not answer.up:
        why = answer.error or f"/health answered {answer.health}"
        via = "" if lay.role == "primary" else " (its group's primary)"
        return [f"{where:<40} DOWN  DP {first}..{last}: {row.endpoint.name}{via}: {why}"]
    if launcher is not None and not launcher.up:
        assert row.launcher is not None
        gone = f"{row.launcher.name}: {launcher.error} (the node, or its launcher, is gone)"
        return [f"{where:<40} DOWN  DP {first}..{last}: {gone}"]
    mine = [answer.ranks.get(r) for r in range(first, last + 1)]
    missing = [r for r, f in zip(range(first, last + 1), mine, strict=True) if f is None]
    known = [f for f in mine if f is not None]
    running = sum(f.running or 0 for f in known)
    waiting = sum(f.waiting or 0 for f in known)
    kv = [f.kv_use for f in known if f.kv_use is not None]
    kv_text = f"KV {100 * max(kv):.1f}% max" if kv else "KV n/a"
    note = f"; no metrics for DP {_ranges(missing)}" if missing else ""
    lines = [f"{where:<40} UP    DP {first}..{last}: running {running:g} waiting {waiting:g} {kv_text}{note}"]
    if per_rank:
        for r, f in zip(range(first, last + 1), mine, strict=True):
            if f is None:
                lines.append(f"  DP {r:>4}: no metrics")
            else:
                kv_rank = "n/a" if f.kv_use is None else f"{100 * f.kv_use:.1f}%"
                lines.append(f"  DP {r:>4}: running {f.running or 0:g} waiting {f.waiting or 0:g} KV {kv_rank}")
    return lines


def _ranges(ranks: list[int]) -> str:
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}..{r}")
            start = None
    return ",".join(parts)


def report(config: DeployConfig, source: str, timeout_s: float, per_rank: bool) -> tuple[list[str], bool]:
    rows, endpoints = targets(config)
    launchers = [r.launcher for r in rows if r.launcher is not None]
    start = time.monotonic()
    answers = poll(endpoints, timeout_s, launchers)
    took = time.monotonic() - start
    ranks = sum(r.layout.data_parallel_size_local for r in rows)
    watched = f" and {len(launchers)} launchers' watch ports" if launchers else ""
    lines = [
        f"# status of {source}: {len(rows)} nodes, {ranks} DP ranks; polled {len(endpoints)} endpoints{watched} "
        f"in {took:.2f} s (bound {timeout_s:g} s)"
    ]
    for row in rows:
        launcher = answers[row.launcher.name] if row.launcher else None
        lines += node_line(row, answers[row.endpoint.name], per_rank, launcher)
    for e in endpoints:
        if not e.metrics:
            a = answers[e.name]
            state = "UP  " if a.up else "DOWN"
            lines.append(f"{e.name:<40} {state}  {a.error or f'/health answered {a.health}'}")
    healthy = all(a.up for a in answers.values())
    lines.append(f"# verdict: {'serving' if healthy else 'NOT serving'}")
    return lines, healthy
