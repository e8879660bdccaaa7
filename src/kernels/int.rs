//! int8 (8x8) and Q15 (16x8) kernels, bit-exact with TFLM's reference
//! `FullyConnected` for per-channel quantized weights.

use crate::error::{Error, Result, What, check_len, mul};
use crate::quant::{IntAct, Multiplier, WIDE_MAX_SHIFT, requantize, requantize_wide};

/// `y = requant(W (x - zx) + b) + zy`, int8: `i32` accumulator and bias,
/// per-row `(multipliers[o], shifts[o])` applied with [`requantize`], result
/// clamped to `[-128, 127]`. `input_offset` is `-zx`. Missing bias entries
/// count as 0; it never panics. Accumulation wraps like CMSIS-NN on Arm.
/// The Arm DSP path on `thumbv7em`, else [`reference::matvec_i8`]; the
/// same bits either way.
// w: (out, in) @ x: (in,) -> y: (out,)
#[allow(clippy::too_many_arguments)]
pub fn matvec_i8(
    w: &[i8],
    bias: Option<&[i32]>,
    multipliers: &[i32],
    shifts: &[i32],
    x: &[i8],
    input_offset: i32,
    output_zp: i32,
    y: &mut [i8],
) {
    #[cfg(micromoe_dsp)]
    if super::arm::matvec_i8(w, bias, multipliers, shifts, x, input_offset, output_zp, y).is_some() {
        return;
    }
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::matvec_i8(w, bias, multipliers, shifts, x, input_offset, output_zp, y) {
        return;
    }
    reference::matvec_i8(w, bias, multipliers, shifts, x, input_offset, output_zp, y)
}

/// `y = requant(W x + b)`, Q15 (16x8): `i16` activations with zero point 0,
/// int8 weights, `i64` accumulator and bias, per-row scaling with
/// [`requantize_wide`], result clamped to `i16`. Never panics. The Arm DSP
/// path on `thumbv7em`, else [`reference::matvec_q15`]; the same bits.
// w: (out, in) @ x: (in,) -> y: (out,)
pub fn matvec_q15(
    w: &[i8],
    bias: Option<&[i64]>,
    multipliers: &[i32],
    shifts: &[i32],
    x: &[i16],
    y: &mut [i16],
) {
    #[cfg(micromoe_dsp)]
    if super::arm::matvec_q15(w, bias, multipliers, shifts, x, y).is_some() {
        return;
    }
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::matvec_q15(w, bias, multipliers, shifts, x, y) {
        return;
    }
    reference::matvec_q15(w, bias, multipliers, shifts, x, y)
}

/// Words (`u32`) of work buffer the int8 and Q15 kernels use for an input of
/// `cols` values ([`QLinear::forward_in`]): the Arm DSP path expands each
/// group of four inputs into two words of 16-bit pairs. The same on every
/// target, so scratch sizes are; other targets leave the buffer unused.
pub const fn expand_words(cols: usize) -> usize {
    cols / 4 * 2
}

/// Calls `f(sum (x + offset) * w_row)` (wrapping `i32`) for every row of
/// `w` (`(rows, x.len())` row-major) in order: the raw int8 dot products,
/// for kernels with their own scaling (e.g. the decoder's int8 matrices).
/// Four rows per pass on the DSP path; the same sums everywhere.
pub fn for_each_dot_i8(w: &[i8], x: &[i8], offset: i32, f: impl FnMut(i32)) {
    each_dot_i8(w, x, offset, f)
}

#[cfg(feature = "std")]
mod batch;
#[cfg(feature = "std")]
pub use batch::for_each_dot_i8_batch;

#[inline(always)]
#[cfg_attr(micromoe_dsp, allow(unused_mut))]
fn each_dot_i8(w: &[i8], x: &[i8], offset: i32, mut f: impl FnMut(i32)) {
    #[cfg(micromoe_dsp)]
    super::arm::each_dot_i8(w, x, offset, f);
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::each_dot_i8(w, x, offset, &mut f) {
        return;
    }
    #[cfg(not(micromoe_dsp))]
    for row in w.chunks_exact(x.len().max(1)) {
        f(dot_i8(row, x, offset));
    }
}

/// Group-scaled int8 products (the decoders' `--group` matrices, as
/// llama.cpp's `Q8_0` blocks): for every row `r` of `w` (`(y.len(), cols)`
/// row-major) and every group `g` of `group` columns that `x` covers (`x` is
/// columns `c0..c0 + x.len()`, quantized per group with scales `sx`),
/// in order of `g`,
/// `y[r] += (sum w[r, c] * x[c] over the group) as f32 * (sw[r, g] * sx[g])`,
/// `sw` being `(rows, cols / group)` row-major. The integer sums are exact;
/// the float steps are one multiply, one multiply, one add (no FMA) in
/// group order, so every target gives the same bits: the DSP path on
/// Cortex-M4/M7, AVX2 on x86-64 hosts, the portable loop elsewhere. Lengths
/// that disagree (`group` 0 or not dividing `cols`, `c0` or `x.len()`, a
/// short `w`, `sw` or `sx`) leave `y` as it is; never panics.
// w: (rows, cols) @ x: (cols,) -> y: (rows,), columns c0..c0 + x.len()
pub fn add_group_dots_i8(
    w: &[i8],
    cols: usize,
    c0: usize,
    x: &[i8],
    group: usize,
    (sw, sx): (&[f32], &[f32]),
    y: &mut [f32],
) {
    let Some(g) = GroupShape::new(w.len(), cols, c0, x.len(), group, (sw.len(), sx.len()), y.len()) else {
        return;
    };
    #[cfg(micromoe_dsp)]
    if super::arm::add_group_dots_i8(w, g, x, (sw, sx), y) {
        return;
    }
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::add_group_dots_i8(w, g, x, (sw, sx), y) {
        return;
    }
    group_rows(w, g, x, (sw, sx), y, 0);
}

/// A group-scaled product's checked lengths ([`add_group_dots_i8`]).
#[derive(Clone, Copy)]
pub(super) struct GroupShape {
    /// Row length of `w`.
    pub cols: usize,
    /// First column `x` covers (a multiple of `group`).
    pub c0: usize,
    /// Columns a group (non-zero, divides `cols`).
    pub group: usize,
    /// Groups a row (`cols / group`: the row stride of `sw`).
    pub per_row: usize,
    /// First group `x` covers.
    pub g0: usize,
    /// Groups `x` covers.
    pub n: usize,
}

impl GroupShape {
    #[allow(clippy::too_many_arguments)]
    fn new(
        w: usize,
        cols: usize,
        c0: usize,
        x: usize,
        group: usize,
        (sw, sx): (usize, usize),
        rows: usize,
    ) -> Option<Self> {
        if group == 0 || !cols.is_multiple_of(group) || !c0.is_multiple_of(group) || !x.is_multiple_of(group)
        {
            return None;
        }
        let (per_row, g0, n) = (cols / group, c0 / group, x / group);
        let fits = c0.checked_add(x)? <= cols
            && rows.checked_mul(cols)? <= w
            && rows.checked_mul(per_row)? <= sw
            && n <= sx;
        fits.then_some(GroupShape { cols, c0, group, per_row, g0, n })
    }
}

/// [`add_group_dots_i8`]'s portable loop over rows `first..` (the fast
/// paths' remainder rows): one row at a time, its groups in order.
#[inline(always)]
pub(super) fn group_rows(
    w: &[i8],
    g: GroupShape,
    x: &[i8],
    (sw, sx): (&[f32], &[f32]),
    y: &mut [f32],
    first: usize,
) {
    // Indexed rather than zipped: an outlined `Zip::new` of `ChunksExact`s
    // keeps a division-by-zero path (boards/panic-free). `GroupShape`
    // checked that no index below overflows.
    let group = g.group.max(1);
    for (r, yo) in y.iter_mut().enumerate().skip(first) {
        let (at, st) = (r * g.cols + g.c0, r * g.per_row + g.g0);
        let (Some(row), Some(s)) = (w.get(at..at + x.len()), sw.get(st..st + g.n)) else {
            break;
        };
        let mut acc = *yo;
        for (i, (&s, &t)) in s.iter().zip(sx).enumerate() {
            let span = i * group..(i + 1) * group;
            let (Some(wg), Some(xg)) = (row.get(span.clone()), x.get(span)) else {
                break;
            };
            acc += dot_i8(wg, xg, 0) as f32 * (s * t);
        }
        *yo = acc;
    }
}

/// Calls `f(sum x * w_row)` (exact `i64`) for every row of `w` in order.
#[inline(always)]
#[cfg_attr(micromoe_dsp, allow(unused_mut))]
fn each_dot_q15(w: &[i8], x: &[i16], mut f: impl FnMut(i64)) {
    #[cfg(micromoe_dsp)]
    super::arm::each_dot_q15(w, x, f);
    #[cfg(not(micromoe_dsp))]
    for row in w.chunks_exact(x.len().max(1)) {
        f(dot_q15(row, x));
    }
}

/// The portable integer kernels compiled for AVX2 (x86-64 hosts, chosen at
/// run time); integer sums are exact in any order, so the results are the same.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[allow(unsafe_code)]
mod avx2 {

