#!/usr/bin/env python3
"""Reference fixtures for micromoe's decoders, made with Hugging Face transformers.

For each tiny random config of MixtralForCausalLM or Qwen2MoeForCausalLM this writes
tests/fixtures/decoders/<name>/ with the checkpoint exactly as `save_pretrained` writes it
(config.json + model.safetensors) and reference.json: a token sequence, the logits at every
position (fp32, eager attention, one full causal forward) and, per MoE layer, the experts
each position was routed to in router order (top-k of the softmax, best first) with the
margin between the k-th and (k+1)-th router probability.

Weights are drawn wider than the default init (std 0.02) so routing is decisive and the
logits are not all alike. Run from the repository root:

    pip install torch transformers safetensors
    python3 tools/make_decoder_fixtures.py
"""
import json
import os

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "decoders")
SEQ = 12

CASES = {
    "mixtral_tied": (MixtralConfig, MixtralForCausalLM, dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "mixtral_8x2_untied": (MixtralConfig, MixtralForCausalLM, dict(
        vocab_size=64, hidden_size=48, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        rope_theta=1e6, tie_word_embeddings=False, rms_norm_eps=1e-6)),
    "mixtral_top1_head_dim": (MixtralConfig, MixtralForCausalLM, dict(
        vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=24, num_local_experts=4,
        num_experts_per_tok=1, rope_theta=500.0, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "qwen2_moe_shared": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(
        vocab_size=72, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)),
    "qwen2_moe_dense_layers": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(
        vocab_size=64, hidden_size=40, intermediate_size=56, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=3, num_attention_heads=5,
        num_key_value_heads=5, num_experts=8, num_experts_per_tok=3, norm_topk_prob=True,
        mlp_only_layers=[1], rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "qwen2_moe_sparse_step": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(
        vocab_size=48, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, num_experts=6, num_experts_per_tok=2, decoder_sparse_step=2,
        norm_topk_prob=False, rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-6)),
}


def widen(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".gate.weight") or name.endswith("shared_expert_gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def case(name, cfg_cls, model_cls, kw, seed):
    torch.manual_seed(seed)
    cfg = cfg_cls(max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  attn_implementation="eager", **kw)
    model = model_cls(cfg).eval()
    widen(model, seed)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, cfg.vocab_size, (1, SEQ), generator=g)
    with torch.no_grad():
        out = model(input_ids=tokens, output_router_logits=True, use_cache=False)
    k = cfg.num_experts_per_tok
    experts, margins = [], []
    for rl in out.router_logits:
        probs = torch.softmax(rl.float(), dim=-1)
        top = torch.topk(probs, min(k + 1, probs.shape[-1]), dim=-1)
        experts.append(top.indices[:, :k].tolist())
        margins.append((top.values[:, k - 1] - top.values[:, k]).tolist() if probs.shape[-1] > k else [1.0] * SEQ)
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d)
    gen = os.path.join(d, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    ref = {"tokens": tokens[0].tolist(), "logits": out.logits[0].tolist(), "experts": experts, "margins": margins}
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(f"{name}: {len(experts)} MoE layers, min margin {min(min(m) for m in margins):.2e}")


def main():
    for i, (name, (cfg_cls, model_cls, kw)) in enumerate(CASES.items()):
        case(name, cfg_cls, model_cls, kw, 100 + i)


if __name__ == "__main__":
    main()
