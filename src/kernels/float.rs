//! f32 and f16 weights, f32 activations and accumulation.

use crate::error::{Error, Result, What, check_len, mul};
use crate::quant::f16;

/// A weight element that widens to f32: `f32` or [`f16`](struct@f16).
pub trait FloatWeight: Copy + bytemuck::Pod + 'static {
    /// The weight as f32.
    fn to_f32(self) -> f32;

    /// A block of weights as f32: the same values as [`to_f32`](Self::to_f32)
    /// on each, in a form the compiler can vectorize.
    #[inline(always)]
    fn widen(block: &[Self; LANES]) -> [f32; LANES] {
        // Written out: `array::map`'s closure stayed a call inside the
        // AVX2-compiled kernels, and a loop stayed rolled at opt-level "s".
        let [a, b, c, d, e, f, g, h] = *block;
        [a.to_f32(), b.to_f32(), c.to_f32(), d.to_f32(), e.to_f32(), f.to_f32(), g.to_f32(), h.to_f32()]
    }

    /// `x . w` over the shorter of the two, added in element order from
    /// `-0.0` (as `Iterator::sum` adds): the order the decoder's attention
    /// has always used.
    #[inline(always)]
    fn dot_seq(x: &[f32], w: &[Self]) -> f32 {
        x.iter().zip(w).map(|(a, &b)| a * b.to_f32()).sum()
    }

    /// `out += p * w` over the shorter of the two.
    #[inline(always)]
    fn axpy(out: &mut [f32], w: &[Self], p: f32) {
        out.iter_mut().zip(w).for_each(|(o, &v)| *o += p * v.to_f32());
    }
}

impl FloatWeight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl FloatWeight for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        #[cfg(micromoe_fp16_convert)]
        {
            fpu16::f16_to_f32(self.to_bits())
        }
        #[cfg(not(micromoe_fp16_convert))]
        {
            f16::to_f32(self)
        }
    }

    // The same operations in the same order as the portable defaults, in a
    // loop of `VCVTB` + `VMUL` + `VADD` instead of a call per element.
    #[cfg(micromoe_fp16_convert)]
    #[inline(always)]
    fn dot_seq(x: &[f32], w: &[Self]) -> f32 {
        fpu16::dot(x, w)
    }

    #[cfg(micromoe_fp16_convert)]
    #[inline(always)]
    fn axpy(out: &mut [f32], w: &[Self], p: f32) {
        fpu16::axpy(out, w, p)
    }

    // On 64-bit hosts a branch-free widening (selects, no per-element
    // feature check) that LLVM turns into SIMD: `half`'s per-value
    // conversion kept f16 matrices at 1.8 GFLOP/s. Microcontrollers keep
    // `half`'s code (and their measured instruction counts).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[inline(always)]
    fn widen(block: &[Self; LANES]) -> [f32; LANES] {
        let mut out = [0.0; LANES];
        for (o, h) in out.iter_mut().zip(block) {
            *o = widen_f16_bits(h.to_bits());
        }
        out
    }

    // Without an FPU conversion, `half`'s software one eight times in a
    // row cost the Cortex-M0 5 % over a loop of it.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", micromoe_fp16_convert)))]
    #[inline(always)]
    fn widen(block: &[Self; LANES]) -> [f32; LANES] {
        let mut out = [0.0; LANES];
        for (o, h) in out.iter_mut().zip(block) {
            *o = h.to_f32();
        }
        out
    }
}

#[cfg(micromoe_fp16_convert)]
#[allow(unsafe_code)]
mod fpu16 {
    //! IEEE half bits to f32 by the FPU (`VCVTB.F32.F16`; `half` converts in
    //! software on stable Rust, about 20 instructions). The conversion is exact,
    //! so the value is `half`'s; NaNs are quieted with their payload kept, as
    //! `half` does (FPSCR.DN = 0, the reset state). The board kernels check
    //! (`boards/mps2-an386 --bin kernels`) compares all 65,536 halves with
    //! `half`'s conversion. An assembly function rather than inline `asm!`:
    //! Rust 1.95 gives S registers to `asm!` only with the `vfp2` feature,
    //! which these targets do not list (they have `vfp2sp`).

    use super::f16;

    /// `h` widened by `VCVTB.F32.F16`.
    #[inline(always)]
    pub(crate) fn f16_to_f32(h: u16) -> f32 {
        f32::from_bits(micromoe_vcvtb_f32_f16(u32::from(h)))
    }

    /// [`FloatWeight::dot_seq`](super::FloatWeight::dot_seq) for f16.
    #[inline(always)]
    pub(crate) fn dot(x: &[f32], w: &[f16]) -> f32 {
        let n = x.len().min(w.len());
        // SAFETY: `micromoe_dot_f16` reads `n` f32 from `x` and `n` u16 from
        // `w`, both at least `n` long, and writes no memory.
        f32::from_bits(unsafe { micromoe_dot_f16(x.as_ptr(), w.as_ptr().cast(), n) })
    }

    /// [`FloatWeight::axpy`](super::FloatWeight::axpy) for f16.
    #[inline(always)]
    pub(crate) fn axpy(out: &mut [f32], w: &[f16], p: f32) {
        let n = out.len().min(w.len());
        // SAFETY: `micromoe_axpy_f16` reads and writes `n` f32 at `out`
        // (exclusively borrowed, at least `n` long) and reads `n` u16 from `w`.
        unsafe { micromoe_axpy_f16(out.as_mut_ptr(), w.as_ptr().cast(), n, p.to_bits()) }
    }

    // A leaf function: reads r0, writes r0 and s0 (caller-saved in the
    // AAPCS), touches no memory.
    core::arch::global_asm!(
        ".section .text.micromoe_vcvtb_f32_f16,\"ax\",%progbits",
        ".global micromoe_vcvtb_f32_f16",
        ".type micromoe_vcvtb_f32_f16,%function",
        ".thumb_func",
        ".fpu fpv4-sp-d16",
        "micromoe_vcvtb_f32_f16:",
        "vmov s0, r0",
        "vcvtb.f32.f16 s0, s0",
        "vmov r0, s0",
        "bx lr",
        ".size micromoe_vcvtb_f32_f16, . - micromoe_vcvtb_f32_f16",
    );

    // r0 = x (f32), r1 = w (f16 bits), r2 = n; returns the sum's bits in r0.
    // acc = -0.0, then acc = acc + x[i] * w[i] for i in order (VMUL and VADD
    // round separately: not fused), two halves per word load (`VCVTB` the
    // first, `VCVTT` the second; LDR may be unaligned on v7-M/v8-M), an odd
    // last one by LDRH. Clobbers r1-r3, r12, s0-s5 (caller-saved).
    core::arch::global_asm!(
        ".section .text.micromoe_dot_f16,\"ax\",%progbits",
        ".global micromoe_dot_f16",
        ".type micromoe_dot_f16,%function",
        ".thumb_func",
        ".fpu fpv4-sp-d16",
        "micromoe_dot_f16:",
        "mov.w r3, #0x80000000",
        "vmov s0, r3",
        "lsrs r3, r2, #1",
        "beq 2f",
        "1:",
        "ldr r12, [r1], #4",
        "vmov s1, r12",
        "vcvtb.f32.f16 s2, s1",
        "vcvtt.f32.f16 s3, s1",
        "vldmia r0!, {{s4, s5}}",
        "vmul.f32 s2, s4, s2",
        "vadd.f32 s0, s0, s2",
        "vmul.f32 s3, s5, s3",
        "vadd.f32 s0, s0, s3",
        "subs r3, r3, #1",
        "bne 1b",
        "2:",
        "lsls r2, r2, #31",
        "beq 3f",
        "ldrh r3, [r1]",
        "vmov s1, r3",
        "vcvtb.f32.f16 s2, s1",
        "vldr s4, [r0]",
        "vmul.f32 s2, s4, s2",
        "vadd.f32 s0, s0, s2",
        "3:",
        "vmov r0, s0",
        "bx lr",
        ".size micromoe_dot_f16, . - micromoe_dot_f16",
    );