    /// [`matvec_i8`](super::matvec_i8) for AVX2; false on a CPU without it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn matvec_i8(
        w: &[i8],
        bias: Option<&[i32]>,
        m: &[i32],
        s: &[i32],
        x: &[i8],
        off: i32,
        zp: i32,
        y: &mut [i8],
    ) -> bool {
        if !std::is_x86_feature_detected!("avx2") {
            return false;
        }
        // SAFETY: the CPU has AVX2, the only feature the function enables.
        unsafe { matvec_i8_avx2(w, bias, m, s, x, off, zp, y) };
        true
    }

    /// [`matvec_q15`](super::matvec_q15) for AVX2, as [`matvec_i8`].
    pub(super) fn matvec_q15(
        w: &[i8],
        bias: Option<&[i64]>,
        m: &[i32],
        s: &[i32],
        x: &[i16],
        y: &mut [i16],
    ) -> bool {
        if !std::is_x86_feature_detected!("avx2") {
            return false;
        }
        // SAFETY: as in `matvec_i8`.
        unsafe { matvec_q15_avx2(w, bias, m, s, x, y) };
        true
    }

    /// [`each_dot_i8`](super::each_dot_i8) for AVX2; false (nothing done)
    /// on a CPU without it or for inputs wider than its buffer.
    pub(super) fn each_dot_i8(w: &[i8], x: &[i8], offset: i32, f: &mut impl FnMut(i32)) -> bool {
        // AVX-VNNI where the CPU has it (offset 0: the decoders' products).
        if offset == 0
            && x.len() >= 32
            && std::is_x86_feature_detected!("avxvnni")
            && std::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU has AVX2 and AVX-VNNI, the features enabled.
            unsafe { dots_vnni(w, x, f) };
            return true;
        }
        // AVX-512 VNNI without AVX-VNNI (AMD Zen 4): 512-bit steps.
        if offset == 0
            && x.len() >= 64
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU has every feature `dots_vnni512` enables.
            unsafe { dots_vnni512(w, x, f) };
            return true;
        }
        if x.len() > WIDENED
            || !(-32_000..=32_000).contains(&offset)
            || !std::is_x86_feature_detected!("avx2")
        {
            return false;
        }
        // SAFETY: as in `matvec_i8`.
        unsafe { each_dot_i8_avx2(w, x, offset, f) };
        true
    }

    /// Eight or four rows a pass, 32 columns a step: `vpdpbusd` of
    /// `w + 128` (`w ^ 0x80` as u8) and `x`, four products a lane summed
    /// into i32, then `128 * sum x` (once per call) taken off: `sum (w +
    /// 128) x = sum w x + 128 sum x`, exact in wrapping i32 for every i8
    /// weight and input, so the sums are [`dots4`]'s. Two instructions a
    /// step and row; the `|w|`, `x * sign(w)` form took three and needed
    /// inputs above -128 (decode at width 512: 353-392 -> 389-405 tokens/s
    /// on a Xeon with AVX-512 and AVX-VNNI). The last columns one by one.
    #[target_feature(enable = "avx2,avxvnni")]
    fn dots_vnni(w: &[i8], x: &[i8], f: &mut impl FnMut(i32)) {
        use core::arch::x86_64::{_mm256_dpbusd_avx_epi32, _mm256_set1_epi8, _mm256_xor_si256};
        let cols = x.len().max(1);
        let (xb, xt) = x.as_chunks::<32>();
        let bias = _mm256_set1_epi8(i8::MIN);
        let step = |acc: __m256i, w: &[i8; 32], xv: __m256i| {
            let wv: __m256i = bytemuck::cast(*w);
            _mm256_dpbusd_avx_epi32(acc, _mm256_xor_si256(wv, bias), xv)
        };
        // 128 * the sum of the stepped columns of x, wrapping.
        let off = xb.as_flattened().iter().fold(0i32, |s, &v| s.wrapping_add(i32::from(v))).wrapping_mul(128);
        let sum = |acc: __m256i, row: &[i8]| {
            let lanes: [i32; 8] = bytemuck::cast(acc);
            let s = lanes.iter().fold(0i32, |s, &v| s.wrapping_add(v)).wrapping_sub(off);
            let tail = row.get(xb.len() * 32..).unwrap_or(&[]);
            tail.iter().zip(xt).fold(s, |s, (&a, &v)| s.wrapping_add(i32::from(a) * i32::from(v)))
        };
        // Eight rows a pass for matrices streamed from memory (more loads
        // in flight: decode at width 512 347-359 -> 407-443 tokens/s), four
        // for cache-resident ones such as a prefill's 64 KB row blocks
        // (fewer registers: 64-token prompts 1,243-1,311 -> 1,464-1,481).
        let per = if cols >= 128 && w.len() > 64 << 10 { 8 } else { 4 };
        let mut quads = w.chunks_exact(per * cols);
        for q in &mut quads {
            let mut it = q.chunks_exact(cols);
            let rows: [&[i8]; 8] = core::array::from_fn(|_| it.next().unwrap_or(&[]));
            let c: [&[[i8; 32]]; 8] = rows.map(|r| r.as_chunks::<32>().0);
            let mut acc = [zero(); 8];
            for (k, xc) in xb.iter().enumerate() {
                let xv: __m256i = bytemuck::cast(*xc);
                for (a, (c, row)) in acc.iter_mut().zip(c.iter().zip(rows)).take(per) {
                    if per == 8 {
                        // The next pass's row, as the float products do.
                        crate::kernels::float::prefetch(row.as_ptr().wrapping_add(8 * cols + 32 * k));
                    }
                    if let Some(wc) = c.get(k) {
                        *a = step(*a, wc, xv);
                    }
                }
            }
            for (a, row) in acc.into_iter().zip(rows).take(per) {
                f(sum(a, row));
            }
        }
        for row in quads.remainder().chunks_exact(cols) {
            let mut acc = zero();
            for (xc, wc) in xb.iter().zip(row.as_chunks::<32>().0) {
                acc = step(acc, wc, bytemuck::cast(*xc));
            }
            f(sum(acc, row));
        }
    }

    /// [`dots_vnni`] in 512-bit steps, for CPUs with AVX-512 VNNI but
    /// not the VEX-coded AVX-VNNI (AMD Zen 4): 64 columns a step, eight
    /// rows a pass, `vpdpbusd` of `w ^ 0x80` and `x` less `128 * sum x`,
    /// the same wrapping sums. The remaining rows one by one, the last
    /// columns one by one. Matrices past 64 KB (decode's, streamed from
    /// memory) prefetch each row's line whole passes ahead, at least 16 KB
    /// on: one pass ahead, as [`dots_vnni`] does, kept too few lines in
    /// flight on the Zen 4 (kernel at 32000 x 512: 13.3 GB/s one pass
    /// ahead, 17.7-18.6 four; 1792 x 512: 15.1 -> 18.9-20.8, against a
    /// plain read's 21). Decode at width 512: 206 -> 474 tokens/s on one
    /// Zen 4 core over the 256-bit `vpmaddwd` rows it took before.
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
    fn dots_vnni512(w: &[i8], x: &[i8], f: &mut impl FnMut(i32)) {
        use core::arch::x86_64::{
            __m512i, _mm256_add_epi32, _mm512_castsi512_si256, _mm512_dpbusd_epi32,
            _mm512_extracti64x4_epi64, _mm512_set1_epi8, _mm512_setzero_si512, _mm512_xor_si512,
        };
        let cols = x.len().max(1);
        let (xb, xt) = x.as_chunks::<64>();
        let bias = _mm512_set1_epi8(i8::MIN);
        let step = |acc: __m512i, w: &[i8; 64], xv: __m512i| {
            let wv: __m512i = bytemuck::cast(*w);
            _mm512_dpbusd_epi32(acc, _mm512_xor_si512(wv, bias), xv)
        };
        // 128 * the sum of the stepped columns of x, wrapping.
        let off = xb.as_flattened().iter().fold(0i32, |s, &v| s.wrapping_add(i32::from(v))).wrapping_mul(128);
        let tail = |s: i32, row: &[i8]| {
            let t = row.get(xb.len() * 64..).unwrap_or(&[]);
            t.iter()
                .zip(xt)
                .fold(s.wrapping_sub(off), |s, (&a, &v)| s.wrapping_add(i32::from(a) * i32::from(v)))
        };
        // The two 256-bit halves added (wrapping, so any order).
        let half =
            |a: __m512i| _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64::<1>(a));
        // Bytes ahead: whole eight-row passes, at least 16 KB.
        let ahead = (w.len() > 64 << 10).then(|| (16384 / (8 * cols)).max(1) * 8 * cols);
        let mut passes = w.chunks_exact(8 * cols);
        for pass in &mut passes {
            let mut it = pass.chunks_exact(cols);
            let rows: [&[i8]; 8] = core::array::from_fn(|_| it.next().unwrap_or(&[]));
            let c: [&[[i8; 64]]; 8] = rows.map(|r| r.as_chunks::<64>().0);
            let mut acc = [_mm512_setzero_si512(); 8];
            for (k, xc) in xb.iter().enumerate() {
                let xv: __m512i = bytemuck::cast(*xc);
                for (a, (c, row)) in acc.iter_mut().zip(c.iter().zip(rows)) {
                    if let Some(d) = ahead {
                        crate::kernels::float::prefetch(row.as_ptr().wrapping_add(d + 64 * k));
                    }
                    if let Some(wc) = c.get(k) {
                        *a = step(*a, wc, xv);
                    }
                }
            }
            let lanes: [i32; 8] = bytemuck::cast(sums8(acc.map(half)));
            for (s, row) in lanes.into_iter().zip(rows) {
                f(tail(s, row));
            }
        }
        for row in passes.remainder().chunks_exact(cols) {
            let mut acc = _mm512_setzero_si512();
            for (xc, wc) in xb.iter().zip(row.as_chunks::<64>().0) {
                acc = step(acc, wc, bytemuck::cast(*xc));
            }
            let lanes: [i32; 8] = bytemuck::cast(half(acc));
            f(tail(lanes.iter().fold(0i32, |s, &v| s.wrapping_add(v)), row));
        }
    }

    /// Inputs widened once per call, on the stack.
    const WIDENED: usize = 4096;

    /// The input plus its offset as i16 (|x + offset| <= 32,128), then four
    /// rows per pass of i16 x i16 products summed in i32 — the shape LLVM
    /// turns into `vpmaddwd`. Wrapping i32 sums are the same in any order.
    #[target_feature(enable = "avx2")]
    fn each_dot_i8_avx2(w: &[i8], x: &[i8], offset: i32, f: &mut impl FnMut(i32)) {
        // A small buffer for small inputs: zeroing 8 KB per call showed.
        if x.len() <= 256 {
            dots_widened::<256>(w, x, offset, f)
        } else {
            dots_widened::<WIDENED>(w, x, offset, f)
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn dots_widened<const N: usize>(w: &[i8], x: &[i8], offset: i32, f: &mut impl FnMut(i32)) {
        let cols = x.len();
        let mut buf = [0i16; N];
        let xw = &mut buf[..cols];
        for (o, &v) in xw.iter_mut().zip(x) {
            *o = (i32::from(v) + offset) as i16;
        }
        let xw = &*xw;
        if cols == 0 {
            w.chunks_exact(1).for_each(|_| f(0));
            return;
        }
        // Eight rows a pass keep more loads in flight (decoder matrices
        // streamed from memory: 168 -> 282 tokens/s at width 512); short
        // rows keep four (64 x 64: 13 instead of 17 G products/s).
        let rest = if cols >= 128 {
            // Matrices past 64 KB (streamed: decode's) prefetch the next
            // pass's rows, as the AVX-VNNI passes do.
            let ahead = w.len() > 64 << 10;
            let mut octs = w.chunks_exact(8 * cols);
            for q in &mut octs {
                let mut rows = q.chunks_exact(cols);
                let rows: [&[i8]; 8] = core::array::from_fn(|_| rows.next().unwrap_or(&[]));
                let out = if ahead { dots8::<true>(rows, xw) } else { dots8::<false>(rows, xw) };
                out.into_iter().for_each(&mut *f);
            }
            octs.remainder()
        } else {
            w
        };
        let mut quads = rest.chunks_exact(4 * cols);
        for q in &mut quads {
            let (r0, q) = q.split_at(cols);
            let (r1, q) = q.split_at(cols);
            let (r2, r3) = q.split_at(cols);
            dots4([r0, r1, r2, r3], xw).into_iter().for_each(&mut *f);
        }
        for row in quads.remainder().chunks_exact(cols) {
            f(dot1(row, xw));
        }
    }

    /// Four rows' sums of `w * xw` (wrapping `i32`; each row as long as
    /// `xw`), sixteen columns per step: the weights sign-extended to i16
    /// (`vpmovsxbw`) and multiplied by the widened input in pairs summed to
    /// i32 (`vpmaddwd`, exact: |w| <= 128 and |xw| <= 32,128, so a pair is
    /// below 2^24), then the last columns one by one. Integer sums, so the
    /// same value as any order (LLVM's own loop took `vpmovsxbd` +
    /// `vpmulld`: eight products an instruction, and a slow multiply).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dots4(rows: [&[i8]; 4], xw: &[i16]) -> [i32; 4] {
        let (xb, xt) = xw.as_chunks::<16>();
        let [w0, w1, w2, w3] = rows.map(|r| r.as_chunks::<16>().0);
        let mut acc = [zero(); 4];
        for ((((x, a), b), c), d) in xb.iter().zip(w0).zip(w1).zip(w2).zip(w3) {
            let x = bytemuck::cast(*x);
            acc =
                [mul_add(acc[0], a, x), mul_add(acc[1], b, x), mul_add(acc[2], c, x), mul_add(acc[3], d, x)];
        }
        core::array::from_fn(|r| finish(acc[r], rows[r], xb.len() * 16, xt))
    }

    /// [`dots4`] for eight rows (more loads in flight from streamed
    /// weights); with `AHEAD` each row's cache line eight rows on (the next
    /// pass's, when the rows are consecutive ones of a matrix) is
    /// prefetched as its line here is begun.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dots8<const AHEAD: bool>(rows: [&[i8]; 8], xw: &[i16]) -> [i32; 8] {
        let (xb, xt) = xw.as_chunks::<16>();
        let n = rows.iter().map(|r| r.len() / 16).fold(xb.len(), usize::min);
        let w: [&[[i8; 16]]; 8] = rows.map(|r| r.as_chunks::<16>().0.get(..n).unwrap_or(&[]));
        let [w0, w1, w2, w3, w4, w5, w6, w7] = w;
        let (mut a0, mut a1, mut a2, mut a3) = (zero(), zero(), zero(), zero());
        let (mut a4, mut a5, mut a6, mut a7) = (zero(), zero(), zero(), zero());
        for (k, x) in xb.iter().take(n).enumerate() {
            let x = bytemuck::cast(*x);
            let (Some(b0), Some(b1), Some(b2), Some(b3)) = (w0.get(k), w1.get(k), w2.get(k), w3.get(k))
            else {
                break;
            };
            let (Some(b4), Some(b5), Some(b6), Some(b7)) = (w4.get(k), w5.get(k), w6.get(k), w7.get(k))
            else {
                break;
            };
            if AHEAD && k % 4 == 0 {
                // Four sixteen-byte steps a 64-byte line.
                for r in rows {
                    crate::kernels::float::prefetch(r.as_ptr().wrapping_add(8 * r.len() + 16 * k));
                }
            }
            a0 = mul_add(a0, b0, x);
            a1 = mul_add(a1, b1, x);
            a2 = mul_add(a2, b2, x);
            a3 = mul_add(a3, b3, x);
            a4 = mul_add(a4, b4, x);
            a5 = mul_add(a5, b5, x);
            a6 = mul_add(a6, b6, x);
            a7 = mul_add(a7, b7, x);
        }
        let acc = [a0, a1, a2, a3, a4, a5, a6, a7];
        core::array::from_fn(|r| finish(acc[r], rows[r], n * 16, xw.get(n * 16..).unwrap_or(xt)))
    }

    /// [`dots4`] for one row.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn dot1(row: &[i8], xw: &[i16]) -> i32 {
        let (xb, xt) = xw.as_chunks::<16>();
        let mut acc = zero();
        for (x, w) in xb.iter().zip(row.as_chunks::<16>().0) {
            acc = mul_add(acc, w, bytemuck::cast(*x));
        }
        finish(acc, row, xb.len() * 16, xt)
    }

    /// [`add_group_dots_i8`](super::add_group_dots_i8) for AVX2; false
    /// (nothing done) on a CPU without it, for groups not a multiple of 16,
    /// or for inputs wider than its buffer.
    pub(super) fn add_group_dots_i8(
        w: &[i8],
        g: super::GroupShape,
        x: &[i8],
        s: (&[f32], &[f32]),
        y: &mut [f32],
    ) -> bool {
        if !g.group.is_multiple_of(16) || x.len() > WIDENED || !std::is_x86_feature_detected!("avx2") {
            return false;
        }
        // AVX-512 VNNI: groups of 32 or whole 64-column steps.
        if x.len().is_multiple_of(64)
            && (g.group == 32 || g.group.is_multiple_of(64))
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512f")
        {
            // SAFETY: the CPU has every feature `group_vnni512` enables.
            unsafe { group_vnni512(w, g, x, s, y) };
            return true;
        }
        // SAFETY: as in `matvec_i8`.
        unsafe { group_dots_avx2(w, g, x, s, y) };
        true
    }

    #[target_feature(enable = "avx2")]
    fn group_dots_avx2(w: &[i8], g: super::GroupShape, x: &[i8], s: (&[f32], &[f32]), y: &mut [f32]) {
        if x.len() <= 256 {
            group_widened::<256>(w, g, x, s, y)
        } else {
            group_widened::<WIDENED>(w, g, x, s, y)
        }
    }

    /// Eight rows a pass; per group the rows' sixteen-column steps as in
    /// [`dots8`], the eight sums reduced side by side ([`sums8`]), then in
    /// each row's lane `acc + sum * (sw * sx)`: the portable loop's steps,
    /// so its bits. The remaining rows by the portable loop. Matrices past
    /// 64 KB prefetch whole passes ahead (one hint a row a group): decode
    /// had waited on its loads (decode_bench `--type i8g32`, one Zen 4
    /// thread: 100 -> 258-266 tokens/s at width 512, 50 -> 83-85 at 1024).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn group_widened<const N: usize>(
        w: &[i8],
        g: super::GroupShape,
        x: &[i8],
        (sw, sx): (&[f32], &[f32]),
        y: &mut [f32],
    ) {
        let mut buf = [0i16; N];
        let xw = &mut buf[..x.len().min(N)];
        for (o, &v) in xw.iter_mut().zip(x) {
            *o = i16::from(v);
        }
        let xc = xw.as_chunks::<16>().0;
        let (per, len) = (g.group / 16, x.len());
        // Matrices past 64 KB (decode's, streamed from memory) prefetch
        // each row's group whole passes ahead, at least 16 KB on.
        let ahead = (w.len() > 64 << 10).then(|| (16384 / (8 * g.cols.max(1))).max(1) * 8 * g.cols);
        let mut done = 0;
        let blocks = w
            .chunks_exact(8 * g.cols.max(1))
            .zip(sw.chunks_exact(8 * g.per_row.max(1)))
            .zip(y.chunks_exact_mut(8));
        for ((wb, sb), yb) in blocks {
            let rows: [&[[i8; 16]]; 8] = core::array::from_fn(|r| {
                let at = r * g.cols + g.c0;
                wb.get(at..at + len).unwrap_or(&[]).as_chunks::<16>().0
            });
            let scales: [&[f32]; 8] = core::array::from_fn(|r| {
                let at = r * g.per_row + g.g0;
                sb.get(at..at + g.n).unwrap_or(&[])
            });
            let mut init = [0.0f32; 8];
            init.iter_mut().zip(&*yb).for_each(|(a, &v)| *a = v);
            let mut acc: __m256 = bytemuck::cast(init);
            let n = g.n.min(sx.len());
            acc = match per {
                1 => block_groups::<1>(rows, xc, scales, &sx[..n], acc, ahead),
                2 => block_groups::<2>(rows, xc, scales, &sx[..n], acc, ahead),
                4 => block_groups::<4>(rows, xc, scales, &sx[..n], acc, ahead),
                8 => block_groups::<8>(rows, xc, scales, &sx[..n], acc, ahead),
                _ => block_groups_any(rows, xc, scales, &sx[..n], per, acc),
            };
            let out: [f32; 8] = bytemuck::cast(acc);
            yb.iter_mut().zip(out).for_each(|(o, v)| *o = v);
            done += 8;
        }
        super::group_rows(w, g, x, (sw, sx), y, done);
    }

    /// [`group_widened`] in 512-bit `vpdpbusd` steps (AVX-512 VNNI: AMD
    /// Zen 4, Intel since Ice Lake), for groups of 32 or a multiple of 64
    /// columns and inputs of whole 64-column steps: eight rows a pass,
    /// each step `(w ^ 0x80) . x` (as [`dots_vnni512`]), so a group's sum
    /// is the lanes' less `128 * sum x` over the group, exact. Groups of
    /// 32: one step holds two, and one reduction ([`pair_sums`]) gives the
    /// eight rows' sums of both; wider groups sum their steps, then
    /// [`sums8`]. Then per group, in each row's lane, `acc + sum * (sw *
    /// sx)`: the portable loop's float steps, so its bits. The remaining
    /// rows by the portable loop. Prefetching as in [`group_widened`].
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
    fn group_vnni512(w: &[i8], g: super::GroupShape, x: &[i8], (sw, sx): (&[f32], &[f32]), y: &mut [f32]) {
        use core::arch::x86_64::{
            __m512, _mm256_add_ps, _mm256_castpd_ps, _mm256_cvtepi32_ps, _mm256_mul_ps, _mm256_set1_epi32,
            _mm256_set1_ps, _mm256_sub_epi32, _mm512_castps_pd, _mm512_castps512_ps256, _mm512_cvtepi32_ps,
            _mm512_extractf64x4_pd, _mm512_mul_ps, _mm512_setzero_si512, _mm512_sub_epi32,
        };
        let (len, group) = (x.len(), g.group.max(1));
        let xb = x.as_chunks::<64>().0;
        let n = g.n.min(sx.len());
        // 128 * each group's sum of x (wrapping), the correction for `w ^ 0x80`.
        let mut goff = [0i32; WIDENED / 32];
        for (o, xg) in goff.iter_mut().zip(x.chunks_exact(group)) {
            *o = xg.iter().fold(0i32, |s, &v| s.wrapping_add(i32::from(v))).wrapping_mul(128);
        }
        let ahead = (w.len() > 64 << 10).then(|| (16384 / (8 * g.cols.max(1))).max(1) * 8 * g.cols);
        let mut done = 0;
        let blocks = w
            .chunks_exact(8 * g.cols.max(1))
            .zip(sw.chunks_exact(8 * g.per_row.max(1)))
            .zip(y.chunks_exact_mut(8));
        for ((wb, sb), yb) in blocks {
            let rows: [&[[i8; 64]]; 8] = core::array::from_fn(|r| {
                let at = r * g.cols + g.c0;
                wb.get(at..at + len).unwrap_or(&[]).as_chunks::<64>().0
            });
            let scales: [&[f32]; 8] = core::array::from_fn(|r| {
                let at = r * g.per_row + g.g0;
                sb.get(at..at + n).unwrap_or(&[])
            });
            // Every row its whole window, or the block is the portable loop's.
            if rows.iter().any(|r| r.len() != xb.len()) || scales.iter().any(|s| s.len() != n) {
                break;
            }
            let mut init = [0.0f32; 8];
            init.iter_mut().zip(&*yb).for_each(|(a, &v)| *a = v);
            let mut acc = bytemuck::cast(init);
            if group == 32 {
                for k in 0..xb.len().min(n / 2) {
                    let mut a = [_mm512_setzero_si512(); 8];
                    vnni_step(&rows, xb, k, ahead, &mut a);
                    // [group 2k of rows 0-7 | group 2k + 1 of rows 0-7].
                    let (g0, g1) = (2 * k, 2 * k + 1);
                    let off: [i32; 16] = core::array::from_fn(|i| goff[if i < 8 { g0 } else { g1 }]);
                    let sums = _mm512_sub_epi32(pair_sums(a), bytemuck::cast(off));
                    let s: [f32; 16] = core::array::from_fn(|i| {
                        let (r, gi) = if i < 8 { (i, g0) } else { (i - 8, g1) };
                        scales[r][gi] * sx[gi]
                    });
                    let p: __m512 = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), bytemuck::cast(s));
                    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(p));
                    acc = _mm256_add_ps(
                        acc,
                        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(p))),
                    );
                }
            } else {
                let per = group / 64;
                for (gi, &t) in sx.iter().enumerate().take(n) {
                    let mut a = [_mm512_setzero_si512(); 8];
                    for k in gi * per..(gi + 1) * per {
                        vnni_step(&rows, xb, k, ahead, &mut a);
                    }
                    let sums = _mm256_sub_epi32(
                        sums8(core::array::from_fn(|i| half(a[i]))),
                        _mm256_set1_epi32(goff[gi]),
                    );
                    let s: [f32; 8] = core::array::from_fn(|r| scales[r][gi]);
                    let ts = _mm256_mul_ps(bytemuck::cast(s), _mm256_set1_ps(t));
                    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(sums), ts));
                }
            }
            let out: [f32; 8] = bytemuck::cast(acc);
            yb.iter_mut().zip(out).for_each(|(o, v)| *o = v);
            done += 8;
        }
        super::group_rows(w, g, x, (sw, sx), y, done);
    }

    /// Step `k` of eight rows against `xb`'s: `a[r] += (w ^ 0x80) . x` by
    /// 32-bit lanes, prefetching `ahead` bytes on where given.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
    fn vnni_step(
        rows: &[&[[i8; 64]]; 8],
        xb: &[[i8; 64]],
        k: usize,
        ahead: Option<usize>,
        a: &mut [core::arch::x86_64::__m512i; 8],
    ) {
        use core::arch::x86_64::{__m512i, _mm512_dpbusd_epi32, _mm512_set1_epi8, _mm512_xor_si512};
        let Some(x) = xb.get(k) else { return };
        let xv: __m512i = bytemuck::cast(*x);
        let bias = _mm512_set1_epi8(i8::MIN);
        for (a, row) in a.iter_mut().zip(rows) {
            if let Some(d) = ahead {
                crate::kernels::float::prefetch(row.as_ptr().cast::<i8>().wrapping_add(d + 64 * k));
            }
            if let Some(w) = row.get(k) {
                *a = _mm512_dpbusd_epi32(*a, _mm512_xor_si512(bytemuck::cast(*w), bias), xv);
            }
        }
    }

    /// The two 256-bit halves added (wrapping, so any order).
    #[inline]
    #[target_feature(enable = "avx2,avx512f")]
    fn half(a: core::arch::x86_64::__m512i) -> __m256i {
        use core::arch::x86_64::{_mm256_add_epi32, _mm512_castsi512_si256, _mm512_extracti64x4_epi64};
        _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64::<1>(a))
    }

    /// Eight rows' products of one 64-column step, each the lanes of two
    /// 32-column groups (lanes 0-7 and 8-15), reduced to
    /// `[group 0 of rows 0-7 | group 1 of rows 0-7]` (wrapping `i32`):
    /// rows paired by 32- then 64-bit interleaves, then the 128-bit
    /// quarters of one group added across.
    #[inline]
    #[target_feature(enable = "avx2,avx512f")]
    fn pair_sums(a: [core::arch::x86_64::__m512i; 8]) -> core::arch::x86_64::__m512i {
        use core::arch::x86_64::{
            __m512i, _mm512_add_epi32, _mm512_shuffle_i32x4, _mm512_unpackhi_epi32, _mm512_unpackhi_epi64,
            _mm512_unpacklo_epi32, _mm512_unpacklo_epi64,
        };
        // Per 128-bit quarter q of rows i, j: [i 0+2, j 0+2, i 1+3, j 1+3].
        let two = |i: __m512i, j: __m512i| {
            _mm512_add_epi32(_mm512_unpacklo_epi32(i, j), _mm512_unpackhi_epi32(i, j))
        };
        // Per quarter: the four rows' sums of its four lanes.
        let four = |p: __m512i, q: __m512i| {
            _mm512_add_epi32(_mm512_unpacklo_epi64(p, q), _mm512_unpackhi_epi64(p, q))
        };
        let r03 = four(two(a[0], a[1]), two(a[2], a[3]));
        let r47 = four(two(a[4], a[5]), two(a[6], a[7]));
        // Quarters 0, 1 are group 0's lanes, 2, 3 group 1's: [g0 r0-3, g1
        // r0-3, g0 r4-7, g1 r4-7], then in order.
        let lo = _mm512_shuffle_i32x4::<0x88>(r03, r47);
        let hi = _mm512_shuffle_i32x4::<0xDD>(r03, r47);
        let s = _mm512_add_epi32(lo, hi);
        _mm512_shuffle_i32x4::<0xD8>(s, s)
    }

    /// One block of eight rows over the groups of `sx` (`P` sixteen-column
    /// steps a group, known at compile time: the steps unrolled, one check
    /// a row a group): each group's eight sums, then `acc + sum * (sw * sx)`
    /// in each row's lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn block_groups<const P: usize>(
        rows: [&[[i8; 16]]; 8],
        xc: &[[i16; 16]],
        scales: [&[f32]; 8],
        sx: &[f32],
        mut acc: __m256,
        ahead: Option<usize>,
    ) -> __m256 {
        let mut rit = rows.map(|r| r.as_chunks::<P>().0.iter());
        let mut sit = scales.map(|s| s.iter());
        for (&t, xg) in sx.iter().zip(xc.as_chunks::<P>().0) {
            let w: [Option<&[[i8; 16]; P]>; 8] = core::array::from_fn(|r| rit[r].next());
            let [Some(w0), Some(w1), Some(w2), Some(w3), Some(w4), Some(w5), Some(w6), Some(w7)] = w else {
                break;
            };
            if let Some(d) = ahead {
                for w in [w0, w1, w2, w3, w4, w5, w6, w7] {
                    crate::kernels::float::prefetch(w.as_ptr().cast::<i8>().wrapping_add(d));
                }
            }
            let mut a = [zero(); 8];
            for (k, xv) in xg.iter().enumerate() {
                let xv = bytemuck::cast(*xv);
                a[0] = mul_add(a[0], &w0[k], xv);
                a[1] = mul_add(a[1], &w1[k], xv);
                a[2] = mul_add(a[2], &w2[k], xv);
                a[3] = mul_add(a[3], &w3[k], xv);
                a[4] = mul_add(a[4], &w4[k], xv);
                a[5] = mul_add(a[5], &w5[k], xv);
                a[6] = mul_add(a[6], &w6[k], xv);
                a[7] = mul_add(a[7], &w7[k], xv);
            }
            acc = scale_add(acc, a, &mut sit, t);
        }
        acc
    }

    /// [`block_groups`] for any number of steps a group.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn block_groups_any(
        rows: [&[[i8; 16]]; 8],
        xc: &[[i16; 16]],
        scales: [&[f32]; 8],
        sx: &[f32],
        per: usize,
        mut acc: __m256,
    ) -> __m256 {
        let mut rit = rows.map(|r| r.iter());
        let mut sit = scales.map(|s| s.iter());
        let mut xit = xc.iter();
        for &t in sx {
            let mut a = [zero(); 8];
            for xv in xit.by_ref().take(per) {
                let xv = bytemuck::cast(*xv);
                for (a, r) in a.iter_mut().zip(rit.iter_mut()) {
                    if let Some(b) = r.next() {
                        *a = mul_add(*a, b, xv);
                    }
                }
            }
            acc = scale_add(acc, a, &mut sit, t);
        }
        acc
    }

    /// `acc + sums(a) * (sw * t)` lane by lane, `sw` the next scale of each
    /// row: the portable loop's float steps.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn scale_add(acc: __m256, a: [__m256i; 8], sit: &mut [core::slice::Iter<'_, f32>; 8], t: f32) -> __m256 {
        use core::arch::x86_64::{
            _mm256_add_ps, _mm256_cvtepi32_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setr_ps,
        };
        let mut next = |r: usize| sit[r].next().copied().unwrap_or(0.0);
        let s = _mm256_setr_ps(next(0), next(1), next(2), next(3), next(4), next(5), next(6), next(7));
        let sums = _mm256_cvtepi32_ps(sums8(a));
        _mm256_add_ps(acc, _mm256_mul_ps(sums, _mm256_mul_ps(s, _mm256_set1_ps(t))))
    }

    /// Each of eight vectors' lanes added: lane `r` of the result is the
    /// sum of `a[r]` (wrapping `i32`, so any order is the same).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sums8(a: [__m256i; 8]) -> __m256i {
        use core::arch::x86_64::{_mm256_add_epi32, _mm256_hadd_epi32, _mm256_permute2x128_si256};
        let s01 = _mm256_hadd_epi32(a[0], a[1]);
        let s23 = _mm256_hadd_epi32(a[2], a[3]);
        let s45 = _mm256_hadd_epi32(a[4], a[5]);
        let s67 = _mm256_hadd_epi32(a[6], a[7]);
        // Per 128-bit half: rows 0-3 (t0) and 4-7 (t1), low and high lanes.
        let t0 = _mm256_hadd_epi32(s01, s23);
        let t1 = _mm256_hadd_epi32(s45, s67);
        let low = _mm256_permute2x128_si256::<0x20>(t0, t1);
        let high = _mm256_permute2x128_si256::<0x31>(t0, t1);
        _mm256_add_epi32(low, high)
    }

    use core::arch::x86_64::{__m256, __m256i};

    #[inline]
    #[target_feature(enable = "avx2")]
    fn zero() -> __m256i {
        core::arch::x86_64::_mm256_setzero_si256()
    }

    /// `acc + madd(sign-extended w, x)`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mul_add(acc: __m256i, w: &[i8; 16], x: __m256i) -> __m256i {
        use core::arch::x86_64::{_mm256_add_epi32, _mm256_cvtepi8_epi16, _mm256_madd_epi16};
        _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(bytemuck::cast(*w)), x))
    }

    /// The eight lanes added, then the columns from `tail` one by one.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn finish(acc: __m256i, row: &[i8], tail: usize, xt: &[i16]) -> i32 {
        let lanes: [i32; 8] = bytemuck::cast(acc);
        let sum = lanes.iter().fold(0i32, |s, &v| s.wrapping_add(v));
        let row = row.get(tail..).unwrap_or(&[]);
        row.iter().zip(xt).fold(sum, |s, (&a, &xv)| s.wrapping_add(i32::from(xv) * i32::from(a)))
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    fn matvec_i8_avx2(
        w: &[i8],
        bias: Option<&[i32]>,
        m: &[i32],
        s: &[i32],
        x: &[i8],
        off: i32,
        zp: i32,
        y: &mut [i8],
    ) {
        if x.is_empty() || x.len() > WIDENED || !(-32_000..=32_000).contains(&off) {
            return super::reference::matvec_i8(w, bias, m, s, x, off, zp, y);
        }
        let bias = bias.unwrap_or(&[]);
        let mut o = 0;
        let rows = y.len().min(m.len()).min(s.len());
        let w = w.get(..rows * x.len()).unwrap_or(w);
        each_dot_i8_avx2(w, x, off, &mut |acc: i32| {
            if o < rows {
                let acc = acc.wrapping_add(bias.get(o).copied().unwrap_or(0));
                y[o] = super::out_i8(acc, m[o], s[o], zp);
            }
            o += 1;
        });
    }

    #[target_feature(enable = "avx2")]
    fn matvec_q15_avx2(w: &[i8], bias: Option<&[i64]>, m: &[i32], s: &[i32], x: &[i16], y: &mut [i16]) {
        let cols = x.len();
        if cols == 0 {
            return super::reference::matvec_q15(w, bias, m, s, x, y);
        }
        let bias = bias.unwrap_or(&[]);
        let rows = y.len().min(m.len()).min(s.len()).min(w.len() / cols);
        let out = |o: usize, acc: i64, y: &mut [i16]| {
            let acc = acc.wrapping_add(bias.get(o).copied().unwrap_or(0));
            y[o] = super::out_q15(acc, m[o], s[o]);
        };
        let mut o = 0;
        for q in w[..rows * cols].chunks_exact(4 * cols) {
            let (r0, q) = q.split_at(cols);
            let (r1, q) = q.split_at(cols);
            let (r2, r3) = q.split_at(cols);
            // |x w| <= 2^22: blocks of 256 products cannot overflow i32,
            // so each block is summed in i32 (vpmaddwd) and added in i64.
            let mut acc = [0i64; 4];
            for ((((xb, a), b), c), d) in
                x.chunks(256).zip(r0.chunks(256)).zip(r1.chunks(256)).zip(r2.chunks(256)).zip(r3.chunks(256))
            {
                let mut part = [0i32; 4];
                for ((((&xv, &a), &b), &c), &d) in xb.iter().zip(a).zip(b).zip(c).zip(d) {
                    let xv = i32::from(xv);
                    part[0] += xv * i32::from(a);
                    part[1] += xv * i32::from(b);
                    part[2] += xv * i32::from(c);
                    part[3] += xv * i32::from(d);
                }
                for (a, p) in acc.iter_mut().zip(part) {
                    *a += i64::from(p);
                }
            }
            for acc in acc {
                out(o, acc, y);
                o += 1;
            }
        }
        for row in w[o * cols..rows * cols].chunks_exact(cols) {
            out(o, super::dot_q15(row, x), y);
            o += 1;
        }
    }
}

