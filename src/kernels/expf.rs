//! `libm::expf` many values at a time, the same bits: SwiGLU's gate
//! (`x / (1 + e^-x) * u`) and a softmax's exponentials, the two places a
//! decoder spends time in `expf` (a 512-wide int8 decoder: 9 % of a prompt
//! in libm's scalar `expf`, 7 % more in the gate around it).
//!
//! libm's `expf` (FreeBSD's `e_expf.c`) is f32 arithmetic and branches on
//! `|x|`; [`lanes`] takes the same operations in the same order on every
//! lane, the branches as selects, so each lane rounds exactly as the
//! scalar function does (Rust never fuses a multiply and an add, so no
//! vector width changes a result). Lanes outside `|x| < 87.34` (overflow,
//! underflow, subnormal results, infinities, NaN) send their whole chunk
//! to the scalar function. On x86-64 hosts (`std`) chunks of 16 lanes run
//! compiled for AVX-512, of 8 for AVX2 where the CPU has it (detected at
//! run time), else 4 (SSE2); elsewhere (the microcontrollers) the scalar
//! loop, the same values.

/// `libm::expf` of every lane, or `None` if a lane is outside the range
/// where the vector form applies (`|x| >= 87.336`, infinities and NaN:
/// libm's special cases there are the scalar function's to take).
#[inline(always)]
#[cfg_attr(not(all(feature = "std", target_arch = "x86_64")), allow(dead_code))]
pub(crate) fn lanes<const N: usize>(x: [f32; N]) -> Option<[f32; N]> {
    // libm's constants, by their bits.
    const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
    const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
    const INV_LN2: f32 = f32::from_bits(0x3fb8_aa3b);
    const P1: f32 = f32::from_bits(0x3e2a_aa8f);
    const P2: f32 = f32::from_bits(0xbb35_5215);
    let hx = x.map(|v| v.to_bits() & 0x7fff_ffff);
    // libm's first branch (|x| >= 87.336 or NaN): not taken here.
    if hx.iter().fold(false, |out, &h| out | (h >= 0x42ae_ac50)) {
        return None;
    }
    let mut y = [0.0f32; N];
    for i in 0..N {
        let (v, h) = (x[i], hx[i]);
        let neg = v.to_bits() >> 31 != 0;
        // k: round(x / ln 2) above 1.5 ln 2 (truncation of x / ln 2 +- 1/2),
        // +-1 above 0.5 ln 2, else 0.
        let big = (INV_LN2 * v + if neg { -0.5 } else { 0.5 }) as i32;
        let k = if h > 0x3f85_1592 {
            big
        } else if h > 0x3eb1_7218 {
            if neg { -1 } else { 1 }
        } else {
            0
        };
        // With k = 0 these are libm's `hi = x, lo = 0` exactly (x - 0 * c
        // is x, 0 * c is 0, x - 0 is x).
        let kf = k as f32;
        let hi = v - kf * LN2_HI;
        let lo = kf * LN2_LO;
        let r = hi - lo;
        let rr = r * r;
        let c = r - rr * (P1 + rr * P2);
        let e = 1.0 + (r * c / (2.0 - c) - lo + hi);
        // scalbnf(e, k): one multiply by 2^k for -126 <= k <= 127 (here
        // -126..=126); times 1 when k = 0, which is e itself.
        let scaled = e * f32::from_bits(((127 + k) as u32) << 23);
        // |x| <= 2^-14: libm returns 1 + x.
        y[i] = if h > 0x3900_0000 { scaled } else { 1.0 + v };
    }
    Some(y)
}

/// `g = g / (1 + expf(-g)) * u` element-wise ([`Activation::Silu`]'s
/// gate), over the shorter of the two; the same bits as the scalar form.
///
/// [`Activation::Silu`]: super::Activation::Silu
pub(crate) fn silu_gate(g: &mut [f32], u: &[f32]) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    x86::silu_gate(g, u);
    #[cfg(not(all(feature = "std", target_arch = "x86_64")))]
    g.iter_mut().zip(u).for_each(|(g, &u)| *g = silu(*g) * u);
}

