//! The host's answers for the firmware checks under `boards/`: the first 32
//! digits test images run through each committed model on the host. The
//! boards must reproduce them (integer paths bit for bit). This test keeps
//! the committed vectors in step with the host; regenerate them with
//! `MICROMOE_BLESS=1 cargo test --test board_vectors`.
//!
//! Layout (little-endian): magic `MMVEC1\0\0`, u32 samples, u32 input
//! width, u32 output width, u32 reserved, then inputs (f32), outputs (f32),
//! and the first chosen expert of each sample (u32).

use micromoe::Model;
use micromoe::include_model;
use safetensors::SafeTensors;

mod tensors;
use tensors::f32s;

const SAMPLES: usize = 32;
const MODELS: [(&str, &[u8]); 4] = [
    ("f32", include_model!("../models/digits/digits_f32.moe")),
    ("f16", include_model!("../models/digits/digits_f16.moe")),
    ("int8", include_model!("../models/digits/digits_int8.moe")),
    ("q15", include_model!("../models/digits/digits_q15.moe")),
];

fn vectors(model: &Model<'_>, x: &[f32]) -> Vec<u8> {
    let (n_in, n_out) = (model.input_dim(), model.output_dim());
    let mut out = b"MMVEC1\0\0".to_vec();
    for v in [SAMPLES, n_in, n_out, 0] {
        out.extend((v as u32).to_le_bytes());
    }
    let mut scratch = vec![0u8; model.scratch_bytes()];
    let (mut ys, mut experts) = (Vec::new(), Vec::new());
    for xi in x.chunks_exact(n_in).take(SAMPLES) {
        out.extend(xi.iter().flat_map(|v| v.to_le_bytes()));
        let mut y = vec![0.0f32; n_out];
        let mut first = 0u32;
        model.infer_observed(xi, &mut y, &mut scratch, |s| first = s.selection[0].expert as u32).unwrap();
        ys.extend(y);
        experts.push(first);
    }
    out.extend(ys.iter().flat_map(|v| v.to_le_bytes()));
    out.extend(experts.iter().flat_map(|v| v.to_le_bytes()));
    out
}

#[test]
fn board_vectors_match_the_host() {
    let test = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/test.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&test).unwrap();
    let x = f32s(&st, "x");
    let bless = std::env::var_os("MICROMOE_BLESS").is_some();
    for (dtype, bytes) in MODELS {
        let want = vectors(&Model::parse(bytes).unwrap(), &x);
        let path = format!("{}/boards/vectors/digits_{dtype}.bin", env!("CARGO_MANIFEST_DIR"));
        if bless {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read(&path).unwrap_or_default();
        assert!(have == want, "{path} is stale: run MICROMOE_BLESS=1 cargo test --test board_vectors");
    }
}

/// boards/minimal's eight images: the first test images as pixels (input x
/// 16, each 0..=16), each followed by the class the host's int8 model gives.
#[test]
fn minimal_firmware_images_match_the_host() {
    let test = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/test.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&test).unwrap();
    let x = f32s(&st, "x");
    let model = Model::parse(MODELS[2].1).unwrap();
    let mut scratch = vec![0u8; model.scratch_bytes()];
    let mut want = Vec::new();
    for xi in x.chunks_exact(64).take(8) {
        want.extend(xi.iter().map(|&v| {
            assert!((v * 16.0).fract() == 0.0 && (0.0..=1.0).contains(&v));
            (v * 16.0) as u8
        }));
        let mut scores = [0.0f32; 10];
        want.push(model.classify(xi, &mut scores, &mut scratch).unwrap() as u8);
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/boards/minimal/images.bin");
    if std::env::var_os("MICROMOE_BLESS").is_some() {
        std::fs::write(path, &want).unwrap();
    }
    assert!(std::fs::read(path).unwrap_or_default() == want, "{path} is stale: MICROMOE_BLESS=1");
}

/// The tiny language model's check: prompt and greedy tokens, then the
/// FNV-1a hash of the bits of every logit of every step.
/// Layout: magic `MMTOK1\0\0`, u32 prompt length, u32 generated, the tokens
/// (u32), the hash (u64).
const TINYLM: &[u8] = include_model!("../models/tinylm/tinylm_int8.moe");
/// The same with one int8 scale per 32 columns.
const TINYLM_G32: &[u8] = include_model!("../models/tinylm/tinylm_int8_g32.moe");
const PROMPT: &str = "The ";
const GENERATED: usize = 60;

fn tinylm_vectors(model: &[u8]) -> Vec<u8> {
    use micromoe::model::{Decoder, Sampler};
    let dec = Decoder::parse(model).unwrap();
    let mut buf = vec![0u8; dec.state_bytes()];
    let mut state = dec.state(&mut buf).unwrap();
    let mut logits = vec![0.0f32; dec.config().vocab];
    let mut sampler = Sampler::greedy();
    let mut tokens: Vec<u32> = PROMPT.bytes().map(u32::from).collect();
    let mut hash = 0xCBF2_9CE4_8422_2325u64;
    for i in 0..PROMPT.len() + GENERATED - 1 {
        dec.step(&mut state, tokens[i], &mut logits, |_, _| {}).unwrap();
        for b in logits.iter().flat_map(|v| v.to_bits().to_le_bytes()) {
            hash = (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
        }
        if i + 1 >= PROMPT.len() {
            tokens.push(state.sample(&mut sampler, &mut logits).unwrap());
        }
    }
    let mut out = b"MMTOK1\0\0".to_vec();
    for v in [PROMPT.len(), GENERATED] {
        out.extend((v as u32).to_le_bytes());
    }
    out.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    out.extend(hash.to_le_bytes());
    out
}

#[test]
fn tinylm_vectors_match_the_host() {
    for (model, file) in [(TINYLM, "tinylm.bin"), (TINYLM_G32, "tinylm_g32.bin")] {
        let want = tinylm_vectors(model);
        let path = format!("{}/boards/vectors/{file}", env!("CARGO_MANIFEST_DIR"));
        if std::env::var_os("MICROMOE_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read(&path).unwrap_or_default();
        assert!(have == want, "{path} is stale: run MICROMOE_BLESS=1 cargo test --test board_vectors");
    }
}