    // r0 = out (f32), r1 = w (f16 bits), r2 = n, r3 = p's bits:
    // out[i] = out[i] + p * w[i], two halves per word load as above.
    // Clobbers r0-r3, r12, s0-s5 (caller-saved).
    core::arch::global_asm!(
        ".section .text.micromoe_axpy_f16,\"ax\",%progbits",
        ".global micromoe_axpy_f16",
        ".type micromoe_axpy_f16,%function",
        ".thumb_func",
        ".fpu fpv4-sp-d16",
        "micromoe_axpy_f16:",
        "vmov s0, r3",
        "lsrs r3, r2, #1",
        "beq 2f",
        "1:",
        "ldr r12, [r1], #4",
        "vmov s1, r12",
        "vcvtb.f32.f16 s2, s1",
        "vcvtt.f32.f16 s3, s1",
        "vmul.f32 s2, s0, s2",
        "vmul.f32 s3, s0, s3",
        "vldmia r0, {{s4, s5}}",
        "vadd.f32 s4, s4, s2",
        "vadd.f32 s5, s5, s3",
        "vstmia r0!, {{s4, s5}}",
        "subs r3, r3, #1",
        "bne 1b",
        "2:",
        "lsls r2, r2, #31",
        "beq 3f",
        "ldrh r3, [r1]",
        "vmov s1, r3",
        "vcvtb.f32.f16 s2, s1",
        "vmul.f32 s2, s0, s2",
        "vldr s4, [r0]",
        "vadd.f32 s4, s4, s2",
        "vstr s4, [r0]",
        "3:",
        "bx lr",
        ".size micromoe_axpy_f16, . - micromoe_axpy_f16",
    );

    // SAFETY: `micromoe_vcvtb_f32_f16` takes and returns a u32 in r0 and has
    // no other effect than clobbering s0; the other two follow the AAPCS
    // (arguments in r0-r3, only caller-saved registers clobbered) and touch
    // exactly the memory their wrappers above state.
    unsafe extern "C" {
        safe fn micromoe_vcvtb_f32_f16(bits: u32) -> u32;
        fn micromoe_dot_f16(x: *const f32, w: *const u16, n: usize) -> u32;
        fn micromoe_axpy_f16(out: *mut f32, w: *const u16, n: usize, p: u32);
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
/// IEEE half bits to f32, exactly as `half` widens them (NaNs quieted),
/// in steps that vectorize: exponent and mantissa shifted into an f32 and
/// scaled by 2^112 (exact for normal and subnormal halves alike), then
/// infinities and NaNs selected.
#[inline(always)]
fn widen_f16_bits(h: u16) -> f32 {
    let h = u32::from(h);
    let em = h & 0x7fff;
    let scaled = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000); // 2^112
    let special = f32::from_bits(0x7f80_0000 | (em << 13) | if em > 0x7c00 { 0x0040_0000 } else { 0 });
    let v = if em >= 0x7c00 { special } else { scaled };
    f32::from_bits(v.to_bits() | ((h & 0x8000) << 16))
}

/// Partial sums kept per dot product: element `i` goes to lane `i % LANES`.
pub const LANES: usize = 8;

/// The dot product of `w` and `x` (equal lengths) in micromoe's fixed float
/// order: eight lane sums over the elements in blocks of eight, added as
/// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`, then the remaining
/// elements one by one. Multiplies and adds are separate IEEE operations
/// (never fused), so every target computes the same bits, and the eight
/// independent lanes let the compiler use SIMD registers (SSE, AVX, NEON).
#[inline(always)]
pub fn dot<W: FloatWeight>(w: &[W], x: &[f32]) -> f32 {
    let (wc, wt) = w.as_chunks::<LANES>();
    let (xc, xt) = x.as_chunks::<LANES>();
    let mut l = [0.0f32; LANES];
    for (a, b) in wc.iter().zip(xc) {
        lanes_mul_add(&mut l, a, b);
    }
    finish(l, wt, xt)
}

/// The lanes added in the fixed tree, then the tail.
#[inline(always)]
fn finish<W: FloatWeight>(l: [f32; LANES], wt: &[W], xt: &[f32]) -> f32 {
    let mut s = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
    for (a, b) in wt.iter().zip(xt) {
        s += a.to_f32() * b;
    }
    s
}

/// Matrices up to this size take the several-rows-per-pass path.
const CACHED_BYTES: usize = 8 << 20;

/// Matrices from this size prefetch ahead in one token's products (x86-64
/// hosts).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
const AHEAD_BYTES: usize = 1 << 20;

/// `R` rows' [`dot`]s with each of `T` inputs in one pass: `R x T`
/// independent lane chains keep the pipeline busy, and each weight and input
/// block is loaded once per pass. `out[r][t]` is `dot(rows[r], xs[t])` bit for
/// bit (all slices of one length).
#[inline(always)]
fn dot_tile<W: FloatWeight, const R: usize, const T: usize>(
    rows: [&[W]; R],
    xs: [&[f32]; T],
) -> [[f32; T]; R] {
    dot_tile_ahead::<W, R, T, false>(rows, xs)
}

/// [`dot_tile`]; with `AHEAD` (x86-64 hosts) each row's block at `R`
/// rows further on is prefetched as the block is used: the next pass's
/// rows when the rows are consecutive ones of a matrix.
#[inline(always)]
fn dot_tile_ahead<W: FloatWeight, const R: usize, const T: usize, const AHEAD: bool>(
    rows: [&[W]; R],
    xs: [&[f32]; T],
) -> [[f32; T]; R] {
    let w = rows.map(|r| r.as_chunks::<LANES>());
    let x = xs.map(|x| x.as_chunks::<LANES>());
    let blocks = x.iter().map(|x| x.0.len()).chain(w.iter().map(|w| w.0.len())).min().unwrap_or(0);
    // Slices of `blocks` (`get`, so no panic path), and `blocks` taken again
    // from what they hold, so the indexing below needs no checks.
    let wc: [&[[W; LANES]]; R] = core::array::from_fn(|r| w[r].0.get(..blocks).unwrap_or(&[]));
    let xc: [&[[f32; LANES]]; T] = core::array::from_fn(|t| x[t].0.get(..blocks).unwrap_or(&[]));
    let blocks = wc.iter().map(|w| w.len()).chain(xc.iter().map(|x| x.len())).min().unwrap_or(0);
    let mut l = [[[0.0f32; LANES]; T]; R];
    for k in 0..blocks {
        for r in 0..R {
            // SAFETY: every slice in `wc` and `xc` holds at least `blocks`
            // blocks (their minimum, taken above) and k < blocks. (Checked indexing kept
            // R + T compares per block in the loop once the slice lengths
            // were spilled: 27 instead of 79 GFLOP/s at 64 x 64.)
            #[allow(unsafe_code)]
            let wb = unsafe { wc[r].get_unchecked(k) };
            #[cfg(all(feature = "std", target_arch = "x86_64"))]
            if AHEAD {
                avx2::prefetch(rows[r].as_ptr().wrapping_add(R * rows[r].len() + k * LANES));
            }
            for t in 0..T {
                // SAFETY: as above.
                #[allow(unsafe_code)]
                let xb = unsafe { xc[t].get_unchecked(k) };
                lanes_mul_add(&mut l[r][t], wb, xb);
            }
        }
    }
    core::array::from_fn(|r| core::array::from_fn(|t| finish(l[r][t], w[r].1, x[t].1)))
}

/// `l[i] += w[i] * x[i]` over one block: one SIMD multiply and add.
/// Written out lane by lane: at opt-level "s" (firmware) LLVM kept the
/// eight-step loop rolled, its index and the lanes in memory (14.7
/// instructions a multiply-accumulate on a Cortex-M4F); hosts vectorize
/// the straight line as they did the loop.
#[inline(always)]
fn lanes_mul_add<W: FloatWeight>(l: &mut [f32; LANES], w: &[W; LANES], x: &[f32; LANES]) {
    let [w0, w1, w2, w3, w4, w5, w6, w7] = W::widen(w);
    let [x0, x1, x2, x3, x4, x5, x6, x7] = *x;
    let [l0, l1, l2, l3, l4, l5, l6, l7] = l;
    *l0 += w0 * x0;
    *l1 += w1 * x1;
    *l2 += w2 * x2;
    *l3 += w3 * x3;
    *l4 += w4 * x4;
    *l5 += w5 * x5;
    *l6 += w6 * x6;
    *l7 += w7 * x7;
}

/// Every row's [`dot`] with `x` (non-empty), `R` rows per pass.
#[inline(always)]
fn rows_n<W: FloatWeight, const R: usize, const AHEAD: bool>(w: &[W], x: &[f32], y: &mut [f32]) {
    // At least 1, so no `chunks_exact` below can panic.
    let cols = x.len().max(1);
    let mut done = 0;
    // Not a zip of two `chunks_exact`: its out-of-line constructor divides
    // by a chunk size it cannot see is non-zero (a panic path).
    for (i, q) in w.chunks_exact(cols.saturating_mul(R).max(1)).enumerate() {
        let Some(yq) = y.get_mut(i * R..).and_then(|y| y.first_chunk_mut::<R>()) else { break };
        let mut rows = q.chunks_exact(cols);
        let out = dot_tile_ahead::<W, R, 1, AHEAD>(
            core::array::from_fn::<_, R, _>(|_| rows.next().unwrap_or(&[])),
            [x],
        );
        for (yo, o) in yq.iter_mut().zip(out) {
            *yo = o[0];
        }
        done += R;
    }
    let rows = w.get(done * cols..).unwrap_or(&[]).chunks_exact(cols);
    for (yo, row) in y.iter_mut().skip(done).zip(rows) {
        *yo = dot(row, x);
    }
}

/// `y = W x + b`: `w` is `(y.len(), x.len())` row-major, `b` (if any) has
/// `y.len()` elements. Rows beyond `w` (or bias beyond `b`) are not written
/// (or not added); it never panics. Each row is a [`dot`]; on x86-64 hosts
/// with AVX2 (detected at run time, `std`) the same code runs compiled for
/// AVX2, with the same results.
// w: (out, in) @ x: (in,) -> y: (out,)
pub fn matvec<W: FloatWeight>(w: &[W], b: Option<&[f32]>, x: &[f32], y: &mut [f32]) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::matvec(w, b, x, y) {
        return;
    }
    // Four rows' lanes per pass where SIMD registers hold them (hosts); a
    // microcontroller's 32 single-precision registers (or none) hold one
    // row's eight lanes and its inputs: with four, lanes lived in memory
    // (Cortex-M4F, digits f32: 46k instructions per inference with four
    // rows, 17.6k with one).
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    matvec_rows::<W, 4>(w, b, x, y);
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    matvec_rows::<W, 1>(w, b, x, y);
}

