//! The int8 and Q15 matrix-vector kernels on an emulated Cortex-M4F: the
//! Arm DSP path (`SMLAD`) against the portable reference on 400 random
//! shapes and values (bit for bit), then one product per measured shape
//! between the measurement markers for `boards/measure.sh`: DSP int8 and
//! Q15, then portable int8 and Q15, each at 64x64, 128x256, 256x512
//! (outputs x inputs). Exits with 0 only if every comparison matched.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use micromoe_board_common::micromoe::kernels::{matvec_i8, matvec_q15, reference};
use micromoe_board_common::{micromoe_measure_start, micromoe_measure_stop};
use semihosting::println;

/// Outputs x inputs, as `boards/measure.sh` names them.
const SHAPES: [(usize, usize); 3] = [(64, 64), (128, 256), (256, 512)];
const MAX_W: usize = 256 * 512;
const MAX_COLS: usize = 1100;
const MAX_ROWS: usize = 256;

/// xorshift32: the same numbers on every run.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next() % n
    }
}

struct Buffers {
    w: [i8; MAX_W],
    x8: [i8; MAX_COLS],
    x16: [i16; MAX_COLS],
    b32: [i32; MAX_ROWS],
    b64: [i64; MAX_ROWS],
    mult: [i32; MAX_ROWS],
    shift: [i32; MAX_ROWS],
}

fn fill(b: &mut Buffers, r: &mut Rng, rows: usize, cols: usize, extreme: bool) {
    for v in &mut b.w[..rows * cols] {
        *v = if extreme { -128 } else { r.next() as i8 };
    }
    for (v8, v16) in b.x8[..cols].iter_mut().zip(&mut b.x16[..cols]) {
        *v8 = r.next() as i8;
        *v16 = if extreme { i16::MIN } else { r.next() as i16 };
    }
    for o in 0..rows {
        b.b32[o] = r.next() as i32 >> 8;
        b.b64[o] = (r.next() as i32 as i64) << 4;
        b.mult[o] = (1 << 30) + (r.next() >> 2) as i32;
        b.shift[o] = r.below(18) as i32 - 14;
    }
}

fn check(b: &Buffers, rows: usize, cols: usize, offset: i32) -> bool {
    let (w, x8, x16) = (&b.w[..rows * cols], &b.x8[..cols], &b.x16[..cols]);
    let (bias32, bias64, m, s) = (&b.b32[..rows], &b.b64[..rows], &b.mult[..rows], &b.shift[..rows]);
    let (mut fast8, mut ref8) = ([0i8; MAX_ROWS], [0i8; MAX_ROWS]);
    matvec_i8(w, Some(bias32), m, s, x8, offset, 3, &mut fast8[..rows]);
    reference::matvec_i8(w, Some(bias32), m, s, x8, offset, 3, &mut ref8[..rows]);
    let (mut fast16, mut ref16) = ([0i16; MAX_ROWS], [0i16; MAX_ROWS]);
    matvec_q15(w, Some(bias64), m, s, x16, &mut fast16[..rows]);
    reference::matvec_q15(w, Some(bias64), m, s, x16, &mut ref16[..rows]);
    fast8 == ref8 && fast16 == ref16
}

#[inline(never)]
fn measure(b: &Buffers, rows: usize, cols: usize, dsp: bool, q15: bool) {
    let (w, bias32, bias64) = (&b.w[..rows * cols], &b.b32[..rows], &b.b64[..rows]);
    let (m, s) = (&b.mult[..rows], &b.shift[..rows]);
    let (mut y8, mut y16) = ([0i8; MAX_ROWS], [0i16; MAX_ROWS]);
    micromoe_measure_start();
    match (dsp, q15) {
        (true, false) => matvec_i8(w, Some(bias32), m, s, &b.x8[..cols], 5, -3, &mut y8[..rows]),
        (true, true) => matvec_q15(w, Some(bias64), m, s, &b.x16[..cols], &mut y16[..rows]),
        (false, false) => reference::matvec_i8(w, Some(bias32), m, s, &b.x8[..cols], 5, -3, &mut y8[..rows]),
        (false, true) => reference::matvec_q15(w, Some(bias64), m, s, &b.x16[..cols], &mut y16[..rows]),
    }
    micromoe_measure_stop();
    core::hint::black_box((y8, y16));
}

