"""Model fit: the config is found (path or Hugging Face cache), experts are placed over the EP ranks as vLLM
places them (tests/test_preflight_judges.py holds the table), and the weights are sized from safetensors headers
without reading a tensor."""

from __future__ import annotations

import json
import struct

from preflight import model
from tests.conftest import run_module


def write_safetensors(path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A real safetensors file: header JSON, then the (zero) data the header describes."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = model.DTYPE_BYTES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


DEEPSEEK_LIKE = {
    "model_type": "deepseek_v3",
    "n_routed_experts": 8,
    "num_hidden_layers": 2,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "num_attention_heads": 4,
    "hidden_size": 256,
    "max_position_embeddings": 4096,
}


def moe_folder(tmp_path, config=DEEPSEEK_LIKE):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(
        folder / "model-00001.safetensors",
        {
            "model.layers.0.mlp.experts.0.up_proj.weight": ("BF16", [64, 256]),  # 32 KiB
            "model.layers.0.mlp.experts.1.up_proj.weight": ("BF16", [64, 256]),
            "model.embed_tokens.weight": ("BF16", [128, 256]),  # 64 KiB
        },
    )
    write_safetensors(folder / "model-00002.safetensors", {"lm_head.weight": ("F32", [128, 256])})  # 128 KiB
    return folder


def test_weights_are_split_into_experts_and_the_rest(tmp_path):
    sizes = model.weights(moe_folder(tmp_path))
    assert (sizes.expert_bytes, sizes.other_bytes, sizes.files) == (65536, 65536 + 131072, 2)
    # experts shard over EP ranks, the rest over TP only
    assert sizes.per_gpu(tp=1, ep=2) == 32768 + 196608


def test_kv_per_token_for_mla_and_gqa():
    assert model.kv_bytes_per_token(DEEPSEEK_LIKE, tp=8) == 2 * (512 + 64) * 2  # MLA: same on every TP rank
    gqa = {"num_hidden_layers": 48, "num_key_value_heads": 4, "head_dim": 128}
    assert model.kv_bytes_per_token(gqa, tp=1) == 2 * 48 * 4 * 128 * 2
    assert model.kv_bytes_per_token(gqa, tp=4) == 2 * 48 * 1 * 128 * 2


def test_expert_count_from_each_family():
    assert model.experts({"n_routed_experts": 256}) == 256  # DeepSeek-V3
    assert model.experts({"num_experts": 128}) == 128  # Qwen3-MoE
    assert model.experts({"num_local_experts": 8}) == 8  # Mixtral, transformers 5 Qwen3-MoE
    assert model.experts({"hidden_size": 4096}) is None  # dense


def test_config_found_in_the_hugging_face_cache(tmp_path):
    snap = tmp_path / "models--org--moe" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--moe" / "refs").mkdir()
    (tmp_path / "models--org--moe" / "refs" / "main").write_text("abc123")
    assert model.model_dir("org/moe", cache=tmp_path) == snap
    assert model.model_dir("org/other", cache=tmp_path) is None


def test_flags_in_both_spellings():
    assert model.flag(["--max-model-len", "8192"], "--max-model-len") == "8192"
    assert model.flag(["--gpu-memory-utilization=0.8"], "--gpu-memory-utilization") == "0.8"
    assert model.flag([], "--max-model-len") is None


def preflight_model(tmp_path, more: str = ""):
    folder = moe_folder(tmp_path)
    deploy = tmp_path / "d.yaml"
    deploy.write_text(
        f"model: {folder}\nnodes:\n  - {{address: 127.0.0.1, gpus: 3}}\nnetwork: {{transport: tcp, socket_ifname: lo}}\n"
        + more
    )
    res = run_module("preflight", "--deploy", str(deploy), "--node-rank", "0", "-k", "model and not GPU")
    assert "Traceback" not in res.out + res.err
    return res


def test_preflight_notes_an_uneven_expert_split_without_failing(tmp_path):
    res = preflight_model(tmp_path)
    assert "PASS  model        model config readable on this node" in res.out
    assert "PASS  model        experts over the EP ranks" in res.out
    assert "8 experts over 3 EP ranks: ranks 0-1 hold 3, rank 2 holds 2 (note: uneven" in res.out
    assert "SKIP  model        weights + one full sequence of KV cache fit a GPU" in res.out  # no GPU here
    assert res.code == 0


def test_preflight_fails_an_eplb_layout_vllm_refuses(tmp_path):
    res = preflight_model(tmp_path, "eplb: {num_redundant_experts: 2}\nvllm_version: 0.10.1.1\n")  # its own flags
    assert "FAIL  model        experts over the EP ranks" in res.out
    assert (
        "8 + 2 redundant experts over 3 EP ranks (expected (experts + redundant) a multiple of 3 with EPLB)" in res.out
    )
    assert "set the redundant experts to 4" in res.out and res.code == 1