/// [`matvec`] with `R` rows per pass over cache-resident matrices (more
/// chains where the target has the registers for them).
#[inline(always)]
fn matvec_rows<W: FloatWeight, const R: usize>(w: &[W], b: Option<&[f32]>, x: &[f32], y: &mut [f32]) {
    matvec_passes::<W, R, false>(w, b, x, y)
}

/// [`matvec_rows`], or with `STREAMED` `R` rows a pass over matrices of
/// any size.
#[inline(always)]
fn matvec_passes<W: FloatWeight, const R: usize, const STREAMED: bool>(
    w: &[W],
    b: Option<&[f32]>,
    x: &[f32],
    y: &mut [f32],
) {
    if x.is_empty() {
        y.iter_mut().for_each(|v| *v = 0.0);
    } else {
        // Several rows at a time while the matrix stays in cache; streamed from
        // memory, one row at a time was faster on the AMD EPYC (4096 x 4096,
        // 64 MB: 14 -> 8 GFLOP/s with four portable rows 16 KB apart), not
        // on the Xeon with AVX2's eight (`STREAMED`, `avx2::matvec_avx2`). f16 rows are
        // half as far apart and bound by their widening: several rows at a
        // time always (4096 x 4096: 7.5 instead of 3.3 GFLOP/s). Same bits.
        if STREAMED || core::mem::size_of_val(w) <= CACHED_BYTES || size_of::<W>() == 2 {
            // x86-64 hosts prefetch the next pass's rows in matrices of a
            // megabyte or more: one token's products read each weight once,
            // mostly from memory (decode, the Xeon, one thread: f16 99-111 ->
            // 141-245 tokens/s at width 512, 36-37 -> 48-51 at 1024; f32
            // within noise to +10 %); cache-resident
            // ones lose to the extra loads (64 x 64 f32: 39-41 -> 30-32
            // GFLOP/s), as would the microcontrollers' flash.
            #[cfg(all(feature = "std", target_arch = "x86_64"))]
            if core::mem::size_of_val(w) >= AHEAD_BYTES {
                rows_n::<W, R, true>(w, x, y);
            } else {
                rows_n::<W, R, false>(w, x, y);
            }
            #[cfg(not(all(feature = "std", target_arch = "x86_64")))]
            rows_n::<W, R, false>(w, x, y);
        } else {
            for (yo, row) in y.iter_mut().zip(w.chunks_exact(x.len())) {
                *yo = dot(row, x);
            }
        }
    }
    if let Some(b) = b {
        for (yo, &bo) in y.iter_mut().zip(b) {
            *yo += bo;
        }
    }
}

/// `ys = W xs + b` for several tokens: `xs` is `(tokens, in)`, `ys`
/// `(tokens, out)`, both row-major. Each weight row is used for four
/// tokens while it is in cache; every value equals [`matvec`]'s for that
/// token, bit for bit.
// w: (out, in) @ xs: (tokens, in) -> ys: (tokens, out)
pub fn matmul<W: FloatWeight>(w: &[W], b: Option<&[f32]>, xs: &[f32], cols: usize, ys: &mut [f32]) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::matmul(w, b, xs, cols, ys) {
        return;
    }
    matmul_tiles::<W, 1, 4, 4>(w, b, xs, cols, ys)
}

