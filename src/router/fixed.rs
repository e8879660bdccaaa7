//! Fixed-point exponentials for the integer router: no float, no libm, the
//! same bits on every target.
//!
//! `2^-t` is split as `2^-(h/16) * 2^-(m/256) * 2^-(r/2^24)`: two 16-entry
//! Q30 tables and a second-order polynomial for the last factor
//! (`r * ln 2 / 2^24 < 0.0027`, so the dropped cubic term is below `2^-28`).
//! The relative error of [`exp_neg_q30`] is below `2^-26` (tested against
//! libm over its range), far below the `2^-15` resolution of router weights.

/// `round(2^30 * 2^(-j/16))`.
const COARSE: [u32; 16] = [
    1073741824, 1028218693, 984625594, 942880699, 902905651, 864625413, 827968132, 792865000, 759250125,
    727060411, 696235434, 666717336, 638450708, 611382493, 585461881, 560640218,
];

/// `round(2^30 * 2^(-j/256))`.
const FINE: [u32; 16] = [
    1073741824, 1070838486, 1067942999, 1065055341, 1062175491, 1059303428, 1056439131, 1053582579,
    1050733751, 1047892626, 1045059183, 1042233401, 1039415261, 1036604740, 1033801819, 1031006477,
];

/// `round(ln 2 * 2^30)`.
const LN2_Q30: u64 = 744_261_118;
/// `round(log2(e) * 2^30)`.
const LOG2E_Q30: u64 = 1_549_082_005;

/// 1.0 in Q30.
pub const ONE_Q30: u32 = 1 << 30;

/// `2^(-t / 2^24)` in Q30 (`t` in Q24, non-negative).
pub fn exp2_neg_q30(t: u64) -> u32 {
    let n = t >> 24;
    if n >= 31 {
        return 0;
    }
    let f = t & 0xFF_FFFF;
    let (h, m, r) = ((f >> 20) as usize, ((f >> 16) & 15) as usize, f & 0xFFFF);
    // 2^(-r/2^24) = e^(-a) with a = r ln2 / 2^24 < 0.0027: 1 - a + a^2/2 in Q30.
    let a = (r * LN2_Q30) >> 24;
    let poly = (1u64 << 30) - a + ((a * a) >> 31);
    let hm = (COARSE[h & 15] as u64 * FINE[m & 15] as u64 + (1 << 29)) >> 30;
    let v = (hm * poly + (1 << 29)) >> 30;
    ((v + ((1u64 << n) >> 1)) >> n) as u32
}

/// `e^(-d / 2^frac_bits)` in Q30 for a non-negative fixed-point `d`.
pub fn exp_neg_q30(d: u64, frac_bits: u32) -> u32 {
    // t = d * log2(e), in Q24: d (Q frac) * Q30 -> Q(frac+30), shift to Q24.
    let shift = frac_bits.min(32) + 6;
    let d = d.min(u32::MAX as u64);
    exp2_neg_q30((d * LOG2E_Q30 + (1u64 << (shift - 1))) >> shift)
}

/// `1 / (1 + e^-x)` in Q30 for a fixed-point `x` with `frac_bits`.
pub fn sigmoid_q30(x: i32, frac_bits: u32) -> u32 {
    let e = exp_neg_q30(x.unsigned_abs() as u64, frac_bits) as u64;
    let den = (1u64 << 30) + e;
    let num = if x >= 0 { 1u64 << 60 } else { e << 30 };
    div_u64(num + den / 2, den) as u32
}

/// `num / den` rounded down, 0 for `den == 0`: shift and subtract, one step
/// per bit of the quotient (16 for a routing weight, 31 for a sigmoid), so
/// the integer router links no 64-bit division routine (864 bytes of a
/// Cortex-M4 firmware; the M-profile divider is 32-bit).
pub(crate) fn div_u64(num: u64, den: u64) -> u64 {
    if den == 0 || num < den {
        return 0;
    }
    // `den << shift` has `num`'s leading bit: it cannot overflow.
    let shift = den.leading_zeros() - num.leading_zeros();
    let (mut d, mut rem) = (den << shift, num);
    let mut bit = || {
        let take = rem >= d;
        rem -= if take { d } else { 0 };
        d >>= 1;
        take
    };
    if shift < 32 {
        // The quotient has at most 32 bits (every use in the crate): a
        // 32-bit one is two instructions a step cheaper on a 32-bit core.
        let mut q = 0u32;
        for _ in 0..shift + 1 {
            q = q << 1 | bit() as u32;
        }
        return q as u64;
    }
    let mut q = 0u64;
    for _ in 0..shift + 1 {
        q = q << 1 | bit() as u64;
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn div_u64_is_integer_division() {
        let edges = [
            0u64,
            1,
            2,
            3,
            15,
            1 << 15,
            (1 << 30) - 1,
            1 << 30,
            u32::MAX as u64,
            1 << 45,
            u64::MAX - 1,
            u64::MAX,
        ];
        for &n in &edges {
            for &d in &edges {
                assert_eq!(div_u64(n, d), n.checked_div(d).unwrap_or(0), "{n} / {d}");
            }
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..if cfg!(miri) { 200 } else { 200_000 } {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (n, d) = (x, x.rotate_left(23) >> (x % 64));
            assert_eq!(div_u64(n, d), n.checked_div(d).unwrap_or(0), "{n} / {d}");
        }
    }

    #[test]
    fn tables_hold_powers_of_two() {
        for j in 0..16 {
            let c = libm::exp2(-(j as f64) / 16.0) * (1u64 << 30) as f64;
            let f = libm::exp2(-(j as f64) / 256.0) * (1u64 << 30) as f64;
            assert!((COARSE[j] as f64 - c).abs() <= 0.5);
            assert!((FINE[j] as f64 - f).abs() <= 0.5);
        }
        assert!((LN2_Q30 as f64 - core::f64::consts::LN_2 * 2f64.powi(30)).abs() <= 0.5);
        assert!((LOG2E_Q30 as f64 - core::f64::consts::LOG2_E * 2f64.powi(30)).abs() <= 0.5);
    }

    #[test]
    fn exp2_relative_error_below_2_pow_minus_26() {
        let mut worst = 0.0f64;
        for t in (0u64..(20 << 24)).step_by(24_593) {
            let got = exp2_neg_q30(t) as f64;
            let want = libm::exp2(-(t as f64) / 2f64.powi(24)) * 2f64.powi(30);
            // Absolute error of half an output step is unavoidable once the
            // value itself is small.
            let err = (got - want).abs() - 0.5;
            worst = worst.max(err / want);
        }
        assert!(worst < 2f64.powi(-26), "{worst:e}");
    }

    #[test]
    fn exp_and_sigmoid_track_libm() {
        for d in [0u64, 1, 100, 4096, 10_000, 40_000, 200_000] {
            let got = exp_neg_q30(d, 12) as f64 / 2f64.powi(30);
            let want = libm::exp(-(d as f64) / 4096.0);
            assert!((got - want).abs() < 2e-8 + want * 2e-7, "{d}: {got} {want}");
        }
        for x in [-100_000i32, -4096, -1, 0, 1, 4096, 30_000, i32::MIN, i32::MAX] {
            let got = sigmoid_q30(x, 12) as f64 / 2f64.powi(30);
            let want = 1.0 / (1.0 + libm::exp(-(x as f64) / 4096.0));
            assert!((got - want).abs() < 1e-8, "{x}: {got} {want}");
        }
    }
}
