//! The README's firmware example, built as a user would build it: the int8
//! digits classifier in flash, scratch sized at compile time, parse and
//! build the layer once (`Resolved`), classify eight test images on the
//! integer path (quantized pixels in, quantized scores out), exit code 0 if
//! every class is the host's.
//! No formatting, no heap, opt-level "s", LTO. `boards/measure.sh` reports
//! its flash beyond the model, the instructions per inference and the stack.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use micromoe::model::Resolved;
use micromoe::{Model, include_model, scratch_len_int};

/// 64 pixels (8x8, each 0..=16) -> 4 experts, top-1 -> 10 class scores.
const MODEL: &[u8] = include_model!("../../../models/digits/digits_int8.moe");
/// Scratch RAM the model needs on the integer path, known at compile time.
const SCRATCH: usize = scratch_len_int!(MODEL);
/// Eight test images, 64 pixels each followed by the class the host gives
/// it (kept in step with the host by `tests/board_vectors.rs`).
static IMAGES: [u8; 8 * 65] = *include_bytes!("../images.bin");

#[entry]
fn main() -> ! {
    #[cfg(feature = "measure")]
    measure::paint_stack();
    let mut scratch = [0u8; SCRATCH];
    let passed = classify_all(&mut scratch) == Ok(true);
    #[cfg(feature = "measure")]
    measure::report(passed);
    semihosting::process::exit(if passed { 0 } else { 1 })
}

fn classify_all(scratch: &mut [u8]) -> micromoe::Result<bool> {
    #[cfg(feature = "parse")]
    measure::start();
    let parsed = Model::parse(MODEL)?;
    #[cfg(feature = "parse")]
    measure::stop();
    // Every layer's views built once, in place, so that an inference only
    // runs them.
    let mut model = Resolved::<1>::empty(parsed);
    model.build()?;
    // The model takes pixel / 16 (0.0..=1.0), quantized with its input
    // parameters: 17 possible pixels, so quantize them once.
    let input = parsed.input_quant().ok_or(micromoe::Error::IntegerPath { layer: 0 })?;
    let mut pixel_q = [0i8; 17];
    for (p, q) in pixel_q.iter_mut().enumerate() {
        *q = input.quantize(p as f32 / 16.0);
    }
    let mut all = true;
    for image in IMAGES.chunks_exact(65) {
        let mut x = [0i8; 64];
        for (xi, &p) in x.iter_mut().zip(image) {
            *xi = pixel_q.get(p as usize).copied().unwrap_or(0);
        }
        // Quantized class scores: their argmax is the class.
        let mut scores = [0i8; 10];
        #[cfg(all(feature = "measure", not(feature = "parse")))]
        measure::start();
        model.infer_int(&x, &mut scores, scratch)?;
        #[cfg(all(feature = "measure", not(feature = "parse")))]
        measure::stop();
        all &= micromoe::argmax(&scores) == Some(image[64] as usize);
    }
    Ok(all)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    semihosting::process::exit(2)
}

#[cfg(feature = "measure")]
mod measure {
    //! The instruction-count window (boards/measure/insn_count.c) and the
    //! stack high-water mark, found by painting unused RAM.

    #[inline(never)]
    #[unsafe(no_mangle)]
    pub extern "C" fn micromoe_measure_start() -> u32 {
        core::hint::black_box(0x5354_4152)
    }

    #[inline(never)]
    #[unsafe(no_mangle)]
    pub extern "C" fn micromoe_measure_stop() -> u32 {
        core::hint::black_box(0x5354_4f50)
    }

    pub fn start() {
        micromoe_measure_start();
    }

    pub fn stop() {
        micromoe_measure_stop();
    }

    unsafe extern "C" {
        static __sheap: u8;
        static _stack_start: u8;
    }

    const PAINT: u32 = 0xA5A5_A5A5;

    #[inline(never)]
    pub fn paint_stack() {
        let marker = 0u32;
        let sp = core::ptr::addr_of!(marker) as usize;
        let mut p = (core::ptr::addr_of!(__sheap) as usize + 3) & !3;
        while p + 64 < sp {
            // SAFETY: [end of statics, sp - 64) is unused RAM nothing else
            // reads or writes now.
            unsafe { core::ptr::write_volatile(p as *mut u32, PAINT) };
            p += 4;
        }
    }

    pub fn report(passed: bool) {
        let top = core::ptr::addr_of!(_stack_start) as usize;
        let mut p = (core::ptr::addr_of!(__sheap) as usize + 3) & !3;
        // SAFETY: reads of RAM painted above (or used by the stack since).
        while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == PAINT {
            p += 4;
        }
        semihosting::println!("minimal: stack_bytes {}", top - p);
        semihosting::println!("minimal: {}", if passed { "PASS" } else { "FAIL" });
    }
}