/// [`matmul`] in tiles of `R` rows x `T` tokens (`R x T` chains), then
/// [`matvec_rows`] with `M` rows per pass for the last tokens.
#[inline(always)]
fn matmul_tiles<W: FloatWeight, const R: usize, const T: usize, const M: usize>(
    w: &[W],
    b: Option<&[f32]>,
    xs: &[f32],
    cols: usize,
    ys: &mut [f32],
) {
    let Some((rows, tokens)) = matmul_shape(w.len(), xs.len(), ys.len(), cols) else { return };
    let x = |t: usize| -> [&[f32]; T] { core::array::from_fn(|k| &xs[(t + k) * cols..(t + k + 1) * cols]) };
    let row = |o: usize| &w[o * cols..(o + 1) * cols];
    // `inline(always)` on the closures: a closure is not compiled with the
    // target features of the function it is inlined into, so F16C's
    // widening in a closure LLVM left out of line became a call a block
    // (64-token f16 prompts 630 -> 158 tokens/s).
    tile_loop::<R, T>(
        (rows, tokens, cols * size_of::<W>()),
        b,
        ys,
        #[inline(always)]
        |o, t| dot_tile(core::array::from_fn::<_, R, _>(|r| row(o + r)), x(t)),
        #[inline(always)]
        |o, t| dot_tile([row(o)], x(t))[0],
    );
    let t = tokens / T * T;
    for t in t..tokens {
        matvec_rows::<W, M>(w, b, &xs[t * cols..(t + 1) * cols], &mut ys[t * rows..(t + 1) * rows]);
    }
}

/// `(rows, tokens)` of a matrix product with `w`, `xs` and `ys` this long
/// and `cols` columns; `None` if there is nothing to compute.
#[inline(always)]
fn matmul_shape(w: usize, xs: usize, ys: usize, cols: usize) -> Option<(usize, usize)> {
    let rows = w.checked_div(cols).filter(|&r| r > 0)?;
    Some((rows, (xs / cols).min(ys / rows)))
}

