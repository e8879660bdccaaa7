#!/usr/bin/env python3
"""Reference fixtures for micromoe's tests, made with PyTorch + Hugging Face transformers.

Each case is one safetensors file under tests/fixtures/ holding a random MoE block's
weights (our names), inputs, the block's outputs, router logits and chosen experts,
and its hyper-parameters in the metadata. Run from the repository root:

    pip install torch transformers safetensors
    python3 tools/make_fixtures.py

Blocks: transformers' MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock and the
DeepseekV3TopkRouter (router only), and Switch / GLaM-style layers of MLP experts with
biases written with PyTorch ops (nn.Linear, gelu, relu, softmax, topk). Weights are drawn with a larger spread than the
default init so routing is decisive, not uniform.
"""
import json
import os

import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


def init_(t, std):
    with torch.no_grad():
        t.normal_(0.0, std)


def expert_tensors(prefix, gate_up, down):
    """Split HF's fused (2I, H) gate_up into w1 (gate) and w3 (up); w2 = down."""
    inter = down.shape[1]
    return {
        f"{prefix}.w1": gate_up[:inter].contiguous(),
        f"{prefix}.w3": gate_up[inter:].contiguous(),
        f"{prefix}.w2": down.contiguous(),
    }


def f16_rounded(block):
    """A copy of the block whose weights are rounded to f16 (still computed in f32)."""
    import copy

    b = copy.deepcopy(block)
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(p.half().float())
    return b


def run(block, x, router):
    with torch.no_grad():
        y = block(x[None])[0]
        logits, weights, idx = router(x)
    return y, logits, weights, idx


def mixtral_case(name, hidden, inter, experts, k, tokens, seed):
    torch.manual_seed(seed)
    cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                        num_experts_per_tok=k, hidden_act="silu")
    block = MixtralSparseMoeBlock(cfg).eval()
    init_(block.gate.weight, 3.0 / hidden**0.5)
    init_(block.experts.gate_up_proj, 1.0 / hidden**0.5)
    init_(block.experts.down_proj, 1.0 / inter**0.5)
    x = torch.randn(tokens, hidden)
    y, logits, weights, idx = run(block, x, block.gate)
    b16 = f16_rounded(block)
    y16, _, _, idx16 = run(b16, x, b16.gate)
    t = {"x": x, "y": y, "y_f16w": y16, "experts_f16w": idx16.to(torch.int64), "logits": logits, "weights": weights, "experts": idx.to(torch.int64),
         "gate": block.gate.weight.detach()}
    for e in range(experts):
        t.update(expert_tensors(f"experts.{e}", block.experts.gate_up_proj[e].detach(),
                                block.experts.down_proj[e].detach()))
    meta = {"arch": "mixtral", "hidden": hidden, "inter": inter, "experts": experts, "k": k,
            "norm_topk_prob": 1, "act": "silu", "shared": 0}
    save(name, t, meta)


def qwen_case(name, hidden, inter, shared_inter, experts, k, norm, tokens, seed):
    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(hidden_size=hidden, moe_intermediate_size=inter,
                         shared_expert_intermediate_size=shared_inter, num_experts=experts,
                         num_experts_per_tok=k, norm_topk_prob=norm, hidden_act="silu")
    block = Qwen2MoeSparseMoeBlock(cfg).eval()
    init_(block.gate.weight, 3.0 / hidden**0.5)
    init_(block.experts.gate_up_proj, 1.0 / hidden**0.5)
    init_(block.experts.down_proj, 1.0 / inter**0.5)
    for lin in (block.shared_expert.gate_proj, block.shared_expert.up_proj):
        init_(lin.weight, 1.0 / hidden**0.5)
    init_(block.shared_expert.down_proj.weight, 1.0 / shared_inter**0.5)
    init_(block.shared_expert_gate.weight, 1.0 / hidden**0.5)
    x = torch.randn(tokens, hidden)
    y, logits, weights, idx = run(block, x, block.gate)
    b16 = f16_rounded(block)
    y16, _, _, idx16 = run(b16, x, b16.gate)
    t = {"x": x, "y": y, "y_f16w": y16, "experts_f16w": idx16.to(torch.int64), "logits": logits, "weights": weights, "experts": idx.to(torch.int64),
         "gate": block.gate.weight.detach(),
         "shared.w1": block.shared_expert.gate_proj.weight.detach(),
         "shared.w3": block.shared_expert.up_proj.weight.detach(),
         "shared.w2": block.shared_expert.down_proj.weight.detach(),
         "shared_gate": block.shared_expert_gate.weight.detach()}
    for e in range(experts):
        t.update(expert_tensors(f"experts.{e}", block.experts.gate_up_proj[e].detach(),
                                block.experts.down_proj[e].detach()))
    meta = {"arch": "qwen2_moe", "hidden": hidden, "inter": inter, "experts": experts, "k": k,
            "norm_topk_prob": int(norm), "act": "silu", "shared": 1}
    save(name, t, meta)


