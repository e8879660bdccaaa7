"""Random seeded Mixtral checkpoints (Hugging Face format) for both engines.

    python3 make_models.py OUT_DIR [512 1024]

writes OUT_DIR/mixtral-{H}/ (config.json, model.safetensors in float32,
tokenizer.model and tokenizer_config.json) for each width H. The shapes are
those of examples/decode_bench.rs's built-in models: vocabulary 32,000 with
an untied head, 4 layers, 8 experts top-2 of inner width 3.5 x H, 8 query
and 2 key/value heads, RoPE base 1e6, context 512.

The tokenizer exists only because llama.cpp's convert_hf_to_gguf.py wants
one: a small Llama-style sentencepiece BPE model (byte fallback, <unk>,
<s>, </s> at 0, 1, 2) trained offline on a built-in text; the converter
pads its vocabulary to 32,000 with [PAD] entries. Neither benchmark
tokenizes text: both feed token ids.
"""

import io
import json
import os
import sys

import sentencepiece as spm
import torch
from transformers import MixtralConfig, MixtralForCausalLM

CORPUS = """\
Sparse mixture of experts models route every token to a few experts.
The router scores each expert and keeps the best two; the others are skipped.
A decoder keeps the keys and values of earlier positions in its cache.
Rotary position embeddings turn each pair of dimensions by an angle.
The quick brown fox jumps over the lazy dog, again and again and again.
Numbers such as 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in text too.
"""


def tokenizer(out_dir):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, f, indent=2)


def write(out_dir, hidden):
    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=hidden * 7 // 2,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    torch.manual_seed(hidden)
    model = MixtralForCausalLM(config).to(torch.float32).eval()
    # Random norms (around 1) so that a logits check also covers them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # transformers 5 writes rope_parameters and "head_dim": null; llama.cpp's
    # Feb 2025 converter reads a top-level rope_theta (else 10,000) and
    # fails on a null head_dim. Both engines then read RoPE base 1e6.
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        c = json.load(f)
    c["rope_theta"] = 1e6
    if c.get("head_dim", 0) is None:
        del c["head_dim"]
    with open(path, "w") as f:
        json.dump(c, f, indent=2)
    tokenizer(out_dir)


if __name__ == "__main__":
    root, widths = sys.argv[1], [int(a) for a in sys.argv[2:]] or [512, 1024]
    for h in widths:
        d = os.path.join(root, f"mixtral-{h}")
        write(d, h)
        print(d)
