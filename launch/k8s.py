"""Kubernetes manifests for `plan --format k8s`: a ConfigMap, a LeaderWorkerSet and a Service; with prefill/decode,
one LeaderWorkerSet and Service per group plus the router (a Deployment and the API's Service).

One LeaderWorkerSet group is one deployment: the leader pod is node 0 (the primary: API servers and the data
parallel coordinator), the worker pods are nodes 1.. (the secondaries). Every pod runs the same command,
``python -m launch lws-step serve --deploy /etc/vllm-ep/deploy.yaml``; the deploy file travels verbatim in the
ConfigMap, and the run-time side derives the node's rank and the primary's address from what LWS injects
(LWS_WORKER_INDEX, LWS_LEADER_ADDRESS, LWS_GROUP_SIZE) plus ``EP_POD_IP`` (the downward API). Node addresses of
the deploy file are not used: the scheduler places the pods.

Prefill/decode (``disaggregation:``) is two such deployments, ``NAME-prefill`` and ``NAME-decode``, whose pods
run ``lws-step serve --group prefill|decode``; each leader's API has a Service (``NAME-prefill-api``,
``NAME-decode-api``: a stable name while LWS recreates the pods). The router's pod (Deployment ``NAME-router``)
runs ``lws-step proxy``: it waits for both groups' /health through those Services, then runs vllm-router with
them as its prefill and decode URLs (launch/router.py); ``NAME-api`` is the router's Service, the one entry
point. The KV cache itself moves pod to pod (NIXL, at each engine's pod address), not through the Services.
The shape is that of llm-d's wide-EP guide (llm-d/llm-d guides/wide-ep-lws/manifests/modelserver/base/
prefill.yaml, decode.yaml at 03da3b0: one LeaderWorkerSet per role, VLLM_NIXL_SIDE_CHANNEL_HOST = the pod's IP),
with vllm-router, the router `launch proxy` runs on bare metal, in the place of llm-d's gateway and sidecar.

Why each expert-parallel setting is there:

- ``hostNetwork`` (default on): the pods use the node's NICs directly, so NCCL, NVSHMEM/DeepEP and EFA reach the
  RDMA devices without an RDMA CNI; ``dnsPolicy: ClusterFirstWithHostNet`` keeps cluster DNS names (the leader's
  address) resolvable from the host network. ``rdma_resources`` asks the device plugin for the RDMA devices.
- ``IPC_LOCK``: RDMA registers (pins) memory; without it the verbs calls fail or are capped by RLIMIT_MEMLOCK.
- ``/dev/shm`` as a memory-backed emptyDir: the container default (64 MiB) is far too small for NCCL's and the
  engines' shared-memory transport.
- ``nvidia.com/gpu``: every GPU of the node (EP needs them all in one pod), in limits and requests.
"""

from __future__ import annotations

import copy
import shlex
from typing import Any

from launch.config import ConfigError, DeployConfig
from launch.placement import GROUP_API, GROUPS, group_nodes

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
CONFIG_DIR = "/etc/vllm-ep"
DEPLOY_PATH = f"{CONFIG_DIR}/deploy.yaml"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
COMPONENT_LABEL = "app.kubernetes.io/component"

PROBE_PERIOD_S = 10
LIVENESS_FAILURES = 6
"""A group that has stopped answering for a minute is restarted (RecreateGroupOnPodRestart: all its pods)."""
ROUTER_START_S = 120
"""What the router's start-up probe allows beyond the groups' start-up: vllm-router checks both groups again,
then listens."""
ENGINE_READY_S = 3000
"""VLLM_ENGINE_READY_TIMEOUT_S in the pods where the deploy file sets none: llm-d's wide-EP manifests raise it to
3,000 s for DeepSeek-size models; vLLM's own 600 s is short for them."""
JIT_DIR = "/var/cache/vllm-ep"
JIT_CACHES = {
    "VLLM_CACHE_ROOT": "vllm",  # vllm/envs.py (0.26.0: line 677); torch.compile's cache lives under it
    "CUDA_CACHE_PATH": "cuda",  # the CUDA driver's JIT cache (CUDA Programming Guide, "CUDA Environment Variables")
    "TRITON_CACHE_DIR": "triton",  # Triton's kernel cache
    "FLASHINFER_WORKSPACE_BASE": "flashinfer",  # flashinfer/jit/env.py: the cache goes under BASE/.cache/flashinfer
    "DG_JIT_CACHE_DIR": "deep_gemm",  # DeepGEMM README (ea9c5d9), csrc/jit/compiler.hpp
    "EP_JIT_CACHE_DIR": "deep_ep",  # DeepEP v2 README (d4f41e4), csrc/jit/compiler.hpp: kernels compiled at run time
}
"""Compiled-kernel caches: on a host path they survive restarts, so a restarted group does not compile again."""


