//! A weight matrix of any stored type, multiplied by f32 vectors.

use crate::error::{Error, Result, What, check_len, mul};
use crate::kernels::{for_each_dot_i8, matvec};
use crate::quant::f16;

/// Widest input of an int8 matrix: `cols * 127 * 127` must fit an `i32`.
pub const MAX_INT8_COLS: usize = 1 << 17;

/// How a matrix's elements are stored.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// f32.
    F32(&'a [f32]),
    /// f16, widened to f32.
    F16(&'a [f16]),
    /// int8, symmetric per row: element `(r, c)` is `w[r, c] * scales[r]`.
    /// The input vector is quantized to int8 per call (one scale for the
    /// vector, `max |x| / 127`) and rows are summed in `i32`, as llama.cpp's
    /// `Q8_0` dot products do with one scale per row instead of per block.
    I8 {
        /// `(rows, cols)` row-major.
        w: &'a [i8],
        /// `rows` scales, finite and non-negative.
        scales: &'a [f32],
    },
}

/// A borrowed `(rows, cols)` matrix with an optional f32 bias.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    w: Weights<'a>,
    bias: Option<&'a [f32]>,
    rows: usize,
    cols: usize,
}

impl<'a> Matrix<'a> {
    /// Checks every length (and, for int8, that scales are finite and
    /// non-negative and `cols <= MAX_INT8_COLS`).
    pub fn new(w: Weights<'a>, bias: Option<&'a [f32]>, rows: usize, cols: usize) -> Result<Self> {
        let m = Self::new_trusted(w, bias, rows, cols)?;
        if let Weights::I8 { scales, .. } = w
            && let Some(index) = scales.iter().position(|s| !(s.is_finite() && *s >= 0.0))
        {
            return Err(Error::OutOfRange { what: What::Scale, index });
        }
        Ok(m)
    }

    /// [`Matrix::new`] without the scan of the int8 row scales: for views
    /// rebuilt from bytes that [`Model::parse`](crate::Model::parse) has
    /// validated with [`Matrix::new`] (lengths are still checked, O(1)).
    pub(crate) fn new_trusted(
        w: Weights<'a>,
        bias: Option<&'a [f32]>,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let n = mul(rows, cols)?;
        if rows == 0 || cols == 0 {
            return Err(Error::Shape { what: What::Weight, expected: 1, actual: 0 });
        }
        match w {
            Weights::F32(w) => check_len(What::Weight, n, w.len())?,
            Weights::F16(w) => check_len(What::Weight, n, w.len())?,
            Weights::I8 { w, scales } => {
                check_len(What::Weight, n, w.len())?;
                check_len(What::Scale, rows, scales.len())?;
                if cols > MAX_INT8_COLS {
                    return Err(Error::OutOfRange { what: What::Weight, index: 0 });
                }
            }
        }
        if let Some(b) = bias {
            check_len(What::Bias, rows, b.len())?;
        }
        Ok(Matrix { w, bias, rows, cols })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The stored weights.
    pub fn weights(&self) -> Weights<'a> {
        self.w
    }

    /// Row `r` as f32 into `out` (`cols` wide): an embedding look-up.
    /// Rows past the end leave `out` untouched.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        let range = r * c..(r + 1) * c;
        match self.w {
            Weights::F32(w) => {
                if let Some(row) = w.get(range) {
                    out.iter_mut().zip(row).for_each(|(o, &v)| *o = v);
                }
            }
            Weights::F16(w) => {
                if let Some(row) = w.get(range) {
                    out.iter_mut().zip(row).for_each(|(o, v)| *o = v.to_f32());
                }
            }
            Weights::I8 { w, scales } => {
                if let (Some(row), Some(&s)) = (w.get(range), scales.get(r)) {
                    out.iter_mut().zip(row).for_each(|(o, &v)| *o = v as f32 * s);
                }
            }
        }
    }

    /// `y = W x + b`. `x` has `cols` and `y` `rows` elements (callers check
    /// once; a mismatch computes garbage, never panics). `xq` is work space
    /// of at least `cols` bytes for int8 matrices (unused otherwise).
    // w: (rows, cols) @ x: (cols,) -> y: (rows,)
    pub fn forward(&self, x: &[f32], y: &mut [f32], xq: &mut [i8]) {
        self.forward_input(&mut Input::new(x, xq), y);
    }

    /// [`Matrix::forward`] of an [`Input`]: several matrices of the same
    /// vector quantize it once.
    pub fn forward_input(&self, input: &mut Input<'_>, y: &mut [f32]) {
        match self.w {
            Weights::F32(w) => matvec(w, self.bias, input.x, y),
            Weights::F16(w) => matvec(w, self.bias, input.x, y),
            Weights::I8 { w, scales } => {
                let (xq, sx) = input.quantized();
                if xq.len() != self.cols {
                    return;
                }
                let mut out = y.iter_mut().zip(scales);
                for_each_dot_i8(w, xq, 0, |acc| {
                    if let Some((yo, &s)) = out.next() {
                        *yo = acc as f32 * (s * sx);
                    }
                });
                if let Some(b) = self.bias {
                    y.iter_mut().zip(b).for_each(|(yo, &bo)| *yo += bo);
                }
            }
        }
    }
}

