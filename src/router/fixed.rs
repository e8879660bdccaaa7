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

/// `num / den` rounded down, 0 for `den == 0`, so that the integer router
/// links no 64-bit division routine (864 bytes of a Cortex-M4 firmware;
/// the M-profile divider is 32-bit). A 32-bit `den` whose quotient fits 32
/// bits (every sigmoid, and the routing weights of up to four experts) takes
/// two 32-bit divisions ([`div_u64_by_u32`]); any other pair, shift and
/// subtract, one step per bit of the quotient (17 for a routing weight).
pub(crate) fn div_u64(num: u64, den: u64) -> u64 {
    if den == 0 || num < den {
        return 0;
    }
    if let Ok(d) = u32::try_from(den)
        && (num >> 32) < den
    {
        return div_u64_by_u32(num, d) as u64;
    }
    // `den << shift` has `num`'s leading bit: it cannot overflow.
    let shift = den.leading_zeros() - num.leading_zeros();
    let (mut d, mut rem) = (den << shift, num);
    let mut q = 0u64;
    for _ in 0..shift + 1 {
        let take = rem >= d;
        rem -= if take { d } else { 0 };
        d >>= 1;
        q = q << 1 | take as u64;
    }
    q
}

/// `n / d` rounded down for `n >> 32 < d` (the quotient fits 32 bits), in
/// base 2^16: `d` normalized to its top bit, each 16-bit digit of the
/// quotient estimated from the divisor's top half by one 32-bit division,
/// then lowered while its product overshoots (at most twice).
fn div_u64_by_u32(n: u64, d: u32) -> u32 {
    let s = d.leading_zeros();
    let d = d << s;
    // `n >> 32 < d` before the shift, so `n << s` loses nothing and its
    // high word stays below the shifted `d`.
    let n = n << s;
    let (hi, lo) = ((n >> 32) as u32, n as u32);
    let (q1, r1) = digit(hi, lo >> 16, d);
    let (q0, _) = digit(r1, lo & 0xFFFF, d);
    q1 << 16 | q0
}

/// One 16-bit digit of `(top * 2^16 + next) / d` for a normalized `d`
/// (top bit set) and `top < d`, and the remainder (wrapping arithmetic:
/// the true value is below `d`). Out of line: called twice.
#[inline(never)]
fn digit(top: u32, next: u32, d: u32) -> (u32, u32) {
    // `max`: `d` has its top bit set, so `dh >= 2^15`; said for the compiler
    // (no division-by-zero panic path).
    let (dh, dl) = ((d >> 16).max(1), d & 0xFFFF);
    let (mut q, mut r) = (top / dh, top % dh);
    while q > 0xFFFF || q * dl > (r << 16 | next) {
        q -= 1;
        r += dh;
        if r > 0xFFFF {
            break;
        }
    }
    (q, (top << 16 | next).wrapping_sub(q.wrapping_mul(d)))
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
        // The two-division path: quotients of every width up to 32 bits,
        // divisors of every width, and the shapes the router divides.
        for _ in 0..if cfg!(miri) { 200 } else { 200_000 } {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = ((x as u32) >> (x >> 59)).max(1);
            let n = (x >> 7) % ((d as u64) << 32);
            assert_eq!(div_u64_by_u32(n, d) as u64, n / d as u64, "{n} / {d}");
        }
        for d in [1u32, 2, 3, 0xFFFF, 0x1_0000, 0x8000_0000, 0x8000_0001, u32::MAX - 1, u32::MAX] {
            for n in [0u64, 1, d as u64 - 1, d as u64, ((d as u64) << 32) - 1, (d as u64) << 31 | 0x7FFF_FFFF]
            {
                assert_eq!(div_u64_by_u32(n, d) as u64, n / d as u64, "{n} / {d}");
            }
        }
        // Every sigmoid's division.
        for e in (0..=1u64 << 30).step_by(if cfg!(miri) { 1 << 24 } else { 4093 }) {
            let den = (1u64 << 30) + e;
            for num in [1u64 << 60, e << 30] {
                assert_eq!(div_u64(num + den / 2, den), (num + den / 2) / den);
            }
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
