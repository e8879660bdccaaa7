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

/// Calls `f(sum (x + offset) * w_row)` (wrapping `i32`) for every row of
/// `w` (`(rows, x.len())` row-major) in order: the raw int8 dot products,
/// for kernels with their own scaling (e.g. the decoder's int8 matrices).
/// Four rows per pass on the DSP path; the same sums everywhere.
pub fn for_each_dot_i8(w: &[i8], x: &[i8], offset: i32, f: impl FnMut(i32)) {
    each_dot_i8(w, x, offset, f)
}

#[inline(always)]
#[cfg_attr(micromoe_dsp, allow(unused_mut))]
fn each_dot_i8(w: &[i8], x: &[i8], offset: i32, mut f: impl FnMut(i32)) {
    #[cfg(micromoe_dsp)]
    super::arm::each_dot_i8(w, x, offset, f);
    #[cfg(not(micromoe_dsp))]
    for row in w.chunks_exact(x.len().max(1)) {
        f(dot_i8(row, x, offset));
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
        super::reference::matvec_i8(w, bias, m, s, x, off, zp, y)
    }

    #[target_feature(enable = "avx2")]
    fn matvec_q15_avx2(w: &[i8], bias: Option<&[i64]>, m: &[i32], s: &[i32], x: &[i16], y: &mut [i16]) {
        super::reference::matvec_q15(w, bias, m, s, x, y)
    }
}

/// The portable kernels, one multiply-accumulate at a time: the reference
/// every fast path is checked against (on every target).
pub mod reference {
    use super::{dot_i8, dot_q15};
    use crate::quant::{IntAct, Multiplier, requantize, requantize_wide};

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
        let bias = bias.unwrap_or(&[]);
        let requant = multipliers.iter().zip(shifts);
        for (o, ((yo, row), (&m, &s))) in
            y.iter_mut().zip(w.chunks_exact(x.len().max(1))).zip(requant).enumerate()
        {
            let acc = dot_i8(row, x, input_offset).wrapping_add(bias.get(o).copied().unwrap_or(0));
            let v = requantize(acc, Multiplier { multiplier: m, shift: s });
            *yo = i8::saturate(v.saturating_add(output_zp));
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
            *yo = i16::saturate(requantize_wide(acc, Multiplier { multiplier: m, shift: s }));
        }
    }
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
}

impl IntKernel for i8 {
    type Bias = i32;

    fn bias_from_f64(v: f64) -> i32 {
        libm::round(v) as i32
    }

    fn matvec(lin: &QLinear<'_, i8>, x: &[i8], y: &mut [i8]) {
        matvec_i8(lin.w, lin.bias, lin.multipliers, lin.shifts, x, -lin.input_zp, lin.output_zp, y)
    }

    fn matvec_wide(lin: &QLinear<'_, i8>, x: &[i8], y: &mut [i32]) {
        let mut bias = lin.bias.unwrap_or(&[]).iter();
        let x = x.get(..lin.cols).unwrap_or(x);
        let mut out = y.iter_mut().zip(lin.multipliers.iter().zip(lin.shifts));
        each_dot_i8(lin.w, x, -lin.input_zp, |dot| {
            let Some((yo, (&multiplier, &shift))) = out.next() else { return };
            let acc = dot.wrapping_add(bias.next().copied().unwrap_or(0));
            *yo = requantize_wide(acc as i64, Multiplier { multiplier, shift }).saturating_add(lin.output_zp);
        });
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
        let mut bias = lin.bias.unwrap_or(&[]).iter();
        let x = x.get(..lin.cols).unwrap_or(x);
        let mut out = y.iter_mut().zip(lin.multipliers.iter().zip(lin.shifts));
        each_dot_q15(lin.w, x, |dot| {
            let Some((yo, (&multiplier, &shift))) = out.next() else { return };
            let acc = dot.wrapping_add(bias.next().copied().unwrap_or(0));
            *yo = requantize_wide(acc, Multiplier { multiplier, shift }).saturating_add(lin.output_zp);
        });
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
