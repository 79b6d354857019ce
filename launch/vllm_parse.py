"""Runs inside the Python that has vLLM: parses `vllm serve` argvs with vLLM's own parser.

    python -m launch.vllm_parse < argvs.json > results.json

Input: a JSON list of argvs (each starting at `serve`, or at `bench` for `vllm bench serve`). Output: one JSON object, {"version": ...,
"results": [{"ok": bool, "error": str|null}, ...]}. The parser is built as vLLM's `vllm` command builds
it (FlexibleArgumentParser -> subparsers -> ServeSubcommand), so what it accepts is what `vllm serve`
accepts before it starts anything. Nothing is served and no GPU is used.

On a machine without NVIDIA GPUs, vLLM 0.10 - 0.2x cannot pick a platform and fail while building the
parser ("Failed to infer device type"); there a tiny platform plugin that answers "cpu" is put on the
path for this process only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

_PLUGIN = 'def register():\n    return "vllm.platforms.cpu.CpuPlatform"\n'
_PLUGIN_DIST = "ep_check_cpu_platform-0.1.dist-info"


SCRATCH_VAR = "EP_CHECK_SCRATCH"
"""A folder the caller made (and removes) for the plugin; without it the probe makes and removes its own."""


def _cpu_platform_plugin() -> str:
    """A folder holding a vLLM platform plugin (module + entry point) that selects the CPU platform."""
    given = os.environ.get(SCRATCH_VAR)
    folder = Path(given) if given else Path(tempfile.mkdtemp(prefix="ep-check-"))
    (folder / "ep_check_cpu_platform.py").write_text(_PLUGIN)
    dist = folder / _PLUGIN_DIST
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-check-cpu-platform\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vllm.platform_plugins]\nep_check_cpu = ep_check_cpu_platform:register\n")
    return str(folder)


def _has_nvidia_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def _build_parser(with_bench: bool):
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser  # 0.11 and later
    except ImportError:
        from vllm.utils import FlexibleArgumentParser  # 0.10
    from vllm.entrypoints.cli.serve import ServeSubcommand

    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    ServeSubcommand().subparser_init(subparsers)
    if with_bench:  # `vllm bench serve ...`: imported only when asked, it pulls in the benchmark code
        import vllm.entrypoints.cli.benchmark.main as benchmark

        sys.argv = ["vllm", "bench"]  # newer vLLM builds the bench subcommands only when invoked as `vllm bench`
        for command in benchmark.cmd_init():
            command.subparser_init(subparsers)
    return parser


def _parse(parser, argv: list[str]) -> dict:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(argv)
    except SystemExit as exc:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        errors = [line for line in lines if ": error:" in line]
        return {"ok": False, "error": (errors or lines or [f"exit {exc.code}"])[-1]}
    except Exception as exc:  # a type converter that raised instead of reporting
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "error": None}


def main() -> int:
    argvs = json.load(sys.stdin)
    plugin = None
    if not _has_nvidia_gpu() and "VLLM_TARGET_DEVICE" not in os.environ:
        plugin = _cpu_platform_plugin()
        sys.path.insert(0, plugin)
    for key, value in {"VLLM_LOGGING_LEVEL": "ERROR", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(key, value)
    # vLLM logs to stdout: keep it (and C-level writes) off ours until the JSON answer.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        import importlib.metadata

        try:
            version = importlib.metadata.version("vllm")
        except importlib.metadata.PackageNotFoundError:
            import vllm

            version = vllm.__version__
        parser = _build_parser(with_bench=any(argv[:1] == ["bench"] for argv in argvs))
        answer = {"version": version, "results": [_parse(parser, argv) for argv in argvs]}
    except Exception as exc:
        answer = {"version": None, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
    sys.stdout.flush()
    os.dup2(real_stdout, 1)
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    if plugin is not None and not os.environ.get(SCRATCH_VAR):  # os._exit skips every cleanup: remove it here
        shutil.rmtree(plugin, ignore_errors=True)
    os._exit(0)  # skip torch / vLLM teardown hooks: nothing to clean up, seconds saved


if __name__ == "__main__":
    main()
