//! Any bytes: parse as a `.moe` model; if accepted, run one inference (a
//! decoder: three tokens).
//! Nothing may panic. The CRC is recomputed when the input is long enough
//! so that mutations reach the checks behind it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use micromoe::format::write::AlignedBytes;
use micromoe::format::{Model, layout};

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    if bytes.len() >= 68 && bytes[0] & 1 == 0 {
        // Keep the declared length and the CRC consistent with the input.
        let n = bytes.len();
        bytes[12..16].copy_from_slice(&(n as u32).to_le_bytes());
        let crc = layout::crc32(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
    }
    let aligned = AlignedBytes::from(&bytes[..]);
    if let Ok(model) = Model::parse(&aligned) {
        let need = model.scratch_bytes();
        if need > 1 << 22 || model.input_dim() > 1 << 16 || model.output_dim() > 1 << 16 {
            return;
        }
        if let Ok(dec) = micromoe::model::Decoder::new(&model) {
            // A decoder: a few tokens through the KV cache.
            let mut buf = vec![0u8; dec.state_bytes()];
            let Ok(mut state) = dec.state(&mut buf) else { return };
            let mut logits = vec![0.0f32; dec.config().vocab];
            for t in 0..3u32 {
                let _ = dec.step(&mut state, t % dec.config().vocab as u32, &mut logits, |_, _| {});
            }
            return;
        }
        let mut scratch = vec![0u8; need];
        let x = vec![0.5f32; model.input_dim()];
        let mut y = vec![0.0f32; model.output_dim()];
        let _ = model.infer(&x, &mut y, &mut scratch, |_| {});
    }
});