/// The tile order of [`matmul_tiles`] for `(rows, tokens, row_bytes)`:
/// `tile(o, t)` gives rows `o..o + R` x tokens `t..t + T`, `one(o, t)`
/// row `o` (past the last full tile of a block) x the same tokens; each
/// value plus its bias goes to `ys[t * rows + o]`. Tokens past the last
/// multiple of `T` are left to the caller.
#[inline(always)]
fn tile_loop<const R: usize, const T: usize>(
    (rows, tokens, row_bytes): (usize, usize, usize),
    b: Option<&[f32]>,
    ys: &mut [f32],
    tile: impl Fn(usize, usize) -> [[f32; T]; R],
    one: impl Fn(usize, usize) -> [f32; T],
) {
    let bias = |o: usize| b.and_then(|b| b.get(o)).copied();
    let mut put = |t: usize, o: usize, v: f32| {
        ys[t * rows + o] = match bias(o) {
            Some(bo) => v + bo,
            None => v,
        };
    };
    // Blocks of rows that stay in L2 (64 KB of weights) while every token
    // passes over them: weights streamed from memory are read once, not
    // once per `T` tokens (each (row, token) sum is the same either way).
    let per_block = ((64 << 10) / row_bytes.max(1)).max(R) / R * R;
    let mut o0 = 0;
    while o0 < rows {
        let o1 = (o0 + per_block).min(rows);
        let mut t = 0;
        while t + T <= tokens {
            let mut o = o0;
            while o + R <= o1 {
                for (r, out) in tile(o, t).iter().enumerate() {
                    for (k, &v) in out.iter().enumerate() {
                        put(t + k, o + r, v);
                    }
                }
                o += R;
            }
            for o in o..o1 {
                for (k, &v) in one(o, t).iter().enumerate() {
                    put(t + k, o, v);
                }
            }
            t += T;
        }
        o0 = o1;
    }
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
pub(crate) use avx2::prefetch;

/// The same kernels compiled for AVX2 (x86-64 hosts, chosen at run time).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[allow(unsafe_code)]
mod avx2 {
    use super::FloatWeight;
    use crate::quant::f16;
    use core::arch::x86_64::__m512;

    /// [`matvec`](super::matvec) compiled for AVX2 (f16 weights: with
    /// F16C too, where the CPU has it); false (nothing done) on a CPU
    /// without AVX2.
    pub(super) fn matvec<W: FloatWeight>(w: &[W], b: Option<&[f32]>, x: &[f32], y: &mut [f32]) -> bool {
        if !std::is_x86_feature_detected!("avx2") {
            return false;
        }
        #[cfg(feature = "fast-float")]
        if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c") {
            match as_f16c(w) {
                // SAFETY: the CPU has AVX2, FMA and F16C, the features enabled.
                Some(w) => unsafe { rows_fma(w, b, x, y) },
                // SAFETY: as above.
                None => unsafe { rows_fma(w, b, x, y) },
            }
            return true;
        }
        if let Some(w) = as_f16c(w) {
            // SAFETY: the CPU has AVX2 and F16C (`as_f16c` checked), the
            // features the function enables.
            unsafe { matvec_f16c(w, b, x, y) };
            return true;
        }
        // SAFETY: the CPU has AVX2, the only feature the function enables.
        unsafe { matvec_avx2(w, b, x, y) };
        true
    }

    /// `w` as [`F16c`] weights if they are [`f16`] and the CPU has F16C.
    pub(super) fn as_f16c<W: FloatWeight>(w: &[W]) -> Option<&[F16c]> {
        let is_f16 = core::any::TypeId::of::<W>() == core::any::TypeId::of::<f16>();
        (is_f16 && std::is_x86_feature_detected!("f16c")).then(|| bytemuck::cast_slice(w))
    }

    /// An f16 widened by F16C's `vcvtph2ps`: exact, NaNs quieted with their
    /// payload kept, so the values are `half`'s (and [`widen_f16_bits`]'s,
    /// tested on all 65,536 halves). Made only by [`as_f16c`], after
    /// run-time detection, and used only inside functions compiled for F16C.
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub(super) struct F16c(u16);

    // SAFETY: a transparent `u16`: every bit pattern is a value, zero too,
    // no padding.
    unsafe impl bytemuck::Zeroable for F16c {}
    // SAFETY: as above.
    unsafe impl bytemuck::Pod for F16c {}

    impl FloatWeight for F16c {
        #[inline(always)]
        fn to_f32(self) -> f32 {
            super::widen_f16_bits(self.0)
        }

        #[inline(always)]
        fn widen(block: &[Self; super::LANES]) -> [f32; super::LANES] {
            use core::arch::x86_64::{__m256, _mm_loadu_si128, _mm256_cvtph_ps};
            // SAFETY: an `F16c` exists only where the CPU has F16C
            // (`as_f16c`), and this inlines into the F16C-compiled kernels
            // below; the load reads the block's 16 bytes (unaligned allowed);
            // `__m256` and `[f32; 8]` have the same size and any bits are both.
            unsafe {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(block.as_ptr().cast()));
                core::mem::transmute::<__m256, [f32; 8]>(v)
            }
        }
    }

    /// `fast-float`: f32 weights eight rows a pass (more loads in flight
    /// from streamed weights) with one FMA-fed sum of eight lanes a row,
    /// f16 weights one row at a time with four such sums (their widening
    /// needs the registers); the lanes added at the end: not the portable
    /// order, so not the microcontrollers' bits (the opt-in feature's
    /// documented cost).
    #[cfg(feature = "fast-float")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_fma<W: FloatWeight>(w: &[W], b: Option<&[f32]>, x: &[f32], y: &mut [f32]) {
        // Prefetching ahead as the exact products do.
        match (size_of::<W>() == 4, core::mem::size_of_val(w) >= super::AHEAD_BYTES) {
            (true, true) => fma_passes::<W, 8, true>(w, x, y),
            (true, false) => fma_passes::<W, 8, false>(w, x, y),
            (false, true) => row_fma4::<W, true>(w, x, y),
            (false, false) => row_fma4::<W, false>(w, x, y),
        }
        if let Some(b) = b {
            y.iter_mut().zip(b).for_each(|(yo, &bo)| *yo += bo);
        }
    }

    /// [`rows_fma`] for f16 weights, without the bias: one row at a time,
    /// four partial sums.
    #[cfg(feature = "fast-float")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_fma4<W: FloatWeight, const AHEAD: bool>(w: &[W], x: &[f32], y: &mut [f32]) {
        use core::arch::x86_64::{__m256, _mm256_add_ps, _mm256_fmadd_ps, _mm256_setzero_ps};
        let cols = x.len();
        if cols == 0 {
            y.iter_mut().for_each(|v| *v = 0.0);
        }
        let (xb, xt) = x.as_chunks::<{ super::LANES }>();
        for (yo, row) in y.iter_mut().zip(w.chunks_exact(cols.max(1))) {
            let (wb, wt) = row.as_chunks::<{ super::LANES }>();
            let mut acc: [__m256; 4] = [_mm256_setzero_ps(); 4];
            let (wq, wr) = wb.as_chunks::<4>();
            let (xq, xr) = xb.as_chunks::<4>();
            for (w4, x4) in wq.iter().zip(xq) {
                if AHEAD {
                    // Eight rows ahead (`w4` steps are 32 weights).
                    prefetch(w4.as_ptr().wrapping_add(8 * cols / (4 * super::LANES)));
                }
                for k in 0..4 {
                    let wv: __m256 = bytemuck::cast(W::widen(&w4[k]));
                    acc[k] = _mm256_fmadd_ps(wv, bytemuck::cast(x4[k]), acc[k]);
                }
            }
            for (k, (wv, xv)) in wr.iter().zip(xr).enumerate() {
                let wv: __m256 = bytemuck::cast(W::widen(wv));
                acc[k] = _mm256_fmadd_ps(wv, bytemuck::cast(*xv), acc[k]);
            }
            let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let lanes: [f32; super::LANES] = bytemuck::cast(sum);
            let tail = wt.iter().zip(xt).fold(0.0f32, |s, (&wv, &xv)| wv.to_f32().mul_add(xv, s));
            *yo = lanes.iter().sum::<f32>() + tail;
        }
    }

    /// [`rows_fma`] for f32 weights without the bias, `R` rows a pass.
    #[cfg(feature = "fast-float")]
    #[inline(always)]
    fn fma_passes<W: FloatWeight, const R: usize, const AHEAD: bool>(w: &[W], x: &[f32], y: &mut [f32]) {
        let cols = x.len();
        if cols == 0 {
            y.iter_mut().for_each(|v| *v = 0.0);
            return;
        }
        let mut done = 0;
        for (pass, yq) in w.chunks_exact(R * cols).zip(y.chunks_exact_mut(R)) {
            let rows: [&[W]; R] = core::array::from_fn(|r| &pass[r * cols..(r + 1) * cols]);
            yq.copy_from_slice(&fma_rows::<W, R, AHEAD>(rows, x));
            done += R;
        }
        let rest = w.get(done * cols..).unwrap_or(&[]).chunks_exact(cols);
        for (yo, row) in y.iter_mut().skip(done).zip(rest) {
            *yo = fma_rows::<W, 1, false>([row], x)[0];
        }
    }

    /// [`rows_fma`]'s sums for `R` rows as long as `x`, one FMA-fed sum of
    /// eight lanes a row.
    #[cfg(feature = "fast-float")]
    #[inline(always)]
    fn fma_rows<W: FloatWeight, const R: usize, const AHEAD: bool>(rows: [&[W]; R], x: &[f32]) -> [f32; R] {
        use core::arch::x86_64::{__m256, _mm256_fmadd_ps, _mm256_setzero_ps};
        const L: usize = super::LANES;
        let (xb, xt) = x.as_chunks::<L>();
        let wc = rows.map(|r| r.as_chunks::<L>());
        // SAFETY (each block): this inlines only into `rows_fma`, compiled
        // for AVX2, FMA and F16C on a CPU that has them.
        let mut acc: [__m256; R] = [unsafe { _mm256_setzero_ps() }; R];
        for (k, xv) in xb.iter().enumerate() {
            let xv: __m256 = bytemuck::cast(*xv);
            for r in 0..R {
                let Some(wv) = wc[r].0.get(k) else { continue };
                if AHEAD {
                    prefetch(rows[r].as_ptr().wrapping_add(R * rows[r].len() + k * L));
                }
                let wv: __m256 = bytemuck::cast(W::widen(wv));
                acc[r] = unsafe { _mm256_fmadd_ps(wv, xv, acc[r]) };
            }
        }
        core::array::from_fn(|r| {
            let lanes: [f32; L] = bytemuck::cast(acc[r]);
            let tail = wc[r].1.iter().zip(xt).fold(0.0f32, |s, (&wv, &xv)| wv.to_f32().mul_add(xv, s));
            lanes.iter().sum::<f32>() + tail
        })
    }

    #[target_feature(enable = "avx2,f16c")]
    fn matvec_f16c(w: &[F16c], b: Option<&[f32]>, x: &[f32], y: &mut [f32]) {
        super::matvec_rows::<F16c, 8>(w, b, x, y)
    }

    #[target_feature(enable = "avx2,f16c")]
    fn matmul_f16c(w: &[F16c], b: Option<&[f32]>, xs: &[f32], cols: usize, ys: &mut [f32]) {
        super::matmul_tiles::<F16c, 1, 4, 8>(w, b, xs, cols, ys)
    }

    /// [`matmul`](super::matmul) compiled for AVX2, as [`matvec`].
    pub(super) fn matmul<W: FloatWeight>(
        w: &[W],
        b: Option<&[f32]>,
        xs: &[f32],
        cols: usize,
        ys: &mut [f32],
    ) -> bool {
        if !std::is_x86_feature_detected!("avx2") {
            return false;
        }
        let wide = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vl");
        // f32 weights over 16 rows or more in tiles of paired tokens (f16:
        // no faster than `matmul_f16c_wide`, its widening doubles the work
        // of the ports the pairs free; fewer rows: the packing outweighs).
        let is_f32 = core::any::TypeId::of::<W>() == core::any::TypeId::of::<f32>();
        if let (true, Some(cpu)) = (is_f32 && w.len() / cols.max(1) >= 16, Avx512::detect()) {
            // SAFETY: the CPU has AVX2, AVX-512F and VL (`cpu`), the
            // features enabled; `W` is f32 (`is_f32`).
            unsafe { matmul_pairs(cpu, bytemuck::cast_slice(w), b, xs, cols, ys) };
            return true;
        }
        if let Some(w) = as_f16c(w) {
            if wide {
                // SAFETY: the CPU has AVX2, F16C, AVX-512F and VL, the features enabled.
                unsafe { matmul_f16c_wide(w, b, xs, cols, ys) };
            } else {
                // SAFETY: as in `matvec`.
                unsafe { matmul_f16c(w, b, xs, cols, ys) };
            }
            return true;
        }
        if wide {
            // SAFETY: the CPU has AVX2, AVX-512F and VL, the features enabled.
            unsafe { matmul_wide(w, b, xs, cols, ys) };
        } else {
            // SAFETY: as in `matvec`.
            unsafe { matmul_avx2(w, b, xs, cols, ys) };
        }
        true
    }

    /// [`matmul_avx2`] compiled where AVX-512VL gives 32 vector registers
    /// (still eight-lane vectors, separate multiply and add: the same
    /// bits), so a tile of MR rows by MT tokens keeps its chains in them.
    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    fn matmul_wide<W: FloatWeight>(w: &[W], b: Option<&[f32]>, xs: &[f32], cols: usize, ys: &mut [f32]) {
        super::matmul_tiles::<W, MR, MT, 8>(w, b, xs, cols, ys)
    }

    /// [`matmul_wide`] for f16 weights widened by F16C.
    #[target_feature(enable = "avx2,f16c,avx512f,avx512vl")]
    fn matmul_f16c_wide(w: &[F16c], b: Option<&[f32]>, xs: &[f32], cols: usize, ys: &mut [f32]) {
        super::matmul_tiles::<F16c, MR, MT, 8>(w, b, xs, cols, ys)
    }

    const MR: usize = 4;
    const MT: usize = 4;

    /// A hint to bring the cache line at `p` into L2 (any address: the
    /// next pass's rows may lie past the matrix). L2, not L1 (`T1`, not
    /// `T0`): on the AMD EPYC (Zen 4) a streamed decode pass's lines
    /// fetched into L1 evicted the input and accumulators' lines still in
    /// use, and the hint into L2 kept more lines in flight (one thread,
    /// width 512: f32 decode 87.6 -> 147.5 tokens/s, f16 131 -> 242; width
    /// 1024: 33.1 -> 42.8, 56 -> 107). The Xeon and Zen 1 numbers
    /// elsewhere were measured with `T0`.
    #[inline(always)]
    pub(crate) fn prefetch<T>(p: *const T) {
        use core::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        // SAFETY: a prefetch is a hint (SSE, in every x86-64): it reads
        // nothing the program sees and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }

    /// Proof that the CPU has AVX2 and AVX-512F (VL too): made only by
    /// [`Avx512::detect`], it lets [`pair_tile`] (inlined into the
    /// functions compiled for those features) use their instructions.
    #[derive(Clone, Copy)]
    pub(super) struct Avx512(());

    impl Avx512 {
        pub(super) fn detect() -> Option<Self> {
            (std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl"))
            .then_some(Avx512(()))
        }
    }

    /// Two tokens' blocks of eight side by side (tokens `2p` and `2p + 1`
    /// of a group in lanes 0-7 and 8-15), as [`pair_tile`] loads them.
    type PairBlock = [f32; 2 * super::LANES];

    /// [`dot_tile`](super::dot_tile) for `R` rows and `2P` tokens with two
    /// tokens' eight lane chains in each 512-bit register: `pairs[p]` holds
    /// tokens `2p` and `2p + 1` block by block, `tails[t]` token `t`'s
    /// columns past the last block. Every lane is multiplied, then added,
    /// block by block, as in [`dot`](super::dot), so every sum has the same
    /// bits, in half the instructions of eight-lane registers.
    #[inline(always)]
    fn pair_tile<const R: usize, const P: usize, const T: usize>(
        _: Avx512,
        rows: [&[f32]; R],
        pairs: [&[PairBlock]; P],
        tails: [&[f32]; T],
    ) -> [[f32; T]; R] {
        use core::arch::x86_64::{
            _mm256_loadu_pd, _mm512_add_ps, _mm512_broadcast_f64x4, _mm512_castpd_ps, _mm512_loadu_ps,
            _mm512_mul_ps, _mm512_setzero_ps,
        };
        const { assert!(T == 2 * P) };
        let w = rows.map(|r| r.as_chunks::<{ super::LANES }>());
        let blocks = pairs.iter().map(|x| x.len()).chain(w.iter().map(|w| w.0.len())).min().unwrap_or(0);
        let wc: [&[[f32; super::LANES]]; R] = core::array::from_fn(|r| w[r].0.get(..blocks).unwrap_or(&[]));
        let xc: [&[PairBlock]; P] = core::array::from_fn(|p| pairs[p].get(..blocks).unwrap_or(&[]));
        let blocks = wc.iter().map(|w| w.len()).chain(xc.iter().map(|x| x.len())).min().unwrap_or(0);
        // SAFETY (each block below): the `Avx512` proves AVX-512F; every
        // slice in `wc` and `xc` holds at least `blocks` blocks and k <
        // blocks; each load reads one block (unaligned allowed), the
        // weights' eight as bits into both halves.
        let mut l: [[__m512; P]; R] = [[unsafe { _mm512_setzero_ps() }; P]; R];
        for k in 0..blocks {
            let xp: [__m512; P] =
                core::array::from_fn(|p| unsafe { _mm512_loadu_ps(xc[p].get_unchecked(k).as_ptr()) });
            for r in 0..R {
                let wv = unsafe {
                    _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_loadu_pd(
                        wc[r].get_unchecked(k).as_ptr().cast(),
                    )))
                };
                for p in 0..P {
                    l[r][p] = unsafe { _mm512_add_ps(l[r][p], _mm512_mul_ps(wv, xp[p])) };
                }
            }
        }
        core::array::from_fn(|r| {
            core::array::from_fn(|t| {
                let lanes: [[f32; super::LANES]; 2] = bytemuck::cast(l[r][t / 2]);
                super::finish(lanes[t % 2], w[r].1, tails[t])
            })
        })
    }

    /// [`matmul_wide`] in tiles of four rows x eight tokens, two tokens a
    /// 512-bit register ([`pair_tile`]), the tokens of each group of eight
    /// packed in pairs first; the last `tokens % 8` through
    /// [`matmul_wide`]'s tiles. The same bits.
    #[target_feature(enable = "avx2,avx512f,avx512vl")]
    fn matmul_pairs(cpu: Avx512, w: &[f32], b: Option<&[f32]>, xs: &[f32], cols: usize, ys: &mut [f32]) {
        const R: usize = 4;
        const P: usize = 4;
        const T: usize = 2 * P;
        const L: usize = super::LANES;
        let Some((rows, tokens)) = super::matmul_shape(w.len(), xs.len(), ys.len(), cols) else { return };
        let (groups, blocks) = (tokens / T, cols / L);
        let mut packed = vec![[0.0f32; 2 * L]; groups * P * blocks];
        for (i, pair) in packed.chunks_exact_mut(blocks.max(1)).enumerate() {
            let (a, b) = (&xs[2 * i * cols..][..blocks * L], &xs[(2 * i + 1) * cols..][..blocks * L]);
            for ((o, a), b) in pair.iter_mut().zip(a.as_chunks::<L>().0).zip(b.as_chunks::<L>().0) {
                o[..L].copy_from_slice(a);
                o[L..].copy_from_slice(b);
            }
        }
        let pairs = |t: usize| -> [&[PairBlock]; P] {
            core::array::from_fn(|p| &packed[(t / 2 + p) * blocks..(t / 2 + p + 1) * blocks])
        };
        let tails = |t: usize| -> [&[f32]; T] {
            core::array::from_fn(|k| &xs[(t + k) * cols + blocks * L..][..cols - blocks * L])
        };
        let row = |o: usize| &w[o * cols..(o + 1) * cols];
        super::tile_loop::<R, T>(
            (rows, groups * T, cols * size_of::<f32>()),
            b,
            ys,
            #[inline(always)]
            |o, t| pair_tile::<R, P, T>(cpu, core::array::from_fn(|r| row(o + r)), pairs(t), tails(t)),
            #[inline(always)]
            |o, t| pair_tile::<1, P, T>(cpu, [row(o)], pairs(t), tails(t))[0],
        );
        let done = groups * T;
        super::matmul_tiles::<f32, MR, MT, 8>(
            w,
            b,
            &xs[done * cols..tokens * cols],
            cols,
            &mut ys[done * rows..],
        );
    }

    // Sixteen vector registers: eight chains (plus the loaded blocks) fit.
    // 64 x 64: 79 GFLOP/s with eight rows per pass, 22 with four.
    #[target_feature(enable = "avx2")]
    fn matvec_avx2<W: FloatWeight>(w: &[W], b: Option<&[f32]>, x: &[f32], y: &mut [f32]) {
        // f16 blocks need registers for their widening: four rows.
        if size_of::<W>() == 2 {
            super::matvec_rows::<W, 4>(w, b, x, y)
        } else {
            // Eight rows a pass over streamed matrices too (more loads in
            // flight; the Xeon, 32000 x 512 f32: 7.5-15 -> 21-26 GB/s; 4096 x
            // 4096: 8-12 -> 27), as the int8 decode kernels found on the
            // AMD EPYC.
            super::matvec_passes::<W, 8, true>(w, b, x, y)
        }
    }

    #[target_feature(enable = "avx2")]
    fn matmul_avx2<W: FloatWeight>(w: &[W], b: Option<&[f32]>, xs: &[f32], cols: usize, ys: &mut [f32]) {
        // One row by four tokens measured fastest on cache-resident weights
        // (16 tokens, 256 x 512: 63-74 GFLOP/s; 2 x 4 and 4 x 2 tiles 43 and
        // slower: LLVM keeps fewer of their chains in registers).
        super::matmul_tiles::<W, 1, 4, 8>(w, b, xs, cols, ys)
    }
}

