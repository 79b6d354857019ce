"""The EP memory budget of one GPU: what vLLM with an EP kernel library will hold, term by term, against
GPU memory x --gpu-memory-utilization. Pure arithmetic over the model's config.json and the node's plan.

Terms (one row each, in this order):

- weights: the experts split over the EP ranks, the rest split over TP (counted from the safetensors
  headers when the checkpoint is on the node, else estimated from config.json's shapes);
- EPLB redundant experts: the extra physical experts ``--eplb-config num_redundant_experts`` places on
  every rank (vLLM: global experts = routed + redundant, split evenly over the EP ranks);
- KV cache: one sequence of the planned length (``--max-model-len``, else the model's maximum);
- DeepEP NVLink buffer: ``num_nvl_bytes`` = VLLM_DEEPEP_BUFFER_SIZE_MB (1024) MiB, allocated by every
  DeepEP backend of vLLM (vllm/distributed/device_communicators/all2all.py, 0.26.0: lines 219 and 302);
- NVSHMEM symmetric heap: DeepEP's RDMA buffer lives there. Low-latency: DeepEP's own size hint for the
  model's hidden size, the EP ranks, the global experts and the plan's tokens per rank (the same formula
  as csrc/config.hpp:136-193 at DeepEP 73b6ea4), rounded up to NVSHMEM's allocation granularity, which
  DeepEP sets to 512 MiB (deep_ep/buffer.py:120); high-throughput across nodes: VLLM_DEEPEP_BUFFER_SIZE_MB
  again. NVSHMEM_SYMMETRIC_SIZE, when the plan sets it, reserves at least that much (NVSHMEM
  src/host/mem/mem_heap.cpp:436, v3.4.5);
- MoE activations: the batched experts' input and intermediate for every token a rank can receive
  (local experts x EP ranks x tokens per rank rows);
- CUDA graphs and other activations: a reserve (``ep_memory_reserve_gib``), since vLLM measures these
  only while it starts (its "Actual usage is ... for peak activation ... CUDAGraph memory" line).

The tokens per rank follow vLLM: from 0.20.0 the scheduler's max_num_batched_tokens (default 256 for
deepep_low_latency with DP > 1: config/scheduler.py DEFAULT_MAX_NUM_BATCHED_TOKENS_FOR_BATCHED_DP and
engine/arg_utils.py, 0.26.0), before it VLLM_MOE_DP_CHUNK_SIZE (default 256, envs.py of 0.10.1.1 to 0.19.0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from packaging.version import Version

GiB = 1024**3
MiB = 1024**2

EP_BACKENDS = ("deepep_low_latency", "deepep_high_throughput", "deepep_v2")
"""vLLM all2all backends that run an EP kernel library (DeepEP) and hold its buffers."""

# VLLM_DEEPEP_BUFFER_SIZE_MB (vllm/envs.py); a constant 1 GiB before the variable existed (0.10.1.1)
DEEPEP_BUFFER_MB_DEFAULT = 1024
# DeepEP sets NVSHMEM_CUMEM_GRANULARITY (deep_ep/buffer.py:120, 73b6ea4); NVSHMEM's own default is the same
NVSHMEM_GRANULARITY = 2**29
NUM_BUFFER_ALIGNMENT_BYTES = 128  # csrc/kernels/configs.cuh:7 (73b6ea4)
BATCHED_DP_TOKENS = 256  # vLLM's tokens per rank for low-latency EP with DP > 1 unless --max-num-batched-tokens
# vLLM's OpenAI server default max_num_batched_tokens otherwise (engine/arg_utils.py get_batch_defaults)
SERVER_BATCHED_TOKENS = 8192
TOKENS_FROM_SCHEDULER = Version("0.20.0")  # before: VLLM_MOE_DP_CHUNK_SIZE (fused_moe/layer.py of 0.19.0)

EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
TOPK_KEYS = ("num_experts_per_tok", "moe_topk", "num_experts_per_token")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


class BudgetError(ValueError):
    """One line: which config field is missing or wrong, and what was expected."""


# --- DeepEP's own size hints -------------------------------------------------------------------


def ll_rdma_bytes(tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """``deep_ep.Buffer.get_low_latency_rdma_size_hint``: the low-latency layout's total bytes (two
    odd/even copies of send, receive and signalling buffers), aligned as DeepEP aligns it."""
    num_scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + num_scales * 4)  # int4 header + BF16 or FP8 + scales
    combine_msg = num_scales * 4 + hidden * 2  # per-128-channel bf162 min/max + BF16 payload
    send = max(tokens_per_rank * dispatch_msg, num_experts * tokens_per_rank * combine_msg)
    recv = max(num_experts * tokens_per_rank * dispatch_msg, num_experts * tokens_per_rank * combine_msg)
    signaling = math.ceil(num_experts * 4 / 128) * 128
    total = 2 * send + 2 * recv + 2 * signaling
    return (total + NUM_BUFFER_ALIGNMENT_BYTES) // NUM_BUFFER_ALIGNMENT_BYTES * NUM_BUFFER_ALIGNMENT_BYTES


# DeepEP v2's ElasticBuffer (deep_ep/buffers/elastic.py, csrc/elastic/buffer.hpp at d4f41e4): its buffer is
# NCCL symmetric memory sized by ElasticBuffer::calculate_buffer_size (buffer.hpp:622-655), the larger of the
# dispatch and the combine layouts (get_dispatch_buffer_size / get_combine_buffer_size, lines 556-620), each a
# sum of BufferLayouts = ranks x tokens x bytes per token (deep_ep/include/deep_ep/common/layout.cuh, TokenLayout:
# hidden bytes, scale bytes and top-k index + weight (+ source rank and indices in dispatch), each rounded up to
# 32 bytes). vLLM passes neither VLLM_DEEPEP_BUFFER_SIZE_MB nor a size: ElasticBuffer sizes itself.
ELASTIC_ALIGNMENT = 2 * 1024 * 1024  # symmetric::kNumAlignmentBytes (csrc/kernels/backend/symmetric.hpp:16)
ELASTIC_MAX_CHANNELS = 8 * 160  # kNumMaxChannelsPerSM x kNumMaxSMs (buffer.hpp:59-61)
TMA_ALIGN = 32  # ptx::kNumTMAAlignBytes (deep_ep/include/deep_ep/common/ptx.cuh:16)


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def _token_bytes(hidden_bytes: int, topk: int, metadata: bool) -> int:
    meta = topk * 8 + ((1 + topk) * 4 if metadata else 0)
    return _align(hidden_bytes, TMA_ALIGN) + _align(meta, TMA_ALIGN)


def elastic_buffer_bytes(
    tokens: int, hidden: int, topk: int, ranks: int, nvlink_ranks: int, *, hybrid: bool = True, reductions: bool = False
) -> int:
    """DeepEP v2's ElasticBuffer size for these settings, as calculate_buffer_size computes it, with BF16 dispatch
    (FP8 dispatch is smaller). ``nvlink_ranks``: GPUs per NVLink domain (a node); ``hybrid``: vLLM's
    VLLM_DEEPEP_V2_ALLOW_HYBRID_MODE (default 1), ``reductions``: VLLM_DEEPEP_V2_ALLOW_MULTIPLE_REDUCTION (0)."""
    topk = topk or 32
    nvl = max(1, min(nvlink_ranks, ranks))
    scaleout, scaleup = (ranks // nvl, nvl) if hybrid else (1, ranks)
    nvlink = scaleup == nvl
    d, c = _token_bytes(hidden * 2, topk, True), _token_bytes(hidden * 2, topk, False)
    per_token_sent = 1 if reductions else topk
    if scaleout == 1:
        dispatch = d * tokens * ((0 if nvlink else 1) + ranks)
        received = min(ranks, topk) if reductions else topk
        combine = c * tokens * ((0 if nvlink else ranks) * per_token_sent + received)
    else:
        dispatch = d * (scaleup * scaleout * tokens + tokens + scaleout * (tokens + ELASTIC_MAX_CHANNELS))
        up = min(scaleup, topk) if reductions else topk
        out = min(scaleout, topk) if reductions else topk
        combine = c * (
            up * scaleout * tokens + out * tokens + per_token_sent * scaleout * (tokens + ELASTIC_MAX_CHANNELS)
        )
    return _align(max(dispatch, combine), ELASTIC_ALIGNMENT)


def parse_size(text: str) -> int:
    """NVSHMEM's size syntax (NVSHMEM_SYMMETRIC_SIZE): a number with an optional k/m/g/t suffix (powers of 1024)."""
    raw = text.strip().lower()
    scale = {"k": 1024, "m": MiB, "g": GiB, "t": 1024 * GiB}.get(raw[-1:], 1)
    number = raw[:-1] if scale != 1 else raw
    try:
        value = float(number)
    except ValueError:
        raise BudgetError(
            f"NVSHMEM_SYMMETRIC_SIZE={text!r}: expected bytes with an optional k, m, g suffix (e.g. 4g)"
        ) from None
    if value <= 0:
        raise BudgetError(f"NVSHMEM_SYMMETRIC_SIZE={text!r}: expected a positive size")
    return math.ceil(value * scale)


