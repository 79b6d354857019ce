"""Cross-node preflight: every node of the deploy file meets at the primary, shows what it runs, and the
nodes run all-reduce and all-to-all together.

How it goes (each node runs ``python -m preflight --deploy FILE [--node-rank N]`` at about the same time):

1. The primary hosts a torch.distributed TCPStore on its deploy-file address, port ``rpc_port + 1``
   (vLLM's data parallel RPC port plus one; nothing listens there before vLLM starts), or
   EP_PREFLIGHT_RENDEZVOUS_PORT when set (the same value on every node). Secondaries connect to it.
2. Every node publishes its facts (:func:`facts`: host, Python, torch, CUDA, the NCCL torch actually
   loads, the NVIDIA driver, the GPU model, vLLM, the EP kernels deep_ep / pplx_kernels / deep_gemm /
   nixl, a digest of the model files when the model is a local path, and a digest of the deploy file),
   collected in a subprocess with the environment the launcher will give vLLM, so the versions are the
   ones vLLM will import. Every node waits for all the others, at most ``rendezvous_timeout_s``: the
   primary names the ranks that never joined; a secondary that cannot reach the primary names the
   address:port and its own socket interface. Then each node compares all facts (:func:`differences`).
3. The cross-node collective: every node first says whether it can take part (its socket interface
   exists, is up, has a non-loopback address; NCCL has GPUs), so a wrong interface on any node fails
   every node at once, naming it. Then each node starts one worker per local GPU (NCCL; the world is
   nodes x local GPUs, as vLLM's) or EP_PREFLIGHT_NPROCS workers (gloo, default 1 per node), all
   meeting at the primary's store, and runs :mod:`preflight.collectives` across the whole world.
4. Before the primary's store goes away, it waits (bounded) for every joined node to say it is done.

Every wait is bounded by ``rendezvous_timeout_s`` (joining, the readiness exchange, the final goodbye) or
``collective_timeout_s`` (the collective itself), both from the deploy file's ``preflight:`` section.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from preflight import collectives

PORT_VAR = "EP_PREFLIGHT_RENDEZVOUS_PORT"
PREFIX = "preflight/rendezvous/"
EP_KERNELS = ("deep_ep", "pplx_kernels", "deep_gemm", "nixl")

GROUPS: dict[str, tuple[str, ...]] = {
    "python + torch": ("python", "torch", "cuda"),
    "NCCL": ("nccl",),
    "NVIDIA driver + GPU": ("driver", "gpu"),
    "vLLM": ("vllm",),
    "EP kernels": EP_KERNELS,
    "model files": ("model_files",),
    "deploy file": ("deploy",),
}
"""Facts that must be equal on every node, grouped as the checks report them."""

FIXES: dict[str, str] = {
    "python + torch": "install the same environment on every node (pixi install --locked from the same pixi.lock)",
    "NCCL": "make every node load the same NCCL (the stack's LD_LIBRARY_PATH; nvidia-nccl wheel version)",
    "NVIDIA driver + GPU": "install the same driver on every node; do not mix GPU models in one deployment",
    "vLLM": "install the same vLLM version on every node",
    "EP kernels": "build the EP kernels from the same pins on every node (python -m env build)",
    "model files": "copy the same model folder to every node (rsync -a --checksum), or use a shared path",
    "deploy file": "run every node with the same deploy file",
}

BIG_FILE = 64 * 1024**2
"""Model files up to this size are hashed whole; bigger ones (weights) by size, first and last MiB."""


class RendezvousError(RuntimeError):
    """One line saying what was waited for, where, and for how long."""


def rendezvous_port(rpc_port: int, environ: Mapping[str, str] = os.environ) -> int:
    raw = environ.get(PORT_VAR, "").strip()
    if not raw:
        return rpc_port + 1
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise RendezvousError(f"{PORT_VAR}={raw!r}: expected a TCP port (1..65535), the same on every node")
    return int(raw)


# --- facts -----------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def driver_version(path: str = "/proc/driver/nvidia/version") -> str | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None


def model_digest(path: str) -> str | None:
    """Digest of a local model folder (or file): names, sizes, and contents (whole up to BIG_FILE, else
    the first and last MiB, enough to tell two checkpoints apart without reading hundreds of GB)."""
    root = Path(path)
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts)
    h = hashlib.sha256()
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= BIG_FILE:
                h.update(fh.read())
            else:
                h.update(fh.read(1024**2))
                fh.seek(size - 1024**2)
                h.update(fh.read())
    return f"sha256:{h.hexdigest()[:16]} ({len(files)} files, {total / 1024**3:.2f} GiB)"


def facts(model: str | None = None) -> dict[str, Any]:
    """This process's view of the node; run it with the environment vLLM will get (see :class:`FactsJob`)."""
    out: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": None,
        "cuda": None,
        "nccl": None,
        "gpu": None,
        "gpus": 0,
        "driver": driver_version(),
    }
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
        if torch.version.cuda:
            try:
                v = torch.cuda.nccl.version()
                out["nccl"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
            except Exception:  # a CUDA build without a loadable NCCL: report it as missing
                out["nccl"] = None
            if torch.cuda.is_available():
                out["gpus"] = torch.cuda.device_count()
                out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    out["vllm"] = _version("vllm")
    for name in EP_KERNELS:
        out[name] = _version(name)
    out["model_files"] = None  # a hub id: nothing local to compare
    if model:
        local = Path(model).expanduser()
        if local.exists():
            out["model_files"] = model_digest(str(local))
        elif model.startswith((".", "/", "~")):
            out["model_files"] = f"missing: {model}"
    return out


class FactsJob:
    """:func:`facts` in a subprocess with the environment vLLM will get (the plan's PYTHONPATH /
    LD_LIBRARY_PATH), started early so that it imports torch while this process does other work."""

    def __init__(self, env: Mapping[str, str], model: str | None):
        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(collectives.ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
        )
        argv = [sys.executable, "-m", "preflight.rendezvous", "facts", *(["--model", model] if model else [])]
        self.proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
        )

    def result(self, timeout_s: float = 60.0) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise RendezvousError(
                f"collecting this node's facts (python -m preflight.rendezvous facts) took more than {timeout_s:g} s"
            ) from None
        if self.proc.returncode != 0:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            raise RendezvousError(f"collecting this node's facts failed (exit {self.proc.returncode}): {tail}")
        return json.loads(out.strip().splitlines()[-1])