/// The portable kernels, one multiply-accumulate at a time: the reference
/// every fast path is checked against (on every target).
pub mod reference {
    use super::dot_q15;

    /// [`matvec_i8`](super::matvec_i8), portable.
    #[allow(clippy::too_many_arguments)]
    pub fn matvec_i8(
        w: &[i8],
        bias: Option<&[i32]>,
        multipliers: &[i32],
        shifts: &[i32],
        x: &[i8],
        input_offset: i32,
        output_zp: i32,
        y: &mut [i8],
    ) {
        let out = |acc, m, s| super::out_i8(acc, m, s, output_zp);
        super::rows_i8(w, bias, multipliers, shifts, x, input_offset, y, out);
    }

    /// [`add_group_dots_i8`](super::add_group_dots_i8), portable.
    pub fn add_group_dots_i8(
        w: &[i8],
        cols: usize,
        c0: usize,
        x: &[i8],
        group: usize,
        (sw, sx): (&[f32], &[f32]),
        y: &mut [f32],
    ) {
        if let Some(g) =
            super::GroupShape::new(w.len(), cols, c0, x.len(), group, (sw.len(), sx.len()), y.len())
        {
            super::group_rows(w, g, x, (sw, sx), y, 0);
        }
    }

    /// [`matvec_q15`](super::matvec_q15), portable.
    pub fn matvec_q15(
        w: &[i8],
        bias: Option<&[i64]>,
        multipliers: &[i32],
        shifts: &[i32],
        x: &[i16],
        y: &mut [i16],
    ) {
        let bias = bias.unwrap_or(&[]);
        let requant = multipliers.iter().zip(shifts);
        for (o, ((yo, row), (&m, &s))) in
            y.iter_mut().zip(w.chunks_exact(x.len().max(1))).zip(requant).enumerate()
        {
            let acc = dot_q15(row, x).wrapping_add(bias.get(o).copied().unwrap_or(0));
            *yo = super::out_q15(acc, m, s);
        }
    }
}

