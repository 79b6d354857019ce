"""`python -m launch check`: every node's `vllm serve` argv through the installed vLLM's own parser.

The parse runs in a subprocess (launch/vllm_parse.py) of the Python that has vLLM, within a time bound,
one process for all nodes. A typo, a flag the installed version lacks, or a value outside a flag's
choices is reported per node with vLLM's own error line, before any node starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from launch import vllm_parse
from launch.plan import NodePlan

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Parsed:
    ok: bool
    error: str | None


@dataclass(frozen=True)
class Answer:
    version: str | None
    results: list[Parsed]
    problem: str = ""
    """Why no answer came (vLLM missing, the parser crashed, the bound passed)."""


def parse(
    argvs: Sequence[Sequence[str]],
    *,
    python: str = sys.executable,
    pythonpath: Sequence[str] = (),
    timeout: float = 120.0,
) -> Answer:
    """Parses each argv (starting at `serve`) with the vLLM importable by ``python``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *pythonpath, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    # the probe's scratch folder is made and removed here: a probe killed at the bound cannot remove its own
    with tempfile.TemporaryDirectory(prefix="ep-check-") as scratch:
        env[vllm_parse.SCRATCH_VAR] = scratch
        try:
            proc = subprocess.run(
                [python, "-m", "launch.vllm_parse"],
                input=json.dumps([list(a) for a in argvs]),
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return Answer(None, [], f"vLLM's parser did not answer within {timeout:g} s")
        except OSError as exc:
            return Answer(None, [], f"cannot run {python}: {exc.strerror or exc}")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Answer(None, [], f"the parser probe exited with {proc.returncode}: {tail[:300]}")
    if data.get("error"):
        return Answer(None, [], f"vLLM's parser could not be built: {data['error']}")
    return Answer(data["version"], [Parsed(r["ok"], r["error"]) for r in data["results"]])


def same_release(target: Version, installed: str | None) -> bool:
    """Whether the installed vLLM is the plan's target, local build suffixes aside (0.26.0+cu130 is 0.26.0;
    0.1 is not 0.10.1.1, as a substring test would say)."""
    try:
        return installed is not None and Version(Version(installed).base_version) == target
    except InvalidVersion:
        return False


def report(plans: list[NodePlan], *, timeout: float, python: str = sys.executable, out=sys.stdout) -> int:
    """Prints one line per node; exit code 1 if vLLM rejects any argv, 2 if vLLM cannot be asked."""
    answer = parse([p.argv[1:] for p in plans], python=python, timeout=timeout)
    if answer.problem:
        print(
            f"error: check: {answer.problem} (is vLLM installed in this environment? `pixi install`)", file=sys.stderr
        )
        return 2
    target = plans[0].target
    print(f"# vLLM {answer.version} parsed {len(plans)} node argv(s); plans target {target.describe()}", file=out)
    if not same_release(target.version, answer.version):
        print(f"# note: the installed vLLM ({answer.version}) is not the plan's target ({target.version})", file=out)
    bad = 0
    for plan, parsed in zip(plans, answer.results, strict=True):
        lay = plan.layout
        if parsed.ok:
            print(f"OK       node {lay.node_rank} ({lay.role})", file=out)
        else:
            bad += 1
            print(f"REJECTED node {lay.node_rank} ({lay.role}): {parsed.error}", file=out)
    return 1 if bad else 0
