//! int8 dot products of many inputs at once (a prefill's tokens): each
//! weight row against every input, in register tiles on x86-64 hosts with
//! AVX-VNNI, input by input elsewhere. Integer sums, so the same values as
//! [`for_each_dot_i8`](super::for_each_dot_i8) called once per input.

/// Calls `f(t, r, sum x_t * w_r)` (wrapping `i32`) for every input `t` of
/// `xs` (`(tokens, cols)` row-major) and every row `r` of `w` (`(rows,
/// cols)` row-major), in an unspecified order: the same sums as
/// [`for_each_dot_i8`](super::for_each_dot_i8)`(w, x_t, 0, ..)` for each
/// input. A partial last row or input is ignored; `cols == 0` gives no
/// calls.
pub fn for_each_dot_i8_batch(w: &[i8], xs: &[i8], cols: usize, mut f: impl FnMut(usize, usize, i32)) {
    if cols == 0 {
        return;
    }
    if xs.len() / cols == 1 {
        // One input: the one-token products (eight rows a pass, prefetching
        // where they do), not a tile of four inputs three of which repeat
        // the first (a decode step's experts on several threads: 4x the
        // sums).
        let mut r = 0;
        super::each_dot_i8(w, &xs[..cols], 0, |d| {
            f(0, r, d);
            r += 1;
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if vnni::dots(w, xs, cols, &mut f) || madd::dots(w, xs, cols, &mut f) {
        return;
    }
    // Blocks of rows that stay in L2 (64 KB) while every input passes over
    // them: weights streamed from memory are read once, not once an input.
    let per_block = ((64 << 10) / cols).max(1);
    for (b, block) in w.chunks(per_block * cols).enumerate() {
        for (t, x) in xs.chunks_exact(cols).enumerate() {
            let mut r = b * per_block;
            super::each_dot_i8(block, x, 0, |d| {
                f(t, r, d);
                r += 1;
            });
        }
    }
}

/// AVX-VNNI tiles of four rows by four inputs (512-bit AVX-512 VNNI where
/// the CPU has it, else 256-bit AVX-VNNI). `vpdpbusd` multiplies unsigned
/// by signed bytes, so each input goes in as `x + 128` (`x ^ 0x80`, 0..=255
/// for any i8) and `128 * sum w_r` comes off after: `sum (x + 128) w = sum
/// x w + 128 sum w`, exact in wrapping `i32`, so the sums are the portable
/// loop's for every i8 input and weight (-128 included). Per step a tile
/// loads four weight and four input vectors for sixteen `vpdpbusd`; the
/// sixteen accumulators are reduced in registers (`vphaddd` trees, four
/// sums a vector), and each row's `128 * sum w` is one more `vpdpbusd` a
/// step (weights times bytes of 128), taken once per row.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vnni {
    use core::arch::x86_64::{
        __m128i, __m256i, __m512i, _mm_add_epi32, _mm256_castsi256_si128, _mm256_extracti128_si256,
        _mm256_hadd_epi32,
    };

    /// Rows and inputs per tile.
    const R: usize = 4;
    const T: usize = 4;

    /// False (nothing done) unless the CPU has AVX-512 VNNI (taken for
    /// rows of 64 columns or more) or AVX-VNNI (32 or more).
    pub(super) fn dots(w: &[i8], xs: &[i8], cols: usize, f: &mut impl FnMut(usize, usize, i32)) -> bool {
        use std::is_x86_feature_detected as has;
        if cols >= 64 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
            // SAFETY: the CPU has AVX-512F, BW and VNNI (AVX2 with them),
            // the features enabled.
            unsafe { dots512(w, xs, cols, f) };
            return true;
        }
        if cols < 32 || !has!("avxvnni") || !has!("avx2") {
            return false;
        }
        // SAFETY: the CPU has AVX2 and AVX-VNNI, the features enabled.
        unsafe { dots256(w, xs, cols, f) };
        true
    }

    /// The four lanes-sums of four 256-bit accumulators, in order
    /// (wrapping, so any order of the adds gives the same values).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sum4_256(a: [__m256i; 4]) -> __m128i {
        // [a0 01 23, a1 01 23 | a0 45 67, a1 45 67] and a2, a3 alike.
        let h01 = _mm256_hadd_epi32(a[0], a[1]);
        let h23 = _mm256_hadd_epi32(a[2], a[3]);
        // [a0 0-3, a1 0-3, a2 0-3, a3 0-3 | the same of 4-7].
        let h = _mm256_hadd_epi32(h01, h23);
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
    }

    /// [`sum4_256`] of 512-bit accumulators: each halved first.
    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    fn sum4_512(a: [__m512i; 4]) -> __m128i {
        use core::arch::x86_64::{_mm256_add_epi32, _mm512_castsi512_si256, _mm512_extracti64x4_epi64};
        sum4_256(a.map(|v| _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))))
    }

    /// One kernel per vector width: `$dots` over every tile, `$tile` one
    /// tile of `$n`-byte steps, `$sum4` the reduction of four accumulators.
    macro_rules! vnni_kernel {
        ($dots:ident, $tile:ident, $n:literal, $v:ty, $features:literal, $zero:ident, $set1:ident, $dp:ident, $sum4:ident) => {
            #[target_feature(enable = $features)]
            fn $dots(w: &[i8], xs: &[i8], cols: usize, f: &mut impl FnMut(usize, usize, i32)) {
                use core::arch::x86_64::{$dp, $set1, $zero};
                let steps = cols / $n;
                let main = steps * $n;
                // The inputs' first `main` columns as `x + 128`, a step at a time.
                let tokens = xs.len() / cols;
                let mut xu = std::vec![[0u8; $n]; tokens * steps];
                for (x, u) in xs.chunks_exact(cols).zip(xu.chunks_exact_mut(steps)) {
                    for (s, d) in x.as_chunks::<$n>().0.iter().zip(u) {
                        *d = s.map(|v| v as u8 ^ 0x80);
                    }
                }
                let xu: std::vec::Vec<&[[u8; $n]]> = xu.chunks_exact(steps).collect();
                let xrows: std::vec::Vec<&[i8]> = xs.chunks_exact(cols).collect();
                let rows = w.len() / cols;
                let k128: $v = $set1(0x80u8 as i8);
                for r0 in (0..rows).step_by(R) {
                    let n = R.min(rows - r0);
                    // A partial tile repeats its first row (sums not given out).
                    let wr: [&[i8]; R] = core::array::from_fn(|r| {
                        let r = r0 + if r < n { r } else { 0 };
                        w.get(r * cols..(r + 1) * cols).unwrap_or(&[])
                    });
                    // Each row's `steps` steps (a slice of that length,
                    // so the tile's indexing needs no checks).
                    let wc: [&[[i8; $n]]; R] = wr.map(|r| r.as_chunks::<$n>().0);
                    // 128 * the sum of each row's first `main` weights (wrapping).
                    let mut sums = [$zero(); R];
                    for k in 0..steps {
                        for (s, row) in sums.iter_mut().zip(&wc) {
                            if let Some(c) = row.get(k) {
                                *s = $dp(*s, k128, bytemuck::cast(*c));
                            }
                        }
                    }
                    let off: [i32; 4] = bytemuck::cast($sum4(sums));
                    let mut t0 = 0;
                    while t0 < tokens {
                        let m = T.min(tokens - t0);
                        let xt: [&[[u8; $n]]; T] = core::array::from_fn(|t| xu[t0 + if t < m { t } else { 0 }]);
                        let acc = $tile(wc, xt);
                        for (r, (row, (a, o))) in wr.iter().zip(acc.iter().zip(off)).enumerate().take(n) {
                            for (t, &a) in a.iter().enumerate().take(m) {
                                let x = xrows[t0 + t];
                                let tail = row[main..].iter().zip(&x[main..]);
                                let d = tail.fold(a.wrapping_sub(o), |s, (&wv, &xv)| {
                                    s.wrapping_add(i32::from(wv) * i32::from(xv))
                                });
                                f(t0 + t, r0 + r, d);
                            }
                        }
                        t0 += m;
                    }
                }
            }

            /// `sum (x + 128) w` of every (row, input) pair of the tile over
            /// their common steps.
            #[inline]
            #[target_feature(enable = $features)]
            fn $tile(w: [&[[i8; $n]]; R], x: [&[[u8; $n]]; T]) -> [[i32; T]; R] {
                use core::arch::x86_64::{$dp, $zero};
                // Slices of one length, taken again from what they hold, so
                // the indexing below needs no checks.
                let n = w.iter().map(|w| w.len()).chain(x.iter().map(|x| x.len())).min().unwrap_or(0);
                let w = w.map(|w| w.get(..n).unwrap_or(&[]));
                let x = x.map(|x| x.get(..n).unwrap_or(&[]));
                let n = w.iter().map(|w| w.len()).chain(x.iter().map(|x| x.len())).min().unwrap_or(0);
                let mut acc = [[$zero(); T]; R];
                for k in 0..n {
                    let wv: [$v; R] = core::array::from_fn(|r| bytemuck::cast(w[r][k]));
                    for t in 0..T {
                        let xv: $v = bytemuck::cast(x[t][k]);
                        for r in 0..R {
                            acc[r][t] = $dp(acc[r][t], xv, wv[r]);
                        }
                    }
                }
                acc.map(|a| bytemuck::cast($sum4(a)))
            }
        };
    }

    vnni_kernel!(
        dots256,
        tile256,
        32,
        __m256i,
        "avx2,avxvnni",
        _mm256_setzero_si256,
        _mm256_set1_epi8,
        _mm256_dpbusd_avx_epi32,
        sum4_256
    );
    vnni_kernel!(
        dots512,
        tile512,
        64,
        __m512i,
        "avx512f,avx512bw,avx512vnni,avx2",
        _mm512_setzero_si512,
        _mm512_set1_epi8,
        _mm512_dpbusd_epi32,
        sum4_512
    );
}

