"""NCCL collectives between this node's GPUs: exact results first, then bus bandwidth against the
GPU model's figure (H100/H200/B200 NVLink) or the deploy file's ``preflight:`` threshold.

Without GPUs these checks fail ("no CUDA GPUs"): such a node cannot serve. To exercise them on a machine
without GPUs (the toolkit's own tests), set EP_PREFLIGHT_BACKEND=gloo and EP_PREFLIGHT_NPROCS=2.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest

from preflight import collectives
from preflight.collectives import size_label

pytestmark = [pytest.mark.collective]
if importlib.util.find_spec(
    "xdist"
):  # one worker runs the module (with --dist loadgroup): one run of the GPUs at a time
    pytestmark.append(pytest.mark.xdist_group("collectives"))

GPU_FIX = "run preflight on the GPU node itself (to exercise these checks without GPUs: EP_PREFLIGHT_BACKEND=gloo EP_PREFLIGHT_NPROCS=2, for testing only)"


@dataclass
class Intra:
    workers: collectives.Workers | None
    result: collectives.Result | None
    problem: str = ""


@pytest.fixture(scope="module")
def intra(node) -> Intra:
    """Both collectives in one run of workers, shared by the checks of this module."""
    try:
        selection = collectives.Selection.from_env(os.environ)
    except ValueError as exc:
        return Intra(None, None, str(exc))
    visible = collectives.cuda_devices() if selection.backend == "nccl" else 0
    workers = collectives.workers_for(selection, node.expected_gpus, visible, crossnode=False)
    if workers.problem or workers.skip:
        return Intra(workers, None)
    spec = collectives.Spec(
        workers.backend, workers.nprocs, selection.sizes, timeout_s=node.thresholds.get("collective_timeout_s")
    )
    return Intra(workers, collectives.run(spec, node.env()))


def judge(node, check, intra: Intra, collective: str, threshold: str) -> None:
    """Correct first, then fast enough: the failure names the value, the threshold and the fix."""
    if intra.problem:
        check.require(False, intra.problem, fix="unset it, or set it to gloo (testing) / nccl")
    workers = intra.workers
    if workers.skip:
        check.skip(workers.skip)
    if workers.problem:
        check.require(
            False, workers.problem, f">= 2 GPUs usable by {workers.backend}", fix=GPU_FIX, why=workers.problem
        )
    result = intra.result
    timeout = node.thresholds.get("collective_timeout_s")
    check.record.extra["rows"] = [r.__dict__ for r in result.of(collective)]
    check.require(
        result.ok,
        result.problem_for(collective),
        f"done within {timeout:g} s",
        fix=f"rerun with NCCL_DEBUG=INFO (python -m preflight bench --backend {result.backend}) to see where it stops; check {result.interface}",
    )
    wrong = result.wrong(collective)
    row = result.largest(collective)
    check.require(
        wrong == 0,
        f"{wrong} wrong elements ({result.world_size} ranks, {result.backend})",
        "0 wrong",
        fix="a GPU or link corrupts data: run DCGM diagnostics (dcgmi diag -r 3) and nvidia-smi -q -d ECC",
    )
    derived, why = collectives.nvlink_minimum(collective, result.gpu_names())
    minimum = node.thresholds.get(threshold, derived)
    source = "deploy file" if threshold in node.thresholds.overridden else why
    value = (
        f"busbw {row.busbw:.2f} GB/s at {size_label(row.size)} ({result.world_size} ranks, {result.backend}, 0 wrong)"
    )
    if minimum is None:
        check.record.threshold = ""  # reported only: no "expected" from the correctness step
        check.measured(f"{value}; {why}")
        return
    check.require(
        row.busbw >= minimum,
        value,
        f">= {minimum:g} GB/s ({source})",
        fix="check nvidia-smi topo -m (NVLink, not PCIe), nvidia-smi nvlink -s (all links up) and that NCCL_P2P_DISABLE / NCCL_SHM_DISABLE are not set",
    )


def test_all_reduce(node, check, intra):
    """all-reduce across this node's GPUs"""
    judge(node, check, intra, "all_reduce", "intra_allreduce_busbw_min_gbps")


def test_all_to_all(node, check, intra):
    """all-to-all across this node's GPUs"""
    judge(node, check, intra, "all_to_all", "intra_alltoall_busbw_min_gbps")
