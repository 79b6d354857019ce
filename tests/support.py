"""Helpers the test modules share (no test module imports another): the real vLLM parsers' location and the
shape of a one-line error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ROOT

VLLM_VERSIONS = ["0.10.1.1", "0.26.0", "0.33.0"]
"""The vLLM versions whose real parsers tests/vllm/install-parsers.sh installs: the guide's, the GPU machine's, the newest."""
PARSERS = Path(os.environ.get("EP_VLLM_PARSERS", ROOT / ".cache" / "vllm-parsers"))
PARSER_PYTHON = PARSERS / "venv" / "bin" / "python"


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