def deploy_digest(config) -> str:
    """The deploy file as loaded, without the socket interface (a per-node override by nature) and without the
    secondaries' addresses (a pod placed by a LeaderWorkerSet knows only the leader's and its own), nor what a
    prefill/decode group derives from them (NIXL's side-channel host, launch/config.py DeployConfig.group)."""
    data = config.model_dump(mode="json")
    data.get("network", {}).pop("socket_ifname", None)
    groups = [data] + [g for g in (data.get("disaggregation") or {}).values() if isinstance(g, dict) and "nodes" in g]
    for group in groups:
        for node in group.get("nodes", [])[1:]:
            node.pop("address", None)
            (node.get("env") or {}).pop("VLLM_NIXL_SIDE_CHANNEL_HOST", None)
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def differences(by_rank: Mapping[int, Mapping[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, list[int]]]:
    """For each fact in ``keys`` that is not the same on every node: value -> ranks that have it."""
    out: dict[str, dict[str, list[int]]] = {}
    for key in keys:
        seen: dict[str, list[int]] = {}
        for rank in sorted(by_rank):
            seen.setdefault(str(by_rank[rank].get(key)), []).append(rank)
        if len(seen) > 1:
            out[key] = seen
    return out


def describe_difference(diffs: Mapping[str, Mapping[str, list[int]]]) -> str:
    """``nccl: 2.28.9 on node 0, 2.27.3 on node 1``; None shows as ``absent``."""
    parts = []
    for key, values in diffs.items():
        shown = ", ".join(
            f"{'absent' if v == 'None' else v} on node{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
            for v, r in values.items()
        )
        parts.append(f"{key}: {shown}")
    return "; ".join(parts)


def describe_same(by_rank: Mapping[int, Mapping[str, Any]], keys: Sequence[str]) -> str:
    first = by_rank[min(by_rank)]
    shown = ", ".join(f"{k} {'absent' if first.get(k) is None else first.get(k)}" for k in keys)
    return f"{shown} on {len(by_rank)} nodes"


# --- the store ------------------------------------------------------------------------------------


@dataclass
class Session:
    """One node's side of the rendezvous."""

    rank: int
    nodes: int
    address: str
    port: int
    ifname: str | None
    timeout_s: float
    store: Any = None
    """A PrefixStore over the TCPStore; on the primary ``server`` is that TCPStore, whose life is the server's."""
    server: Any = None
    facts: dict[int, dict] = field(default_factory=dict)
    problem: str = ""
    missing: list[int] = field(default_factory=list)
    seconds: float = 0.0
    say: Callable[[str], None] = field(default=lambda _line: None, repr=False)
    """Progress lines while waiting (every PROGRESS_S), so a node waiting for others says so."""

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port}"


