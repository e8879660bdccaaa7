//! Hugging Face `MixtralForCausalLM` / `Qwen2MoeForCausalLM` checkpoints ->
//! decoder `.moe` bytes.

use serde_json::Value;

use super::checkpoint::{Checkpoint, HostError};
use super::convert::{Cfg, Dtype};
use crate::format::Key;
use crate::format::LayerDtype;
use crate::format::layout::decoder::{MODEL_LEVEL, role as drole};
use crate::format::layout::{LAYER_LEVEL, SHARED_EXPERT, part, role};
use crate::model::write::DecoderSpec;
use crate::model::{Config, LayerConfig};

/// Options of a decoder conversion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecoderOptions {
    /// Storage of the matrices: f32, f16 or int8.
    pub dtype: Dtype,
    /// Storage of the router gates (default: `dtype`).
    pub gate_dtype: Option<Dtype>,
    /// Positions of the KV cache (default: `max_position_embeddings`).
    pub context: Option<usize>,
    /// An f16 KV cache (else f32).
    pub kv_f16: bool,
    /// int8 only: one scale per this many columns (a multiple of 16 that
    /// divides every matrix's columns, e.g. 32 as llama.cpp's `Q8_0`),
    /// the input quantized per group too; `None`: one scale a row.
    pub int8_group: Option<usize>,
}

