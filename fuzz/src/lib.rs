//! The fuzz targets' bodies, shared by `cargo fuzz` (fuzz_targets/) and the
//! stable stand-in that CI runs over the seed corpora (`cargo run --bin
//! seeds -- --check`).
//!
//! Nothing here may panic on any input: a panic is a finding.

use micromoe::Model;
use micromoe::format::layout;
use micromoe::format::write::AlignedBytes;
use micromoe::model::Layer;
use micromoe::model::{Decoder, Sampler};

/// Largest buffer a target allocates for one input (a model asking for
/// more is skipped: the CLI refuses those, see tests/hostile.rs).
const MAX_BUFFER: usize = 1 << 24;

/// The input as a model: the declared length and the checksum are
/// rewritten to match whatever the mutator produced, so mutations reach
/// the checks behind it. Inputs shorter than a header stay as they are.
pub fn repair(data: &[u8]) -> AlignedBytes {
    let mut bytes = AlignedBytes::from(data);
    let n = bytes.len();
    if n >= layout::HEADER_LEN + layout::CHECK_LEN {
        // The total length: header bytes 12..16.
        bytes[12..16].copy_from_slice(&(n as u32).to_le_bytes());
        layout::seal(&mut bytes);
    }
    bytes
}

/// A stack or multi-gate model: one inference, then every layer over a
/// batch of three tokens (the `DispatchPlan` path) on one and two threads.
pub fn stack(data: &[u8]) {
    let bytes = repair(data);
    let Ok(model) = Model::parse(&bytes) else { return };
    if model.scratch_bytes() > MAX_BUFFER || model.input_dim() > 1 << 16 || model.output_dim() > 1 << 16 {
        return;
    }
    let mut scratch = vec![0u8; model.scratch_bytes()];
    let x: Vec<f32> = (0..model.input_dim()).map(|i| (i % 7) as f32 - 3.0).collect();
    let mut y = vec![0.0f32; model.output_dim()];
    let _ = model.infer(&x, &mut y, &mut scratch);
    for l in 0..model.layers() {
        let Ok(layer) = model.layer(l) else { continue };
        batch(&layer);
    }
}

fn batch(layer: &Layer<'_>) {
    macro_rules! float {
        ($m:expr) => {{
            let (i, o) = ($m.in_dim(), $m.out_dim());
            let xs: Vec<f32> = (0..3 * i).map(|j| ((j * 5) % 11) as f32 * 0.25 - 1.0).collect();
            let mut out = vec![0.0f32; 3 * o];
            for threads in [1, 2] {
                let _ = $m.infer_batch(&xs, &mut out, threads);
            }
        }};
    }
    macro_rules! int {
        ($m:expr, $t:ty) => {{
            let (i, o) = ($m.in_dim(), $m.out_dim());
            let xs: Vec<$t> = (0..3 * i).map(|j| ((j * 37) % 255) as $t).collect();
            let mut out = vec![<$t>::default(); 3 * o];
            for threads in [1, 2] {
                let _ = $m.infer_batch(&xs, &mut out, threads);
            }
        }};
    }
    match layer {
        Layer::F32(m) => float!(m),
        Layer::F16(m) => float!(m),
        Layer::F32GateF16(m) => float!(m),
        Layer::F16GateF32(m) => float!(m),
        Layer::Int8(m, _, _) => int!(m, i8),
        Layer::Q15(m, _, _) => int!(m, i16),
    }
}

