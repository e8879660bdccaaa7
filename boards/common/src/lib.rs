//! The check every emulated board runs: each committed digits model (f32,
//! f16, int8, Q15) over the first 32 test images, against the host's answers
//! (`boards/vectors`, kept in step by `tests/board_vectors.rs`). Integer
//! paths must match the host bit for bit; float paths within 1e-5 relative
//! (and the number of bit-identical outputs is reported). Output goes over
//! semihosting; `run` returns the exit code.
#![no_std]

use core::sync::atomic::{AtomicUsize, Ordering};

use micromoe::{Model, include_model};

#[cfg(feature = "tinylm")]
pub mod tinylm;

/// The library, for firmware binaries that call it directly.
pub use micromoe;
use semihosting::println;

struct Case {
    dtype: &'static str,
    model: &'static [u8],
    vectors: &'static [u8],
    exact: bool,
}

const CASES: &[Case] = &[
    #[cfg(feature = "f32")]
    Case {
        dtype: "f32",
        model: include_model!("../../../models/digits/digits_f32.moe"),
        vectors: include_bytes!("../../vectors/digits_f32.bin"),
        exact: false,
    },
    #[cfg(feature = "f16")]
    Case {
        dtype: "f16",
        model: include_model!("../../../models/digits/digits_f16.moe"),
        vectors: include_bytes!("../../vectors/digits_f16.bin"),
        exact: false,
    },
    #[cfg(feature = "int8")]
    Case {
        dtype: "int8",
        model: include_model!("../../../models/digits/digits_int8.moe"),
        vectors: include_bytes!("../../vectors/digits_int8.bin"),
        exact: true,
    },
    #[cfg(feature = "q15")]
    Case {
        dtype: "q15",
        model: include_model!("../../../models/digits/digits_q15.moe"),
        vectors: include_bytes!("../../vectors/digits_q15.bin"),
        exact: true,
    },
];

/// Scratch for the largest model, fixed at compile time.
const SCRATCH: usize = {
    let mut max = 0;
    let mut i = 0;
    while i < CASES.len() {
        let n = micromoe::scratch_len!(CASES[i].model);
        if n > max {
            max = n;
        }
        i += 1;
    }
    max
};

const MAX_WIDTH: usize = 64;

fn word(b: &[u8], i: usize) -> u32 {
    match b.get(4 * i..4 * i + 4) {
        Some(w) => u32::from_le_bytes([w[0], w[1], w[2], w[3]]),
        None => 0,
    }
}

/// The int8 digits model and its vectors, for boards that load a model at
/// run time.
pub const INT8_MODEL: &[u8] = include_model!("../../../models/digits/digits_int8.moe");
/// The host's answers for [`INT8_MODEL`].
pub const INT8_VECTORS: &[u8] = include_bytes!("../../vectors/digits_int8.bin");
/// Scratch bytes the largest model needs.
pub const SCRATCH_BYTES: usize = SCRATCH;

/// Runs `model` over `vectors`; true if every check passes (bit for bit if
/// `exact`). Prints one line.
pub fn check(board: &str, dtype: &str, model: &[u8], v: &[u8], exact: bool, scratch: &mut [u8]) -> bool {
    if v.get(..8) != Some(b"MMVEC1\0\0".as_slice()) {
        println!("{board} {}: bad vectors", dtype);
        return false;
    }
    let (n, n_in, n_out) = (word(v, 2) as usize, word(v, 3) as usize, word(v, 4) as usize);
    let model = match Model::parse(model) {
        Ok(m) => m,
        Err(e) => {
            println!("{board} {}: model refused: {}", dtype, e);
            return false;
        }
    };
    if n_in > MAX_WIDTH || n_out > MAX_WIDTH || model.input_dim() != n_in || model.output_dim() != n_out {
        println!("{board} {}: vectors do not fit the model", dtype);
        return false;
    }
    let (xs, ys, es) = (6, 6 + n * n_in, 6 + n * n_in + n * n_out);
    let top = STACK_TOP.load(Ordering::Relaxed);
    if top != 0 {
        paint_stack();
    }
    let (mut ok, mut bit_identical, mut worst) = (0, 0, 0.0f32);
    for s in 0..n {
        let mut x = [0.0f32; MAX_WIDTH];
        for (i, xi) in x[..n_in].iter_mut().enumerate() {
            *xi = f32::from_bits(word(v, xs + s * n_in + i));
        }
        let mut y = [0.0f32; MAX_WIDTH];
        let mut expert = u32::MAX;
        measure_start();
        let result = model.infer_observed(&x[..n_in], &mut y[..n_out], scratch, |st| {
            expert = st.selection.first().map_or(u32::MAX, |c| c.expert as u32)
        });
        measure_stop();
        if let Err(e) = result {
            println!("{board} {} sample {s}: {}", dtype, e);
            continue;
        }
        let mut same_bits = expert == word(v, es + s);
        let mut close = same_bits;
        for (j, &got) in y[..n_out].iter().enumerate() {
            let want = f32::from_bits(word(v, ys + s * n_out + j));
            let diff = libm_abs(got - want);
            worst = if diff > worst { diff } else { worst };
            same_bits &= got.to_bits() == want.to_bits();
            close &= diff <= 1e-5 * if libm_abs(want) > 1.0 { libm_abs(want) } else { 1.0 };
        }
        bit_identical += same_bits as usize;
        ok += if exact { same_bits } else { close } as usize;
    }
    let pass = ok == n;
    // The stack the inferences used (with this caller's frames), before
    // printing adds its own.
    let stack = if top != 0 { stack_high_water(top) } else { 0 };
    if top != 0 {
        println!("{board} {dtype}: stack_bytes {stack}");
    }
    println!(
        "{board} {}: {}/{} samples {} the host, {}/{} bit-identical, max |diff| {:e}: {}",
        dtype,
        ok,
        n,
        if exact { "bit-identical to" } else { "within 1e-5 of" },
        bit_identical,
        n,
        worst,
        if pass { "ok" } else { "FAIL" }
    );
    pass
}

