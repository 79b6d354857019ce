"""`plan --format k8s`: a deploy file becomes a ConfigMap (the deploy file itself), a LeaderWorkerSet (leader =
the primary, workers = the secondaries) and a Service for the API. Every rendered object is checked against the
real schemas: Kubernetes' own (strict, from kubernetes-validate) and the LeaderWorkerSet CRD's (tests/fixtures/lws)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from launch.config import ConfigError, load_deploy, parse_deploy
from launch.k8s import manifests

K8S_VERSION = "1.37.0"
SCHEMAS = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
LWS_SCHEMA = yaml.safe_load((Path(__file__).parent / "fixtures" / "lws" / "leaderworkerset-v1.schema.yaml").read_text())


def _schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


POD_TEMPLATE_SCHEMA = _schema("podtemplatespec-v1.json")
# Both schemas name themselves ($id); the pod template's $refs and the LWS fixture's point into these two.
REGISTRY = Registry().with_resources(
    (schema["$id"], Resource.from_contents(schema)) for schema in (POD_TEMPLATE_SCHEMA, _schema("_definitions.json"))
)

TWO_NODES = """\
model: deepseek-ai/DeepSeek-V3-0324
nodes:
  - {gpus: 8}
  - {gpus: 8}
kubernetes:
  image: registry.example.com/vllm-ep:0.26.0
  rdma_resources: {rdma/ib: 1}
"""

EP_NODES = TWO_NODES.replace("  - {gpus: 8}\n  - {gpus: 8}\n", "  - {gpus: 4}\n  - {gpus: 8}\n  - {gpus: 8}\n")


def render(text: str = TWO_NODES, source: str = "deploy.yaml") -> list[dict]:
    return manifests(parse_deploy(yaml.safe_load(text), source), text, source)


def validate_pod_template(template: dict) -> None:
    jsonschema.Draft202012Validator(POD_TEMPLATE_SCHEMA, registry=REGISTRY).validate(template)


def validate_lws(lws: dict) -> None:
    jsonschema.Draft202012Validator(LWS_SCHEMA, registry=REGISTRY).validate(lws)


def validate_all(objects: list[dict]) -> None:
    """Kubernetes' own kinds against its strict schemas; a LeaderWorkerSet against the CRD's, and its two pod
    templates against Kubernetes' PodTemplateSpec."""
    for obj in objects:
        if obj["kind"] != "LeaderWorkerSet":
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            continue
        validate_lws(obj)
        templates = obj["spec"]["leaderWorkerTemplate"]
        validate_pod_template(templates["leaderTemplate"])
        validate_pod_template(templates["workerTemplate"])


def leader_and_worker(objects: list[dict]) -> tuple[dict, dict]:
    templates = objects[1]["spec"]["leaderWorkerTemplate"]
    return templates["leaderTemplate"]["spec"], templates["workerTemplate"]["spec"]


def test_the_lws_fixture_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(LWS_SCHEMA)


