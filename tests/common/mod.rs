//! Loads the PyTorch fixtures made by `tools/make_fixtures.py` and builds
//! micromoe layers from their weights.
#![allow(dead_code)]

use std::collections::HashMap;

use micromoe::build::{ExpertBuf, LinearBuf, MoeBuf};
use micromoe::kernels::{Activation, FloatWeight};
use micromoe::quant::f16;
use micromoe::{MoeLayer, Rule};
use safetensors::{Dtype, SafeTensors};

/// The committed decoders (tests/fixtures/decoders, made by
/// tools/make_decoder_fixtures.py).
pub const DECODER_CASES: [&str; 6] = [
    "mixtral_tied",
    "mixtral_8x2_untied",
    "mixtral_top1_head_dim",
    "qwen2_moe_shared",
    "qwen2_moe_dense_layers",
    "qwen2_moe_sparse_step",
];

pub const MOE_CASES: &[&str] = &[
    "mixtral_h16_e4_k1",
    "mixtral_h32_e8_k2",
    "mixtral_h24_e6_k3",
    "mixtral_h48_e8_k2",
    "qwen2moe_h16_e4_k1_norm",
    "qwen2moe_h32_e8_k2",
    "qwen2moe_h24_e6_k3_norm",
    "qwen2moe_h32_e6_k3",
    "switch_mlp_gelu_h16_e4",
    "glam_mlp_relu_h24_e8_k2",
];

pub struct Fixture {
    pub name: String,
    meta: HashMap<String, String>,
    floats: HashMap<String, Vec<f32>>,
    ints: HashMap<String, Vec<i64>>,
    shapes: HashMap<String, Vec<usize>>,
}

impl Fixture {
    pub fn load(name: &str) -> Fixture {
        let path = format!("{}/tests/fixtures/{name}.safetensors", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (mut floats, mut ints, mut shapes) = (HashMap::new(), HashMap::new(), HashMap::new());
        for (key, view) in st.tensors() {
            shapes.insert(key.clone(), view.shape().to_vec());
            let data = view.data();
            match view.dtype() {
                Dtype::F32 => {
                    floats.insert(
                        key,
                        data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
                    );
                }
                Dtype::I64 => {
                    ints.insert(
                        key,
                        data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect(),
                    );
                }
                d => panic!("{name}: {key}: unexpected dtype {d:?}"),
            }
        }
        Fixture { name: name.to_string(), meta, floats, ints, shapes }
    }

    pub fn f32(&self, key: &str) -> &[f32] {
        self.floats.get(key).unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }

    pub fn i64(&self, key: &str) -> &[i64] {
        self.ints.get(key).unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }

    pub fn shape(&self, key: &str) -> &[usize] {
        &self.shapes[key]
    }

    pub fn meta(&self, key: &str) -> usize {
        self.meta[key].parse().unwrap()
    }

    pub fn meta_f32(&self, key: &str) -> f32 {
        self.meta[key].parse().unwrap()
    }

    pub fn tokens(&self) -> usize {
        self.shape("x")[0]
    }

    pub fn hidden(&self) -> usize {
        self.meta("hidden")
    }

    pub fn is_mlp(&self) -> bool {
        self.meta["arch"] == "mlp_moe"
    }

    pub fn activation(&self) -> Activation {
        match self.meta["act"].as_str() {
            "silu" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            a => panic!("{}: unknown activation {a}", self.name),
        }
    }

    pub fn rule(&self) -> Rule {
        let (e, k) = (self.meta("experts"), self.meta("k"));
        match self.meta["arch"].as_str() {
            "mixtral" => Rule::mixtral(e, k),
            "mlp_moe" if self.meta["router"] == "switch" => Rule::switch(e),
            "mlp_moe" => Rule::mixtral(e, k),
            "qwen2_moe" => Rule::qwen2_moe(e, k, self.meta("norm_topk_prob") == 1),
            a => panic!("no MoE rule for {a}"),
        }
    }

    /// Row `t` of a `(tokens, n)` tensor.
    pub fn row<'a>(&'a self, key: &str, t: usize) -> &'a [f32] {
        let n = self.shape(key)[1];
        &self.f32(key)[t * n..(t + 1) * n]
    }

    pub fn experts_row(&self, key: &str, t: usize) -> Vec<u16> {
        let k = self.shape(key)[1];
        self.i64(key)[t * k..(t + 1) * k].iter().map(|&e| e as u16).collect()
    }
}

fn linear(fx: &Fixture, key: &str, bias: Option<&str>) -> LinearBuf<f32> {
    let shape = fx.shape(key);
    LinearBuf::new(fx.f32(key).to_vec(), bias.map(|b| fx.f32(b).to_vec()), shape[0], shape[1])
}

fn gated(fx: &Fixture, prefix: &str) -> ExpertBuf<f32> {
    let w = |k: &str| linear(fx, &format!("{prefix}.{k}"), None);
    ExpertBuf::gated(w("w1"), w("w3"), w("w2"), Activation::Silu)
}

fn mlp(fx: &Fixture, prefix: &str) -> ExpertBuf<f32> {
    let w = |k: &str| linear(fx, &format!("{prefix}.{k}"), Some(&format!("{prefix}.{k}_bias")));
    ExpertBuf::mlp(w("up"), w("down"), fx.activation())
}

/// The fixture's block as an owned micromoe layer.
pub fn model(fx: &Fixture) -> MoeBuf<f32> {
    let expert = |e: usize| {
        let prefix = format!("experts.{e}");
        if fx.is_mlp() { mlp(fx, &prefix) } else { gated(fx, &prefix) }
    };
    let experts = (0..fx.meta("experts")).map(expert).collect();
    let mut m = MoeBuf::new(linear(fx, "gate", None), experts, fx.rule());
    if fx.meta("shared") == 1 {
        m.shared = Some((gated(fx, "shared"), Some(linear(fx, "shared_gate", None))));
    }
    m
}

pub fn to_f32(v: f32) -> f32 {
    v
}

pub fn to_f16(v: f32) -> f16 {
    f16::from_f32(v)
}

/// Builds the fixture's block with weights converted by `conv` (gate
/// included) and hands the runnable layer to `f`.
pub fn with_layer<W: FloatWeight, R>(
    fx: &Fixture,
    conv: fn(f32) -> W,
    f: impl FnOnce(&MoeLayer<'_, W, W>) -> R,
) -> R {
    let m = model(fx).convert(conv);
    let views = m.expert_views().unwrap();
    f(&m.layer(&views).unwrap())
}

/// `max_j |got_j - want_j| / max_j |want_j|`: error relative to the row's scale.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / scale
}
