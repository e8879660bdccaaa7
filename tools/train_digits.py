#!/usr/bin/env python3
"""Train micromoe's first real model: a Switch-style MoE classifier of handwritten digits.

Data: scikit-learn's load_digits (1,797 8x8 images shipped inside the package, so this
works offline). Inputs are pixel values / 16, flattened to 64 floats. Split: 360 test
images (stratified, seed 0), the rest for training.

Model: one MoE layer, 64 -> 4 experts, top-1 (Switch: softmax over all experts, the chosen
expert's output scaled by its probability), each expert an MLP 64 -> 32 (ReLU) -> 10 with
biases. Trained with cross-entropy plus Switch's load-balancing loss
(BALANCE * E * sum_i f_i P_i, BALANCE = 0.3) so that experts share the work and specialize:
with Switch's own 0.01 on this small data set the router collapses onto two experts.

Writes models/digits/:
  config.json, model.safetensors   the model in micromoe's naming scheme (see README)
  calibration.safetensors          "x": the 1,437 training inputs (f16) for int8 calibration
  test.safetensors                 "x", "label", and PyTorch's "logits" and "experts"
Then convert with:
  cargo run --release --features std -- convert models/digits -o models/digits/digits_f32.moe --dtype f32
Run from the repository root:  pip install torch scikit-learn safetensors && python3 tools/train_digits.py
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

OUT = os.path.join(os.path.dirname(__file__), "..", "models", "digits")
EXPERTS, HIDDEN, CLASSES, INPUTS = 4, 32, 10, 64
BALANCE = float(os.environ.get("BALANCE", "0.3"))


class SwitchMoe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(INPUTS, EXPERTS, bias=False)
        self.up = torch.nn.ModuleList(torch.nn.Linear(INPUTS, HIDDEN) for _ in range(EXPERTS))
        self.down = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, CLASSES) for _ in range(EXPERTS))

    def forward(self, x):
        probs = torch.softmax(self.gate(x), dim=-1)
        weight, expert = probs.max(dim=-1)
        out = torch.zeros(x.shape[0], CLASSES)
        for e in range(EXPERTS):
            rows = expert == e
            if rows.any():
                h = torch.relu(self.up[e](x[rows]))
                out[rows] = weight[rows, None] * self.down[e](h)
        # Switch load balancing: fraction routed times mean probability, per expert.
        f = torch.bincount(expert, minlength=EXPERTS).float() / x.shape[0]
        balance = EXPERTS * (f * probs.mean(dim=0)).sum()
        return out, expert, balance


def main():
    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=360, stratify=y, random_state=0)
    x_train, x_test = torch.tensor(x_train), torch.tensor(x_test)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)

    model = SwitchMoe()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for epoch in range(400):
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            logits, _, balance = model(x_train[idx])
            loss = torch.nn.functional.cross_entropy(logits, y_train[idx]) + BALANCE * balance
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 100 == 99:
            with torch.no_grad():
                logits, expert, _ = model(x_test)
                acc = (logits.argmax(-1) == y_test).float().mean().item()
                print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {acc:.4f}, "
                      f"expert use {torch.bincount(expert, minlength=EXPERTS).tolist()}")

    model.eval()
    with torch.no_grad():
        logits, expert, _ = model(x_test)
    acc = (logits.argmax(-1) == y_test).float().mean().item()
    print(f"final test accuracy {acc:.4f}")
    print("expert use per class:")
    for c in range(CLASSES):
        print(c, torch.bincount(expert[y_test == c], minlength=EXPERTS).tolist())

    os.makedirs(OUT, exist_ok=True)
    tensors = {"layers.0.gate.weight": model.gate.weight}
    for e in range(EXPERTS):
        tensors[f"layers.0.experts.{e}.up.weight"] = model.up[e].weight
        tensors[f"layers.0.experts.{e}.up.bias"] = model.up[e].bias
        tensors[f"layers.0.experts.{e}.down.weight"] = model.down[e].weight
        tensors[f"layers.0.experts.{e}.down.bias"] = model.down[e].bias
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(OUT, "model.safetensors"))
    config = {
        "architecture": "moe_mlp",
        "task": "classify",
        "input_dim": INPUTS,
        "layers": [{
            "in_dim": INPUTS, "out_dim": CLASSES, "hidden": HIDDEN, "experts": EXPERTS, "k": 1,
            "router": "switch", "activation": "relu", "gated": False, "bias": True,
        }],
        "data": "scikit-learn load_digits, pixels / 16, 360 stratified test images (seed 0)",
        "reference_accuracy": acc,
    }
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    # Every training input, in f16 (pixels / 16 are exact there): int8 calibration needs the
    # whole range the model will see, or outputs saturate (256 samples cost 2.4 logits).
    save_file({"x": x_train.half().contiguous()}, os.path.join(OUT, "calibration.safetensors"))
    save_file({"x": x_test.contiguous(), "label": y_test.contiguous(), "logits": logits.contiguous(),
               "experts": expert.to(torch.int64).contiguous()}, os.path.join(OUT, "test.safetensors"))


if __name__ == "__main__":
    main()
