//! Fixed-point requantization, exactly as TensorFlow Lite Micro and CMSIS-NN
//! define it by default (double rounding, `TFLITE_SINGLE_ROUNDING` off).
//!
//! A real scale `s` becomes a 32-bit multiplier `M` and a power-of-two `shift`
//! with `s = M * 2^(shift - 31)` and `M` in `[2^30, 2^31 - 1]` ([`Multiplier::from_scale`]).
//! An `i32` accumulator is then scaled by [`requantize`]:
//! a saturating rounding doubling high multiply
//! ([`saturating_rounding_doubling_high_mul`]) followed by a rounding divide by
//! a power of two ([`rounding_divide_by_pot`], ties away from zero). The 16x8
//! scheme scales 64-bit accumulators with [`requantize_wide`] (TFLM's
//! `int64_t` overload: a 16-bit reduced multiplier, one rounding).
//!
//! ```
//! use micromoe::quant::{requantize, Multiplier};
//! let m = Multiplier::from_scale(0.25).unwrap();
//! assert_eq!(requantize(10, m), 3); // 2.5 rounds away from zero
//! assert_eq!(requantize(-10, m), -3);
//! ```

use crate::error::{Error, Result, What};

/// A real scale in fixed point: `scale = multiplier * 2^(shift - 31)`.
///
/// Valid values (checked by [`Multiplier::new`]) have `multiplier` in
/// `[2^30, 2^31 - 1]` and `shift` in `[-31, 30]`, or are the zero scale
/// `(0, 0)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Multiplier {
    /// Q31 mantissa in `[2^30, 2^31 - 1]`, or 0.
    pub multiplier: i32,
    /// Power-of-two exponent in `[-31, 30]`; positive shifts left.
    pub shift: i32,
}

impl Multiplier {
    /// The zero scale.
    pub const ZERO: Multiplier = Multiplier { multiplier: 0, shift: 0 };

    /// Checks a (multiplier, shift) pair, e.g. one read from a model file.
    pub const fn new(multiplier: i32, shift: i32) -> Result<Self> {
        let zero = multiplier == 0 && shift == 0;
        if !zero && (multiplier < (1 << 30) || shift < -31 || shift > 30) {
            return Err(Error::OutOfRange { what: What::Requant, index: 0 });
        }
        Ok(Multiplier { multiplier, shift })
    }

    /// Derives (multiplier, shift) from a real scale as TFLM's
    /// `QuantizeMultiplier` does: `frexp`, round the mantissa half away from
    /// zero to Q31, renormalize if it rounded up to `2^31`, flush scales whose
    /// shift would be below -31 to zero. Scales that are negative, not finite
    /// or `>= 2^30` are refused.
    pub fn from_scale(scale: f64) -> Result<Self> {
        if !scale.is_finite() || scale < 0.0 {
            return Err(Error::OutOfRange { what: What::Scale, index: 0 });
        }
        if scale == 0.0 {
            return Ok(Self::ZERO);
        }
        let (q, mut shift) = libm::frexp(scale);
        let mut q_fixed = libm::round(q * (1u64 << 31) as f64) as i64;
        if q_fixed == 1 << 31 {
            q_fixed /= 2;
            shift += 1;
        }
        if shift < -31 {
            return Ok(Self::ZERO);
        }
        if shift > 30 {
            return Err(Error::OutOfRange { what: What::Scale, index: 0 });
        }
        Ok(Multiplier { multiplier: q_fixed as i32, shift })
    }

    /// The real scale this multiplier stands for.
    pub fn to_scale(self) -> f64 {
        self.multiplier as f64 * libm::ldexp(1.0, self.shift - 31)
    }
}