def mlp_case(name, hidden, inter, experts, k, act, router, tokens, seed):
    """A Switch / GLaM-style layer of plain MLP experts with biases, written with PyTorch ops."""
    torch.manual_seed(seed)
    gate = torch.nn.Linear(hidden, experts, bias=False)
    ups = [torch.nn.Linear(hidden, inter) for _ in range(experts)]
    downs = [torch.nn.Linear(inter, hidden) for _ in range(experts)]
    init_(gate.weight, 3.0 / hidden**0.5)
    for up, down in zip(ups, downs):
        init_(up.weight, 1.0 / hidden**0.5)
        init_(up.bias, 0.5)
        init_(down.weight, 1.0 / inter**0.5)
        init_(down.bias, 0.2)
    f = {"gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu}[act]
    x = torch.randn(tokens, hidden)

    def forward(r):
        """The layer with weight matrices passed through r (biases stay f32, as micromoe keeps them)."""
        with torch.no_grad():
            logits = torch.nn.functional.linear(x, r(gate.weight))
            probs = torch.softmax(logits, dim=-1)
            weights, idx = torch.topk(probs, k, dim=-1)
            if router == "mixtral":
                weights = weights / weights.sum(dim=-1, keepdim=True)
            y = torch.zeros_like(x)
            for t in range(tokens):
                for i in range(k):
                    e = idx[t, i]
                    h = f(torch.nn.functional.linear(x[t], r(ups[e].weight), ups[e].bias))
                    y[t] += weights[t, i] * torch.nn.functional.linear(h, r(downs[e].weight), downs[e].bias)
        return y, logits, weights, idx

    y, logits, weights, idx = forward(lambda w: w)
    y16, _, _, idx16 = forward(lambda w: w.half().float())
    t = {"x": x, "y": y, "y_f16w": y16, "experts_f16w": idx16.to(torch.int64), "logits": logits, "weights": weights,
         "experts": idx.to(torch.int64), "gate": gate.weight}
    for e in range(experts):
        t[f"experts.{e}.up"] = ups[e].weight
        t[f"experts.{e}.up_bias"] = ups[e].bias
        t[f"experts.{e}.down"] = downs[e].weight
        t[f"experts.{e}.down_bias"] = downs[e].bias
    meta = {"arch": "mlp_moe", "router": router, "hidden": hidden, "inter": inter, "experts": experts, "k": k,
            "act": act, "shared": 0}
    save(name, t, meta)


def mmoe_case(name, inputs, experts, hidden, width, tokens, seed):
    """A multi-gate MoE (Ma et al. 2018) in micromoe's checkpoint naming scheme: task 0 with a
    dense softmax gate and a 3-output tower, task 1 with a top-2 (renormalized) gate and a
    1-output tower. Written with PyTorch ops; saved as a checkpoint directory plus references."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear
    ups = [lin(inputs, hidden) for _ in range(experts)]
    downs = [lin(hidden, width) for _ in range(experts)]
    gates = [lin(inputs, experts, bias=False) for _ in range(2)]
    towers = [(lin(width, 8), lin(8, 3)), (lin(width, 8), lin(8, 1))]
    for g in gates:
        init_(g.weight, 2.0 / inputs**0.5)
    x = torch.randn(tokens, inputs)
    relu = torch.nn.functional.relu
    with torch.no_grad():
        e = torch.stack([downs[i](relu(ups[i](x))) for i in range(experts)], dim=1)  # (tokens, experts, width)
        p0 = torch.softmax(gates[0](x), dim=-1)
        mixed0 = (p0[:, :, None] * e).sum(dim=1)
        p1 = torch.softmax(gates[1](x), dim=-1)
        w1, i1 = p1.topk(2, dim=-1)
        w1 = w1 / w1.sum(dim=-1, keepdim=True)
        mixed1 = (w1[:, :, None] * e.gather(1, i1[:, :, None].expand(-1, -1, width))).sum(dim=1)
        y = torch.cat([towers[0][1](relu(towers[0][0](mixed0))), towers[1][1](relu(towers[1][0](mixed1)))], dim=-1)
    t = {}
    for i in range(experts):
        t[f"experts.{i}.up.weight"], t[f"experts.{i}.up.bias"] = ups[i].weight, ups[i].bias
        t[f"experts.{i}.down.weight"], t[f"experts.{i}.down.bias"] = downs[i].weight, downs[i].bias
    for k in range(2):
        t[f"tasks.{k}.gate.weight"] = gates[k].weight
        t[f"tasks.{k}.tower.up.weight"], t[f"tasks.{k}.tower.up.bias"] = towers[k][0].weight, towers[k][0].bias
        t[f"tasks.{k}.tower.down.weight"], t[f"tasks.{k}.tower.down.bias"] = towers[k][1].weight, towers[k][1].bias
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in t.items()}
    if not unchanged(os.path.join(d, "model.safetensors"), tensors, None):
        save_file(tensors, os.path.join(d, "model.safetensors"))
    config = {
        "architecture": "mmoe", "task": "regress", "input_dim": inputs,
        "experts": {"count": experts, "hidden": hidden, "out_dim": width, "activation": "relu", "bias": True},
        "tasks": [
            {"tower": {"hidden": 8, "out_dim": 3, "activation": "relu", "bias": True}},
            {"k": 2, "router": "mixtral", "tower": {"hidden": 8, "out_dim": 1, "activation": "relu", "bias": True}},
        ],
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save(f"{name}/reference", {"x": x, "y": y, "experts_task1": i1.to(torch.int64)}, {"tasks": 2})


def deepseek_router_case(name, hidden, experts, k, n_group, topk_group, norm, scale, tokens, seed):
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(hidden_size=hidden, n_routed_experts=experts, num_experts_per_tok=k,
                           n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                           routed_scaling_factor=scale)
    router = DeepseekV3TopkRouter(cfg).eval()
    init_(router.weight, 3.0 / hidden**0.5)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0.0, 0.3)
    x = torch.randn(tokens, hidden)
    with torch.no_grad():
        logits, weights, idx = router(x)
    # The router returns its top-k unsorted; order them by choice score as ours does.
    choice = (logits.sigmoid() + router.e_score_correction_bias).gather(1, idx)
    order = torch.argsort(choice, dim=1, descending=True, stable=True)
    t = {"x": x, "logits": logits, "weights": weights.gather(1, order), "experts": idx.gather(1, order).to(torch.int64),
         "gate": router.weight.detach(), "bias": router.e_score_correction_bias.detach().clone()}
    meta = {"arch": "deepseek_v3_router", "hidden": hidden, "experts": experts, "k": k, "n_group": n_group,
            "topk_group": topk_group, "norm_topk_prob": int(norm), "scale": scale}
    save(name, t, meta)


def unchanged(path, tensors, meta):
    """True if `path` already holds these tensors and metadata (safetensors orders
    metadata keys arbitrarily, so rewriting would change the bytes but not the data)."""
    if not os.path.exists(path):
        return False
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        if (meta is not None and f.metadata() != meta) or set(f.keys()) != set(tensors):
            return False
        return all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def save(name, tensors, meta):
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in meta.items()}
    path = os.path.join(OUT, f"{name}.safetensors")
    if unchanged(path, tensors, meta):
        print(name, "unchanged")
        return
    save_file(tensors, path, metadata=meta)
    print(name, {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith("experts.")})


def main():
    os.makedirs(OUT, exist_ok=True)
    print("torch", torch.__version__)
    mixtral_case("mixtral_h16_e4_k1", 16, 32, 4, 1, 24, 1)
    mixtral_case("mixtral_h32_e8_k2", 32, 48, 8, 2, 24, 2)
    mixtral_case("mixtral_h24_e6_k3", 24, 40, 6, 3, 24, 3)
    mixtral_case("mixtral_h48_e8_k2", 48, 64, 8, 2, 16, 4)
    qwen_case("qwen2moe_h16_e4_k1_norm", 16, 24, 32, 4, 1, True, 24, 5)
    qwen_case("qwen2moe_h32_e8_k2", 32, 32, 48, 8, 2, False, 24, 6)
    qwen_case("qwen2moe_h24_e6_k3_norm", 24, 32, 40, 6, 3, True, 24, 7)
    qwen_case("qwen2moe_h32_e6_k3", 32, 24, 32, 6, 3, False, 16, 8)
    mlp_case("switch_mlp_gelu_h16_e4", 16, 32, 4, 1, "gelu", "switch", 24, 11)
    mlp_case("glam_mlp_relu_h24_e8_k2", 24, 48, 8, 2, "relu", "mixtral", 24, 12)
    mmoe_case("mmoe", 16, 4, 24, 8, 32, 13)
    deepseek_router_case("deepseek_router_e16_g4", 24, 16, 4, 4, 2, True, 2.5, 64, 9)
    deepseek_router_case("deepseek_router_e8_g1", 16, 8, 2, 1, 1, False, 1.0, 64, 10)


if __name__ == "__main__":
    main()
