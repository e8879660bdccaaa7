//! Arm DSP fast paths for Cortex-M4/M7 (`thumbv7em`): the int8 and Q15
//! matrix-vector products with `SMLAD` (two 16 x 16 multiply-accumulates
//! per instruction), bit-exact with the portable kernels in
//! [`reference`](super::reference).
//!
//! Four output rows per pass share each input word. One 32-bit load brings
//! four int8 weights; `SXTB16` and `SXTB16 ROR #8` split them into the pairs
//! `(w0, w2)` and `(w1, w3)`, so the input is arranged the same way: int8
//! inputs by the same two instructions (plus the input offset, `SADD16`),
//! Q15 inputs by `PKHBT` / `PKHTB` from two loads. No weight layout change
//! is needed. Sums wrap in `i32` as the portable int8 kernel's do; Q15 sums
//! are moved into `i64` every 256 products, before an `i32` could overflow
//! (`|x w| <= 2^15 * 2^7`), so they are exact as the portable `i64` sums.
//!
//! Compiled only for `thumbv7em` targets (see `build.rs`): stable Rust has
//! no DSP intrinsics, so each instruction is a one-line `asm!` on registers.
#![allow(unsafe_code)]

use core::arch::asm;
use core::mem::MaybeUninit;

use crate::quant::{IntAct, Multiplier, requantize_valid, requantize_wide};

#[inline(always)]
fn sxtb16(x: u32) -> u32 {
    let r;
    // SAFETY: register-only arithmetic; no memory, stack or flags touched.
    unsafe {
        asm!("sxtb16 {r}, {x}", r = lateout(reg) r, x = in(reg) x, options(pure, nomem, nostack, preserves_flags))
    };
    r
}

#[inline(always)]
fn sxtb16_ror8(x: u32) -> u32 {
    let r;
    // SAFETY: as `sxtb16`.
    unsafe {
        asm!("sxtb16 {r}, {x}, ror #8", r = lateout(reg) r, x = in(reg) x, options(pure, nomem, nostack, preserves_flags))
    };
    r
}

