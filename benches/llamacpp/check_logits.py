"""micromoe's logits beside transformers' on the same checkpoint.

    python3 check_logits.py HF_DIR MODEL.moe [MICROMOE_BIN] [TOKENS]

runs `micromoe eval MODEL.moe --tokens TOKENS --json` and the checkpoint's
MixtralForCausalLM (float32, eager attention) on the same ids, and prints
the largest absolute logit difference, the logits' scale and whether the
argmax agrees at every position. Exits 1 when an argmax differs.
"""

import json
import subprocess
import sys

import torch
from transformers import MixtralForCausalLM

hf_dir, moe = sys.argv[1], sys.argv[2]
binary = sys.argv[3] if len(sys.argv) > 3 else "target/release/micromoe"
tokens = sys.argv[4] if len(sys.argv) > 4 else "1,15,27,300,4000,31999,7,7"
ids = [int(t) for t in tokens.split(",")]

out = subprocess.run([binary, "eval", moe, "--tokens", tokens, "--json"],
                     check=True, capture_output=True, text=True).stdout
ours = torch.tensor(json.loads(out)["logits"], dtype=torch.float64)

model = MixtralForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32,
                                           attn_implementation="eager").eval()
with torch.no_grad():
    ref = model(torch.tensor([ids])).logits[0].double()

diff = (ours - ref).abs().max().item()
scale = ref.abs().max().item()
same = bool((ours.argmax(-1) == ref.argmax(-1)).all())
print(f"{moe}: max |logit diff| {diff:.3g} (max |logit| {scale:.3g}), "
      f"argmax agrees at all {len(ids)} positions: {same}")
sys.exit(0 if same else 1)
