//! What a model holds: parameters, bytes, routing.

use serde_json::{Value, json};

use crate::format::layout::{LAYER_LEVEL, SHARED_EXPERT, flags, part, role};
use crate::format::{LayerInfo, Model};

/// One layer, described.
#[derive(Debug, Clone)]
pub struct LayerSummary {
    /// The layer record.
    pub info: LayerInfo,
    /// Router, in words.
    pub router: String,
    /// Parameters (weights and biases) of each routed expert.
    pub expert_params: Vec<usize>,
    /// Bytes each routed expert occupies (weights, biases, requantization, tables).
    pub expert_bytes: Vec<usize>,
    /// Parameters of the gate (and selection bias).
    pub gate_params: usize,
    /// Parameters of the shared expert and its gate.
    pub shared_params: usize,
}

/// A whole model, described.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    /// Per layer.
    pub layers: Vec<LayerSummary>,
    /// All parameters.
    pub total_params: usize,
    /// Parameters one inference uses (gate, k experts, shared expert).
    pub active_params: usize,
    /// Bytes of the `.moe` file: what flash holds.
    pub flash_bytes: usize,
    /// Scratch RAM bytes for `Model::infer`.
    pub scratch_bytes: usize,
    /// Input width.
    pub input_dim: usize,
    /// Output width.
    pub output_dim: usize,
    /// Classifier or regressor.
    pub classifier: bool,
}

fn router(info: &LayerInfo) -> String {
    let mut s = if info.flags & flags::SIGMOID != 0 {
        "sigmoid scores (DeepSeek-V3)".to_string()
    } else if info.flags & flags::NORMALIZE != 0 {
        "softmax over the k chosen (Mixtral)".to_string()
    } else if info.k == 1 {
        "top-1 softmax (Switch)".to_string()
    } else {
        "softmax over all, top-k (Qwen2-MoE)".to_string()
    };
    s += &format!(", top-{} of {}", info.k, info.experts);
    if info.n_group > 1 {
        s += &format!(", {} of {} groups", info.topk_group, info.n_group);
    }
    if info.flags & flags::SELECTION_BIAS != 0 {
        s += ", selection bias";
    }
    if info.scaling != 1.0 {
        s += &format!(", scaled by {}", info.scaling);
    }
    s
}

/// Counts what `model` holds.
pub fn summarize(model: &Model<'_>) -> crate::Result<ModelSummary> {
    let mut layers = Vec::new();
    for l in 0..model.layers() {
        let info = model.layer_info(l)?;
        let (mut expert_params, mut expert_bytes) = (vec![0; info.experts], vec![0; info.experts]);
        let (mut gate_params, mut shared_params) = (0, 0);
        for t in (0..model.table().len()).filter_map(|i| model.table().get(i)) {
            if t.key.layer as usize != l {
                continue;
            }
            let is_param = matches!(t.key.part, part::WEIGHT | part::BIAS)
                && matches!(
                    t.key.role,
                    role::GATE
                        | role::UP
                        | role::GATE_PROJ
                        | role::DOWN
                        | role::SHARED_GATE
                        | role::SELECTION_BIAS
                );
            let n = if is_param { t.rows * t.cols } else { 0 };
            match t.key.expert {
                LAYER_LEVEL => gate_params += n,
                SHARED_EXPERT => shared_params += n,
                e => {
                    if let (Some(p), Some(b)) =
                        (expert_params.get_mut(e as usize), expert_bytes.get_mut(e as usize))
                    {
                        *p += n;
                        *b += t.data.len();
                    }
                }
            }
        }
        layers.push(LayerSummary {
            router: router(&info),
            info,
            expert_params,
            expert_bytes,
            gate_params,
            shared_params,
        });
    }
    let total_params =
        layers.iter().map(|s| s.gate_params + s.shared_params + s.expert_params.iter().sum::<usize>()).sum();
    let active_params = layers
        .iter()
        .map(|s| {
            let mut sorted = s.expert_params.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            s.gate_params + s.shared_params + sorted.iter().take(s.info.k).sum::<usize>()
        })
        .sum();
    Ok(ModelSummary {
        layers,
        total_params,
        active_params,
        flash_bytes: model.bytes().len(),
        scratch_bytes: model.scratch_bytes(),
        input_dim: model.input_dim(),
        output_dim: model.output_dim(),
        classifier: model.is_classifier(),
    })
}

impl ModelSummary {
    /// As one JSON object.
    pub fn to_json(&self) -> Value {
        let layers: Vec<Value> = self
            .layers
            .iter()
            .map(|s| {
                json!({
                    "in_dim": s.info.in_dim,
                    "out_dim": s.info.out_dim,
                    "experts": s.info.experts,
                    "k": s.info.k,
                    "hidden": s.info.hidden,
                    "gated": s.info.flags & flags::GATED != 0,
                    "activation": format!("{:?}", s.info.act).to_lowercase(),
                    "gate_dtype": s.info.gate_dtype.name(),
                    "expert_dtype": s.info.expert_dtype.name(),
                    "router": s.router,
                    "gate_params": s.gate_params,
                    "shared_params": s.shared_params,
                    "expert_params": s.expert_params,
                    "expert_bytes": s.expert_bytes,
                })
            })
            .collect();
        json!({
            "task": if self.classifier { "classify" } else { "regress" },
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "flash_bytes": self.flash_bytes,
            "scratch_bytes": self.scratch_bytes,
            "layers": layers,
        })
    }
}

impl core::fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let task = if self.classifier { "classifier" } else { "regressor" };
        writeln!(f, "{task}: {} -> {}, {} MoE layer(s)", self.input_dim, self.output_dim, self.layers.len())?;
        writeln!(f, "parameters: {} total, {} active per inference", self.total_params, self.active_params)?;
        writeln!(f, "flash: {} bytes, scratch RAM: {} bytes", self.flash_bytes, self.scratch_bytes)?;
        for (l, s) in self.layers.iter().enumerate() {
            let i = &s.info;
            let kind = if i.flags & flags::GATED != 0 { "gated" } else { "MLP" };
            writeln!(
                f,
                "layer {l}: {} -> {}, {} {kind} experts ({:?}, hidden {}), gate {}, experts {}",
                i.in_dim,
                i.out_dim,
                i.experts,
                i.act,
                i.hidden,
                i.gate_dtype.name(),
                i.expert_dtype.name()
            )?;
            writeln!(f, "  router: {}", s.router)?;
            writeln!(
                f,
                "  gate: {} parameters; shared expert: {} parameters",
                s.gate_params, s.shared_params
            )?;
            for (e, (p, b)) in s.expert_params.iter().zip(&s.expert_bytes).enumerate() {
                writeln!(f, "  expert {e}: {p} parameters, {b} bytes")?;
            }
        }
        Ok(())
    }
}
