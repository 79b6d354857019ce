"""`python -m launch bench`: vLLM's own `vllm bench serve` against the deploy file's API, with the guide's
defaults, and a record of the run that lets two runs be compared.

    python -m launch bench cluster.yaml [--out DIR] [--logs LOG...] [-- extra vllm bench serve args]
    python -m launch bench --compare RUN_A RUN_B

Defaults (the guide's): --dataset-name random --random-input-len 128 --random-output-len 128
--num-prompts 10000 --ignore-eos; arguments after `--` come last and win. A run folder holds vLLM's
result.json, plan.json (every node's plan), versions.json (the stack here), command.txt and, with
--logs, verify.txt (what the servers actually ran).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import shlex
from pathlib import Path

from launch.config import DeployConfig

GUIDE_DEFAULTS = [
    "--dataset-name",
    "random",
    "--random-input-len",
    "128",
    "--random-output-len",
    "128",
    "--num-prompts",
    "10000",
    "--ignore-eos",
]

# (key in vLLM's result JSON, label, better when higher)
METRICS = [
    ("completed", "completed requests", True),
    ("failed", "failed requests", False),
    ("request_throughput", "requests/s", True),
    ("output_throughput", "output tokens/s", True),
    ("total_token_throughput", "total tokens/s", True),
    ("mean_ttft_ms", "mean TTFT ms", False),
    ("median_ttft_ms", "median TTFT ms", False),
    ("p99_ttft_ms", "p99 TTFT ms", False),
    ("mean_tpot_ms", "mean TPOT ms", False),
    ("p99_tpot_ms", "p99 TPOT ms", False),
    ("mean_itl_ms", "mean ITL ms", False),
]


def api_base(config: DeployConfig) -> str:
    host = config.host if config.host not in (None, "", "0.0.0.0", "::") else config.nodes[0].address
    return f"http://{host}:{config.port}"


def argv(config: DeployConfig, out: Path, extra: list[str]) -> list[str]:
    return [
        "vllm",
        "bench",
        "serve",
        "--base-url",
        api_base(config),
        "--model",
        config.model,
        *GUIDE_DEFAULTS,
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        "result.json",
        *extra,
    ]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "vllm",
        "torch",
        "nvidia-nccl-cu12",
        "nvidia-nccl-cu13",
        "deep_ep",
        "deep_gemm",
        "nixl",
        "vllm-ep-deploy",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def record(out: Path, command: list[str], plans: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(shlex.join(command) + "\n")
    (out / "plan.json").write_text(json.dumps(plans, indent=2) + "\n")
    (out / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")


def load_result(run: Path) -> dict:
    path = run / "result.json" if run.is_dir() else run
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise FileNotFoundError(f"{path}: no benchmark result ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a vLLM benchmark result (JSON error at line {exc.lineno})") from None


def summary(result: dict) -> list[str]:
    return [f"{label:<20} : {_fmt(result.get(key))}" for key, label, _ in METRICS if key in result]


def compare(a: dict, b: dict, names: tuple[str, str]) -> list[str]:
    """A side-by-side table of two runs; the last column is B / A."""
    rows = [("metric", names[0], names[1], "B/A")]
    for key, label, _ in METRICS:
        if key not in a and key not in b:
            continue
        va, vb = a.get(key), b.get(key)
        ratio = f"{vb / va:.3f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else "-"
        rows.append((label, _fmt(va), _fmt(vb), ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,.2f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
