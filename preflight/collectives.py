"""All-reduce and all-to-all through torch.distributed, checked for exact results, then timed.

One worker process per local GPU (backend ``nccl``) or per requested CPU process (backend ``gloo``, for
machines without GPUs and for the toolkit's own tests): the same code, the backend is a parameter. The
parent starts the workers (``python -m preflight.collectives --worker ...``) in one process group of
their own, hosts the TCPStore they meet at (or points them at the cross-node one, see rendezvous.py),
and waits for them with a deadline. What comes back is a :class:`Result`:

- rows in nccl-tests' quantities, per collective and size: time (us, mean over iterations, averaged over
  ranks as nccl-tests does by default), algbw = bytes / time, busbw = algbw * 2(n-1)/n (all-reduce) or
  algbw * (n-1)/n (all-to-all), and #wrong: elements that differ from the exact expected value;
- or a problem: a hang (deadline passed: the workers' group is killed) or a worker that died, naming the
  collective and size, the ranks that did not finish, and the socket interface in use.

Correctness first, with integer-valued float32 data so every sum is exact in any reduction order:
all-reduce of ``(rank + 1) + (i % 8)`` must give ``n(n+1)/2 + n * (i % 8)``; all-to-all sends rank r's
chunk j filled with ``(r * n + j) * 128 + (e % 128)`` (e: index inside the chunk), so every received
element says who sent it, to whom, and where.

Timing: CUDA events around the loop on GPUs, ``time.perf_counter`` on CPU. The environment given
(``NodeContext.env()``) goes to the workers unchanged (NCCL_NVLS_ENABLE and friends stay as they are);
only a local gloo run with no GLOO_SOCKET_IFNAME gets ``lo``, since all its ranks are on this machine.

Variables for testing without GPUs (not for production use):

    EP_PREFLIGHT_BACKEND=gloo        run the collective checks with gloo on CPU instead of NCCL
    EP_PREFLIGHT_NPROCS=2            worker processes per node (default: the GPUs this node's plan uses)
    EP_PREFLIGHT_TEST_HANG_RANK=R    global rank R stops before its first collective (a hang)
    EP_PREFLIGHT_TEST_EXIT_RANK=R    global rank R exits with code 3 there (a dead worker)
    EP_PREFLIGHT_TEST_FAULT_AT=NAME  ... at collective NAME (all_reduce, all_to_all) instead of the first
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

Backend = Literal["gloo", "nccl"]
BACKENDS: tuple[str, ...] = ("gloo", "nccl")
COLLECTIVES: tuple[str, ...] = ("all_reduce", "all_to_all")

KiB, MiB, GiB = 1024, 1024**2, 1024**3
GPU_SIZES: tuple[int, ...] = (1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, 1 * GiB)
"""From where launch overhead dominates (1 MiB) to where NVLink saturates (1 GiB, see shared/facts)."""
CPU_SIZES: tuple[int, ...] = (64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB)
"""gloo over sockets: small enough for a 2-core machine to sweep in about a second."""

ELEMENT = 4  # float32, as nccl-tests' default type
ROOT = Path(__file__).resolve().parent.parent  # the project, put on the workers' PYTHONPATH

# NVLink GPUs whose all-reduce busbw at 1 GiB is far above these (2 x H200 measured 328 GB/s all-reduce
# and 332 GB/s all-to-all, shared/facts/gpu-machine-2xH200.md): a node below them has a sick link or
# runs NCCL over PCIe / sockets. PCIe cards and unknown GPUs get no minimum: the figure is reported only.
# (H800 / H20 have narrower NVLink: no figure known here, so no minimum.)
NVLINK_MIN_BUSBW_GBPS: dict[str, dict[str, float]] = {
    "all_reduce": {"H100": 150.0, "H200": 150.0, "B200": 150.0, "GB200": 150.0},
    "all_to_all": {"H100": 100.0, "H200": 100.0, "B200": 100.0, "GB200": 100.0},
}


def bus_factor(collective: str, n: int) -> float:
    """nccl-tests' busbw / algbw: what each rank's links carry relative to the buffer size."""
    if n <= 1:
        return 0.0
    if collective == "all_reduce":
        return 2 * (n - 1) / n
    if collective == "all_to_all":
        return (n - 1) / n
    raise ValueError(f"unknown collective {collective!r} (expected one of: {', '.join(COLLECTIVES)})")


def element_count(collective: str, size: int, n: int) -> int:
    """Elements of a ``size``-byte float32 buffer; all-to-all needs a multiple of n (equal chunks)."""
    count = max(size // ELEMENT, 1)
    if collective == "all_to_all":
        count = max(count // n, 1) * n
    return count


def size_label(size: int) -> str:
    """``1 MiB``; all-to-all buffers rounded down to a multiple of the ranks (1048572 B) read ``1 MiB`` too."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale * 0.99:
            q = size / scale
            return f"{round(q)} {unit}" if abs(q - round(q)) < 0.01 else f"{q:.1f} {unit}"
    return f"{size} B"


