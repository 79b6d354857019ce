"""Across nodes: every node of the deploy file joins the rendezvous at the primary, runs the same
software, and the nodes pass all-reduce and all-to-all together (how: preflight/rendezvous.py).

Every node runs preflight at about the same time with the same deploy file and its own --node-rank.
Each wait is bounded by the deploy file's preflight.rendezvous_timeout_s / collective_timeout_s.
"""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest

from preflight import collectives, rendezvous
from preflight.collectives import size_label

pytestmark = [pytest.mark.multinode, pytest.mark.collective]
if importlib.util.find_spec("xdist"):  # one worker holds the rendezvous (with --dist loadgroup)
    pytestmark.append(pytest.mark.xdist_group("crossnode"))

SINGLE = "single node: nothing to compare"


def _addresses(node) -> list[str]:
    return [n.address for n in node.config.nodes]


@pytest.fixture(scope="module")
def session(node, progress):
    """This node's side of the rendezvous, shared by the checks below; the primary keeps its store up
    until every joined node has finished them."""
    if node.nodes < 2:
        yield None
        return
    timeout = node.thresholds.get("rendezvous_timeout_s")
    try:
        port = rendezvous.rendezvous_port(node.config.rpc_port)
    except rendezvous.RendezvousError as exc:
        yield rendezvous.Session(node.rank, node.nodes, node.primary_address, 0, node.ifname, timeout, problem=str(exc))
        return
    job = rendezvous.FactsJob(node.env(), node.config.model)
    joined = rendezvous.open_store(
        node.rank, node.nodes, node.primary_address, port, node.ifname, timeout, say=progress
    )
    if not joined.ok:
        job.proc.kill()
        job.proc.communicate()
    else:
        try:
            own = job.result()
        except rendezvous.RendezvousError as exc:
            own = {"host": socket.gethostname(), "error": str(exc)}  # still join: the others should not wait for us
        own |= {"deploy": rendezvous.deploy_digest(node.config), "ifname": node.ifname}
        rendezvous.join(joined, own, _addresses(node))
    yield joined
    rendezvous.leave(joined)


@pytest.fixture(scope="module")
def crossnode(node, session) -> collectives.Result | None:
    """The world-wide run (nodes x local workers), once, when every node said it can take part."""
    if session is None or not session.ok:
        return None
    problem = ""
    try:
        selection = collectives.Selection.from_env(os.environ)
    except ValueError as exc:
        selection, problem = collectives.Selection("gloo", 1), str(exc)
    visible = collectives.cuda_devices() if selection.backend == "nccl" else 0
    workers = collectives.workers_for(selection, node.expected_gpus, visible, crossnode=True)
    var = collectives.interface_in_use(selection.backend, node.env()).split("=")[0]
    problem = problem or workers.problem or rendezvous.interface_problem(node.ifname, node.ifname_problem, var)
    ready = rendezvous.Ready(problem, workers.backend, workers.nprocs, socket.gethostname())
    return rendezvous.cross_collective(
        session, ready, node.env(), selection.sizes, node.thresholds.get("collective_timeout_s"), _addresses(node)
    )


def test_every_node_joined(node, check, session):
    """every node joined the rendezvous"""
    if session is None:
        check.skip(SINGLE)
    timeout = node.thresholds.get("rendezvous_timeout_s")
    fix = (
        f"start `python -m preflight --deploy FILE --node-rank N` on every node within {timeout:g} s of each other; "
        f"TCP port {session.port or 'rpc_port + 1'} on the primary must be open to the other nodes ({rendezvous.PORT_VAR} moves it)"
    )
    failed = "; ".join(f"node {r}: {f['error']}" for r, f in sorted(session.facts.items()) if "error" in f)
    value = (
        session.problem
        or failed
        or f"{len(session.facts)} of {node.nodes} nodes at {session.where} in {session.seconds:.1f} s"
    )
    check.require(
        session.ok and not failed, value, f"{node.nodes} nodes within {timeout:g} s", fix=fix, why=session.problem
    )


@pytest.mark.parametrize("group", list(rendezvous.GROUPS))
def test_same_on_every_node(check, session, group):
    """same on every node"""
    if session is None:
        check.skip(SINGLE)
    if not session.ok:
        check.skip(f"no rendezvous: {session.problem[:120]}")
    keys = rendezvous.GROUPS[group]
    diffs = rendezvous.differences(session.facts, keys)
    value = rendezvous.describe_difference(diffs) if diffs else rendezvous.describe_same(session.facts, keys)
    check.require(not diffs, value, "the same on every node", fix=rendezvous.FIXES[group])


def judge(node, check, session, result: collectives.Result | None, collective: str, threshold: str) -> None:
    if session is None:
        check.skip(SINGLE)
    if result is None:
        check.skip(f"no rendezvous: {session.problem[:120]}")
    timeout = node.thresholds.get("collective_timeout_s")
    check.record.extra["rows"] = [r.__dict__ for r in result.of(collective)]
    check.require(
        result.ok,
        result.problem_for(collective),
        f"every node ready, done within {timeout:g} s",
        fix="set network.socket_ifname (deploy file) to the interface that carries traffic between the nodes on every node; "
        "rerun with NCCL_DEBUG=INFO to see where it stops",
    )
    wrong = result.wrong(collective)
    check.require(
        wrong == 0,
        f"{wrong} wrong elements ({result.world_size} ranks, {result.backend})",
        "0 wrong",
        fix="data is corrupted between nodes: check the NICs (ibv_devinfo, ethtool -S) and run DCGM diagnostics",
    )
    row = result.largest(collective)
    minimum = node.thresholds.get(threshold)
    value = (
        f"busbw {row.busbw:.2f} GB/s at {size_label(row.size)} ({result.world_size} ranks on {node.nodes} nodes, "
        f"{result.backend}, {result.interface}, 0 wrong)"
    )
    if minimum is None:
        check.record.threshold = ""  # no minimum known for the interconnect: reported only
        check.measured(f"{value}; no minimum set (preflight.{threshold})")
        return
    check.require(
        row.busbw >= minimum,
        value,
        f">= {minimum:g} GB/s (deploy file)",
        fix="check every NIC's link rate (ibstat / fi_info -p efa), that NCCL uses them (NCCL_DEBUG=INFO: NET/IB, not NET/Socket), and NCCL_IB_HCA",
    )


def test_all_reduce_across_nodes(node, check, session, crossnode):
    """all-reduce across nodes"""
    judge(node, check, session, crossnode, "all_reduce", "inter_allreduce_busbw_min_gbps")


def test_all_to_all_across_nodes(node, check, session, crossnode):
    """all-to-all across nodes"""
    judge(node, check, session, crossnode, "all_to_all", "inter_alltoall_busbw_min_gbps")
