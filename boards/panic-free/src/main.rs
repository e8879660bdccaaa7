//! A firmware that cannot link if any panic path is reachable from
//! micromoe's parse and inference: the panic handler calls a symbol that
//! is defined nowhere, so the link succeeds only when the optimizer has
//! proven every panic unreachable and dropped the handler.
//!
//! The model bytes pass through `black_box`, so the optimizer cannot see
//! them and must keep every check that depends on them. Covered: parse +
//! infer of every stack type (f32, f16, int8, Q15), the integer path
//! (`infer_int`, i8 and i16) and parse + decoder
//! steps + sampling (greedy and temperature / top-p) on the tiny LM.
#![no_std]
#![no_main]

use core::hint::black_box;

use cortex_m_rt::entry;
use micromoe::model::{Decoder, Sampler};
use micromoe::{Model, include_model};

#[cfg(not(feature = "report"))]
unsafe extern "C" {
    /// Defined nowhere: a reference to it is a link error naming it.
    fn micromoe_panic_path_is_reachable() -> !;
}

#[cfg(feature = "report")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[cfg(not(feature = "report"))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: never runs; the symbol does not exist, so a firmware that
    // could reach this does not link.
    unsafe { micromoe_panic_path_is_reachable() }
}

const STACKS: [&[u8]; 4] = [
    include_model!("../../../models/digits/digits_f32.moe"),
    include_model!("../../../models/digits/digits_f16.moe"),
    include_model!("../../../models/digits/digits_int8.moe"),
    include_model!("../../../models/digits/digits_q15.moe"),
];
const TINYLM: &[u8] = include_model!("../../../models/tinylm/tinylm_int8.moe");

/// Scratch for any stack model, and the decoder's state.
const SCRATCH: usize = 4096;
const STATE: usize = 40 * 1024;

/// Every stack model: parse, then one inference; results are consumed.
#[inline(never)]
fn stacks(scratch: &mut [u8]) -> usize {
    let mut ok = 0;
    for bytes in STACKS {
        let Ok(model) = Model::parse(black_box(bytes)) else { continue };
        let x = black_box([0.5f32; 64]);
        let mut y = [0.0f32; 10];
        let (Some(x), Some(y)) = (x.get(..model.input_dim()), y.get_mut(..model.output_dim())) else {
            continue;
        };
        if model
            .infer_observed(x, y, scratch, |s| {
                black_box(s);
            })
            .is_ok()
        {
            ok += 1;
        }
        black_box(y);
        // The integer path of both integer types (the float models refuse it).
        let mut yq8 = [0i8; 10];
        let mut yq16 = [0i16; 10];
        let (Some(y8), Some(y16)) = (yq8.get_mut(..model.output_dim()), yq16.get_mut(..model.output_dim()))
        else {
            continue;
        };
        let x8 = black_box([3i8; 64]);
        let x16 = black_box([300i16; 64]);
        let (Some(x8), Some(x16)) = (x8.get(..model.input_dim()), x16.get(..model.input_dim())) else {
            continue;
        };
        ok += model.infer_int(x8, y8, scratch).is_ok() as usize;
        ok += model.infer_int(x16, y16, scratch).is_ok() as usize;
        ok +=
            micromoe::argmax(black_box(&*y8)).unwrap_or(0) + micromoe::argmax(black_box(&*y16)).unwrap_or(0);
    }
    ok
}

/// The decoder: parse, steps fed by sampled tokens, a reset.
#[inline(never)]
fn decoder(state: &mut [u8]) -> usize {
    let Ok(dec) = Decoder::parse(black_box(TINYLM)) else { return 0 };
    let Ok(mut st) = dec.state(state) else { return 0 };
    let mut logits = [0.0f32; 128];
    let Some(logits) = logits.get_mut(..dec.config().vocab) else { return 0 };
    let mut samplers = [Sampler::greedy(), Sampler::new(0.8, 0.9, black_box(7))];
    let mut token = black_box(b'T' as u32);
    let mut steps = 0;
    for sampler in &mut samplers {
        st.reset();
        for _ in 0..4 {
            if dec
                .step(&mut st, token, logits, |l, s| {
                    black_box((l, s));
                })
                .is_err()
            {
                break;
            }
            token = st.sample(sampler, logits).unwrap_or(0);
            steps += 1;
        }
    }
    steps
}

#[entry]
fn main() -> ! {
    let mut scratch = [0u8; SCRATCH];
    let mut state = [0u8; STATE];
    black_box(stacks(&mut scratch) + decoder(&mut state));
    loop {
        core::hint::spin_loop();
    }
}