/// A decoder: `data[0]` picks the sampler, the rest is the model. Tokens
/// (sampled from the logits where that works) are fed until the context is
/// full, which must then be refused; after a reset, two more.
pub fn decoder(data: &[u8]) {
    let Some((&ctrl, model_bytes)) = data.split_first() else { return };
    let bytes = repair(model_bytes);
    let Ok(dec) = Decoder::parse(&bytes) else { return };
    let (vocab, context) = (dec.config().vocab, dec.config().context);
    if dec.state_bytes() > MAX_BUFFER || vocab > 1 << 16 || context > 256 {
        return;
    }
    let mut buf = vec![0u8; dec.state_bytes()];
    let Ok(mut state) = dec.state(&mut buf) else { return };
    let mut sampler = match ctrl % 4 {
        0 => Sampler::greedy(),
        1 => Sampler::new(0.8, 0.9, ctrl as u64),
        2 => Sampler::new(1.5, 1.0, 7),
        // Out of range: must be refused, not used.
        _ => Sampler::new(f32::NAN, 2.0, 1),
    };
    let mut logits = vec![0.0f32; vocab];
    let mut token = (ctrl as usize % vocab.max(1)) as u32;
    for _ in 0..context {
        if dec.step(&mut state, token, &mut logits, |_, _| {}).is_err() {
            return;
        }
        token = state.sample(&mut sampler, &mut logits).unwrap_or(0);
    }
    assert!(dec.step(&mut state, 0, &mut logits, |_, _| {}).is_err(), "a full context accepted a token");
    state.reset();
    for t in 0..2u32 {
        let _ = dec.step(&mut state, t % vocab as u32, &mut logits, |_, _| {});
    }
    // Views built once: the same logits as views made per token.
    if let Ok(resolved) = micromoe::model::ResolvedDecoder::<8>::new(&dec) {
        let mut again = vec![0.0f32; vocab];
        state.reset();
        let mut buf2 = vec![0u8; dec.state_bytes()];
        let Ok(mut other) = dec.state(&mut buf2) else { return };
        for t in 0..2u32 {
            let a = dec.step(&mut state, t % vocab as u32, &mut logits, |_, _| {});
            let b = resolved.step(&mut other, t % vocab as u32, &mut again, |_, _| {});
            assert_eq!(a.is_ok(), b.is_ok(), "resolved and per-token views disagree");
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(a.is_err() || bits(&logits) == bits(&again), "resolved views changed the logits");
        }
    }
    // The same two tokens as one prefill (on two threads): the same logits wherever the steps
    // succeed (the steps also check the first token's logits, which a
    // prefill does not compute).
    state.reset();
    let two = [0, 1 % vocab as u32];
    let a = two.iter().try_for_each(|&t| dec.step(&mut state, t, &mut logits, |_, _| {}));
    let mut buf3 = vec![0u8; dec.state_bytes()];
    let Ok(mut third) = dec.state(&mut buf3) else { return };
    let mut pre = vec![0.0f32; vocab];
    let b = dec.with_threads(2).prefill(&mut third, &two, &mut pre, |_, _, _| {});
    if a.is_ok() {
        assert!(b.is_ok(), "a prefill refused what the steps took: {b:?}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&logits) == bits(&pre), "a prefill changed the logits");
    }
}

/// The host input path: `[config length: u16 LE][config.json][safetensors]`
/// into the converter (every type the checkpoint allows), then the
/// converted model through parse, `info`'s summaries and one inference.
pub fn checkpoint(data: &[u8]) {
    use micromoe::host::{Checkpoint, DecoderOptions, Dtype, convert_checkpoint, convert_decoder_checkpoint};
    if data.len() < 2 {
        return;
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    let (config, tensors) = rest.split_at(n.min(rest.len()));
    let Ok(ck) = Checkpoint::from_bytes(config, &[tensors]) else { return };
    let decoder = ck.config.get("architectures").is_some();
    let mut outputs = Vec::new();
    if decoder {
        for d in [Dtype::F32, Dtype::Int8] {
            let opts = DecoderOptions { context: Some(8), ..DecoderOptions::new(d) };
            outputs.push(convert_decoder_checkpoint(&ck, &opts));
        }
    } else {
        let width = ck.config.get("input_dim").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
        if width == 0 || width > 1 << 12 {
            return;
        }
        let calibration: Vec<f32> = (0..4 * width).map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0).collect();
        for (d, g) in [
            (Dtype::F32, None),
            (Dtype::F16, Some(Dtype::F32)),
            (Dtype::Int8, None),
            (Dtype::Q15, Some(Dtype::F16)),
        ] {
            let cal = matches!(d, Dtype::Int8 | Dtype::Q15).then_some(&calibration[..]);
            outputs.push(convert_checkpoint(&ck, d, g, cal, |_, _| {}));
        }
    }
    for bytes in outputs.into_iter().flatten() {
        let aligned = AlignedBytes::from(&bytes[..]);
        if decoder {
            let dec = Decoder::parse(&aligned).expect("the converter wrote a decoder parse refuses");
            let _ = micromoe::host::summarize_decoder(&dec).map(|s| s.to_json());
            decoder_prefixed(&bytes);
        } else {
            let model = Model::parse(&aligned).expect("the converter wrote a model parse refuses");
            let _ = micromoe::host::summarize(&model).map(|s| s.to_json());
            stack(&bytes);
        }
    }
}

fn decoder_prefixed(model: &[u8]) {
    let mut data = vec![0u8];
    data.extend_from_slice(model);
    decoder(&data);
}
