//! Host side (`std`): converting checkpoints to `.moe`, reading inputs,
//! describing models.
//!
//! # Our checkpoint naming scheme (MoE MLP models)
//!
//! A directory with `config.json` and `model.safetensors` (or shards listed
//! in `model.safetensors.index.json`, as Hugging Face writes them). Weights
//! are f32, f16 or bf16, row-major `(out, in)` as `nn.Linear` stores them.
//!
//! `config.json`:
//!
//! ```json
//! {
//!   "architecture": "moe_mlp",
//!   "task": "classify",
//!   "input_dim": 64,
//!   "layers": [{
//!     "in_dim": 64, "out_dim": 10, "hidden": 32, "experts": 4, "k": 1,
//!     "router": "switch", "activation": "relu", "gated": false, "bias": true
//!   }]
//! }
//! ```
//!
//! Per layer: `router` is `switch` (top-1 of a softmax, not renormalized),
//! `mixtral` (softmax over the k chosen), `qwen2_moe` (softmax over all;
//! `norm_topk_prob`, default false) or `deepseek_v3` (sigmoid; `n_group`,
//! `topk_group`, `norm_topk_prob` default true, `routed_scaling_factor`);
//! `activation` is `relu`, `gelu`, `gelu_tanh` or `silu`; `gated` selects
//! `down(act(gate_proj x) * up x)`; `bias` adds expert biases;
//! `shared_hidden` (> 0) adds a shared expert, `shared_gate` its sigmoid gate.
//! `task` is `classify` or `regress`.
//!
//! Tensors of layer `L` (expert `E`):
//!
//! | name | shape |
//! |---|---|
//! | `layers.L.gate.weight` | `(experts, in_dim)` |
//! | `layers.L.gate.e_score_correction_bias` | `(experts,)`, optional selection bias |
//! | `layers.L.experts.E.up.weight` / `.bias` | `(hidden, in_dim)` / `(hidden,)` |
//! | `layers.L.experts.E.gate_proj.weight` / `.bias` | the same, gated experts only |
//! | `layers.L.experts.E.down.weight` / `.bias` | `(out_dim, hidden)` / `(out_dim,)` |
//! | `layers.L.shared_expert.{up,gate_proj,down}.*` | as an expert, `shared_hidden` wide |
//! | `layers.L.shared_expert_gate.weight` | `(1, in_dim)` |
//!
//! Any other tensor is an error (a misspelt name must not be ignored).
//!
//! # Multi-gate MoE (MMoE, Ma et al. 2018)
//!
//! One pool of experts, and per task a gate over the pool and a tower:
//! `y_t = tower_t(sum_i g_t,i(x) expert_i(x))`; the model output is the
//! towers' outputs one after the other.
//!
//! ```json
//! {
//!   "architecture": "mmoe",
//!   "task": "regress",
//!   "input_dim": 16,
//!   "experts": { "count": 4, "hidden": 24, "out_dim": 8, "activation": "relu", "bias": true },
//!   "tasks": [
//!     { "tower": { "hidden": 8, "out_dim": 3, "activation": "relu", "bias": true } },
//!     { "k": 2, "router": "mixtral", "tower": { "hidden": 8, "out_dim": 1, "activation": "relu", "bias": true } }
//!   ]
//! }
//! ```
//!
//! A task's gate is dense (softmax over all experts, `k` = the expert count,
//! at most 8) unless it sets `k` and `router` (`qwen2_moe`, `mixtral`,
//! `switch`). Tensors: `experts.E.{up,gate_proj,down}.{weight,bias}` (the
//! pool, `(hidden, input_dim)` and `(out_dim, hidden)`),
//! `tasks.T.gate.weight` `(count, input_dim)`, and
//! `tasks.T.tower.{up,down}.{weight,bias}` (an MLP from the experts' `out_dim`).

mod checkpoint;
mod convert;
mod decoder;
mod describe;
mod files;

pub use checkpoint::{Checkpoint, HostError, read_inputs};
pub use convert::{
    Dtype, convert, convert_checkpoint, convert_decoder, convert_decoder_checkpoint, convert_with_progress,
    is_decoder_checkpoint,
};
pub use decoder::DecoderOptions;
pub use describe::{DecoderSummary, ModelSummary, summarize, summarize_decoder};
pub use files::{MAX_JSON, inside, max_alloc, read_moe, read_regular, zeroed};
