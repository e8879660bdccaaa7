#!/usr/bin/env python3
"""Train micromoe's tiny MoE language model: a Mixtral-style decoder over bytes.

Corpus: the Python language reference topics that ship with every CPython install
(`pydoc_data/topics.py`, Python Software Foundation License 2; Debian package
libpython3.11-stdlib), about 465 KB of English technical prose. Tokens are ASCII bytes
(vocabulary 128; the few non-ASCII characters become '?'), so no tokenizer file is needed.

Model: transformers' MixtralForCausalLM, 2 layers, hidden 64, 4 heads over 2 KV heads,
4 SwiGLU experts (hidden 128) with top-2 routing, tied embeddings: ~230 k parameters,
small enough for a microcontroller's flash. Deterministic (seed 0, one thread order).

    pip install torch transformers safetensors
    python3 tools/train_tinylm.py            # writes models/tinylm/

Writes config.json + model.safetensors (save_pretrained) and reference.json: the
held-out loss, and greedy continuations of a few prompts by `generate` (eager
attention, fp32), which the Rust side must reproduce.
"""
import json
import math
import os
import sys
import time

import torch
from pydoc_data import topics
from transformers import MixtralConfig, MixtralForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "models", "tinylm")
STEPS = int(os.environ.get("STEPS", "3000"))
SEQ, BATCH = 128, 32
PROMPTS = ["The ", "def ", "A class ", "If the "]


def corpus():
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return bytes(ord(c) if ord(c) < 128 else ord("?") for c in text)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = torch.tensor(list(corpus()), dtype=torch.long)
    split = int(len(data) * 0.95)
    train, val = data[:split], data[split:]
    cfg = MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, rope_theta=10000.0,
        tie_word_embeddings=True, router_aux_loss_coef=0.02, output_router_logits=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
        attn_implementation="eager",
    )
    model = MixtralForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=STEPS, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    model.train()
    for step in range(STEPS):
        ix = torch.randint(0, len(train) - SEQ - 1, (BATCH,), generator=g)
        x = torch.stack([train[i:i + SEQ] for i in ix])
        out = model(input_ids=x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step} loss {out.loss.item():.3f} ({time.time() - t0:.0f} s)", file=sys.stderr)

    model.eval()
    model.config.output_router_logits = False
    with torch.no_grad():
        losses = []
        for i in range(0, len(val) - SEQ - 1, SEQ):
            x = val[i:i + SEQ][None]
            losses.append(model(input_ids=x, labels=x).loss.item())
        val_loss = sum(losses) / len(losses)
        continuations = {}
        for p in PROMPTS:
            ids = torch.tensor([list(p.encode())])
            gen = model.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=0)
            continuations[p] = gen[0, ids.shape[1]:].tolist()
    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT)
    ref = {
        "corpus": "pydoc_data/topics.py (CPython 3.11, PSF License 2), ASCII bytes",
        "steps": STEPS,
        "params": sum(p.numel() for p in model.parameters()),
        "val_loss_nats": val_loss,
        "val_bits_per_byte": val_loss / math.log(2),
        "greedy": continuations,
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    for p, c in continuations.items():
        print(repr(p + bytes(c).decode("ascii", "replace")))
    print(json.dumps({k: v for k, v in ref.items() if k != "greedy"}))


if __name__ == "__main__":
    main()
