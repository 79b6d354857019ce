"""Inside a LeaderWorkerSet pod (`plan --format k8s`), `python -m launch lws-step STEP` places the deploy file on
the group: the leader (LWS_LEADER_ADDRESS, a DNS name resolved within a bound) is the primary, the pod's
LWS_WORKER_INDEX is its node rank, EP_POD_IP its own address. Then it runs the same preflight / serve as a
hand-started node. Two network namespaces play two pods, each resolving the leader's name through its own
hosts file (what `ip netns exec` mounts), as cluster DNS would.

With prefill/decode, each group's pods run `lws-step serve --group prefill|decode` (one LeaderWorkerSet per group)
and the router's pod runs `lws-step proxy`, reaching the groups' leaders by their Services' names."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import placement
from launch.config import parse_deploy
from tests.conftest import ROOT, run_module
from tests.support import FAKE_VLLM, free_port

LEADER = "vllm-ep-0.vllm-ep.default"
TWO = {"model": "m", "nodes": [{"gpus": 2}, {"gpus": 2}], "vllm_version": "0.26.0"}


def lws_env(index: int, size: int = 2, leader: str = "127.0.0.1", pod_ip: str = "127.0.0.2") -> dict[str, str]:
    return {
        "LWS_WORKER_INDEX": str(index),
        "LWS_GROUP_SIZE": str(size),
        "LWS_LEADER_ADDRESS": leader,
        "EP_POD_IP": pod_ip,
    }


def test_the_leader_is_the_primary_and_the_worker_index_the_rank():
    config = parse_deploy(TWO, "deploy.yaml")
    worker = placement.lws(config, "deploy.yaml", lws_env(1, leader="localhost", pod_ip="10.1.2.3"))
    assert worker.node_rank == 1 and worker.config.nodes[0].address in ("127.0.0.1", "::1")
    assert worker.config.nodes[1].address == "10.1.2.3"
    leader = placement.lws(config, "deploy.yaml", lws_env(0, pod_ip="10.1.2.9"))
    assert leader.node_rank == 0 and leader.config.nodes[0].address == "10.1.2.9"  # its own IP, no DNS needed
    assert leader.describe() == "node 0 of 2 (primary, 10.1.2.9); primary at 10.1.2.9"


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {},
            "LWS_WORKER_INDEX: not set (expected inside a pod of the LeaderWorkerSet that `plan --format k8s` writes)",
        ),
        (
            {**lws_env(1), "EP_POD_IP": ""},
            "EP_POD_IP: not set (expected inside a pod of the LeaderWorkerSet that `plan --format k8s` "
            "writes (env from the downward API: status.podIP))",
        ),
        (
            lws_env(1, size=3),
            "DEPLOY: nodes: 2 nodes but the LeaderWorkerSet group has LWS_GROUP_SIZE=3 (expected "
            "leaderWorkerTemplate.size 2: render with `plan --format k8s`)",
        ),
        (
            {**lws_env(1), "LWS_WORKER_INDEX": "one"},
            "LWS_WORKER_INDEX: 'one' is not a whole number (expected inside a pod of the "
            "LeaderWorkerSet that `plan --format k8s` writes)",
        ),
    ],
)
def test_missing_or_wrong_lws_variables_are_one_line(tmp_path, env, message):
    deploy = tmp_path / "d.yaml"
    deploy.write_text("model: m\nnodes: [{gpus: 2}, {gpus: 2}]\n")
    assert_lws_step_refuses(deploy, ["serve"], env, message)


def test_a_leader_name_that_never_resolves_is_a_node_down_within_the_bound(tmp_path):
    deploy = tmp_path / "d.yaml"
    deploy.write_text("model: m\nnodes: [{gpus: 2}, {gpus: 2}]\n")
    res = run_module(
        "launch",
        "lws-step",
        "serve",
        "--deploy",
        str(deploy),
        "--resolve-timeout",
        "2",
        env=lws_env(1, leader="nothing-here.invalid"),
    )
    assert res.code == 3, res.err
    assert res.err.strip().splitlines()[-1] == (
        "error: LWS_LEADER_ADDRESS: the leader's address nothing-here.invalid (LWS_LEADER_ADDRESS) to resolve not ready within 2 s "
        "(expected the LeaderWorkerSet's headless service in cluster DNS; with hostNetwork the pod needs dnsPolicy: "
        "ClusterFirstWithHostNet)"
    )


def hosts_file(ns: str, text: str) -> Path:
    """`ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts: this pod's view of DNS."""
    folder = Path("/etc/netns") / ns
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts").write_text(text)
    return folder


@pytest.mark.netns
def test_two_pods_place_themselves_run_cross_node_preflight_and_plan(two_hosts, tmp_path):
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(
        "model: tiny-moe\nnodes: [{gpus: 2}, {gpus: 2}]\nrpc_port: 13345\nvllm_version: 0.26.0\n"
        "network: {transport: tcp, socket_ifname: auto}\npreflight: {rendezvous_timeout_s: 30, collective_timeout_s: 60}\n"
    )
    folders = [hosts_file(h.ns, f"127.0.0.1 localhost\n{two_hosts[0].address} {LEADER}\n") for h in two_hosts]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LWS_", "EP_", "GLOO_"))}
    env.update(PYTHONPATH=str(ROOT), EP_PREFLIGHT_BACKEND="gloo")

    def pod(host, index: int, *step: str) -> subprocess.Popen:
        return subprocess.Popen(
            host.cmd(sys.executable, "-m", "launch", "lws-step", step[0], "--deploy", str(deploy), *step[1:]),
            env={**env, **lws_env(index, leader=LEADER, pod_ip=host.address)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    try:
        # the init containers: cross-node preflight, both pods at once
        outs = [
            p.communicate(timeout=120)[0]
            for p in [pod(h, i, "preflight", "--", "-m", "multinode") for i, h in enumerate(two_hosts)]
        ]
        for index, (out, host) in enumerate(zip(outs, two_hosts, strict=True)):
            role = "primary" if index == 0 else "secondary"
            assert (
                f"[launch] LeaderWorkerSet pod: node {index} of 2 ({role}, {host.address}); primary at {two_hosts[0].address}"
                in out
            )
            allreduce = next(ln for ln in out.splitlines() if "all-reduce across nodes" in ln)
            assert allreduce.startswith("PASS") and f"GLOO_SOCKET_IFNAME={host.ifname}" in allreduce, out
            assert "# verdict: READY (10 passed)" in out, out
        # the vllm containers, as a dry run: the secondary's command points at the leader
        out = pod(two_hosts[1], 1, "serve", "--", "--dry-run").communicate(timeout=60)[0]
        assert f"export GLOO_SOCKET_IFNAME={two_hosts[1].ifname}" in out, out
        command = out.strip().splitlines()[-1]
        assert command.startswith("vllm serve tiny-moe ") and "--data-parallel-start-rank 2" in command
        assert f"--data-parallel-address {two_hosts[0].address} --data-parallel-rpc-port 13345 --headless" in command
    finally:
        for folder in folders:
            (folder / "hosts").unlink()
            folder.rmdir()


# ---- prefill/decode: one LeaderWorkerSet per group, the router in a pod of its own ------------------------------
PD = """\
model: tiny-moe
vllm_version: 0.26.0
network: {transport: tcp, socket_ifname: auto}
disaggregation:
  connector: {name: NixlConnector}
  prefill: {nodes: [{gpus: 2}], port: 8100, rpc_port: 13345}
  decode: {nodes: [{gpus: 2}, {gpus: 2}], port: 8200, rpc_port: 13445}
  router: {port: 8000}
"""


def yaml_of(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_a_group_pod_places_itself_in_its_own_group():
    config = parse_deploy(yaml_of(PD), "deploy.yaml")
    worker = placement.lws(config, "deploy.yaml", lws_env(1, leader="localhost", pod_ip="10.1.2.3"), group="decode")
    assert worker.group == "decode" and worker.node_rank == 1
    decode = worker.config.disaggregation.decode.nodes
    assert decode[0].address in ("127.0.0.1", "::1") and decode[1].address == "10.1.2.3"
    assert worker.config.disaggregation.prefill.nodes[0].address is None  # another LeaderWorkerSet's business
    # NIXL's side channel (where decode fetches the KV cache from) is this pod's own address
    assert worker.config.group("decode").nodes[1].env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.1.2.3"
    leader = placement.lws(config, "deploy.yaml", lws_env(0, size=1, pod_ip="10.1.2.9"), group="prefill")
    assert leader.describe() == "prefill node 0 of 1 (primary, 10.1.2.9); primary at 10.1.2.9"


def test_a_groups_pods_agree_on_the_deploy_file_though_each_knows_only_some_addresses():
    """Cross-node preflight compares the deploy file's digest on every pod of a group: the leader knows only its own
    address, a worker the leader's and its own (and NIXL's side-channel host derived from it)."""
    from preflight.rendezvous import deploy_digest

    config = parse_deploy(yaml_of(PD), "deploy.yaml")
    leader = placement.lws(config, "d", lws_env(0, pod_ip="10.1.2.1"), group="decode").config
    worker = placement.lws(config, "d", lws_env(1, leader="10.1.2.1", pod_ip="10.1.2.2"), group="decode").config
    assert deploy_digest(leader.group("decode")) == deploy_digest(worker.group("decode"))
    other = placement.lws(config, "d", lws_env(0, pod_ip="10.1.2.9"), group="decode").config
    assert deploy_digest(other.group("decode")) != deploy_digest(
        leader.group("decode")
    )  # another leader: not one group


def test_the_router_pod_reaches_the_groups_by_their_services():
    config = parse_deploy(yaml_of(PD), "deploy.yaml")
    placed = placement.k8s_router(
        config, "deploy.yaml", {"EP_PREFILL_API": "ds-prefill-api", "EP_DECODE_API": "ds-decode-api"}
    )
    from launch import router

    assert router.argv(placed)[1:6] == [
        "--vllm-pd-disaggregation",
        *("--prefill", "http://ds-prefill-api:8100", "--decode", "http://ds-decode-api:8200"),
    ]


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (
            ["serve"],
            lws_env(0, size=1),
            "DEPLOY: has prefill and decode groups (expected --group prefill or --group decode)",
        ),
        (
            ["serve", "--group", "decode"],
            lws_env(0, size=1),
            "DEPLOY: disaggregation.decode.nodes: 2 nodes but the LeaderWorkerSet group has LWS_GROUP_SIZE=1 "
            "(expected leaderWorkerTemplate.size 2: render with `plan --format k8s`)",
        ),
        (
            ["proxy"],
            {"EP_PREFILL_API": "ds-prefill-api"},
            "EP_DECODE_API: not set (expected inside the router pod that `plan --format k8s` writes for prefill/decode)",
        ),
        (
            ["proxy", "--group", "decode"],
            {"EP_PREFILL_API": "ds-prefill-api", "EP_DECODE_API": "ds-decode-api"},
            "--group decode: not taken by lws-step proxy (expected none: the router fronts both)",
        ),
    ],
)
def test_a_prefill_decode_pod_without_what_it_needs_is_one_line(tmp_path, argv, env, message):
    deploy = tmp_path / "d.yaml"
    deploy.write_text(PD)
    assert_lws_step_refuses(deploy, argv, env, message)


def test_a_decode_worker_is_ready_when_its_groups_leader_answers_on_the_decode_port(tmp_path):
    port = free_port()
    deploy = tmp_path / "d.yaml"
    deploy.write_text(PD.replace("port: 8200", f"port: {port}"))
    server = subprocess.Popen([sys.executable, str(FAKE_VLLM), "--port", str(port)], env={"FAKE_VLLM_DELAY": "0"})
    try:
        deadline = time.monotonic() + 10
        while True:
            res = run_module(
                "launch.pod",
                "ready",
                "--group",
                "decode",
                "--deploy",
                str(deploy),
                env={"LWS_LEADER_ADDRESS": "127.0.0.1"},
            )
            if res.code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert (res.code, res.out) == (0, f"the primary http://127.0.0.1:{port}/health answered 200\n")
    finally:
        server.terminate()
        server.wait(5)
    res = run_module("launch.pod", "ready", "--deploy", str(deploy), env={"LWS_LEADER_ADDRESS": "127.0.0.1"})
    assert res.code == 2 and res.err.strip() == (
        f"error: {deploy}: has prefill and decode groups (expected --group prefill or --group decode)"
    )


def _get(host, url: str) -> int:
    """The HTTP status `url` answers, asked from inside the namespace of ``host``."""
    code = "import urllib.request as u, sys\ntry: print(u.urlopen(sys.argv[1], timeout=3).status)\nexcept Exception: print(0)"
    out = subprocess.run(host.cmd(sys.executable, "-c", code, url), capture_output=True, text=True, timeout=30).stdout
    return int(out.strip() or 0)


def rendered(text: str) -> dict[str, dict]:
    """`plan --format k8s` of ``text``, by object name."""
    from launch.k8s import manifests

    return {o["metadata"]["name"]: o for o in manifests(parse_deploy(yaml_of(text), "deploy.yaml"), text, "d.yaml")}


def containers(obj: dict) -> tuple[dict, ...]:
    """The main container of a LeaderWorkerSet's leader and worker, or of a Deployment's pod."""
    if obj["kind"] == "Deployment":
        return (obj["spec"]["template"]["spec"]["containers"][0],)
    templates = obj["spec"]["leaderWorkerTemplate"]
    return tuple(templates[t]["spec"]["containers"][0] for t in ("leaderTemplate", "workerTemplate"))


@pytest.mark.netns
def test_prefill_decode_pods_and_the_router_pod_serve_behind_the_real_vllm_router(two_hosts, tmp_path):
    """The rendered manifests' own commands, variables and probes, run as pods: node A holds the prefill leader and
    the decode leader (host network: two groups' pods on one node, on their own ports), node B the decode worker
    and the router's pod. Each pod has a private /dev/shm (as an emptyDir gives it) with a segment a previous run
    left. `vllm serve` is a stand-in that answers /health; vllm-router is the real one, started by the router pod's
    `lws-step proxy` once both groups answer through their Services' names."""
    router = shutil.which("vllm-router", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    if not router:
        if os.environ.get("EP_REQUIRE_VLLM") == "1":
            pytest.fail("vllm-router is not installed (pip install vllm-router)")
        pytest.skip("vllm-router is not installed (pip install vllm-router)")
    a, b = two_hosts
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_VLLM} "$@"\n')
    (bin_dir / "vllm").chmod(0o755)
    text = PD + "kubernetes: {name: ds, image: registry.example.com/vllm-ep:0.26.0}\n"
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(text)
    objects = rendered(text)
    (prefill_leader, _), (decode_leader, decode_worker) = (
        containers(objects["ds-prefill"]),
        containers(objects["ds-decode"]),
    )
    (router_pod,) = containers(objects["ds-router"])
    services = {e["name"]: e["value"] for e in router_pod["env"]}
    assert set(services.values()) == {"ds-prefill-api", "ds-decode-api"} and set(services.values()) <= set(objects)
    # cluster DNS as each pod sees it: the leaders' names (LWS_LEADER_ADDRESS) and the groups' Services, on node A
    leaders = {"prefill": "ds-prefill-0.ds-prefill.default", "decode": "ds-decode-0.ds-decode.default"}
    names = f"127.0.0.1 localhost\n{a.address} {' '.join(leaders.values())} {' '.join(services.values())}\n"
    folders = [hosts_file(h.ns, names) for h in two_hosts]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LWS_", "EP_", "GLOO_"))}
    path = os.pathsep.join([str(bin_dir), str(Path(router).parent), env["PATH"]])
    env.update(PYTHONPATH=str(ROOT), PATH=path, FAKE_VLLM_HOST="0.0.0.0", FAKE_VLLM_DELAY="1")

    def here(command: list[str]) -> list[str]:
        """A rendered command as this machine runs it: this Python, the deploy file where the test wrote it."""
        assert command[0] == "python"
        return [sys.executable, *(str(deploy) if w == "/etc/vllm-ep/deploy.yaml" else w for w in command[1:])]

    def pod(host, container: dict, extra_env: dict[str, str], *more: str) -> subprocess.Popen:
        """A container: its own /dev/shm (left-over segment included), then its command."""
        shell = 'mount -t tmpfs shm /dev/shm && touch /dev/shm/nccl-left-over && exec "$@"'
        rendered_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        return subprocess.Popen(
            host.cmd("unshare", "--mount", "sh", "-c", shell, "pod", *here(container["command"]), *more),
            env={**env, **rendered_env, **extra_env},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def probe(host, container: dict, kind: str, extra_env: dict[str, str]) -> int:
        """A rendered probe, asked as the kubelet would: exec in the container, or GET on the pod's address."""
        spec = container[kind]
        if "exec" in spec:
            argv = host.cmd(*here(spec["exec"]["command"]))
            return subprocess.run(argv, env={**env, **extra_env}, capture_output=True, timeout=30).returncode
        port = container["ports"][0]["containerPort"]
        return 0 if _get(a if host is b else b, f"http://{host.address}:{port}{spec['httpGet']['path']}") == 200 else 1

    decode_env = lws_env(1, leader=leaders["decode"], pod_ip=b.address)
    pods: dict[str, subprocess.Popen] = {}
    try:
        assert probe(b, decode_worker, "readinessProbe", decode_env) == 1  # no decode leader serves yet
        pods["prefill leader"] = pod(a, prefill_leader, lws_env(0, size=1, leader=leaders["prefill"], pod_ip=a.address))
        pods["decode leader"] = pod(a, decode_leader, lws_env(0, leader=leaders["decode"], pod_ip=a.address))
        pods["router"] = pod(b, router_pod, {})
        # the decode worker, as a dry run: placed in its group, pointing at its leader, NIXL on its own address
        out = pod(b, decode_worker, decode_env, "--", "--dry-run").communicate(timeout=60)[0]
        assert f"decode node 1 of 2 (secondary, {b.address}); primary at {a.address}" in out, out
        assert f"export VLLM_NIXL_SIDE_CHANNEL_HOST={b.address}" in out, out
        command = out.strip().splitlines()[-1]
        assert f"--data-parallel-address {a.address} --data-parallel-rpc-port 13445 --headless" in command, out
        assert "/dev/shm" not in out  # a dry run leaves /dev/shm alone
        # the router's readiness probe passes once both groups serve, asked from the other node
        deadline = time.monotonic() + 90
        while probe(b, router_pod, "readinessProbe", {}) != 0:
            dead = [name for name, p in pods.items() if p.poll() is not None]
            assert not dead and time.monotonic() < deadline, {n: pods[n].communicate()[0] for n in dead}
            time.sleep(0.5)
        assert probe(b, router_pod, "livenessProbe", {}) == 0
        # vllm-router's Prometheus endpoint, where the pod's annotations point, answers a scraper on another node
        metrics = next(p["containerPort"] for p in router_pod["ports"] if p["name"] == "metrics")
        assert _get(a, f"http://{b.address}:{metrics}/metrics") == 200
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe(a, decode_leader, kind, {}) == 0, kind
        # the decode worker is ready (and through its start-up) once its group's leader serves
        assert (
            probe(b, decode_worker, "startupProbe", decode_env)
            == probe(b, decode_worker, "readinessProbe", decode_env)
            == 0
        )
    finally:
        for p in pods.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # what the kubelet sends a container
        outs = {name: p.communicate(timeout=60)[0] for name, p in pods.items()}
        for folder in folders:
            (folder / "hosts").unlink()
            folder.rmdir()
    for name in ("prefill leader", "decode leader"):
        assert "[launch] /dev/shm: 1 entries left by an earlier run removed" in outs[name], outs[name]
    assert f"prefill node 0 of 1 (primary, {a.address})" in outs["prefill leader"]
    assert "--port 8100" in outs["prefill leader"] and "--port 8200" in outs["decode leader"]
    router_out = outs["router"]
    assert "[launch] router pod: prefill at ds-prefill-api, decode at ds-decode-api" in router_out, router_out
    assert "[launch] prefill is healthy at http://ds-prefill-api:8100/health" in router_out, router_out
    assert "[launch] decode is healthy at http://ds-decode-api:8200/health" in router_out, router_out
    for host in two_hosts:  # every pod stopped what it started
        left = subprocess.run(["ip", "netns", "pids", host.ns], capture_output=True, text=True).stdout.split()
        assert left == [], (left, outs)


@pytest.mark.netns
def test_a_groups_two_pods_run_cross_node_preflight_within_their_group(two_hosts, tmp_path):
    """The decode LeaderWorkerSet's init containers: its leader and its worker meet at the leader's address, each
    checking the cross-node collectives on its own interface; prefill is not part of it."""
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(PD + "preflight: {rendezvous_timeout_s: 30, collective_timeout_s: 60}\n")
    leader = "ds-decode-0.ds-decode.default"
    folders = [hosts_file(h.ns, f"127.0.0.1 localhost\n{two_hosts[0].address} {leader}\n") for h in two_hosts]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LWS_", "EP_", "GLOO_"))}
    env.update(PYTHONPATH=str(ROOT), EP_PREFLIGHT_BACKEND="gloo")
    try:
        pods = [
            subprocess.Popen(
                host.cmd(
                    sys.executable,
                    "-m",
                    "launch",
                    "lws-step",
                    "preflight",
                    "--group",
                    "decode",
                    "--deploy",
                    str(deploy),
                    "--",
                    "-m",
                    "multinode",
                ),
                env={**env, **lws_env(index, leader=leader, pod_ip=host.address)},
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for index, host in enumerate(two_hosts)
        ]
        outs = [p.communicate(timeout=120)[0] for p in pods]
    finally:
        for folder in folders:
            (folder / "hosts").unlink()
            folder.rmdir()
    for index, (out, host) in enumerate(zip(outs, two_hosts, strict=True)):
        role = "primary" if index == 0 else "secondary"
        assert f"decode node {index} of 2 ({role}, {host.address}); primary at {two_hosts[0].address}" in out, out
        allreduce = next(ln for ln in out.splitlines() if "all-reduce across nodes" in ln)
        assert allreduce.startswith("PASS") and f"GLOO_SOCKET_IFNAME={host.ifname}" in allreduce, out
        assert "# verdict: READY" in out, out


def assert_lws_step_refuses(deploy, argv: list[str], env: dict[str, str], message: str) -> None:
    """`lws-step ARGV` in a pod whose LWS variables are ``env``: exit 2 and one line, DEPLOY standing for the file."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LWS_", "EP_"))}
    res = subprocess.run(
        [sys.executable, "-m", "launch", "lws-step", *argv, "--deploy", str(deploy)],
        capture_output=True,
        text=True,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"error: {message.replace('DEPLOY', str(deploy))}"
    ]