/// `s = expf(s - max)` element-wise (a softmax's exponentials); the same
/// bits as the scalar form.
pub(crate) fn exp_shifted(s: &mut [f32], max: f32) {
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    x86::exp_shifted(s, max);
    #[cfg(not(all(feature = "std", target_arch = "x86_64")))]
    s.iter_mut().for_each(|v| *v = libm::expf(*v - max));
}

/// SiLU as [`Activation::eval`](super::Activation::eval) computes it.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + libm::expf(-x))
}

#[inline(always)]
#[cfg_attr(not(all(feature = "std", target_arch = "x86_64")), allow(dead_code))]
fn silu_gate_n<const N: usize>(g: &mut [f32], u: &[f32]) {
    let n = g.len().min(u.len());
    let (g, u) = (&mut g[..n], &u[..n]);
    let (gc, gt) = g.as_chunks_mut::<N>();
    let (uc, ut) = u.as_chunks::<N>();
    for (g, u) in gc.iter_mut().zip(uc) {
        match lanes(g.map(|v| -v)) {
            Some(e) => {
                for i in 0..N {
                    g[i] = g[i] / (1.0 + e[i]) * u[i];
                }
            }
            None => g.iter_mut().zip(u).for_each(|(g, &u)| *g = silu(*g) * u),
        }
    }
    gt.iter_mut().zip(ut).for_each(|(g, &u)| *g = silu(*g) * u);
}

#[inline(always)]
#[cfg_attr(not(all(feature = "std", target_arch = "x86_64")), allow(dead_code))]
fn exp_shifted_n<const N: usize>(s: &mut [f32], max: f32) {
    let (sc, st) = s.as_chunks_mut::<N>();
    for c in sc {
        let x = c.map(|v| v - max);
        *c = lanes(x).unwrap_or_else(|| x.map(libm::expf));
    }
    st.iter_mut().for_each(|v| *v = libm::expf(*v - max));
}

/// The chunked forms compiled for AVX-512 and AVX2, chosen at run time.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[allow(unsafe_code)]
mod x86 {
    use std::is_x86_feature_detected as has;