def manifests(config: DeployConfig, deploy_text: str, source: str) -> list[dict[str, Any]]:
    """The ConfigMap, then per deployment (one, or prefill and decode) its LeaderWorkerSet and Service, then with
    prefill/decode the router's Deployment and Service. ``deploy_text`` is the deploy file as written (it goes
    into the ConfigMap verbatim), ``source`` names it in errors. Raises ConfigError on what cannot be rendered."""
    _check(config, source)
    k = config.kubernetes
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config, f"{k.name}-deploy"),
        "data": {"deploy.yaml": deploy_text},
    }
    if config.disaggregation is None:
        return [configmap, *_deployment(config, None)]
    return [configmap, *_deployment(config, "prefill"), *_deployment(config, "decode"), *_router(config)]


def lws_name(config: DeployConfig, group: str | None) -> str:
    """The LeaderWorkerSet's name; LWS names its headless Service (the pods' DNS domain) the same."""
    return f"{config.kubernetes.name}-{group}" if group else config.kubernetes.name


def api_service(config: DeployConfig, group: str | None) -> str:
    """The Service in front of a deployment's API: its leader's, or with prefill/decode, the router's."""
    return f"{lws_name(config, group)}-api"


def _deployment(config: DeployConfig, group: str | None) -> list[dict[str, Any]]:
    """One LeaderWorkerSet (the deployment, or the prefill / decode group) and the Service of its leader's API."""
    python = shlex.split(config.kubernetes.python)  # checked when the deploy file was read
    nodes = group_nodes(config, group)
    port = config.group(group).port if group else config.port
    name = lws_name(config, group)
    leader = _pod_template(config, python, nodes[0].gpus, port, group, leader=True)
    # LWS requires a workerTemplate even when the group is the leader alone (size 1).
    worker = (
        _pod_template(config, python, nodes[1].gpus, port, group, leader=False)
        if len(nodes) > 1
        else copy.deepcopy(leader)
    )
    lws = {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": _metadata(config, name),
        "spec": {
            "replicas": 1,
            # Workers are created with the leader, not after it is ready: the leader only becomes ready once
            # every secondary has joined.
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": len(nodes),
                "restartPolicy": config.kubernetes.restart_policy,
                "leaderTemplate": leader,
                "workerTemplate": worker,
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        # with prefill/decode the router reaches the group here; without, clients do
        "metadata": _metadata(config, api_service(config, group)),
        "spec": {
            "type": "ClusterIP",
            "selector": {LWS_NAME_LABEL: name, LWS_INDEX_LABEL: "0"},  # the leader pod: the API servers run there
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }
    return [lws, service]


def _router(config: DeployConfig) -> list[dict[str, Any]]:
    """vllm-router's Deployment and the Service clients use (NAME-api). Its pod needs no GPU, RDMA or host
    network: it forwards HTTP to the groups' API Services."""
    assert config.disaggregation is not None
    k, r = config.kubernetes, config.disaggregation.router
    python = shlex.split(k.python)
    labels = {**_labels(config), COMPONENT_LABEL: "router"}
    # `lws-step proxy` waits for both groups as long as their pods' start-up probes allow, then starts vllm-router.
    wait = ["--", "--wait-for-groups", str(k.startup_timeout_s)]
    container: dict[str, Any] = {
        "name": "router",
        "image": k.image,
        "command": [*python, "-m", "launch", "lws-step", "proxy", "--deploy", DEPLOY_PATH, *wait],
        "env": [{"name": GROUP_API[g], "value": api_service(config, g)} for g in GROUPS],
        "ports": [{"name": "http", "containerPort": r.port, "protocol": "TCP"}],
        "volumeMounts": [{"name": "deploy", "mountPath": CONFIG_DIR, "readOnly": True}],
    }
    if r.metrics_port is not None:
        container["ports"].append({"name": "metrics", "containerPort": r.metrics_port, "protocol": "TCP"})
    if k.env_from_secret:
        container["envFrom"] = [{"secretRef": {"name": k.env_from_secret}}]
    # vllm-router listens only once both groups answer /health; then /liveness answers while it runs and
    # /readiness while it has a healthy prefill and decode worker, else 503 "no healthy decode workers"
    # (vllm-project/router src/server.rs at 00edc4e; seen with vllm-router 0.1.17). Both on the router's port.
    container["startupProbe"] = {
        "httpGet": {"path": "/liveness", "port": "http"},
        "timeoutSeconds": 5,
        "periodSeconds": PROBE_PERIOD_S,
        "failureThreshold": -(-(k.startup_timeout_s + ROUTER_START_S) // PROBE_PERIOD_S),
    }
    container["readinessProbe"] = {
        "httpGet": {"path": "/readiness", "port": "http"},
        "timeoutSeconds": 5,
        "periodSeconds": PROBE_PERIOD_S,
        "failureThreshold": 3,
    }
    container["livenessProbe"] = {
        "httpGet": {"path": "/liveness", "port": "http"},
        "timeoutSeconds": 5,
        "periodSeconds": PROBE_PERIOD_S,
        "failureThreshold": LIVENESS_FAILURES,
    }
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "deploy", "configMap": {"name": f"{k.name}-deploy"}}],
    }
    if k.service_account:
        spec["serviceAccountName"] = k.service_account
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(config, f"{k.name}-router"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": _router_pod_metadata(config, labels), "spec": spec},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(config, api_service(config, None)),
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [
                {"name": "http", "port": r.port, "targetPort": r.port, "protocol": "TCP"},
                *(
                    [{"name": "metrics", "port": r.metrics_port, "targetPort": r.metrics_port, "protocol": "TCP"}]
                    if r.metrics_port is not None
                    else []
                ),
            ],
        },
    }
    return [deployment, service]