/// The portable int8 product's loop: each row's sum plus bias, through
/// `out(sum, multiplier, shift)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rows_i8(
    w: &[i8],
    bias: Option<&[i32]>,
    multipliers: &[i32],
    shifts: &[i32],
    x: &[i8],
    input_offset: i32,
    y: &mut [i8],
    out: impl Fn(i32, i32, i32) -> i8,
) {
    let bias = bias.unwrap_or(&[]);
    let requant = multipliers.iter().zip(shifts);
    for (o, ((yo, row), (&m, &s))) in
        y.iter_mut().zip(w.chunks_exact(x.len().max(1))).zip(requant).enumerate()
    {
        let acc = dot_i8(row, x, input_offset).wrapping_add(bias.get(o).copied().unwrap_or(0));
        *yo = out(acc, m, s);
    }
}

/// A checked `QLinear`'s int8 product off the DSP path: the host's AVX2
/// kernel where it runs, else the portable loop with the epilogue for
/// checked parameters (`requantize_valid`: the same bits, fewer
/// instructions on the Cortex-M0 and RISC-V).
#[cfg(not(micromoe_dsp))]
#[allow(clippy::too_many_arguments)]
fn matvec_i8_checked(
    w: &[i8],
    bias: Option<&[i32]>,
    multipliers: &[i32],
    shifts: &[i32],
    x: &[i8],
    input_offset: i32,
    output_zp: i32,
    y: &mut [i8],
) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    if avx2::matvec_i8(w, bias, multipliers, shifts, x, input_offset, output_zp, y) {
        return;
    }
    let out = |acc, m, s| i8::saturate(crate::quant::requantize_valid(acc, m, s).saturating_add(output_zp));
    rows_i8(w, bias, multipliers, shifts, x, input_offset, y, out);
}

