//! Loads the PyTorch fixtures made by `tools/make_fixtures.py` and builds
//! micromoe layers from their weights.
#![allow(dead_code)]

use std::collections::HashMap;

use micromoe::expert::Expert;
use micromoe::kernels::{Activation, FloatWeight, Linear};
use micromoe::moe::SharedExpert;
use micromoe::quant::f16;
use micromoe::{MoeLayer, Router, Rule};
use safetensors::{Dtype, SafeTensors};

pub const MOE_CASES: &[&str] = &[
    "mixtral_h16_e4_k1",
    "mixtral_h32_e8_k2",
    "mixtral_h24_e6_k3",
    "mixtral_h48_e8_k2",
    "qwen2moe_h16_e4_k1_norm",
    "qwen2moe_h32_e8_k2",
    "qwen2moe_h24_e6_k3_norm",
    "qwen2moe_h32_e6_k3",
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
                    floats.insert(key, data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect());
                }
                Dtype::I64 => {
                    ints.insert(key, data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect());
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

    pub fn rule(&self) -> Rule {
        let (e, k) = (self.meta("experts"), self.meta("k"));
        match self.meta["arch"].as_str() {
            "mixtral" => Rule::mixtral(e, k),
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

/// Weights of one gated expert, converted to `W`.
struct Gated<W> {
    w1: Vec<W>,
    w3: Vec<W>,
    w2: Vec<W>,
    inter: usize,
}

impl<W: FloatWeight> Gated<W> {
    fn load(fx: &Fixture, prefix: &str, conv: fn(f32) -> W) -> Self {
        let c = |k: &str| fx.f32(&format!("{prefix}.{k}")).iter().map(|&v| conv(v)).collect::<Vec<W>>();
        Gated { w1: c("w1"), w3: c("w3"), w2: c("w2"), inter: fx.shape(&format!("{prefix}.w1"))[0] }
    }

    fn expert(&self, hidden: usize) -> Expert<'_, W> {
        fn lin<W: FloatWeight>(w: &[W], r: usize, c: usize) -> Linear<'_, W> {
            Linear::new(w, None, r, c).unwrap()
        }
        Expert::gated(
            lin(&self.w1, self.inter, hidden),
            lin(&self.w3, self.inter, hidden),
            lin(&self.w2, hidden, self.inter),
            Activation::Silu,
        )
        .unwrap()
    }
}

pub fn to_f32(v: f32) -> f32 {
    v
}

pub fn to_f16(v: f32) -> f16 {
    f16::from_f32(v)
}

/// Builds the fixture's block as a micromoe layer with weights converted by
/// `conv` (gate included) and hands it to `f`.
pub fn with_layer<W: FloatWeight, R>(fx: &Fixture, conv: fn(f32) -> W, f: impl FnOnce(&MoeLayer<'_, W, W>) -> R) -> R {
    let h = fx.hidden();
    let n = fx.meta("experts");
    let gate: Vec<W> = fx.f32("gate").iter().map(|&v| conv(v)).collect();
    let experts: Vec<Gated<W>> = (0..n).map(|e| Gated::load(fx, &format!("experts.{e}"), conv)).collect();
    let views: Vec<Expert<'_, W>> = experts.iter().map(|e| e.expert(h)).collect();
    let shared = (fx.meta("shared") == 1).then(|| Gated::load(fx, "shared", conv));
    let shared_gate: Option<Vec<W>> = shared.as_ref().map(|_| fx.f32("shared_gate").iter().map(|&v| conv(v)).collect());
    let shared = shared.as_ref().map(|s| SharedExpert {
        expert: s.expert(h),
        gate: shared_gate.as_deref().map(|g| Linear::new(g, None, 1, h).unwrap()),
    });
    let router = Router::new(fx.rule(), None, 1.0).unwrap();
    let layer = MoeLayer::new(Linear::new(&gate, None, n, h).unwrap(), router, &views, shared).unwrap();
    f(&layer)
}

/// `max_j |got_j - want_j| / max_j |want_j|`: error relative to the row's scale.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / scale
}
