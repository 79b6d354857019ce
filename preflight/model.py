"""Will the model fit: its config found locally, its experts split evenly over the EP ranks, and its
weights plus one full-length sequence of KV cache inside each GPU's share of memory.

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

EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E8M0": 1, "F4": 1, "U32": 4}


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
    found = sorted((p for p in snapshots.glob("*") if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
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