PROGRESS_S = 10.0


def _progress(
    say: Callable[[str], None], what: str | Callable[[], str], start: float, bound: float
) -> Callable[[], None]:
    """A function that, called in a wait loop, says what is awaited every PROGRESS_S seconds."""
    next_line = [start + PROGRESS_S]

    def tick() -> None:
        now = time.monotonic()
        if now >= next_line[0]:
            say(f"waiting for {what() if callable(what) else what} ({now - start:.0f} s of {bound:g} s)")
            next_line[0] = now + PROGRESS_S

    return tick


def _reachable(address: str, port: int, deadline: float, say: Callable[[str], None] = lambda _line: None) -> str | None:
    """None once a TCP connection to address:port succeeds; else the last error, at the deadline."""
    last = "no attempt"
    tick = _progress(
        say, f"the primary's rendezvous at {address}:{port}", time.monotonic(), deadline - time.monotonic()
    )
    while True:
        tick()
        left = deadline - time.monotonic()
        if left <= 0:
            return last
        try:
            with socket.create_connection((address, port), timeout=min(1.0, max(left, 0.05))):
                return None
        except OSError as exc:
            last = exc.strerror or str(exc)
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))


def _within(seconds: float, make: Callable[[], object]) -> tuple[bool, object, BaseException | None]:
    """Runs ``make`` for at most ``seconds``: (finished, result, exception). TCPStore's client handshake has no
    bound of its own against a listener that accepts and never answers; it releases the GIL while it waits, so
    a daemon thread holds it and is left behind (the process ends soon after, with its verdict)."""
    out: list = [None, None]

    def run() -> None:
        try:
            out[0] = make()
        except Exception as exc:  # reported by the caller in one line
            out[1] = exc

    worker = threading.Thread(target=run, name="tcpstore-connect", daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive(), out[0], out[1]


def open_store(
    rank: int,
    nodes: int,
    address: str,
    port: int,
    ifname: str | None,
    timeout_s: float,
    say: Callable[[str], None] = lambda _line: None,
) -> Session:
    """The primary hosts the store; a secondary connects to it. Bounded by ``timeout_s``; ``say`` gets progress lines."""
    from torch.distributed import PrefixStore, TCPStore

    start = time.monotonic()
    session = Session(rank, nodes, address, port, ifname, timeout_s, say=say)
    if rank == 0:
        try:
            store = TCPStore(
                address, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
            )
        except Exception as exc:
            busy = "in use" if "in use" in str(exc).lower() else " ".join(str(exc).split())[:200]
            session.problem = (
                f"cannot host the rendezvous on {address}:{port}: {busy} "
                f"(set {PORT_VAR} to a free port, the same on every node)"
            )
            return session
    else:
        why = _reachable(address, port, start + timeout_s, say)
        if why is not None:
            session.problem = (
                f"cannot reach the primary's rendezvous at {address}:{port} within {timeout_s:g} s "
                f"({why}; this node's socket interface: {ifname or 'none'}): is preflight running on the "
                f"primary with the same deploy file, and is port {port} open between the nodes?"
            )
            return session
        left = max(start + timeout_s - time.monotonic(), 1.0)
        done, store, exc = _within(
            left, lambda: TCPStore(address, port, is_master=False, timeout=timedelta(seconds=left))
        )
        if not done:
            session.problem = (
                f"reached {address}:{port}, but it did not answer as the primary's TCPStore within {timeout_s:g} s "
                f"(another service on port {port}? set {PORT_VAR} to a free port, the same on every node)"
            )
            return session
        if exc is not None:
            session.problem = f"reached {address}:{port} but not as a TCPStore ({' '.join(str(exc).split())[:160]})"
            return session
    session.store, session.server = PrefixStore(PREFIX, store), store
    session.seconds = time.monotonic() - start
    return session


def exchange(session: Session, key: str, value: dict, timeout_s: float) -> tuple[dict[int, dict], list[int], str]:
    """Publishes ``value`` as this node's ``key`` and waits, at most ``timeout_s``, for every node's.
    Returns (values by rank, ranks that never published, a problem when the store went away)."""
    store = session.store
    try:
        store.set(f"{key}/{session.rank}", json.dumps(value))
    except Exception as exc:
        return {}, [], f"lost the rendezvous at {session.where} ({' '.join(str(exc).split())[:160]})"
    deadline = time.monotonic() + timeout_s
    got: dict[int, dict] = {}

    def waiting() -> str:
        return f"node(s) {sorted(set(range(session.nodes)) - set(got))} at {session.where} ({key!r})"

    tick = _progress(session.say, waiting, time.monotonic(), timeout_s)
    while True:
        tick()
        try:
            for rank in range(session.nodes):
                if rank not in got and store.check([f"{key}/{rank}"]):
                    got[rank] = json.loads(store.get(f"{key}/{rank}"))
        except Exception as exc:
            gone = "the primary stopped" if session.rank else "the store failed"
            return (
                got,
                [],
                f"lost the rendezvous at {session.where} while waiting for {key!r} ({gone}: {' '.join(str(exc).split())[:120]})",
            )
        if len(got) == session.nodes:
            return got, [], ""
        if time.monotonic() >= deadline:
            return got, sorted(set(range(session.nodes)) - set(got)), ""
        time.sleep(0.1)


def join(session: Session, own: dict, addresses: Sequence[str]) -> Session:
    """Publishes this node's facts and gathers everyone's (bounded by the session's timeout)."""
    if not session.ok:
        return session
    start = time.monotonic()
    try:
        claims = session.store.add(f"claim/{session.rank}", 1)
    except Exception as exc:
        session.problem = f"lost the rendezvous at {session.where} ({' '.join(str(exc).split())[:160]})"
        return session
    if claims > 1:
        session.problem = f"another node already joined as rank {session.rank}: check --node-rank on every node"
        return session
    got, missing, problem = exchange(session, "facts", own, session.timeout_s)
    session.facts, session.missing = got, missing
    session.seconds += time.monotonic() - start
    if problem:
        session.problem = problem
    elif missing:
        names = ", ".join(f"{r} ({addresses[r]})" if r < len(addresses) else str(r) for r in missing)
        session.problem = (
            f"rank(s) {names} did not join the rendezvous at {session.where} within {session.timeout_s:g} s: "
            f"start preflight on {'them' if len(missing) > 1 else 'it'} with the same deploy file and its --node-rank"
        )
    return session


def leave(session: Session) -> None:
    """Says this node is done; the primary keeps the store up until every joined node said so (bounded)."""
    if session.store is None:
        return
    joined = [r for r in session.facts if r != 0] if session.rank == 0 else []
    try:
        session.store.set(f"bye/{session.rank}", "1")
        deadline = time.monotonic() + session.timeout_s
        while joined and time.monotonic() < deadline:
            joined = [r for r in joined if not session.store.check([f"bye/{r}"])]
            time.sleep(0.1)
    except Exception:
        pass  # the store is gone: nothing left to wait for
    session.store = session.server = None  # the primary's server stops with its last reference


# --- the cross-node collective ---------------------------------------------------------------------


def interface_problem(ifname: str | None, why_none: str, var: str, multinode: bool = True) -> str:
    """Empty when ``ifname`` can carry traffic to other nodes; else why not, naming it."""
    from launch import netif

    if not ifname:
        return f"no socket interface for {var} ({why_none or 'none configured'})"
    up = netif.interface_up(ifname)
    known = netif.interfaces()
    if up is None:
        return f"socket interface {ifname!r} ({var}) does not exist on this node (it has: {', '.join(known)})"
    if not up:
        return f"socket interface {ifname!r} ({var}) is down"
    addrs = known.get(ifname, [])
    if not addrs:
        return f"socket interface {ifname!r} ({var}) has no IP address"
    if multinode and all(a.startswith("127.") or a == "::1" for a in addrs):
        return f"socket interface {ifname!r} ({var}) is loopback: other nodes cannot reach {', '.join(addrs)}"
    return ""


@dataclass(frozen=True)
class Ready:
    """What a node says before the cross-node collective."""

    problem: str
    backend: str
    nprocs: int
    host: str


def cross_collective(
    session: Session,
    ready: Ready,
    env: Mapping[str, str],
    sizes: Sequence[int],
    collective_timeout_s: float,
    addresses: Sequence[str],
) -> collectives.Result:
    """Runs the world-wide collectives once every node is ready; fails every node at once when one is not."""
    var = collectives.interface_in_use(ready.backend, env)
    failed = collectives.Result(ready.backend, 0, ready.nprocs, var)
    got, missing, lost = exchange(session, "ready", asdict(ready), session.timeout_s)
    if lost or missing:
        failed.problem = (
            lost
            or f"node(s) {', '.join(map(str, missing))} did not reach the cross-node collective within {session.timeout_s:g} s"
        )
        return failed
    bad = [
        f"node {r} ({addresses[r] if r < len(addresses) else got[r]['host']}): {got[r]['problem']}"
        for r in sorted(got)
        if got[r]["problem"]
    ]
    if bad:
        failed.problem = "; ".join(bad)
        return failed
    backends = {got[r]["backend"] for r in got}
    if len(backends) > 1:
        failed.problem = "nodes disagree on the backend: " + ", ".join(
            f"node {r} {got[r]['backend']}" for r in sorted(got)
        )
        return failed
    offset = sum(got[r]["nprocs"] for r in range(session.rank))
    world = sum(got[r]["nprocs"] for r in got)
    spec = collectives.Spec(
        ready.backend,
        ready.nprocs,
        tuple(sizes),
        timeout_s=collective_timeout_s,  # type: ignore[arg-type]
        store_host=session.address,
        store_port=session.port,
        store_prefix="preflight/crossnode/",
        rank_offset=offset,
        world_size=world,
    )
    result = collectives.run(spec, env)
    # What the other nodes saw, to say where a failure started (bounded: they end within the same limits).
    others, _, _ = exchange(
        session, "outcome", {"problem": result.problem}, min(session.timeout_s, collectives.GRACE_S * 2)
    )
    if result.problem:
        elsewhere = [
            f"node {r}: {others[r]['problem']}" for r in sorted(others) if r != session.rank and others[r]["problem"]
        ]
        if elsewhere:
            result.problem += " | " + " | ".join(elsewhere)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["facts"]:
        print("usage: python -m preflight.rendezvous facts [--model PATH] (used by preflight itself)", file=sys.stderr)
        return 2
    model = argv[argv.index("--model") + 1] if "--model" in argv[:-1] else None
    print(json.dumps(facts(model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
