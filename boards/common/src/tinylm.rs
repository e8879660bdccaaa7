//! The tiny MoE language model on the chip: greedy generation from a
//! prompt, checked against the host's tokens and the bits of every logit
//! (`boards/vectors/tinylm.bin`, kept in step by `tests/board_vectors.rs`);
//! [`generate_grouped`] the same with one int8 scale per 32 columns
//! (`tinylm_int8_g32.moe`, `boards/vectors/tinylm_g32.bin`).

use micromoe::include_model;
use micromoe::model::{Decoder, ResolvedDecoder, Sampler};
use semihosting::{print, println};

/// int8 weights (one scale a row), f16 KV cache of 128 positions.
const MODEL: &[u8] = include_model!("../../../models/tinylm/tinylm_int8.moe");
const VECTORS: &[u8] = include_bytes!("../../vectors/tinylm.bin");
/// The same with one int8 scale per 32 columns (`--group 32`).
const MODEL_G32: &[u8] = include_model!("../../../models/tinylm/tinylm_int8_g32.moe");
const VECTORS_G32: &[u8] = include_bytes!("../../vectors/tinylm_g32.bin");
/// KV cache and work buffers, sized at compile time from the model bytes.
const STATE: usize = {
    let (a, b) = (micromoe::scratch_len!(MODEL), micromoe::scratch_len!(MODEL_G32));
    if a > b { a } else { b }
};
const MAX_TOKENS: usize = 128;

fn word(b: &[u8], i: usize) -> u32 {
    match b.get(4 * i..4 * i + 4) {
        Some(w) => u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
        None => u32::MAX,
    }
}

/// FNV-1a over the bits of every logit of every step.
fn fnv(hash: &mut u64, logits: &[f32]) {
    for v in logits {
        for b in v.to_bits().to_le_bytes() {
            *hash = (*hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
}

/// Feeds the prompt, generates greedily, prints the text; true if tokens
/// and logits match the host bit for bit.
pub fn generate(board: &str) -> bool {
    run(board, "tinylm", MODEL, VECTORS)
}

/// [`generate`] with the group-scaled int8 model.
pub fn generate_grouped(board: &str) -> bool {
    run(board, "tinylm-g32", MODEL_G32, VECTORS_G32)
}

#[inline(never)]
fn run(board: &str, name: &str, model: &[u8], v: &[u8]) -> bool {
    let (prompt_len, n_gen) = (word(v, 2) as usize, word(v, 3) as usize);
    if v.get(..8) != Some(b"MMTOK1\0\0".as_slice()) || prompt_len + n_gen > MAX_TOKENS {
        println!("{board} {name}: bad vectors");
        return false;
    }
    let want = |i: usize| word(v, 4 + i);
    let want_hash = word(v, 4 + prompt_len + n_gen) as u64 | (word(v, 5 + prompt_len + n_gen) as u64) << 32;
    let model = match Decoder::parse(model) {
        Ok(d) => d,
        Err(e) => {
            println!("{board} {name}: model refused: {}", e);
            return false;
        }
    };
    // Every layer's views built once (2 layers, 492 B each): a token then
    // searches no table.
    let model = match ResolvedDecoder::<2>::new(&model) {
        Ok(r) => r,
        Err(e) => {
            println!("{board} {name}: {}", e);
            return false;
        }
    };
    let mut buf = [0u8; STATE];
    let mut state = match model.decoder().state(&mut buf) {
        Ok(s) => s,
        Err(e) => {
            println!("{board} {name}: {}", e);
            return false;
        }
    };
    let mut logits = [0.0f32; 128];
    let mut sampler = Sampler::greedy();
    let (mut hash, mut same) = (0xCBF2_9CE4_8422_2325u64, 0);
    print!("{board} {name}: \"");
    let mut token = want(0);
    for i in 0..prompt_len + n_gen - 1 {
        if i < prompt_len {
            token = want(i);
        }
        print!("{}", char::from(token as u8).escape_debug());
        crate::micromoe_measure_start();
        let stepped = model.step(&mut state, token, &mut logits, |_, _| {});
        crate::micromoe_measure_stop();
        if let Err(e) = stepped {
            println!("\" step {}: {}", i, e);
            return false;
        }
        fnv(&mut hash, &logits);
        if i + 1 >= prompt_len {
            token = state.sample(&mut sampler, &mut logits).unwrap_or(u32::MAX);
            same += (token == want(i + 1)) as usize;
        }
    }
    let pass = same == n_gen && hash == want_hash;
    println!("\"");
    println!(
        "{board} {name}: {}/{} generated tokens as the host, logits {}: {}",
        same,
        n_gen,
        if hash == want_hash { "bit-identical" } else { "DIFFER" },
        if pass { "ok" } else { "FAIL" }
    );
    pass
}