/// `round(a * b / 2^31)`, ties toward +infinity, saturating the single
/// overflowing case `i32::MIN * i32::MIN` (gemmlowp / TFLM / CMSIS-NN).
#[inline]
pub const fn saturating_rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    // Truncating division, as C's `/` (the nudge makes it round).
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// `round(x / 2^exponent)` with ties away from zero, `exponent` in `[0, 31]`
/// (larger exponents are treated as 31).
#[inline]
pub const fn rounding_divide_by_pot(x: i32, exponent: u32) -> i32 {
    let exponent = if exponent > 31 { 31 } else { exponent };
    let mask = ((1i64 << exponent) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + (x < 0) as i32;
    (x >> exponent) + (remainder > threshold) as i32
}

/// Scales an `i32` accumulator by `m`: TFLM's
/// `MultiplyByQuantizedMultiplier(int32_t, int32_t, int)`, bit for bit.
///
/// A positive shift multiplies `x` by `2^shift` first; like CMSIS-NN on Arm
/// this wraps if it overflows (calibrated layers never come near it).
///
/// Written for the instructions it compiles to (one `SMULL`, an add with
/// carry and a funnel shift for the high multiply; a mask and a compare
/// for the rounding shift), equal to the two reference steps above for
/// every input (`requantize_is_the_reference` checks that).
#[inline]
pub const fn requantize(x: i32, m: Multiplier) -> i32 {
    let left = if m.shift > 0 { m.shift as u32 } else { 0 };
    let right = if m.shift > 0 { 0 } else { m.shift.unsigned_abs() };
    let right = if right > 31 { 31 } else { right };
    let scaled = x.wrapping_shl(left);
    // round(a * b / 2^31) with ties toward +infinity is floor((a b + 2^30) /
    // 2^31): the reference's nudge and truncating division give the same
    // for either sign of the product.
    let high = if scaled == i32::MIN && m.multiplier == i32::MIN {
        i32::MAX
    } else {
        ((scaled as i64 * m.multiplier as i64 + (1 << 30)) >> 31) as i32
    };
    let mask = (1u32.wrapping_shl(right) as i32).wrapping_sub(1);
    let threshold = (mask >> 1) + (high < 0) as i32;
    (high >> right) + ((high & mask) > threshold) as i32
}

/// [`requantize`] for the parameters a product holds once it is made
/// ([`Multiplier::new`]: a multiplier of 0 or in `[2^30, 2^31 - 1]`, a
/// shift in `[-31, 30]`): the same result for every such pair and every
/// `x`, without the clamps and the `i32::MIN * i32::MIN` case those ranges
/// exclude (about 10 instructions of a row's 40 on a Cortex-M4).
/// Parameters outside them give some `i32`, never a panic.
// The epilogue of checked products; the raw public kernels keep
// `requantize` (they take any parameters).
#[inline(always)]
pub(crate) const fn requantize_valid(x: i32, multiplier: i32, shift: i32) -> i32 {
    let left = (if shift > 0 { shift } else { 0 }) as u32 & 31;
    let right = (if shift < 0 { -(shift as i64) } else { 0 }) as u32 & 31;
    let high = ((x.wrapping_shl(left) as i64 * multiplier as i64 + (1 << 30)) >> 31) as i32;
    let mask = (1u32.wrapping_shl(right) as i32).wrapping_sub(1);
    let threshold = (mask >> 1) + (high < 0) as i32;
    (high >> right) + ((high & mask) > threshold) as i32
}

/// Largest shift [`requantize_wide`] accepts.
pub const WIDE_MAX_SHIFT: i32 = 14;

/// Scales an `i64` accumulator by `m`, the 16x8 scheme: TFLM's
/// `MultiplyByQuantizedMultiplier(int64_t, int32_t, int)` (and CMSIS-NN's
/// `arm_nn_requantize_s64`): the multiplier is reduced to 16 bits
/// (`(M + 2^15) >> 16`, at most `0x7FFF`), then one rounding shift
/// (ties toward +infinity). The result saturates to `i32`.
///
/// Requires `m.shift <= WIDE_MAX_SHIFT` (callers validate it once) and
/// `|x| < 2^47`; outside that the result is wrapped, never a panic.
#[inline]
pub const fn requantize_wide(x: i64, m: Multiplier) -> i32 {
    let reduced = reduce_multiplier(m.multiplier) as i64;
    let shift = if m.shift > WIDE_MAX_SHIFT { WIDE_MAX_SHIFT } else { m.shift };
    let total_shift = (15 - shift) as u32; // in [1, 46]
    let round = 1i64 << (total_shift - 1);
    let r = x.wrapping_mul(reduced).wrapping_add(round) >> total_shift;
    if r > i32::MAX as i64 {
        i32::MAX
    } else if r < i32::MIN as i64 {
        i32::MIN
    } else {
        r as i32
    }
}

/// The 16-bit multiplier of the 16x8 scheme.
#[inline]
pub const fn reduce_multiplier(m: i32) -> i32 {
    if m < 0x7FFF_0000 { (m + (1 << 15)) >> 16 } else { 0x7FFF }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: gemmlowp's / TFLM's two steps as written there.
    fn reference(x: i32, m: Multiplier) -> i32 {
        let left = if m.shift > 0 { m.shift as u32 } else { 0 };
        let right = if m.shift > 0 { 0 } else { m.shift.unsigned_abs() };
        let scaled = x.wrapping_mul(1i32.wrapping_shl(left));
        rounding_divide_by_pot(saturating_rounding_doubling_high_mul(scaled, m.multiplier), right)
    }

    #[test]
    fn requantize_valid_is_requantize_for_valid_parameters() {
        let mut seed = 0x9E37_79B9u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let xs = [i32::MIN, i32::MIN + 1, -65_536, -3, -1, 0, 1, 2, 65_535, i32::MAX];
        let ms = [0, 1 << 30, (1 << 30) + 1, 0x5555_5555, i32::MAX];
        for shift in -31..=30 {
            for &m in &ms {
                let mult = Multiplier::new(m, if m == 0 { 0 } else { shift }).unwrap();
                for &x in &xs {
                    assert_eq!(
                        requantize_valid(x, mult.multiplier, mult.shift),
                        requantize(x, mult),
                        "{x} {m} {shift}"
                    );
                }
            }
        }
        for _ in 0..if cfg!(miri) { 500 } else { 500_000 } {
            let r = next();
            let m = (1 << 30) + (r as i32 & 0x3FFF_FFFF);
            let shift = (r >> 32) as i32 % 31 - (((r >> 40) & 1) as i32 * 31).min(31);
            let shift = shift.clamp(-31, 30);
            let x = if r >> 63 == 1 { (r >> 8) as i32 } else { (r >> 20) as i32 >> 12 };
            let mult = Multiplier { multiplier: m, shift };
            assert_eq!(requantize_valid(x, m, shift), requantize(x, mult), "{x} {m} {shift}");
        }
    }

    #[test]
    fn requantize_is_the_reference() {
        let edges =
            [i32::MIN, i32::MIN + 1, -(1 << 30) - 1, -(1 << 30), -3, -2, -1, 0, 1, 2, 3, 1 << 30, i32::MAX];
        let mut seed = 0x2545_F491u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as i32
        };
        let n = if cfg!(miri) { 200 } else { 200_000 };
        for shift in -33..=31 {
            for &a in &edges {
                for &b in &edges {
                    let m = Multiplier { multiplier: b, shift };
                    assert_eq!(requantize(a, m), reference(a, m), "{a} {b} {shift}");
                }
            }
            for i in 0..n / 64 {
                // Small accumulators (the common case) and anything at all.
                let a = if i % 2 == 0 { next() >> 12 } else { next() };
                let m = Multiplier { multiplier: next(), shift };
                assert_eq!(requantize(a, m), reference(a, m), "{a} {m:?}");
            }
        }
    }

    #[test]
    fn from_scale_normalizes_mantissa() {
        for &s in &[1e-9, 0.0003, 0.01, 0.5, 0.75, 0.999_999_999_9, 1.0, 3.0, 1000.0] {
            let m = Multiplier::from_scale(s).unwrap();
            assert!(m.multiplier >= 1 << 30, "{s}: {m:?}");
            assert!((m.to_scale() - s).abs() <= s * 2f64.powi(-30), "{s}: {m:?}");
        }
    }

    #[test]
    fn mantissa_rounding_up_to_one_renormalizes() {
        // Just below 1.0: q rounds to 2^31, must become 2^30 with shift + 1.
        let m = Multiplier::from_scale(1.0 - 2f64.powi(-40)).unwrap();
        assert_eq!(m, Multiplier { multiplier: 1 << 30, shift: 1 });
    }

    #[test]
    fn tiny_scales_flush_to_zero_and_huge_are_refused() {
        assert_eq!(Multiplier::from_scale(1e-12).unwrap(), Multiplier::ZERO);
        assert!(Multiplier::from_scale(2f64.powi(31)).is_err());
        assert!(Multiplier::from_scale(-1.0).is_err());
        assert!(Multiplier::from_scale(f64::NAN).is_err());
        assert!(Multiplier::new(5, 0).is_err());
        assert!(Multiplier::new(1 << 30, 31).is_err());
    }

    #[test]
    fn rounding_divide_ties_go_away_from_zero() {
        assert_eq!(rounding_divide_by_pot(5, 1), 3);
        assert_eq!(rounding_divide_by_pot(-5, 1), -3);
        assert_eq!(rounding_divide_by_pot(6, 2), 2); // 1.5
        assert_eq!(rounding_divide_by_pot(-6, 2), -2); // -1.5
        assert_eq!(rounding_divide_by_pot(-7, 2), -2); // -1.75
        assert_eq!(rounding_divide_by_pot(i32::MIN, 31), -1);
        assert_eq!(rounding_divide_by_pot(i32::MAX, 31), 1);
        assert_eq!(rounding_divide_by_pot(7, 0), 7);
    }

    #[test]
    fn doubling_high_mul_ties_and_saturation() {
        assert_eq!(saturating_rounding_doubling_high_mul(i32::MIN, i32::MIN), i32::MAX);
        // 1 * 2^30 / 2^31 = 0.5 -> 1 ; -0.5 -> 0 (ties toward +inf).
        assert_eq!(saturating_rounding_doubling_high_mul(1, 1 << 30), 1);
        assert_eq!(saturating_rounding_doubling_high_mul(-1, 1 << 30), 0);
        assert_eq!(saturating_rounding_doubling_high_mul(-3, 1 << 30), -1); // -1.5
    }

    #[test]
    fn wide_requantize_matches_tflm_formula_at_ties() {
        let half = Multiplier { multiplier: 1 << 30, shift: 0 }; // 0.5
        assert_eq!(reduce_multiplier(1 << 30), 1 << 14);
        assert_eq!(requantize_wide(3, half), 2); // 1.5 -> 2
        assert_eq!(requantize_wide(-3, half), -1); // -1.5 -> -1 (toward +inf)
        assert_eq!(reduce_multiplier(i32::MAX), 0x7FFF);
    }
}