#[inline(never)]
fn run(b: &mut Buffers) -> bool {
    let mut r = Rng(0x1234_5678);
    let (mut ok, mut cases) = (0, 0);
    for case in 0..400 {
        // Small and odd shapes (row and column tails), some wide enough for
        // several 256-product Q15 blocks, and all-extreme values.
        let rows = 1 + r.below(13) as usize;
        let cols = if case % 10 == 0 { 700 + r.below(400) as usize } else { 1 + r.below(300) as usize };
        let extreme = case % 25 == 0;
        fill(b, &mut r, rows, cols, extreme);
        let offset = r.below(256) as i32 - 127;
        cases += 1;
        ok += check(b, rows, cols, offset) as usize;
    }
    for &(rows, cols) in &SHAPES {
        fill(b, &mut r, rows, cols, false);
        cases += 1;
        ok += check(b, rows, cols, 5) as usize;
    }
    // Parameters no checked product holds (a multiplier below 2^30, of
    // i32::MIN, a shift past -31): the raw kernel must still give the
    // portable kernel's bits (it takes the portable path for them).
    for bad in 0..3 {
        fill(b, &mut r, 8, 64, false);
        match bad {
            0 => b.mult[3] = 12_345,
            1 => b.mult[0] = i32::MIN,
            _ => b.shift[5] = -40,
        }
        cases += 1;
        ok += check(b, 8, 64, 7) as usize;
    }
    println!("mps2-an386 kernels: {}/{} random cases bit-identical to the portable kernels", ok, cases);
    // The FPU's half-to-single conversion against `half`'s software one.
    let same = (0..=u16::MAX)
        .filter(|&h| {
            let v = micromoe_board_common::micromoe::quant::f16::from_bits(core::hint::black_box(h));
            <micromoe_board_common::micromoe::quant::f16 as micromoe_board_common::micromoe::kernels::FloatWeight>::to_f32(v).to_bits() == v.to_f32().to_bits()
        })
        .count();
    println!("mps2-an386 f16 conversion: {}/65536 halves as half converts them", same);
    let (g_ok, g_cases) = group_rows(b, &mut r);
    println!(
        "mps2-an386 int8 groups: {}/{} random group-scaled products bit-identical to the portable loop",
        g_ok, g_cases
    );
    let (f16_ok, f16_cases) = f16_rows(&mut r);
    println!(
        "mps2-an386 f16 dot and axpy: {}/{} random rows bit-identical to the portable loops",
        f16_ok, f16_cases
    );
    for dsp in [true, false] {
        for q15 in [false, true] {
            for &(rows, cols) in &SHAPES {
                fill(b, &mut r, rows, cols, false);
                measure(b, rows, cols, dsp, q15);
            }
        }
    }
    ok == cases && same == 65536 && f16_ok == f16_cases && g_ok == g_cases
}