def parse_size(text: str) -> int:
    """``65536``, ``64K``, ``64KiB``, ``1M``, ``1G`` -> bytes (binary units, as nccl-tests' -b/-e)."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": KiB, "M": MiB, "G": GiB}.get(raw[-1:], 1)
    digits = raw[:-1] if scale != 1 else raw
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(
            f"size {text!r}: expected a positive number of bytes, optionally with K, M or G (e.g. 64K, 1M)"
        )
    return int(digits) * scale


def interface_in_use(backend: str, env: Mapping[str, str]) -> str:
    """The socket interface variable the backend reads, as ``NAME=value`` (for messages)."""
    var = "GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME"
    return f"{var}={env.get(var) or 'unset'}"


def nvlink_minimum(collective: str, gpu_names: Sequence[str]) -> tuple[float | None, str]:
    """(busbw minimum at the largest size, why) from the GPU model; (None, why) when there is none."""
    if not gpu_names:
        return None, "cpu: no minimum"
    names = set(gpu_names)
    if len(names) > 1:
        return None, f"mixed GPUs ({', '.join(sorted(names))}): no minimum"
    name = gpu_names[0]
    # PCIe cards (also "H100 NVL"/"H200 NVL": PCIe with bridges between pairs) do not reach NVSwitch figures.
    if "PCIE" in name.upper() or name.upper().rstrip().endswith(" NVL"):
        return None, f"{name} (PCIe): no minimum"
    words = name.upper().replace("-", " ").split()  # "NVIDIA H100 80GB HBM3", "NVIDIA H100-SXM5-80GB"
    for model, minimum in NVLINK_MIN_BUSBW_GBPS[collective].items():
        if model in words:
            return minimum, f"{model} NVLink"
    return None, f"{name}: no minimum known"


# --- what a run returns -------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: one collective at one size."""

    collective: str
    size: int  # bytes per rank buffer
    count: int  # elements
    dtype: str
    time_us: float
    algbw: float  # GB/s (1e9 bytes per second, as nccl-tests)
    busbw: float
    wrong: int  # elements, summed over ranks


@dataclass
class Identity:
    """Who one rank was: nccl-tests prints one such line per rank."""

    rank: int
    host: str
    pid: int
    device: str  # cuda:0 / cpu
    pci: str  # PCI bus id, or "cpu"
    name: str  # GPU name, or the CPU's


