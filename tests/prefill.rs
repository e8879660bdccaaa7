//! Prefill (`Decoder::prefill`, one batch per layer) and threaded steps
//! (`Decoder::with_threads`) against the decoder's own one-token path on one
//! thread: the same logits, the same experts and the same cache (the steps
//! after it), bit for bit, on every committed decoder in f32,
//! f16 and int8 and on the committed tiny LM; and its bad input refused.
//! The reference is `Decoder::step`, which the parity tests hold to
//! transformers.

use std::path::Path;

use micromoe::Error;
use micromoe::format::write::AlignedBytes;
use micromoe::host::{DecoderOptions, Dtype, convert_decoder};
use micromoe::model::{Decoder, ResolvedDecoder};

type Chosen = Vec<(usize, usize, Vec<u16>)>;

/// Logits after `prompt` then after each of `after`, and every (token,
/// layer) choice of the prompt, token by token.
fn stepped(dec: &Decoder<'_>, prompt: &[u32], after: &[u32]) -> (Vec<Vec<f32>>, Chosen) {
    let mut buf = vec![0u8; dec.state_bytes()];
    let mut state = dec.state(&mut buf).unwrap();
    let mut logits = vec![0.0; dec.config().vocab];
    let mut chosen = Vec::new();
    for (t, &tok) in prompt.iter().enumerate() {
        dec.step(&mut state, tok, &mut logits, |l, s| {
            chosen.push((t, l, s.iter().map(|c| c.expert).collect()))
        })
        .unwrap();
    }
    let mut out = vec![logits.clone()];
    for &tok in after {
        dec.step(&mut state, tok, &mut logits, |_, _| {}).unwrap();
        out.push(logits.clone());
    }
    chosen.sort();
    (out, chosen)
}

/// The same through prefill (the prompt in `parts` batches, the experts on
/// `threads`), then steps.
fn prefilled(
    dec: &Decoder<'_>,
    prompt: &[u32],
    (parts, threads): (usize, usize),
    after: &[u32],
) -> (Vec<Vec<f32>>, Chosen) {
    let dec = dec.with_threads(threads);
    let mut buf = vec![0u8; dec.state_bytes()];
    let mut state = dec.state(&mut buf).unwrap();
    let mut logits = vec![0.0; dec.config().vocab];
    let mut chosen = Vec::new();
    let cut = prompt.len().div_ceil(parts);
    for (i, chunk) in prompt.chunks(cut).enumerate() {
        dec.prefill(&mut state, chunk, &mut logits, |t, l, s| {
            chosen.push((i * cut + t, l, s.iter().map(|c| c.expert).collect()))
        })
        .unwrap();
    }
    assert_eq!(state.pos(), prompt.len());
    let mut out = vec![logits.clone()];
    for &tok in after {
        dec.step(&mut state, tok, &mut logits, |_, _| {}).unwrap();
        out.push(logits.clone());
    }
    chosen.sort();
    (out, chosen)
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter().map(|r| r.iter().map(|x| x.to_bits()).collect()).collect()
}

