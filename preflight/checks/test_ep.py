"""The EP kernels before serving: DeepEP's dispatch and combine with the buffer the plan's backend
creates, exact on every element, their bandwidth, and the EP memory budget of one GPU
(how: preflight/ep.py and preflight/ep_memory.py).

Applies when the plan's all2all backend runs an EP kernel library (deepep_low_latency,
deepep_high_throughput, deepep_v2); otherwise every check here is skipped with that reason. With several
nodes in the deploy file every node's ranks run in one world, meeting at the primary on the rendezvous
port + 1 (every node runs `python -m preflight --deploy FILE -m ep` within rendezvous_timeout_s).
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import asdict, dataclass

import pytest

from preflight import collectives, ep, ep_memory, imports, rendezvous

pytestmark = [pytest.mark.ep]
if importlib.util.find_spec("xdist"):  # one worker runs the GPUs' EP run at a time (with --dist loadgroup)
    pytestmark.append(pytest.mark.xdist_group("ep"))

IMPORT_TIMEOUT_S = 180
BUILD_FIX = (
    "build the EP kernels for this stack: pixi run build-ep-kernels (python -m env build), then python -m env status"
)


@pytest.fixture(scope="module")
def setup(node) -> ep_memory.Found:
    return ep_memory.for_node(node)


@dataclass
class Kernels:
    result: ep.Result | None = None
    skip: str = ""
    problem: str = ""
    fix: str = ""


@pytest.fixture(scope="module")
def kernels(node, setup) -> Kernels:
    """One run of the EP workers on this node's GPUs (across nodes: every node's, in one world), shared
    by the checks below."""
    if setup.skip or setup.problem:
        return Kernels(skip=setup.skip or "see the EP memory budget check", problem=setup.problem, fix=setup.fix)
    shape = ep.Shape(
        setup.shape.hidden,
        setup.shape.experts + setup.plan.redundant_experts,
        setup.shape.topk,
        setup.plan.tokens_per_rank,
    )
    local, here = _this_node(node, setup, shape)
    if node.nodes > 1 and node.lone and not (here.problem or here.skip):  # the other nodes are not expected now
        return Kernels(
            skip="this node alone: the EP kernels across nodes need every node's preflight at once (-m ep or --cross-node)"
        )
    if node.nodes < 2:
        if here.problem or here.skip:
            return here
        spec = ep.Spec(
            setup.backend,
            local,
            shape,
            timeout_s=node.thresholds.get("ep_timeout_s"),
            deepep_buffer_mb=setup.plan.deepep_buffer_mb,
        )
        return Kernels(ep.run(spec, node.env()))
    return _across_nodes(node, setup, shape, local, here)


def _this_node(node, setup, shape: ep.Shape) -> tuple[int, Kernels]:
    """How many ranks this node runs, and why it cannot (problem) or need not (skip)."""
    found = imports.probe(["deep_ep"], node.env(), IMPORT_TIMEOUT_S)
    if isinstance(found, str) or not found["deep_ep"].ok:
        why = found if isinstance(found, str) else found["deep_ep"].error
        return 0, Kernels(problem=f"deep_ep does not import with the plan's environment: {why}", fix=BUILD_FIX)
    visible = collectives.cuda_devices()
    if not visible:
        return 0, Kernels(skip="no CUDA GPU visible here: the EP kernels need one (the gpu checks say why)")
    local = node.expected_gpus or visible
    if local > visible:
        return local, Kernels(
            problem=f"{local} GPUs wanted by the plan, {visible} visible",
            fix="check CUDA_VISIBLE_DEVICES and nvidia-smi",
        )
    depth = node.env().get("NVSHMEM_QP_DEPTH", "")
    why = ep.unsupported(
        setup.backend, shape, setup.plan.ep_size, local, int(depth) if depth.isdigit() else ep.QP_DEPTH_DEFAULT
    )
    if why:
        return local, Kernels(
            problem=why, fix="vLLM would fail the same way at start: change all2all_backend or the GPU count"
        )
    more = ep.needs_more_ranks(setup.backend, local)
    return local, Kernels(skip=more)


def _across_nodes(node, setup, shape: ep.Shape, local: int, here: Kernels) -> Kernels:
    """Every node's ranks in one world, meeting at the primary (preflight/rendezvous.py's store, on the
    rendezvous port + 1 so that it never meets the cross-node checks' store)."""
    timeout = node.thresholds.get("rendezvous_timeout_s")
    addresses = [n.address for n in node.config.nodes]
    try:
        port = rendezvous.rendezvous_port(node.config.rpc_port) + 1
    except rendezvous.RendezvousError as exc:
        return Kernels(problem=str(exc), fix=f"set {rendezvous.PORT_VAR} to a free port, the same on every node")
    session = rendezvous.open_store(node.rank, node.nodes, node.primary_address, port, node.ifname, timeout)
    try:
        fix = (
            f"start `python -m preflight --deploy FILE -m ep` on every node within {timeout:g} s; TCP port {port} "
            "on the primary must be open to the other nodes"
        )
        if session.ok:
            session = rendezvous.join(session, {"host": socket.gethostname()}, addresses)
        if not session.ok:
            return Kernels(problem=f"EP rendezvous: {session.problem}", fix=fix)
        iface = rendezvous.interface_problem(node.ifname, node.ifname_problem, "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")
        mine = {
            "problem": here.problem or here.skip or iface,
            "nprocs": local,
            "backend": setup.backend,
            "shape": asdict(shape),
        }
        got, missing, lost = rendezvous.exchange(session, "ep-ready", mine, timeout)
        offset, world, problem = ep.world_layout(got, missing, node.rank, addresses)
        if lost or problem:
            return Kernels(problem=lost or problem, fix=here.fix or fix)
        spec = ep.Spec(
            setup.backend,
            local,
            shape,
            timeout_s=node.thresholds.get("ep_timeout_s"),
            nodes=node.nodes,
            deepep_buffer_mb=setup.plan.deepep_buffer_mb,
            store_host=session.address,
            store_port=session.port,
            rank_offset=offset,
            world_size=world,
        )
        result = ep.run(spec, node.env())
        # what the other nodes saw, so that a failure names where it started (bounded like the run itself)
        others, _, _ = rendezvous.exchange(session, "ep-outcome", {"problem": result.problem}, min(timeout, 10.0))
        elsewhere = [
            f"node {r}: {others[r]['problem']}" for r in sorted(others) if r != node.rank and others[r]["problem"]
        ]
        if result.problem and elsewhere:
            result.problem += " | " + " | ".join(elsewhere)
        return Kernels(result)
    finally:
        rendezvous.leave(session)