@dataclass
class Result:
    backend: str
    world_size: int
    nprocs: int
    interface: str
    rows: list[Row] = field(default_factory=list)
    ranks: list[Identity] = field(default_factory=list)
    problem: str = ""
    """Empty when every worker finished; else what hung or died, where, and on which interface."""
    collective: str | None = None
    """The collective that hung or failed (``init_process_group`` while starting)."""
    unfinished: list[int] = field(default_factory=list)
    """Global ranks (of this node) that did not finish."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problem

    def of(self, collective: str) -> list[Row]:
        return [r for r in self.rows if r.collective == collective]

    def problem_for(self, collective: str) -> str:
        """The run's problem as it concerns ``collective``: its own, or that it was not measured because the
        run stopped at another."""
        if self.collective in (collective, None) or self.of(collective):
            return self.problem
        return f"not measured: {self.problem}"

    def largest(self, collective: str) -> Row | None:
        rows = self.of(collective)
        return max(rows, key=lambda r: r.size) if rows else None

    def wrong(self, collective: str) -> int:
        return sum(r.wrong for r in self.of(collective))

    def gpu_names(self) -> list[str]:
        return [i.name for i in self.ranks if i.device != "cpu"]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Spec:
    """What to run. Locally (``store_host`` None) this process hosts the store on 127.0.0.1; across nodes
    the workers of every node meet at the primary's store, each node's ranks starting at ``rank_offset``."""

    backend: Backend
    nprocs: int
    sizes: tuple[int, ...]
    collectives: tuple[str, ...] = COLLECTIVES
    warmup: int = 2
    iters: int = 10
    timeout_s: float = 60.0
    store_host: str | None = None
    store_port: int = 0
    store_prefix: str = "preflight/collectives/"
    rank_offset: int = 0
    world_size: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} (expected one of: {', '.join(BACKENDS)})")
        if self.nprocs < 1:
            raise ValueError(f"nprocs: {self.nprocs} (expected >= 1)")
        if self.world < 2:
            raise ValueError(f"world size: {self.world} (expected >= 2 ranks: a collective needs two)")
        unknown = [c for c in self.collectives if c not in COLLECTIVES]
        if unknown:
            raise ValueError(f"collectives: {', '.join(unknown)} unknown (expected: {', '.join(COLLECTIVES)})")
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes: {list(self.sizes)} (expected positive byte counts)")

    @property
    def world(self) -> int:
        return self.world_size or self.nprocs


@dataclass(frozen=True)
class Selection:
    """Backend and processes per node, from EP_PREFLIGHT_BACKEND / EP_PREFLIGHT_NPROCS (testing without GPUs)."""

    backend: Backend = "nccl"
    nprocs: int | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Selection:
        backend = environ.get("EP_PREFLIGHT_BACKEND", "nccl").strip() or "nccl"
        if backend not in BACKENDS:
            raise ValueError(f"EP_PREFLIGHT_BACKEND={backend!r} (expected one of: {', '.join(BACKENDS)})")
        raw = environ.get("EP_PREFLIGHT_NPROCS", "").strip()
        if raw and (not raw.isdigit() or int(raw) < 1):
            raise ValueError(f"EP_PREFLIGHT_NPROCS={raw!r} (expected a whole number >= 1)")
        return cls(backend, int(raw) if raw else None)  # type: ignore[arg-type]

    @property
    def sizes(self) -> tuple[int, ...]:
        return GPU_SIZES if self.backend == "nccl" else CPU_SIZES


@dataclass(frozen=True)
class Workers:
    """How many workers this node starts, or why it cannot (problem) or need not (skip)."""

    backend: Backend
    nprocs: int
    problem: str = ""
    skip: str = ""


def workers_for(selection: Selection, expected_gpus: int | None, visible: int, *, crossnode: bool) -> Workers:
    """NCCL: one worker per GPU the plan uses (all visible ones without a deploy file); gloo:
    EP_PREFLIGHT_NPROCS, default 2 on one node and 1 per node across nodes."""
    if selection.backend == "gloo":
        n = selection.nprocs or (1 if crossnode else 2)
        return Workers(
            "gloo", n, skip="" if crossnode or n > 1 else "EP_PREFLIGHT_NPROCS=1: one process, nothing to exchange"
        )
    if visible == 0:
        return Workers("nccl", 0, problem="no CUDA GPUs")
    n = selection.nprocs or expected_gpus or visible
    if n > visible:
        return Workers(
            "nccl",
            n,
            problem=f"{n} GPUs wanted ({'EP_PREFLIGHT_NPROCS' if selection.nprocs else 'the plan'}), {visible} visible",
        )
    if n == 1 and not crossnode:
        return Workers("nccl", 1, skip="one GPU on this node: no intra-node collective")
    return Workers("nccl", n)


def cuda_devices() -> int:
    """GPUs torch sees here (0 without CUDA)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --- the parent: start, wait with a deadline, explain ----------------------------------------------

GRACE_S = 5.0
"""After the first worker fails, how long the others get to fail or finish by themselves."""


@dataclass
class _Worker:
    local_rank: int
    rank: int
    proc: subprocess.Popen
    log: Path
    err: Path

    def events(self) -> list[dict]:
        try:
            text = self.log.read_text()
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
                out.append(json.loads(line))
        return out