/// An int8 output from its i32 sum (bias included): requantized, shifted
/// to the output zero point, saturated.
#[inline(always)]
fn out_i8(acc: i32, multiplier: i32, shift: i32, output_zp: i32) -> i8 {
    i8::saturate(requantize(acc, Multiplier { multiplier, shift }).saturating_add(output_zp))
}

/// A Q15 output from its exact i64 sum (bias included).
#[inline(always)]
fn out_q15(acc: i64, multiplier: i32, shift: i32) -> i16 {
    i16::saturate(requantize_wide(acc, Multiplier { multiplier, shift }))
}

#[cfg_attr(micromoe_dsp, allow(dead_code))]
#[inline(always)]
fn dot_i8(row: &[i8], x: &[i8], input_offset: i32) -> i32 {
    row.iter().zip(x).fold(0i32, |acc, (&wi, &xi)| acc.wrapping_add((xi as i32 + input_offset) * wi as i32))
}

#[cfg_attr(micromoe_dsp, allow(dead_code))]
#[inline(always)]
fn dot_q15(row: &[i8], x: &[i16]) -> i64 {
    row.iter().zip(x).fold(0i64, |acc, (&wi, &xi)| acc + (xi as i32 * wi as i32) as i64)
}

/// The integer kernels for an activation type: int8 (`i8`) or Q15 (`i16`).
pub trait IntKernel: IntAct {
    /// Bias element: `i32` for int8, `i64` for Q15.
    type Bias: Copy + Default + core::fmt::Debug + bytemuck::Pod;