# --- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeShape:
    """What the budget needs from config.json."""

    hidden: int
    experts: int  # routed experts
    topk: int
    layers: int
    moe_layers: int
    expert_params: int  # one routed expert of one layer
    other_params: int  # everything that is not a routed expert (attention, dense MLPs, shared experts, embeddings)
    weight_bytes: float  # bytes per parameter of the checkpoint's linear layers
    moe_intermediate: int

    @property
    def expert_bytes(self) -> float:
        """All routed experts of all layers."""
        return self.expert_params * self.experts * self.moe_layers * self.weight_bytes


def _int(config: Mapping, keys: Sequence[str], what: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise BudgetError(f"config.json: {' / '.join(keys)}: missing (expected the {what} of a mixture-of-experts model)")


def _is_moe_layer(config: Mapping, index: int) -> bool:
    if "first_k_dense_replace" in config or "moe_layer_freq" in config:  # DeepSeek V2/V3, Kimi K2
        return index >= config.get("first_k_dense_replace", 0) and index % config.get("moe_layer_freq", 1) == 0
    if index in (config.get("mlp_only_layers") or []):  # Qwen2/3-MoE
        return False
    return (index + 1) % (config.get("decoder_sparse_step") or 1) == 0


def _attention_params(config: Mapping, hidden: int) -> int:
    heads = config.get("num_attention_heads") or 0
    if config.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek)
        nope, rope, v = (
            config.get("qk_nope_head_dim", 0),
            config.get("qk_rope_head_dim", 0),
            config.get("v_head_dim", 0),
        )
        q_lora = config.get("q_lora_rank")
        q = hidden * q_lora + q_lora * heads * (nope + rope) if q_lora else hidden * heads * (nope + rope)
        kv = hidden * (config["kv_lora_rank"] + rope) + config["kv_lora_rank"] * heads * (nope + v)
        return q + kv + heads * v * hidden
    head_dim = config.get("head_dim") or hidden // max(heads, 1)
    kv_heads = config.get("num_key_value_heads") or heads
    return hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden


def weight_bytes_per_param(config: Mapping) -> float:
    """FP8 block-quantized checkpoints (DeepSeek-V3: quantization_config.quant_method fp8, 128 x 128
    blocks) hold one byte per weight plus one float32 scale per block; others their torch_dtype."""
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") == "fp8":
        block = quant.get("weight_block_size") or [128, 128]
        return 1 + 4 / (block[0] * block[1])
    return DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), 2)


def moe_shape(config: Mapping) -> MoeShape:
    """The shapes of a mixture-of-experts config.json; BudgetError (one line) when a field is missing.
    Multi-token-prediction layers (DeepSeek's num_nextn_predict_layers) are not counted: vLLM loads
    them only for speculative decoding."""
    hidden = _int(config, ("hidden_size",), "hidden size")
    experts = _int(config, EXPERT_KEYS, "routed expert count")
    topk = _int(config, TOPK_KEYS, "experts per token")
    layers = _int(config, ("num_hidden_layers",), "layer count")
    moe_inter = _int(config, ("moe_intermediate_size",), "routed experts' intermediate size")
    dense_inter = config.get("intermediate_size") or moe_inter
    shared = config.get("n_shared_experts") or 0
    shared_inter = config.get("shared_expert_intermediate_size") or moe_inter * shared
    moe_layers = sum(_is_moe_layer(config, i) for i in range(layers))
    per_expert = 3 * hidden * moe_inter  # gate, up, down
    other = layers * _attention_params(config, hidden)
    other += (layers - moe_layers) * 3 * hidden * dense_inter
    other += moe_layers * (3 * hidden * shared_inter + hidden * experts)  # shared experts + router
    vocab = config.get("vocab_size") or 0
    other += vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return MoeShape(
        hidden, experts, topk, layers, moe_layers, per_expert, other, weight_bytes_per_param(config), moe_inter
    )