def test_two_node_deploy_renders_configmap_lws_and_service_that_kubernetes_accepts():
    objects = render()
    assert [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("v1", "ConfigMap", "vllm-ep-deploy"),
        ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "vllm-ep"),
        ("v1", "Service", "vllm-ep-api"),
    ]
    validate_all(objects)
    for obj in objects:
        assert obj["metadata"]["labels"] == {
            "app.kubernetes.io/name": "vllm-ep",
            "app.kubernetes.io/instance": "vllm-ep",
        }
        assert "namespace" not in obj["metadata"]
    lws = objects[1]["spec"]
    assert (lws["replicas"], lws["startupPolicy"]) == (1, "LeaderCreated")
    assert lws["leaderWorkerTemplate"]["size"] == 2
    assert lws["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    # the manifests survive a YAML round trip unchanged (what `kubectl apply -f` reads)
    assert list(yaml.safe_load_all(yaml.safe_dump_all(objects))) == objects


def test_leader_is_the_primary_and_workers_the_secondaries():
    objects = render(EP_NODES)
    validate_all(objects)
    assert objects[1]["spec"]["leaderWorkerTemplate"]["size"] == 3
    leader, worker = leader_and_worker(objects)
    assert leader["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4  # nodes[0]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8  # nodes[1] and nodes[2]
    # the API port lives on the leader only; the Service selects the leader pod by LWS' own labels
    (vllm,) = leader["containers"]
    assert vllm["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert "ports" not in worker["containers"][0]
    service = objects[2]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"] == {
        "leaderworkerset.sigs.k8s.io/name": "vllm-ep",
        "leaderworkerset.sigs.k8s.io/worker-index": "0",
    }
    assert service["ports"] == [{"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"}]


def test_ep_settings_host_network_ipc_lock_shm_gpus():
    leader, worker = leader_and_worker(render(TWO_NODES + "  shm_size: 128Gi\n"))
    for spec in (leader, worker):
        assert spec["hostNetwork"] is True
        assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"  # LWS_LEADER_ADDRESS is a cluster DNS name
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "128Gi"}} in spec["volumes"]
        for container in spec["initContainers"] + spec["containers"]:
            assert container["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
            assert (
                container["resources"]["limits"]
                == container["resources"]["requests"]
                == {"nvidia.com/gpu": 8, "rdma/ib": 1}
            )
            assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_without_host_network_the_pods_keep_the_cluster_dns_policy():
    objects = render(TWO_NODES + "  host_network: false\n")
    validate_all(objects)
    for spec in leader_and_worker(objects):
        assert spec["hostNetwork"] is False
        assert "dnsPolicy" not in spec


def test_the_deploy_file_travels_in_the_configmap_verbatim(write_yaml):
    text = (
        "# comments, order and spacing stay as written\n" + TWO_NODES + "env:   {VLLM_LOGGING_LEVEL: DEBUG}  # kept\n"
    )
    path = write_yaml(text)
    objects = manifests(load_deploy(path), path.read_text(), str(path))
    assert objects[0]["data"] == {"deploy.yaml": text}
    for spec in leader_and_worker(objects):
        assert {"name": "deploy", "configMap": {"name": "vllm-ep-deploy"}} in spec["volumes"]
        for container in spec["initContainers"] + spec["containers"]:
            assert {"name": "deploy", "mountPath": "/etc/vllm-ep", "readOnly": True} in container["volumeMounts"]
            assert container["command"][-2:] == ["--deploy", "/etc/vllm-ep/deploy.yaml"]


def test_every_pod_runs_lws_step_with_its_pod_ip_and_preflight_first():
    leader, worker = leader_and_worker(
        render(TWO_NODES + "  python: pixi run --frozen --manifest-path '/opt/ep dir/pixi.toml' python\n")
    )
    python = ["pixi", "run", "--frozen", "--manifest-path", "/opt/ep dir/pixi.toml", "python"]
    for spec in (leader, worker):
        (preflight,), (vllm,) = spec["initContainers"], spec["containers"]
        assert (preflight["name"], vllm["name"]) == ("preflight", "vllm")
        assert preflight["image"] == vllm["image"] == "registry.example.com/vllm-ep:0.26.0"
        assert preflight["command"] == [
            *python,
            "-m",
            "launch",
            "lws-step",
            "preflight",
            "--deploy",
            "/etc/vllm-ep/deploy.yaml",
        ]
        assert vllm["command"] == [*python, "-m", "launch", "lws-step", "serve", "--deploy", "/etc/vllm-ep/deploy.yaml"]
        for container in (preflight, vllm):
            assert container["env"] == [
                {"name": "EP_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "VLLM_ENGINE_READY_TIMEOUT_S", "value": "3000"},
            ]
    without = leader_and_worker(render(TWO_NODES + "  preflight: false\n"))
    assert all("initContainers" not in spec for spec in without)


def test_namespace_node_selector_service_account_and_model_cache():
    text = TWO_NODES + (
        "  name: ds-v3\n  namespace: inference\n  node_selector: {nvidia.com/gpu.product: NVIDIA-H200}\n"
        "  service_account: vllm\n  model_cache: /mnt/hf\n  restart_policy: Default\n"
    )
    objects = render(text)
    validate_all(objects)
    assert [o["metadata"]["name"] for o in objects] == ["ds-v3-deploy", "ds-v3", "ds-v3-api"]
    assert {o["metadata"]["namespace"] for o in objects} == {"inference"}
    assert objects[1]["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "Default"
    assert objects[2]["spec"]["selector"]["leaderworkerset.sigs.k8s.io/name"] == "ds-v3"
    for spec in leader_and_worker(objects):
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
        assert spec["serviceAccountName"] == "vllm"
        assert {"name": "deploy", "configMap": {"name": "ds-v3-deploy"}} in spec["volumes"]
        assert {"name": "model-cache", "hostPath": {"path": "/mnt/hf", "type": "DirectoryOrCreate"}} in spec["volumes"]
        for container in spec["initContainers"] + spec["containers"]:
            assert {"name": "model-cache", "mountPath": "/mnt/hf"} in container["volumeMounts"]
            assert {"name": "HF_HOME", "value": "/mnt/hf"} in container["env"]


def test_a_single_node_group_uses_the_leader_template_for_its_workers():
    objects = render(TWO_NODES.replace("  - {gpus: 8}\n  - {gpus: 8}\n", "  - {gpus: 8}\n"))
    validate_all(objects)
    templates = objects[1]["spec"]["leaderWorkerTemplate"]
    assert templates["size"] == 1
    assert templates["workerTemplate"] == templates["leaderTemplate"]
    assert templates["workerTemplate"] is not templates["leaderTemplate"]


def test_per_node_env_and_interfaces_are_left_to_run_time():
    text = TWO_NODES.replace(
        "  - {gpus: 8}\n  - {gpus: 8}\n",
        "  - {gpus: 8, socket_ifname: eth0, env: {A: '1'}}\n  - {address: 10.0.0.2, gpus: 8, socket_ifname: ens7}\n",
    )
    objects = render(text)
    validate_all(objects)
    assert "10.0.0.2" not in json.dumps(objects[1:])  # the scheduler places the pods, not the deploy file


def _set(*path, value):
    """A mutation of the rendered objects: the object's index (0 ConfigMap, 1 LWS, 2 Service), keys, the new value."""

    def mutate(objects: list[dict]) -> None:
        node = objects
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


LEADER = (1, "spec", "leaderWorkerTemplate", "leaderTemplate")
WORKER = (1, "spec", "leaderWorkerTemplate", "workerTemplate")
WRONG = {
    "unknown LWS field": _set(1, "spec", "leaderWorkerTemplate", "sizee", value=2),
    "LWS size as a string": _set(1, "spec", "leaderWorkerTemplate", "size", value="2"),
    "LWS restart policy not in the enum": _set(1, "spec", "leaderWorkerTemplate", "restartPolicy", value="Always"),
    "LWS startup policy not in the enum": _set(1, "spec", "startupPolicy", value="WhenReady"),
    "unknown container field in a template": _set(*LEADER, "spec", "containers", 0, "imagePullPolicyy", value="Always"),
    "unknown template metadata field": _set(*LEADER, "metadata", "uid", value="x"),
    "host network as a string": _set(*WORKER, "spec", "hostNetwork", value="true"),
    "command as a string": _set(*WORKER, "spec", "containers", 0, "command", value="python -m launch"),
    "memory-backed volume with a size that is no quantity": _set(
        *WORKER, "spec", "volumes", 1, "emptyDir", "sizeLimit", value=[64]
    ),
    "service port as a string": _set(2, "spec", "ports", 0, "port", value="8000"),
    "unknown service field": _set(2, "spec", "clusterIPP", value="None"),
    "configmap value that is no string": _set(0, "data", "deploy.yaml", value=1),
}


@pytest.mark.parametrize("name", list(WRONG))
def test_a_wrong_field_would_be_caught_by_the_schemas(name):
    objects = render()
    validate_all(objects)
    WRONG[name](objects)
    with pytest.raises(jsonschema.ValidationError):
        validate_all(objects)


BAD = {
    "missing image": (
        TWO_NODES.replace("  image: registry.example.com/vllm-ep:0.26.0\n", ""),
        "deploy.yaml: kubernetes.image: missing (required for --format k8s: the image with the toolkit and its stack)",
    ),
    "workers with different GPU counts": (
        EP_NODES.replace(
            "  - {gpus: 4}\n  - {gpus: 8}\n  - {gpus: 8}\n", "  - {gpus: 8}\n  - {gpus: 8}\n  - {gpus: 4}\n"
        ),
        "deploy.yaml: nodes[2].gpus: 4 differs from nodes[1].gpus 8 (expected one GPU count for all secondaries: "
        "LeaderWorkerSet workers share a pod template)",
    ),
    "relative model cache": (
        TWO_NODES + "  model_cache: hf\n",
        "deploy.yaml: kubernetes.model_cache: 'hf' is not an absolute path",
    ),
    "empty python": (
        TWO_NODES + "  python: ' '\n",
        "deploy.yaml: kubernetes.python: empty (expected how to run Python",
    ),
    "python that does not split": (
        TWO_NODES + '  python: "pixi run \'python"\n',
        'deploy.yaml: kubernetes.python: "pixi run \'python" does not split',
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused_in_one_line(name):
    text, expected = BAD[name]
    with pytest.raises(ConfigError) as caught:
        render(text)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(expected), message


def test_the_example_renders_through_the_cli_into_manifests_kubernetes_accepts(tmp_path):
    """docs/examples/k8s-2node.yaml as users run it: `plan --format k8s --out FILE`, then read back as kubectl would."""
    from tests.conftest import EXAMPLES, run_module

    out = tmp_path / "vllm-ep.yaml"
    res = run_module("launch", "plan", str(EXAMPLES / "k8s-2node.yaml"), "--format", "k8s", "--out", str(out))
    assert res.code == 0, res.err
    objects = list(yaml.safe_load_all(out.read_text()))
    validate_all(objects)
    assert [o["kind"] for o in objects] == ["ConfigMap", "LeaderWorkerSet", "Service"]
    assert objects[0]["data"]["deploy.yaml"] == (EXAMPLES / "k8s-2node.yaml").read_text()
    assert "  deploy.yaml: |\n" in out.read_text()  # the deploy file stays readable in the manifest
    assert objects[1]["spec"]["leaderWorkerTemplate"]["size"] == 2


def test_guaranteed_resources_secrets_annotations_tolerations_and_grace_pass_the_schemas():
    text = (
        TWO_NODES
        + """\
  cpu: "96"
  memory: 1500Gi
  env_from_secret: hf-token
  pod_annotations: {k8s.v1.cni.cncf.io/networks: rdma-net}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  preflight_args: [-k, "not model"]
  termination_grace_s: 180
"""
    )
    objects = render(text)
    validate_all(objects)
    template = objects[1]["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    spec, (vllm,), (preflight,) = template["spec"], template["spec"]["containers"], template["spec"]["initContainers"]
    # requests == limits for cpu and memory: the pod is Guaranteed, not the first to be evicted
    assert (
        vllm["resources"]["requests"]
        == vllm["resources"]["limits"]
        == {"nvidia.com/gpu": 8, "rdma/ib": 1, "cpu": "96", "memory": "1500Gi"}
    )
    assert vllm["envFrom"] == preflight["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert template["metadata"]["annotations"] == {"k8s.v1.cni.cncf.io/networks": "rdma-net"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["terminationGracePeriodSeconds"] == 180
    assert preflight["command"][-4:] == ["/etc/vllm-ep/deploy.yaml", "--", "-k", "not model"]


def test_a_secret_in_the_deploy_file_stays_out_of_the_configmap(tmp_path):
    from tests.conftest import run_module

    deploy = tmp_path / "d.yaml"
    deploy.write_text(TWO_NODES + "env: {HF_TOKEN: hf_x}\n")
    res = run_module("launch", "plan", str(deploy), "--format", "k8s")
    assert (
        res.code == 2
        and res.out == ""
        and res.err.strip().splitlines()
        == [
            f"error: {deploy}: env.HF_TOKEN: a secret would be written into a ConfigMap (expected it out of the deploy file: "
            "a Kubernetes Secret named in kubernetes.env_from_secret)"
        ]
    )


def test_every_pod_has_startup_readiness_and_liveness_probes():
    objects = render(EP_NODES + "  startup_timeout_s: 2700\n")
    validate_all(objects)
    leader, worker = (spec["containers"][0] for spec in leader_and_worker(objects))
    for container in (leader, worker):
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 2700  # loading and compiling take minutes
        assert container["readinessProbe"]["failureThreshold"] == 3
        assert container["livenessProbe"]["periodSeconds"] * container["livenessProbe"]["failureThreshold"] == 60
    # The leader is vLLM's API server: its own /health answers all three.
    assert (
        leader["startupProbe"]["httpGet"] == leader["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    )
    # A worker runs vLLM headless, with no port: ready when its group's primary serves, live while its vLLM runs.
    assert worker["readinessProbe"]["exec"]["command"] == [
        "python",
        "-m",
        "launch.pod",
        "ready",
        "--deploy",
        "/etc/vllm-ep/deploy.yaml",
        "--timeout",
        "5",
    ]
    assert worker["startupProbe"]["exec"] == worker["readinessProbe"]["exec"]
    assert worker["livenessProbe"]["exec"]["command"] == ["python", "-m", "launch.pod", "live"]


def test_jit_caches_survive_restarts_on_a_host_path():
    objects = render(TWO_NODES + "  jit_cache: /var/lib/vllm-ep-jit\n")
    validate_all(objects)
    for spec in leader_and_worker(objects):
        (vllm,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in vllm["env"]}
        assert env["VLLM_CACHE_ROOT"] == "/var/cache/vllm-ep/vllm"
        assert env["EP_JIT_CACHE_DIR"] == "/var/cache/vllm-ep/deep_ep"  # DeepEP v2 compiles its kernels at run time
        assert env["DG_JIT_CACHE_DIR"] == "/var/cache/vllm-ep/deep_gemm"
        assert {"FLASHINFER_WORKSPACE_BASE", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"} <= set(env)
        assert {"name": "jit-cache", "mountPath": "/var/cache/vllm-ep"} in vllm["volumeMounts"]
        assert {"name": "jit-cache", "hostPath": {"path": "/var/lib/vllm-ep-jit", "type": "DirectoryOrCreate"}} in spec[
            "volumes"
        ]
    with pytest.raises(ConfigError, match="kubernetes.jit_cache: 'cache' is not an absolute path"):
        render(TWO_NODES + "  jit_cache: cache\n")


def test_the_leader_is_annotated_for_prometheus_and_the_engine_bound_is_configurable():
    objects = render(TWO_NODES.replace("kubernetes:", "engine_ready_timeout_s: 5400\nkubernetes:"))
    validate_all(objects)
    templates = objects[1]["spec"]["leaderWorkerTemplate"]
    assert templates["leaderTemplate"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8000",
        "prometheus.io/path": "/metrics",
    }
    assert "annotations" not in templates["workerTemplate"]["metadata"]
    leader, _ = leader_and_worker(objects)
    assert {"name": "VLLM_ENGINE_READY_TIMEOUT_S", "value": "5400"} in leader["containers"][0]["env"]
    plain = render(TWO_NODES + "  metrics_annotations: false\n")[1]["spec"]["leaderWorkerTemplate"]
    assert "annotations" not in plain["leaderTemplate"]["metadata"]
    # without the field, the pods raise vLLM's 600 s to llm-d's 3,000 s, inside the start-up probes' budget
    leader, _ = leader_and_worker(render(TWO_NODES))
    assert {"name": "VLLM_ENGINE_READY_TIMEOUT_S", "value": "3000"} in leader["containers"][0]["env"]


# ---- prefill/decode -------------------------------------------------------------------------------------------
PD = """\
model: deepseek-ai/DeepSeek-V3-0324
disaggregation:
  connector: {name: NixlConnector}
  prefill:
    nodes: [{gpus: 8}, {gpus: 8}]
    all2all_backend: deepep_high_throughput
    port: 8100
    rpc_port: 13345
  decode:
    nodes: [{gpus: 4}, {gpus: 8}, {gpus: 8}]
    all2all_backend: deepep_low_latency
    port: 8200
    rpc_port: 13445
  router: {port: 8000}
kubernetes:
  name: ds
  image: registry.example.com/vllm-ep:0.26.0
  rdma_resources: {rdma/ib: 1}
  jit_cache: /var/lib/vllm-ep-jit
"""


def by_name(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects}


def test_prefill_decode_renders_two_leaderworkersets_and_the_router_that_kubernetes_accepts():
    objects = render(PD)
    validate_all(objects)
    assert [(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("v1", "ConfigMap", "ds-deploy"),
        ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "ds-prefill"),
        ("v1", "Service", "ds-prefill-api"),
        ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", "ds-decode"),
        ("v1", "Service", "ds-decode-api"),
        ("apps/v1", "Deployment", "ds-router"),
        ("v1", "Service", "ds-api"),
    ]
    named = by_name(objects)
    assert named["ds-prefill"]["spec"]["leaderWorkerTemplate"]["size"] == 2
    assert named["ds-decode"]["spec"]["leaderWorkerTemplate"]["size"] == 3
    # the manifests survive a YAML round trip unchanged (what `kubectl apply -f` reads)
    assert list(yaml.safe_load_all(yaml.safe_dump_all(objects))) == objects


def test_each_group_runs_lws_step_with_its_group_and_keeps_the_production_settings():
    objects = by_name(render(PD))
    for group, port, gpus in (("prefill", 8100, (8, 8)), ("decode", 8200, (4, 8))):
        lws = objects[f"ds-{group}"]["spec"]["leaderWorkerTemplate"]
        assert lws["restartPolicy"] == "RecreateGroupOnPodRestart"
        for template, want_gpus in zip((lws["leaderTemplate"], lws["workerTemplate"]), gpus, strict=True):
            spec = template["spec"]
            (vllm,), (preflight,) = spec["containers"], spec["initContainers"]
            assert vllm["command"] == [
                *("python", "-m", "launch", "lws-step", "serve"),
                *("--group", group, "--deploy", "/etc/vllm-ep/deploy.yaml"),
            ]
            assert preflight["command"][4:7] == ["preflight", "--group", group]
            assert vllm["resources"]["limits"] == {"nvidia.com/gpu": want_gpus, "rdma/ib": 1}
            assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
            assert vllm["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
            assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in spec["volumes"]
            assert {"name": "jit-cache", "mountPath": "/var/cache/vllm-ep"} in vllm["volumeMounts"]
            env = {e["name"]: e.get("value") for e in vllm["env"]}
            assert (
                env["VLLM_ENGINE_READY_TIMEOUT_S"] == "3000" and env["EP_JIT_CACHE_DIR"] == "/var/cache/vllm-ep/deep_ep"
            )
            assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(vllm)
        leader, worker = lws["leaderTemplate"], lws["workerTemplate"]
        (lead,), (work,) = leader["spec"]["containers"], worker["spec"]["containers"]
        # the leader serves the group's API on the group's port, probed and scraped there
        assert lead["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        assert lead["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert leader["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        # a worker asks its own group's leader (the group's port) whether it serves
        assert work["readinessProbe"]["exec"]["command"] == [
            *("python", "-m", "launch.pod", "ready", "--group", group),
            *("--deploy", "/etc/vllm-ep/deploy.yaml", "--timeout", "5"),
        ]
        assert work["livenessProbe"]["exec"]["command"] == ["python", "-m", "launch.pod", "live"]
        # the Service the router reaches the group by: that LeaderWorkerSet's leader, on the group's port
        service = objects[f"ds-{group}-api"]["spec"]
        assert service["selector"] == {
            "leaderworkerset.sigs.k8s.io/name": f"ds-{group}",
            "leaderworkerset.sigs.k8s.io/worker-index": "0",
        }
        assert service["ports"] == [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}]


def test_the_router_pod_runs_lws_step_proxy_toward_the_groups_services():
    objects = by_name(render(PD + "  startup_timeout_s: 2700\n  env_from_secret: hf-token\n"))
    deployment, service = objects["ds-router"], objects["ds-api"]
    template = deployment["spec"]["template"]
    (router,) = template["spec"]["containers"]
    assert router["command"] == [
        *("python", "-m", "launch", "lws-step", "proxy", "--deploy", "/etc/vllm-ep/deploy.yaml"),
        *("--", "--wait-for-groups", "2700"),  # as long as the groups' own start-up probes allow
    ]
    # the variables name the Services rendered in front of each group's leader
    assert router["env"] == [
        {"name": "EP_PREFILL_API", "value": "ds-prefill-api"},
        {"name": "EP_DECODE_API", "value": "ds-decode-api"},
    ]
    assert {"ds-prefill-api", "ds-decode-api"} <= set(objects)
    assert router["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert router["ports"] == [
        {"name": "http", "containerPort": 8000, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 29000, "protocol": "TCP"},  # vllm-router's Prometheus endpoint
    ]
    assert template["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "29000",
        "prometheus.io/path": "/metrics",
    }
    # vllm-router answers /liveness and /readiness on its own port once both groups answered /health
    startup = router["startupProbe"]
    assert startup["httpGet"] == router["livenessProbe"]["httpGet"] == {"path": "/liveness", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] > 2700
    assert router["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": "http"}
    # no GPU, RDMA or host network: it forwards HTTP
    assert "resources" not in router and "hostNetwork" not in template["spec"]
    # the API Service selects exactly the router's pods
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    assert labels["app.kubernetes.io/component"] == "router"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": 8000, "protocol": "TCP"},
        {"name": "metrics", "port": 29000, "targetPort": 29000, "protocol": "TCP"},  # for a ServiceMonitor
    ]


def test_the_router_without_a_metrics_port_keeps_vllm_routers_own_default():
    objects = by_name(render(PD.replace("router: {port: 8000}", "router: {port: 8000, metrics_port: null}")))
    template = objects["ds-router"]["spec"]["template"]
    assert [p["name"] for p in template["spec"]["containers"][0]["ports"]] == ["http"]
    assert "annotations" not in template["metadata"]


PD_WRONG = {
    "unknown Deployment field": _set(5, "spec", "replicass", value=1),
    "router container port as a string": _set(
        5, "spec", "template", "spec", "containers", 0, "ports", 0, "containerPort", value="8000"
    ),
    "decode LWS size as a string": _set(3, "spec", "leaderWorkerTemplate", "size", value="3"),
    "unknown field in the decode worker's container": _set(
        3, "spec", "leaderWorkerTemplate", "workerTemplate", "spec", "containers", 0, "portss", value=[]
    ),
}


@pytest.mark.parametrize("name", list(PD_WRONG))
def test_a_wrong_prefill_decode_field_would_be_caught_by_the_schemas(name):
    objects = render(PD)
    validate_all(objects)
    PD_WRONG[name](objects)
    with pytest.raises(jsonschema.ValidationError):
        validate_all(objects)


PD_BAD = {
    "decode workers with different GPU counts": (
        PD.replace("[{gpus: 4}, {gpus: 8}, {gpus: 8}]", "[{gpus: 8}, {gpus: 8}, {gpus: 4}]"),
        "deploy.yaml: disaggregation.decode.nodes[2].gpus: 4 differs from disaggregation.decode.nodes[1].gpus 8 "
        "(expected one GPU count for all secondaries: LeaderWorkerSet workers share a pod template)",
    ),
    "one port for both groups on the host network": (
        PD.replace("port: 8200", "port: 8100"),
        "deploy.yaml: disaggregation.decode.port: 8100 is also the prefill port (expected another port with "
        "kubernetes.host_network: a prefill and a decode pod may share a node)",
    ),
    "one rpc_port for both groups on the host network": (
        PD.replace("rpc_port: 13445", "rpc_port: 13345"),
        "deploy.yaml: disaggregation.decode.rpc_port: 13345 is also the prefill rpc_port",
    ),
    "a router that listens on loopback": (
        PD.replace("router: {port: 8000}", "router: {port: 8000, host: 127.0.0.1}"),
        "deploy.yaml: disaggregation.router.host: '127.0.0.1' (expected 0.0.0.0 or :: with --format k8s",
    ),
}


@pytest.mark.parametrize("name", list(PD_BAD))
def test_prefill_decode_that_cannot_run_as_pods_is_refused_in_one_line(name):
    text, expected = PD_BAD[name]
    with pytest.raises(ConfigError) as caught:
        render(text)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(expected), caught.value


def test_off_the_host_network_the_groups_may_share_port_numbers():
    objects = render(PD.replace("rpc_port: 13445", "rpc_port: 13345") + "  host_network: false\n")
    validate_all(objects)  # each pod has its own network namespace: nothing to collide with


def test_the_prefill_decode_example_renders_through_the_cli_into_manifests_kubernetes_accepts(tmp_path):
    """docs/examples/k8s-pd-2p2d.yaml as users run it."""
    from tests.conftest import EXAMPLES, run_module

    out = tmp_path / "vllm-ep-pd.yaml"
    res = run_module("launch", "plan", str(EXAMPLES / "k8s-pd-2p2d.yaml"), "--format", "k8s", "--out", str(out))
    assert res.code == 0, res.err
    objects = list(yaml.safe_load_all(out.read_text()))
    validate_all(objects)
    assert [o["kind"] for o in objects] == [
        "ConfigMap",
        "LeaderWorkerSet",
        "Service",
        "LeaderWorkerSet",
        "Service",
        "Deployment",
        "Service",
    ]
    assert {o["metadata"]["namespace"] for o in objects} == {"inference"}
    assert objects[0]["data"]["deploy.yaml"] == (EXAMPLES / "k8s-pd-2p2d.yaml").read_text()
