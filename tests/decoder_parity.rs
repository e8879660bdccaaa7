//! Decoders converted from Hugging Face checkpoints against transformers'
//! own logits and expert choices (tools/make_decoder_fixtures.py: fp32,
//! eager attention, one causal forward over the sequence), fed here one
//! token at a time through the KV cache.

use std::path::{Path, PathBuf};

use micromoe::format::write::AlignedBytes;
use micromoe::host::{DecoderOptions, Dtype, convert_decoder};
use micromoe::model::Decoder;
use serde_json::Value;

const CASES: [&str; 6] = [
    "mixtral_tied",
    "mixtral_8x2_untied",
    "mixtral_top1_head_dim",
    "qwen2_moe_shared",
    "qwen2_moe_dense_layers",
    "qwen2_moe_sparse_step",
];

struct Reference {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
    /// (MoE layer, position) -> experts in router order.
    experts: Vec<Vec<Vec<u16>>>,
    margins: Vec<Vec<f32>>,
}

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoders").join(name)
}

fn reference(name: &str) -> Reference {
    let v: Value = serde_json::from_slice(&std::fs::read(dir(name).join("reference.json")).unwrap()).unwrap();
    let floats =
        |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect::<Vec<_>>();
    Reference {
        tokens: v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect(),
        logits: v["logits"].as_array().unwrap().iter().map(floats).collect(),
        experts: v["experts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                l.as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_array().unwrap().iter().map(|e| e.as_u64().unwrap() as u16).collect())
                    .collect()
            })
            .collect(),
        margins: v["margins"].as_array().unwrap().iter().map(floats).collect(),
    }
}

/// Logits per position and, per MoE layer and position, the experts chosen.
type Run = (Vec<Vec<f32>>, Vec<Vec<Vec<u16>>>);

fn run(bytes: &[u8], tokens: &[u32]) -> Run {
    let bytes = AlignedBytes::from(bytes);
    let model = micromoe::Model::parse(&bytes).unwrap();
    let dec = Decoder::new(&model).unwrap();
    let mut buf = vec![0u8; dec.state_bytes()];
    assert_eq!(buf.len(), model.scratch_bytes());
    let mut state = dec.state(&mut buf).unwrap();
    let moe_layers: Vec<usize> =
        (0..dec.config().layers).filter(|&l| dec.layer_config(l).unwrap().experts > 0).collect();
    let mut experts = vec![Vec::new(); moe_layers.len()];
    let mut logits = Vec::new();
    for &t in tokens {
        let mut out = vec![0.0; dec.config().vocab];
        dec.step(&mut state, t, &mut out, |l, sel| {
            if let Some(i) = moe_layers.iter().position(|&m| m == l) {
                experts[i].push(sel.iter().map(|c| c.expert).collect());
            }
        })
        .unwrap();
        logits.push(out);
    }
    (logits, experts)
}

fn max_abs(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Compares a conversion with transformers; returns (worst logit error,
/// largest reference logit, positions with other experts, near ties skipped).
fn compare(name: &str, opts: &DecoderOptions) -> (f32, f32, usize, usize) {
    let r = reference(name);
    let bytes = convert_decoder(&dir(name), opts).unwrap();
    let (logits, experts) = run(&bytes, &r.tokens);
    assert_eq!(experts.len(), r.experts.len(), "{name}: MoE layers");
    let (mut differ, mut ties) = (0, 0);
    for (l, (ours, theirs)) in experts.iter().zip(&r.experts).enumerate() {
        for (p, (a, b)) in ours.iter().zip(theirs).enumerate() {
            if r.margins[l][p] < 1e-5 {
                ties += 1;
            } else if a != b {
                differ += 1;
            }
        }
    }
    let scale = r.logits.iter().flatten().fold(0.0f32, |m, v| m.max(v.abs()));
    (max_abs(&logits, &r.logits), scale, differ, ties)
}

#[test]
fn f32_matches_transformers() {
    for name in CASES {
        let (err, scale, differ, ties) = compare(name, &DecoderOptions::new(Dtype::F32));
        println!("{name} f32: max |logit error| {err:.2e} (largest logit {scale:.1}), near ties {ties}");
        assert!(err <= 1e-4, "{name}: f32 logits differ by {err:e}");
        assert_eq!(differ, 0, "{name}: f32 experts differ at {differ} positions");
    }
}
