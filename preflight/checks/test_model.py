"""The model: config found on this node, experts placed over the EP ranks as vLLM places them, and weights plus
a full-length sequence of KV cache that fit each GPU's share of memory."""

from __future__ import annotations

import pytest

from preflight import model
from preflight.system import human_bytes

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default


@pytest.fixture(scope="session")
def found(node):
    if node.config is None:
        return None, None
    folder = model.model_dir(node.config.model)
    return folder, (model.load_config(folder) if folder else None)


def _need_model(node, found, check):
    if node.config is None:
        check.skip("no deploy file: no model to check")
    folder, config = found
    if folder is None:
        check.skip("model not found locally (not downloaded yet)")
    return folder, config


def test_model_config_is_here(node, found, check):
    """model config readable on this node"""
    if node.config is None:
        check.skip("no deploy file: no model to check")
    folder, _ = found
    offline = node.env().get("HF_HUB_OFFLINE") == "1"
    fix = f"huggingface-cli download {node.config.model} (or copy it to the same path on every node)"
    if folder is None and not offline:
        check.skip(f"{node.config.model} is not downloaded yet: vLLM will download it at start ({fix})")
    check.require(
        folder is not None, f"{node.config.model} not found", "config.json on this node (HF_HUB_OFFLINE=1)", fix=fix
    )
    check.measured(str(folder), "config.json on this node")


def test_experts_split_over_ep_ranks(node, found, check):
    """experts over the EP ranks"""
    _, config = _need_model(node, found, check)
    if not node.config.enable_expert_parallel:
        check.skip("expert parallelism is off")
    count = model.experts(config)
    if count is None:
        check.skip("not a mixture-of-experts model (no expert count in config.json)")
    ep = node.plan.layout.data_parallel_size * node.config.tensor_parallel_size
    model.expert_split(count, ep, *model.eplb(node.plan.argv)).report(check)


def test_weights_and_kv_cache_fit(node, found, gpus, check):
    """weights + one full sequence of KV cache fit a GPU"""
    folder, config = _need_model(node, found, check)
    if isinstance(gpus, str) or not gpus.gpus or not gpus.gpus[0].memory_total:
        check.skip(f"GPU memory unknown ({gpus if isinstance(gpus, str) else 'no GPU'})")
    sizes = model.weights(folder)
    if sizes is None:
        check.skip("no safetensors files to size the weights")
    argv = node.plan.argv
    tp = node.config.tensor_parallel_size
    ep = node.plan.layout.data_parallel_size * tp if node.config.enable_expert_parallel else tp
    util = float(model.flag(argv, "--gpu-memory-utilization") or DEFAULT_GPU_MEMORY_UTILIZATION)
    max_len = int(model.flag(argv, "--max-model-len") or config.get("max_position_embeddings") or 4096)
    per_token = model.kv_bytes_per_token(config, tp) or 0
    weights = sizes.per_gpu(tp, ep)
    kv = per_token * max_len
    budget = util * gpus.gpus[0].memory_total
    value = (
        f"{human_bytes(weights)} weights + {human_bytes(kv)} KV for {max_len} tokens per GPU "
        f"of {human_bytes(gpus.gpus[0].memory_total)} x {util:g}"
    )
    check.require(
        weights + kv <= budget,
        value,
        f"<= {human_bytes(budget)}",
        fix="more GPUs (DP/TP), a quantized checkpoint, a lower --max-model-len or a higher --gpu-memory-utilization",
    )
