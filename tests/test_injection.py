"""Nothing in a deploy file runs as a command.

Hostile strings (command substitutions, quotes, separators, newlines, a line that once ended the sbatch
script's embedded copy) go into every field that reaches a rendered script. Each file is either refused in
one line, or rendered and then executed with stand-in programs:
- a per-node script (`plan --format shell`) hands the stand-in `vllm` exactly the argv and the environment
  that `plan --format json` shows;
- the sbatch script (`plan --format slurm`) hands its steps the deploy file byte for byte, and every
  #SBATCH line stays in the header, where sbatch reads them;
and in neither case does the canary file appear that any of the injections would create.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st

from tests.conftest import ROOT, run_module
from tests.support import CANARY, FRAGMENTS, assert_one_line_error

hostile = st.lists(
    st.sampled_from(FRAGMENTS) | st.text(st.characters(exclude_categories=("Cs",)), max_size=4), min_size=1, max_size=3
).map("".join)

BASE = {
    "model": "tiny-moe",
    "nodes": [{"address": "127.0.0.1", "gpus": 2}],
    "network": {"transport": "tcp", "socket_ifname": "lo"},
    "vllm_version": "0.26.0",
}
SCRIPT_FIELDS = {
    "model": lambda d, v: d.update(model=v),
    "env value": lambda d, v: d.update(env={"EP_TEST_VALUE": v}),
    "node env value": lambda d, v: d["nodes"][0].update(env={"EP_NODE_VALUE": v}),
    "nccl value": lambda d, v: d["network"].update(nccl={"NCCL_DEBUG_FILE": v}),
    "vllm argument": lambda d, v: d.update(vllm_args=["--served-model-name", v]),
    "env name": lambda d, v: d.update(env={v: "1"}),
    "log_dir": lambda d, v: d.update(log_dir=v),
    "nvshmem value": lambda d, v: d["network"].update(nvshmem={"NVSHMEM_DEBUG_FILE": v}),
    "API bind address": lambda d, v: d.update(host=v),
    "node address": lambda d, v: d["nodes"][0].update(address=v),
    "socket interface": lambda d, v: d["network"].update(socket_ifname=v),
}
SLURM_FIELDS = {
    "model": lambda d, v: d.update(model=v),
    "env value": lambda d, v: d.update(env={"EP_TEST_VALUE": v}),
    **{f"slurm.{k}": (lambda d, v, k=k: d.update(slurm={k: v})) for k in ("partition", "account", "qos", "time")},
    "slurm.job_name": lambda d, v: d.update(slurm={"job_name": v}),
    "slurm.sbatch": lambda d, v: d.update(slurm={"sbatch": [f"--comment={v}"]}),
    "slurm.output": lambda d, v: d.update(slurm={"output": v}),
}

ISOLATED = ["unshare", "--net"] if os.geteuid() == 0 and shutil.which("unshare") else []
"""The rendered scripts run in a network namespace of their own where root can make one: an injection that
worked could reach no network."""

STAND_IN_VLLM = """\
#!{python}
import json, os, sys
with open(os.environ["EP_TEST_RECEIVED"], "w") as f:
    json.dump({{"argv": ["vllm", *sys.argv[1:]], "env": dict(os.environ)}}, f)
"""
STAND_IN_PYTHON = """\
#!/bin/sh
# `python -m launch slurm-step ...` in the job: keep what the step would read
printf %s "$EP_DEPLOY_TEXT" > "$EP_TEST_RECEIVED"
"""


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict[str, Path]:
    """A folder of stand-in programs and a place for the canary."""
    root = tmp_path_factory.mktemp("injection")
    bindir = root / "bin"
    bindir.mkdir()
    for name, text in (
        ("vllm", STAND_IN_VLLM.format(python=sys.executable)),
        ("python", STAND_IN_PYTHON),
        ("srun", "#!/bin/sh\n"),
        ("scontrol", "#!/bin/sh\n"),
        ("scancel", "#!/bin/sh\n"),
    ):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    return {"root": root, "bin": bindir}


def deploy_with(bench: dict[str, Path], fields: dict, field: str, value: str, n: list[int]) -> tuple[Path, Path, str]:
    """A fresh folder with the deploy file; the canary's path; the value with the canary filled in."""
    n[0] += 1
    work = bench["root"] / f"case-{n[0]}"
    work.mkdir()
    canary = work / "INJECTED"
    value = value.replace(CANARY, str(canary))
    data = json.loads(json.dumps(BASE))
    fields[field](data, value)
    deploy = work / "deploy.yaml"
    deploy.write_text(yaml.safe_dump(data, allow_unicode=True))
    return deploy, canary, value