    pub(super) fn silu_gate(g: &mut [f32], u: &[f32]) {
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature enabled.
            unsafe { silu_gate_512(g, u) }
        } else if has!("avx2") {
            // SAFETY: the CPU has AVX2, the only feature enabled.
            unsafe { silu_gate_256(g, u) }
        } else {
            super::silu_gate_n::<4>(g, u)
        }
    }

    pub(super) fn exp_shifted(s: &mut [f32], max: f32) {
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature enabled.
            unsafe { exp_shifted_512(s, max) }
        } else if has!("avx2") {
            // SAFETY: the CPU has AVX2, the only feature enabled.
            unsafe { exp_shifted_256(s, max) }
        } else {
            super::exp_shifted_n::<4>(s, max)
        }
    }

    #[target_feature(enable = "avx512f")]
    fn silu_gate_512(g: &mut [f32], u: &[f32]) {
        super::silu_gate_n::<16>(g, u)
    }

    #[target_feature(enable = "avx2")]
    fn silu_gate_256(g: &mut [f32], u: &[f32]) {
        super::silu_gate_n::<8>(g, u)
    }

    #[target_feature(enable = "avx512f")]
    fn exp_shifted_512(s: &mut [f32], max: f32) {
        super::exp_shifted_n::<16>(s, max)
    }

    #[target_feature(enable = "avx2")]
    fn exp_shifted_256(s: &mut [f32], max: f32) {
        super::exp_shifted_n::<8>(s, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lanes against libm's `expf` (a function we did not write) over
    /// every 251st f32 bit pattern of both signs (17 million values: every
    /// branch of libm's, each exponent, the edges of the vector range),
    /// one value a chunk so a fallback never hides a lane; the exhaustive
    /// run (all 2^32 patterns, one a chunk and then in chunks of the
    /// widest form) is `cargo test --release --lib -- --ignored
    /// lanes_are_libm_everywhere`.
    #[test]
    fn lanes_are_libm() {
        let step = if cfg!(miri) { 40_000_003 } else { 251 };
        check((0..=u32::MAX).step_by(step));
        // The boundaries of each branch, and the first values past them.
        let edges =
            [0x3900_0000u32, 0x3eb1_7218, 0x3f85_1592, 0x42ae_ac50, 0x42b1_7218, 0x42cf_f1b5, 0x7f80_0000];
        check(edges.iter().flat_map(|&e| (e - 2..=e + 2).flat_map(|b| [b, b | 0x8000_0000])));
    }

    #[test]
    #[ignore = "all 2^32 bit patterns, twice: a minute in release"]
    fn lanes_are_libm_everywhere() {
        check(0..=u32::MAX);
        // And through the widest form this CPU runs (`x - 0` is `x`):
        // blocks of consecutive bit patterns, so whole chunks are in range.
        let mut block = vec![0.0f32; 1 << 16];
        for hi in 0..=u16::MAX {
            let first = u32::from(hi) << 16;
            block.iter_mut().zip(first..).for_each(|(v, b)| *v = f32::from_bits(b));
            exp_shifted(&mut block, 0.0);
            for (v, b) in block.iter().zip(first..) {
                let want = libm::expf(f32::from_bits(b));
                // A NaN stays a NaN (whether `x - 0` quiets a signalling
                // one is the compiler's choice).
                let same = v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan());
                assert!(same, "expf of {b:#010x}, chunked: {v:e}, want {want:e}");
            }
        }
    }

    fn check(bits: impl Iterator<Item = u32>) {
        for b in bits {
            let x = f32::from_bits(b);
            let want = libm::expf(x);
            if let Some([got]) = lanes([x]) {
                assert_eq!(got.to_bits(), want.to_bits(), "expf({x:e}) ({b:#010x})");
            } else {
                assert!(
                    (b & 0x7fff_ffff) >= 0x42ae_ac50,
                    "{x:e} ({b:#010x}) left to the scalar function inside the range"
                );
            }
        }
    }

    /// The gate and the shifted exponentials, at every vector width this
    /// CPU runs, over chunk tails and values out of the vector range
    /// (which send their chunk to libm), against the scalar forms.
    #[test]
    fn slices_are_the_scalar_forms() {
        let mut s = 0x1234_5678u32;
        let mut next = move || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1 << 24) as f32 - 0.5) * 40.0
        };
        for n in [0usize, 1, 3, 4, 7, 8, 15, 16, 17, 33, 100] {
            let mut g: Vec<f32> = (0..n).map(|_| next()).collect();
            if n > 5 {
                g[5] = 95.0;
                g[n - 1] = f32::NAN;
            }
            let u: Vec<f32> = (0..n + 1).map(|_| next()).collect();
            let mut got = g.clone();
            silu_gate(&mut got, &u);
            let want: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| silu(g) * u).collect();
            assert_eq!(bits(&got), bits(&want), "gate, {n} values");
            for (name, f) in [("4", silu_gate_n::<4> as fn(&mut [f32], &[f32])), ("16", silu_gate_n::<16>)] {
                let mut got = g.clone();
                f(&mut got, &u);
                assert_eq!(bits(&got), bits(&want), "gate by {name}, {n} values");
            }
            let mut got = g.clone();
            exp_shifted(&mut got, 3.5);
            let want: Vec<f32> = g.iter().map(|&v| libm::expf(v - 3.5)).collect();
            assert_eq!(bits(&got), bits(&want), "exp, {n} values");
            let mut got = g.clone();
            exp_shifted_n::<16>(&mut got, 3.5);
            assert_eq!(bits(&got), bits(&want), "exp by 16, {n} values");
        }
    }

    /// Each value's bits, a NaN as one (its sign and payload are not
    /// specified: Miri picks them at random).
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| if v.is_nan() { f32::NAN.to_bits() } else { v.to_bits() }).collect()
    }
}
