"""Figures: hostile deploy files through every output format, the rendered scripts executed.

    python tests/hostile_files.py [--files 200] [--seed 1]

Each file puts one hostile string (tests/support.py FRAGMENTS, joined with random characters) into one field
that reaches a printed plan, a script or a job. Every file goes through `launch plan` in each format (text,
json, shell, slurm, k8s), in this process, through the command line's own entry point. Rendered per-node
scripts and sbatch scripts are then run with stand-in programs (`vllm`, `python`, `srun`, `scontrol`,
`scancel`), in a network namespace of their own where root can make one. Printed: files tried, refusals,
renderings, scripts run, tracebacks, escapes (a canary file that an injection would create), processes left,
and the longest error line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launch.cli import main as launch_main  # noqa: E402
from tests.support import CANARY, FRAGMENTS  # noqa: E402

BASE = {
    "model": "tiny-moe",
    "network": {"transport": "tcp", "socket_ifname": "lo"},
    "vllm_version": "0.26.0",
    "kubernetes": {"image": "registry.example/vllm-ep:1"},
}
FIELDS = {
    "model": lambda d, v: d.update(model=v),
    "env value": lambda d, v: d.update(env={"EP_TEST_VALUE": v}),
    "env name": lambda d, v: d.update(env={v: "1"}),
    "node env value": lambda d, v: d["nodes"][0].update(env={"EP_NODE_VALUE": v}),
    "node address": lambda d, v: d["nodes"][0].update(address=v),
    "socket_ifname": lambda d, v: d["network"].update(socket_ifname=v),
    "nccl value": lambda d, v: d["network"].update(nccl={"NCCL_DEBUG_FILE": v}),
    "nccl name": lambda d, v: d["network"].update(nccl={f"NCCL_{v}": "1"}),
    "hcas": lambda d, v: d["network"].update(transport="ib", hcas=[v]),
    "vllm argument": lambda d, v: d.update(vllm_args=["--served-model-name", v]),
    "log_dir": lambda d, v: d.update(log_dir=v),
    "slurm.partition": lambda d, v: d.update(slurm={"partition": v}),
    "slurm.account": lambda d, v: d.update(slurm={"account": v}),
    "slurm.job_name": lambda d, v: d.update(slurm={"job_name": v}),
    "slurm.output": lambda d, v: d.update(slurm={"output": v}),
    "slurm.sbatch": lambda d, v: d.update(slurm={"sbatch": [f"--comment={v}"]}),
    "kubernetes.namespace": lambda d, v: d["kubernetes"].update(namespace=v),
    "kubernetes.image": lambda d, v: d["kubernetes"].update(image=v),
}
FORMATS = ("text", "json", "shell", "slurm", "k8s")
STAND_INS = {
    "vllm": "#!/bin/sh\nexit 0\n",
    "python": "#!/bin/sh\nexit 0\n",
    "srun": "#!/bin/sh\nexit 0\n",
    "scontrol": "#!/bin/sh\nexit 0\n",
    "scancel": "#!/bin/sh\nexit 0\n",
}
ISOLATED = ["unshare", "--net"] if os.geteuid() == 0 and shutil.which("unshare") else []


def hostile(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.7:
            parts.append(rng.choice(FRAGMENTS))
        else:
            parts.append("".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x2FFF)])) for _ in range(3)))
    return "".join(parts)


def plan(args: list[str]) -> tuple[int, str, str, str | None]:
    """`launch plan ...` in this process: (exit code, stdout, stderr, traceback if one escaped)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = launch_main(["plan", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            return 1, out.getvalue(), err.getvalue(), traceback.format_exc()
    return code, out.getvalue(), err.getvalue(), None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    counts = dict.fromkeys(("refused", "rendered", "scripts run", "tracebacks", "escapes", "errors over 1 line"), 0)
    longest = ""
    before = {p.pid for p in psutil.process_iter()}
    with tempfile.TemporaryDirectory() as tmp:
        bindir = Path(tmp) / "bin"
        bindir.mkdir()
        for name, text in STAND_INS.items():
            (bindir / name).write_text(text)
            (bindir / name).chmod(0o755)
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "EP_PYTHON": sys.executable}
        env["PYTHONPATH"] = str(ROOT)
        for i in range(args.files):
            work = Path(tmp) / f"f{i}"
            work.mkdir()
            canary = work / "INJECTED"
            field = rng.choice(sorted(FIELDS))
            value = hostile(rng).replace(CANARY, str(canary))
            for fmt in FORMATS:
                data = json.loads(json.dumps(BASE))
                data["nodes"] = [{"gpus": 2} if fmt in ("slurm", "k8s") else {"address": "127.0.0.1", "gpus": 2}]
                FIELDS[field](data, value)
                deploy = work / f"{fmt}.yaml"
                deploy.write_text(yaml.safe_dump(data, allow_unicode=True))
                out = work / f"out-{fmt}"
                extra = ["--out", str(out)] if fmt == "shell" else []
                code, stdout, stderr, trace = plan([str(deploy), "--format", fmt, *extra])
                if trace:
                    counts["tracebacks"] += 1
                    print(f"traceback: {field} = {value!r} ({fmt})\n{trace}", file=sys.stderr)
                    continue
                if code != 0:
                    counts["refused"] += 1
                    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
                    if len(lines) != 1 or "Traceback" in stderr:
                        counts["errors over 1 line"] += 1
                        print(f"error over 1 line: {field} = {value!r} ({fmt}):\n{stderr}", file=sys.stderr)
                    longest = max([longest, *lines], key=len)
                    continue
                counts["rendered"] += 1
                scripts = sorted(out.glob("*.sh")) if fmt == "shell" else []
                if fmt == "slurm":
                    scripts = [work / "job.sh"]
                    scripts[0].write_text(stdout)
                for script in scripts:
                    subprocess.run(
                        [*ISOLATED, "bash", str(script)], cwd=work, env=env, capture_output=True, timeout=120
                    )
                    counts["scripts run"] += 1
            if canary.exists():
                counts["escapes"] += 1
                print(f"escape: {field} = {value!r}", file=sys.stderr)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    print(f"hostile files          : {args.files} (seed {args.seed}), {len(FORMATS)} formats each")
    for key, value in counts.items():
        print(f"{key:<23}: {value}")
    print(f"processes left         : {len(left)}")
    print(f"longest error line     : {len(longest)} characters")
    print(f"  {longest}")
    return 1 if counts["tracebacks"] or counts["escapes"] or left else 0


if __name__ == "__main__":
    raise SystemExit(main())