/// The DSP path of `add_group_dots_i8` (the decoders' `--group` int8
/// matrices) against the portable loop: random rows (row tails), groups of
/// 16 to 128, column windows onto a later group, -128 weights, f32 sums.
fn group_rows(b: &mut Buffers, r: &mut Rng) -> (usize, usize) {
    use micromoe_board_common::micromoe::kernels::add_group_dots_i8;
    let (mut ok, cases) = (0, 200);
    let mut sw = [0.0f32; 2 * MAX_ROWS];
    let mut sx = [0.0f32; 64];
    for case in 0..cases {
        let group = 16 * (1 + r.below(8) as usize);
        let per = 1 + r.below((MAX_COLS / group).min(8) as u32) as usize;
        let cols = group * per;
        let rows = 1 + r.below(13) as usize;
        fill(b, r, rows, cols, case % 25 == 0);
        for s in sw[..rows * per].iter_mut().chain(&mut sx[..per]) {
            *s = (r.below(1000) as f32 + 1.0) * 1e-4;
        }
        let g0 = r.below(per as u32) as usize;
        let x = &b.x8[g0 * group..cols];
        let (mut fast, mut slow) = ([0.0f32; MAX_ROWS], [0.0f32; MAX_ROWS]);
        for (i, (f, s)) in fast.iter_mut().zip(slow.iter_mut()).take(rows).enumerate() {
            (*f, *s) = (i as f32 * 0.5, i as f32 * 0.5);
        }
        let scales = (&sw[..rows * per], &sx[g0..per]);
        add_group_dots_i8(&b.w[..rows * cols], cols, g0 * group, x, group, scales, &mut fast[..rows]);
        reference::add_group_dots_i8(
            &b.w[..rows * cols],
            cols,
            g0 * group,
            x,
            group,
            scales,
            &mut slow[..rows],
        );
        ok += fast.iter().zip(&slow).all(|(a, b)| a.to_bits() == b.to_bits()) as usize;
    }
    (ok, cases)
}

/// The FPU loops behind `FloatWeight::dot_seq` / `axpy` for f16 (the
/// decoder's KV cache) against the same sums written out with `half`'s
/// conversion, on random finite halves (subnormals and signed zeros
/// included), lengths 0..=80, halves at even and odd addresses.
fn f16_rows(r: &mut Rng) -> (usize, usize) {
    use micromoe_board_common::micromoe::kernels::FloatWeight;
    use micromoe_board_common::micromoe::quant::f16;
    let (mut ok, cases) = (0, 300);
    for _ in 0..cases {
        let n = r.below(81) as usize;
        let off = r.below(2) as usize;
        let mut w = [f16::ZERO; 81];
        let mut x = [0.0f32; 80];
        for (wv, xv) in w.iter_mut().zip(x.iter_mut()) {
            // Exponent field 31 (infinities, NaNs) left out.
            *wv = f16::from_bits(((r.next() as u16) % 0x7c00) | (r.next() as u16 & 0x8000));
            *xv = (r.below(2001) as f32 - 1000.0) / 37.0;
        }
        let (w, x) = (core::hint::black_box(&w[off..off + n]), &x[..n]);
        let want = x.iter().zip(w).fold(-0.0f32, |a, (&xv, wv)| a + xv * wv.to_f32());
        let p = (r.below(2001) as f32 - 1000.0) / 999.0;
        let mut out = [0.0f32; 80];
        let mut out_want = [0.0f32; 80];
        for (o, ow) in out.iter_mut().zip(out_want.iter_mut()) {
            *o = (r.below(2001) as f32 - 1000.0) / 13.0;
            *ow = *o;
        }
        <f16 as FloatWeight>::axpy(&mut out[..n], w, p);
        out_want.iter_mut().zip(w).for_each(|(o, wv)| *o += p * wv.to_f32());
        let same_out = out.iter().zip(&out_want).all(|(a, b)| a.to_bits() == b.to_bits());
        ok += (<f16 as FloatWeight>::dot_seq(x, w).to_bits() == want.to_bits() && same_out) as usize;
    }
    (ok, cases)
}

#[entry]
fn main() -> ! {
    let mut b = Buffers {
        w: [0; MAX_W],
        x8: [0; MAX_COLS],
        x16: [0; MAX_COLS],
        b32: [0; MAX_ROWS],
        b64: [0; MAX_ROWS],
        mult: [0; MAX_ROWS],
        shift: [0; MAX_ROWS],
    };
    let ok = run(&mut b);
    semihosting::process::exit(if ok { 0 } else { 1 })
}