def run(spec: Spec, env: Mapping[str, str]) -> Result:
    """Runs ``spec`` in worker processes; never waits longer than ``spec.timeout_s`` (+ a few s to reap)."""
    import torch.distributed as dist

    start = time.monotonic()
    env = dict(env)
    if spec.backend == "gloo" and spec.store_host is None and not env.get("GLOO_SOCKET_IFNAME"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # every rank is on this machine
    result = Result(spec.backend, spec.world, spec.nprocs, interface_in_use(spec.backend, env))
    with tempfile.TemporaryDirectory(prefix="ep-preflight-") as work:
        store = None
        host, port = spec.store_host, spec.store_port
        if host is None:
            store = dist.TCPStore(
                "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=spec.timeout_s)
            )
            host, port = "127.0.0.1", store.port
        job = {
            **asdict(spec),
            "store_host": host,
            "store_port": port,
            "workdir": work,
            # the workers' own timeout comes after ours, so that it is the parent that says what hung
            "pg_timeout_s": spec.timeout_s + 30,
        }
        workers: list[_Worker] = []
        try:
            workers = _start(job, spec, env, Path(work), workers)
            timed_out, codes = _wait(workers, start + spec.timeout_s)
        finally:  # also on Ctrl-C: no worker outlives the check
            _stop([w.proc for w in workers])
        result.seconds = round(time.monotonic() - start, 3)
        _explain(result, workers, timed_out, codes, spec)
        del store
    return result


def _start(job: dict, spec: Spec, env: dict[str, str], work: Path, workers: list[_Worker]) -> list[_Worker]:
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(job))
    pgid = 0
    for local in range(spec.nprocs):
        rank = spec.rank_offset + local
        log, err = work / f"rank-{rank}.jsonl", work / f"rank-{rank}.err"
        # One process group for all workers (the first one leads it), so one killpg stops them all.
        with open(err, "wb") as errf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "preflight.collectives", "--worker", str(spec_file), str(local)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=errf,
                stderr=subprocess.STDOUT,
                process_group=pgid,
            )
        pgid = pgid or proc.pid
        workers.append(_Worker(local, rank, proc, log, err))
    return workers


def _wait(workers: list[_Worker], deadline: float) -> tuple[bool, dict[int, int | None]]:
    """Until every worker exits or the deadline passes (True). A failed worker shortens the wait to
    GRACE_S, as does a worker stuck in teardown after its result. Returns the exit codes seen then."""
    while True:
        codes = {w.rank: w.proc.poll() for w in workers}
        if all(c is not None for c in codes.values()):
            return False, codes
        now = time.monotonic()
        failed = any(c not in (None, 0) for c in codes.values())
        if failed or all(any(e.get("at") == "result" for e in w.events()) for w in workers if codes[w.rank] is None):
            deadline = min(deadline, now + GRACE_S)
        if now >= deadline:
            return True, codes
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to the workers' group, SIGKILL after 3 s; then reap (bounded)."""
    if not procs:
        return
    pgid = procs[0].pid
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        if all(p.poll() is not None for p in procs) and not _group_alive(pgid):
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        until = time.monotonic() + wait
        while time.monotonic() < until and any(p.poll() is None for p in procs):
            time.sleep(0.05)
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _where(event: dict | None) -> str:
    if not event:
        return "not started (python/torch import)"
    at = event.get("at")
    if at in ("enter", "leave"):
        return f"{'in' if at == 'enter' else 'after'} {event['collective']} of {size_label(event['size'])}"
    return {
        "store": "connecting to the store",
        "init": "in init_process_group",
        "up": "process group up",
        "exchange": "exchanging results",
        "result": "finished",
        "error": "failed",
    }.get(at, str(at))