def load_config(path) -> dict:
    """config.json, the language model's part of a multimodal one merged in (as preflight.model does)."""
    with open(path) as f:
        config = json.load(f)
    text = config.get("text_config")
    return {**text, **config} if isinstance(text, dict) else config


# --- the plan ----------------------------------------------------------------------------------


def flag(argv: Sequence[str], name: str) -> str | None:
    """``--name V`` or ``--name=V`` in a vllm serve argv."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _int_flag(argv: Sequence[str], name: str) -> int | None:
    raw = flag(argv, name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise BudgetError(f"{name} {raw!r}: expected a whole number") from None


def redundant_experts(argv: Sequence[str]) -> int:
    """EPLB's redundant experts: ``--eplb-config '{"num_redundant_experts": N}'`` (or the older
    ``--num-redundant-experts N``); 0 without ``--enable-eplb``."""
    if "--enable-eplb" not in argv:
        return 0
    raw = flag(argv, "--eplb-config")
    if raw:
        try:
            value = json.loads(raw).get("num_redundant_experts", 0)
        except (ValueError, AttributeError):
            raise BudgetError(
                f"--eplb-config {raw!r}: expected JSON such as '{{\"num_redundant_experts\": 32}}'"
            ) from None
        return int(value)
    return _int_flag(argv, "--num-redundant-experts") or 0


def tokens_per_rank(
    backend: str, argv: Sequence[str], env: Mapping[str, str], vllm: Version, data_parallel_size: int
) -> int:
    """The most tokens one rank dispatches at once, as vLLM sizes the DeepEP buffers."""
    if vllm < TOKENS_FROM_SCHEDULER:
        raw = env.get("VLLM_MOE_DP_CHUNK_SIZE", str(BATCHED_DP_TOKENS))
        if not raw.isdigit() or int(raw) < 1:
            raise BudgetError(f"VLLM_MOE_DP_CHUNK_SIZE={raw!r}: expected a whole number >= 1")
        return int(raw)
    given = _int_flag(argv, "--max-num-batched-tokens")
    if given:
        return given
    return BATCHED_DP_TOKENS if backend == "deepep_low_latency" and data_parallel_size > 1 else SERVER_BATCHED_TOKENS


@dataclass(frozen=True)
class Plan:
    """What the budget needs from the node's plan."""

    backend: str
    ep_size: int
    tp_size: int
    nodes: int
    tokens_per_rank: int
    max_model_len: int
    gpu_memory_utilization: float
    redundant_experts: int = 0
    deepep_buffer_mb: int = DEEPEP_BUFFER_MB_DEFAULT
    nvshmem_symmetric_size: int | None = None
    reserve_bytes: float = 2 * GiB
    kv_bytes_per_token: int = 0
    creates_buffers: bool = True
    batched_tokens: int = 0
    """Tokens per forward pass on this rank (the scheduler's max_num_batched_tokens as vLLM resolves it)."""
    """vLLM runs the EP kernels only with data parallel size > 1 (FusedMoEParallelConfig.use_all2all_kernels)."""