/// `acc + a.lo * b.lo + a.hi * b.hi` (signed halves), wrapping.
#[inline(always)]
fn smlad(a: u32, b: u32, acc: i32) -> i32 {
    let r;
    // SAFETY: register-only arithmetic; may set the sticky Q flag, which
    // nothing reads (so no `preserves_flags`).
    unsafe {
        asm!("smlad {r}, {a}, {b}, {c}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b, c = in(reg) acc, options(pure, nomem, nostack))
    };
    r
}

/// Two 16-bit additions.
#[inline(always)]
fn sadd16(a: u32, b: u32) -> u32 {
    let r;
    // SAFETY: register-only arithmetic; sets only the GE flags, which nothing reads.
    unsafe {
        asm!("sadd16 {r}, {a}, {b}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b, options(pure, nomem, nostack))
    };
    r
}

/// `(a.lo, b.lo)`.
#[inline(always)]
fn pkhbt(a: u32, b: u32) -> u32 {
    let r;
    // SAFETY: register-only arithmetic.
    unsafe {
        asm!("pkhbt {r}, {a}, {b}, lsl #16", r = lateout(reg) r, a = in(reg) a, b = in(reg) b, options(pure, nomem, nostack, preserves_flags))
    };
    r
}

/// `(a.hi, b.hi)`.
#[inline(always)]
fn pkhtb(b: u32, a: u32) -> u32 {
    let r;
    // SAFETY: register-only arithmetic.
    unsafe {
        asm!("pkhtb {r}, {b}, {a}, asr #16", r = lateout(reg) r, b = in(reg) b, a = in(reg) a, options(pure, nomem, nostack, preserves_flags))
    };
    r
}

#[inline(always)]
fn word(b: &[i8; 4]) -> u32 {
    u32::from_le_bytes(b.map(|v| v as u8))
}

/// The 16-bit pair `(v, v)`.
fn pair(v: i32) -> u32 {
    (v as u16 as u32) * 0x0001_0001
}

/// Inputs the public kernels' widest stack buffer holds expanded (2 KB);
/// wider inputs take the register-only path.
const MAX_EXPANDED: usize = 1024;

/// One group of four inputs for four rows: `LDRD` the input pairs, then per
/// row `LDR`, `SXTB16` x 2, `SMLAD` x 2 (rows 1 and 0 from `w0`, 3 and 2
/// from `w2`; the second of each pair post-increments its pointer).
macro_rules! group {
    () => {
        concat!(
            "ldrd {x02}, {x13}, [{xp}], #8\n",
            "ldr {t0}, [{w0}, {s}]\n",
            "sxtb16 {t1}, {t0}\n",
            "sxtb16 {t0}, {t0}, ror #8\n",
            "smlad {a1}, {t1}, {x02}, {a1}\n",
            "smlad {a1}, {t0}, {x13}, {a1}\n",
            "ldr {t0}, [{w0}], #4\n",
            "sxtb16 {t1}, {t0}\n",
            "sxtb16 {t0}, {t0}, ror #8\n",
            "smlad {a0}, {t1}, {x02}, {a0}\n",
            "smlad {a0}, {t0}, {x13}, {a0}\n",
            "ldr {t0}, [{w2}, {s}]\n",
            "sxtb16 {t1}, {t0}\n",
            "sxtb16 {t0}, {t0}, ror #8\n",
            "smlad {a3}, {t1}, {x02}, {a3}\n",
            "smlad {a3}, {t0}, {x13}, {a3}\n",
            "ldr {t0}, [{w2}], #4\n",
            "sxtb16 {t1}, {t0}\n",
            "sxtb16 {t0}, {t0}, ror #8\n",
            "smlad {a2}, {t1}, {x02}, {a2}\n",
            "smlad {a2}, {t0}, {x13}, {a2}\n",
        )
    };
}

/// Adds to four rows' sums the products of `n` groups of four inputs with
/// four weight rows. `xp` holds, per group, the pairs `(x0, x2)`, `(x1, x3)`
/// as 16-bit halves; row `r` starts at `w + r * stride`. One pass per group:
/// one `LDRD` for the inputs, then per row one `LDR`, two `SXTB16` and two
/// `SMLAD`, two groups per loop iteration: 44 instructions per 32
/// multiply-accumulates.
///
/// # Safety
/// `xp` must be valid for reading `2 * n` words, and `w + r * stride` for
/// reading `4 * n` bytes for each `r` in `0..4`.
#[inline(always)]
unsafe fn quad_loop(xp: *const u32, n: usize, w: *const i8, stride: usize, acc: &mut [i32; 4]) {
    let (mut xp, mut w0, mut w2) = (xp, w, w.wrapping_add(2 * stride));
    let [mut a0, mut a1, mut a2, mut a3] = *acc;
    let pairs = n / 2;
    if pairs > 0 {
        let n = pairs;
        // Two groups per iteration: the loop branch costs half as much.
        // SAFETY: the caller guarantees the reads; the loop writes only its
        // operand registers (and the flags, by `subs`).
        unsafe {
            asm!(
                "2:",
                group!(),
                group!(),
                "subs {n}, {n}, #1",
                "bne 2b",
                xp = inout(reg) xp,
                n = inout(reg) n => _,
                w0 = inout(reg) w0,
                w2 = inout(reg) w2,
                s = in(reg) stride,
                a0 = inout(reg) a0,
                a1 = inout(reg) a1,
                a2 = inout(reg) a2,
                a3 = inout(reg) a3,
                x02 = out(reg) _,
                x13 = out(reg) _,
                t0 = out(reg) _,
                t1 = out(reg) _,
                options(nostack, readonly),
            );
        }
    }
    if n % 2 == 1 {
        // SAFETY: as above, one group.
        unsafe {
            asm!(
                group!(),
                xp = inout(reg) xp => _,
                w0 = inout(reg) w0 => _,
                w2 = inout(reg) w2 => _,
                s = in(reg) stride,
                a0 = inout(reg) a0,
                a1 = inout(reg) a1,
                a2 = inout(reg) a2,
                a3 = inout(reg) a3,
                x02 = out(reg) _,
                x13 = out(reg) _,
                t0 = out(reg) _,
                t1 = out(reg) _,
                options(nostack, readonly),
            );
        }
    }
    *acc = [a0, a1, a2, a3];
}

/// Runs `f` (a product with the widest stack buffer) in a frame of its
/// own: inlined, its 2 KB buffer would be reserved by every product of the
/// caller, small ones too. Small buffers stay inline (a call per product
/// costs the decoder about 1.4 % per token).
#[inline(never)]
fn wide<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `x + offset` as the pairs `quad_loop` reads; returns the groups written.
/// Only the words written are read later (the buffer is not zeroed first:
/// that cost more than a small product's expansion).
fn expand_i8(x: &[i8], offset: i32, out: &mut [MaybeUninit<u32>]) -> usize {
    let off = pair(offset);
    let (xs, _) = x.as_chunks::<4>();
    let mut n = 0;
    for (xw, o) in xs.iter().zip(out.as_chunks_mut::<2>().0) {
        let xv = word(xw);
        o[0].write(sadd16(sxtb16(xv), off));
        o[1].write(sadd16(sxtb16_ror8(xv), off));
        n += 1;
    }
    n
}

/// Q15 `x` as the pairs `quad_loop` reads; returns the groups written.
fn expand_q15(x: &[i16], out: &mut [MaybeUninit<u32>]) -> usize {
    let (xs, _) = x.as_chunks::<4>();
    let mut n = 0;
    for (xw, o) in xs.iter().zip(out.as_chunks_mut::<2>().0) {
        let (a, b) = q15_pairs(xw);
        o[0].write(a);
        o[1].write(b);
        n += 1;
    }
    n
}

/// Bytes of four rows of `cols` (>= 1): never 0, so `chunks_exact` of it
/// has no panic path (a wrapped `4 * cols` could be 0).
#[inline(always)]
fn four_rows(cols: usize) -> usize {
    cols.saturating_mul(4).max(1)
}

/// The fast paths take `(rows, cols)` products whose every length agrees
/// and whose expanded input fits `words` of buffer.
fn fits(
    w: usize,
    (rows, cols): (usize, usize),
    multipliers: usize,
    shifts: usize,
    bias: Option<usize>,
    words: usize,
) -> bool {
    cols > 0
        && super::expand_words(cols) <= words
        && rows.checked_mul(cols) == Some(w)
        && multipliers == rows
        && shifts == rows
        && bias.is_none_or(|b| b == rows)
}

/// Runs `$body` with `$pairs`, an expansion buffer on the stack for `$cols`
/// inputs: 256 bytes inline up to 128 inputs, else 2 KB in a frame of its
/// own ([`wide`]). For the public kernels, which get no buffer (layers pass
/// one from their scratch). A macro, not a function taking a closure: the
/// body is then inlined at both sites, with the buffer's length known.
macro_rules! on_stack {
    ($cols:expr, |$pairs:ident| $body:expr) => {
        if $cols <= 128 {
            let $pairs = &mut [MaybeUninit::<u32>::uninit(); 64];
            $body
        } else {
            wide(|| {
                let $pairs = &mut [MaybeUninit::<u32>::uninit(); super::expand_words(MAX_EXPANDED)];
                $body
            })
        }
    };
}

/// `words` as the kernels' expansion buffer.
#[inline(always)]
pub(super) fn uninit(words: &mut [u32]) -> &mut [MaybeUninit<u32>] {
    // SAFETY: `MaybeUninit<u32>` has `u32`'s layout, and the kernels only
    // ever write initialized words through it, so `words` stays valid.
    unsafe { &mut *(words as *mut [u32] as *mut [MaybeUninit<u32>]) }
}

/// [`matvec_i8`](super::matvec_i8) on the DSP path with a stack buffer.
#[allow(clippy::too_many_arguments)]
pub(super) fn matvec_i8(
    w: &[i8],
    bias: Option<&[i32]>,
    multipliers: &[i32],
    shifts: &[i32],
    x: &[i8],
    offset: i32,
    output_zp: i32,
    y: &mut [i8],
) -> Option<()> {
    // Raw parameters: the DSP epilogue assumes checked ones
    // (`requantize_valid`); any other takes the portable path.
    if !multipliers.iter().zip(shifts).all(|(&m, &s)| crate::quant::Multiplier::new(m, s).is_ok()) {
        return None;
    }
    on_stack!(x.len(), |pairs| matvec_i8_in(w, bias, multipliers, shifts, x, offset, output_zp, y, pairs))
}

/// [`matvec_i8`](super::matvec_i8) on the DSP path: four rows per pass, the
/// requantization of each four done on arrays, so no bounds checks; the
/// input expanded into `pairs`. `None` when the lengths disagree or `pairs`
/// is shorter than [`expand_words`](super::expand_words) (the caller then
/// takes the general path). `multipliers` and `shifts` must be pairs
/// [`Multiplier::new`] accepts (a `QLinear`'s are); others give some
/// output, not [`requantize`](crate::quant::requantize)'s.
#[allow(clippy::too_many_arguments)]
pub(super) fn matvec_i8_in(
    w: &[i8],
    bias: Option<&[i32]>,
    multipliers: &[i32],
    shifts: &[i32],
    x: &[i8],
    offset: i32,
    output_zp: i32,
    y: &mut [i8],
    pairs: &mut [MaybeUninit<u32>],
) -> Option<()> {
    let (cols, rows) = (x.len(), y.len());
    if !fits(w.len(), (rows, cols), multipliers.len(), shifts.len(), bias.map(<[_]>::len), pairs.len()) {
        return None;
    }
    // Multipliers and shifts were checked when the product was made
    // (`requantize_valid`). `move`: the zero point is held, not re-read
    // through two pointers each row.
    let requant =
        move |acc: i32, m: i32, s: i32| i8::saturate(requantize_valid(acc, m, s).saturating_add(output_zp));
    {
        // Rows in fours: one index check per array and pass.
        let (ys, ms, ss) =
            (y.as_chunks_mut::<4>().0, multipliers.as_chunks::<4>().0, shifts.as_chunks::<4>().0);
        let bs = bias.map(|b| b.as_chunks::<4>().0);
        let epilogue = |o: usize, acc: [i32; 4]| {
            let q = o / 4;
            let (Some(yv), Some(m), Some(s)) = (ys.get_mut(q), ms.get(q), ss.get(q)) else { return };
            let b = bs.and_then(|b| b.get(q)).unwrap_or(&[0; 4]);
            for r in 0..4 {
                yv[r] = requant(acc[r].wrapping_add(b[r]), m[r], s[r]);
            }
        };
        quads_i8(w, x, offset, pairs, &mut { epilogue });
    }
    // The last rows (fewer than four), from slices that start there (an
    // `enumerate().skip()` linked an out-of-line `nth`).
    let done = rows / 4 * 4;
    let from = |n: usize| n.min(done);
    let rest = w.get(done.saturating_mul(cols)..).unwrap_or(&[]).chunks_exact(cols.max(1));
    let params = multipliers[from(multipliers.len())..].iter().zip(&shifts[from(shifts.len())..]);
    let bias = bias.map(|b| &b[from(b.len())..]);
    for (o, ((row, yo), (&m, &s))) in rest.zip(&mut y[from(rows)..]).zip(params).enumerate() {
        let b = bias.and_then(|b| b.get(o)).copied().unwrap_or(0);
        *yo = requant(dot_i8(row, x, offset).wrapping_add(b), m, s);
    }
    Some(())
}

/// [`matvec_q15`](super::matvec_q15) on the DSP path with a stack buffer.
pub(super) fn matvec_q15(
    w: &[i8],
    bias: Option<&[i64]>,
    multipliers: &[i32],
    shifts: &[i32],
    x: &[i16],
    y: &mut [i16],
) -> Option<()> {
    on_stack!(x.len(), |pairs| matvec_q15_in(w, bias, multipliers, shifts, x, y, pairs))
}

/// [`matvec_q15`](super::matvec_q15) on the DSP path, as [`matvec_i8_in`].
pub(super) fn matvec_q15_in(
    w: &[i8],
    bias: Option<&[i64]>,
    multipliers: &[i32],
    shifts: &[i32],
    x: &[i16],
    y: &mut [i16],
    pairs: &mut [MaybeUninit<u32>],
) -> Option<()> {
    let (cols, rows) = (x.len(), y.len());
    if !fits(w.len(), (rows, cols), multipliers.len(), shifts.len(), bias.map(<[_]>::len), pairs.len()) {
        return None;
    }
    let requant = |acc: i64, m: i32, s: i32| {
        i16::saturate(requantize_wide(acc, Multiplier { multiplier: m, shift: s }))
    };
    let epilogue = |y: &mut [i16], o: usize, acc: [i64; 4]| {
        let (Some(yv), Some(m), Some(s)) = (
            y.get_mut(o..o + 4).and_then(|v| v.as_chunks_mut::<4>().0.first_mut()),
            multipliers.get(o..o + 4).and_then(|v| v.as_chunks::<4>().0.first()),
            shifts.get(o..o + 4).and_then(|v| v.as_chunks::<4>().0.first()),
        ) else {
            return;
        };
        let b =
            bias.and_then(|b| b.get(o..o + 4)).and_then(|v| v.as_chunks::<4>().0.first()).unwrap_or(&[0; 4]);
        for r in 0..4 {
            yv[r] = requant(acc[r].wrapping_add(b[r]), m[r], s[r]);
        }
    };
    quads_q15(w, x, pairs, |o, acc| epilogue(y, o, acc));
    // The last rows (fewer than four), from slices that start there (an
    // `enumerate().skip()` linked an out-of-line `nth`).
    let done = rows / 4 * 4;
    let from = |n: usize| n.min(done);
    let rest = w.get(done.saturating_mul(cols)..).unwrap_or(&[]).chunks_exact(cols.max(1));
    let params = multipliers[from(multipliers.len())..].iter().zip(&shifts[from(shifts.len())..]);
    let bias = bias.map(|b| &b[from(b.len())..]);
    for (o, ((row, yo), (&m, &s))) in rest.zip(&mut y[from(rows)..]).zip(params).enumerate() {
        let b = bias.and_then(|b| b.get(o)).copied().unwrap_or(0);
        *yo = requant(dot_q15(row, x).wrapping_add(b), m, s);
    }
    Some(())
}

/// Four rows' Q15 sums at a time (exact `i64`), as [`quads_i8`].
#[inline(always)]
fn quads_q15(w: &[i8], x: &[i16], pairs: &mut [MaybeUninit<u32>], mut f: impl FnMut(usize, [i64; 4])) {
    let cols = x.len().max(1);
    let groups = expand_q15(x, pairs);
    let done = groups * 4;
    for (i, q) in w.chunks_exact(four_rows(cols)).enumerate() {
        let (mut t0, mut t1, mut t2, mut t3) = (0i64, 0i64, 0i64, 0i64);
        let mut g = 0;
        while g < groups {
            let n = (groups - g).min(Q15_BLOCK / 4);
            let mut acc = [0i32; 4];
            // SAFETY: words `2g..2(g+n)` of `pairs` were written; each of the
            // four rows has `cols >= 4 (g + n)` bytes from byte `4g`.
            unsafe {
                quad_loop(
                    pairs.as_ptr().cast::<u32>().wrapping_add(2 * g),
                    n,
                    q.as_ptr().wrapping_add(4 * g),
                    cols,
                    &mut acc,
                )
            };
            (t0, t1, t2, t3) =
                (t0 + acc[0] as i64, t1 + acc[1] as i64, t2 + acc[2] as i64, t3 + acc[3] as i64);
            g += n;
        }
        let mut total = [t0, t1, t2, t3];
        if done < x.len() {
            for (t, row) in total.iter_mut().zip(q.chunks_exact(cols)) {
                let tail = row.get(done..).unwrap_or(&[]).iter().zip(x.get(done..).unwrap_or(&[]));
                *t = tail.fold(*t, |s, (&w, &xv)| s + (xv as i32 * w as i32) as i64);
            }
        }
        f(4 * i, total);
    }
}

/// Four rows' sums at a time: `f(first_row, sums)`; rows past the last
/// multiple of four are left to the caller. Out of line, the epilogue
/// called through `dyn`: one copy serves the requantizing product and the
/// wide one (a copy each cost 1.9 KB of flash; the indirect call, a few
/// instructions per four rows). A `pairs` shorter than the expansion
/// leaves the inputs past it to the scalar tail.
#[inline(never)]
fn quads_i8(
    w: &[i8],
    x: &[i8],
    offset: i32,
    pairs: &mut [MaybeUninit<u32>],
    f: &mut dyn FnMut(usize, [i32; 4]),
) {
    let cols = x.len().max(1);
    let groups = expand_i8(x, offset, pairs);
    let done = groups * 4;
    for (i, q) in w.chunks_exact(four_rows(cols)).enumerate() {
        let mut acc = [0i32; 4];
        // SAFETY: `expand_i8` wrote the first `2 * groups` words of `pairs`,
        // the only ones read; `q` holds four rows of
        // `cols >= 4 * groups` bytes, `cols` apart.
        unsafe { quad_loop(pairs.as_ptr().cast::<u32>(), groups, q.as_ptr(), cols, &mut acc) };
        if done < x.len() {
            for (a, row) in acc.iter_mut().zip(q.chunks_exact(cols)) {
                let tail = row.get(done..).unwrap_or(&[]).iter().zip(x.get(done..).unwrap_or(&[]));
                *a = tail.fold(*a, |s, (&w, &xv)| s.wrapping_add((xv as i32 + offset) * w as i32));
            }
        }
        f(4 * i, acc);
    }
}

/// Every row's sum through [`quads_i8`], the requantizing product's loop:
/// the integer path's wide products (router logits, a few rows). Not the
/// decoder's matrices ([`each_dot_i8_in`], inline): through the `dyn`
/// epilogue the tiny LM took 463k instead of 438k instructions a token.
pub(super) fn dots_i8_in(
    w: &[i8],
    x: &[i8],
    offset: i32,
    pairs: &mut [MaybeUninit<u32>],
    mut f: impl FnMut(i32),
) {
    let cols = x.len().max(1);
    quads_i8(w, x, offset, pairs, &mut |_, acc| acc.into_iter().for_each(&mut f));
    for row in w.chunks_exact(four_rows(cols)).remainder().chunks_exact(cols) {
        f(dot_i8(row, x, offset));
    }
}

/// [`add_group_dots_i8`](super::add_group_dots_i8) on the DSP path: the
/// input expanded once, then per four rows each group's sums by
/// [`quad_loop`] and the same float steps as the portable loop; false
/// (nothing done) for groups not a multiple of 4 or inputs wider than the
/// stack buffer.
pub(super) fn add_group_dots_i8(
    w: &[i8],
    g: super::int::GroupShape,
    x: &[i8],
    s: (&[f32], &[f32]),
    y: &mut [f32],
) -> bool {
    if !g.group.is_multiple_of(4) || x.len() > MAX_EXPANDED {
        return false;
    }
    on_stack!(x.len(), |pairs| group_quads(w, g, x, s, y, pairs));
    true
}

#[inline(always)]
fn group_quads(
    w: &[i8],
    g: super::int::GroupShape,
    x: &[i8],
    (sw, sx): (&[f32], &[f32]),
    y: &mut [f32],
    pairs: &mut [MaybeUninit<u32>],
) {
    let mut done = 0;
    if super::expand_words(x.len()) <= pairs.len() && expand_i8(x, 0, pairs) * 4 == x.len() {
        let words = g.group / 2;
        // Indexed rather than zipped: an outlined `Zip::new` of two
        // `ChunksExact` keeps a division-by-zero path (boards/panic-free).
        for (i, q) in w.chunks_exact(four_rows(g.cols)).enumerate() {
            let (Some(yq), Some(s)) = (y.get_mut(4 * i..4 * i + 4), sw.get(4 * i * g.per_row..)) else {
                break;
            };
            let mut acc = [0.0f32; 4];
            acc.iter_mut().zip(&*yq).for_each(|(a, &v)| *a = v);
            // The four rows' scales of the groups `x` covers.
            let [s0, s1, s2, s3]: [&[f32]; 4] = core::array::from_fn(|r| {
                let at = r * g.per_row + g.g0;
                s.get(at..at + g.n).unwrap_or(&[])
            });
            let (mut xp, mut wp) = (pairs.as_ptr().cast::<u32>(), q.as_ptr().wrapping_add(g.c0));
            for ((((&t, &a0), &a1), &a2), &a3) in sx.iter().take(g.n).zip(s0).zip(s1).zip(s2).zip(s3) {
                let mut d = [0i32; 4];
                // SAFETY: `expand_i8` wrote `x.len() / 2` words of `pairs`;
                // the `gi`-th group (`gi < n`) reads words `gi * group / 2`
                // up to `(gi + 1) * group / 2 <= x.len() / 2` (`xp` steps by
                // `group / 2`). `q` holds four rows of `cols` bytes, `cols`
                // apart; the group's bytes of row `r` end at `r * cols + c0 +
                // (gi + 1) * group <= (r + 1) * cols` (`wp` steps by `group`;
                // `c0 + x.len() <= cols`, checked by `GroupShape`).
                unsafe { quad_loop(xp, g.group / 4, wp, g.cols, &mut d) };
                (xp, wp) = (xp.wrapping_add(words), wp.wrapping_add(g.group));
                acc[0] += d[0] as f32 * (a0 * t);
                acc[1] += d[1] as f32 * (a1 * t);
                acc[2] += d[2] as f32 * (a2 * t);
                acc[3] += d[3] as f32 * (a3 * t);
            }
            yq.iter_mut().zip(acc).for_each(|(o, v)| *o = v);
            done += 4;
        }
    }
    super::int::group_rows(w, g, x, (sw, sx), y, done);
}

/// Calls `f(sum (x + offset) * w_row)` (wrapping `i32`) for every row of
/// `w` in order (`x.len()` columns), four rows per pass.
#[inline(always)]
pub(super) fn each_dot_i8(w: &[i8], x: &[i8], offset: i32, f: impl FnMut(i32)) {
    on_stack!(x.len(), |pairs| each_dot_i8_in(w, x, offset, pairs, f))
}

/// [`each_dot_i8`] with the input expanded into `pairs`; rows one at a
/// time (registers only) when `pairs` is too short.
#[inline(always)]
pub(super) fn each_dot_i8_in(
    w: &[i8],
    x: &[i8],
    offset: i32,
    pairs: &mut [MaybeUninit<u32>],
    mut f: impl FnMut(i32),
) {
    let cols = x.len().max(1);
    let mut quads = w.chunks_exact(four_rows(cols));
    if super::expand_words(x.len()) <= pairs.len() {
        let groups = expand_i8(x, offset, pairs);
        let done = groups * 4;
        for q in &mut quads {
            let mut acc = [0i32; 4];
            // SAFETY: `expand_i8` wrote the first `2 * groups` words of `pairs`,
            // the only ones read; `q` holds four rows of
            // `cols >= 4 * groups` bytes, `cols` apart.
            unsafe { quad_loop(pairs.as_ptr().cast::<u32>(), groups, q.as_ptr(), cols, &mut acc) };
            if done < x.len() {
                for (a, row) in acc.iter_mut().zip(q.chunks_exact(cols)) {
                    let tail = row.get(done..).unwrap_or(&[]).iter().zip(x.get(done..).unwrap_or(&[]));
                    *a = tail.fold(*a, |s, (&w, &xv)| s.wrapping_add((xv as i32 + offset) * w as i32));
                }
            }
            f(acc[0]);
            f(acc[1]);
            f(acc[2]);
            f(acc[3]);
        }
    } else {
        // Wider than the expansion buffer: one row at a time.
        for q in &mut quads {
            q.chunks_exact(cols).for_each(|row| f(dot_i8(row, x, offset)));
        }
    }
    for row in quads.remainder().chunks_exact(cols) {
        f(dot_i8(row, x, offset));
    }
}

/// Calls `f(sum x * w_row)` (exact `i64`) for every row of `w` in order,
/// four rows per pass, the `i32` sums widened every 256 products.
#[inline(always)]
pub(super) fn each_dot_q15(w: &[i8], x: &[i16], f: impl FnMut(i64)) {
    on_stack!(x.len(), |pairs| each_dot_q15_in(w, x, pairs, f))
}

/// [`each_dot_q15`] with the input expanded into `pairs`, as [`each_dot_i8_in`].
#[inline(always)]
pub(super) fn each_dot_q15_in(w: &[i8], x: &[i16], pairs: &mut [MaybeUninit<u32>], mut f: impl FnMut(i64)) {
    let cols = x.len().max(1);
    let mut quads = w.chunks_exact(four_rows(cols));
    if super::expand_words(x.len()) <= pairs.len() {
        let groups = expand_q15(x, pairs);
        let done = groups * 4;
        for q in &mut quads {
            let mut total = [0i64; 4];
            let mut g = 0;
            while g < groups {
                let n = (groups - g).min(Q15_BLOCK / 4);
                let mut acc = [0i32; 4];
                // SAFETY: words `2g..2(g+n)` of `pairs` were written; each of
                // the four rows has `cols >= 4 (g + n)` bytes from `4g`.
                unsafe {
                    quad_loop(
                        pairs.as_ptr().cast::<u32>().wrapping_add(2 * g),
                        n,
                        q.as_ptr().wrapping_add(4 * g),
                        cols,
                        &mut acc,
                    )
                };
                for (t, a) in total.iter_mut().zip(acc) {
                    *t += a as i64;
                }
                g += n;
            }
            if done < x.len() {
                for (t, row) in total.iter_mut().zip(q.chunks_exact(cols)) {
                    let tail = row.get(done..).unwrap_or(&[]).iter().zip(x.get(done..).unwrap_or(&[]));
                    *t = tail.fold(*t, |s, (&w, &xv)| s + (xv as i32 * w as i32) as i64);
                }
            }
            f(total[0]);
            f(total[1]);
            f(total[2]);
            f(total[3]);
        }
    } else {
        for q in &mut quads {
            q.chunks_exact(cols).for_each(|row| f(dot_q15(row, x)));
        }
    }
    for row in quads.remainder().chunks_exact(cols) {
        f(dot_q15(row, x));
    }
}

/// One int8 row with `x + offset`, wrapping `i32`.
fn dot_i8(row: &[i8], x: &[i8], offset: i32) -> i32 {
    let off = pair(offset);
    let (xs, x_tail) = x.as_chunks::<4>();
    let (ws, w_tail) = row.as_chunks::<4>();
    let mut acc = 0i32;
    for (xw, w) in xs.iter().zip(ws) {
        let (xv, wv) = (word(xw), word(w));
        acc = smlad(sxtb16(wv), sadd16(sxtb16(xv), off), acc);
        acc = smlad(sxtb16_ror8(wv), sadd16(sxtb16_ror8(xv), off), acc);
    }
    for (&w, &xv) in w_tail.iter().zip(x_tail) {
        acc = acc.wrapping_add((xv as i32 + offset) * w as i32);
    }
    acc
}

/// Products per `i32` block of the Q15 sums: `256 * 2^15 * 2^7 = 2^30`.
const Q15_BLOCK: usize = 256;

/// Q15 inputs `(x0..x3)` as the pairs `(x0, x2)` and `(x1, x3)`.
#[inline(always)]
fn q15_pairs(x: &[i16; 4]) -> (u32, u32) {
    let lo = (x[0] as u16 as u32) | (x[1] as u16 as u32) << 16;
    let hi = (x[2] as u16 as u32) | (x[3] as u16 as u32) << 16;
    (pkhbt(lo, hi), pkhtb(hi, lo))
}

/// One int8 row with Q15 `x`, exact in `i64`.
fn dot_q15(row: &[i8], x: &[i16]) -> i64 {
    let mut total = 0i64;
    for (xb, wb) in x.chunks(Q15_BLOCK).zip(row.chunks(Q15_BLOCK)) {
        let (xs, x_tail) = xb.as_chunks::<4>();
        let (ws, w_tail) = wb.as_chunks::<4>();
        let mut acc = 0i32;
        for (xw, w) in xs.iter().zip(ws) {
            let (x02, x13) = q15_pairs(xw);
            let wv = word(w);
            acc = smlad(sxtb16_ror8(wv), x13, smlad(sxtb16(wv), x02, acc));
        }
        let rest: i32 = w_tail.iter().zip(x_tail).map(|(&w, &xv)| xv as i32 * w as i32).sum();
        total += acc as i64 + rest as i64;
    }
    total
}