/// A borrowed fully-connected layer with f32 or f16 weights.
#[derive(Debug, Clone, Copy)]
pub struct Linear<'a, W> {
    w: &'a [W],
    bias: Option<&'a [f32]>,
    rows: usize,
    cols: usize,
}

impl<'a, W: FloatWeight> Linear<'a, W> {
    /// `w`: `(rows, cols)` row-major; `bias`: `rows` elements.
    pub fn new(w: &'a [W], bias: Option<&'a [f32]>, rows: usize, cols: usize) -> Result<Self> {
        check_len(What::Weight, mul(rows, cols)?, w.len())?;
        if let Some(b) = bias {
            check_len(What::Bias, rows, b.len())?;
        }
        if rows == 0 || cols == 0 {
            return Err(Error::Shape { what: What::Weight, expected: 1, actual: 0 });
        }
        Ok(Linear { w, bias, rows, cols })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The weights, `(rows, cols)` row-major.
    pub fn weights(&self) -> &'a [W] {
        self.w
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&'a [f32]> {
        self.bias
    }

    /// `y = W x + b`. `x` must have `cols` and `y` `rows` elements (callers
    /// check once per layer; a mismatch computes garbage, never panics).
    #[inline]
    pub fn forward(&self, x: &[f32], y: &mut [f32]) {
        matvec(self.w, self.bias, x, y)
    }