    /// `round(v)` as a bias, saturated (conversion time only).
    fn bias_from_f64(v: f64) -> Self::Bias;

    /// `y = requant(W (x - zx) + b) + zy`, saturated to `Self`.
    fn matvec(lin: &QLinear<'_, Self>, x: &[Self], y: &mut [Self]);

    /// Like `matvec`, but the requantized values (scaled with
    /// [`requantize_wide`], plus the output zero point) are kept as `i32`,
    /// unsaturated: router logits in fixed point.
    fn matvec_wide(lin: &QLinear<'_, Self>, x: &[Self], y: &mut [i32]);

    /// `matvec` with `work` ([`expand_words`] of the input width) for the
    /// DSP path's expanded input, instead of a buffer on the stack.
    fn matvec_in(lin: &QLinear<'_, Self>, x: &[Self], y: &mut [Self], work: &mut [u32]);

    /// `matvec_wide` with `work`, as [`IntKernel::matvec_in`].
    fn matvec_wide_in(lin: &QLinear<'_, Self>, x: &[Self], y: &mut [i32], work: &mut [u32]);
}

impl IntKernel for i8 {
    type Bias = i32;

    fn bias_from_f64(v: f64) -> i32 {
        libm::round(v) as i32
    }

    fn matvec(lin: &QLinear<'_, i8>, x: &[i8], y: &mut [i8]) {
        let (w, b, m, s, off, zp) =
            (lin.w, lin.bias, lin.multipliers, lin.shifts, -lin.input_zp, lin.output_zp);
        #[cfg(micromoe_dsp)]
        matvec_i8(w, b, m, s, x, off, zp, y);
        #[cfg(not(micromoe_dsp))]
        matvec_i8_checked(w, b, m, s, x, off, zp, y);
    }

    fn matvec_wide(lin: &QLinear<'_, i8>, x: &[i8], y: &mut [i32]) {
        let x = x.get(..lin.cols).unwrap_or(x);
        each_dot_i8(lin.w, x, -lin.input_zp, wide_epilogue_i8(lin, y));
    }

    fn matvec_in(lin: &QLinear<'_, i8>, x: &[i8], y: &mut [i8], work: &mut [u32]) {
        let (w, b, m, s, off, zp) =
            (lin.w, lin.bias, lin.multipliers, lin.shifts, -lin.input_zp, lin.output_zp);
        #[cfg(micromoe_dsp)]
        if super::arm::matvec_i8_in(w, b, m, s, x, off, zp, y, super::arm::uninit(work)).is_none() {
            reference::matvec_i8(w, b, m, s, x, off, zp, y);
        }
        #[cfg(not(micromoe_dsp))]
        {
            let _ = work;
            matvec_i8_checked(w, b, m, s, x, off, zp, y);
        }
    }

    fn matvec_wide_in(lin: &QLinear<'_, i8>, x: &[i8], y: &mut [i32], work: &mut [u32]) {
        let x = x.get(..lin.cols).unwrap_or(x);
        #[cfg(micromoe_dsp)]
        super::arm::dots_i8_in(lin.w, x, -lin.input_zp, super::arm::uninit(work), wide_epilogue_i8(lin, y));
        #[cfg(not(micromoe_dsp))]
        {
            let _ = work;
            each_dot_i8(lin.w, x, -lin.input_zp, wide_epilogue_i8(lin, y));
        }
    }
}

/// The int8 `matvec_wide` epilogue: each row's sum plus bias (wrapping
/// `i32`, as the DSP sums), requantized with [`requantize_wide`] and offset
/// by the output zero point, unsaturated.
#[inline(always)]
fn wide_epilogue_i8<'y>(lin: &QLinear<'y, i8>, y: &'y mut [i32]) -> impl FnMut(i32) + 'y {
    let mut bias = lin.bias.unwrap_or(&[]).iter();
    let mut out = y.iter_mut().zip(lin.multipliers.iter().zip(lin.shifts));
    let zp = lin.output_zp;
    move |dot| {
        let Some((yo, (&multiplier, &shift))) = out.next() else { return };
        let acc = dot.wrapping_add(bias.next().copied().unwrap_or(0));
        *yo = requantize_wide(acc as i64, Multiplier { multiplier, shift }).saturating_add(zp);
    }
}

/// The Q15 `matvec_wide` epilogue, as [`wide_epilogue_i8`] with `i64` sums.
#[inline(always)]
fn wide_epilogue_q15<'y>(lin: &QLinear<'y, i16>, y: &'y mut [i32]) -> impl FnMut(i64) + 'y {
    let mut bias = lin.bias.unwrap_or(&[]).iter();
    let mut out = y.iter_mut().zip(lin.multipliers.iter().zip(lin.shifts));
    let zp = lin.output_zp;
    move |dot| {
        let Some((yo, (&multiplier, &shift))) = out.next() else { return };
        let acc = dot.wrapping_add(bias.next().copied().unwrap_or(0));
        *yo = requantize_wide(acc, Multiplier { multiplier, shift }).saturating_add(zp);
    }
}

impl IntKernel for i16 {
    type Bias = i64;

    fn bias_from_f64(v: f64) -> i64 {
        libm::round(v) as i64
    }

    fn matvec(lin: &QLinear<'_, i16>, x: &[i16], y: &mut [i16]) {
        matvec_q15(lin.w, lin.bias, lin.multipliers, lin.shifts, x, y)
    }

    fn matvec_wide(lin: &QLinear<'_, i16>, x: &[i16], y: &mut [i32]) {
        let x = x.get(..lin.cols).unwrap_or(x);
        each_dot_q15(lin.w, x, wide_epilogue_q15(lin, y));
    }

    fn matvec_in(lin: &QLinear<'_, i16>, x: &[i16], y: &mut [i16], work: &mut [u32]) {
        let (w, b, m, s) = (lin.w, lin.bias, lin.multipliers, lin.shifts);
        #[cfg(micromoe_dsp)]
        if super::arm::matvec_q15_in(w, b, m, s, x, y, super::arm::uninit(work)).is_none() {
            reference::matvec_q15(w, b, m, s, x, y);
        }
        #[cfg(not(micromoe_dsp))]
        {
            let _ = work;
            matvec_q15(w, b, m, s, x, y);
        }
    }

    fn matvec_wide_in(lin: &QLinear<'_, i16>, x: &[i16], y: &mut [i32], work: &mut [u32]) {
        let x = x.get(..lin.cols).unwrap_or(x);
        #[cfg(micromoe_dsp)]
        super::arm::each_dot_q15_in(lin.w, x, super::arm::uninit(work), wide_epilogue_q15(lin, y));
        #[cfg(not(micromoe_dsp))]
        {
            let _ = work;
            each_dot_q15(lin.w, x, wide_epilogue_q15(lin, y));
        }
    }
}

/// A borrowed quantized fully-connected layer: int8 weights, symmetric per
/// output channel; activations of type `A` (i8 or i16).
#[derive(Debug, Clone, Copy)]
pub struct QLinear<'a, A: IntKernel> {
    w: &'a [i8],
    bias: Option<&'a [A::Bias]>,
    multipliers: &'a [i32],
    shifts: &'a [i32],
    rows: usize,
    cols: usize,
    input_zp: i32,
    output_zp: i32,
}

impl<'a, A: IntKernel> QLinear<'a, A> {
    /// Checks every length, every `(multiplier, shift)` pair (valid, shift at
    /// most [`WIDE_MAX_SHIFT`]) and that the zero points fit `A` (and are 0
    /// on the Q15 path).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &'a [i8],
        bias: Option<&'a [A::Bias]>,
        multipliers: &'a [i32],
        shifts: &'a [i32],
        rows: usize,
        cols: usize,
        input_zp: i32,
        output_zp: i32,
    ) -> Result<Self> {
        let lin = Self::new_prevalidated(w, bias, multipliers, shifts, rows, cols, input_zp, output_zp)?;
        for (index, (&m, &s)) in multipliers.iter().zip(shifts).enumerate() {
            if Multiplier::new(m, s).is_err() || s > WIDE_MAX_SHIFT {
                return Err(Error::OutOfRange { what: What::Requant, index });
            }
        }
        Ok(lin)
    }

    /// [`QLinear::new`] without the per-row requantization check, for data
    /// that passed it before (a parsed model rebuilding its views): the
    /// lengths and zero points, O(1), are still checked. Out-of-range
    /// multipliers could only give wrong numbers, never a panic.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new_prevalidated(
        w: &'a [i8],
        bias: Option<&'a [A::Bias]>,
        multipliers: &'a [i32],
        shifts: &'a [i32],
        rows: usize,
        cols: usize,
        input_zp: i32,
        output_zp: i32,
    ) -> Result<Self> {
        if rows == 0 || cols == 0 {
            return Err(Error::Shape { what: What::Weight, expected: 1, actual: 0 });
        }
        check_len(What::Weight, mul(rows, cols)?, w.len())?;
        if let Some(b) = bias {
            check_len(What::Bias, rows, b.len())?;
        }
        check_len(What::Requant, rows, multipliers.len())?;
        check_len(What::Requant, rows, shifts.len())?;
        let zp_ok = |zp: i32| {
            if A::LUT_LEN == 256 { (A::MIN..=A::MAX).contains(&zp) } else { zp == 0 }
        };
        if !zp_ok(input_zp) || !zp_ok(output_zp) {
            return Err(Error::OutOfRange { what: What::ZeroPoint, index: 0 });
        }
        Ok(QLinear { w, bias, multipliers, shifts, rows, cols, input_zp, output_zp })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Zero point of the input.
    pub fn input_zp(&self) -> i32 {
        self.input_zp
    }

    /// Zero point of the output.
    pub fn output_zp(&self) -> i32 {
        self.output_zp
    }

    /// Per-row requantization.
    pub fn requant(&self) -> impl Iterator<Item = Multiplier> + 'a {
        self.multipliers.iter().zip(self.shifts).map(|(&multiplier, &shift)| Multiplier { multiplier, shift })
    }

    /// `y = requant(W (x - zx) + b) + zy`; `x`: `cols`, `y`: `rows` elements.
    #[inline]
    pub fn forward(&self, x: &[A], y: &mut [A]) {
        A::matvec(self, x, y)
    }

    /// The unsaturated `i32` variant (router logits).
    #[inline]
    pub fn forward_wide(&self, x: &[A], y: &mut [i32]) {
        A::matvec_wide(self, x, y)
    }

    /// [`QLinear::forward`] with `work` (at least [`expand_words`]`(cols)`
    /// words; a shorter one is correct, only slower) instead of a buffer on
    /// the stack: what layers running from a scratch buffer use.
    #[inline]
    pub fn forward_in(&self, x: &[A], y: &mut [A], work: &mut [u32]) {
        A::matvec_in(self, x, y, work)
    }

    /// [`QLinear::forward_wide`] with `work`, as [`QLinear::forward_in`].
    #[inline]
    pub fn forward_wide_in(&self, x: &[A], y: &mut [i32], work: &mut [u32]) {
        A::matvec_wide_in(self, x, y, work)
    }
}

/// Element-wise product of two quantized tensors, TFLM `MUL` semantics:
/// `out = requant((a - za) * (b - zb)) + zo`, saturated.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct MulParams {
    /// Zero point of `a`.
    pub a_zp: i32,
    /// Zero point of `b`.
    pub b_zp: i32,
    /// Zero point of the output.
    pub out_zp: i32,
    /// `scale_a * scale_b / scale_out`.
    pub multiplier: Multiplier,
}

