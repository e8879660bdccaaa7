//! Owned quantized layers, made from f32 weights on the host (`alloc`).
//!
//! ```
//! use micromoe::build::QLinearBuf;
//! use micromoe::quant::QuantParams;
//! let w = [0.5f32, -1.0, 0.25, 2.0]; // (2, 2)
//! let input = QuantParams::from_range(-1.0, 1.0).unwrap();
//! let output = QuantParams::from_range(-3.0, 3.0).unwrap();
//! let buf = QLinearBuf::<i8>::quantize(&w, None, 2, 2, input, output).unwrap();
//! let mut y = [0i8; 2];
//! buf.view().unwrap().forward(&[input.quantize(1.0), input.quantize(0.5)], &mut y);
//! assert!((output.dequantize(y[0]) - 0.0).abs() < 0.05);
//! ```

use alloc::vec::Vec;

use crate::error::{Error, Result, What, check_len, mul};
use crate::kernels::{IntKernel, MulParams, QLinear};
use crate::quant::{IntAct, Multiplier, QuantParams};

/// Quantization parameters for an activation of type `A` covering
/// `[min, max]`: asymmetric for int8, symmetric (zero point 0) for Q15.
pub fn act_params<A: IntAct>(min: f32, max: f32) -> Result<QuantParams> {
    if A::LUT_LEN == 256 {
        QuantParams::from_range(min, max)
    } else {
        QuantParams::symmetric_q15(min.abs().max(max.abs()))
    }
}

/// A quantized fully-connected layer that owns its data.
#[derive(Debug, Clone)]
pub struct QLinearBuf<A: IntKernel> {
    /// `(rows, cols)` int8 weights.
    pub weights: Vec<i8>,
    /// Per-row weight scales.
    pub weight_scales: Vec<f32>,
    /// Bias in accumulator units (`scale = s_in * s_w[row]`).
    pub bias: Option<Vec<A::Bias>>,
    /// Per-row multipliers of `s_in * s_w[row] / s_out`.
    pub multipliers: Vec<i32>,
    /// Per-row shifts.
    pub shifts: Vec<i32>,
    /// Output width.
    pub rows: usize,
    /// Input width.
    pub cols: usize,
    /// Input quantization.
    pub input: QuantParams,
    /// Output quantization.
    pub output: QuantParams,
}

impl<A: IntKernel> QLinearBuf<A> {
    /// Quantizes `w` (`(rows, cols)` row-major) symmetric per row to int8
    /// (`s_w = max|w_row| / 127`), the bias to accumulator units, and derives
    /// the per-row requantization for `input -> output`.
    pub fn quantize(
        w: &[f32],
        bias: Option<&[f32]>,
        rows: usize,
        cols: usize,
        input: QuantParams,
        output: QuantParams,
    ) -> Result<Self> {
        check_len(What::Weight, mul(rows, cols)?, w.len())?;
        if let Some(b) = bias {
            check_len(What::Bias, rows, b.len())?;
            crate::error::check_finite(What::Bias, b)?;
        }
        crate::error::check_finite(What::Weight, w)?;
        let mut out = QLinearBuf {
            weights: Vec::with_capacity(w.len()),
            weight_scales: Vec::with_capacity(rows),
            bias: bias.map(|_| Vec::with_capacity(rows)),
            multipliers: Vec::with_capacity(rows),
            shifts: Vec::with_capacity(rows),
            rows,
            cols,
            input,
            output,
        };
        for (r, row) in w.chunks_exact(cols.max(1)).enumerate() {
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s_w = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            out.weights.extend(row.iter().map(|&v| libm::roundf(v / s_w).clamp(-127.0, 127.0) as i8));
            out.weight_scales.push(s_w);
            let acc_scale = input.scale as f64 * s_w as f64;
            if let (Some(qb), Some(b)) = (out.bias.as_mut(), bias) {
                qb.push(A::bias_from_f64(b[r] as f64 / acc_scale));
            }
            let m = Multiplier::from_scale(acc_scale / output.scale as f64)
                .map_err(|_| Error::OutOfRange { what: What::Requant, index: r })?;
            out.multipliers.push(m.multiplier);
            out.shifts.push(m.shift);
        }
        Ok(out)
    }

    /// The borrowed layer, validated.
    pub fn view(&self) -> Result<QLinear<'_, A>> {
        QLinear::new(
            &self.weights,
            self.bias.as_deref(),
            &self.multipliers,
            &self.shifts,
            self.rows,
            self.cols,
            self.input.zero_point,
            self.output.zero_point,
        )
    }
}

/// TFLM `MUL` parameters for `out = a * b`.
pub fn mul_params(a: QuantParams, b: QuantParams, out: QuantParams) -> Result<MulParams> {
    let multiplier = Multiplier::from_scale(a.scale as f64 * b.scale as f64 / out.scale as f64)?;
    Ok(MulParams { a_zp: a.zero_point, b_zp: b.zero_point, out_zp: out.zero_point, multiplier })
}
