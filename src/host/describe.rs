//! What a model holds: parameters, bytes, routing.

use serde_json::{Value, json};

use crate::format::layout::{LAYER_LEVEL, SHARED_EXPERT, flags, part, role};
use crate::model::{LayerInfo, Model};

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
    /// Scratch bytes of the integer path alone (`Model::infer_int`).
    pub int_scratch_bytes: usize,
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
        int_scratch_bytes: model.int_scratch_bytes(),
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
            "int_scratch_bytes": self.int_scratch_bytes,
            "layers": layers,
        })
    }
}

impl core::fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let task = if self.classifier { "classifier" } else { "regressor" };
        writeln!(f, "{task}: {} -> {}, {} MoE layer(s)", self.input_dim, self.output_dim, self.layers.len())?;
        writeln!(f, "parameters: {} total, {} active per inference", self.total_params, self.active_params)?;
        writeln!(
            f,
            "flash: {} bytes, scratch RAM: {} bytes ({} on the integer path)",
            self.flash_bytes, self.scratch_bytes, self.int_scratch_bytes
        )?;
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

/// A decoder, described.
#[derive(Debug, Clone)]
pub struct DecoderSummary {
    /// The decoder record.
    pub config: crate::model::Config,
    /// Per layer record.
    pub layers: Vec<crate::model::LayerConfig>,
    /// All parameters (weights and biases; int8 scales not counted).
    pub total_params: usize,
    /// Parameters one token uses (k experts per MoE layer).
    pub active_params: usize,
    /// Bytes of the `.moe` file.
    pub flash_bytes: usize,
    /// State RAM bytes: KV cache and work buffers.
    pub state_bytes: usize,
    /// Of which the KV cache.
    pub kv_cache_bytes: usize,
    /// Storage type of each role's matrices, e.g. `[("experts", "int8")]`;
    /// int8 with a scale per group of columns names the group (`int8/g32`).
    pub dtypes: Vec<(&'static str, String)>,
}

fn dtype_name(code: u8) -> &'static str {
    match code {
        crate::format::layout::dtype::F32 => "f32",
        crate::format::layout::dtype::F16 => "f16",
        crate::format::layout::dtype::I8 => "int8",
        _ => "other",
    }
}

/// Counts what a decoder holds.
pub fn summarize_decoder(dec: &crate::model::Decoder<'_>) -> crate::Result<DecoderSummary> {
    use crate::format::layout::decoder::role as drole;
    let model = dec;
    let config = *dec.config();
    let layers = (0..config.layers).map(|l| dec.layer_config(l)).collect::<crate::Result<Vec<_>>>()?;
    let (mut total_params, mut inactive) = (0, 0);
    let mut dtypes: Vec<(&'static str, String)> = Vec::new();
    for t in (0..model.table().len()).filter_map(|i| model.table().get(i)) {
        if !matches!(t.key.part, part::WEIGHT | part::BIAS) {
            continue;
        }
        let n = t.rows * t.cols;
        total_params += n;
        let routed = t.key.expert != LAYER_LEVEL && t.key.expert != SHARED_EXPERT;
        if let Some(lc) = layers.get(t.key.layer as usize).filter(|_| routed) {
            // Each expert's share of what k of them use.
            inactive += n - n * lc.k / lc.experts.max(1);
        }
        let what = match (t.key.role, routed) {
            (drole::EMBED | drole::LM_HEAD, _) => "embedding/output",
            (drole::Q | drole::K | drole::V | drole::O, _) => "attention",
            (role::GATE | role::SHARED_GATE, _) => "router",
            (_, true) => "experts",
            (role::UP | role::GATE_PROJ | role::DOWN, false) => "shared/dense FFN",
            _ => "norms",
        };
        if t.key.part == part::WEIGHT && !dtypes.iter().any(|(w, _)| *w == what) {
            let scales = crate::format::Key { part: crate::format::layout::decoder::SCALE_PART, ..t.key };
            let name = match model.table().find(scales) {
                Some(s) if t.dtype == crate::format::layout::dtype::I8 && s.cols > 1 => {
                    format!("int8/g{}", t.cols / s.cols)
                }
                _ => dtype_name(t.dtype).to_string(),
            };
            dtypes.push((what, name));
        }
    }
    let kv = 2 * config.layers * config.context * config.kv_dim() * if config.kv_f16 { 2 } else { 4 };
    Ok(DecoderSummary {
        config,
        layers,
        total_params,
        active_params: total_params - inactive,
        flash_bytes: model.bytes().len(),
        state_bytes: dec.state_bytes(),
        kv_cache_bytes: kv,
        dtypes,
    })
}

impl DecoderSummary {
    /// As one JSON object.
    pub fn to_json(&self) -> Value {
        let c = &self.config;
        let layers: Vec<Value> = self
            .layers
            .iter()
            .map(|l| {
                json!({"experts": l.experts, "k": l.k, "hidden": l.hidden, "shared_hidden": l.shared_hidden,
                       "normalize": l.normalize, "shared_gate": l.shared_gate})
            })
            .collect();
        let dtypes: serde_json::Map<String, Value> =
            self.dtypes.iter().map(|(w, d)| (w.to_string(), json!(d))).collect();
        json!({
            "architecture": "decoder",
            "vocab": c.vocab, "hidden": c.hidden, "heads": c.heads, "kv_heads": c.kv_heads,
            "head_dim": c.head_dim, "context": c.context, "rope_theta": c.rope_theta, "rms_eps": c.rms_eps,
            "tied": c.tied, "qkv_bias": c.qkv_bias, "kv_dtype": if c.kv_f16 { "f16" } else { "f32" },
            "total_params": self.total_params, "active_params": self.active_params,
            "flash_bytes": self.flash_bytes, "state_bytes": self.state_bytes, "kv_cache_bytes": self.kv_cache_bytes,
            "dtypes": dtypes, "layers": layers,
        })
    }
}

impl core::fmt::Display for DecoderSummary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "decoder: vocab {}, hidden {}, {} layers, {} heads over {} KV heads of {}, context {}, rope theta {}",
            c.vocab, c.hidden, c.layers, c.heads, c.kv_heads, c.head_dim, c.context, c.rope_theta
        )?;
        writeln!(f, "parameters: {} total, {} active per token", self.total_params, self.active_params)?;
        writeln!(
            f,
            "flash: {} bytes; state RAM: {} bytes (KV cache {} bytes, {})",
            self.flash_bytes,
            self.state_bytes,
            self.kv_cache_bytes,
            if c.kv_f16 { "f16" } else { "f32" }
        )?;
        let types: Vec<String> = self.dtypes.iter().map(|(w, d)| format!("{w} {d}")).collect();
        writeln!(f, "storage: {}", types.join(", "))?;
        for (l, lc) in self.layers.iter().enumerate() {
            if lc.experts == 0 {
                writeln!(f, "layer {l}: dense SwiGLU FFN, hidden {}", lc.shared_hidden)?;
            } else {
                let rule = if lc.normalize { "softmax over the k chosen" } else { "softmax over all" };
                write!(
                    f,
                    "layer {l}: top-{} of {} SwiGLU experts (hidden {}), {rule}",
                    lc.k, lc.experts, lc.hidden
                )?;
                if lc.shared_hidden > 0 {
                    write!(
                        f,
                        ", shared expert (hidden {}{})",
                        lc.shared_hidden,
                        if lc.shared_gate { ", gated" } else { "" }
                    )?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}
