"""Kubernetes manifests for `plan --format k8s`: a ConfigMap, a LeaderWorkerSet and a Service.

One LeaderWorkerSet group is one deployment: the leader pod is node 0 (the primary: API servers and the data
parallel coordinator), the worker pods are nodes 1.. (the secondaries). Every pod runs the same command,
``python -m launch lws-step serve --deploy /etc/vllm-ep/deploy.yaml``; the deploy file travels verbatim in the
ConfigMap, and the run-time side derives the node's rank and the primary's address from what LWS injects
(LWS_WORKER_INDEX, LWS_LEADER_ADDRESS, LWS_GROUP_SIZE) plus ``EP_POD_IP`` (the downward API). Node addresses of
the deploy file are not used: the scheduler places the pods.

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

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
CONFIG_DIR = "/etc/vllm-ep"
DEPLOY_PATH = f"{CONFIG_DIR}/deploy.yaml"
LWS_NAME_LABEL = "leaderworkerset.sigs.k8s.io/name"
LWS_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"

PROBE_PERIOD_S = 10
LIVENESS_FAILURES = 6
"""A group that has stopped answering for a minute is restarted (RecreateGroupOnPodRestart: all its pods)."""
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
    """The ConfigMap, LeaderWorkerSet and Service for ``config``; ``deploy_text`` is the deploy file as written
    (it goes into the ConfigMap verbatim), ``source`` names it in errors. Raises ConfigError on what cannot be
    rendered."""
    _check(config, source)
    k = config.kubernetes
    python = shlex.split(k.python)  # checked when the deploy file was read
    leader = _pod_template(config, python, config.nodes[0].gpus, leader=True)
    # LWS requires a workerTemplate even when the group is the leader alone (size 1).
    worker = (
        _pod_template(config, python, config.nodes[1].gpus, leader=False)
        if len(config.nodes) > 1
        else copy.deepcopy(leader)
    )
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(config, f"{k.name}-deploy"),
        "data": {"deploy.yaml": deploy_text},
    }
    lws = {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": _metadata(config, k.name),
        "spec": {
            "replicas": 1,
            # Workers are created with the leader, not after it is ready: the leader only becomes ready once
            # every secondary has joined.
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": len(config.nodes),
                "restartPolicy": k.restart_policy,
                "leaderTemplate": leader,
                "workerTemplate": worker,
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(config, f"{k.name}-api"),
        "spec": {
            "type": "ClusterIP",
            "selector": {LWS_NAME_LABEL: k.name, LWS_INDEX_LABEL: "0"},  # the leader pod: the API servers run there
            "ports": [{"name": "http", "port": config.port, "targetPort": config.port, "protocol": "TCP"}],
        },
    }
    return [configmap, lws, service]


def _check(config: DeployConfig, source: str) -> None:
    k = config.kubernetes
    if config.disaggregation is not None:
        raise ConfigError(
            f"{source}: disaggregation: not supported by --format k8s yet (it renders one deployment per "
            "LeaderWorkerSet; prefill/decode groups and the router are not rendered for Kubernetes)"
        )
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
    for rank in range(2, len(config.nodes)):
        gpus, first = config.nodes[rank].gpus, config.nodes[1].gpus
        if gpus != first:
            raise ConfigError(
                f"{source}: nodes[{rank}].gpus: {gpus} differs from nodes[1].gpus {first} (expected one GPU count "
                "for all secondaries: LeaderWorkerSet workers share a pod template)"
            )


def _labels(config: DeployConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vllm-ep", "app.kubernetes.io/instance": config.kubernetes.name}


def _metadata(config: DeployConfig, name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if config.kubernetes.namespace:
        meta["namespace"] = config.kubernetes.namespace
    meta["labels"] = _labels(config)
    return meta


def _pod_template(config: DeployConfig, python: list[str], gpus: int, *, leader: bool) -> dict[str, Any]:
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
    # vLLM's own bound on engine start-up (vllm/envs.py, VLLM_ENGINE_READY_TIMEOUT_S; v1/engine/core_client.py).
    env.append({"name": "VLLM_ENGINE_READY_TIMEOUT_S", "value": str(k.engine_ready_timeout_s)})
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
    vllm: dict[str, Any] = {
        "name": "vllm",
        **copy.deepcopy(common),
        "command": [*step, "serve", "--deploy", DEPLOY_PATH],
    }
    # Probes on every pod. The leader answers vLLM's /health; a worker runs vLLM headless (no port of its own),
    # so it is asked by command: ready = its group's primary serves, live = its vLLM process runs (launch/pod.py).
    if leader:
        vllm["ports"] = [{"name": "http", "containerPort": config.port, "protocol": "TCP"}]
        serving = live = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 5}
    else:
        pod = [*python, "-m", "launch.pod"]
        serving = {
            "exec": {"command": [*pod, "ready", "--deploy", DEPLOY_PATH, "--timeout", "5"]},
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
                "command": [*step, "preflight", "--deploy", DEPLOY_PATH, *more],
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
    labels = {**_labels(config), "app.kubernetes.io/component": "leader" if leader else "worker"}
    metadata: dict[str, Any] = {"labels": labels}
    annotations = dict(k.pod_annotations)
    if leader and k.metrics_annotations:
        # The common Prometheus convention for scraping pods; vLLM serves /metrics on its API port.
        annotations = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(config.port),
            "prometheus.io/path": "/metrics",
            **annotations,
        }
    if annotations:
        metadata["annotations"] = annotations
    return {"metadata": metadata, "spec": spec}