def plan_from(
    backend: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    vllm: Version,
    ep_size: int,
    tp_size: int,
    nodes: int,
    data_parallel_size: int,
    max_position: int,
    reserve_gib: float,
    kv_bytes_per_token: int,
) -> Plan:
    """The budget's view of a plan: flags and variables vLLM reads, with vLLM's defaults."""
    raw_mb = env.get("VLLM_DEEPEP_BUFFER_SIZE_MB", str(DEEPEP_BUFFER_MB_DEFAULT))
    if not raw_mb.isdigit():
        raise BudgetError(f"VLLM_DEEPEP_BUFFER_SIZE_MB={raw_mb!r}: expected a whole number of MiB")
    util_raw = flag(argv, "--gpu-memory-utilization") or "0.9"
    try:
        util = float(util_raw)
    except ValueError:
        raise BudgetError(f"--gpu-memory-utilization {util_raw!r}: expected a fraction such as 0.9") from None
    symmetric = env.get("NVSHMEM_SYMMETRIC_SIZE")
    return Plan(
        backend=backend,
        ep_size=ep_size,
        tp_size=tp_size,
        nodes=nodes,
        # with DP 1 vLLM creates no EP buffer; the kernel check still runs, sized as for DP > 1
        tokens_per_rank=tokens_per_rank(backend, argv, env, vllm, max(data_parallel_size, 2)),
        max_model_len=_int_flag(argv, "--max-model-len") or max_position,
        gpu_memory_utilization=util,
        redundant_experts=redundant_experts(argv),
        deepep_buffer_mb=int(raw_mb),
        nvshmem_symmetric_size=parse_size(symmetric) if symmetric else None,
        reserve_bytes=reserve_gib * GiB,
        kv_bytes_per_token=kv_bytes_per_token,
        creates_buffers=data_parallel_size > 1,
        batched_tokens=tokens_per_rank(backend, argv, env, vllm, data_parallel_size),
    )


# --- the budget --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    how: str  # where the figure comes from
    change: str  # what lowers it


@dataclass(frozen=True)
class Budget:
    terms: tuple[Term, ...]
    gpu_bytes: float
    utilization: float

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    @property
    def limit(self) -> float:
        return self.gpu_bytes * self.utilization

    @property
    def fits(self) -> bool:
        return self.total <= self.limit

    @property
    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)


def nvshmem_heap_bytes(plan: Plan, shape: MoeShape) -> tuple[float, str]:
    """(bytes, how) of the NVSHMEM symmetric heap DeepEP's RDMA buffer needs on this GPU."""
    global_experts = shape.experts + plan.redundant_experts
    if plan.backend == "deepep_low_latency":
        need = ll_rdma_bytes(plan.tokens_per_rank, shape.hidden, plan.ep_size, global_experts)
        how = (
            f"low-latency size hint ({plan.tokens_per_rank} tokens/rank, hidden {shape.hidden}, {plan.ep_size} ranks, "
            f"{global_experts} experts) = {need / MiB:.0f} MiB"
        )
    elif plan.backend == "deepep_high_throughput" and plan.nodes > 1:
        need = plan.deepep_buffer_mb * MiB
        how = f"VLLM_DEEPEP_BUFFER_SIZE_MB={plan.deepep_buffer_mb} (internode RDMA buffer)"
    else:
        need = 0
        how = (
            "no RDMA buffer (one node, NVLink only)"
            if plan.backend == "deepep_high_throughput"
            else "none: DeepEP v2's buffer is NCCL symmetric memory (the ElasticBuffer row)"
        )
    heap = math.ceil(need / NVSHMEM_GRANULARITY) * NVSHMEM_GRANULARITY if need else 0
    if plan.nvshmem_symmetric_size is not None and plan.nvshmem_symmetric_size > heap:
        return plan.nvshmem_symmetric_size, f"NVSHMEM_SYMMETRIC_SIZE ({how})"
    return heap, f"{how}, in 512 MiB steps" if need else how


