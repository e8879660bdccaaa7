#!/usr/bin/env python3
"""PyTorch eager on the layer examples/cuda_bench times: transformers'
MixtralSparseMoeBlock with the same weights (written by
`cuda_bench --save-layer FILE`), on GPU 0, f32 and f16, at 1, 256 and 4096
tokens; tokens/s, the median of 20 runs after 3 warm-ups, each run ended by
torch.cuda.synchronize(). The weights load with strict names and shapes
(either transformers layout: per-expert w1 / w3 / w2, or 5.x's fused
gate_up_proj / down_proj).

    python3 tools/torch_moe_bench.py layer.safetensors [--cpu]

--cpu runs it on the CPU instead (a check of the script without a GPU).

Needs torch with CUDA, transformers and safetensors; says why and exits 0
without them (tools/gpu-check.sh runs it where it can).
"""

import statistics
import sys
import time


def main():
    args = [a for a in sys.argv[1:] if a != "--cpu"]
    on_cpu = len(args) < len(sys.argv) - 1
    if len(args) != 1:
        sys.exit(__doc__)
    try:
        import torch
        from safetensors.torch import load_file
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as e:
        print(f"torch_moe_bench: skipped ({e})")
        return
    if not on_cpu and not torch.cuda.is_available():
        print("torch_moe_bench: skipped (torch sees no CUDA device)")
        return
    dev = "cpu" if on_cpu else "cuda"
    sync = (lambda: None) if on_cpu else torch.cuda.synchronize
    t = load_file(args[0])
    experts, hidden = t["gate.weight"].shape
    inner = t["experts.0.w1.weight"].shape[0]
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inner, num_local_experts=experts,
                        num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(cfg).eval()
    state = block.state_dict()
    if "experts.gate_up_proj" in state:
        # transformers 5: experts fused, gate_up (E, 2I, H) gate first, down (E, H, I).
        w = {"gate.weight": t["gate.weight"],
             "experts.gate_up_proj": torch.stack([torch.cat([t[f"experts.{e}.w1.weight"],
                                                             t[f"experts.{e}.w3.weight"]]) for e in range(experts)]),
             "experts.down_proj": torch.stack([t[f"experts.{e}.w2.weight"] for e in range(experts)])}
    else:
        w = t
    block.load_state_dict({k: v.reshape(state[k].shape) for k, v in w.items()}, strict=True)
    print(f"PyTorch {torch.__version__} eager MixtralSparseMoeBlock: width {hidden}, {experts} experts of "
          f"{inner}, top-2, on {'the CPU' if on_cpu else torch.cuda.get_device_name(0)}; tokens/s")
    print(f"{'tokens':>6} {'torch f32':>12} {'torch f16':>12}")
    gen = torch.Generator().manual_seed(0)
    blocks = {"f32": block.to(dev), "f16": MixtralSparseMoeBlock(cfg).eval()}
    blocks["f16"].load_state_dict(blocks["f32"].state_dict())
    blocks["f16"] = blocks["f16"].to(dev).half()
    for n in (1, 256, 4096):
        x = (torch.rand(1, n, hidden, generator=gen) - 0.5).to(dev)
        rates = []
        for name, b in blocks.items():
            xi = x if name == "f32" else x.half()
            with torch.no_grad():
                times = []
                for i in range(23):
                    sync()
                    start = time.perf_counter()
                    out = b(xi)
                    sync()
                    if i >= 3:
                        times.append(time.perf_counter() - start)
                y = out[0] if isinstance(out, tuple) else out
                if not torch.isfinite(y).all():
                    sys.exit(f"{name}: non-finite outputs")
            rates.append(n / statistics.median(times))
        print(f"{n:>6} {rates[0]:>12.0f} {rates[1]:>12.0f}")


if __name__ == "__main__":
    main()