#[cfg(feature = "std")]
impl Matrix<'_> {
    /// [`Matrix::forward`] for `tokens` inputs at once (`xs`: `(tokens,
    /// cols)`, `ys`: `(tokens, rows)`, row-major), each weight row read
    /// once for all of them while cached: the same bits as token by token
    /// (f32 and f16 through [`matmul`](crate::kernels::matmul); int8 with
    /// each input quantized as [`Input`] does, integer sums, the same
    /// scaling).
    pub(crate) fn forward_batch(&self, xs: &[f32], ys: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        match self.w {
            Weights::F32(w) => crate::kernels::matmul(w, self.bias, xs, cols, ys),
            Weights::F16(w) => crate::kernels::matmul(w, self.bias, xs, cols, ys),
            Weights::I8 { w, scales } => {
                let tokens = (xs.len() / cols).min(ys.len() / rows);
                let mut xq = alloc::vec![0i8; tokens * cols];
                let sx: alloc::vec::Vec<f32> = xs
                    .chunks_exact(cols)
                    .zip(xq.chunks_exact_mut(cols))
                    .map(|(x, q)| quantize_vector(x, q))
                    .collect();
                // Blocks of rows that stay in L2 (64 KB) across the tokens.
                let per = (64 << 10) / cols.max(1);
                let per = per.clamp(1, rows);
                for (b, block) in w.chunks(per * cols).enumerate() {
                    let first = b * per;
                    for (t, (q, &sx)) in xq.chunks_exact(cols).zip(&sx).enumerate() {
                        let y = &mut ys[t * rows..(t + 1) * rows];
                        let mut out = y[first..].iter_mut().zip(&scales[first..]);
                        for_each_dot_i8(block, q, 0, |acc| {
                            if let Some((yo, &s)) = out.next() {
                                *yo = acc as f32 * (s * sx);
                            }
                        });
                    }
                }
                if let Some(b) = self.bias {
                    for y in ys.chunks_exact_mut(rows).take(tokens) {
                        y.iter_mut().zip(b).for_each(|(yo, &bo)| *yo += bo);
                    }
                }
            }
        }
    }
}

#[cfg(feature = "std")]
impl<'a> Matrix<'a> {
    /// Rows `r0..r1` as a matrix of their own (`None` if empty or out of range).
    fn rows_range(&self, r0: usize, r1: usize) -> Option<Matrix<'a>> {
        let c = self.cols;
        let span = r0.checked_mul(c)?..r1.checked_mul(c)?;
        let w = match self.w {
            Weights::F32(w) => Weights::F32(w.get(span)?),
            Weights::F16(w) => Weights::F16(w.get(span)?),
            Weights::I8 { w, scales } => Weights::I8 { w: w.get(span)?, scales: scales.get(r0..r1)? },
        };
        let bias = match self.bias {
            Some(b) => Some(b.get(r0..r1)?),
            None => None,
        };
        (r0 < r1).then_some(Matrix { w, bias, rows: r1 - r0, cols: c })
    }

    /// [`Matrix::forward`] with the rows split over `threads` workers (each
    /// quantizing `x` for itself: the same bits).
    pub(crate) fn forward_threads(&self, x: &[f32], y: &mut [f32], threads: usize) {
        let per = self.rows.div_ceil(threads.max(1)).max(1);
        let run = |(i, y): (usize, &mut [f32])| {
            if let Some(m) = self.rows_range(i * per, (i * per + y.len()).min(self.rows)) {
                let mut xq = std::vec![0i8; x.len()];
                m.forward(x, y, &mut xq);
            }
        };
        crate::moe::batch::spread(y.chunks_mut(per).enumerate(), run);
    }
}

