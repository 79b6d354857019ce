"""On two real "nodes" (network namespaces joined by a veth pair): each node finds its own rank and the
interface that holds its address; the guide's secondary finds the interface towards the primary; the
rendered per-node scripts do the same lookups in shell, and a wrong interface is refused."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

DEPLOY = """\
model: tiny-moe
nodes:
  - {address: 10.77.0.1, gpus: 2}
  - {address: 10.77.0.2, gpus: 2}
network: {transport: tcp, socket_ifname: auto}
"""


def run_in(host, *args, env=None):
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run(
        host.cmd(sys.executable, "-m", "launch", *args), capture_output=True, text=True, env=full, timeout=60, cwd=ROOT
    )
    return proc


def exports(text):
    return dict(line.removeprefix("export ").split("=", 1) for line in text.splitlines() if line.startswith("export "))


def test_each_node_finds_its_rank_and_interface(two_hosts, tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text(DEPLOY)
    for rank, host in enumerate(two_hosts):
        proc = run_in(host, "serve", "--deploy", str(deploy), "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert f"# node {rank} ({'primary' if rank == 0 else 'secondary'} {host.address})" in proc.stdout
        env = exports(proc.stdout)
        assert (
            env["GLOO_SOCKET_IFNAME"]
            == env["NCCL_SOCKET_IFNAME"]
            == env["NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"]
            == host.ifname
        )


def test_guide_secondary_binds_the_interface_towards_the_primary(two_hosts):
    primary, secondary = two_hosts
    proc = run_in(secondary, "secondary", primary.address, "13345", "tiny-moe", "4", "2", "2", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert exports(proc.stdout)["NCCL_SOCKET_IFNAME"] == secondary.ifname


def test_a_named_interface_missing_on_the_node_is_refused(two_hosts, tmp_path):
    primary, secondary = two_hosts
    deploy = tmp_path / "d.yaml"
    deploy.write_text(DEPLOY.replace("socket_ifname: auto", f"socket_ifname: {primary.ifname}"))
    proc = run_in(secondary, "serve", "--deploy", str(deploy), "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: socket_ifname: interface '{primary.ifname}' does not exist on this machine (expected one of: lo, {secondary.ifname})"
    )


def test_rendered_scripts_find_the_interface_on_the_node(two_hosts, tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text(DEPLOY + "env: {HF_TOKEN: hf_secret}\n")
    out = tmp_path / "plans"
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "plan", str(deploy), "--format", "shell", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hf_secret" not in (out / "node-1.sh").read_text()
    # a `vllm` that prints what it was given
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vllm").write_text('#!/bin/sh\necho "ifname=$NCCL_SOCKET_IFNAME token=$HF_TOKEN args=$*"\n')
    (bindir / "vllm").chmod(0o755)
    toolkit = {"EP_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    for rank, host in enumerate(two_hosts):
        # the script asks the toolkit on its node (EP_PYTHON) for the interface of the node's address
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "HF_TOKEN": "from-env", **toolkit}
        run = subprocess.run(
            host.cmd("bash", str(out / f"node-{rank}.sh")), capture_output=True, text=True, env=env, timeout=30
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"ifname={host.ifname} token=from-env args=serve tiny-moe")
    # without the secret in the environment, the script stops before starting anything
    run = subprocess.run(
        two_hosts[0].cmd("bash", str(out / "node-0.sh")),
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
        | {"PATH": f"{bindir}:{os.environ['PATH']}", **toolkit},
        timeout=30,
    )
    assert run.returncode != 0 and "set HF_TOKEN in the environment" in run.stderr
