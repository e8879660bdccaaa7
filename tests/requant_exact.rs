//! Requantization and integer kernels against exact wide-integer arithmetic.
//!
//! The reference computes the mathematically exact product in `i128` and
//! rounds it as TFLM / CMSIS-NN specify: the doubling high multiply rounds
//! `x * M / 2^31` half toward +infinity (`floor(p / 2^31 + 1/2)`), the power
//! of two divide rounds half away from zero; the 16x8 scheme rounds
//! `x * round(M / 2^16) / 2^(15 - shift)` half toward +infinity once.

use micromoe::kernels::{QLinear, matvec_i8, matvec_q15};
use micromoe::quant::{Multiplier, requantize, requantize_wide};
use proptest::prelude::*;

fn floor_div(a: i128, b: i128) -> i128 {
    a.div_euclid(b)
}

/// `round(v / 2^e)`, ties away from zero.
fn round_away(v: i128, e: u32) -> i128 {
    if e == 0 {
        return v;
    }
    let d = 1i128 << e;
    let q = floor_div(v.abs() + d / 2, d);
    if v < 0 { -q } else { q }
}

fn reference(x: i32, m: Multiplier) -> i32 {
    let (left, right) = (m.shift.max(0) as u32, (-m.shift).max(0) as u32);
    let p = (x as i128) * (1i128 << left) * m.multiplier as i128;
    let high = floor_div(p + (1i128 << 30), 1i128 << 31);
    round_away(high, right) as i32
}

fn reference_wide(x: i64, m: Multiplier) -> i32 {
    let reduced = floor_div(m.multiplier as i128 + (1 << 15), 1 << 16).min(0x7FFF);
    let total = 15 - m.shift;
    floor_div(x as i128 * reduced + (1i128 << (total - 1)), 1i128 << total)
        .clamp(i32::MIN as i128, i32::MAX as i128) as i32
}

fn multiplier(max_shift: i32) -> impl Strategy<Value = Multiplier> {
    ((1i32 << 30)..=i32::MAX, -31i32..=max_shift)
        .prop_map(|(multiplier, shift)| Multiplier { multiplier, shift })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn requantize_is_exactly_rounded(x in any::<i32>(), m in multiplier(30)) {
        // Keep `x << shift` inside i32: an overflowing left shift is outside
        // the defined domain (it wraps, as on Arm).
        let x = if m.shift > 0 { x >> m.shift } else { x };
        prop_assert_eq!(requantize(x, m), reference(x, m));
    }

    #[test]
    fn wide_requantize_is_exactly_rounded(x in -(1i64 << 47)..(1i64 << 47), m in multiplier(14)) {
        prop_assert_eq!(requantize_wide(x, m), reference_wide(x, m));
    }

    #[test]
    fn scale_round_trips_within_half_an_ulp(s in 1e-9f64..1e4) {
        let m = Multiplier::from_scale(s).unwrap();
        prop_assert!(m.multiplier >= 1 << 30);
        prop_assert!((m.to_scale() - s).abs() <= s * 2f64.powi(-31));
    }

    #[test]
    fn int8_matvec_matches_exact_model(
        rows in 1usize..6,
        cols in 1usize..40,
        seed in any::<u64>(),
        input_zp in -128i32..=127,
        output_zp in -128i32..=127,
    ) {
        let mut rng = Lcg(seed);
        let w: Vec<i8> = (0..rows * cols).map(|_| rng.next() as i8).collect();
        let x: Vec<i8> = (0..cols).map(|_| rng.next() as i8).collect();
        let bias: Vec<i32> = (0..rows).map(|_| (rng.next() as i32) >> 12).collect();
        let mults: Vec<i32> = (0..rows).map(|_| (1 << 30) | (rng.next() as i32 & 0x3FFF_FFFF)).collect();
        let shifts: Vec<i32> = (0..rows).map(|_| -((rng.next() % 20) as i32)).collect();
        let lin = QLinear::<i8>::new(&w, Some(&bias), &mults, &shifts, rows, cols, input_zp, output_zp).unwrap();
        let mut y = vec![0i8; rows];
        lin.forward(&x, &mut y);
        let mut y2 = vec![0i8; rows];
        matvec_i8(&w, Some(&bias), &mults, &shifts, &x, -input_zp, output_zp, &mut y2);
        for o in 0..rows {
            let acc: i128 = bias[o] as i128
                + (0..cols).map(|i| (x[i] as i128 - input_zp as i128) * w[o * cols + i] as i128).sum::<i128>();
            let m = Multiplier { multiplier: mults[o], shift: shifts[o] };
            let want = (reference(acc as i32, m) as i128 + output_zp as i128).clamp(-128, 127) as i8;
            prop_assert_eq!(y[o], want);
            prop_assert_eq!(y2[o], want);
        }
    }

    #[test]
    fn q15_matvec_matches_exact_model(rows in 1usize..6, cols in 1usize..40, seed in any::<u64>()) {
        let mut rng = Lcg(seed);
        let w: Vec<i8> = (0..rows * cols).map(|_| rng.next() as i8).collect();
        let x: Vec<i16> = (0..cols).map(|_| rng.next() as i16).collect();
        let bias: Vec<i64> = (0..rows).map(|_| (rng.next() as i32 as i64) >> 4).collect();
        let mults: Vec<i32> = (0..rows).map(|_| (1 << 30) | (rng.next() as i32 & 0x3FFF_FFFF)).collect();
        let shifts: Vec<i32> = (0..rows).map(|_| -((rng.next() % 24) as i32)).collect();
        let mut y = vec![0i16; rows];
        matvec_q15(&w, Some(&bias), &mults, &shifts, &x, &mut y);
        for o in 0..rows {
            let acc: i128 = bias[o] as i128 + (0..cols).map(|i| x[i] as i128 * w[o * cols + i] as i128).sum::<i128>();
            let m = Multiplier { multiplier: mults[o], shift: shifts[o] };
            let want = (reference_wide(acc as i64, m) as i128).clamp(-32768, 32767) as i16;
            prop_assert_eq!(y[o], want);
        }
    }
}

/// Rounding ties, by hand: values whose exact result is `n + 1/2`.
#[test]
fn rounding_ties_by_hand() {
    // Scale 1/4 (M = 2^30, shift -1): 10 / 4 = 2.5 -> 3, -10 / 4 = -2.5 -> -3.
    let quarter = Multiplier { multiplier: 1 << 30, shift: -1 };
    assert_eq!(requantize(10, quarter), 3);
    assert_eq!(requantize(-10, quarter), -3);
    assert_eq!(requantize(-6, quarter), -2); // -1.5 -> -2
    // Scale 1/2 with shift 0: the tie is in the high multiply, which rounds
    // toward +infinity: 3 / 2 = 1.5 -> 2, -3 / 2 = -1.5 -> -1.
    let half = Multiplier { multiplier: 1 << 30, shift: 0 };
    assert_eq!(requantize(3, half), 2);
    assert_eq!(requantize(-3, half), -1);
    // 16x8: one rounding, half toward +infinity.
    assert_eq!(requantize_wide(3, half), 2);
    assert_eq!(requantize_wide(-3, half), -1);
    for (x, m) in [
        (10, quarter),
        (-10, quarter),
        (-6, quarter),
        (3, half),
        (-3, half),
        (i32::MAX, half),
        (i32::MIN, half),
    ] {
        assert_eq!(requantize(x, m), reference(x, m), "{x} {m:?}");
    }
}

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as u32
    }
}
