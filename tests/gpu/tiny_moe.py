"""Writes a tiny random-weight Qwen3-MoE checkpoint and a tokenizer trained on the spot.

    python tests/gpu/tiny_moe.py OUT_DIR [HIDDEN]

For serving tests on machines that cannot download a model: 2 layers, hidden 256, 8 experts (top-2),
so that expert parallelism over 2 ranks puts experts 0-3 on one and 4-7 on the other. The weights are
random: outputs are meaningless, but every kernel path (MoE, all2all, attention) runs for real.
HIDDEN (default 256): DeepEP's low-latency kernels run only hidden sizes they are built for (2048 is one,
csrc/kernels/launch.cuh in deepseek-ai/DeepEP 73b6ea4); vLLM fails at the first dispatch with any other.
"""

from __future__ import annotations

import sys
from pathlib import Path

VOCAB = 2048


def write_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(4000)] + [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "expert",
        "parallel",
    ]
    corpus = [" ".join(words[i : i + 12]) for i in range(0, len(words), 7)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    fast.save_pretrained(out)
    return fast


def write_model(out: Path, eos_id: int, hidden: int = 256) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        max_position_embeddings=4096,
        eos_token_id=eos_id,
        bos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=False,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2) or (len(argv) == 2 and not argv[1].isdigit()):
        print("usage: tiny_moe.py OUT_DIR [HIDDEN]", file=sys.stderr)
        return 2
    out = Path(argv[0])
    hidden = int(argv[1]) if len(argv) == 2 else 256
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out)
    write_model(out, tok.convert_tokens_to_ids("<|endoftext|>"), hidden)
    print(f"tiny Qwen3-MoE (hidden {hidden}) written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
