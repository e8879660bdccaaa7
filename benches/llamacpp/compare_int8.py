"""Several quantized models' logits beside transformers' float32 logits.

    python3 compare_int8.py HF_DIR [--micromoe BIN] [--llama-logits BIN]
                            [--json OUT.json] LABEL=MODEL ...

For each token list (check_logits.py's 8 ids, and a fixed list of 32 ids)
runs the checkpoint's MixtralForCausalLM (float32, eager attention) once,
then each MODEL:

- a .moe file through `MICROMOE eval MODEL --tokens IDS --json` (token by
  token through the KV cache);
- a .gguf file through logits.cpp's binary (`LLAMA_LOGITS MODEL IDS 1 KV`,
  one batch, an output at every position); LABEL=MODEL.gguf@f32 uses an f32
  KV cache instead of llama.cpp's default f16.

and prints, per model and list, the largest and the mean absolute logit
difference over all positions and the vocabulary, and at how many positions
the argmax agrees. Both engines also print the experts each layer chose;
beside transformers' (top-2 of its router logits) the script counts the
(layer, position) choices whose expert set differs and gives the logit
error again over the "clean prefix": the positions before the first such
difference anywhere (a different expert at layer l, position q changes
every later layer at q and, through attention, every later position). On
random models the routers are nearly tied, so one flip dominates the error.
Last, per list, every model's error over the common clean prefix (before
the first flip of any model), the same positions for all. Example (the models run.sh and micromoe convert write):

    W=/tmp/llamacpp-work
    python3 compare_int8.py $W/hf/mixtral-1024 \\
        f32=$W/moe/mixtral-1024-f32.moe int8=$W/moe/mixtral-1024-int8.moe \\
        g32=$W/moe/mixtral-1024-int8-g32.moe q8_0=$W/gguf/mixtral-1024-q8_0.gguf
"""

import argparse
import json
import subprocess

import torch
from transformers import MixtralForCausalLM

TOKEN_LISTS = {
    # check_logits.py's default list.
    "8": "1,15,27,300,4000,31999,7,7",
    # 1 then 31 ids from random.Random(32).randrange(3, 32000), written out.
    "32": "1,2539,30362,7002,4742,9935,22886,29501,7795,16264,799,23603,1266,3287,10643,"
          "16679,10827,27628,1872,17134,22631,30958,28897,15363,12158,19703,27,17776,"
          "24751,25612,4145,17195",
}


def logits_of(path, tokens, args):
    if path.endswith(".moe"):
        cmd = [args.micromoe, "eval", path, "--tokens", tokens, "--json"]
    else:
        path, _, kv = path.partition("@")
        cmd = [args.llama_logits, path, tokens, "1", kv or "f16"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    out = json.loads(out)
    return torch.tensor(out["logits"], dtype=torch.float64), out["experts"]


def first_flip(experts, ref_experts):
    """Count of differing (layer, position) expert sets; first differing position."""
    flips, first = 0, None
    for layer, ref_layer in zip(experts, ref_experts, strict=True):
        for q, (a, b) in enumerate(zip(layer, ref_layer, strict=True)):
            if set(a) != set(b):
                flips += 1
                first = q if first is None else min(first, q)
    return flips, first


def main():
    p = argparse.ArgumentParser()
    p.add_argument("hf_dir")
    p.add_argument("models", nargs="+", help="LABEL=PATH (.moe or .gguf[@f32])")
    p.add_argument("--micromoe", default="target/release/micromoe")
    p.add_argument("--llama-logits", default="/tmp/llamacpp/build/bin/mm-logits")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    models = [m.split("=", 1) for m in args.models]

    model = MixtralForCausalLM.from_pretrained(args.hf_dir, torch_dtype=torch.float32,
                                               attn_implementation="eager").eval()
    rows = []
    print(f"{args.hf_dir}")
    print(f"{'model':<12} {'ids':>3} {'max|diff|':>10} {'mean|diff|':>11} {'argmax':>7} "
          f"{'flips':>5} {'clean':>5} {'clean max':>10} {'clean mean':>10}")
    for name, tokens in TOKEN_LISTS.items():
        ids = [int(t) for t in tokens.split(",")]
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_router_logits=True)
        ref = out.logits[0].double()
        k = model.config.num_experts_per_tok
        router = [r.reshape(len(ids), -1).float() for r in out.router_logits]
        ref_experts = [r.topk(k, dim=-1).indices.tolist() for r in router]
        # How near-tied the routers are: gap between the k-th and (k+1)-th router logit.
        gaps = torch.cat([(r.sort(-1, descending=True).values[:, k - 1] -
                           r.sort(-1, descending=True).values[:, k]) for r in router])
        print(f"{len(ids)} ids: max |logit| {ref.abs().max().item():.3g}; router gap between "
              f"expert {k} and {k + 1}: min {gaps.min().item():.2g}, median {gaps.median().item():.2g}")
        diffs = {}
        for label, path in models:
            ours, experts = logits_of(path, tokens, args)
            assert ours.shape == ref.shape, (label, ours.shape, ref.shape)
            d = (ours - ref).abs()
            agree = int((ours.argmax(-1) == ref.argmax(-1)).sum())
            flips, first = first_flip(experts, ref_experts)
            clean = len(ids) if first is None else first
            dc = d[:clean]
            diffs[label] = (d, clean)
            row = {"model": label, "path": path, "ids": len(ids), "max": d.max().item(),
                   "mean": d.mean().item(), "argmax_agree": agree,
                   "ref_max_abs": ref.abs().max().item(), "expert_flips": flips,
                   "clean_prefix": clean,
                   "clean_max": dc.max().item() if clean else None,
                   "clean_mean": dc.mean().item() if clean else None}
            rows.append(row)
            cm = f"{row['clean_max']:>10.3g} {row['clean_mean']:>10.3g}" if clean else f"{'-':>10} {'-':>10}"
            print(f"{label:<12} {len(ids):>3} {row['max']:>10.3g} {row['mean']:>11.3g} "
                  f"{agree:>3}/{len(ids):<3} {flips:>5} {clean:>5} {cm}", flush=True)
        common = min(c for _, c in diffs.values())
        print(f"  common clean prefix: {common} of {len(ids)} positions"
              + "".join(f"; {lb} max {d[:common].max().item():.3g} mean {d[:common].mean().item():.3g}"
                        for lb, (d, _) in diffs.items()) if common else "  no common clean prefix")
        rows.append({"ids": len(ids), "common_clean_prefix": common,
                     "common": {lb: [d[:common].max().item(), d[:common].mean().item()]
                                for lb, (d, _) in diffs.items()} if common else None})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