def budget(shape: MoeShape, plan: Plan, gpu_bytes: float, weights: tuple[float, float] | None = None) -> Budget:
    """The terms of one GPU. ``weights`` = (expert bytes, other bytes) from the safetensors headers when
    the checkpoint is on the node; else they are estimated from config.json."""
    expert_total, other_total = weights if weights else (shape.expert_bytes, shape.other_params * shape.weight_bytes)
    source = "safetensors headers" if weights else "estimated from config.json"
    per_expert = expert_total / max(shape.experts, 1)
    redundant = per_expert * plan.redundant_experts / plan.ep_size
    heap, heap_how = nvshmem_heap_bytes(plan, shape)
    nvl, nvl_how = plan.deepep_buffer_mb * MiB, f"VLLM_DEEPEP_BUFFER_SIZE_MB={plan.deepep_buffer_mb}"
    if plan.backend == "deepep_v2":
        per_node = max(1, plan.ep_size // max(plan.nodes, 1))
        nvl = elastic_buffer_bytes(plan.tokens_per_rank, shape.hidden, shape.topk, plan.ep_size, per_node)
        nvl_how = (
            f"ElasticBuffer size ({plan.tokens_per_rank} tokens/rank, hidden {shape.hidden}, top-{shape.topk}, "
            f"{plan.ep_size} ranks, {per_node} per NVLink domain, BF16 dispatch) = {nvl / MiB:.0f} MiB"
        )
    local_experts = math.ceil((shape.experts + plan.redundant_experts) / plan.ep_size)
    # the rows a rank's experts can be handed: low-latency pads every local expert to all ranks' tokens
    if not plan.creates_buffers:
        heap, nvl = 0, 0
        heap_how = nvl_how = "none: vLLM runs no EP kernels with data parallel size 1"
        tokens = plan.batched_tokens or plan.tokens_per_rank
        rows, rows_how = tokens * shape.topk, f"{tokens} tokens x top-{shape.topk}"
    elif plan.backend == "deepep_low_latency":
        rows = local_experts * plan.ep_size * plan.tokens_per_rank
        rows_how = f"{local_experts} local experts x {plan.ep_size} ranks x {plan.tokens_per_rank} tokens"
    else:
        rows = plan.ep_size * plan.tokens_per_rank * min(shape.topk, local_experts)
        rows_how = (
            f"{plan.ep_size} ranks x {plan.tokens_per_rank} tokens x {min(shape.topk, local_experts)} local experts"
        )
    act = rows * (shape.hidden * 2 + 2 * shape.moe_intermediate * 2 + shape.hidden * 2)
    terms = (
        Term(
            "weights",
            expert_total / plan.ep_size + other_total / plan.tp_size,
            f"{source}: experts / {plan.ep_size} EP ranks + rest / TP {plan.tp_size}",
            "more GPUs (EP size) or a quantized checkpoint",
        ),
        Term(
            "EPLB redundant experts",
            redundant,
            f"{plan.redundant_experts} redundant experts / {plan.ep_size} ranks",
            "fewer --eplb-config num_redundant_experts",
        ),
        Term(
            "KV cache",
            plan.kv_bytes_per_token * plan.max_model_len,
            f"one sequence of {plan.max_model_len} tokens",
            "a lower --max-model-len",
        ),
        Term(
            "DeepEP v2 ElasticBuffer" if plan.backend == "deepep_v2" else "DeepEP NVLink buffer",
            nvl,
            nvl_how,
            "fewer tokens per rank (--max-num-batched-tokens)"
            if plan.backend == "deepep_v2"
            else "a lower VLLM_DEEPEP_BUFFER_SIZE_MB",
        ),
        Term(
            "NVSHMEM symmetric heap",
            heap,
            heap_how,
            "fewer tokens per rank (--max-num-batched-tokens) or a smaller NVSHMEM_SYMMETRIC_SIZE",
        ),
        Term(
            "MoE activations",
            act,
            rows_how,
            "fewer tokens per rank (--max-num-batched-tokens)",
        ),
        Term(
            "CUDA graphs + other activations",
            plan.reserve_bytes,
            "reserve (preflight.ep_memory_reserve_gib)",
            "--enforce-eager, or measure and lower preflight.ep_memory_reserve_gib",
        ),
    )
    return Budget(terms, gpu_bytes, plan.gpu_memory_utilization)


def table(b: Budget, title: str) -> list[str]:
    """The budget as aligned lines: one per term, then the total against the limit."""
    width = max(len(t.name) for t in b.terms)
    out = [f"# EP memory budget per GPU: {title}"]
    for t in b.terms:
        out.append(f"  {t.name:<{width}}  {t.bytes / GiB:9.2f} GiB  {t.how}")
    verdict = "fits" if b.fits else "DOES NOT FIT"
    out.append(
        f"  {'total':<{width}}  {b.total / GiB:9.2f} GiB  of {b.limit / GiB:.2f} GiB "
        f"({b.gpu_bytes / GiB:.1f} GiB x {b.utilization:g}): {verdict}"
    )
    return out


def verdict(b: Budget) -> str:
    """One line: the total against the limit, and when it does not fit the largest term and what to change."""
    line = f"{b.total / GiB:.1f} GiB of {b.limit / GiB:.1f} GiB ({b.gpu_bytes / GiB:.1f} GiB x {b.utilization:g})"
    if b.fits:
        return f"{line}; largest: {b.largest.name} {b.largest.bytes / GiB:.1f} GiB"
    return f"{line}: over by {(b.total - b.limit) / GiB:.1f} GiB; largest: {b.largest.name} {b.largest.bytes / GiB:.1f} GiB"


# --- the node: its plan and the model's config.json (reads files; the arithmetic above does not) ------


@dataclass
class Found:
    """The budget's inputs for one node, or why there are none (``skip``) or they are wrong (``problem``)."""

    backend: str | None = None
    skip: str = ""
    problem: str = ""
    fix: str = ""
    folder: object = None
    shape: MoeShape | None = None
    plan: Plan | None = None


def for_node(node) -> Found:
    """From a :class:`preflight.context.NodeContext`: the backend, the model's shape and the plan's view."""
    from preflight import model

    if node.plan is None:
        return Found(skip="no deploy file: no all2all backend to check")
    backend = node.backend
    if backend not in EP_BACKENDS:
        return Found(backend, skip=f"all2all backend {backend or 'default'} uses no EP kernel library")
    folder = model.model_dir(node.config.model)
    if folder is None:
        return Found(
            backend, skip=f"{node.config.model}: config.json not on this node (the EP checks size the buffers from it)"
        )
    try:
        config = load_config(folder / "config.json")
        shape = moe_shape(config)
        lay, tp = node.plan.layout, node.config.tensor_parallel_size
        plan = plan_from(
            backend,
            node.plan.argv,
            node.env(),
            vllm=node.plan.target.version,
            ep_size=lay.data_parallel_size * tp,
            tp_size=tp,
            nodes=node.nodes,
            data_parallel_size=lay.data_parallel_size,
            max_position=config.get("max_position_embeddings") or 4096,
            reserve_gib=node.thresholds.get("ep_memory_reserve_gib"),
            kv_bytes_per_token=model.kv_bytes_per_token(config, tp) or 0,
        )
    except (BudgetError, ValueError) as exc:
        text = str(exc)
        return Found(
            backend,
            problem=f"{folder}/{text}" if text.startswith("config.json") else text,
            fix="point model: at a mixture-of-experts checkpoint, or pick a backend without EP kernels",
        )
    return Found(backend, folder=folder, shape=shape, plan=plan)


def node_budget(node, found: Found, gpu_bytes: float) -> Budget:
    """The budget of one GPU of ``node``: weights from the safetensors headers when they are on the node."""
    from preflight import model

    sizes = model.weights(found.folder)
    return budget(found.shape, found.plan, gpu_bytes, (sizes.expert_bytes, sizes.other_bytes) if sizes else None)


def title(node, found: Found) -> str:
    return f"{node.describe()}, {node.config.model}, {found.backend}, EP {found.plan.ep_size}"


def main(argv: list[str] | None = None) -> int:
    """``python -m preflight.ep_memory --deploy FILE [--node-rank N] [--gpu-memory-gib G]``: the table alone,
    also where no GPU is (give the GPU's memory)."""
    import argparse

    from launch.config import ConfigError
    from preflight import context, gpu

    parser = argparse.ArgumentParser(prog="python -m preflight.ep_memory", description=main.__doc__)
    parser.add_argument("--deploy", required=True)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--group", choices=("prefill", "decode"), default=None)
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="default: the first GPU's, from NVML")
    args = parser.parse_args(argv)
    try:
        node = context.build(args.deploy, args.node_rank, None, None, args.group)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    found = for_node(node)
    if found.skip or found.problem:
        print(f"error: {found.problem or found.skip}" + (f" (fix: {found.fix})" if found.fix else ""))
        return 2
    if args.gpu_memory_gib is not None:
        gpu_bytes = args.gpu_memory_gib * GiB
    else:
        seen = gpu.read_bounded(gpu.Pynvml, 30.0)
        if isinstance(seen, str) or not seen.gpus:
            print(f"error: GPU memory unknown ({seen if isinstance(seen, str) else 'no GPU'}); give --gpu-memory-gib")
            return 2
        gpu_bytes = seen.gpus[0].memory_total
    b = node_budget(node, found, gpu_bytes)
    print("\n".join(table(b, title(node, found))))
    if not b.fits:
        print(f"# does not fit: the largest term is {b.largest.name}: {b.largest.change}")
    return 0 if b.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
