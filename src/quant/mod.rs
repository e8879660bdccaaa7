//! Numeric types: affine int8 / Q15 activations, f16 weights, requantization.
//!
//! - **f16** weights ([`half::f16`], re-exported as [`f16`](struct@f16)) are widened to
//!   f32 and accumulated in f32.
//! - **int8**: weights symmetric per output channel (zero point 0), activations
//!   asymmetric per tensor ([`QuantParams`]), `i32` accumulators and bias,
//!   requantized with [`requantize`] exactly as TFLM / CMSIS-NN do.
//! - **Q15** (the 16x8 scheme): `i16` activations, symmetric (zero point 0),
//!   int8 weights, `i64` accumulators and bias, requantized with
//!   [`requantize_wide`].
//!
//! Element-wise non-linearities on the integer paths are look-up tables built
//! once on the host ([`build_lut`]); at run time they are pure integer code,
//! so every target produces the same bits.
//!
//! ```
//! use micromoe::quant::QuantParams;
//! let p = QuantParams::from_range(-1.0, 3.0).unwrap(); // int8, asymmetric
//! let q: i8 = p.quantize(0.5);
//! assert!((p.dequantize(q) - 0.5).abs() <= p.scale / 2.0);
//! ```

mod requant;

pub use half::f16;
pub(crate) use requant::requantize_valid;
pub use requant::{
    Multiplier, WIDE_MAX_SHIFT, reduce_multiplier, requantize, requantize_wide, rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
};

use crate::error::{Error, Result, What, check_len};

mod sealed {
    pub trait Sealed {}
    impl Sealed for i8 {}
    impl Sealed for i16 {}
}

/// An activation element of an integer path: `i8` (int8) or `i16` (Q15).
pub trait IntAct:
    Copy + Default + PartialEq + core::fmt::Debug + bytemuck::Pod + sealed::Sealed + 'static
{
    /// Smallest value.
    const MIN: i32;
    /// Largest value.
    const MAX: i32;
    /// Entries of an activation look-up table for this type.
    const LUT_LEN: usize;
    /// Widens to `i32`.
    fn get(self) -> i32;
    /// Narrows, saturating.
    fn saturate(v: i32) -> Self;
    /// Looks `self` up in a table of [`IntAct::LUT_LEN`] entries made by
    /// [`build_lut`]. A shorter table yields the default value, never a panic.
    fn lookup(self, lut: &[Self]) -> Self;
}

impl IntAct for i8 {
    const MIN: i32 = i8::MIN as i32;
    const MAX: i32 = i8::MAX as i32;
    const LUT_LEN: usize = 256;
    #[inline]
    fn get(self) -> i32 {
        self as i32
    }
    #[inline]
    fn saturate(v: i32) -> Self {
        v.clamp(<Self as IntAct>::MIN, <Self as IntAct>::MAX) as i8
    }
    #[inline]
    fn lookup(self, lut: &[i8]) -> i8 {
        lut.get((self as i32 + 128) as usize).copied().unwrap_or_default()
    }
}

/// The i16 table holds 513 knots, one every 128 input steps; values between
/// knots are interpolated linearly in integer arithmetic (as TFLM's int16
/// LUT ops do), rounding half up.
impl IntAct for i16 {
    const MIN: i32 = i16::MIN as i32;
    const MAX: i32 = i16::MAX as i32;
    const LUT_LEN: usize = 513;
    #[inline]
    fn get(self) -> i32 {
        self as i32
    }
    #[inline]
    fn saturate(v: i32) -> Self {
        v.clamp(<Self as IntAct>::MIN, <Self as IntAct>::MAX) as i16
    }
    #[inline]
    fn lookup(self, lut: &[i16]) -> i16 {
        let u = (self as i32 + 32768) as usize;
        let (i, frac) = (u >> 7, (u & 127) as i32);
        match (lut.get(i), lut.get(i + 1)) {
            (Some(&a), Some(&b)) => {
                let (a, b) = (a as i32, b as i32);
                Self::saturate(a + (((b - a) * frac + 64) >> 7))
            }
            _ => 0,
        }
    }
}

/// Affine quantization of one activation tensor: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QuantParams {
    /// Real value of one step; finite and positive.
    pub scale: f32,
    /// The integer that stands for 0.0; 0 on the Q15 path.
    pub zero_point: i32,
}