def _check(config: DeployConfig, source: str) -> None:
    k = config.kubernetes
    if not k.image:
        raise ConfigError(
            f"{source}: kubernetes.image: missing (required for --format k8s: the image with the toolkit and its stack)"
        )
    for name in ("model_cache", "jit_cache"):
        value = getattr(k, name)
        if value is not None and not value.startswith("/"):
            raise ConfigError(
                f"{source}: kubernetes.{name}: {value!r} is not an absolute path (expected a directory on the node, e.g. /mnt/{name.split('_')[0]})"
            )
    d = config.disaggregation
    for group in GROUPS if d else (None,):
        nodes, field = group_nodes(config, group), f"disaggregation.{group}.nodes" if group else "nodes"
        for rank in range(2, len(nodes)):
            if nodes[rank].gpus != nodes[1].gpus:
                raise ConfigError(
                    f"{source}: {field}[{rank}].gpus: {nodes[rank].gpus} differs from {field}[1].gpus {nodes[1].gpus} "
                    "(expected one GPU count for all secondaries: LeaderWorkerSet workers share a pod template)"
                )
    if d is None:
        return
    if d.router.host not in ("0.0.0.0", "::"):
        raise ConfigError(
            f"{source}: disaggregation.router.host: {d.router.host!r} (expected 0.0.0.0 or :: with --format k8s: "
            "the router's Service reaches its pod at the pod's address)"
        )
    if k.host_network:
        # Pods on the host network share the node's ports, and the scheduler may put a prefill and a decode pod on
        # one node (when neither asks for all of its GPUs).
        for name in ("port", "rpc_port"):
            if getattr(d.prefill, name) == getattr(d.decode, name):
                raise ConfigError(
                    f"{source}: disaggregation.decode.{name}: {getattr(d.decode, name)} is also the prefill {name} "
                    f"(expected another port with kubernetes.host_network: a prefill and a decode pod may share a node)"
                )


