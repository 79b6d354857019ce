"""Preflight on one node of a multi-node deploy file checks that node, says so, and does not wait for nodes
nobody started; the cross-node checks run when asked for (--cross-node, -m multinode). `--help` shows our
options before pytest's."""

from __future__ import annotations

import time

import pytest

from tests.conftest import run_module

TWO_NODES = (
    "model: m\nnodes:\n  - {address: 127.0.0.1, gpus: 1}\n  - {address: 10.0.0.2, gpus: 1}\nnetwork: {transport: tcp}\n"
)


def test_one_node_alone_skips_the_cross_node_checks_at_once(write_yaml):
    deploy = write_yaml(TWO_NODES)
    start = time.monotonic()
    res = run_module(
        "preflight",
        "--deploy",
        str(deploy),
        "--node-rank",
        "0",
        "--socket-ifname",
        "lo",
        "-k",
        "crossnode",
        timeout=120,
    )
    took = time.monotonic() - start
    assert res.code == 0, res.out + res.err
    assert "node 0 of 2 (primary 127.0.0.1), this node only (cross-node checks: --cross-node)" in res.out
    skipped = [line for line in res.out.splitlines() if line.startswith("SKIP  crossnode")]
    assert skipped and all("this node alone: the other 1 node(s) are not expected now" in line for line in skipped)
    assert took < 60  # nothing waited for the rendezvous' 120 s


def test_cross_node_when_asked_waits_bounded_and_says_so(write_yaml):
    """With --cross-node the primary hosts the rendezvous and waits for node 1 (never started here), with
    progress lines, until its bound (the deploy file's rendezvous_timeout_s)."""
    deploy = write_yaml(TWO_NODES + "preflight: {rendezvous_timeout_s: 12}\n")
    res = run_module(
        "preflight",
        "--deploy",
        str(deploy),
        "--node-rank",
        "0",
        "--socket-ifname",
        "lo",
        "--cross-node",
        "-k",
        "every_node_joined",
        "-p",
        "no:xdist",
        timeout=120,
    )
    assert res.code == 1, res.out + res.err
    assert "[preflight] waiting for node(s) [1] at 127.0.0.1:13346 ('facts') (1" in res.err
    assert "rank(s) 1 (10.0.0.2) did not join the rendezvous at 127.0.0.1:13346 within 12 s" in res.out


def test_help_shows_our_options_first():
    res = run_module("preflight", "--help")
    assert res.code == 0
    ours, pytests = res.out.index("--cross-node"), res.out.index("usage: pytest")
    assert ours < pytests
    assert res.out.startswith("usage: python -m preflight")


@pytest.mark.parametrize(
    ("flag", "markexpr", "asked"),
    [
        (False, "", False),  # a plain run: this node alone
        (True, "", True),  # --cross-node
        (False, "multinode", True),
        (False, "ep", True),  # the EP kernels across nodes need every node too
        (False, "not multinode", False),
        (False, "not ep and not multinode", False),
        (False, "collective", False),
        (False, "step", False),  # a word that merely contains "ep"
    ],
)
def test_which_runs_expect_every_node(flag, markexpr, asked):
    from preflight.plugin import asks_cross_node

    assert asks_cross_node(flag, markexpr) is asked


@pytest.mark.parametrize(
    "args, message",
    [
        (["--deploy", "missing.yaml"], "error: missing.yaml: cannot read the deploy file (No such file or directory)"),
        (["--node-rank", "7"], "error: --node-rank: 7 is not a node of "),
    ],
    ids=["missing file", "no such node"],
)
def test_a_deploy_file_or_option_that_cannot_be_used_is_one_line_and_exit_2(write_yaml, args, message):
    """As `python -m launch` says it: one line, exit code 2, before any check runs."""
    if args[0] == "--node-rank":
        args = ["--deploy", str(write_yaml(TWO_NODES)), *args]
    res = run_module("preflight", *args, "-k", "shm", timeout=120)
    assert res.code == 2 and res.out == ""
    assert res.err.count("\n") == 1 and res.err.startswith(message), res.err