    /// [`Linear::forward`] for several tokens: `xs` `(tokens, cols)`, `ys`
    /// `(tokens, rows)`; the same values, weights reused across tokens.
    #[inline]
    pub fn forward_batch(&self, xs: &[f32], ys: &mut [f32]) {
        matmul(self.w, self.bias, xs, self.cols, ys)
    }
}

/// Element-wise non-linearity of an expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// Exact GELU, `x * Phi(x)` (PyTorch `gelu`, HF `"gelu"`).
    Gelu,
    /// Tanh-approximated GELU (HF `"gelu_pytorch_tanh"`).
    GeluTanh,
    /// `x * sigmoid(x)` (HF `"silu"`), SwiGLU's gate.
    Silu,
}

impl Activation {
    /// The function at `x`.
    #[inline]
    pub fn eval(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Gelu => 0.5 * x * (1.0 + libm::erff(x * core::f32::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                const C: f32 = 0.797_884_6; // sqrt(2 / pi)
                0.5 * x * (1.0 + libm::tanhf(C * (x + 0.044_715 * x * x * x)))
            }
            Activation::Silu => x / (1.0 + libm::expf(-x)),
        }
    }

    /// Largest slope of the function, used in error analysis.
    pub fn lipschitz(self) -> f32 {
        match self {
            Activation::Relu => 1.0,
            Activation::Gelu | Activation::GeluTanh => 1.13,
            Activation::Silu => 1.1,
        }
    }

    /// Applies the function in place.
    pub fn apply(self, xs: &mut [f32]) {
        for x in xs {
            *x = self.eval(*x);
        }
    }