/// AVX2 tiles of three rows by four inputs for CPUs without AVX-VNNI:
/// every input widened to i16 once per call, each sixteen-weight step
/// sign-extended once per tile (`vpmovsxbw`) and multiplied by the four
/// inputs in pairs summed to i32 (`vpmaddwd`: |w|, |x| <= 128, so a pair
/// is at most 2^15, exact). One token at a time the widening loads took as
/// many issue slots as the multiplies (7.75 G multiply-adds/s at 512 x 512
/// x 64 inputs on a Zen 1 core whose `vpmaddwd` allows 18.8). Wrapping
/// `i32` sums, so the portable loop's values. Three by four measured
/// 10.4 G/s there (512 x 512 x 64), four by three 9.4, two by six 9.3.
/// Within a block, four inputs (in L1) meet every row.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod madd {
    use core::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_cvtepi8_epi16, _mm256_madd_epi16, _mm256_setzero_si256,
    };

    /// Rows and inputs per tile.
    const R: usize = 3;
    const T: usize = 4;

    /// False (nothing done) unless the CPU has AVX2 and there are two
    /// inputs or more of 16 columns or more.
    pub(super) fn dots(w: &[i8], xs: &[i8], cols: usize, f: &mut impl FnMut(usize, usize, i32)) -> bool {
        if cols < 16 || xs.len() / cols < 2 || !std::is_x86_feature_detected!("avx2") {
            return false;
        }
        // SAFETY: the CPU has AVX2, the only feature enabled.
        unsafe { dots_avx2(w, xs, cols, f) };
        true
    }

    #[target_feature(enable = "avx2")]
    fn dots_avx2(w: &[i8], xs: &[i8], cols: usize, f: &mut impl FnMut(usize, usize, i32)) {
        let steps = cols / 16;
        let tokens = xs.len() / cols;
        // Every input's first `16 * steps` columns as i16, a step at a time.
        let mut xw = std::vec![[0i16; 16]; tokens * steps];
        for (x, d) in xs.chunks_exact(cols).zip(xw.chunks_exact_mut(steps.max(1))) {
            for (s, d) in x.as_chunks::<16>().0.iter().zip(d) {
                *d = s.map(i16::from);
            }
        }
        let xw: std::vec::Vec<&[[i16; 16]]> = xw.chunks_exact(steps.max(1)).collect();
        let xrows: std::vec::Vec<&[i8]> = xs.chunks_exact(cols).collect();
        let wrows: std::vec::Vec<&[i8]> = w.chunks_exact(cols).collect();
        let x = (&xw[..], &xrows[..]);
        // Blocks of rows that stay in L2 (64 KB) while every input passes
        // over them.
        let per_block = ((64 << 10) / cols).max(R) / R * R;
        for (b, block) in wrows.chunks(per_block).enumerate() {
            let r0 = b * per_block;
            for t0 in (0..tokens).step_by(T) {
                let m = T.min(tokens - t0);
                for (q, quad) in block.chunks(R).enumerate() {
                    let r = r0 + q * R;
                    if quad.len() == R {
                        match m {
                            4 => run::<R, 4>(quad, r, x, t0, f),
                            3 => run::<R, 3>(quad, r, x, t0, f),
                            2 => run::<R, 2>(quad, r, x, t0, f),
                            _ => run::<R, 1>(quad, r, x, t0, f),
                        }
                    } else {
                        for (i, row) in quad.chunks(1).enumerate() {
                            match m {
                                4 => run::<1, 4>(row, r + i, x, t0, f),
                                3 => run::<1, 3>(row, r + i, x, t0, f),
                                2 => run::<1, 2>(row, r + i, x, t0, f),
                                _ => run::<1, 1>(row, r + i, x, t0, f),
                            }
                        }
                    }
                }
            }
        }
    }

    /// Rows `r0..r0 + RR` (`rows`) against inputs `t0..t0 + TT`: the tile's
    /// sums plus the columns past the last step, each given to `f`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn run<const RR: usize, const TT: usize>(
        rows: &[&[i8]],
        r0: usize,
        (xw, xrows): (&[&[[i16; 16]]], &[&[i8]]),
        t0: usize,
        f: &mut impl FnMut(usize, usize, i32),
    ) {
        let wr: [&[i8]; RR] = core::array::from_fn(|r| rows.get(r).copied().unwrap_or(&[]));
        let xt: [&[[i16; 16]]; TT] = core::array::from_fn(|t| xw.get(t0 + t).copied().unwrap_or(&[]));
        let acc = tile(wr.map(|r| r.as_chunks::<16>().0), xt);
        for (r, (row, a)) in wr.iter().zip(acc).enumerate() {
            let main = row.len() / 16 * 16;
            for (t, a) in a.into_iter().enumerate() {
                let x = xrows.get(t0 + t).copied().unwrap_or(&[]);
                let tail = row.get(main..).unwrap_or(&[]).iter().zip(x.get(main..).unwrap_or(&[]));
                let d = tail.fold(a, |s, (&wv, &xv)| s.wrapping_add(i32::from(wv) * i32::from(xv)));
                f(t0 + t, r0 + r, d);
            }
        }
    }

    /// `sum w x` of every (row, input) pair over their common steps.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile<const RR: usize, const TT: usize>(
        w: [&[[i8; 16]]; RR],
        x: [&[[i16; 16]]; TT],
    ) -> [[i32; TT]; RR] {
        // Slices of one length, taken again from what they hold, so the
        // indexing below needs no checks.
        let n = w.iter().map(|w| w.len()).chain(x.iter().map(|x| x.len())).min().unwrap_or(0);
        let w = w.map(|w| w.get(..n).unwrap_or(&[]));
        let x = x.map(|x| x.get(..n).unwrap_or(&[]));
        let n = w.iter().map(|w| w.len()).chain(x.iter().map(|x| x.len())).min().unwrap_or(0);
        let mut acc = [[_mm256_setzero_si256(); TT]; RR];
        for k in 0..n {
            for r in 0..RR {
                let wv = _mm256_cvtepi8_epi16(bytemuck::cast(w[r][k]));
                for t in 0..TT {
                    let xv: __m256i = bytemuck::cast(x[t][k]);
                    acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(wv, xv));
                }
            }
        }
        acc.map(|a| {
            a.map(|v| {
                let lanes: [i32; 8] = bytemuck::cast(v);
                lanes.iter().fold(0i32, |s, &l| s.wrapping_add(l))
            })
        })
    }
}
