//! Bad decoder bytes and bad calls: each a specific error, never a panic.

use std::path::Path;

use micromoe::format::layout;
use micromoe::format::write::AlignedBytes;
use micromoe::host::{DecoderOptions, Dtype, convert_decoder};
use micromoe::model::{Decoder, Sampler};
use micromoe::{Error, Model, What};

fn model_bytes(name: &str, dtype: Dtype) -> Vec<u8> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoders").join(name);
    convert_decoder(&dir, &DecoderOptions { context: Some(8), ..DecoderOptions::new(dtype) }).unwrap()
}

/// Rewrites the checksum (a version this build does not read keeps its
/// trailer).
fn reseal(b: &mut [u8]) {
    layout::seal(b);
}

#[test]
fn truncations_and_bit_flips_are_refused() {
    let bytes = model_bytes("qwen2_moe_shared", Dtype::Int8);
    for n in (0..bytes.len()).filter(|&n| n < 4096 || n % 7 == 0) {
        let b = AlignedBytes::from(&bytes[..n]);
        assert!(Decoder::parse(&b).is_err(), "truncated to {n} accepted");
    }
    for at in (0..bytes.len()).step_by(13) {
        let mut b = bytes.clone();
        b[at] ^= 1 << (at % 8);
        let b = AlignedBytes::from(&b[..]);
        let r = Decoder::parse(&b);
        // Magic, version and length are read before the checksum.
        assert!(
            if at < 16 { r.is_err() } else { matches!(r, Err(Error::Checksum { .. })) },
            "flip at {at}: {r:?}"
        );
    }
}

#[test]
fn bad_calls_get_specific_errors() {
    let bytes = AlignedBytes::from(&model_bytes("mixtral_tied", Dtype::F32)[..]);
    // Each graph type parses its own architecture.
    assert_eq!(Model::parse(&bytes).unwrap_err(), Error::WrongArchitecture { found: 3 });
    let digits =
        micromoe::include_model!(concat!(env!("CARGO_MANIFEST_DIR"), "/models/digits/digits_int8.moe"));
    assert_eq!(Decoder::parse(digits).unwrap_err(), Error::WrongArchitecture { found: 1 });
    let dec = Decoder::parse(&bytes).unwrap();
    let need = dec.state_bytes();
    assert_eq!(micromoe::model::required_scratch(&bytes), Ok(need), "scratch_len! sizes a decoder's state");
    let mut buf = vec![0u8; need];
    assert_eq!(
        dec.state(&mut buf[..need - 1]).unwrap_err(),
        Error::ScratchTooSmall { needed: need, actual: need - 1 }
    );
    let mut state = dec.state(&mut buf).unwrap();
    let mut logits = vec![0.0; 96];
    assert_eq!(
        dec.step(&mut state, 96, &mut logits, |_, _| {}).unwrap_err(),
        Error::OutOfRange { what: What::Token, index: 96 }
    );
    assert!(matches!(dec.step(&mut state, 1, &mut logits[..95], |_, _| {}), Err(Error::Shape { .. })));
    for t in 0..8 {
        dec.step(&mut state, t, &mut logits, |_, _| {}).unwrap();
    }
    assert_eq!(
        dec.step(&mut state, 1, &mut logits, |_, _| {}).unwrap_err(),
        Error::ContextFull { context: 8 }
    );
    state.reset();
    dec.step(&mut state, 1, &mut logits, |_, _| {}).unwrap();
    // A state belongs to the decoder that made it.
    let other_bytes = AlignedBytes::from(&model_bytes("qwen2_moe_shared", Dtype::F32)[..]);
    let other = Decoder::parse(&other_bytes).unwrap();
    let mut l2 = vec![0.0; other.config().vocab];
    assert_eq!(other.step(&mut state, 1, &mut l2, |_, _| {}).unwrap_err(), Error::WrongState);
    // Sampling refuses NaN logits and nonsense parameters.
    logits[3] = f32::NAN;
    assert!(matches!(state.sample(&mut Sampler::greedy(), &mut logits), Err(Error::NonFinite { .. })));
    logits[3] = 0.0;
    assert!(state.sample(&mut Sampler::new(1.0, 1.5, 0), &mut logits).is_err());
    // Misaligned model bytes.
    let mut shifted = vec![0u8; bytes.len() + 1];
    shifted[1..].copy_from_slice(&bytes);
    let base = AlignedBytes::from(&shifted[..]);
    assert!(matches!(Decoder::parse(&base[1..]), Err(Error::Misaligned { offset: 1 })));
}

/// Random checksum-valid edits aimed at the header, records and table; whatever
/// is accepted runs a few tokens without panicking.
#[test]
fn random_edits_never_panic() {
    let (mut accepted, mut refused) = (0, 0);
    for (name, dtype) in [("qwen2_moe_dense_layers", Dtype::Int8), ("mixtral_tied", Dtype::F16)] {
        let bytes = model_bytes(name, dtype);
        let model = AlignedBytes::from(&bytes[..]);
        let dec = Decoder::parse(&model).unwrap();
        let (n_tensors, layers) = (dec.table().len(), dec.config().layers);
        let meta = 64 + 64 + 96 * layers + 32 * n_tensors;
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let mut b = bytes.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() % (b.len() as u64 - 4)) as usize;
                let at = if next() % 8 != 0 { at % meta } else { at };
                b[at] = if next() % 2 == 0 { next() as u8 } else { b[at] ^ (1 << (next() % 8)) };
            }
            reseal(&mut b);
            let aligned = AlignedBytes::from(&b[..]);
            let Ok(dec) = Decoder::parse(&aligned) else {
                refused += 1;
                continue;
            };
            accepted += 1;
            if dec.state_bytes() > 1 << 24 {
                continue;
            }
            let mut buf = vec![0u8; dec.state_bytes()];
            let mut state = dec.state(&mut buf).unwrap();
            let mut logits = vec![0.0; dec.config().vocab];
            for t in 0..3u32 {
                let _ = dec.step(&mut state, t % dec.config().vocab as u32, &mut logits, |_, _| {});
            }
        }
    }
    println!("random decoder edits: {accepted} accepted, {refused} refused");
    assert!(refused > 1000);
}