    /// `g = f(g) * u` element-wise, a gated unit's product (SwiGLU with
    /// `Silu`): the function chosen once, not per element.
    pub fn gate(self, g: &mut [f32], u: &[f32]) {
        #[inline(always)]
        fn each(g: &mut [f32], u: &[f32], f: impl Fn(f32) -> f32) {
            g.iter_mut().zip(u).for_each(|(g, &u)| *g = f(*g) * u);
        }
        match self {
            // Many lanes at a time where the host has SIMD, the same bits.
            Activation::Silu => super::expf::silu_gate(g, u),
            other => each(g, u, |x| other.eval(x)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fast-float` (FMA, four partial sums a row) against the exact sum in
    /// f64: within a few f32 roundings of the sum of |w x|, over row and
    /// column tails, f32 and f16 weights, and matrices past the cached size.
    #[cfg(feature = "fast-float")]
    #[test]
    fn fast_float_products_are_close_to_exact() {
        let mut seed = 5u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
        };
        for (rows, cols) in [(1, 1), (3, 7), (9, 33), (17, 100), (64, 512), (2100, 1024)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let x: Vec<f32> = (0..cols).map(|_| next()).collect();
            let b: Vec<f32> = (0..rows).map(|_| next()).collect();
            let (mut y, mut yh) = (vec![0.0f32; rows], vec![0.0f32; rows]);
            matvec(&w, Some(&b), &x, &mut y);
            matvec(&h, Some(&b), &x, &mut yh);
            for r in 0..rows {
                let row = &w[r * cols..(r + 1) * cols];
                let hrow = &h[r * cols..(r + 1) * cols];
                let exact: f64 =
                    row.iter().zip(&x).map(|(&a, &v)| a as f64 * v as f64).sum::<f64>() + b[r] as f64;
                let exact_h: f64 =
                    hrow.iter().zip(&x).map(|(a, &v)| a.to_f32() as f64 * v as f64).sum::<f64>()
                        + b[r] as f64;
                let mag: f64 =
                    row.iter().zip(&x).map(|(&a, &v)| (a as f64 * v as f64).abs()).sum::<f64>() + 1.0;
                let tol = mag * 4.0 * f32::EPSILON as f64;
                assert!((y[r] as f64 - exact).abs() <= tol, "f32 {rows}x{cols} row {r}: {} vs {exact}", y[r]);
                assert!(
                    (yh[r] as f64 - exact_h).abs() <= tol,
                    "f16 {rows}x{cols} row {r}: {} vs {exact_h}",
                    yh[r]
                );
            }
        }
    }

    #[test]
    fn gate_is_eval_times_up() {
        let xs = [-3.0f32, -0.5, 0.0, 0.25, 2.0, 9.0];
        let us = [0.5f32, -1.0, 2.0, 3.0, -0.25, 1.0];
        for act in [Activation::Relu, Activation::Gelu, Activation::GeluTanh, Activation::Silu] {
            let mut g = xs;
            act.gate(&mut g, &us);
            for ((&got, &x), &u) in g.iter().zip(&xs).zip(&us) {
                assert_eq!(got.to_bits(), (act.eval(x) * u).to_bits(), "{act:?} at {x}");
            }
        }
    }

    #[test]
    fn f16_weights_widen() {
        let w = [f16::from_f32(0.5), f16::from_f32(-2.0)];
        let lin = Linear::new(&w, None, 1, 2).unwrap();
        let mut y = [0.0];
        lin.forward(&[4.0, 1.0], &mut y);
        assert_eq!(y, [0.0]);
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn dot_is_the_documented_order() {
        for n in [0, 1, 7, 8, 9, 16, 37, 64] {
            let (w, x) = (values(n, 1), values(n, 2));
            let mut l = [0.0f32; LANES];
            for i in 0..n / LANES * LANES {
                l[i % LANES] += w[i] * x[i];
            }
            let mut want = ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
            for i in n / LANES * LANES..n {
                want += w[i] * x[i];
            }
            assert_eq!(dot(&w, &x).to_bits(), want.to_bits(), "n = {n}");
        }
    }

    /// Every pass shape (rows per pass, rows x tokens tiles, the AVX2
    /// choices) equals one `dot` per row and token plus the bias, bit for bit,
    /// over shapes with row, token and column tails. `matmul` takes the
    /// paired-token tiles for f32 from 16 rows and 8 tokens on CPUs with
    /// AVX-512 (groups of eight, then the last tokens by four and one).
    #[test]
    fn every_pass_shape_equals_the_dot_per_row() {
        // Under Miri (which interprets every step) the shapes that still
        // cross every tail: rows past a pass, columns past a block, tokens
        // past a tile.
        let shapes: &[(usize, usize, usize)] = if cfg!(miri) {
            &[(13, 37, 7), (1, 3, 1)]
        } else {
            &[
                (13, 37, 7),
                (1, 3, 1),
                (8, 8, 4),
                (19, 64, 9),
                (5, 7, 3),
                (16, 130, 8),
                (21, 40, 19),
                (33, 24, 29),
                // Over `AHEAD_BYTES` in f32 and f16: the prefetching passes.
                (261, 2050, 2),
            ]
        };
        for &(rows, cols, tokens) in shapes {
            let w = values(rows * cols, 3);
            let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let b = values(rows, 4);
            let xs = values(tokens * cols, 5);
            let want = |w: &dyn Fn(usize) -> f32| -> Vec<f32> {
                let mut y = Vec::new();
                for x in xs.chunks_exact(cols) {
                    for (o, bo) in b.iter().enumerate() {
                        let row: Vec<f32> = (0..cols).map(|i| w(o * cols + i)).collect();
                        y.push(dot(&row, x) + bo);
                    }
                }
                y
            };
            fn all<W: FloatWeight>(
                w: &[W],
                b: &[f32],
                xs: &[f32],
                cols: usize,
                rows: usize,
            ) -> Vec<Vec<f32>> {
                let n = xs.len() / cols * rows;
                let mut outs = Vec::new();
                let mut run = |f: &dyn Fn(&mut [f32])| {
                    let mut y = vec![0.0; n];
                    f(&mut y);
                    outs.push(y);
                };
                let each = |y: &mut [f32], mv: &dyn Fn(&[f32], &mut [f32])| {
                    for (x, y) in xs.chunks_exact(cols).zip(y.chunks_exact_mut(rows)) {
                        mv(x, y);
                    }
                };
                // `fast-float`'s matvec is FMA, checked against exact sums
                // in `fast_float_products_are_close_to_exact` instead.
                if !cfg!(feature = "fast-float") {
                    run(&|y| each(y, &|x, y| matvec(w, Some(b), x, y)));
                }
                run(&|y| each(y, &|x, y| matvec_rows::<W, 1>(w, Some(b), x, y)));
                run(&|y| each(y, &|x, y| matvec_rows::<W, 4>(w, Some(b), x, y)));
                run(&|y| each(y, &|x, y| matvec_rows::<W, 8>(w, Some(b), x, y)));
                run(&|y| matmul(w, Some(b), xs, cols, y));
                run(&|y| matmul_tiles::<W, 1, 4, 4>(w, Some(b), xs, cols, y));
                run(&|y| matmul_tiles::<W, 1, 4, 8>(w, Some(b), xs, cols, y));
                run(&|y| matmul_tiles::<W, 2, 4, 1>(w, Some(b), xs, cols, y));
                run(&|y| matmul_tiles::<W, 3, 2, 8>(w, Some(b), xs, cols, y));
                run(&|y| matmul_tiles::<W, 4, 4, 8>(w, Some(b), xs, cols, y));
                outs
            }
            let want32 = want(&|i| w[i]);
            for (k, got) in all(&w, &b, &xs, cols, rows).iter().enumerate() {
                assert_eq!(got, &want32, "f32 {rows}x{cols}, {tokens} tokens, variant {k}");
            }
            let want16 = want(&|i| w16[i].to_f32());
            for (k, got) in all(&w16, &b, &xs, cols, rows).iter().enumerate() {
                assert_eq!(got, &want16, "f16 {rows}x{cols}, {tokens} tokens, variant {k}");
            }
        }
    }

    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn f16_widening_equals_half_for_every_value() {
        // Every value natively; every 97th under Miri.
        for bits in (0..=u16::MAX).step_by(if cfg!(miri) { 97 } else { 1 }) {
            let want = f16::from_bits(bits).to_f32();
            assert_eq!(widen_f16_bits(bits).to_bits(), want.to_bits(), "{bits:#06x}");
        }
    }

    /// F16C's widening (the AVX2 f16 kernels' where the CPU has it) gives
    /// `half`'s value for every half; skipped where the CPU lacks F16C.
    #[test]
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    fn f16c_widening_equals_half_for_every_value() {
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let Some(halves) = avx2::as_f16c(&all) else { return };
        for (i, block) in halves.as_chunks::<LANES>().0.iter().enumerate() {
            for (j, got) in avx2::F16c::widen(block).iter().enumerate() {
                let want = all[i * LANES + j].to_f32();
                assert_eq!(got.to_bits(), want.to_bits(), "{:#06x}", i * LANES + j);
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert!(Linear::new(&[0.0f32; 5], None, 2, 3).is_err());
        assert!(Linear::new(&[0.0f32; 6], Some(&[0.0]), 2, 3).is_err());
        assert!(Linear::<f32>::new(&[], None, 0, 3).is_err());
        assert_eq!(Linear::new(&[0.0f32; 6], None, usize::MAX, 2).unwrap_err(), Error::Overflow);
    }

    #[test]
    fn activations_at_known_points() {
        assert_eq!(Activation::Relu.eval(-1.0), 0.0);
        assert!((Activation::Silu.eval(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((Activation::Gelu.eval(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((Activation::GeluTanh.eval(1.0) - 0.841_192).abs() < 1e-5);
    }
}