def _explain(result: Result, workers: list[_Worker], timed_out: bool, codes: dict[int, int | None], spec: Spec) -> None:
    """Fills rows from the result the workers agreed on, or the problem from where each worker last was."""
    events = {w.rank: w.events() for w in workers}
    done = {w.rank for w in workers if any(e.get("at") == "result" for e in events[w.rank])}
    if len(done) == len(workers):
        final = next(e for e in events[min(done)] if e.get("at") == "result")
        result.rows = [Row(**r) for r in final["rows"]]
        result.ranks = [Identity(**i) for i in final["ranks"]]
        return
    result.unfinished = sorted(w.rank for w in workers if w.rank not in done)
    last = {r: next((e for e in reversed(events[r]) if e.get("at") != "error"), None) for r in events}
    # The collective: the furthest one a rank entered and did not leave (others may never have reached it).
    inside = [e for e in last.values() if e and e.get("at") == "enter"]
    stuck = max(inside, key=lambda e: e["step"]) if inside else None
    if stuck:
        result.collective = stuck["collective"]
        what = f"{stuck['collective']} of {size_label(stuck['size'])}"
    elif any(e is None or e.get("at") in ("store", "init") for e in last.values()):
        result.collective = "init_process_group"
        what = f"process group start ({spec.world} ranks, {spec.backend})"
    else:
        what = f"the {spec.backend} run"

    def state(rank: int) -> str:
        here = last[rank]
        if (
            stuck
            and here is not None
            and (here.get("at"), here.get("collective"), here.get("size"))
            != ("enter", stuck["collective"], stuck["size"])
        ):
            return f"rank {rank}: never reached it (last: {_where(here)})"
        return f"rank {rank}: {_where(here)}"

    ranks = ", ".join(map(str, result.unfinished))
    states = "; ".join(state(r) for r in result.unfinished)
    # Who failed first: a silent death (signal, os._exit) before a rank that reported an error, since
    # peers of a dead rank report errors of their own ("connection closed") that are consequences.
    failed = [
        w
        for w in workers
        if w.rank not in done and (codes[w.rank] not in (None, 0) or _error_time(events[w.rank]) < float("inf"))
    ]
    failed.sort(key=lambda w: (_error_time(events[w.rank]) < float("inf"), _error_time(events[w.rank])))
    if failed:
        first = failed[0]
        code = codes[first.rank]
        how = "failed" if code is None else f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
        result.problem = (
            f"{what}: rank {first.rank} {how} ({_where(last[first.rank])}): {_error_text(events[first.rank], first)}; "
            f"did not finish: rank(s) {ranks} ({states}); interface {result.interface}"
        )
        return
    result.problem = (
        f"{what} did not finish within {spec.timeout_s:g} s: rank(s) {ranks} did not finish ({states}); "
        f"interface {result.interface}"
    )


def _error_time(events: list[dict]) -> float:
    return next((e["t"] for e in events if e.get("at") == "error"), float("inf"))


