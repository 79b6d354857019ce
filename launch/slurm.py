"""`plan --format slurm`: one sbatch script that runs the deploy file on a Slurm allocation. Pure.

The script carries the deploy file inside it (the job runs what was rendered, whatever happens to the
file later) and runs the deploy file's ``slurm.steps`` in order, each as one ``srun`` over the nodes:
every node runs ``python -m launch slurm-step STEP``, which places the deploy file on the allocation
(launch/placement.py: rank from SLURM_NODEID, the primary = the allocation's first node, addresses from
Slurm's NodeAddr) and then runs the same preflight / serve / plan / check as a hand-started node.

With prefill/decode groups the job is heterogeneous: component 0 holds the prefill nodes, component 1
the decode nodes (each with its own GPU request); the router runs beside the prefill primary.
Before any step, ``slurm-step allocation`` refuses an allocation that is short of nodes, in one line.
"""

from __future__ import annotations

import shlex

from launch.config import DeployConfig, Node, Slurm
from launch.placement import GROUPS


def _sbatch_options(s: Slurm, nodes: list[Node], *, first: bool) -> list[str]:
    gpus = s.gpus_per_node if s.gpus_per_node is not None else max(n.gpus for n in nodes)
    options = [f"--nodes={len(nodes)}", "--ntasks-per-node=1"]
    if first:
        # 120 s before the time limit every task gets SIGTERM: vLLM stops cleanly instead of being killed.
        options = [f"--job-name={s.job_name}", f"--output={s.output}", "--signal=TERM@120", *options]
    if gpus:
        options.append(f"--gpus-per-node={gpus}")
    if s.exclusive:
        # --exclusive alone gives all CPUs but only the default memory per CPU; --mem=0 is the node's memory.
        options += ["--exclusive", "--mem=0"]
    # The compute nodes' own limits (memlock unlimited for RDMA), not the submitting shell's.
    options.append("--propagate=NONE")
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos), ("time", s.time)):
        if value:
            options.append(f"--{flag}={value}")
    options += s.sbatch
    return [f"#SBATCH {o}" for o in options]


def _summary(config: DeployConfig, source: str) -> str:
    if config.disaggregation is not None:
        d = config.disaggregation
        return (
            f"prefill on {len(d.prefill.nodes)} node(s), decode on {len(d.decode.nodes)} node(s), vllm-router in front"
        )
    total = sum(config.local_dp(r) for r in range(len(config.nodes)))
    ep = ", EP" if config.enable_expert_parallel else ""
    return f"{len(config.nodes)} node(s), DP {total} x TP {config.tensor_parallel_size}{ep}, data parallel backend {config.data_parallel_backend}"


def script(config: DeployConfig, deploy_text: str, source: str) -> str:
    """The sbatch script for ``config`` (whose YAML text is ``deploy_text``, read from ``source``)."""
    s = config.slurm
    d = config.disaggregation
    if d is None:
        header = _sbatch_options(s, config.nodes, first=True)
    else:
        header = (
            _sbatch_options(s, d.prefill.nodes, first=True)
            + ["#SBATCH hetjob"]
            + _sbatch_options(s, d.decode.nodes, first=False)
        )
    lines = [
        "#!/bin/bash",
        *header,
        f"# {config.model}: {_summary(config, source)}.",
        f"# Rendered from {source} by `python -m launch plan --format slurm`; submit with `sbatch` (no -N: the",
        "# node count is the deploy file's). Every node runs the same steps; its rank is SLURM_NODEID, the",
        "# primary is the allocation's first node; a step that fails on any node ends the job.",
        "set -euo pipefail",
        f"run=({shlex.join(shlex.split(s.python))})",
        f"export EP_DEPLOY_NAME={shlex.quote(source)}",
        # One single-quoted word: no content of the file can end it early (a heredoc's delimiter could).
        f"export EP_DEPLOY_TEXT={shlex.quote(deploy_text)}",
        "",
        "# The allocation must hold the deploy file's nodes: checked once, before any step starts.",
        '"${run[@]}" -m launch slurm-step allocation',
    ]
    steps = s.steps
    for i, step in enumerate(steps, 1):
        lines += ["", f'echo "[job] step {i}/{len(steps)}: {step}"']
        lines += _homogeneous(step, len(config.nodes)) if d is None else _heterogeneous(step)
    return "\n".join(lines) + "\n"


def _srun(*options: str) -> str:
    # --export=ALL: the steps need EP_DEPLOY_TEXT even where the site exports nothing by default.
    return " ".join(["srun", *options, "--export=ALL", "--label", '"${run[@]}"', "-m", "launch", "slurm-step"])


def _homogeneous(step: str, nodes: int) -> list[str]:
    spread = [f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1"]
    # Serving: a rank that dies takes the whole EP group with it, so srun stops the other nodes too.
    fatal = ["--kill-on-bad-exit=1"] if step == "serve" else []
    return [f"{_srun(*spread, *fatal)} {step}"]


def _heterogeneous(step: str) -> list[str]:
    per_group = [
        f"{_srun(f'--het-group={i}', '--ntasks-per-node=1', *(['--kill-on-bad-exit=1'] if step == 'serve' else []))} "
        f"{step} --group {g}"
        for i, g in enumerate(GROUPS)
    ]
    if step != "serve":
        return per_group
    # Both groups and the router run together; the first to end stops the others. The router sits beside the
    # prefill primary (the address `allocation` printed) and waits as long as the groups may take to load.
    beside = '--nodelist="$prefill_primary"'
    router = (
        f"{_srun('--het-group=0', '--nodes=1', '--ntasks=1', '--overlap', beside)} proxy -- --wait-for-groups 14400"
    )
    return [
        'prefill_primary=$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0" | head -n 1)',
        *[f"{line} &" for line in (*per_group, router)],
        "set +e; wait -n; code=$?",
        'echo "[job] a serving step ended with exit code $code; stopping the others"',
        # SIGTERM to the steps' tasks (the launchers stop vLLM in order); a SIGTERM to srun itself would
        # make it SIGKILL its tasks.
        'scancel --signal=TERM "$SLURM_JOB_ID"; wait',
        "exit $code",
    ]
