"""Helpers the test modules share (no test module imports another): the real vLLM parsers' location and the
shape of a one-line error."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from tests.conftest import ROOT

VLLM_VERSIONS = ["0.10.1.1", "0.26.0", "0.33.0"]
"""The vLLM versions whose real parsers tests/vllm/install-parsers.sh installs: the guide's, the GPU machine's, the newest."""
PARSERS = Path(os.environ.get("EP_VLLM_PARSERS", ROOT / ".cache" / "vllm-parsers"))
PARSER_PYTHON = PARSERS / "venv" / "bin" / "python"
FAKE_VLLM = ROOT / "tests" / "fixtures" / "fake_vllm_http.py"
"""A stand-in for `vllm serve`'s HTTP side: /health and /metrics (its docstring)."""


def parser_of(version: str) -> Path:
    """The folder holding vLLM ``version``'s parser; skips (fails under EP_REQUIRE_VLLM=1) when it is not installed."""
    folder = PARSERS / f"vllm-{version}"
    if not (folder / ".installed").exists() or not PARSER_PYTHON.exists():
        if os.environ.get("EP_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM {version}'s parser is not installed in {PARSERS} (bash tests/vllm/install-parsers.sh)")
        pytest.skip(f"vLLM {version}'s parser is not installed (bash tests/vllm/install-parsers.sh)")
    return folder


def assert_one_line_error(res, *fragments):
    """Bad input: exit 2, one line on stderr holding every fragment, nothing on stdout, no traceback."""
    assert res.code == 2, (res.code, res.out, res.err)
    assert "Traceback" not in res.err
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert res.out == ""


def vllm_metrics(ranks: dict[int, tuple[int, int, float]], model: str = "m", old_kv_name: bool = False) -> str:
    """Prometheus text with vLLM 0.26's metric names, help texts and labels (vllm/v1/metrics/loggers.py)."""
    out = []
    for name, doc, at in (
        ("vllm:num_requests_running", "Number of requests in model execution batches.", 0),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", 1),
        (
            "vllm:gpu_cache_usage_perc" if old_kv_name else "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            2,
        ),
    ):
        out += [f"# HELP {name} {doc}", f"# TYPE {name} gauge"]
        out += [f'{name}{{engine="{r}",model_name="{model}"}} {float(v[at])}' for r, v in sorted(ranks.items())]
    out += [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 96.0',
    ]
    return "\n".join(out) + "\n"


def alive(pid: int) -> bool:
    """Whether a process still runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose: it holds no memory
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wheel_text(version: str, path: str) -> str:
    """A file of an installed vLLM release ("" when that release has no such file); skips where it is not installed."""
    import os
    from pathlib import Path

    from tests.conftest import ROOT

    folder = Path(os.environ.get("EP_VLLM_PARSERS", ROOT / ".cache" / "vllm-parsers")) / f"vllm-{version}"
    if not (folder / "vllm").is_dir():
        if os.environ.get("EP_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM {version} is not installed in {folder.parent} (bash tests/vllm/install-parsers.sh)")
        pytest.skip(f"vLLM {version} is not installed (bash tests/vllm/install-parsers.sh)")
    file = folder / path
    return file.read_text() if file.is_file() else ""


# ---- hostile strings (tests/test_injection.py, tests/hostile_files.py) ----------------------------------------
CANARY = "@CANARY@"
"""Replaced by a file path of the test's own: the file an injection that worked would create."""

FRAGMENTS = [
    f"$(touch {CANARY})",
    f"`touch {CANARY}`",
    f"; touch {CANARY} #",
    f"' ; touch {CANARY} ; '",
    f'" ; touch {CANARY} ; "',
    f"\\$(touch {CANARY})",
    f"\ntouch {CANARY}\n",
    f"\nEP_DEPLOY_YAML\ntouch {CANARY}\n",
    f"'\ntouch {CANARY}\n'",
    "${HOME}",
    "*",
    "~root",
    "#",
    "!!",
    "\\",
    " ",
    "\t",
]


def stand_in_launcher(address: str, rank: int, port: int, token: str = "t0k3n") -> socket.socket:
    """Answers ``address:port`` with the line a secondary's launcher sends (launch/peers.py), until closed."""
    from launch.peers import PROTOCOL

    server = socket.create_server((address, port))

    def answer() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(f"{PROTOCOL} node {rank} {token}\n".encode())

    threading.Thread(target=answer, daemon=True).start()
    return server