def _error_text(events: list[dict], worker: _Worker) -> str:
    said = next((e["error"] for e in events if e.get("at") == "error"), "")
    if said:
        return said
    try:
        lines = [ln.strip() for ln in worker.err.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    return lines[-1][:300] if lines else "no output"


# --- the worker ----------------------------------------------------------------------------------


class _Progress:
    """Appends one JSON line per step, flushed, so the parent can tell where a killed worker was."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the worker
        self.step = 0

    def __call__(self, at: str, **data) -> None:
        self.step += 1
        self.file.write(json.dumps({"at": at, "step": self.step, "t": time.time(), **data}) + "\n")


def allreduce_input(rank: int, count: int, device):
    import torch

    return ((torch.arange(count, dtype=torch.int32, device=device) % 8) + (rank + 1)).float()


def allreduce_expected(n: int, count: int, device):
    import torch

    return ((torch.arange(count, dtype=torch.int32, device=device) % 8) * n + n * (n + 1) // 2).float()


def alltoall_input(rank: int, n: int, count: int, device):
    """Chunk j (for rank j) holds (rank * n + j) * 128 + (e % 128): sender, receiver and position."""
    import torch

    index = torch.arange(count, dtype=torch.int32, device=device)
    chunk = count // n
    return ((rank * n + index // chunk) * 128 + (index % chunk) % 128).float()


def alltoall_expected(rank: int, n: int, count: int, device):
    """Chunk j of rank r's output came from rank j: (j * n + r) * 128 + (e % 128)."""
    import torch

    index = torch.arange(count, dtype=torch.int32, device=device)
    chunk = count // n
    return ((index // chunk * n + rank) * 128 + (index % chunk) % 128).float()


def _identity(rank: int, device) -> dict:
    import platform

    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        pci = "unknown"
        if hasattr(props, "pci_bus_id"):
            pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
        return asdict(Identity(rank, socket.gethostname(), os.getpid(), f"cuda:{device.index}", pci, props.name))
    return asdict(
        Identity(rank, socket.gethostname(), os.getpid(), "cpu", "cpu", platform.processor() or platform.machine())
    )


def _fault(job: dict, rank: int, collective: str) -> None:
    """Test-only faults (see the module docstring): a rank that never arrives, or one that dies."""
    at = os.environ.get("EP_PREFLIGHT_TEST_FAULT_AT") or job["collectives"][0]
    if collective != at:
        return
    if os.environ.get("EP_PREFLIGHT_TEST_EXIT_RANK") == str(rank):
        os._exit(3)
    if os.environ.get("EP_PREFLIGHT_TEST_HANG_RANK") == str(rank):
        time.sleep(3600)  # the parent's deadline ends this


def _measure(job: dict, collective: str, size: int, rank: int, device, progress: _Progress, faulted: set[str]):
    import torch
    import torch.distributed as dist

    n = job["world_size"] or job["nprocs"]
    count = element_count(collective, size, n)
    if collective not in faulted:
        faulted.add(collective)
        _fault(job, rank, collective)
    progress("enter", collective=collective, size=count * ELEMENT)
    if collective == "all_reduce":
        buf = allreduce_input(rank, count, device)
        dist.all_reduce(buf)
        wrong = int((buf != allreduce_expected(n, count, device)).sum())
        buf.zero_()  # timed iterations on zeros: repeated sums stay finite
        out = None

        def op() -> None:
            dist.all_reduce(buf)
    else:
        buf = alltoall_input(rank, n, count, device)
        out = torch.empty_like(buf)
        dist.all_to_all_single(out, buf)
        wrong = int((out != alltoall_expected(rank, n, count, device)).sum())

        def op() -> None:
            dist.all_to_all_single(out, buf)

    for _ in range(job["warmup"]):
        op()
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(job["iters"]):
            op()
        end.record()
        end.synchronize()
        seconds = begin.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(job["iters"]):
            op()
        seconds = time.perf_counter() - t0
    progress("leave", collective=collective, size=count * ELEMENT)
    return count, seconds / job["iters"] * 1e6, wrong


def worker(spec_file: str, local_rank: int) -> int:
    job = json.loads(Path(spec_file).read_text())
    rank = job["rank_offset"] + local_rank
    world = job["world_size"] or job["nprocs"]
    progress = _Progress(Path(job["workdir"]) / f"rank-{rank}.jsonl")
    try:
        import torch
        import torch.distributed as dist

        timeout = timedelta(seconds=job["pg_timeout_s"])
        progress("store")
        store = dist.TCPStore(job["store_host"], job["store_port"], is_master=False, timeout=timeout)
        options = {}
        if job["backend"] == "nccl":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            options["device_id"] = device  # eager NCCL init: a bad interface shows here, not mid-sweep
        else:
            device = torch.device("cpu")
        progress("init")
        dist.init_process_group(
            job["backend"],
            store=dist.PrefixStore(job["store_prefix"], store),
            rank=rank,
            world_size=world,
            timeout=timeout,
            **options,
        )
        progress("up")
        everyone: list = [None] * world
        dist.all_gather_object(everyone, _identity(rank, device))
        measured = []
        faulted: set[str] = set()
        for collective in job["collectives"]:
            for size in job["sizes"]:
                count, time_us, wrong = _measure(job, collective, size, rank, device, progress, faulted)
                measured.append((collective, count, time_us, wrong))
        progress("exchange")
        # Mean time over ranks (nccl-tests' default) and the sum of wrong elements, in one all-reduce.
        totals = torch.tensor([x for _, _, t, w in measured for x in (t, float(w))], dtype=torch.float64, device=device)
        dist.all_reduce(totals)
        rows = []
        for i, (collective, count, _, _) in enumerate(measured):
            time_us = float(totals[2 * i]) / world
            size = count * ELEMENT
            algbw = size / time_us / 1e3 if time_us > 0 else 0.0
            rows.append(
                asdict(
                    Row(
                        collective,
                        size,
                        count,
                        "float",
                        round(time_us, 2),
                        round(algbw, 3),
                        round(algbw * bus_factor(collective, world), 3),
                        int(totals[2 * i + 1]),
                    )
                )
            )
        progress("result", rows=rows, ranks=everyone)
        dist.destroy_process_group()
        return 0
    except Exception as exc:  # the parent reports it, with where this rank was
        text = " ".join(str(exc).split())
        progress("error", error=f"{type(exc).__name__}: {text}"[:400])
        return 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"] and len(sys.argv) == 4:
        sys.exit(worker(sys.argv[2], int(sys.argv[3])))
    sys.exit("usage: python -m preflight.collectives --worker SPEC_FILE LOCAL_RANK (started by preflight itself)")