fn libm_abs(v: f32) -> f32 {
    f32::from_bits(v.to_bits() & 0x7FFF_FFFF)
}

/// Marks the start of one inference (or one decoder token) for `boards/measure/insn_count.c`
/// (the plugin counts instructions from here to [`measure_stop`]).
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn micromoe_measure_start() -> u32 {
    core::hint::black_box(0x5354_4152)
}

/// Marks the end of one inference.
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "C" fn micromoe_measure_stop() -> u32 {
    core::hint::black_box(0x5354_4f50)
}

fn measure_start() {
    micromoe_measure_start();
}

fn measure_stop() {
    micromoe_measure_stop();
}

unsafe extern "C" {
    /// End of static data (cortex-m-rt and riscv-rt both define it).
    static __sheap: u8;
    /// The initial stack pointer (both runtimes define it too).
    static _stack_start: u8;
}

const PAINT: u32 = 0xA5A5_A5A5;

/// The initial stack pointer, once [`run`] knows it (0: do not measure).
static STACK_TOP: AtomicUsize = AtomicUsize::new(0);

/// Fills the unused RAM between the end of static data and (a margin below)
/// the current stack frame with a pattern; [`stack_high_water`] finds how far
/// the stack grew into it.
#[inline(never)]
fn paint_stack() {
    let marker = 0u32;
    let sp = core::ptr::addr_of!(marker) as usize;
    let bottom = core::ptr::addr_of!(__sheap) as usize;
    let mut p = (bottom + 3) & !3;
    while p + 256 < sp {
        // SAFETY: [bottom, sp - 256) lies between the statics and the live
        // stack frames: unused RAM that nothing else reads or writes now.
        unsafe { core::ptr::write_volatile(p as *mut u32, PAINT) };
        p += 4;
    }
}

/// Bytes of stack used since [`paint_stack`], measured from `top`.
fn stack_high_water(top: usize) -> usize {
    let bottom = core::ptr::addr_of!(__sheap) as usize;
    let mut p = (bottom + 3) & !3;
    // SAFETY: reads of RAM that `paint_stack` wrote (or the stack used since).
    while p < top && unsafe { core::ptr::read_volatile(p as *const u32) } == PAINT {
        p += 4;
    }
    top - p
}

/// Checks every model the firmware carries; returns the exit code (0: all
/// passed). Also prints each model's stack high-water mark.
pub fn run(board: &str) -> i32 {
    STACK_TOP.store(core::ptr::addr_of!(_stack_start) as usize, Ordering::Relaxed);
    let all = run_checks(board);
    println!("{board}: {}", if all { "PASS" } else { "FAIL" });
    if all { 0 } else { 1 }
}

#[inline(never)]
fn run_checks(board: &str) -> bool {
    let mut scratch = [0u8; SCRATCH];
    let mut all = true;
    for case in CASES {
        all &= check(board, case.dtype, case.model, case.vectors, case.exact, &mut scratch);
    }
    all
}