fn check(bytes: &[u8], what: &str) {
    let bytes = AlignedBytes::from(bytes);
    let dec = Decoder::parse(&bytes).unwrap();
    let (vocab, context) = (dec.config().vocab as u32, dec.config().context);
    let n = (context / 2).clamp(1, 24);
    let prompt: Vec<u32> =
        (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(i) % vocab).collect();
    let after: Vec<u32> = (0..3).map(|i| (i * 7 + 1) % vocab).collect();
    let want = stepped(&dec, &prompt, &after);
    for (parts, threads) in [(1, 1), (3, 1), (1, 3)] {
        let got = prefilled(&dec, &prompt, (parts, threads), &after);
        assert_eq!(
            bits(&got.0),
            bits(&want.0),
            "{what}: logits, prompt in {parts} batches on {threads} threads"
        );
        assert_eq!(got.1, want.1, "{what}: experts, prompt in {parts} batches on {threads} threads");
    }
    // Steps on three threads (experts side by side, the output projection
    // split) give the same.
    let threaded = stepped(&dec.with_threads(3), &prompt, &after);
    assert_eq!(bits(&threaded.0), bits(&want.0), "{what}: steps on 3 threads");
    assert_eq!(threaded.1, want.1, "{what}: experts, steps on 3 threads");
    // The built views give the same.
    let resolved = ResolvedDecoder::<8>::new(&dec).unwrap();
    let mut buf = vec![0u8; dec.state_bytes()];
    let mut state = dec.state(&mut buf).unwrap();
    let mut logits = vec![0.0; vocab as usize];
    resolved.prefill(&mut state, &prompt, &mut logits, |_, _, _| {}).unwrap();
    assert_eq!(bits(&[logits]), bits(&want.0[..1]), "{what}: resolved");
}

#[test]
fn prefill_equals_steps_on_every_decoder_fixture() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoders");
    let mut dirs: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    assert!(dirs.len() >= 6);
    for dir in dirs {
        for (dtype, kv_f16) in [(Dtype::F32, false), (Dtype::F16, true), (Dtype::Int8, false)] {
            let opts = DecoderOptions { kv_f16, ..DecoderOptions::new(dtype) };
            let bytes = convert_decoder(&dir, &opts).unwrap();
            check(&bytes, &format!("{} {dtype:?}", dir.display()));
        }
    }
}

#[test]
fn prefill_equals_steps_on_the_tiny_lm() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinylm/tinylm_int8.moe");
    check(&std::fs::read(path).unwrap(), "tinylm int8");
    // One int8 scale per 32 columns.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tinylm");
    let opts = DecoderOptions { int8_group: Some(32), ..DecoderOptions::new(Dtype::Int8) };
    check(&convert_decoder(&dir, &opts).unwrap(), "tinylm int8 group 32");
}

#[test]
fn prefill_equals_steps_with_int8_groups() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoders");
    for name in ["mixtral_tied", "mixtral_8x2_untied", "mixtral_top1_head_dim"] {
        let opts = DecoderOptions { int8_group: Some(16), ..DecoderOptions::new(Dtype::Int8) };
        check(&convert_decoder(&root.join(name), &opts).unwrap(), &format!("{name} int8 group 16"));
    }
}

#[test]
fn bad_prompts_are_refused_and_leave_the_state() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/decoders/mixtral_tied");
    let bytes = convert_decoder(&dir, &DecoderOptions::new(Dtype::F32)).unwrap();
    let bytes = AlignedBytes::from(&bytes[..]);
    let dec = Decoder::parse(&bytes).unwrap();
    let (vocab, context) = (dec.config().vocab, dec.config().context);
    let mut buf = vec![0u8; dec.state_bytes()];
    let mut state = dec.state(&mut buf).unwrap();
    let mut logits = vec![0.0; vocab];
    let none = |_: usize, _: usize, _: &micromoe::Selection<f32>| {};
    assert!(matches!(dec.prefill(&mut state, &[], &mut logits, none), Err(Error::Shape { .. })));
    let bad = [0, vocab as u32];
    assert!(matches!(dec.prefill(&mut state, &bad, &mut logits, none), Err(Error::OutOfRange { .. })));
    let long = vec![1u32; context + 1];
    assert!(matches!(dec.prefill(&mut state, &long, &mut logits, none), Err(Error::ContextFull { .. })));
    assert!(matches!(dec.prefill(&mut state, &[1], &mut logits[1..], none), Err(Error::Shape { .. })));
    assert_eq!(state.pos(), 0);
    // Exactly the context fits; then nothing more.
    dec.prefill(&mut state, &vec![1u32; context], &mut logits, none).unwrap();
    assert!(matches!(dec.prefill(&mut state, &[1], &mut logits, none), Err(Error::ContextFull { .. })));
}
