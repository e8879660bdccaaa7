//! A weight matrix of any stored type, multiplied by f32 vectors.

use crate::error::{Error, Result, What, check_len, mul};
use crate::kernels::{add_group_dots_i8, for_each_dot_i8, matvec};
use crate::quant::f16;

/// Widest input of an int8 matrix: `cols * 127 * 127` must fit an `i32`.
pub const MAX_INT8_COLS: usize = 1 << 17;

/// Group-scaled int8 matrices ([`Weights::I8`] with more than one scale a
/// row) have groups of a multiple of this many columns (the kernels' step).
pub const INT8_GROUP_MULTIPLE: usize = 16;

/// Columns of input a group-scaled product quantizes at a time: its group
/// scales live on the stack (`GROUP_CHUNK / INT8_GROUP_MULTIPLE` f32s, 256
/// bytes), the weights are read one chunk of each row after another. The
/// result is the same for any chunk size (each row's groups are added in
/// order).
const GROUP_CHUNK: usize = 1024;

/// How a matrix's elements are stored.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// f32.
    F32(&'a [f32]),
    /// f16, widened to f32.
    F16(&'a [f16]),
    /// int8, symmetric, one scale per row or per group of columns:
    /// element `(r, c)` is `w[r, c] * scales[r * (cols / group) + c / group]`,
    /// the group given by the scales' length (`rows * (cols / group)`).
    ///
    /// `group == cols` (one scale a row, `rows` scales): the input vector is quantized to
    /// int8 per call with one scale, `max |x| / 127`, each row is summed in
    /// `i32` and scaled once. Otherwise `group` is a multiple of
    /// [`INT8_GROUP_MULTIPLE`] dividing `cols`, and the input is quantized
    /// per group too (one scale per `group` inputs); each row is the sum,
    /// group by group in order, of the group's `i32` sum times the product
    /// of the two scales: llama.cpp's `Q8_0` with f32 scales and any group
    /// size. Both are the same bits on every target (`kernels::add_group_dots_i8`).
    I8 {
        /// `(rows, cols)` row-major.
        w: &'a [i8],
        /// `(rows, cols / group)` scales, finite and non-negative.
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
    /// Checks every length (and, for int8, the scale group, that scales
    /// are finite and non-negative, and `cols <= MAX_INT8_COLS`).
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
                // `rows` scales, or `rows * k` for `k` groups of a row.
                let k = scales.len() / rows;
                if k == 0 || k * rows != scales.len() {
                    return Err(Error::Shape { what: What::Scale, expected: rows, actual: scales.len() });
                }
                let group = cols / k;
                if k > 1 && (group * k != cols || !group.is_multiple_of(INT8_GROUP_MULTIPLE)) {
                    return Err(Error::OutOfRange { what: What::ScaleGroup, index: 0 });
                }
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

    /// The bias (`rows`), if any.
    pub fn bias(&self) -> Option<&'a [f32]> {
        self.bias
    }

    /// Columns per int8 scale: `cols` for one scale a row (and for float
    /// matrices), else the group size.
    pub fn group(&self) -> usize {
        match self.w {
            Weights::I8 { scales, .. } => (self.cols / (scales.len() / self.rows.max(1)).max(1)).max(1),
            _ => self.cols,
        }
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
                let (per, group) = (scales.len() / self.rows.max(1), self.group());
                if let (Some(row), Some(s)) = (w.get(range), scales.get(r * per..(r + 1) * per)) {
                    for ((o, v), &s) in out.chunks_mut(group).zip(row.chunks(group)).zip(s) {
                        o.iter_mut().zip(v).for_each(|(o, &v)| *o = v as f32 * s);
                    }
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
            Weights::I8 { w, scales } if scales.len() != self.rows => {
                self.forward_groups((w, scales), input.x, y, input.xq);
                // Its bytes now hold this product's quantization, not the vector's.
                input.scale = None;
            }
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

impl Matrix<'_> {
    /// A group-scaled product: `x` quantized per group into `xq`, a chunk
    /// of [`GROUP_CHUNK`] columns at a time (its scales on the stack), each
    /// chunk's groups added to `y` by [`add_group_dots_i8`].
    fn forward_groups(&self, (w, scales): (&[i8], &[f32]), x: &[f32], y: &mut [f32], xq: &mut [i8]) {
        let (rows, cols, group) = (self.rows, self.cols, self.group());
        let (Some(y), Some(xq)) = (y.get_mut(..rows), xq.get_mut(..cols)) else {
            return;
        };
        if x.len() != cols {
            return;
        }
        y.iter_mut().for_each(|v| *v = 0.0);
        let group = group.max(1);
        let chunk = (GROUP_CHUNK / group).max(1).saturating_mul(group).max(1);
        let mut sx = [0.0f32; GROUP_CHUNK / INT8_GROUP_MULTIPLE];
        for (i, (xc, qc)) in x.chunks(chunk).zip(xq.chunks_mut(chunk)).enumerate() {
            let groups = xc.chunks_exact(group).zip(qc.chunks_exact_mut(group));
            for ((xg, qg), s) in groups.zip(sx.iter_mut()) {
                *s = quantize_vector(xg, qg);
            }
            let n = xc.len() / group;
            add_group_dots_i8(w, cols, i * chunk, qc, group, (scales, &sx[..n.min(sx.len())]), y);
        }
        if let Some(b) = self.bias {
            y.iter_mut().zip(b).for_each(|(yo, &bo)| *yo += bo);
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
                // Every token quantized (per group, or whole: `group ==
                // cols`), then the products: the same bits as token by token
                // (a group-scaled row adds its groups in order, as
                // `forward_groups`' chunks do).
                let (group, per) = (self.group(), scales.len() / rows);
                let tokens = (xs.len() / cols).min(ys.len() / rows);
                let mut xq = alloc::vec![0i8; tokens * cols];
                let sx: alloc::vec::Vec<f32> = xs[..tokens * cols]
                    .chunks_exact(group)
                    .zip(xq.chunks_exact_mut(group))
                    .map(|(x, q)| quantize_vector(x, q))
                    .collect();
                if per == 1 {
                    // One scale a row: every token against every row at
                    // once, in register tiles (the same integer sums).
                    crate::kernels::for_each_dot_i8_batch(w, &xq, cols, |t, r, acc| {
                        if let (Some(yo), Some(&s), Some(&st)) =
                            (ys.get_mut(t * rows + r), scales.get(r), sx.get(t))
                        {
                            *yo = acc as f32 * (s * st);
                        }
                    });
                } else {
                    // Groups: blocks of rows that stay in L2 (64 KB) across
                    // the tokens, each row's groups added in order.
                    ys.iter_mut().take(tokens * rows).for_each(|v| *v = 0.0);
                    let rows_per = ((64 << 10) / cols.max(1)).clamp(1, rows);
                    for (b, block) in w.chunks(rows_per * cols).enumerate() {
                        let (r0, n) = (b * rows_per, block.len() / cols);
                        let sw = &scales[r0 * per..(r0 + n) * per];
                        for (t, q) in xq.chunks_exact(cols).enumerate() {
                            let y = &mut ys[t * rows + r0..t * rows + r0 + n];
                            add_group_dots_i8(block, cols, 0, q, group, (sw, &sx[t * per..(t + 1) * per]), y);
                        }
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
            Weights::I8 { w, scales } => {
                let per = scales.len() / self.rows.max(1);
                let scales = scales.get(r0.checked_mul(per)?..r1.checked_mul(per)?)?;
                Weights::I8 { w: w.get(span)?, scales }
            }
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
    fn grouped_int8_matches_exact_integer_model() {
        // Two groups of 16 a row; each input group's max |x| is 127, so its
        // scale is 1 and it quantizes exactly.
        let (rows, cols) = (3, 32);
        let w: Vec<i8> = (0..rows * cols).map(|i| ((i * 37) % 255) as i8).collect();
        let x: Vec<f32> =
            (0..cols).map(|c| [127.0, -3.0, 5.0, -127.0][c % 4] * if c < 16 { 1.0 } else { 0.5 }).collect();
        let scales = [0.5, 0.25, 1.0, 2.0, 0.125, 4.0];
        let m =
            Matrix::new(Weights::I8 { w: &w, scales: &scales }, Some(&[1.0, 0.0, -1.0]), rows, cols).unwrap();
        assert_eq!(m.group(), 16);
        let mut y = [0.0; 3];
        m.forward(&x, &mut y, &mut [0; 32]);
        for r in 0..rows {
            // Group 1's inputs are half of 127-multiples: scale 63.5 / 127 = 0.5.
            let dot = |g: usize| -> i32 {
                (0..16)
                    .map(|c| w[r * cols + g * 16 + c] as i32 * (x[g * 16 + c] / [1.0, 0.5][g]) as i32)
                    .sum()
            };
            let want = (dot(0) as f32 * scales[2 * r] + dot(1) as f32 * (scales[2 * r + 1] * 0.5))
                + [1.0, 0.0, -1.0][r];
            assert_eq!(y[r], want, "row {r}");
        }
        // The embedding look-up scales each group by its own scale.
        let mut row = [0.0f32; 32];
        m.row(1, &mut row);
        assert_eq!(row[3], w[32 + 3] as f32 * 1.0);
        assert_eq!(row[20], w[32 + 20] as f32 * 2.0);
    }

    /// Wider than one chunk of quantized input: the chunked product equals
    /// one pass of the kernel over the whole row (the same bits), and a
    /// batch equals its tokens one by one.
    #[test]
    fn grouped_int8_is_the_same_in_chunks_and_batches() {
        let (rows, cols, group) = (9, 2 * GROUP_CHUNK + 64, 32);
        let mut seed = 3u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let w: Vec<i8> = (0..rows * cols).map(|_| next() as i8).collect();
        let per = cols / group;
        let scales: Vec<f32> = (0..rows * per).map(|_| (next() % 1000) as f32 * 1e-5).collect();
        let x: Vec<f32> = (0..2 * cols).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
        let m = Matrix::new(Weights::I8 { w: &w, scales: &scales }, None, rows, cols).unwrap();
        let mut y = vec![0.0f32; rows];
        m.forward(&x[..cols], &mut y, &mut vec![0; cols]);
        let mut xq = vec![0i8; cols];
        let sx: Vec<f32> =
            x[..cols].chunks(group).zip(xq.chunks_mut(group)).map(|(x, q)| quantize_vector(x, q)).collect();
        let mut whole = vec![0.0f32; rows];
        crate::kernels::reference::add_group_dots_i8(&w, cols, 0, &xq, group, (&scales, &sx), &mut whole);
        assert_eq!(y, whole);
        #[cfg(feature = "std")]
        {
            let mut ys = vec![0.0f32; 2 * rows];
            m.forward_batch(&x, &mut ys);
            let mut y2 = vec![0.0f32; rows];
            m.forward(&x[cols..], &mut y2, &mut vec![0; cols]);
            assert_eq!(&ys[..rows], &y[..]);
            assert_eq!(&ys[rows..], &y2[..]);
        }
    }

    #[test]
    fn scale_groups_are_checked() {
        let w = [0i8; 64];
        // Two rows of 32: one scale a row, groups of 16 or 32 ...
        for n in [2, 4] {
            assert!(Matrix::new(Weights::I8 { w: &w, scales: &[1.0; 4][..n] }, None, 2, 32).is_ok());
        }
        // ... not groups of 8 (not a multiple of 16), 32 / 3, or a count
        // that is no multiple of the rows.
        for n in [8, 6, 3] {
            let e = Matrix::new(Weights::I8 { w: &w, scales: &[1.0; 8][..n] }, None, 2, 32).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::OutOfRange { what: What::ScaleGroup, .. } | Error::Shape { what: What::Scale, .. }
                ),
                "{n}: {e:?}"
            );
        }
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
