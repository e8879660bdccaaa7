//! The tiny MoE language model (models/tinylm, trained by
//! tools/train_tinylm.py): greedy continuations against transformers'
//! `generate`, and the committed int8 model against the converter.

use std::path::{Path, PathBuf};

use micromoe::format::write::AlignedBytes;
use micromoe::host::{DecoderOptions, Dtype, convert_decoder};
use micromoe::model::{Decoder, ResolvedDecoder, Sampler};
use serde_json::Value;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinylm")
}

/// The committed int8 model's conversion options.
fn int8_options() -> DecoderOptions {
    DecoderOptions { context: Some(128), kv_f16: true, ..DecoderOptions::new(Dtype::Int8) }
}

/// Prompts and transformers' greedy continuations.
fn reference() -> Vec<(String, Vec<u32>)> {
    let v: Value = serde_json::from_slice(&std::fs::read(dir().join("reference.json")).unwrap()).unwrap();
    v["greedy"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, c)| (p.clone(), c.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()))
        .collect()
}

fn greedy(bytes: &[u8], prompt: &str, n: usize) -> Vec<u32> {
    let bytes = AlignedBytes::from(bytes);
    let dec = Decoder::parse(&bytes).unwrap();
    let mut buf = vec![0u8; dec.state_bytes()];
    let mut state = dec.state(&mut buf).unwrap();
    let mut logits = vec![0.0; dec.config().vocab];
    let mut sampler = Sampler::greedy();
    for b in prompt.bytes() {
        dec.step(&mut state, b as u32, &mut logits, |_, _| {}).unwrap();
    }
    let mut out = Vec::new();
    for _ in 0..n {
        let t = state.sample(&mut sampler, &mut logits).unwrap();
        out.push(t);
        dec.step(&mut state, t, &mut logits, |_, _| {}).unwrap();
    }
    out
}

fn text(t: &[u32]) -> String {
    t.iter().map(|&b| char::from(b as u8)).collect()
}

#[test]
fn f32_greedy_matches_transformers_generate() {
    let bytes = convert_decoder(&dir(), &DecoderOptions::new(Dtype::F32)).unwrap();
    for (prompt, theirs) in reference() {
        let ours = greedy(&bytes, &prompt, theirs.len());
        assert_eq!(text(&ours), text(&theirs), "prompt {prompt:?}");
    }
}

#[test]
fn int8_greedy_follows_transformers() {
    for file in ["tinylm_int8.moe", "tinylm_int8_g32.moe"] {
        int8_follows(file);
    }
}

fn int8_follows(file: &str) {
    let bytes = std::fs::read(dir().join(file)).unwrap();
    let (mut same, mut total) = (0, 0);
    for (prompt, theirs) in reference() {
        let ours = greedy(&bytes, &prompt, theirs.len());
        let lead = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
        println!("{prompt:?}: first {lead} of {} tokens as transformers: {:?}", theirs.len(), text(&ours));
        // int8 rounding moves logits by a few percent: near-equal choices may
        // flip later on, but every continuation starts as transformers' does.
        assert!(lead >= 8, "{prompt:?}: int8 diverges after {lead} tokens");
        same += lead;
        total += theirs.len();
    }
    println!("{file}: {same} of {total} greedy tokens before the first divergence");
}

#[test]
fn committed_int8_models_are_the_conversion() {
    let g32 = DecoderOptions { int8_group: Some(32), ..int8_options() };
    for (file, opts) in [("tinylm_int8.moe", int8_options()), ("tinylm_int8_g32.moe", g32)] {
        let committed = std::fs::read(dir().join(file)).unwrap();
        let fresh = convert_decoder(&dir(), &opts).unwrap();
        assert!(committed == fresh, "models/tinylm/{file} is stale: re-run micromoe convert (see README)");
    }
}

#[test]
fn resolved_views_give_the_same_logits_bit_for_bit() {
    let bytes = std::fs::read(dir().join("tinylm_int8.moe")).unwrap();
    let bytes = AlignedBytes::from(&bytes[..]);
    let dec = Decoder::parse(&bytes).unwrap();
    let resolved = ResolvedDecoder::<2>::new(&dec).unwrap();
    assert!(matches!(
        ResolvedDecoder::<1>::new(&dec),
        Err(micromoe::Error::TooManyLayers { layers: 2, capacity: 1 })
    ));
    let (mut a, mut b) = (vec![0u8; dec.state_bytes()], vec![0u8; dec.state_bytes()]);
    let (mut sa, mut sb) = (dec.state(&mut a).unwrap(), dec.state(&mut b).unwrap());
    let vocab = dec.config().vocab;
    let (mut la, mut lb) = (vec![0.0f32; vocab], vec![0.0f32; vocab]);
    let (mut ea, mut eb) = (Vec::new(), Vec::new());
    for t in "The quick brown fox".bytes() {
        dec.step(&mut sa, t as u32, &mut la, |l, s| {
            ea.push((l, s.iter().map(|c| c.expert).collect::<Vec<_>>()))
        })
        .unwrap();
        resolved
            .step(&mut sb, t as u32, &mut lb, |l, s| {
                eb.push((l, s.iter().map(|c| c.expert).collect::<Vec<_>>()))
            })
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&la), bits(&lb));
    }
    assert_eq!(ea, eb);
}
