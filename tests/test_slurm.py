"""Slurm: `plan --format slurm` writes one sbatch script; on a real two-node Slurm cluster (tests/slurm_cluster.py)
every node runs preflight's cross-node checks, `launch plan` and `launch check` as the stand-in for serving,
with its rank from SLURM_NODEID and the primary's address from the allocation. Prefill/decode become a
heterogeneous job. A short allocation or a missing Slurm variable is one line, before anything starts.

The cluster needs root and Debian's Slurm and munge (.ci/run installs them and sets EP_REQUIRE_SLURM=1, so
that in CI a missing piece fails instead of skipping)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.config import parse_deploy_text
from tests import slurm_cluster
from tests.conftest import ROOT, run_module

pytestmark = pytest.mark.xdist_group("slurm")  # one cluster, one worker
PARSERS = Path(os.environ.get("EP_VLLM_PARSERS", ROOT / ".cache" / "vllm-parsers"))

TWO_NODES = f"""\
model: tiny-moe
nodes:
  - {{gpus: 2}}
  - {{gpus: 2}}
rpc_port: 13345
vllm_version: 0.26.0
network: {{transport: tcp, socket_ifname: auto}}
preflight: {{rendezvous_timeout_s: 30, collective_timeout_s: 60}}
slurm:
  gpus_per_node: 0      # the test cluster has no GPUs to hand out
  steps: [preflight, plan, check]
  preflight_args: [-m, multinode]
  python: {sys.executable}
"""

PREFILL_DECODE = f"""\
model: tiny-moe
vllm_version: 0.26.0
network: {{transport: tcp}}
disaggregation:
  connector: {{name: NixlConnector, backend: UCX}}
  prefill: {{nodes: [{{gpus: 8}}], port: 8100, rpc_port: 13345}}
  decode: {{nodes: [{{gpus: 4}}], port: 8200, rpc_port: 13355}}
slurm:
  gpus_per_node: 0
  steps: [plan]
  python: {sys.executable}