impl QuantParams {
    /// Checks `scale` (finite, > 0).
    pub fn new(scale: f32, zero_point: i32) -> Result<Self> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::OutOfRange { what: What::Scale, index: 0 });
        }
        Ok(QuantParams { scale, zero_point })
    }

    /// Asymmetric int8 parameters covering `[min, max]` (widened to include
    /// 0.0, so zero is exact), as TFLM's converter chooses them.
    pub fn from_range(min: f32, max: f32) -> Result<Self> {
        if !(min.is_finite() && max.is_finite()) || min > max {
            return Err(Error::OutOfRange { what: What::Calibration, index: 0 });
        }
        let (min, max) = (min.min(0.0), max.max(0.0));
        let scale = if max > min { (max - min) / 255.0 } else { 1.0 };
        let zp = libm::roundf(-128.0 - min / scale) as i32;
        Self::new(scale, zp.clamp(-128, 127))
    }

    /// Symmetric Q15 parameters (zero point 0) covering `[-abs_max, abs_max]`.
    pub fn symmetric_q15(abs_max: f32) -> Result<Self> {
        if !abs_max.is_finite() || abs_max < 0.0 {
            return Err(Error::OutOfRange { what: What::Calibration, index: 0 });
        }
        let scale = if abs_max > 0.0 { abs_max / 32767.0 } else { 1.0 };
        Self::new(scale, 0)
    }

    /// `clamp(round(x / scale) + zero_point)`, rounding half away from zero;
    /// NaN maps to the zero point.
    pub fn quantize<A: IntAct>(&self, x: f32) -> A {
        let v = x / self.scale;
        if v.is_nan() {
            return A::saturate(self.zero_point);
        }
        A::saturate(round_half_away(v).saturating_add(self.zero_point))
    }

    /// `scale * (q - zero_point)`.
    pub fn dequantize<A: IntAct>(&self, q: A) -> f32 {
        self.scale * (q.get() - self.zero_point) as f32
    }

    /// Quantizes a slice; `out` must have `xs.len()` elements.
    pub fn quantize_slice<A: IntAct>(&self, xs: &[f32], out: &mut [A]) -> Result<()> {
        check_len(What::Output, xs.len(), out.len())?;
        for (o, &x) in out.iter_mut().zip(xs) {
            *o = self.quantize(x);
        }
        Ok(())
    }

    /// Dequantizes a slice; `out` must have `qs.len()` elements.
    pub fn dequantize_slice<A: IntAct>(&self, qs: &[A], out: &mut [f32]) -> Result<()> {
        check_len(What::Output, qs.len(), out.len())?;
        for (o, &q) in out.iter_mut().zip(qs) {
            *o = self.dequantize(q);
        }
        Ok(())
    }
}

/// `libm::roundf(v) as i32` (ties away from zero, saturating) for a
/// non-NaN `v`, without a call: truncate (one `VCVT` on an FPU), then
/// correct by the fraction, which `v - trunc(v)` gives exactly (for
/// `|v| >= 1` both are within a factor of two, below that `trunc(v)` is 0;
/// from `2^23` up `v` is an integer).
#[inline]
pub fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    if frac >= 0.5 {
        t.saturating_add(1)
    } else if frac <= -0.5 {
        t.saturating_sub(1)
    } else {
        t
    }
}

/// Fills an activation look-up table: `lut` maps a value quantized with
/// `input` to `f` of it, quantized with `output`. `lut` must have
/// [`IntAct::LUT_LEN`] entries. Uses float (host or conversion time only);
/// the table is then used by integer code alone.
pub fn build_lut<A: IntAct>(
    f: impl Fn(f32) -> f32,
    input: QuantParams,
    output: QuantParams,
    lut: &mut [A],
) -> Result<()> {
    check_len(What::Lut, A::LUT_LEN, lut.len())?;
    // i8: one entry per value; i16: a knot every 128 values from -32768.
    let step = if A::LUT_LEN == 256 { 1 } else { 128 };
    for (j, slot) in lut.iter_mut().enumerate() {
        let q = A::MIN + (j as i32) * step;
        let x = input.scale * (q - input.zero_point) as f32;
        *slot = output.quantize(f(x));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against libm's `roundf` (a rounding we did not write): every tie
    /// and its neighbours up to 2^24, the edges of i32, infinities, and a
    /// stride through all bit patterns (every 13th; every 999,983rd under Miri).
    #[test]
    fn round_half_away_is_roundf() {
        let want = |v: f32| libm::roundf(v) as i32;
        let check = |v: f32| {
            if !v.is_nan() {
                assert_eq!(round_half_away(v), want(v), "{v:e} ({:#x})", v.to_bits());
            }
        };
        for k in -64..64 {
            let tie = k as f32 + 0.5;
            for v in [tie, f32::from_bits(tie.to_bits() + 1), f32::from_bits(tie.to_bits() - 1)] {
                check(v);
                check(-v);
            }
        }
        for v in [0.0, -0.0, 8388607.5, 16777216.0, 2147483520.0, 2147483648.0, 3e9, f32::INFINITY] {
            check(v);
            check(-v);
        }
        let step = if cfg!(miri) { 999_983 } else { 13 };
        for bits in (0..=u32::MAX).step_by(step) {
            check(f32::from_bits(bits));
        }
    }

    #[test]
    fn from_range_makes_zero_exact() {
        let p = QuantParams::from_range(-0.3, 2.0).unwrap();
        assert_eq!(p.dequantize(p.quantize::<i8>(0.0)), 0.0);
        assert_eq!(p.quantize::<i8>(2.0), 127);
        assert_eq!(p.quantize::<i8>(-0.3), -128);
        assert_eq!(p.quantize::<i8>(1e9), 127);
        assert_eq!(p.quantize::<i8>(f32::NAN), p.zero_point as i8);
    }

    #[test]
    fn i16_lut_is_exact_at_knots_and_linear_between() {
        let p = QuantParams::symmetric_q15(4.0).unwrap();
        let mut lut = [0i16; 513];
        build_lut(|x| x, p, p, &mut lut).unwrap();
        for q in [-32768i16, -1000, -1, 0, 1, 127, 128, 5000, 32767] {
            assert!((q.lookup(&lut) as i32 - q as i32).abs() <= 1, "{q}");
        }
    }

    #[test]
    fn short_luts_do_not_panic() {
        assert_eq!(5i8.lookup(&[1, 2]), 0);
        assert_eq!(5i16.lookup(&[1, 2]), 0);
        let p = QuantParams::new(0.1, 0).unwrap();
        assert!(build_lut::<i8>(|x| x, p, p, &mut [0; 10]).is_err());
    }
}