impl DecoderOptions {
    /// `dtype` weights, every other option at its default.
    pub fn new(dtype: Dtype) -> Self {
        DecoderOptions { dtype, gate_dtype: None, context: None, kv_f16: false, int8_group: None }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Family {
    Mixtral,
    Qwen2Moe,
}

fn storage(d: Dtype) -> Result<LayerDtype, HostError> {
    match d {
        Dtype::F32 => Ok(LayerDtype::F32),
        Dtype::F16 => Ok(LayerDtype::F16),
        Dtype::Int8 => Ok(LayerDtype::Int8),
        Dtype::Q15 => Err(HostError::Input("decoders are stored as f32, f16 or int8 (not q15)".into())),
    }
}

fn number(c: &Cfg<'_>, key: &str) -> Result<f64, HostError> {
    c.field(key)
        .and_then(Value::as_f64)
        .filter(|v| v.is_finite())
        .ok_or_else(|| HostError::Config(format!("{key}: expected a number")))
}

/// The RoPE base, refusing scaled or otherwise non-default rotary embeddings.
fn rope_theta(c: &Cfg<'_>) -> Result<f64, HostError> {
    if let Some(p) = c.field("rope_parameters").filter(|v| !v.is_null()) {
        let p = Cfg { v: p, at: "rope_parameters.".into() };
        let kind = p.field("rope_type").and_then(Value::as_str).unwrap_or("default");
        if kind != "default" {
            return Err(HostError::Config(format!(
                "rope_parameters.rope_type: {kind:?} is not supported (default only)"
            )));
        }
        return number(&p, "rope_theta")
            .map_err(|_| HostError::Config("rope_parameters.rope_theta: expected a number".into()));
    }
    if c.field("rope_scaling").is_some_and(|v| !v.is_null()) {
        return Err(HostError::Config("rope_scaling: scaled rotary embeddings are not supported".into()));
    }
    if c.field("rope_theta").is_none() { Ok(10000.0) } else { number(c, "rope_theta") }
}

fn layers_of(c: &Cfg<'_>, family: Family, n: usize) -> Result<Vec<LayerConfig>, HostError> {
    match family {
        Family::Mixtral => {
            let spec = LayerConfig {
                experts: c.usize("num_local_experts")?,
                k: c.usize("num_experts_per_tok")?,
                hidden: c.usize("intermediate_size")?,
                shared_hidden: 0,
                normalize: true,
                shared_gate: false,
            };
            Ok(vec![spec; n])
        }
        Family::Qwen2Moe => {
            let experts = match c.field("num_experts") {
                Some(v) if v.as_u64() == Some(0) => 0,
                _ => c.usize("num_experts")?,
            };
            let step = c.usize_or("decoder_sparse_step", 1)?;
            // A set: one look-up per layer, not a scan of the list.
            let dense_only: std::collections::BTreeSet<u64> = match c.field("mlp_only_layers") {
                None | Some(Value::Null) => Default::default(),
                Some(v) => {
                    v.as_array().and_then(|a| a.iter().map(Value::as_u64).collect::<Option<_>>()).ok_or_else(
                        || HostError::Config("mlp_only_layers: expected an array of layer indices".into()),
                    )?
                }
            };
            (0..n)
                .map(|l| {
                    let sparse = !dense_only.contains(&(l as u64)) && experts > 0 && (l + 1) % step == 0;
                    Ok(if sparse {
                        LayerConfig {
                            experts,
                            k: c.usize("num_experts_per_tok")?,
                            hidden: c.usize("moe_intermediate_size")?,
                            shared_hidden: c.usize("shared_expert_intermediate_size")?,
                            normalize: c.bool_or("norm_topk_prob", false)?,
                            shared_gate: true,
                        }
                    } else {
                        LayerConfig {
                            experts: 0,
                            k: 0,
                            hidden: 0,
                            shared_hidden: c.usize("intermediate_size")?,
                            normalize: false,
                            shared_gate: false,
                        }
                    })
                })
                .collect()
        }
    }
}

/// Reads a named tensor of a shape and stores it at a key as a type.
type Put<'p> = dyn FnMut(Key, &str, usize, usize, LayerDtype) -> Result<(), HostError> + 'p;

fn key(layer: u16, expert: u16, role: u8) -> Key {
    Key { layer, expert, role, part: part::WEIGHT }
}

/// Converts a `MixtralForCausalLM` or `Qwen2MoeForCausalLM` checkpoint.
pub(super) fn convert_decoder(
    ck: &Checkpoint,
    arch: &str,
    opts: &DecoderOptions,
) -> Result<Vec<u8>, HostError> {
    let family = match arch {
        "MixtralForCausalLM" => Family::Mixtral,
        "Qwen2MoeForCausalLM" => Family::Qwen2Moe,
        a => return Err(HostError::Config(format!("architectures: {a:?} is not supported"))),
    };
    let c = Cfg { v: &ck.config, at: String::new() };
    let act = c.str("hidden_act").unwrap_or("silu");
    if act != "silu" {
        return Err(HostError::Config(format!("hidden_act: {act:?} is not supported (silu)")));
    }
    match family {
        Family::Mixtral if c.field("sliding_window").is_some_and(|v| !v.is_null()) => {
            return Err(HostError::Config(
                "sliding_window: sliding-window attention is not supported".into(),
            ));
        }
        Family::Qwen2Moe if c.bool_or("use_sliding_window", false)? => {
            return Err(HostError::Config(
                "use_sliding_window: sliding-window attention is not supported".into(),
            ));
        }
        _ => {}
    }
    let layer_types = c.field("layer_types").and_then(Value::as_array);
    if let Some(t) = layer_types.and_then(|a| a.iter().find(|t| t.as_str() != Some("full_attention"))) {
        return Err(HostError::Config(format!(
            "layer_types: {t} attention is not supported (full_attention)"
        )));
    }
    let (vocab, hidden, n_layers) =
        (c.usize("vocab_size")?, c.usize("hidden_size")?, c.usize("num_hidden_layers")?);
    let heads = c.usize("num_attention_heads")?;
    let kv_heads = c.usize_or("num_key_value_heads", heads)?;
    let head_dim = match c.field("head_dim") {
        None | Some(Value::Null) => {
            if !hidden.is_multiple_of(heads) {
                return Err(HostError::Config("num_attention_heads: does not divide hidden_size".into()));
            }
            hidden / heads
        }
        Some(_) => c.usize("head_dim")?,
    };
    let context = match opts.context {
        Some(n) => n,
        None => c.usize("max_position_embeddings")?,
    };
    let qkv_bias = family == Family::Qwen2Moe && c.bool_or("qkv_bias", true)?;
    let tied = c.bool_or("tie_word_embeddings", false)?;
    // Every count sizes memory before any tensor is looked at; each layer
    // needs at least its four attention projections.
    if n_layers.saturating_mul(4) > ck.tensor_count() {
        return Err(HostError::Config(format!(
            "num_hidden_layers: {n_layers} layers, but the checkpoint holds only {} tensors",
            ck.tensor_count()
        )));
    }
    let layers = layers_of(&c, family, n_layers)?;
    let config = Config {
        vocab,
        hidden,
        heads,
        kv_heads,
        head_dim,
        context,
        rope_theta: rope_theta(&c)? as f32,
        rms_eps: number(&c, "rms_norm_eps")? as f32,
        tied,
        qkv_bias,
        kv_f16: opts.kv_f16,
        layers: n_layers,
    };
    let dtype = storage(opts.dtype)?;
    let gate_dtype = storage(opts.gate_dtype.unwrap_or(opts.dtype))?;
    let group = opts.int8_group;
    if let Some(g) = group {
        if opts.dtype != Dtype::Int8 {
            return Err(HostError::Input("--group applies to int8 decoders only".into()));
        }
        if g == 0 || g % crate::model::INT8_GROUP_MULTIPLE != 0 {
            return Err(HostError::Input(format!(
                "--group {g}: int8 groups are a multiple of {} columns",
                crate::model::INT8_GROUP_MULTIPLE
            )));
        }
    }
    let mut spec = DecoderSpec::new(config, layers.clone()).with_int8_group(group);
    let mut put = |k: Key, name: &str, rows: usize, cols: usize, d: LayerDtype| -> Result<(), HostError> {
        if let Some(g) = group.filter(|_| d == LayerDtype::Int8)
            && !cols.is_multiple_of(g)
        {
            return Err(HostError::Input(format!(
                "--group {g} does not divide the {cols} columns of {name} (every int8 matrix's columns must be a multiple)"
            )));
        }
        let v = ck.tensor(name, &[rows, cols])?;
        spec.put(k, rows, cols, &v, d);
        Ok(())
    };
    put(key(MODEL_LEVEL, LAYER_LEVEL, drole::EMBED), "model.embed_tokens.weight", vocab, hidden, dtype)?;
    if !tied {
        put(key(MODEL_LEVEL, LAYER_LEVEL, drole::LM_HEAD), "lm_head.weight", vocab, hidden, dtype)?;
    }
    let (q_dim, kv_dim) = (heads * head_dim, kv_heads * head_dim);
    for (l, ls) in layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        let at = |r| key(l as u16, LAYER_LEVEL, r);
        for (r, name, rows, cols) in [
            (drole::Q, "q_proj", q_dim, hidden),
            (drole::K, "k_proj", kv_dim, hidden),
            (drole::V, "v_proj", kv_dim, hidden),
            (drole::O, "o_proj", hidden, q_dim),
        ] {
            put(at(r), &format!("{p}.self_attn.{name}.weight"), rows, cols, dtype)?;
        }
        let moe = match family {
            Family::Mixtral => format!("{p}.block_sparse_moe"),
            Family::Qwen2Moe => format!("{p}.mlp"),
        };
        let swiglu = |e: u16, prefix: &str, inner: usize, put: &mut Put<'_>| {
            let names = match family {
                Family::Mixtral => ["w1", "w3", "w2"],
                Family::Qwen2Moe => ["gate_proj", "up_proj", "down_proj"],
            };
            put(
                key(l as u16, e, role::GATE_PROJ),
                &format!("{prefix}.{}.weight", names[0]),
                inner,
                hidden,
                dtype,
            )?;
            put(key(l as u16, e, role::UP), &format!("{prefix}.{}.weight", names[1]), inner, hidden, dtype)?;
            put(key(l as u16, e, role::DOWN), &format!("{prefix}.{}.weight", names[2]), hidden, inner, dtype)
        };
        if ls.experts > 0 {
            put(at(role::GATE), &format!("{moe}.gate.weight"), ls.experts, hidden, gate_dtype)?;
            for e in 0..ls.experts {
                swiglu(e as u16, &format!("{moe}.experts.{e}"), ls.hidden, &mut put)?;
            }
            if ls.shared_hidden > 0 {
                swiglu(SHARED_EXPERT, &format!("{moe}.shared_expert"), ls.shared_hidden, &mut put)?;
                put(
                    at(role::SHARED_GATE),
                    &format!("{moe}.shared_expert_gate.weight"),
                    1,
                    hidden,
                    gate_dtype,
                )?;
            }
        } else {
            // A dense layer: its MLP is the layer's only (shared, ungated) expert.
            swiglu(SHARED_EXPERT, &moe, ls.shared_hidden, &mut put)?;
        }
    }
    // Vectors, always f32.
    let mut vector = |k: Key, name: &str, n: usize| -> Result<(), HostError> {
        let v = ck.tensor(name, &[n])?;
        spec.put(k, n, 1, &v, LayerDtype::F32);
        Ok(())
    };
    vector(key(MODEL_LEVEL, LAYER_LEVEL, drole::FINAL_NORM), "model.norm.weight", hidden)?;
    for l in 0..n_layers {
        let p = format!("model.layers.{l}");
        let at = |r| key(l as u16, LAYER_LEVEL, r);
        vector(at(drole::ATTN_NORM), &format!("{p}.input_layernorm.weight"), hidden)?;
        vector(at(drole::FFN_NORM), &format!("{p}.post_attention_layernorm.weight"), hidden)?;
    }
    if qkv_bias {
        for l in 0..n_layers {
            for (r, name, n) in
                [(drole::Q, "q_proj", q_dim), (drole::K, "k_proj", kv_dim), (drole::V, "v_proj", kv_dim)]
            {
                let b = ck.tensor(&format!("model.layers.{l}.self_attn.{name}.bias"), &[n])?;
                spec.put_bias(key(l as u16, LAYER_LEVEL, r), &b);
            }
        }
    }
    if tied {
        // Some checkpoints store the tied output projection anyway.
        ck.optional("lm_head.weight", &[vocab, hidden])?;
    }
    ck.check_all_used()?;
    Ok(spec.write()?)
}
