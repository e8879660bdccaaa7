//! Decoders converted from Hugging Face checkpoints against transformers'
//! own logits and expert choices (tools/make_decoder_fixtures.py: fp32,
//! eager attention, one causal forward over the sequence), fed here one
//! token at a time through the KV cache.

use std::path::{Path, PathBuf};

use micromoe::format::write::AlignedBytes;
use micromoe::host::{DecoderOptions, Dtype, convert_decoder};
use micromoe::model::Decoder;
use serde_json::Value;

mod common;
use common::DECODER_CASES as CASES;

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
    let dec = Decoder::parse(&bytes).unwrap();
    let mut buf = vec![0u8; dec.state_bytes()];
    assert_eq!(Ok(buf.len()), micromoe::model::required_scratch(&bytes));
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

/// How a conversion compares with transformers.
struct Compared {
    /// Largest |logit error| over positions where every layer chose
    /// transformers' experts.
    err: f32,
    /// Largest |reference logit|.
    scale: f32,
    /// (MoE layer, position) choices, and those that differ.
    choices: usize,
    differ: usize,
    /// Smallest reference margin at a differing choice (1.0 if none).
    differ_margin: f32,
    /// Positions where the argmax token differs.
    argmax_differ: usize,
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
}

fn compare(name: &str, opts: &DecoderOptions) -> Compared {
    let r = reference(name);
    let bytes = convert_decoder(&dir(name), opts).unwrap();
    let (logits, experts) = run(&bytes, &r.tokens);
    assert_eq!(experts.len(), r.experts.len(), "{name}: MoE layers");
    let mut c =
        Compared { err: 0.0, scale: 0.0, choices: 0, differ: 0, differ_margin: 1.0, argmax_differ: 0 };
    let mut agree = vec![true; r.tokens.len()];
    for (l, (ours, theirs)) in experts.iter().zip(&r.experts).enumerate() {
        for (p, (a, b)) in ours.iter().zip(theirs).enumerate() {
            c.choices += 1;
            if a != b {
                c.differ += 1;
                c.differ_margin = c.differ_margin.min(r.margins[l][p]);
                agree[p] = false;
            }
        }
    }
    for (p, (ours, theirs)) in logits.iter().zip(&r.logits).enumerate() {
        c.scale = theirs.iter().fold(c.scale, |m, v| m.max(v.abs()));
        if agree[p] {
            c.err = ours.iter().zip(theirs).map(|(x, y)| (x - y).abs()).fold(c.err, f32::max);
        }
        if argmax(ours) != argmax(theirs) {
            c.argmax_differ += 1;
        }
    }
    c
}

#[test]
fn f32_matches_transformers() {
    for name in CASES {
        let c = compare(name, &DecoderOptions::new(Dtype::F32));
        println!("{name} f32: max |logit error| {:.2e} (largest logit {:.1})", c.err, c.scale);
        assert_eq!(c.differ, 0, "{name}: f32 experts differ at {} choices", c.differ);
        assert!(c.err <= 1e-4, "{name}: f32 logits differ by {:e}", c.err);
        assert_eq!(c.argmax_differ, 0);
    }
}

/// f16 weights (and an f16 KV cache) round every weight by up to 2^-11
/// relative: logits within 1e-2, and transformers' experts wherever its
/// k-th choice leads the next by more than 1e-3 in probability.
#[test]
fn f16_within_tolerance() {
    for name in CASES {
        for (label, opts) in [
            ("f16", DecoderOptions::new(Dtype::F16)),
            ("f16 kv-f16", DecoderOptions { kv_f16: true, ..DecoderOptions::new(Dtype::F16) }),
            ("f32 kv-f16", DecoderOptions { kv_f16: true, ..DecoderOptions::new(Dtype::F32) }),
        ] {
            let c = compare(name, &opts);
            println!(
                "{name} {label}: max |logit error| {:.2e}, {}/{} choices differ",
                c.err, c.differ, c.choices
            );
            assert!(c.err <= 1e-2, "{name} {label}: logits differ by {:e}", c.err);
            assert!(
                c.differ == 0 || c.differ_margin < 1e-3,
                "{name} {label}: experts differ at margin {:e}",
                c.differ_margin
            );
        }
    }
}

/// One int8 conversion against transformers, printed and held to the int8
/// tolerance (below).
fn int8_checked(name: &str, label: &str, opts: &DecoderOptions) -> Compared {
    let c = compare(name, opts);
    println!(
        "{name} {label}: max |logit error| {:.2e} = {:.3} of the largest, {}/{} choices differ (margin >= {:.1e}), argmax differs at {}",
        c.err,
        c.err / c.scale,
        c.differ,
        c.choices,
        c.differ_margin,
        c.argmax_differ
    );
    assert!(c.err <= 0.1 * c.scale, "{name} {label}: logits differ by {:e}", c.err);
    assert!(
        c.differ == 0 || c.differ_margin < 0.05,
        "{name} {label}: experts differ at margin {:e}",
        c.differ_margin
    );
    c
}

/// int8 weights (per row) times int8 inputs (per vector) lose about 1% per
/// product: a router may then pick another expert where transformers' k-th
/// and (k+1)-th probabilities are within 0.05 (and does so for at most 5%
/// of choices); at positions where every layer agrees, logits are within
/// 10% of the largest logit.
#[test]
fn int8_within_tolerance() {
    let (mut choices, mut differ, mut argmax_differ, mut positions) = (0, 0, 0, 0);
    for name in CASES {
        for (label, opts) in [
            ("int8", DecoderOptions::new(Dtype::Int8)),
            (
                "int8 gate-f32",
                DecoderOptions { gate_dtype: Some(Dtype::F32), ..DecoderOptions::new(Dtype::Int8) },
            ),
        ] {
            let c = int8_checked(name, label, &opts);
            (choices, differ, argmax_differ) =
                (choices + c.choices, differ + c.differ, argmax_differ + c.argmax_differ);
            positions += reference(name).tokens.len();
        }
    }
    println!(
        "int8 overall: {differ}/{choices} choices differ, argmax differs at {argmax_differ}/{positions} positions"
    );
    assert!(differ * 20 <= choices, "{differ} of {choices} choices differ");
}

/// int8 with one scale per 16 columns, inputs quantized per 16 too (the
/// Mixtral fixtures, whose every width is a multiple of 16): the same
/// tolerance as one scale a row; the errors beside it are printed.
#[test]
fn int8_groups_within_tolerance() {
    for name in ["mixtral_tied", "mixtral_8x2_untied", "mixtral_top1_head_dim"] {
        for (label, group) in [("int8 per row", None), ("int8 group 16", Some(16))] {
            int8_checked(
                name,
                label,
                &DecoderOptions { int8_group: group, ..DecoderOptions::new(Dtype::Int8) },
            );
        }
    }
    // Widths the group does not divide are refused with the tensor named.
    let e = convert_decoder(
        &dir("qwen2_moe_shared"),
        &DecoderOptions { int8_group: Some(16), ..DecoderOptions::new(Dtype::Int8) },
    )
    .unwrap_err();
    assert!(e.to_string().contains("does not divide the 24 columns"), "{e}");
}