/// A decoder FFN's products over a batch of tokens (prefill).
#[cfg(feature = "std")]
impl crate::expert::Product<crate::expert::Batch<'_>, ()> for Matrix<'_> {
    #[inline(always)]
    fn input(&self, x: &mut crate::expert::Batch<'_>, y: &mut [f32]) {
        self.forward_batch(x.0, y);
    }
    #[inline(always)]
    fn hidden(&self, h: &[f32], y: &mut [f32], _: &mut ()) {
        self.forward_batch(h, y);
    }
}

impl crate::expert::Dims for Matrix<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
}

/// A decoder FFN's products: the FFN input quantized once, the hidden
/// vector quantized into the work bytes.
impl<'x> crate::expert::Product<Input<'x>, [i8]> for Matrix<'_> {
    #[inline(always)]
    fn input(&self, x: &mut Input<'x>, y: &mut [f32]) {
        self.forward_input(x, y);
    }
    #[inline(always)]
    fn hidden(&self, h: &[f32], y: &mut [f32], xq: &mut [i8]) {
        self.forward(h, y, xq);
    }
}

/// An f32 vector as matrices read it: int8 matrices take its int8
/// quantization ([`quantize_vector`]), made by the first such product and
/// reused by the next (the same bits as quantizing it for each).
#[derive(Debug)]
pub struct Input<'x> {
    x: &'x [f32],
    xq: &'x mut [i8],
    scale: Option<f32>,
}

impl<'x> Input<'x> {
    /// `x`, with `xq` (at least `x.len()` bytes) for its quantization.
    pub fn new(x: &'x [f32], xq: &'x mut [i8]) -> Self {
        Input { x, xq, scale: None }
    }

    /// The int8 vector and its scale, quantized on the first call.
    fn quantized(&mut self) -> (&[i8], f32) {
        let sx = match self.scale {
            Some(s) => s,
            None => *self.scale.insert(quantize_vector(self.x, self.xq)),
        };
        let n = self.x.len().min(self.xq.len());
        (&self.xq[..n], sx)
    }
}

/// Quantizes `x` to int8 with one symmetric scale, `max |x| / 127`, into
/// `q`; returns the scale (0 for an all-zero or empty `x`). Round half away
/// from zero.
pub fn quantize_vector(x: &[f32], q: &mut [i8]) -> f32 {
    // `a > m` rather than `f32::max`: the same value (a NaN is passed over
    // either way) without the out-of-line `fmaxf` call per element.
    let amax = x.iter().fold(0.0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    if amax == 0.0 || !amax.is_finite() {
        q.iter_mut().for_each(|v| *v = 0);
        return 0.0;
    }
    let inv = 127.0 / amax;
    for (qv, &v) in q.iter_mut().zip(x) {
        // `round_half_away` is `roundf` without the call (a NaN gives 0 both ways).
        *qv = crate::quant::round_half_away(v * inv).clamp(-127, 127) as i8;
    }
    amax / 127.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_matches_exact_integer_model() {
        // Inputs that quantize exactly: max |x| = 127 gives scale 1.
        let w: [i8; 6] = [1, -2, 3, 127, -127, 0];
        let m = Matrix::new(Weights::I8 { w: &w, scales: &[0.5, 0.25] }, Some(&[1.0, -1.0]), 2, 3).unwrap();
        let x = [127.0, 2.0, -5.0];
        let mut y = [0.0; 2];
        m.forward(&x, &mut y, &mut [0; 3]);
        assert_eq!(y, [(127 - 4 - 15) as f32 * 0.5 + 1.0, (127 * 127 - 254) as f32 * 0.25 - 1.0]);
    }

    #[test]
    fn rows_and_scales_are_checked() {
        assert!(Matrix::new(Weights::I8 { w: &[0; 6], scales: &[1.0] }, None, 2, 3).is_err());
        assert!(Matrix::new(Weights::I8 { w: &[0; 6], scales: &[1.0, f32::NAN] }, None, 2, 3).is_err());
        assert!(Matrix::new(Weights::F32(&[0.0; 6]), Some(&[0.0]), 2, 3).is_err());
    }

    #[test]
    fn zero_vector_quantizes_to_zero() {
        let mut q = [5i8; 3];
        assert_eq!(quantize_vector(&[0.0; 3], &mut q), 0.0);
        assert_eq!(q, [0; 3]);
        assert_eq!(quantize_vector(&[-2.0, 1.0, 0.01], &mut q), 2.0 / 127.0);
        assert_eq!(q, [-127, 64, 1]);
    }
}
