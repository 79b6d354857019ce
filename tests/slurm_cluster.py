"""A real two-node Slurm cluster on one machine: munge, one slurmctld and two slurmd daemons, each slurmd in
its own network namespace (its own address) and UTS namespace (its own host name), all joined by a bridge.
Jobs submitted to it run their steps inside those namespaces, so two "nodes" really are two network hosts.

Needs root, iproute2 and Debian's slurmctld, slurmd, slurm-client and munge; `available()` says what is
missing. Everything lives under one folder and is torn down afterwards (jobs cancelled, daemons stopped,
namespaces and bridge deleted).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "scontrol", "sbatch", "ip", "unshare")


def available() -> str | None:
    """None if a cluster can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, Slurm daemons)"
    missing = [d for d in DAEMONS if not shutil.which(d) and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client munge iproute2)"
    return None


@dataclass(frozen=True)
class SlurmNode:
    name: str
    ns: str
    ifname: str
    address: str


@dataclass
class Cluster:
    folder: Path
    conf: Path
    nodes: list[SlurmNode]

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 30) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env})
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout

    def submit(self, script: Path, *options: str, env: dict[str, str], cwd: Path) -> str:
        """sbatch the script (command-line options override its #SBATCH lines); the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *options, str(script)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=cwd,
            env={**env, **self.env},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def wait(self, job: str, timeout: float) -> list[tuple[str, str]]:
        """(JobState, ExitCode) of every component once all have ended; cancels the job past the bound."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.run("scontrol", "show", "job", "--oneliner", job).splitlines()
            states = [(f.get("JobState", "?"), f.get("ExitCode", "?")) for f in map(_fields, lines)]
            if states and all(s not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for s, _ in states):
                return states
            time.sleep(0.5)
        subprocess.run(["scancel", job], env={**os.environ, **self.env}, capture_output=True, timeout=30)
        raise TimeoutError(f"job {job} did not end within {timeout:g} s (cancelled)")


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split() if "=" in part)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


CONF = """\
ClusterName=eptest
SlurmctldHost={ctl}({ctl_address})
SlurmctldPort={ctl_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={folder}/munge/socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
# no cgroup confinement and no accounting: a test cluster inside a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# heterogeneous jobs are started by the backfill scheduler: look every second
SchedulerParameters=bf_interval=1
ReturnToService=2
SlurmdParameters=config_overrides
{nodes}
PartitionName=ep Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


@contextmanager
def running(tag: str, subnet: str = "10.79.0") -> Iterator[Cluster]:
    """Brings the cluster up under a fresh folder; yields it once both nodes are idle; tears it down."""
    folder = Path(f"/tmp/ep-slurm-{tag}")
    shutil.rmtree(folder, ignore_errors=True)
    for sub in ("state", "spool", "munge"):
        (folder / sub).mkdir(parents=True)
    (folder / "munge").chmod(0o700)
    bridge = f"epsb{tag}"[:15]
    nodes = [SlurmNode(f"epn{i}", f"epsn{i}{tag}", f"eth{i}", f"{subnet}.{i}") for i in (1, 2)]
    ctl_address = f"{subnet}.254"
    conf = folder / "slurm.conf"
    try:
        key = folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        _sh(
            "munged",
            "--force",
            f"--socket={folder}/munge/socket",
            f"--key-file={key}",
            f"--pid-file={folder}/munge/pid",
            f"--log-file={folder}/munge/log",
            f"--seed-file={folder}/munge/seed",
        )
        _sh("ip", "link", "add", bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{ctl_address}/24", "dev", bridge)
        _sh("ip", "link", "set", bridge, "up")
        for i, node in enumerate(nodes):
            host_end = f"{bridge}h{i}"[:15]
            _sh("ip", "netns", "add", node.ns)
            _sh("ip", "-n", node.ns, "link", "set", "lo", "up")
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node.ifname, "netns", node.ns)
            _sh("ip", "link", "set", host_end, "master", bridge, "up")
            _sh("ip", "-n", node.ns, "addr", "add", f"{node.address}/24", "dev", node.ifname)
            _sh("ip", "-n", node.ns, "link", "set", node.ifname, "up")
            (folder / "spool" / node.name).mkdir()
        conf.write_text(
            CONF.format(
                ctl="epctl",
                ctl_address=ctl_address,
                ctl_port=_free_port(),
                slurmd_port=6818,
                folder=folder,
                nodes="\n".join(
                    f"NodeName={n.name} NodeAddr={n.address} CPUs=2 RealMemory=1000 State=UNKNOWN" for n in nodes
                ),
                names=",".join(n.name for n in nodes),
            )
        )
        # slurmd initialises a cgroup plugin even with linuxproc tracking; confine nothing
        (folder / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\nConstrainCores=no\nConstrainRAMSpace=no\nConstrainDevices=no\n"
            if Path("/sys/fs/cgroup/cpu").is_dir()
            else "CgroupPlugin=autodetect\n"
        )
        # each daemon under its own host name (UTS namespace): slurmctld checks it against SlurmctldHost
        _sh("unshare", "--uts", "sh", "-c", f"hostname epctl && exec slurmctld -f {conf} -i")
        for node in nodes:
            _sh(
                "ip",
                "netns",
                "exec",
                node.ns,
                "unshare",
                "--uts",
                "sh",
                "-c",
                f"hostname {node.name} && exec slurmd -f {conf} -N {node.name}",
            )
        cluster = Cluster(folder, conf, nodes)
        deadline = time.monotonic() + 60
        while True:
            try:
                states = cluster.run("sinfo", "--noheader", "--format=%T %N").split()
            except RuntimeError:
                states = []
            if states[:1] == ["idle"] and len(states) == 2:
                break
            if time.monotonic() > deadline:
                logs = "".join(p.read_text()[-600:] for p in folder.glob("*.log"))
                raise RuntimeError(f"the two slurmd nodes were not idle within 60 s (sinfo: {states}); logs: {logs}")
            time.sleep(0.5)
        yield cluster
    finally:
        _teardown(folder, conf, nodes, bridge)


def _teardown(folder: Path, conf: Path, nodes: list[SlurmNode], bridge: str) -> None:
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=30)
    pids = [folder / f"slurmd-{n.name}.pid" for n in nodes] + [folder / "slurmctld.pid", folder / "munge" / "pid"]
    for pid_file in pids:
        with suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
    # job steps (slurmstepd and what it started) outlive slurmd; stop anything still in the namespaces
    for node in nodes:
        found = subprocess.run(
            ["ip", "netns", "pids", node.ns], capture_output=True, text=True, timeout=10
        ).stdout.split()
        for pid in found:
            with suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", node.ns], capture_output=True, timeout=10)
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=10)
    shutil.rmtree(folder, ignore_errors=True)