def refused_in_one_line(res) -> bool:
    if res.code == 0:
        event("rendered and run")
        return False
    assert_one_line_error(res)
    event("refused in one line")
    return True


_cases = [0]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(SCRIPT_FIELDS)), value=hostile)
def test_a_rendered_script_hands_vllm_what_the_plan_says(bench, field, value):
    deploy, canary, value = deploy_with(bench, SCRIPT_FIELDS, field, value, _cases)
    planned = run_module("launch", "plan", str(deploy), "--format", "json")
    if refused_in_one_line(planned):
        return
    (plan,) = json.loads(planned.out)
    out = deploy.parent / "scripts"
    rendered = run_module("launch", "plan", str(deploy), "--format", "shell", "--out", str(out))
    assert rendered.code == 0, rendered.err

    received = deploy.parent / "received.json"
    env = {
        **os.environ,
        "PATH": f"{bench['bin']}:{os.environ['PATH']}",
        "EP_PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "EP_TEST_RECEIVED": str(received),
    }
    run = subprocess.run(
        [*ISOLATED, "bash", str(out / "node-0.sh")],
        capture_output=True,
        text=True,
        env=env,
        cwd=deploy.parent,
        timeout=120,
    )
    assert not canary.exists(), f"{field} = {value!r} ran a command"
    assert run.returncode == 0, run.stderr
    got = json.loads(received.read_text())
    assert got["argv"] == plan["argv"]
    for name, expected in plan["env"].items():
        assert got["env"].get(name) == expected, name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(SLURM_FIELDS)), value=hostile)
def test_the_sbatch_script_carries_the_file_whole_and_its_options_in_the_header(bench, field, value):
    deploy, canary, value = deploy_with(bench, SLURM_FIELDS, field, value, _cases)
    data = yaml.safe_load(deploy.read_text())
    del data["nodes"][0]["address"]  # a scheduler places the nodes
    deploy.write_text(yaml.safe_dump(data, allow_unicode=True))
    rendered = run_module("launch", "plan", str(deploy), "--format", "slurm")
    if refused_in_one_line(rendered):
        return
    lines = rendered.out.splitlines()
    header = 1 + next(i for i, line in enumerate(lines[1:]) if not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in lines[header:])  # sbatch stops at the first command

    job = deploy.parent / "job.sh"
    job.write_text(rendered.out)
    received = deploy.parent / "received.yaml"
    env = {**os.environ, "PATH": f"{bench['bin']}:{os.environ['PATH']}", "EP_TEST_RECEIVED": str(received)}
    run = subprocess.run(
        [*ISOLATED, "bash", str(job)], capture_output=True, text=True, env=env, cwd=deploy.parent, timeout=60
    )
    assert not canary.exists(), f"{field} = {value!r} ran a command"
    assert run.returncode == 0, run.stderr
    assert received.read_text() == deploy.read_text()


def test_the_fragments_are_hostile_where_nothing_quotes_them(tmp_path):
    """The stand-ins are not toothless: the same fragments, pasted unquoted into a script, do create the canary."""
    canary = tmp_path / "INJECTED"
    script = tmp_path / "naive.sh"
    script.write_text(
        textwrap.dedent(f"""\
        export X={FRAGMENTS[0].replace(CANARY, str(canary))}
    """)
    )
    subprocess.run(["bash", str(script)], check=True, timeout=10)
    assert canary.exists()