def _common(check, kernels: Kernels) -> ep.Result:
    if kernels.problem:
        check.require(False, kernels.problem, fix=kernels.fix, why=kernels.problem)
    if kernels.skip:
        check.skip(kernels.skip)
    return kernels.result


def _fixes(result: ep.Result) -> str:
    return " | ".join(f"{f.cause} ({f.said!r}): {f.fix}" for f in result.fixes)


def test_dispatch_and_combine_exact(node, check, kernels):
    """EP dispatch + combine exact"""
    result = _common(check, kernels)
    check.record.extra.update(
        {
            "shape": result.shape,
            "buffer": result.buffer,
            "ranks": [r.__dict__ for r in result.ranks],
            "unfinished": result.unfinished,
            "fixes": [f.__dict__ for f in result.fixes],
        }
    )
    timeout = node.thresholds.get("ep_timeout_s")
    check.require(
        result.ok,
        result.problem,
        f"every rank done within {timeout:g} s",
        fix=_fixes(result) or "rerun with NVSHMEM_DEBUG=INFO to see where it stops",
        why=result.problem,
    )
    first = next((r for r in result.ranks if r.problem), None)
    value = f"{result.wrong} wrong of {sum(r.checked for r in result.ranks)} elements ({result.world_size} ranks, {result.backend})"
    check.require(
        result.wrong == 0,
        value,
        "0 wrong",
        fix="the EP kernels corrupt data: check that DeepEP was built for this GPU's architecture (python -m env status) "
        "and run DCGM diagnostics (dcgmi diag -r 3)",
        why=f"rank {first.rank}: {first.problem}" if first else "",
    )
    s = result.shape
    check.measured(
        f"{value}; hidden {s['hidden']}, {s['experts']} experts, top-{s['topk']}, {min(s['max_tokens'], ep.CHECK_TOKENS)} tokens/rank"
        + ("; NVSHMEM / DeepEP said: " + " | ".join(f.said for f in result.fixes) if result.fixes else "")
    )


def test_bandwidth(node, check, kernels):
    """EP dispatch + combine bandwidth"""
    if kernels.problem:
        check.skip(f"no EP run: {kernels.problem[:160]} (see the exactness check)")
    result = _common(check, kernels)
    if not result.ok:
        check.skip("no figures: the EP run did not finish (see the exactness check)")
    check.record.extra["ranks"] = [r.__dict__ for r in result.ranks]
    derived, why = ep.bandwidth_minimum(result.backend, [r.name for r in result.ranks], node.nodes)
    minimum = node.thresholds.get("ep_bandwidth_min_gbps", derived)
    source = "deploy file" if "ep_bandwidth_min_gbps" in node.thresholds.overridden else why
    ok, value = ep.judge_bandwidth(result, minimum)
    if minimum is None:
        check.record.threshold = ""
        check.measured(f"{value}; {why}")
        return
    check.require(
        ok,
        value,
        f">= {minimum:g} GB/s ({source})",
        fix="check the NIC each rank uses (NVSHMEM_HCA_LIST), that NVLink is up (nvidia-smi nvlink -s), "
        "and clocks (nvidia-smi -q -d PERFORMANCE)",
    )


def test_memory_budget(node, check, setup, gpus, request):
    """EP memory budget fits a GPU"""
    if setup.skip:
        check.skip(setup.skip)
    if setup.problem:
        check.require(False, setup.problem, fix=setup.fix, why=setup.problem)
    if isinstance(gpus, str) or not gpus.gpus or not gpus.gpus[0].memory_total:
        check.skip(f"GPU memory unknown ({gpus if isinstance(gpus, str) else 'no GPU'})")
    budget = ep_memory.node_budget(node, setup, gpus.gpus[0].memory_total)
    lines = ep_memory.table(budget, ep_memory.title(node, setup))
    check.record.extra["table"] = lines
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        for text in lines:
            reporter.write_line(text)
    largest = budget.largest
    check.require(
        budget.fits,
        ep_memory.verdict(budget),
        f"<= {budget.limit / ep_memory.GiB:.1f} GiB",
        fix=f"the largest term is {largest.name}: {largest.change}; or a higher --gpu-memory-utilization",
    )
    check.measured(ep_memory.verdict(budget))