"""


def render(tmp_path: Path, text: str, name: str = "deploy.yaml") -> Path:
    deploy = tmp_path / name
    deploy.write_text(text)
    res = run_module("launch", "plan", str(deploy), "--format", "slurm", "--out", str(tmp_path / "job.sbatch"))
    assert res.code == 0, res.err
    return tmp_path / "job.sbatch"


# ---- the script (no cluster needed) ------------------------------------------------------------------------
def test_the_script_asks_for_whole_nodes_and_runs_preflight_then_serve(tmp_path):
    job = render(
        tmp_path, "model: m\nnodes: [{gpus: 8}, {gpus: 8}, {gpus: 8}]\nslurm: {partition: gpu, time: '04:00:00'}\n"
    )
    text = job.read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=vllm-ep",
        "#SBATCH --output=%x-%j.out",
        "#SBATCH --signal=TERM@120",  # vLLM stops cleanly before the time limit
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",  # whole nodes, their memory included
        "#SBATCH --propagate=NONE",  # the nodes' own limits (memlock), not the login shell's
        "#SBATCH --partition=gpu",
        "#SBATCH --time=04:00:00",
    ]
    steps = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    assert steps == [
        'srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --export=ALL --label "${run[@]}" -m launch slurm-step preflight',
        # a dead rank takes the EP group with it: srun stops every node
        'srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL --label "${run[@]}" -m launch slurm-step serve',
    ]
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0


def test_the_script_carries_the_deploy_file_verbatim(tmp_path):
    text = "model: m   # a comment survives\nnodes: [{gpus: 8}, {gpus: 8}]\nenv: {X: \"$HOME 'q'\"}\n"
    job = render(tmp_path, text)
    out = subprocess.run(
        ["bash", "-c", f"source <(sed -n '/^export EP_DEPLOY_NAME/,/^$/p' {job}); printf %s \"$EP_DEPLOY_TEXT\""],
        capture_output=True,
        text=True,
    )
    assert out.stdout == text
    assert parse_deploy_text(out.stdout, "x").env == {"X": "$HOME 'q'"}


def test_prefill_and_decode_become_a_heterogeneous_job(tmp_path):
    text = render(
        tmp_path, PREFILL_DECODE.replace("steps: [plan]", "steps: [serve]").replace("gpus_per_node: 0", "")
    ).read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    cut = header.index("#SBATCH hetjob")
    assert "#SBATCH --gpus-per-node=8" in header[:cut] and "#SBATCH --gpus-per-node=4" in header[cut:]
    assert "#SBATCH --nodes=1" in header[:cut] and "#SBATCH --nodes=1" in header[cut:]
    serve = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    assert serve == [
        'srun --het-group=0 --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL --label "${run[@]}" -m launch slurm-step serve --group prefill &',
        'srun --het-group=1 --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL --label "${run[@]}" -m launch slurm-step serve --group decode &',
        # the router beside the prefill primary, waiting as long as a big model may take to load
        'srun --het-group=0 --nodes=1 --ntasks=1 --overlap --nodelist="$prefill_primary" --export=ALL --label "${run[@]}" -m launch '
        "slurm-step proxy -- --wait-for-groups 14400 &",
    ]
    # the first step to end stops the others through their launchers (SIGTERM to the tasks, not to srun)
    assert "wait -n" in text and 'scancel --signal=TERM "$SLURM_JOB_ID"; wait' in text


def test_named_overrides_are_refused_since_the_job_carries_the_file(tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text("model: m\nnodes: [{gpus: 8}]\n")
    res = run_module("launch", "plan", str(deploy), "--format", "slurm", "--port", "9000")
    assert res.code == 2 and res.err.strip().splitlines() == [
        f"error: --port: not taken with --format slurm (expected the value in {deploy}: the job carries the deploy file)"
    ]


def test_a_plan_that_cannot_build_is_refused_before_rendering(tmp_path):
    deploy = tmp_path / "d.yaml"
    # DeepEP v2 came in vLLM 0.24.0 (launch/vllm_facts.json, read from the wheels)
    deploy.write_text("model: m\nnodes: [{gpus: 8}, {gpus: 8}]\nvllm_version: 0.20.0\nall2all_backend: deepep_v2\n")
    res = run_module("launch", "plan", str(deploy), "--format", "slurm")
    assert res.code == 2 and res.out == ""
    assert res.err.startswith(f"error: {deploy}: ") and "deepep_v2" in res.err and len(res.err.splitlines()) == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            "env: {HF_TOKEN: hf_x}\n",
            "env.HF_TOKEN: a secret would be written into the job script (expected it out of the deploy "
            "file: export HF_TOKEN before sbatch: the job passes your environment to every node)",
        ),
        (
            "",
            "nodes[1].gpu_ids: not taken with --format slurm (expected none: the scheduler assigns each node's GPUs and sets "
            "CUDA_VISIBLE_DEVICES)",
        ),
    ],
)
def test_what_a_job_cannot_carry_is_refused_in_one_line(tmp_path, extra, message):
    deploy = tmp_path / "d.yaml"
    deploy.write_text(
        "model: m\nnodes: [{gpus: 8}, {gpus: 4, " + ("" if extra else "gpu_ids: [0, 1, 2, 3]") + "}]\n" + extra
    )
    res = run_module("launch", "plan", str(deploy), "--format", "slurm")
    assert res.code == 2 and res.out == "" and res.err.strip().splitlines() == [f"error: {deploy}: {message}"]


def test_a_missing_slurm_variable_is_one_line(tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text("model: m\nnodes: [{gpus: 8}, {gpus: 8}]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    res = run_module("launch", "slurm-step", "preflight", "--deploy", str(deploy), env=env)
    assert res.code == 2 and res.err.strip().splitlines() == [
        "error: SLURM_NODEID: not set (expected inside a Slurm job step: srun from the script `plan --format slurm` writes)"
    ]
    res = run_module("launch", "slurm-step", "allocation", "--deploy", str(deploy), env=env)
    assert res.code == 2 and res.err.strip().splitlines() == [
        "error: SLURM_JOB_NODELIST: not set (expected inside a Slurm job from `plan --format slurm`)"
    ]


# ---- a real cluster --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    why = slurm_cluster.available()
    if why:
        if os.environ.get("EP_REQUIRE_SLURM") == "1":
            pytest.fail(f"the Slurm test cluster cannot be built: {why}")
        pytest.skip(why)
    with slurm_cluster.running(f"{os.getpid() % 100000}") as c:
        yield c


def job_env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("EP_", "GLOO_", "SLURM", "PYTEST_"))}
    return {**keep, "PYTHONPATH": str(ROOT), "EP_PREFLIGHT_BACKEND": "gloo", **extra}


def vllm_python(tmp_path: Path, version: str = "0.26.0") -> Path | None:
    """A Python whose vLLM is the real 0.26.0 parser (tests/vllm/install-parsers.sh), for the check step."""
    folder, python = PARSERS / f"vllm-{version}", PARSERS / "venv" / "bin" / "python"
    if not (folder / ".installed").exists() or not python.exists():
        return None
    wrapper = tmp_path / "vllm-python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={folder}${{PYTHONPATH:+:$PYTHONPATH}} exec {python} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def by_task(output: str) -> dict[str, list[str]]:
    """srun --label output split per task ("0: ...", "1: ...")."""
    tasks: dict[str, list[str]] = {}
    for line in output.splitlines():
        task, sep, rest = line.partition(": ")
        if sep and task.isdigit():
            tasks.setdefault(task, []).append(rest)
    return tasks


def test_two_nodes_run_preflight_plan_and_check_with_slurms_ranks(cluster, tmp_path):
    python = vllm_python(tmp_path)
    if python is None and os.environ.get("EP_REQUIRE_VLLM") == "1":
        pytest.fail("vLLM 0.26.0's parser is not installed (bash tests/vllm/install-parsers.sh)")
    steps = "[preflight, plan, check]" if python else "[preflight, plan]"
    job = render(tmp_path, TWO_NODES.replace("[preflight, plan, check]", steps))
    jid = cluster.submit(job, env=job_env(**({"EP_VLLM_PYTHON": str(python)} if python else {})), cwd=tmp_path)
    states = cluster.wait(jid, timeout=240)
    output = (tmp_path / f"vllm-ep-{jid}.out").read_text()
    assert states == [("COMPLETED", "0:0")], output
    n1, n2 = cluster.nodes
    assert f"[launch] slurm job {jid}: node 0 (primary) = epn1 {n1.address}" in output
    assert f"[launch] slurm job {jid}: node 1 (secondary) = epn2 {n2.address}" in output
    assert f"[launch] slurm job {jid}: the API will answer at http://{n1.address}:8000 once every node is up" in output
    tasks = by_task(output)
    for rank, node in enumerate(cluster.nodes):
        lines = tasks[str(rank)]
        role = "primary" if rank == 0 else "secondary"
        assert f"[launch] slurm job {jid}: node {rank} of 2 ({role}, {node.address}); primary at {n1.address}" in lines
        # preflight: the two nodes met at the primary and ran collectives across the namespaces' link
        assert f"# preflight: {node.name}, node {rank} of 2 ({role} {node.address})" in lines
        allreduce = next(ln for ln in lines if "all-reduce across nodes" in ln)
        assert (
            allreduce.startswith("PASS")
            and f"(2 ranks on 2 nodes, gloo, GLOO_SOCKET_IFNAME={node.ifname}, 0 wrong)" in allreduce
        )
        assert any(ln.startswith("# verdict: READY (10 passed)") for ln in lines), lines
        # plan: this node's ranks and the allocation's primary
        assert f"# node {rank} ({role} {node.address}): DP ranks {2 * rank}..{2 * rank + 1} of 4" in lines
        command = next(ln for ln in lines if ln.startswith("vllm serve"))
        assert f"--data-parallel-address {n1.address} --data-parallel-rpc-port 13345" in command
        assert ("--headless" in command) == (rank == 1) and ("--data-parallel-start-rank 2" in command) == (rank == 1)
        if python:
            assert "# vLLM 0.26.0 parsed 1 node argv(s); plans target vLLM 0.26.0 (deploy file)" in lines
            assert f"OK       node {rank} ({role})" in lines
    print(f"\nslurm job {jid}: " + ", ".join(ln for ln in tasks["0"] if ln.startswith("# verdict")))


def test_prefill_and_decode_run_on_their_own_components(cluster, tmp_path):
    job = render(tmp_path, PREFILL_DECODE)
    jid = cluster.submit(job, env=job_env(), cwd=tmp_path)
    states = cluster.wait(jid, timeout=120)
    output = (tmp_path / f"vllm-ep-{jid}.out").read_text()
    assert states == [("COMPLETED", "0:0"), ("COMPLETED", "0:0")], output
    n1, n2 = cluster.nodes
    assert f"[launch] slurm job {jid}: prefill node 0 (primary) = epn1 {n1.address}" in output
    assert f"[launch] slurm job {jid}: decode node 0 (primary) = epn2 {n2.address}" in output
    assert (
        f"[launch] slurm job {jid}: the API will answer at http://{n1.address}:8000 (vllm-router) once every node is up"
        in output
    )
    lines = output.splitlines()
    assert f"0: [launch] slurm job {jid}: prefill node 0 of 1 (primary, {n1.address}); primary at {n1.address}" in lines
    assert f"0: [launch] slurm job {jid}: decode node 0 of 1 (primary, {n2.address}); primary at {n2.address}" in lines
    assert (
        f"0: export VLLM_NIXL_SIDE_CHANNEL_HOST={n1.address}" in lines
        and f"0: export VLLM_NIXL_SIDE_CHANNEL_HOST={n2.address}" in lines
    )
    assert f"0: # prefill node 0 (primary {n1.address}): DP ranks 0..7 of 8" in lines
    assert f"0: # decode node 0 (primary {n2.address}): DP ranks 0..3 of 4" in lines


def test_an_allocation_short_of_nodes_fails_in_one_line_before_any_step(cluster, tmp_path):
    three = TWO_NODES.replace("  - {gpus: 2}\n  - {gpus: 2}\n", "  - {gpus: 2}\n  - {gpus: 2}\n  - {gpus: 2}\n")
    job = render(tmp_path, three)
    jid = cluster.submit(job, "--nodes=2", env=job_env(), cwd=tmp_path)  # the command line wins over #SBATCH
    states = cluster.wait(jid, timeout=60)
    output = (tmp_path / f"vllm-ep-{jid}.out").read_text()
    assert states == [("FAILED", "2:0")], output
    assert output.splitlines() == [
        "error: deploy.yaml: nodes: 3 nodes but the allocation has 2 (SLURM_JOB_NODELIST=epn[1-2]) (expected an allocation "
        "of 3 nodes: sbatch the script `plan --format slurm` writes, without -N)"
    ]


def test_the_example_renders_a_script_that_runs_the_toolkit_through_pixi(tmp_path):
    from tests.conftest import EXAMPLES

    res = run_module(
        "launch",
        "plan",
        str(EXAMPLES / "slurm-4node-ib.yaml"),
        "--format",
        "slurm",
        "--out",
        str(tmp_path / "job.sbatch"),
    )
    assert res.code == 0, res.err
    text = (tmp_path / "job.sbatch").read_text()
    assert (
        "#SBATCH --nodes=4\n" in text
        and "#SBATCH --gpus-per-node=8\n" in text
        and "#SBATCH --constraint=h200\n" in text
    )
    assert "run=(pixi run --frozen --manifest-path /shared/vllm-ep/pixi.toml python)\n" in text
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0


def test_a_heterogeneous_job_serves_prefill_decode_and_the_router_then_stops_on_scancel_term(cluster, tmp_path):
    """Serving for real on the cluster, with a stand-in for `vllm serve` (it answers /health on its --port) and the
    real vllm-router: both groups come up on their components, the router starts once both answer, and
    `scancel --signal=TERM` stops every launcher cleanly (no process left on either node)."""
    router = shutil.which("vllm-router")
    if not router:
        if os.environ.get("EP_REQUIRE_VLLM") == "1":
            pytest.fail("vllm-router is not installed (pip install vllm-router)")
        pytest.skip("vllm-router is not installed (pip install vllm-router)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(
        f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests" / "fixtures" / "fake_vllm_http.py"} "$@"\n'
    )
    (bin_dir / "vllm").chmod(0o755)
    job = render(tmp_path, PREFILL_DECODE.replace("steps: [plan]", "steps: [serve]"))
    path = os.pathsep.join([str(bin_dir), str(Path(router).parent), os.environ["PATH"]])
    jid = cluster.submit(job, env=job_env(PATH=path, FAKE_VLLM_HOST="0.0.0.0", FAKE_VLLM_DELAY="1"), cwd=tmp_path)
    output_file = tmp_path / f"vllm-ep-{jid}.out"
    n1, n2 = cluster.nodes
    deadline = time.monotonic() + 120
    while not (
        output_file.exists()
        and "[launch] decode is healthy" in output_file.read_text()
        and router_port_open(n1.address)
    ):
        assert time.monotonic() < deadline, output_file.read_text() if output_file.exists() else "no output"
        time.sleep(0.5)
    stop = time.monotonic()
    cluster.run("scancel", "--signal=TERM", jid)
    cluster.wait(jid, timeout=90)
    stopped_after = time.monotonic() - stop
    output = output_file.read_text()
    assert f"[launch] prefill is healthy at http://{n1.address}:8100/health" in output
    assert f"[launch] decode is healthy at http://{n2.address}:8200/health" in output
    # Slurm signals every process of every step; the launchers stop what they started (the ones whose last words
    # srun still collected say so) and the job script ends the rest
    assert "[launch] SIGTERM: stopping" in output and "[job] a serving step ended with exit code" in output, output
    for node in cluster.nodes:
        left = subprocess.run(["ip", "netns", "pids", node.ns], capture_output=True, text=True).stdout.split()
        assert not [pid for pid in left if "slurm" not in Path(f"/proc/{pid}/comm").read_text(errors="replace")], output
    print(f"\nslurm job {jid}: 1P+1D + vllm-router up, scancel --signal=TERM to job end: {stopped_after:.1f} s")


def router_port_open(address: str, port: int = 8000) -> bool:
    import socket

    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False
