"""Rendered per-node scripts (`plan --format shell --out DIR`) hold no second implementation of what the
toolkit knows: they ask it, on the node, for the interface of an address and for the stack's paths, and
carry none of the planning machine's folders. A folder of scripts replaced with --force holds no stale one."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

from tests.conftest import ROOT

DEPLOY = """\
model: tiny-moe
nodes:
  - {address: 127.0.0.1, gpus: 2}
  - {address: gpu-02.cluster.local, gpus: 2}
network: {transport: tcp}
vllm_version: 0.26.0
"""


def render(launch, write_yaml, tmp_path, text=DEPLOY, *extra):
    out = tmp_path / "plans"
    res = launch("plan", str(write_yaml(text)), "--format", "shell", "--out", str(out), *extra)
    assert res.code == 0, res.err
    return out


def test_the_script_asks_the_toolkit_on_the_node(launch, write_yaml, tmp_path):
    script = (render(launch, write_yaml, tmp_path) / "node-1.sh").read_text()
    assert "-m launch ifname gpu-02.cluster.local)" in script  # a host name works as an IP does
    assert '-m env paths --profile current)"' in script
    assert "ip -o" not in script  # no shell copy of the interface lookup
    for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], str(ROOT)}:
        assert folder not in script  # nothing of the machine that made the plan


def test_the_script_finds_the_interface_and_runs(launch, write_yaml, tmp_path):
    """node 0 holds 127.0.0.1: the script's lookup (the toolkit's) finds `lo` and hands it to vLLM."""
    out = render(launch, write_yaml, tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "vllm").write_text('#!/bin/sh\necho "ifname=$NCCL_SOCKET_IFNAME gloo=$GLOO_SOCKET_IFNAME args=$*"\n')
    (bindir / "vllm").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "EP_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(["bash", str(out / "node-0.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ifname=lo gloo=lo args=serve tiny-moe")


def test_a_script_whose_address_is_not_here_stops_before_vllm(launch, write_yaml, tmp_path):
    out = render(launch, write_yaml, tmp_path, DEPLOY.replace("gpu-02.cluster.local", "192.0.2.7"))
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "EP_PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
    }
    (tmp_path / "vllm").write_text("#!/bin/sh\necho started\n")
    (tmp_path / "vllm").chmod(0o755)
    run = subprocess.run(["bash", str(out / "node-1.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode != 0 and "started" not in run.stdout
    assert "socket_ifname: auto found no interface holding 192.0.2.7 on this machine" in run.stderr


def test_force_replaces_the_folder_without_stale_scripts(launch, write_yaml, tmp_path):
    three = DEPLOY.replace("network:", "  - {address: 10.0.0.3, gpus: 2}\nnetwork:")
    out = render(launch, write_yaml, tmp_path, three)
    assert sorted(p.name for p in out.iterdir()) == ["node-0.sh", "node-1.sh", "node-2.sh"]
    smaller = str(write_yaml(DEPLOY, "two.yaml"))
    res = launch("plan", smaller, "--format", "shell", "--out", str(out))
    assert (
        res.code == 2
        and f"--out: {out / 'node-2.sh'} is no node of this plan (expected a new folder, or --force" in res.err
    )
    res = launch("plan", smaller, "--format", "shell", "--out", str(out), "--force")
    assert res.code == 0, res.err
    assert sorted(p.name for p in out.iterdir()) == ["node-0.sh", "node-1.sh"]
    assert f"removed {out / 'node-2.sh'}" in res.err


def test_prefill_and_decode_scripts_do_not_overwrite_each_other(launch, tmp_path):
    from tests.conftest import EXAMPLES

    out = tmp_path / "plans"
    res = launch("plan", str(EXAMPLES / "pd-1p1d.yaml"), "--format", "shell", "--out", str(out))
    assert res.code == 0, res.err
    assert sorted(p.name for p in out.iterdir()) == ["decode-node-0.sh", "prefill-node-0.sh"]


def test_a_symbolic_link_is_never_written_through_even_with_force(launch, write_yaml, tmp_path):
    out = tmp_path / "plans"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "node-0.sh").symlink_to(victim)
    res = launch("plan", str(write_yaml(DEPLOY)), "--format", "shell", "--out", str(out), "--force")
    assert res.code == 2 and f"--out: {out / 'node-0.sh'} is a symbolic link" in res.err
    assert victim.read_text() == "precious\n" and not (out / "node-1.sh").exists()  # nothing written


def test_force_removes_only_scripts_the_toolkit_wrote(launch, write_yaml, tmp_path):
    out = render(launch, write_yaml, tmp_path)
    (out / "node-7.sh").write_text("#!/bin/sh\n# my own script\n")
    res = launch("plan", str(write_yaml(DEPLOY)), "--format", "shell", "--out", str(out), "--force")
    assert res.code == 2 and "node-7.sh is no node of this plan and was not written by the toolkit" in res.err
    assert (out / "node-7.sh").read_text() == "#!/bin/sh\n# my own script\n"


def test_a_job_file_is_never_written_through_a_link(launch, tmp_path):
    job = tmp_path / "job.sbatch"
    job.symlink_to(tmp_path / "elsewhere")
    deploy = tmp_path / "d.yaml"
    deploy.write_text("model: m\nnodes: [{gpus: 8}]\n")
    res = launch("plan", str(deploy), "--format", "slurm", "--out", str(job), "--force")
    assert res.code == 2 and "is a symbolic link" in res.err and not (tmp_path / "elsewhere").exists()