impl MulParams {
    /// `a[i] = requant((a[i] - za) * (b[i] - zb)) + zo` over the common length.
    pub fn apply<A: IntAct>(&self, a: &mut [A], b: &[A]) {
        for (x, &y) in a.iter_mut().zip(b) {
            let p = (x.get() - self.a_zp).wrapping_mul(y.get() - self.b_zp);
            *x = A::saturate(requantize(p, self.multiplier).saturating_add(self.out_zp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qlinear_validates() {
        let w = [1i8; 6];
        let m = [1 << 30; 2];
        let s = [0; 2];
        assert!(QLinear::<i8>::new(&w, None, &m, &s, 2, 3, 0, 0).is_ok());
        assert!(QLinear::<i8>::new(&w, None, &m[..1], &s, 2, 3, 0, 0).is_err());
        assert!(QLinear::<i8>::new(&w, None, &[5, 5], &s, 2, 3, 0, 0).is_err());
        assert!(QLinear::<i8>::new(&w, None, &m, &[15, 0], 2, 3, 0, 0).is_err());
        assert!(QLinear::<i8>::new(&w, None, &m, &s, 2, 3, 200, 0).is_err());
        assert!(QLinear::<i16>::new(&w, None, &m, &s, 2, 3, 1, 0).is_err());
    }

    /// Group-scaled products: the dispatched path (AVX2 or AVX-512 VNNI
    /// where present) against the portable loop bit for bit, over row tails, group sizes,
    /// column windows and extremes; and against an exact model where
    /// power-of-two scales make every float step exact.
    #[test]
    fn group_dots_equal_the_reference_and_the_exact_model() {
        let mut next = lcg(11u64);
        let cases: &[(usize, usize, usize)] = if cfg!(miri) {
            &[(9, 32, 16), (3, 64, 32)]
        } else {
            &[
                (1, 16, 16),
                (7, 64, 16),
                (8, 32, 16),
                (16, 64, 16),
                (9, 128, 16),
                (8, 64, 32),
                (17, 96, 32),
                (33, 256, 64),
                (12, 192, 48),
                (9, 1024, 128),
                (5, 48, 12),
                // The 512-bit VNNI passes: groups of 32 and of 64, 128;
                // past 64 KB (prefetching); a partial last block.
                (17, 512, 32),
                (9, 1024, 32),
                (8, 512, 64),
                (11, 256, 128),
                (131, 1024, 32),
                (70, 1024, 64),
            ]
        };
        for &(rows, cols, group) in cases {
            let w: Vec<i8> =
                (0..rows * cols).map(|i| if i.is_multiple_of(97) { -128 } else { next() as i8 }).collect();
            let x: Vec<i8> =
                (0..cols).map(|i| if i.is_multiple_of(31) { -127 } else { next() as i8 }).collect();
            let per = cols / group;
            let sw: Vec<f32> = (0..rows * per).map(|_| (next() % 1000) as f32 / 7.0e4).collect();
            let sx: Vec<f32> = (0..per).map(|_| (next() % 1000) as f32 / 3.0e3).collect();
            // The whole row, then a window of its second half onto a nonzero start.
            let windows = [(0, cols), ((per / 2) * group, cols)];
            for (c0, c1) in windows {
                let (g0, g1) = (c0 / group, c1 / group);
                let init: Vec<f32> = (0..rows).map(|r| r as f32 * 0.25 - 1.0).collect();
                let (mut fast, mut slow) = (init.clone(), init.clone());
                add_group_dots_i8(&w, cols, c0, &x[c0..c1], group, (&sw, &sx[g0..g1]), &mut fast);
                reference::add_group_dots_i8(&w, cols, c0, &x[c0..c1], group, (&sw, &sx[g0..g1]), &mut slow);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&slow), "{rows}x{cols} group {group} from {c0}");
            }
            // Scales 2^-k: each group's term and every partial sum is exact in f32.
            let sw2: Vec<f32> = (0..rows * per).map(|i| 1.0 / (1 << (i % 5)) as f32).collect();
            let sx2: Vec<f32> = (0..per).map(|g| 1.0 / (1 << (g % 3)) as f32).collect();
            let mut y = vec![0.0f32; rows];
            add_group_dots_i8(&w, cols, 0, &x, group, (&sw2, &sx2), &mut y);
            for (r, &yr) in y.iter().enumerate() {
                let exact: f64 = (0..per)
                    .map(|g| {
                        let dot: i64 = (0..group)
                            .map(|c| w[r * cols + g * group + c] as i64 * x[g * group + c] as i64)
                            .sum();
                        dot as f64 * sw2[r * per + g] as f64 * sx2[g] as f64
                    })
                    .sum();
                assert_eq!(yr as f64, exact, "row {r} of {rows}x{cols}");
            }
        }
        // Lengths that disagree leave y alone.
        let mut y = [1.5f32; 2];
        add_group_dots_i8(&[1; 64], 32, 0, &[1; 32], 24, (&[1.0; 4], &[1.0; 2]), &mut y);
        add_group_dots_i8(&[1; 64], 32, 16, &[1; 32], 16, (&[1.0; 4], &[1.0; 2]), &mut y);
        add_group_dots_i8(&[1; 63], 32, 0, &[1; 32], 16, (&[1.0; 4], &[1.0; 2]), &mut y);
        add_group_dots_i8(&[1; 64], 32, 0, &[1; 32], 16, (&[1.0; 3], &[1.0; 2]), &mut y);
        add_group_dots_i8(&[1; 64], 32, 0, &[1; 32], 0, (&[1.0; 4], &[1.0; 2]), &mut y);
        assert_eq!(y, [1.5; 2]);
    }

    /// The host fast paths (AVX2 where present) against the portable
    /// reference, over shapes with row and column tails, every offset
    /// extreme and random values.
    #[test]
    fn fast_int8_paths_equal_the_reference() {
        let mut next = lcg(7u64);
        // Under Miri the shapes that still cross every tail and the Q15
        // block boundary (256 products).
        let shapes: &[(usize, usize)] = if cfg!(miri) {
            &[(1, 1), (5, 3), (13, 37), (6, 513), (9, 0)]
        } else {
            &[(1, 1), (5, 3), (13, 37), (8, 64), (7, 300), (6, 513), (3, 4096), (2, 4097), (9, 0)]
        };
        for &(rows, cols) in shapes {
            for offset in [0, -128, 127, 128, -127, 5] {
                let w: Vec<i8> = (0..rows * cols).map(|_| next() as i8).collect();
                let x: Vec<i8> = (0..cols).map(|_| next() as i8).collect();
                let bias: Vec<i32> = (0..rows).map(|_| next() as i32 >> 12).collect();
                let m: Vec<i32> = (0..rows).map(|_| (next() >> 1) as i32 | 1 << 30).collect();
                let sh: Vec<i32> = (0..rows).map(|_| -((next() % 12) as i32)).collect();
                let (mut fast, mut slow) = (vec![0i8; rows], vec![0i8; rows]);
                matvec_i8(&w, Some(&bias), &m, &sh, &x, offset, -3, &mut fast);
                reference::matvec_i8(&w, Some(&bias), &m, &sh, &x, offset, -3, &mut slow);
                assert_eq!(fast, slow, "{rows}x{cols}, offset {offset}");
                let x16: Vec<i16> =
                    (0..cols).map(|_| if offset == 128 { i16::MIN } else { next() as i16 }).collect();
                let b64: Vec<i64> = bias.iter().map(|&b| i64::from(b) << 8).collect();
                let (mut fast, mut slow) = (vec![0i16; rows], vec![0i16; rows]);
                matvec_q15(&w, Some(&b64), &m, &sh, &x16, &mut fast);
                reference::matvec_q15(&w, Some(&b64), &m, &sh, &x16, &mut slow);
                assert_eq!(fast, slow, "q15 {rows}x{cols}");
                let mut dots = Vec::new();
                for_each_dot_i8(&w, &x, offset, |d| dots.push(d));
                let want: Vec<i32> = w.chunks_exact(cols.max(1)).map(|r| dot_i8(r, &x, offset)).collect();
                assert_eq!(dots, want, "{rows}x{cols}, offset {offset}");
            }
        }
    }

    /// The decoders' products (offset 0: the AVX-VNNI path where the CPU
    /// has it) against the portable sums, -128 weights against -127 inputs
    /// included, and an input holding -128.
    #[test]
    fn decoder_dots_equal_the_portable_sums() {
        let mut next = lcg(9u64);
        let shapes: &[(usize, usize)] = if cfg!(miri) {
            &[(5, 33)]
        } else {
            // 37 x 2100 and 300 x 512 are past 64 KB: prefetching passes,
            // remainder rows and (2100) a column tail in the 512-bit path.
            &[(1, 32), (4, 32), (5, 64), (9, 100), (8, 513), (3, 4097), (13, 31), (37, 2100), (300, 512)]
        };
        for &(rows, cols) in shapes {
            let w: Vec<i8> = (0..rows * cols).map(|i| if i % 7 == 0 { -128 } else { next() as i8 }).collect();
            let mut x: Vec<i8> =
                (0..cols).map(|i| if i % 5 == 0 { -127 } else { (next() % 255) as i8 }).collect();
            x.iter_mut().for_each(|v| *v = (*v).max(-127));
            for with_min in [false, true] {
                if with_min {
                    x[cols / 2] = i8::MIN;
                }
                let mut dots = Vec::new();
                for_each_dot_i8(&w, &x, 0, |d| dots.push(d));
                let want: Vec<i32> = w.chunks_exact(cols).map(|r| dot_i8(r, &x, 0)).collect();
                assert_eq!(dots, want, "{rows}x{cols}, -128 in x: {with_min}");
            }
        }
        // All -128: the largest sums and the largest `128 * sum x`
        // correction, past 64 KB (prefetching) with a column tail.
        let (rows, cols) = if cfg!(miri) { (3, 70) } else { (17, 4160 + 7) };
        let w = vec![i8::MIN; rows * cols];
        let x = vec![i8::MIN; cols];
        let mut dots = Vec::new();
        for_each_dot_i8(&w, &x, 0, |d| dots.push(d));
        assert_eq!(dots, vec![128 * 128 * cols as i32; rows]);
    }

    /// Many inputs at once (a prefill's products: AVX-VNNI tiles of four
    /// rows by four inputs where the CPU has it) against the portable sums
    /// of every (input, row) pair: partial tiles, column tails, -128 in
    /// weights and inputs, and all -128 (the largest sums, whose `128 *
    /// sum w` correction is the largest too). Each pair exactly once. Rows
    /// of 31 columns take the AVX2 `vpmaddwd` tiles where the CPU has no
    /// AVX-VNNI (2,200 of them: several 64 KB blocks), of 32-63 the 256-bit
    /// VNNI one; one input takes the one-token products.
    #[cfg(feature = "std")]
    #[test]
    fn batched_dots_equal_the_portable_sums() {
        let mut next = lcg(11u64);
        let shapes: &[(usize, usize, usize)] = if cfg!(miri) {
            &[(5, 33, 3), (1, 8, 2)]
        } else {
            &[
                (1, 32, 1),
                (4, 32, 4),
                (5, 64, 9),
                (9, 100, 5),
                (8, 513, 3),
                (3, 4097, 6),
                (13, 31, 4),
                (6, 40, 5),
                (2200, 31, 3),
                (7, 96, 0),
                (67, 256, 1),
            ]
        };
        for &(rows, cols, tokens) in shapes {
            for extreme in [false, true] {
                let mut val = |i: usize| if extreme || i.is_multiple_of(7) { i8::MIN } else { next() as i8 };
                let w: Vec<i8> = (0..rows * cols).map(&mut val).collect();
                let xs: Vec<i8> = (0..tokens * cols).map(&mut val).collect();
                let mut got = vec![None; rows * tokens];
                for_each_dot_i8_batch(&w, &xs, cols, |t, r, d| {
                    let slot = &mut got[t * rows + r];
                    assert!(slot.is_none(), "({t}, {r}) twice");
                    *slot = Some(d);
                });
                let want: Vec<Option<i32>> = xs
                    .chunks_exact(cols)
                    .flat_map(|x| w.chunks_exact(cols).map(|r| Some(dot_i8(r, x, 0))))
                    .collect();
                assert_eq!(got, want, "{rows}x{cols}, {tokens} inputs, all -128: {extreme}");
            }
        }
    }

    /// A seeded linear congruential generator's high 31 bits.
    fn lcg(mut seed: u64) -> impl FnMut() -> u32 {
        move || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as u32
        }
    }

    #[test]
    fn int8_matches_integer_formula() {
        // One row, scale 0.5: y = round_half_away(0.5 * ((x0 + 3) * 2 + (x1 + 3) * -1 + 7)) - 4.
        let w = [2i8, -1];
        let lin = QLinear::<i8>::new(&w, Some(&[7]), &[1 << 30], &[0], 1, 2, -3, -4).unwrap();
        let mut y = [0i8];
        lin.forward(&[10, 1], &mut y);
        // (13 * 2 - 4 + 7) = 29 -> 14.5 -> 15 -> 11
        assert_eq!(y, [11]);
    }
}
