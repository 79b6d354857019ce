"""Will the model fit: its config found locally, its experts spread over the EP ranks the way vLLM spreads them,
and its weights plus one full-length sequence of KV cache inside each GPU's share of memory.

Weights are counted from the safetensors headers (8-byte length + JSON, no tensor is read), split into
expert tensors (sharded over the EP ranks) and the rest (sharded over TP, replicated across DP ranks).
The KV estimate follows the attention type: MLA (DeepSeek: kv_lora_rank + qk_rope_head_dim per layer)
or grouped-query attention (2 x kv heads x head dim per layer, sharded over TP).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from preflight.verdict import Verdict

EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E8M0": 1,
    "F4": 1,
    "U32": 4,
}


def hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def model_dir(model: str, cache: Path | None = None) -> Path | None:
    """The folder holding the model's config.json: the path itself, or the Hugging Face cache snapshot
    (the one refs/main names, else the newest)."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    repo = (cache or hub_cache()) / f"models--{model.replace('/', '--')}"
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip() / "config.json").is_file():
        return snapshots / ref.read_text().strip()
    found = (
        sorted((p for p in snapshots.glob("*") if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
        if snapshots.is_dir()
        else []
    )
    return found[-1] if found else None


def load_config(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    # Multimodal MoE models keep the language model's settings in text_config.
    return {**config.get("text_config", {}), **config} if isinstance(config.get("text_config"), dict) else config


def experts(config: dict) -> int | None:
    for key in EXPERT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


@dataclass(frozen=True)
class Weights:
    expert_bytes: int
    other_bytes: int
    files: int

    def per_gpu(self, tp: int, ep: int) -> float:
        return self.expert_bytes / ep + self.other_bytes / tp


def tensor_bytes(file: Path) -> tuple[int, int]:
    """(expert bytes, other bytes) of one safetensors file, from its header alone."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    expert = other = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in info["shape"]:
            count *= dim
        size = count * DTYPE_BYTES.get(info["dtype"], 2)
        if ".experts." in name:
            expert += size
        else:
            other += size
    return expert, other


def weights(folder: Path) -> Weights | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    expert = other = 0
    for file in files:
        e, o = tensor_bytes(file)
        expert, other = expert + e, other + o
    return Weights(expert, other, len(files))


def kv_bytes_per_token(config: dict, tp: int, dtype_bytes: int = 2) -> int | None:
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int):
        return None
    if config.get("kv_lora_rank"):
        # MLA caches one compressed latent per token and layer, the same on every TP rank.
        return layers * (config["kv_lora_rank"] + config.get("qk_rope_head_dim", 0)) * dtype_bytes
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // max(1, config.get("num_attention_heads", 1)))
    if not heads or not head_dim:
        return None
    return 2 * layers * max(1, heads // tp) * head_dim * dtype_bytes


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``--name V`` or ``--name=V`` in a vllm serve argv."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def eplb(argv: list[str]) -> tuple[bool, int]:
    """(EPLB on, redundant experts) from a vllm serve argv: --enable-eplb, and --num-redundant-experts N (vLLM
    0.10.1.1 .. ) or --eplb-config '{"num_redundant_experts": N}' / --eplb-config.num_redundant_experts N (newer)."""
    enabled = "--enable-eplb" in argv
    redundant = flag(argv, "--num-redundant-experts") or flag(argv, "--eplb-config.num_redundant_experts")
    config = flag(argv, "--eplb-config")
    if redundant is None and config:
        try:
            redundant = json.loads(config).get("num_redundant_experts")
        except (ValueError, AttributeError):
            redundant = None
    try:
        return enabled, int(redundant or 0)
    except (TypeError, ValueError):
        return enabled, 0


def expert_split(experts: int, ep: int, eplb_on: bool = False, redundant: int = 0) -> Verdict:
    """How vLLM places ``experts`` over ``ep`` ranks. Without EPLB an uneven count is fine: the first
    ``experts % ep`` ranks hold one more (vllm/model_executor/layers/fused_moe/layer.py determine_expert_map in
    0.10.1.1, fused_moe/expert_map_manager.py in 0.33.0). With EPLB vLLM refuses a physical count (experts +
    redundant) that does not divide ("EPLB currently only supports even distribution of experts across ranks",
    fused_moe/layer.py in both), and redundant experts without EPLB ("Redundant experts are only supported with
    EPLB")."""
    if redundant and not eplb_on:
        return Verdict(
            False,
            f"{redundant} redundant experts without --enable-eplb",
            "redundant experts only with EPLB",
            fix="add --enable-eplb, or drop the redundant experts",
        )
    physical = experts + (redundant if eplb_on else 0)
    counted = f"{experts} + {redundant} redundant" if eplb_on and redundant else str(experts)
    base, extra = divmod(physical, ep)
    if extra == 0:
        return Verdict(True, f"{counted} experts over {ep} EP ranks: {base} each")
    if eplb_on:
        fits = [n for n in range(redundant + 1, redundant + ep + 1) if (experts + n) % ep == 0][:1]
        return Verdict(
            False,
            f"{counted} experts over {ep} EP ranks",
            f"(experts + redundant) a multiple of {ep} with EPLB",
            fix=f"set the redundant experts to {fits[0]}" + " (--num-redundant-experts or --eplb-config)",
            why="vLLM's EPLB places the same number of physical experts on every rank",
        )

    def ranks(first: int, last: int) -> str:
        return f"rank {first} holds" if first == last else f"ranks {first}-{last} hold"

    spread = f"{ranks(0, extra - 1)} {base + 1}, {ranks(extra, ep - 1)} {base}"
    return Verdict(
        True,
        f"{counted} experts over {ep} EP ranks: {spread} (note: uneven; vLLM gives the remainder "
        f"to the first ranks, whose MoE layers carry more experts)",
    )