def _labels(config: DeployConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vllm-ep", "app.kubernetes.io/instance": config.kubernetes.name}


def _metadata(config: DeployConfig, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if config.kubernetes.namespace:
        meta["namespace"] = config.kubernetes.namespace
    meta["labels"] = _labels(config)
    return meta


def _pod_template(
    config: DeployConfig, python: list[str], gpus: int, port: int, group: str | None, *, leader: bool
) -> dict[str, Any]:
    k = config.kubernetes
    env: list[dict[str, Any]] = [{"name": "EP_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    mounts: list[dict[str, Any]] = [
        {"name": "deploy", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "deploy", "configMap": {"name": f"{k.name}-deploy"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}},
    ]
    # vLLM's own bound on engine start-up (vllm/envs.py, VLLM_ENGINE_READY_TIMEOUT_S; v1/engine/core_client.py),
    # raised within the start-up probes' budget unless the file sets it (the plan then sets it on every node).
    engine_ready = config.engine_ready_timeout_s or ENGINE_READY_S
    env.append({"name": "VLLM_ENGINE_READY_TIMEOUT_S", "value": str(engine_ready)})
    if k.jit_cache:
        env += [{"name": name, "value": f"{JIT_DIR}/{sub}"} for name, sub in JIT_CACHES.items()]
        mounts.append({"name": "jit-cache", "mountPath": JIT_DIR})
        volumes.append({"name": "jit-cache", "hostPath": {"path": k.jit_cache, "type": "DirectoryOrCreate"}})
    if k.model_cache:
        # Weights stay on the node between restarts instead of being downloaded by every new pod.
        env.append({"name": "HF_HOME", "value": k.model_cache})
        mounts.append({"name": "model-cache", "mountPath": k.model_cache})
        volumes.append({"name": "model-cache", "hostPath": {"path": k.model_cache, "type": "DirectoryOrCreate"}})
    amounts: dict[str, Any] = {"nvidia.com/gpu": gpus, **k.rdma_resources}
    if k.cpu:
        amounts["cpu"] = k.cpu
    if k.memory:
        amounts["memory"] = k.memory
    common = {
        "image": k.image,
        "env": env,
        "resources": {"limits": dict(amounts), "requests": dict(amounts)},
        "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
        "volumeMounts": mounts,
    }
    if k.env_from_secret:
        common["envFrom"] = [{"secretRef": {"name": k.env_from_secret}}]
    step = [*python, "-m", "launch", "lws-step"]
    grouped = ["--group", group] if group else []
    vllm: dict[str, Any] = {
        "name": "vllm",
        **copy.deepcopy(common),
        "command": [*step, "serve", *grouped, "--deploy", DEPLOY_PATH],
    }
    # Probes on every pod. The leader answers vLLM's /health; a worker runs vLLM headless (no port of its own),
    # so it is asked by command: ready = its group's primary serves, live = its vLLM process runs (launch/pod.py).
    if leader:
        vllm["ports"] = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        serving = live = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    else:
        pod = [*python, "-m", "launch.pod"]
        serving = {
            "exec": {"command": [*pod, "ready", *grouped, "--deploy", DEPLOY_PATH, "--timeout", "5"]},
            "timeoutSeconds": 10,
        }
        live = {"exec": {"command": [*pod, "live"]}, "timeoutSeconds": 10}
    vllm["startupProbe"] = {
        **copy.deepcopy(serving),
        "periodSeconds": PROBE_PERIOD_S,
        "failureThreshold": -(-k.startup_timeout_s // PROBE_PERIOD_S),
    }
    vllm["readinessProbe"] = {**copy.deepcopy(serving), "periodSeconds": PROBE_PERIOD_S, "failureThreshold": 3}
    vllm["livenessProbe"] = {
        **copy.deepcopy(live),
        "periodSeconds": PROBE_PERIOD_S,
        "failureThreshold": LIVENESS_FAILURES,
    }
    spec: dict[str, Any] = {
        "containers": [vllm],
        "volumes": volumes,
        "hostNetwork": k.host_network,
        "terminationGracePeriodSeconds": k.termination_grace_s,
    }
    if k.preflight:
        # The node checks (GPUs, NICs, cross-node collectives) run with the same devices before vLLM starts.
        more = ["--", *k.preflight_args] if k.preflight_args else []
        spec["initContainers"] = [
            {
                "name": "preflight",
                **copy.deepcopy(common),
                "command": [*step, "preflight", *grouped, "--deploy", DEPLOY_PATH, *more],
            }
        ]
    if k.host_network:
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    if k.node_selector:
        spec["nodeSelector"] = dict(k.node_selector)
    if k.service_account:
        spec["serviceAccountName"] = k.service_account
    if k.tolerations:
        spec["tolerations"] = [dict(t) for t in k.tolerations]
    labels = {**_labels(config), COMPONENT_LABEL: "leader" if leader else "worker"}
    metadata: dict[str, Any] = {"labels": labels}
    # vLLM serves /metrics on its API port
    annotations = {**_scraped(k, port if leader else None), **k.pod_annotations}
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}


def _scraped(k, metrics_port: int | None) -> dict[str, str]:
    """The common Prometheus convention for scraping a pod that serves /metrics on ``metrics_port`` (where
    metrics_annotations is on)."""
    if metrics_port is None or not k.metrics_annotations:
        return {}
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port), "prometheus.io/path": "/metrics"}


def _router_pod_metadata(config: DeployConfig, labels: dict[str, str]) -> dict[str, Any]:
    assert config.disaggregation is not None
    # the vLLM pods' pod_annotations (a Multus RDMA network, ...) are theirs: the router's pod needs none of them
    annotations = _scraped(config.kubernetes, config.disaggregation.router.metrics_port)
    return {"labels": labels, **({"annotations": annotations} if annotations else {})}
